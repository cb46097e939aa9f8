"""One client connection's protocol state, without IO.

Why: what a connection must remember to speak MQTT correctly — the decoder and its version, the
client's limits from CONNECT (receive maximum, maximum packet size, topic alias maximum, whether
it wants problem information), topic aliases in both directions — lives here, so the whole
exchange can be tested with bytes in and bytes out, no event loop (the h11 pattern).

Must not: do IO or read the clock; route messages; know other connections. Output is appended to
`out` (a list of bytes) and the IO layer writes it in one go, so that a burst of deliveries costs
one write, not one per packet.

Invariants:
- Nothing is sent before CONNACK [MQTT-3.2.0-1], and once `closing` is set nothing more is sent.
- An outgoing packet never exceeds the client's Maximum Packet Size: a PUBLISH that would is
  dropped for this client [MQTT-3.1.2-25]; on other packets the reason string and user
  properties are left out to fit [MQTT-3.1.2-26/-27].
- Without Request Problem Information, no reason string or user property goes out on packets
  other than PUBLISH, CONNACK and DISCONNECT [MQTT-3.1.2-29].
- Outbound topic aliases never exceed the client's Topic Alias Maximum [MQTT-3.3.2-10].
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from broker.protocol.codec import (
    MAX_PACKET_BYTES,
    Decoder,
    encode,
    encode_properties,
    encode_publish_split,
)
from broker.protocol.packets import (
    NO_PROPERTIES,
    Connack,
    Disconnect,
    Packet,
    Properties,
    ProtocolVersion,
)

if TYPE_CHECKING:
    from broker.messages import Message
    from broker.session import Session

V5 = ProtocolVersion.V5


class Link(Protocol):
    """The IO side of one connection, as the core sees it."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class ConnectionState(Enum):
    AWAITING_CONNECT = 1
    CONNECTED = 2
    CLOSED = 3


