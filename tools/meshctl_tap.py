"""`meshctl tap`: a minimal MQTT 3.1.1 subscriber that hands each message to a callback.

Why: an operator wants to watch what flows through the cluster without installing an MQTT
client. Tools may use only the runtime dependencies, so this is a blocking socket client built on
the broker's own sans-IO codec (`broker.protocol.codec`): CONNECT (clean session, a random client
id), one SUBSCRIBE at QoS 2 (so each message shows the QoS it was published with, capped by the
broker's grant), then PUBLISH in, acknowledged as the protocol requires, until a message count or
a duration is reached or the caller interrupts (Ctrl-C).

Must not: publish, keep a session (clean session, so nothing is queued for the tap after it
leaves), or block past `timeout_s` while connecting and subscribing; print (the callback does).

Invariants: every failure is a `MeshctlError` naming the broker's address; the connection is
closed (after a DISCONNECT when it is still up) however `tap` ends, KeyboardInterrupt included.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from broker.protocol.codec import Decoder, encode
from broker.protocol.errors import MQTTError
from broker.protocol.packets import (
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
)
from broker.protocol.packets import ProtocolVersion as _V
from tools.meshctl_client import MeshctlError

__all__ = ["DEFAULT_MQTT_PORT", "TapMessage", "tap"]

DEFAULT_MQTT_PORT: Final = 1883
KEEPALIVE_S: Final = 60
_V311: Final = _V.V311
_MAX_PACKET_BYTES: Final = 64 * 1024 * 1024
_READ_BYTES: Final = 65536
_SUBSCRIBE_ID: Final = 1


@dataclass(frozen=True, slots=True)
class TapMessage:
    topic: str
    qos: int
    retain: bool
    payload: bytes


class _Link:
    """One socket and its decoder; packets come out in order, a closed socket is an error."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock = sock
        self.where = where
        self.decoder = Decoder(_MAX_PACKET_BYTES, version=_V311)
        self.pending: list[Packet] = []
        self.last_sent_s = time.monotonic()

    def send(self, packet: Packet) -> None:
        try:
            self.sock.sendall(encode(packet, _V311))
        except OSError as e:
            raise MeshctlError(f"lost the connection to the broker: {e.strerror or e}", self.where) from None
        self.last_sent_s = time.monotonic()

    def next(self, wait_s: float) -> Packet | None:
        """The next packet, or None if none came within `wait_s`."""
        if self.pending:
            return self.pending.pop(0)
        self.sock.settimeout(max(wait_s, 0.001))
        try:
            data = self.sock.recv(_READ_BYTES)
        except TimeoutError:
            return None
        except OSError as e:
            raise MeshctlError(f"lost the connection to the broker: {e.strerror or e}", self.where) from None
        if not data:
            raise MeshctlError("the broker closed the connection", self.where)
        try:
            self.pending.extend(self.decoder.feed(data))
        except MQTTError as e:
            raise MeshctlError(f"bad MQTT from the broker: {e}", self.where) from None
        return self.pending.pop(0) if self.pending else None

    def expect(self, kind: type[Connack] | type[Suback], timeout_s: float) -> Packet:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            packet = self.next(left)
            if isinstance(packet, kind):
                return packet
        raise MeshctlError(f"no {kind.__name__.upper()} within {timeout_s:g} s", self.where)


def tap(
    host: str,
    port: int,
    topic_filter: str,
    on_message: Callable[[TapMessage], None],
    *,
    timeout_s: float,
    count: int | None = None,
    seconds: float | None = None,
    username: str | None = None,
    password: str | None = None,
) -> int:
    """Subscribe to `topic_filter` on the broker at host:port and call `on_message` for each
    message until `count` messages or `seconds` have passed (neither: until interrupted);
    the number of messages seen. `username`/`password`: for a node with Auth.Enabled."""
    where = f"mqtt://{f'[{host}]' if ':' in host else host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        raise MeshctlError("connection refused: is the node's MQTT port right (--mqtt)?", where) from None
    except TimeoutError:
        raise MeshctlError(f"no answer within {timeout_s:g} s", where) from None
    except OSError as e:
        raise MeshctlError(f"cannot reach the broker: {e.strerror or e}", where) from None
    link = _Link(sock, where)
    connected = False
    try:
        link.send(
            Connect(
                f"meshctl-tap-{secrets.token_hex(4)}",
                _V311,
                True,
                KEEPALIVE_S,
                username=username,
                password=None if password is None else password.encode(),
            )
        )
        connack = link.expect(Connack, timeout_s)
        assert isinstance(connack, Connack)
        if connack.reason_code != 0:
            raise MeshctlError(
                f"the broker refused the connection (CONNACK code {connack.reason_code})", where
            )
        connected = True
        link.send(Subscribe(_SUBSCRIBE_ID, (Subscription(topic_filter, qos=2),)))
        suback = link.expect(Suback, timeout_s)
        assert isinstance(suback, Suback)
        if not suback.reason_codes or suback.reason_codes[0] >= 0x80:
            raise MeshctlError(f"the broker refused the subscription to {topic_filter!r}", where)
        return _receive(link, on_message, count, seconds)
    finally:
        if connected:
            with contextlib.suppress(MeshctlError):
                link.send(Disconnect())
        sock.close()


def _receive(
    link: _Link, on_message: Callable[[TapMessage], None], count: int | None, seconds: float | None
) -> int:
    seen = 0
    deadline = None if seconds is None else time.monotonic() + seconds
    ping_every_s = KEEPALIVE_S / 2
    while count is None or seen < count:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        if now - link.last_sent_s >= ping_every_s:
            link.send(Pingreq())
        wait_s = ping_every_s - (now - link.last_sent_s)
        if deadline is not None:
            wait_s = min(wait_s, deadline - now)
        packet = link.next(wait_s)
        if isinstance(packet, Publish):
            # Acknowledge first: a slow terminal must not hold the broker's inflight window.
            if packet.qos == 1:
                link.send(Puback(packet.packet_id))
            elif packet.qos == 2:
                link.send(Pubrec(packet.packet_id))
            on_message(TapMessage(packet.topic, packet.qos, packet.retain, packet.payload))
            seen += 1
        elif isinstance(packet, Pubrel):
            link.send(Pubcomp(packet.packet_id))
    return seen
