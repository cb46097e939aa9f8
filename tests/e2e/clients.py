"""Synchronous MQTT clients for end-to-end tests: a paho-mqtt wrapper and a raw-socket kit.

Why: e2e tests read best as straight-line conversations ("connect, subscribe, publish, expect
this message"). paho-mqtt is callback driven; `TestClient` turns its callbacks into
`threading.Event`s and a `queue.Queue` so that every wait has a timeout and fails with a clear
message. The raw kit (`raw_connect`, `read_packet`, the `*_packet` builders) exists for the few
tests that must put bytes on the wire that a well-behaved client never sends (a second CONNECT,
an unknown protocol level, a resent QoS 2 PUBLISH, a client that goes silent).

Must not: sleep-and-hope (the one deliberate wait is `expect_none`, where silence *is* the
assertion); reconnect on its own (auto-reconnect is off, a lost connection is an observable
event); leave a paho network thread running (use it as a context manager or call `close`);
send traffic anywhere but the broker under test on loopback.

Invariants: a `TestClient` owns exactly one paho client and one network thread; message
delivery order is preserved (one FIFO queue fed by the network thread).
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, Self, cast

import paho.mqtt.client as mqtt
from paho.mqtt.client import ConnectFlags, DisconnectFlags
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions


class BrokerAddress(Protocol):
    """What a client needs of a broker fixture (`tests.e2e.broker_proc.BrokerProcess`)."""

    host: str
    port: int


# paho converts 3.1.1 CONNACK return codes to MQTT 5 reason codes; tests want the wire value.
_V5_TO_V311_CONNACK = {0x00: 0, 0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}


@dataclass(frozen=True, slots=True)
class ConnectResult:
    """A CONNACK: `reason_code` is the wire value (3.1.1 return code or MQTT 5 reason code)."""

    reason_code: int
    session_present: bool
    properties: Properties


@dataclass(frozen=True, slots=True)
class Message:
    """An application message as delivered to a subscriber."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int
    properties: Properties | None


def make_properties(packet_type: int, values: dict[str, Any] | None) -> Properties | None:
    """Build paho Properties from {"MessageExpiryInterval": 5, "UserProperty": [("k", "v")]}."""
    if not values:
        return None
    props = Properties(packet_type)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