class ServerConnection:
    __slots__ = (
        "alias_in",
        "alias_out",
        "claim_epoch",
        "client_id",
        "client_max_packet_bytes",
        "client_receive_maximum",
        "client_topic_alias_maximum",
        "close_reason",
        "closing",
        "connected_at",
        "decoder",
        "dirty",
        "held",
        "keepalive_s",
        "last_rx",
        "limits",
        "link",
        "link_lost",
        "out",
        "out_dropped",
        "peer",
        "pipeline",
        "problem_information",
        "session",
        "state",
        "tls_identity",
        "username",
        "version",
        "will_cleared",
        "write_paused",
    )

    def __init__(
        self, peer: str, max_packet_bytes: int, now: float, link: Link, dirty: list[ServerConnection]
    ) -> None:
        self.peer = peer
        self.link = link
        self.link_lost = False  # the IO layer reported the socket gone while CONNECT was pending
        # The core's list of connections with output to write: joined on the first output, so
        # that one flush after a burst of work writes each connection once.
        self.dirty = dirty
        self.decoder = Decoder(max_packet_bytes)
        self.state = ConnectionState.AWAITING_CONNECT
        self.version: ProtocolVersion = ProtocolVersion.V311
        self.client_id = ""
        self.session: Session | None = None
        self.out: list[bytes] = []
        # Not None while the connection waits for the node (a session claim, a subscription
        # barrier): packets that arrive meanwhile are held here, in order, and handled after.
        self.held: list[Packet] | None = None
        self.claim_epoch = -1  # the epoch the mesh gave this connection's CONNECT, once answered
        # PUBLISHes of this client whose routing and acknowledgement wait behind one that waits
        # for the store, in arrival order [MQTT-4.6.0-2, -5] (see broker/handlers/publish.py).
        self.pipeline: deque[Any] | None = None
        self.closing = False
        self.close_reason: str | None = None
        self.write_paused = False
        self.connected_at = now
        self.last_rx = now
        self.keepalive_s = 0
        self.client_receive_maximum = 65535
        self.client_max_packet_bytes = MAX_PACKET_BYTES
        self.client_topic_alias_maximum = 0
        self.problem_information = True
        self.alias_in: dict[int, str] = {}
        self.alias_out: dict[str, int] = {}
        self.out_dropped = 0
        self.will_cleared = False
        # The verified client certificate's subject, when the listener uses it as the username
        # (set by the net layer right after open_connection; TLS.UseSubjectAsUsername).
        self.tls_identity: str | None = None
        self.username: str | None = None  # who the client authenticated as (None: anonymous)
        # broker.limits.ClientLimits when the Limits section needs per-connection state (Any:
        # protocol/ imports nothing of the broker at run time)
        self.limits: Any = None

    # -- input --------------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Packet]:
        """Decode what arrived; raises an MQTTError on the first bad packet."""
        return self.decoder.feed(data)

    # -- output -------------------------------------------------------------------------------

    def send(self, packet: Packet) -> None:
        """Encode a control packet (not a delivery) for this client, within its limits."""
        if self.closing:
            return
        version = self.version
        props = getattr(packet, "properties", NO_PROPERTIES)
        if version is V5 and props is not NO_PROPERTIES:
            if (
                not self.problem_information
                and not isinstance(packet, Connack | Disconnect)
                and (props.reason_string is not None or props.user_properties)
            ):
                packet = replace(packet, properties=replace(props, reason_string=None, user_properties=()))  # type: ignore[arg-type]
            data = encode(packet, version)
            if len(data) > self.client_max_packet_bytes:
                slim = replace(props, reason_string=None, user_properties=())
                data = encode(replace(packet, properties=slim), version)  # type: ignore[arg-type]
        else:
            data = encode(packet, version)
        self.push(data)

    def push(self, data: bytes) -> None:
        if not self.out:
            self.dirty.append(self)
        self.out.append(data)

    def close(
        self, reason: str, disconnect_reason_code: int | None = None, properties: Properties = NO_PROPERTIES
    ) -> None:
        """Ask the IO layer to close after flushing; in 5.0 send DISCONNECT first if a code is given.

        A DISCONNECT is only sent once CONNACK went out [MQTT-3.14.0-1 / 4.13.1].
        """
        if self.closing:
            return
        if (
            disconnect_reason_code is not None
            and self.version is V5
            and self.state is ConnectionState.CONNECTED
        ):
            self.send(Disconnect(disconnect_reason_code, properties))
        self.closing = True
        self.close_reason = reason
        self.dirty.append(self)

    def publish_bytes(
        self,
        message: Message,
        qos: int,
        retain: bool,
        subscription_ids: tuple[int, ...],
        packet_id: int,
        dup: bool,
        now: float,
    ) -> bytes | None:
        """The PUBLISH for one delivery, or None if it exceeds the client's maximum packet size.

        The encoding is cached on the message by its shape (version, QoS>0, retain, subscription
        ids, remaining expiry), so fan-out encodes once; the packet id is spliced in per client.
        """
        if self.version is not V5:
            # 3.1.1: no properties, no aliases; the shape is QoS, retain and dup.
            key: object = (qos, retain, dup)
            topic = message.topic
            alias = 0
        else:
            key, topic, alias = self._v5_shape(message, qos, retain, dup, subscription_ids, now)
        if message.encoded_key == key:
            parts = message.encoded_parts
        else:
            cache = message.encoded
            found = None if cache is None else cache.get(key)
            if found is None:
                parts = self._encode_publish(message, topic, alias, qos, retain, dup, subscription_ids, now)
                if message.encoded_key is None:
                    message.encoded_key = key
                    message.encoded_parts = parts
                else:
                    if cache is None:
                        cache = message.encoded = {}
                    cache[key] = parts
            else:
                parts = found
        head, tail = parts
        size = len(head) + len(tail) + (2 if qos else 0)
        if size > self.client_max_packet_bytes:
            if alias and topic:
                # the alias was never used on the wire; give it back
                del self.alias_out[topic]
            return None
        if qos:
            return head + packet_id.to_bytes(2, "big") + tail
        return head + tail

    def _v5_shape(
        self,
        message: Message,
        qos: int,
        retain: bool,
        dup: bool,
        subscription_ids: tuple[int, ...],
        now: float,
    ) -> tuple[object, str, int]:
        """The cache key of a 5.0 delivery, the topic to send and the outbound alias (0: none)."""
        alias = 0
        topic = message.topic
        if self.client_topic_alias_maximum:
            alias = self.alias_out.get(topic, 0)
            if alias:
                topic = ""  # the alias stands for the topic [MQTT-3.3.2-12]
            elif len(self.alias_out) < self.client_topic_alias_maximum:
                alias = len(self.alias_out) + 1
                self.alias_out[topic] = alias
        expiry = message.remaining_expiry_s(now) if message.expires_at is not None else None
        return ("v5", qos, retain, dup, subscription_ids, expiry, alias, topic), topic, alias

    def _encode_publish(
        self,
        message: Message,
        topic: str,
        alias: int,
        qos: int,
        retain: bool,
        dup: bool,
        subscription_ids: tuple[int, ...],
        now: float,
    ) -> tuple[bytes, bytes]:
        block: bytes | None = None
        if self.version is V5:
            props = message.properties
            expiry = message.remaining_expiry_s(now) if message.expires_at is not None else None
            if subscription_ids or props.subscription_identifiers or alias or expiry is not None:
                props = replace(
                    props,
                    subscription_identifiers=subscription_ids,
                    topic_alias=alias or None,
                    message_expiry_interval_s=expiry,
                )
            block = encode_properties(props)
        return encode_publish_split(topic, message.payload, qos, retain, dup, block)

    def __repr__(self) -> str:
        return f"ServerConnection({self.client_id!r} from {self.peer}, {self.state.name})"
