"""A raw-socket MQTT client that speaks in `broker.protocol.packets` values, for protocol tests.

Why: tests of MQTT 5 properties, topic aliases, receive maximum and bad input must see every
packet exactly as the broker sent it (paho hides aliases, acks on its own and reassembles
topics) and must be able to send what a polite client never would. `RawClient` sends packet
values or raw bytes and reads packet values back, one at a time, each wait bounded.

Encoding/decoding uses the project's codec (`broker.protocol.codec`) when it exists, so running
the e2e suite against mosquitto also checks the codec against a real broker; until then (or with
MESHMQ_RAWCLIENT_CODEC=local) a small independent codec below does the job. The local codec
covers what a client sends and what a server sends; it validates little on purpose.

Must not: sleep-and-hope (every wait is a socket timeout with a deadline), ack anything on its
own, reconnect, or talk to anything but the broker under test on loopback.

Invariants: one socket per `RawClient`; packets are returned in wire order; a packet decoded
but not yet asked for stays queued in `pending`.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any, Protocol, TypeVar

from broker.protocol.packets import (
    NO_PROPERTIES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    ProtocolVersion,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
)

P = TypeVar("P")


class BrokerAddress(Protocol):
    host: str
    port: int


class ConnectionClosed(EOFError):
    """The broker closed the connection; `packets` are those read before the close."""


# -- bytes ---------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s: str | bytes) -> bytes:
    """A length-prefixed string; bytes are sent as they are (e.g. invalid UTF-8 on purpose)."""
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def fixed_header(type_: int, flags: int, remaining_bytes: int) -> bytes:
    return bytes([(type_ << 4) | flags]) + varint(remaining_bytes)


def packet_bytes(type_: int, flags: int, body: bytes) -> bytes:
    return fixed_header(type_, flags, len(body)) + body


# -- local codec: properties ------------------------------------------------------------

_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
# property id -> (Properties field, wire type)
_PROPS: dict[int, tuple[str, int]] = {
    0x01: ("payload_format_indicator", _BYTE), 0x02: ("message_expiry_interval_s", _U32),
    0x03: ("content_type", _STR), 0x08: ("response_topic", _STR),
    0x09: ("correlation_data", _BIN), 0x0B: ("subscription_identifiers", _VARINT),
    0x11: ("session_expiry_interval_s", _U32), 0x12: ("assigned_client_identifier", _STR),
    0x13: ("server_keep_alive_s", _U16), 0x15: ("authentication_method", _STR),
    0x16: ("authentication_data", _BIN), 0x17: ("request_problem_information", _BYTE),
    0x18: ("will_delay_interval_s", _U32), 0x19: ("request_response_information", _BYTE),
    0x1A: ("response_information", _STR), 0x1C: ("server_reference", _STR),
    0x1F: ("reason_string", _STR), 0x21: ("receive_maximum", _U16),
    0x22: ("topic_alias_maximum", _U16), 0x23: ("topic_alias", _U16),
    0x24: ("maximum_qos", _BYTE), 0x25: ("retain_available", _BYTE),
    0x26: ("user_properties", _PAIR), 0x27: ("maximum_packet_bytes", _U32),
    0x28: ("wildcard_subscription_available", _BYTE),
    0x29: ("subscription_identifier_available", _BYTE),
    0x2A: ("shared_subscription_available", _BYTE),
}
_FIELD_TO_ID = {name: pid for pid, (name, _) in _PROPS.items()}


def _encode_value(kind: int, value: Any) -> bytes:
    if kind == _BYTE:
        return bytes([value])
    if kind == _U16:
        return struct.pack("!H", value)
    if kind == _U32:
        return struct.pack("!I", value)
    if kind == _VARINT:
        return varint(value)
    if kind in (_STR, _BIN):
        return mqtt_str(value)
    return mqtt_str(value[0]) + mqtt_str(value[1])


def local_encode_properties(props: Properties) -> bytes:
    """Property block with its varint length, in `Properties` field order."""
    out = bytearray()
    for f in fields(Properties):
        value = getattr(props, f.name)
        pid = _FIELD_TO_ID[f.name]
        kind = _PROPS[pid][1]
        items = value if isinstance(value, tuple) else (() if value is None else (value,))
        for item in items:
            out += bytes([pid]) + _encode_value(kind, item)
    return varint(len(out)) + bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("packet body too short")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("!H", self.take(2))[0])

    def varint(self) -> int:
        n, shift = 0, 0
        for _ in range(4):
            b = self.u8()
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n
        raise ValueError("varint longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        return self.binary().decode("utf-8")

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def properties(self) -> Properties:
        end = self.pos + self.varint()
        values: dict[str, Any] = {}
        pairs: list[tuple[str, str]] = []
        sub_ids: list[int] = []
        while self.pos < end:
            name, kind = _PROPS[self.varint()]
            if kind == _BYTE:
                values[name] = self.u8()
            elif kind == _U16:
                values[name] = self.u16()
            elif kind == _U32:
                values[name] = int(struct.unpack("!I", self.take(4))[0])
            elif kind == _VARINT:
                sub_ids.append(self.varint())
            elif kind == _STR:
                values[name] = self.string()
            elif kind == _BIN:
                values[name] = self.binary()
            else:
                pairs.append((self.string(), self.string()))
        if not values and not pairs and not sub_ids:
            return NO_PROPERTIES
        return Properties(**values, user_properties=tuple(pairs), subscription_identifiers=tuple(sub_ids))


# -- local codec: packets -----------------------------------------------------------------


def local_encode(p: Packet, version: ProtocolVersion) -> bytes:  # noqa: C901 - one table
    v5 = version == ProtocolVersion.V5
    props = (lambda pr: local_encode_properties(pr) if v5 else b"")
    if isinstance(p, Connect):
        flags = 0x02 if p.clean_start else 0
        payload = mqtt_str(p.client_id)
        if p.will is not None:
            flags |= 0x04 | (p.will.qos << 3) | (0x20 if p.will.retain else 0)
            payload += props(p.will.properties) + mqtt_str(p.will.topic) + mqtt_str(p.will.payload)
        if p.username is not None:
            flags |= 0x80
            payload += mqtt_str(p.username)
        if p.password is not None:
            flags |= 0x40
            payload += mqtt_str(p.password)
        head = mqtt_str(p.protocol_name) + bytes([p.protocol_version, flags])
        return packet_bytes(1, 0, head + struct.pack("!H", p.keepalive_s) + props(p.properties) + payload)
    if isinstance(p, Publish):
        flags = (0x08 if p.dup else 0) | (p.qos << 1) | (0x01 if p.retain else 0)
        body = mqtt_str(p.topic) + (struct.pack("!H", p.packet_id) if p.qos else b"")
        return packet_bytes(3, flags, body + props(p.properties) + p.payload)
    if isinstance(p, Puback | Pubrec | Pubrel | Pubcomp):
        type_ = {Puback: 4, Pubrec: 5, Pubrel: 6, Pubcomp: 7}[type(p)]
        body = struct.pack("!H", p.packet_id)
        if v5 and (p.reason_code or p.properties != NO_PROPERTIES):
            body += bytes([p.reason_code]) + props(p.properties)
        return packet_bytes(type_, 0x02 if type_ == 6 else 0, body)
    if isinstance(p, Subscribe):
        body = struct.pack("!H", p.packet_id) + props(p.properties)
        for s in p.subscriptions:
            opts = s.qos | (s.no_local << 2) | (s.retain_as_published << 3) | (s.retain_handling << 4)
            body += mqtt_str(s.topic_filter) + bytes([opts])
        return packet_bytes(8, 0x02, body)
    if isinstance(p, Unsubscribe):
        body = struct.pack("!H", p.packet_id) + props(p.properties)
        return packet_bytes(10, 0x02, body + b"".join(mqtt_str(t) for t in p.topic_filters))
    if isinstance(p, Pingreq):
        return packet_bytes(12, 0, b"")
    if isinstance(p, Disconnect | Auth):
        type_ = 14 if isinstance(p, Disconnect) else 15
        body = bytes([p.reason_code]) + props(p.properties) if v5 else b""
        return packet_bytes(type_, 0, body)
    raise TypeError(f"local codec does not encode {type(p).__name__}")


def local_decode(first: int, body: bytes, version: ProtocolVersion) -> Packet:  # noqa: C901
    """Decode one packet a server sends (plus PUBLISH/acks, which flow both ways)."""
    v5 = version == ProtocolVersion.V5
    type_, flags = first >> 4, first & 0x0F
    r = _Reader(body)
    if type_ == 2:
        ack_flags, code = r.u8(), r.u8()
        return Connack(bool(ack_flags & 1), code, r.properties() if v5 else NO_PROPERTIES)
    if type_ == 3:
        qos = (flags >> 1) & 0x03
        topic = r.string()
        pid = r.u16() if qos else 0
        pr = r.properties() if v5 else NO_PROPERTIES
        return Publish(topic, r.rest(), qos, bool(flags & 1), bool(flags & 8), pid, pr)
    if type_ in (4, 5, 6, 7):
        cls = {4: Puback, 5: Pubrec, 6: Pubrel, 7: Pubcomp}[type_]
        pid = r.u16()
        code = 0 if r.at_end() else r.u8()
        pr = NO_PROPERTIES if r.at_end() else r.properties()
        return cls(pid, code, pr)  # type: ignore[no-any-return]
    if type_ in (9, 11):
        pid = r.u16()
        pr = r.properties() if v5 else NO_PROPERTIES
        codes = tuple(r.rest())
        return Suback(pid, codes, pr) if type_ == 9 else Unsuback(pid, codes, pr)
    if type_ == 13:
        return Pingresp()
    if type_ in (14, 15):
        code = 0 if r.at_end() else r.u8()
        pr = NO_PROPERTIES if r.at_end() else r.properties()
        return Disconnect(code, pr) if type_ == 14 else Auth(code, pr)
    raise ValueError(f"local codec does not decode packet type {type_}")


def show(p: object) -> str:
    """A short repr for failure messages: fields at their default value are left out."""
    if isinstance(p, list | tuple):
        return "[" + ", ".join(show(x) for x in p) + "]"
    if not hasattr(p, "__dataclass_fields__"):
        return repr(p)
    parts = []
    for f in fields(p):  # type: ignore[arg-type]
        value = getattr(p, f.name)
        if value == f.default or value in ((), None):
            continue
        parts.append(f"{f.name}={show(value) if hasattr(value, '__dataclass_fields__') else repr(value)}")
    return f"{type(p).__name__}({', '.join(parts)})"


def _project_codec() -> Any:
    if os.environ.get("MESHMQ_RAWCLIENT_CODEC") == "local":
        return None
    try:
        from broker.protocol import codec
    except ImportError:
        return None
    return codec


# -- the client ----------------------------------------------------------------------------


class RawClient:
    """One TCP connection; send packet values or bytes, read packet values with timeouts."""

    def __init__(self, broker: BrokerAddress, version: int = 5, timeout_s: float = 5.0) -> None:
        self.version = ProtocolVersion(version)
        self.sock = socket.create_connection((broker.host, broker.port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending: deque[Packet] = deque()
        self.closed = False
        self._buf = bytearray()
        self._codec = _project_codec()
        self._decoder: Any = None
        if self._codec is not None:
            self._decoder = self._codec.Decoder(version=self.version)
        self._next_id = 0

    # sending

    def encode(self, p: Packet) -> bytes:
        if self._codec is not None:
            return bytes(self._codec.encode(p, self.version))
        return local_encode(p, self.version)

    def send(self, p: Packet) -> None:
        self.send_bytes(self.encode(p))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    # receiving

    def _decode_buffered(self) -> None:
        if self._decoder is not None:
            data = bytes(self._buf)
            self._buf.clear()
            self.pending.extend(self._decoder.feed(data))
            return
        while True:
            length, shift, i = 0, 0, 1
            while True:
                if i >= len(self._buf):
                    return
                b = self._buf[i]
                length |= (b & 0x7F) << shift
                shift, i = shift + 7, i + 1
                if not b & 0x80:
                    break
            if len(self._buf) < i + length:
                return
            first, body = self._buf[0], bytes(self._buf[i:i + length])
            del self._buf[:i + length]
            self.pending.append(local_decode(first, body, self.version))

    def _read_more(self, deadline: float) -> None:
        """One recv into the buffer; raise TimeoutError / ConnectionClosed."""
        if self.closed:
            raise ConnectionClosed("connection closed by the broker")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no packet in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.closed = True
            return
        self._buf += chunk
        self._decode_buffered()

    def recv_packet(self, timeout_s: float = 5.0) -> Packet:
        """The next packet; TimeoutError if none comes, ConnectionClosed if the broker closed."""
        deadline = time.monotonic() + timeout_s
        while not self.pending:
            try:
                self._read_more(deadline)
            except TimeoutError:
                raise TimeoutError(f"no packet within {timeout_s}s") from None
        return self.pending.popleft()

    def take(self, match: Callable[[Packet], bool], timeout_s: float = 5.0) -> Packet:
        """The first packet (queued or still to come) that `match`es; others stay queued."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            for i in range(seen, len(self.pending)):
                if match(self.pending[i]):
                    p = self.pending[i]
                    del self.pending[i]
                    return p
            seen = len(self.pending)
            try:
                self._read_more(deadline)
            except TimeoutError:
                raise TimeoutError(f"no matching packet within {timeout_s}s; "
                                   f"queued {show(list(self.pending))}") from None

    def _ack(self, cls: type[P], packet_id: int, timeout_s: float) -> P:
        p = self.take(lambda q: isinstance(q, cls) and q.packet_id == packet_id  # type: ignore[attr-defined]
                      or isinstance(q, Disconnect), timeout_s)
        assert isinstance(p, cls), f"expected {cls.__name__} for id {packet_id}, got {show(p)}"
        return p

    def expect(self, cls: type[P], timeout_s: float = 5.0, skip: tuple[type, ...] = ()) -> P:
        """The next packet, which must be a `cls` (packets of the `skip` types are dropped)."""
        while True:
            p = self.recv_packet(timeout_s)
            if skip and isinstance(p, skip):
                continue
            assert isinstance(p, cls), f"expected {cls.__name__}, got {show(p)}"
            return p

    def expect_none(self, within_s: float = 0.5) -> None:
        """Assert that no packet arrives within `within_s` (silence is the assertion)."""
        try:
            p = self.recv_packet(within_s)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected packet {show(p)}")

    def drain(self, within_s: float, accept: Callable[[Packet], bool] = lambda p: True) -> list[Packet]:
        """Every packet that arrives within `within_s` or before the broker closes (check
        `closed`); all of them must pass `accept`."""
        got: list[Packet] = []
        deadline = time.monotonic() + within_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                p = self.recv_packet(left)
            except (TimeoutError, ConnectionClosed):
                break
            assert accept(p), f"unexpected packet {show(p)}"
            got.append(p)
        return got

    def wait_closed(self, timeout_s: float = 5.0) -> list[Packet]:
        """Read until the broker closes; return what came before. Fails if it stays open."""
        got: list[Packet] = []
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                got.append(self.recv_packet(max(0.001, deadline - time.monotonic())))
            except ConnectionClosed:
                return got
            except TimeoutError:
                raise AssertionError(f"connection still open after {timeout_s}s; got {show(got)}") from None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # conversations

    def connect(self, client_id: str = "", clean_start: bool = True, keepalive_s: int = 60,
                properties: Properties = NO_PROPERTIES, timeout_s: float = 5.0, **kw: Any) -> Connack:
        """CONNECT and wait for the CONNACK (returned whatever its code)."""
        self.send(Connect(client_id, self.version, clean_start, keepalive_s, properties=properties, **kw))
        return self.expect(Connack, timeout_s)

    def subscribe(self, *subs: Subscription | str, properties: Properties = NO_PROPERTIES,
                  timeout_s: float = 5.0) -> Suback:
        items = tuple(Subscription(s) if isinstance(s, str) else s for s in subs)
        pid = self.packet_id()
        self.send(Subscribe(pid, items, properties))
        return self._ack(Suback, pid, timeout_s)

    def unsubscribe(self, *topic_filters: str, timeout_s: float = 5.0) -> Unsuback:
        pid = self.packet_id()
        self.send(Unsubscribe(pid, topic_filters))
        return self._ack(Unsuback, pid, timeout_s)

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                properties: Properties = NO_PROPERTIES, timeout_s: float = 5.0) -> Packet | None:
        """PUBLISH; for QoS 1 return the PUBACK, for QoS 2 complete the flow and return PUBCOMP."""
        pid = self.packet_id() if qos else 0
        self.send(Publish(topic, payload, qos, retain, False, pid, properties))
        if qos == 1:
            return self._ack(Puback, pid, timeout_s)
        if qos == 2:
            rec = self._ack(Pubrec, pid, timeout_s)
            if rec.reason_code >= 0x80:
                return rec
            self.send(Pubrel(pid))
            return self._ack(Pubcomp, pid, timeout_s)
        return None

    def ack(self, p: Publish) -> None:
        """PUBACK (QoS 1) or PUBREC (QoS 2; the PUBREL is answered by `complete`)."""
        self.send(Puback(p.packet_id) if p.qos == 1 else Pubrec(p.packet_id))

    def disconnect(self, reason_code: int = 0) -> None:
        try:
            self.send(Disconnect(reason_code))
        except OSError:
            pass
        self.close()


