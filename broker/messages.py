"""The application message as it travels through the broker.

Why: a PUBLISH packet is what one client sent; a `Message` is what the broker routes, retains and
queues: the topic (alias already resolved), payload, QoS, retain flag, MQTT 5 properties, who
sent it (for No Local) and when it expires. It also caches its own wire encodings, so that
delivering one message to fifty subscribers encodes it once per distinct shape, not fifty times.

Must not: know sessions or connections; read the clock (expiry is an absolute time given by the
caller, in the caller's monotonic clock).

Invariants: a Message is never changed after it is built, except for its encoding cache. It is a
plain slotted class rather than a frozen dataclass for the same measured reason as `Publish`.
"""

from __future__ import annotations

from broker.protocol.packets import NO_PROPERTIES, Properties


class Message:
    __slots__ = (
        "encoded",
        "encoded_key",
        "encoded_parts",
        "expires_at",
        "msg_id",
        "origin",
        "payload",
        "properties",
        "qos",
        "retain",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties = NO_PROPERTIES,
        origin: str = "",
        expires_at: float | None = None,
        msg_id: int = 0,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties
        self.origin = origin
        self.expires_at = expires_at
        # 0, or the id under which the store keeps this message's queue rows (durable QoS 1/2)
        self.msg_id = msg_id
        # The encoded PUBLISH as (head, tail) by shape (see ServerConnection.publish_bytes): the
        # first shape in two slots, which is all a message delivered once or to alike clients
        # needs; further shapes in a dict made only when needed.
        self.encoded_key: object = None
        self.encoded_parts: tuple[bytes, bytes] = (b"", b"")
        self.encoded: dict[object, tuple[bytes, bytes]] | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def remaining_expiry_s(self, now: float) -> int | None:
        """Seconds left, rounded up, for the Message Expiry Interval sent on delivery [MQTT-3.3.2-6]."""
        if self.expires_at is None:
            return None
        left = self.expires_at - now
        whole = int(left)
        return max(whole + (1 if left > whole else 0), 0)

    def __repr__(self) -> str:
        return f"Message({self.topic!r}, {len(self.payload)}B, qos={self.qos}, retain={self.retain})"