def _empty(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def prop(message_or_props: Message | ConnectResult | Properties | None, name: str) -> Any:
    """A property value by paho's name (e.g. "SubscriptionIdentifier"), or None if absent."""
    props = message_or_props
    if isinstance(props, (Message, ConnectResult)):
        props = props.properties
    if props is None:
        return None
    return getattr(props, name, None)


class TestClient:
    """One MQTT connection driven synchronously; see the module docstring."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        broker: BrokerAddress,
        client_id: str = "",
        version: int = 5,
        clean_start: bool = True,
        session_expiry_s: int | None = None,
        keepalive_s: int = 60,
        will: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
        username: str | None = None,
        password: str | None = None,
        manual_ack: bool = False,
    ) -> None:
        if version not in (4, 5):
            raise ValueError("version is 4 (MQTT 3.1.1) or 5")
        self.broker = broker
        self.version = version
        self.client_id = client_id
        self.clean_start = clean_start
        self.keepalive_s = keepalive_s
        self._connect_props = dict(properties or {})
        if session_expiry_s is not None:
            self._connect_props["SessionExpiryInterval"] = session_expiry_s
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_start if version == 4 else None,
            protocol=mqtt.MQTTv311 if version == 4 else mqtt.MQTTv5,
            reconnect_on_failure=False,
            manual_ack=manual_ack,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        if will is not None:
            will = dict(will)
            if isinstance(will.get("properties"), dict):
                will["properties"] = make_properties(PacketTypes.WILLMESSAGE, will["properties"])
            self._client.will_set(**will)
        self._lock = threading.Condition()
        self._connack: ConnectResult | None = None
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._server_disconnect_reason: int | None = None
        self._acks: dict[int, tuple[str, Any]] = {}
        self.messages: queue.Queue[Message] = queue.Queue()
        self._started = False
        c = self._client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe

    # -- paho callbacks (network thread) -------------------------------------------------

    def _on_connect(
        self, _c: mqtt.Client, _u: Any, flags: ConnectFlags, reason: ReasonCode, properties: Properties | None
    ) -> None:
        code = int(reason.value)
        if self.version == 4:
            code = _V5_TO_V311_CONNACK.get(code, code)
        self._connack = ConnectResult(
            code, bool(flags.session_present), properties or _empty(PacketTypes.CONNACK)
        )
        self._connected.set()

    def _on_disconnect(
        self,
        _c: mqtt.Client,
        _u: Any,
        flags: DisconnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if flags.is_disconnect_packet_from_server:
            self._server_disconnect_reason = int(reason.value)
        self._disconnected.set()
        self._connected.set()  # wake a connect() that waits for a CONNACK that will not come

    def _on_message(self, _c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
        self.messages.put(
            Message(
                topic=m.topic,
                payload=bytes(m.payload),
                qos=m.qos,
                retain=bool(m.retain),
                dup=bool(m.dup),
                mid=m.mid,
                properties=getattr(m, "properties", None),
            )
        )

    def _record(self, kind: str, mid: int, value: Any) -> None:
        with self._lock:
            self._acks[mid] = (kind, value)
            self._lock.notify_all()

    def _on_publish(
        self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Properties | None
    ) -> None:
        self._record("publish", mid, int(reason.value))

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Properties | None
    ) -> None:
        self._record("subscribe", mid, [int(r.value) for r in reasons])

    def _on_unsubscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Properties | None
    ) -> None:
        self._record("unsubscribe", mid, [int(r.value) for r in reasons])

    def _wait_ack(self, kind: str, mid: int, timeout_s: float) -> Any:
        with self._lock:
            ok = self._lock.wait_for(lambda: mid in self._acks or self._disconnected.is_set(), timeout_s)
            if mid in self._acks:
                got_kind, value = self._acks.pop(mid)
                assert got_kind == kind, f"ack for mid {mid} was {got_kind}, expected {kind}"
                return value
        if not ok:
            raise AssertionError(
                f"{self.client_id or 'client'}: no {kind} ack for mid {mid} within {timeout_s}s"
            )
        raise AssertionError(
            f"{self.client_id or 'client'}: disconnected while waiting for "
            f"{kind} ack (server reason {self._server_disconnect_reason})"
        )

    # -- connection ----------------------------------------------------------------------

    def connect(self, timeout_s: float = 5) -> ConnectResult:
        """Send CONNECT and wait for CONNACK; raises if the connection closes without one."""
        kwargs: dict[str, Any] = {}
        if self.version == 5:
            kwargs["clean_start"] = self.clean_start
            kwargs["properties"] = make_properties(PacketTypes.CONNECT, self._connect_props)
        self._client.connect(self.broker.host, self.broker.port, self.keepalive_s, **kwargs)
        self._client.loop_start()
        self._started = True
        if not self._connected.wait(timeout_s):
            raise AssertionError(f"{self.client_id or 'client'}: no CONNACK within {timeout_s}s")
        if self._connack is None:
            raise ConnectionError(
                f"{self.client_id or 'client'}: connection closed before "
                f"CONNACK (server reason {self._server_disconnect_reason})"
            )
        return self._connack

    @property
    def connack(self) -> ConnectResult:
        """The CONNACK of the last successful `connect()`."""
        assert self._connack is not None, "not connected"
        return self._connack

    def disconnect(
        self, reason_code: int = 0, properties: dict[str, Any] | None = None, timeout_s: float = 5
    ) -> None:
        """Send DISCONNECT (v5: with `reason_code`) and wait until the socket is closed."""
        rc = ReasonCode(PacketTypes.DISCONNECT, identifier=reason_code) if self.version == 5 else None
        self._client.disconnect(rc, make_properties(PacketTypes.DISCONNECT, properties))
        self._stop_thread(timeout_s)

    def close_abruptly(self, timeout_s: float = 5) -> None:
        """Close the TCP connection without DISCONNECT (as a crashed client would)."""
        self._shutdown_socket()  # paho's thread sees EOF and closes its side
        self._stop_thread(timeout_s)

    def _shutdown_socket(self) -> None:
        sock = cast(socket.socket | None, self._client.socket())
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed: nothing left to shut down
                sock.shutdown(socket.SHUT_RDWR)

    def wait_disconnected(self, timeout_s: float = 5) -> int | None:
        """Wait until the server closes the connection; its v5 DISCONNECT reason code or None."""
        if not self._disconnected.wait(timeout_s):
            raise AssertionError(f"{self.client_id or 'client'}: still connected after {timeout_s}s")
        return self._server_disconnect_reason

    @property
    def is_connected(self) -> bool:
        return self._client.is_connected() and not self._disconnected.is_set()

    def _stop_thread(self, timeout_s: float) -> None:
        if not self._started:
            return
        self._disconnected.wait(timeout_s)
        self._client._thread_terminate = True  # what loop_stop sets; join with a bound instead
        thread = self._client._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():  # e.g. unacked in-flight messages keep paho's loop alive
                self._shutdown_socket()
                thread.join(timeout_s)
        self._started = False

    def close(self) -> None:
        """Finalizer: DISCONNECT if still connected, then stop the network thread."""
        if not self._started:
            return
        if self.is_connected:
            try:
                self.disconnect(timeout_s=2)
                return
            except (AssertionError, OSError):  # best effort in teardown; fall back to a hard close
                pass
        self.close_abruptly(timeout_s=2)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operations ----------------------------------------------------------------------

    def subscribe(
        self,
        topic_filter: str | list[tuple[str, int]],
        qos: int = 0,
        options: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
        timeout_s: float = 5,
    ) -> list[int]:
        """SUBSCRIBE and return the SUBACK reason codes (granted QoS or >= 0x80).

        `options` (v5): {"no_local": bool, "retain_as_published": bool, "retain_handling": 0..2}.
        `properties` (v5): e.g. {"SubscriptionIdentifier": 7}.
        """
        props = make_properties(PacketTypes.SUBSCRIBE, properties)
        if isinstance(topic_filter, list):
            if self.version == 5:
                items: Any = [(t, SubscribeOptions(qos=q)) for t, q in topic_filter]
            else:
                items = topic_filter
            rc, mid = self._client.subscribe(items, properties=props)
        elif self.version == 5:
            o = options or {}
            so = SubscribeOptions(
                qos=qos,
                noLocal=o.get("no_local", False),
                retainAsPublished=o.get("retain_as_published", False),
                retainHandling=o.get("retain_handling", 0),
            )
            rc, mid = self._client.subscribe(topic_filter, options=so, properties=props)
        else:
            rc, mid = self._client.subscribe(topic_filter, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe not sent: {rc}"
        assert mid is not None
        codes: list[int] = self._wait_ack("subscribe", mid, timeout_s)
        return codes

    def unsubscribe(
        self, topic_filter: str | list[str], properties: dict[str, Any] | None = None, timeout_s: float = 5
    ) -> list[int]:
        """UNSUBSCRIBE and wait for UNSUBACK; its v5 reason codes (empty list for 3.1.1)."""
        rc, mid = self._client.unsubscribe(
            topic_filter, properties=make_properties(PacketTypes.UNSUBSCRIBE, properties)
        )
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"unsubscribe not sent: {rc}"
        assert mid is not None
        codes: list[int] = self._wait_ack("unsubscribe", mid, timeout_s)
        return codes

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
        timeout_s: float = 5,
    ) -> int:
        """PUBLISH; waits until written (QoS 0) or PUBACK / PUBCOMP (QoS 1 / 2).

        Returns the v5 PUBACK/PUBREC reason code (0 for QoS 0 and for 3.1.1). Note a v5 broker
        may answer 0x10 "no matching subscribers" where 0x00 would also be right.
        """
        info = self._client.publish(
            topic, payload, qos, retain, make_properties(PacketTypes.PUBLISH, properties)
        )
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish not sent: {info.rc}"
        code: int = self._wait_ack("publish", info.mid, timeout_s)
        return code

    def publish_many(
        self, topic: str, payloads: list[bytes], qos: int = 0, timeout_s: float = 5
    ) -> list[int]:
        """Send all PUBLISHes back to back (several in flight), then wait for every ack."""
        infos = [self._client.publish(topic, payload, qos) for payload in payloads]
        assert all(i.rc == mqtt.MQTT_ERR_SUCCESS for i in infos), "publish not sent"
        deadline = time.monotonic() + timeout_s
        return [self._wait_ack("publish", i.mid, max(0.0, deadline - time.monotonic())) for i in infos]

    def ack(self, message: Message) -> None:
        """With manual_ack=True: send the PUBACK / PUBCOMP for a received message."""
        self._client.ack(message.mid, message.qos)

    def expect(self, n: int = 1, timeout_s: float = 5) -> list[Message]:
        """Wait for exactly the next `n` messages (in delivery order)."""
        got: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < n:
            try:
                got.append(self.messages.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(
                    f"{self.client_id or 'client'}: expected {n} message(s) within {timeout_s}s, "
                    f"got {len(got)}: {[(m.topic, m.payload) for m in got]}"
                ) from None
        return got

    def expect_one(self, timeout_s: float = 5) -> Message:
        return self.expect(1, timeout_s)[0]

    def drain(self, quiet_s: float = 0.3) -> list[Message]:
        """Every message that arrives until `quiet_s` passes with nothing new."""
        got: list[Message] = []
        while True:
            try:
                got.append(self.messages.get(timeout=quiet_s))
            except queue.Empty:
                return got

    def expect_none(self, within_s: float = 0.5) -> None:
        """Assert that no message arrives within `within_s` (silence is the assertion)."""
        try:
            m = self.messages.get(timeout=within_s)
        except queue.Empty:
            return
        raise AssertionError(
            f"{self.client_id or 'client'}: unexpected message "
            f"{m.topic!r} {m.payload!r} qos={m.qos} retain={m.retain}"
        )


class ClientFactory:
    """Makes connected `TestClient`s for one test and closes them all at teardown.

    Use from a fixture: `with ClientFactory(broker) as make: yield make`, then
    `make("id", version=4)`; pass `connect=False` to call `connect()` yourself and `broker=` to
    talk to another broker.
    """

    def __init__(self, broker: BrokerAddress) -> None:
        self.broker = broker
        self.made: list[TestClient] = []

    def __call__(
        self, client_id: str = "", *, connect: bool = True, broker: BrokerAddress | None = None, **kwargs: Any
    ) -> TestClient:
        c = TestClient(broker or self.broker, client_id, **kwargs)
        self.made.append(c)
        if connect:
            result = c.connect()
            assert result.reason_code == 0, f"{client_id}: CONNACK {result.reason_code:#x}"
        return c

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for c in self.made:
            c.close()


# -- raw sockets ---------------------------------------------------------------------------

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14


@dataclass(frozen=True, slots=True)
class RawPacket:
    """A control packet as read off the wire: type (1..15), low-nibble flags, body bytes."""

    type: int
    flags: int
    body: bytes


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def packet(type_: int, flags: int, body: bytes) -> bytes:
    return bytes([(type_ << 4) | flags]) + varint(len(body)) + body


def connect_packet(
    client_id: str = "",
    version: int = 5,
    clean_start: bool = True,
    keepalive_s: int = 60,
    session_expiry_s: int | None = None,
    will: tuple[str, bytes, int, bool] | None = None,
    protocol_name: str = "MQTT",
    protocol_level: int | None = None,
) -> bytes:
    """CONNECT; `will` is (topic, payload, qos, retain); `protocol_level` overrides `version`."""
    flags = 0x02 if clean_start else 0
    if will is not None:
        flags |= 0x04 | (will[2] << 3) | (0x20 if will[3] else 0)
    body = mqtt_str(protocol_name) + bytes([protocol_level or version, flags])
    body += struct.pack("!H", keepalive_s)
    if version == 5:
        props = b"" if session_expiry_s is None else b"\x11" + struct.pack("!I", session_expiry_s)
        body += varint(len(props)) + props
    body += mqtt_str(client_id)
    if will is not None:
        if version == 5:
            body += b"\x00"  # no will properties
        body += mqtt_str(will[0]) + mqtt_str(will[1])
    return packet(CONNECT, 0, body)


def publish_packet(
    topic: str,
    payload: bytes,
    qos: int = 0,
    packet_id: int = 1,
    dup: bool = False,
    retain: bool = False,
    version: int = 5,
) -> bytes:
    flags = (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = mqtt_str(topic) + (struct.pack("!H", packet_id) if qos else b"")
    if version == 5:
        body += b"\x00"
    return packet(PUBLISH, flags, body + payload)


def ack_packet(type_: int, packet_id: int) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP with reason Success (valid in 3.1.1 and 5)."""
    return packet(type_, 0x02 if type_ == PUBREL else 0, struct.pack("!H", packet_id))


def subscribe_packet(topic_filter: str, qos: int = 0, packet_id: int = 1, version: int = 5) -> bytes:
    body = struct.pack("!H", packet_id) + (b"\x00" if version == 5 else b"")
    return packet(SUBSCRIBE, 0x02, body + mqtt_str(topic_filter) + bytes([qos]))


PINGREQ_PACKET = packet(PINGREQ, 0, b"")
DISCONNECT_PACKET = packet(DISCONNECT, 0, b"")


def raw_connect(broker: BrokerAddress, data: bytes = b"", timeout_s: float = 5) -> socket.socket:
    """Open a TCP connection to the broker and send `data` (e.g. a `connect_packet()`)."""
    sock = socket.create_connection((broker.host, broker.port), timeout=timeout_s)
    if data:
        sock.sendall(data)
    return sock


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed by the broker")
        buf += chunk
    return bytes(buf)


def read_packet(sock: socket.socket, timeout_s: float = 5) -> RawPacket:
    """Read one control packet; EOFError if the broker closed, TimeoutError if none came."""
    deadline = time.monotonic() + timeout_s
    try:
        first = _recv_exact(sock, 1, deadline)[0]
        length, shift = 0, 0
        while True:
            b = _recv_exact(sock, 1, deadline)[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        body = _recv_exact(sock, length, deadline)
    except TimeoutError:
        raise TimeoutError(f"no packet within {timeout_s}s") from None
    except ConnectionResetError:
        raise EOFError("connection reset by the broker") from None
    return RawPacket(first >> 4, first & 0x0F, body)


def read_until_closed(sock: socket.socket, timeout_s: float = 5) -> list[RawPacket]:
    """Read packets until the broker closes the connection; fail if it stays open."""
    got: list[RawPacket] = []
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got.append(read_packet(sock, max(0.001, deadline - time.monotonic())))
        except EOFError:
            return got
        except TimeoutError:
            raise AssertionError(
                f"connection still open after {timeout_s}s; got {[(p.type, p.body) for p in got]}"
            ) from None


def publish_fields(p: RawPacket, version: int = 5) -> tuple[str, int | None, bytes]:
    """(topic, packet id or None, payload) of a raw PUBLISH."""
    assert p.type == PUBLISH, f"not a PUBLISH: type {p.type}"
    n = struct.unpack("!H", p.body[:2])[0]
    topic = p.body[2 : 2 + n].decode()
    pos = 2 + n
    pid = None
    if (p.flags >> 1) & 0x03:
        pid = struct.unpack("!H", p.body[pos : pos + 2])[0]
        pos += 2
    if version == 5:
        plen, shift = 0, 0
        while True:
            b = p.body[pos]
            pos += 1
            plen |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        pos += plen
    return topic, pid, p.body[pos:]