def connected(broker: BrokerAddress, client_id: str = "", version: int = 5,
              properties: Properties = NO_PROPERTIES, **kw: Any) -> RawClient:
    """A RawClient that has sent CONNECT and got a successful CONNACK."""
    c = RawClient(broker, version)
    ack = c.connect(client_id, properties=properties, **kw)
    assert ack.reason_code == 0, f"CONNACK {ack.reason_code:#x}"
    return c


def expect_disconnect(c: RawClient, reasons: set[int], timeout_s: float = 5.0,
                      require_packet: bool = True) -> int | None:
    """Read until the broker closes; assert the v5 DISCONNECT (if any) has one of `reasons`.

    `require_packet` demands a DISCONNECT before the close (a SHOULD in [MQTT-4.13.1]); the
    reason code sent, or None when the broker just closed.
    """
    got = c.wait_closed(timeout_s)
    disconnects = [p for p in got if isinstance(p, Disconnect)]
    if not disconnects:
        assert not require_packet, f"closed without DISCONNECT; got {show(got)}"
        return None
    code = disconnects[-1].reason_code
    assert code in reasons, f"DISCONNECT {code:#x}, expected one of {sorted(hex(r) for r in reasons)}"
    return code


def with_props(p: Publish, **changes: Any) -> Publish:
    """A copy of a PUBLISH with some `Properties` fields changed."""
    return replace(p, properties=replace(p.properties, **changes))
