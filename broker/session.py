"""The state of one MQTT session, connected or not.

Why: MQTT separates the session (subscriptions, QoS 1/2 messages in flight and queued, QoS 2
packet ids received but not yet released) from the network connection that happens to carry it
[MQTT-4.1]. A session outlives its connection when its expiry interval says so, and a new
connection with the same client id resumes it.

Must not: do IO, read the clock, route messages or encode packets. The broker core drives a
session; the session keeps its bookkeeping straight (packet ids, FIFO order, limits).

Invariants:
- `inflight` holds at most one entry per packet id, in send order (dict order), and an id in
  `inflight` is never handed out again until it is released [MQTT-2.2.1-3].
- `queue` is FIFO; it never holds more than the configured maximum (extra messages are dropped
  and counted by the caller).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from broker.messages import Message
from broker.protocol.packets import Will

if TYPE_CHECKING:
    from broker.acl import Access
    from broker.protocol.connection import ServerConnection

NEVER_EXPIRES_S = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SubEntry:
    """One subscription of one session, as stored in the topic tree."""

    client_id: str
    topic_filter: str  # the filter as matched (without the $share/group/ prefix)
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_id: int | None = None
    share_group: str | None = None
    worker: int = 0  # the worker process holding the session (shared members of the whole node)

    @property
    def subscription_ids(self) -> tuple[int, ...]:
        return () if self.subscription_id is None else (self.subscription_id,)


class OutState(Enum):
    AWAITING_PUBACK = 1  # QoS 1 sent
    AWAITING_PUBREC = 2  # QoS 2 sent
    AWAITING_PUBCOMP = 3  # QoS 2, PUBREL sent


class Outgoing:
    """A QoS 1/2 delivery in flight to the client, or waiting in the queue for a packet id."""

    __slots__ = ("message", "qos", "retain", "state", "subscription_ids")

    def __init__(self, message: Message, qos: int, retain: bool, subscription_ids: tuple[int, ...]) -> None:
        self.message = message
        self.qos = qos
        self.retain = retain
        self.subscription_ids = subscription_ids
        self.state = OutState.AWAITING_PUBACK if qos == 1 else OutState.AWAITING_PUBREC


class Session:
    __slots__ = (
        "access",
        "client_id",
        "connection",
        "dropped_messages",
        "epoch",
        "expires_at",
        "expiry_interval_s",
        "inbound_qos2",
        "inflight",
        "next_packet_id",
        "qos2_persisting",
        "queue",
        "stored",
        "subscriptions",
        "will",
        "will_at",
    )

    def __init__(self, client_id: str, expiry_interval_s: int) -> None:
        self.client_id = client_id
        self.expiry_interval_s = expiry_interval_s
        self.connection: ServerConnection | None = None
        self.subscriptions: dict[str, SubEntry] = {}  # keyed by the filter as the client wrote it
        self.inflight: dict[int, Outgoing] = {}
        self.queue: deque[Outgoing] = deque()
        self.inbound_qos2: set[int] = set()
        # QoS 2 packet ids received whose message the store has not confirmed yet, with the
        # acknowledgements of resends that wait for that answer
        self.qos2_persisting: dict[int, list[Callable[[int, float], None]]] = {}
        self.next_packet_id = 1
        self.will: Will | None = None
        self.will_at: float | None = None  # a delayed will is due at this time
        self.expires_at: float | None = None  # set while disconnected, if it expires
        self.dropped_messages = 0
        self.epoch = 0  # from the node's client registry; a stale epoch loses every race
        self.stored = False  # the store holds a row for it (it was persistent when last saved)
        # What its client may publish and read (Auth.Enabled), set at each CONNECT and when the
        # rules change; None: everything (no authorisation).
        self.access: Access | None = None

    @property
    def persistent(self) -> bool:
        return self.expiry_interval_s > 0

    def allocate_packet_id(self) -> int:
        """The next free packet id, 1..65535 [MQTT-2.2.1-3]; the caller checks there is room."""
        pid = self.next_packet_id
        inflight = self.inflight
        while pid in inflight:
            pid = pid + 1 if pid < 0xFFFF else 1
        self.next_packet_id = pid + 1 if pid < 0xFFFF else 1
        return pid

    def __repr__(self) -> str:
        state = "online" if self.connection is not None else "offline"
        return f"Session({self.client_id!r}, {state}, subs={len(self.subscriptions)})"
