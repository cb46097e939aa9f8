"""A raw-socket MQTT client that speaks in `broker.protocol.packets` values, for protocol tests.

Why: tests of MQTT 5 properties, topic aliases, receive maximum and bad input must see every
packet exactly as the broker sent it (paho hides aliases, acks on its own and reassembles
topics) and must be able to send what a polite client never would. `RawClient` sends packet
values or raw bytes and reads packet values back, one at a time, each wait bounded.

Packets are encoded and decoded with the project's codec (`broker.protocol.codec`), so running
the e2e suite against mosquitto also checks the codec against a real broker. Bytes that no codec
would produce (bad input) are built with the few helpers below (`fixed_header`, `mqtt_str`).

Must not: sleep-and-hope (every wait is a socket timeout with a deadline), ack anything on its
own, reconnect, or talk to anything but the broker under test on loopback.

Invariants: one socket per `RawClient`; packets are returned in wire order; a packet decoded
but not yet asked for stays queued in `pending`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Protocol, TypeVar

from broker.protocol.codec import Decoder, encode
from broker.protocol.packets import (
    NO_PROPERTIES,
    Connack,
    Connect,
    Disconnect,
    Packet,
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


# -- the client ----------------------------------------------------------------------------


class RawClient:
    """One TCP connection; send packet values or bytes, read packet values with timeouts."""

    def __init__(self, broker: BrokerAddress, version: int = 5, timeout_s: float = 5.0) -> None:
        self.version = ProtocolVersion(version)
        self.sock = socket.create_connection((broker.host, broker.port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending: deque[Packet] = deque()
        self.closed = False
        self._decoder = Decoder(version=self.version)
        self._next_id = 0

    # sending

    def encode(self, p: Packet) -> bytes:
        return encode(p, self.version)

    def send(self, p: Packet) -> None:
        self.send_bytes(self.encode(p))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    # receiving

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
        except TimeoutError:
            return
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.closed = True
            return
        self.pending.extend(self._decoder.feed(chunk))

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
                raise TimeoutError(
                    f"no matching packet within {timeout_s}s; queued {show(list(self.pending))}"
                ) from None

    def _ack(self, cls: type[P], packet_id: int, timeout_s: float) -> P:
        def match(q: Packet) -> bool:
            return (isinstance(q, cls) and getattr(q, "packet_id", None) == packet_id) or isinstance(
                q, Disconnect
            )

        p = self.take(match, timeout_s)
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
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # conversations

    def connect(
        self,
        client_id: str = "",
        clean_start: bool = True,
        keepalive_s: int = 60,
        properties: Properties = NO_PROPERTIES,
        timeout_s: float = 5.0,
        **kw: Any,
    ) -> Connack:
        """CONNECT and wait for the CONNACK (returned whatever its code)."""
        self.send(Connect(client_id, self.version, clean_start, keepalive_s, properties=properties, **kw))
        return self.expect(Connack, timeout_s)

    def subscribe(
        self, *subs: Subscription | str, properties: Properties = NO_PROPERTIES, timeout_s: float = 5.0
    ) -> Suback:
        items = tuple(Subscription(s) if isinstance(s, str) else s for s in subs)
        pid = self.packet_id()
        self.send(Subscribe(pid, items, properties))
        return self._ack(Suback, pid, timeout_s)

    def unsubscribe(self, *topic_filters: str, timeout_s: float = 5.0) -> Unsuback:
        pid = self.packet_id()
        self.send(Unsubscribe(pid, topic_filters))
        return self._ack(Unsuback, pid, timeout_s)

    def publish(
        self,
        topic: str,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        properties: Properties = NO_PROPERTIES,
        timeout_s: float = 5.0,
    ) -> Packet | None:
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
        with contextlib.suppress(OSError):
            self.send(Disconnect(reason_code))
        self.close()


def connected(
    broker: BrokerAddress,
    client_id: str = "",
    version: int = 5,
    properties: Properties = NO_PROPERTIES,
    **kw: Any,
) -> RawClient:
    """A RawClient that has sent CONNECT and got a successful CONNACK."""
    c = RawClient(broker, version)
    ack = c.connect(client_id, properties=properties, **kw)
    assert ack.reason_code == 0, f"CONNACK {ack.reason_code:#x}"
    return c


def expect_disconnect(
    c: RawClient, reasons: set[int], timeout_s: float = 5.0, require_packet: bool = True
) -> int | None:
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
