"""The sans-IO core against a fake `SessionStore` that is enabled and answers `persist` later.

What is pinned (the durability promise of DESIGN.md): a QoS 1/2 message that needs the store is
routed and acknowledged only once `persist` completes; acknowledgements keep PUBLISH order while
some wait and others do not [MQTT-4.6.0-2, -3]; a refusal gives a 5.0 publisher PUBACK / PUBREC
0x80, routes nothing and releases the QoS 2 packet id; the store's queue rows of a persistent
session are acknowledged (`ack(client_id, msg_id)`) when the delivery ends — PUBACK, PUBCOMP, a
refusing PUBREC — and when the message is dropped (expired, too large for the client).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from broker.config import MqttConfig
from broker.core import BrokerCore
from broker.mesh_codec import session_to_wire
from broker.messages import Message
from broker.protocol.packets import (
    Connack,
    Connect,
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
    Will,
)
from broker.protocol.reasons import Reason
from broker.session import Outgoing, Session
from store.records import QueuedRecord, SessionRecord
from store.wire import QueuedTuple
from tests.unit.core_harness import FakeClock, Harness, HarnessClient

pytestmark = pytest.mark.timeout(10)

V5 = ProtocolVersion.V5
V311 = ProtocolVersion.V311
LoadDone = Callable[[SessionRecord | None, list[QueuedRecord], bool, float], None]


@dataclass
class Persist:
    message: Message
    rows: list[QueuedTuple]
    retained: bool
    may_refuse: bool
    done: Callable[[bool, float], None]


class FakeStore:
    """Topics under `d/` have a persistent subscriber elsewhere (one queue row); `persist`
    completes when the test says; `session_saved` marks a session stored when it outlives its
    connection or has a will, as the real StoreLink does."""

    enabled = True

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.persists: list[Persist] = []
        self.acks: list[tuple[str, int]] = []
        self.saved: list[str] = []
        self.removed: list[str] = []
        self.online: list[tuple[str, bool]] = []
        self.retained: list[tuple[str, bytes | None]] = []
        self.loads: list[str] = []
        self.next_msg_id = 1000

    def session_saved(self, session: Session, done: Callable[[float], None] | None = None) -> None:
        self.saved.append(session.client_id)
        session.stored = session.expiry_interval_s > 0 or session.will is not None
        if done is not None:
            done(self.clock.now)  # the fake store holds it at once

    def session_removed(self, client_id: str) -> None:
        self.removed.append(client_id)

    def session_online(self, session: Session, online: bool) -> None:
        self.online.append((session.client_id, online))

    def retained_changed(self, topic: str, message: Message | None) -> None:
        self.retained.append((topic, None if message is None else message.payload))

    def durable_targets(self, message: Message) -> list[QueuedTuple]:
        if not message.topic.startswith("d/"):
            return []
        if not message.msg_id:
            self.next_msg_id += 1
            message.msg_id = self.next_msg_id
        return [
            (
                "elsewhere",
                message.msg_id,
                message.qos,
                False,
                (),
                message.topic,
                message.payload,
                None,
                message.origin,
                None,
                0,
            )
        ]

    def persist(
        self,
        message: Message,
        rows: list[QueuedTuple],
        retained: bool,
        may_refuse: bool,
        done: Callable[[bool, float], None],
    ) -> None:
        self.persists.append(Persist(message, rows, retained, may_refuse, done))

    def ack(self, client_id: str, msg_id: int) -> None:
        self.acks.append((client_id, msg_id))

    def load(self, client_id: str, done: LoadDone) -> None:
        self.loads.append(client_id)
        done(None, [], True, self.clock.now)

    def queued_to_outgoing(self, row: QueuedRecord, now: float) -> Outgoing:
        message = Message(row.topic, row.payload, row.qos, row.retain, origin=row.origin, msg_id=row.msg_id)
        return Outgoing(message, row.qos, row.retain, row.sub_ids)

    def flush(self) -> None:
        pass


def harness(**mqtt: object) -> tuple[Harness, FakeStore]:
    h = Harness(**mqtt)
    store = FakeStore(h.clock)
    h.core = BrokerCore(dataclasses.replace(MqttConfig(), **mqtt), store=store)  # type: ignore[arg-type]
    return h, store


def complete(h: Harness, store: FakeStore, index: int, ok: bool = True) -> None:
    store.persists[index].done(ok, h.clock.now)
    h.core.flush()


def subscribe(c: HarnessClient, *subs: Subscription, pid: int = 1) -> None:
    c.send(Subscribe(pid, subs))
    got = c.received()
    assert isinstance(got[0], Suback), got
    c._pending = got[1:]


def acks(packets: list[Packet]) -> list[tuple[str, int, bool]]:
    """(kind, packet id, success) of acknowledgements; 0x10 No matching subscribers is a success."""
    return [(type(p).__name__, p.packet_id, p.reason_code < 0x80) for p in packets]  # type: ignore[union-attr]


def payloads(packets: list[Packet]) -> list[bytes]:
    return [p.payload for p in packets if isinstance(p, Publish)]


def persistent(c: HarnessClient, client_id: str, expiry_s: int = 100, **kwargs: object) -> None:
    props = Properties(session_expiry_interval_s=expiry_s, **kwargs)  # type: ignore[arg-type]
    ack = c.connect(client_id, clean_start=False, properties=props)
    assert isinstance(ack, Connack) and ack.reason_code == 0


# -- ordering and the moment of routing -------------------------------------------------------------


def test_pubacks_keep_publish_order_when_a_durable_message_waits() -> None:
    """[MQTT-4.6.0-2] PUBACKs in the order of the PUBLISHes, although only some wait for the store."""
    h, store = harness()
    pub = h.client()
    pub.connect("pub")
    pub.send(
        Publish("d/1", b"a", qos=1, packet_id=1),
        Publish("n/1", b"b", qos=1, packet_id=2),
        Publish("d/2", b"c", qos=1, packet_id=3),
        Publish("n/2", b"d", qos=1, packet_id=4),
    )
    assert pub.received() == []
    assert [p.message.payload for p in store.persists] == [b"a", b"c"]
    complete(h, store, 1)  # the later one first: still behind packet 1
    assert pub.received() == []
    complete(h, store, 0)
    assert [(type(p).__name__, p.packet_id) for p in pub.received()] == [  # type: ignore[union-attr]
        ("Puback", 1),
        ("Puback", 2),
        ("Puback", 3),
        ("Puback", 4),
    ]
    pub.send(Publish("n/3", b"e", qos=1, packet_id=5))  # nothing waits: at once
    assert [p.packet_id for p in pub.received()] == [5]  # type: ignore[union-attr]


def test_pubrecs_keep_publish_order_too() -> None:
    """[MQTT-4.6.0-3] PUBRECs in the order of the QoS 2 PUBLISHes, mixed with PUBACKs."""
    h, store = harness()
    pub = h.client()
    pub.connect("pub")
    pub.send(
        Publish("n/1", b"a", qos=2, packet_id=1),
        Publish("d/1", b"b", qos=2, packet_id=2),
        Publish("n/2", b"c", qos=2, packet_id=3),
        Publish("n/3", b"d", qos=1, packet_id=4),
    )
    assert [(type(p).__name__, p.packet_id) for p in pub.received()] == [("Pubrec", 1)]  # type: ignore[union-attr]
    complete(h, store, 0)
    assert [(type(p).__name__, p.packet_id) for p in pub.received()] == [  # type: ignore[union-attr]
        ("Pubrec", 2),
        ("Pubrec", 3),
        ("Puback", 4),
    ]


def test_a_durable_message_is_routed_only_after_persist_completes() -> None:
    h, store = harness()
    sub, pub = h.client(), h.client()
    sub.connect("sub")
    subscribe(sub, Subscription("#", 1))
    pub.connect("pub")
    pub.send(Publish("d/1", b"durable", qos=1, packet_id=1))
    assert sub.received() == []
    (p,) = store.persists
    assert p.message.payload == b"durable" and len(p.rows) == 1 and not p.retained and p.may_refuse
    pub.send(Publish("n/1", b"plain", qos=1, packet_id=2))  # needs nothing, but waits its turn
    assert sub.received() == []
    complete(h, store, 0)
    assert payloads(sub.received()) == [b"durable", b"plain"]  # the client's order [MQTT-4.6.0-5]
    assert pub.received() == [Puback(1), Puback(2)]


def test_what_needs_no_store_does_not_wait() -> None:
    h, store = harness()
    sub, pub = h.client(), h.client()
    sub.connect("sub")
    subscribe(sub, Subscription("#", 1))
    pub.connect("pub")
    pub.send(Publish("d/qos0", b"0"), Publish("n/x", b"1", qos=1, packet_id=1))
    assert payloads(sub.received()) == [b"0", b"1"]
    assert pub.received() == [Puback(1)]
    assert store.persists == []


def test_a_retained_qos1_message_waits_and_is_retained_only_after_persist() -> None:
    h, store = harness()
    pub = h.client()
    pub.connect("pub")
    pub.send(Publish("n/r", b"kept", qos=1, retain=True, packet_id=1))  # no rows, but retained
    (p,) = store.persists
    assert p.retained and p.rows == []
    late = h.client()
    late.connect("late")
    subscribe(late, Subscription("n/r", 1))
    assert late.received() == []  # not retained yet
    complete(h, store, 0)
    assert pub.received() == [Puback(1)]
    assert payloads(late.received()) == [b"kept"]  # routed to the subscription made meanwhile
    another = h.client()
    another.connect("another")
    subscribe(another, Subscription("n/r", 1))
    assert payloads(another.received()) == [b"kept"]
    assert store.retained == []  # made durable by persist, not by the fire-and-forget path


def test_a_retained_qos0_message_is_persisted_without_waiting() -> None:
    h, store = harness()
    pub = h.client()
    pub.connect("pub")
    pub.send(Publish("n/r", b"kept", retain=True))
    assert store.persists == []
    assert store.retained == [("n/r", b"kept")]


def test_same_topic_same_qos_messages_reach_a_subscriber_in_publish_order() -> None:
    """[MQTT-4.6.0-5] for the same topic and QoS, PUBLISH to subscribers in the order received."""
    h, store = harness()
    sub, pub = h.client(), h.client()
    sub.connect("sub")
    subscribe(sub, Subscription("n/t", 1))
    pub.connect("pub")
    pub.send(Publish("n/t", b"first", qos=1, retain=True, packet_id=1))
    pub.send(Publish("n/t", b"second", qos=1, packet_id=2))
    for index in range(len(store.persists)):
        complete(h, store, index)
    assert payloads(sub.received()) == [b"first", b"second"]


# -- refusal ----------------------------------------------------------------------------------------


def test_refusal_gives_a_v5_publisher_puback_0x80_and_routes_nothing() -> None:
    h, store = harness()
    sub, pub = h.client(), h.client()
    sub.connect("sub")
    subscribe(sub, Subscription("#", 1))
    pub.connect("pub")
    pub.send(Publish("d/1", b"x", qos=1, retain=True, packet_id=1), Publish("n/1", b"y", qos=1, packet_id=2))
    assert store.persists[0].may_refuse
    complete(h, store, 0, ok=False)
    assert pub.received() == [Puback(1, Reason.UNSPECIFIED_ERROR), Puback(2)]
    assert payloads(sub.received()) == [b"y"]
    late = h.client()
    late.connect("late")
    subscribe(late, Subscription("d/1", 1))
    assert late.received() == []  # not retained either


def test_refusal_of_qos2_gives_pubrec_0x80_and_releases_the_packet_id() -> None:
    h, store = harness()
    pub = h.client()
    pub.connect("pub")
    pub.send(Publish("d/1", b"x", qos=2, packet_id=7))
    assert 7 in h.core.sessions["pub"].qos2_persisting  # a resend meanwhile is not persisted twice
    complete(h, store, 0, ok=False)
    assert pub.received() == [Pubrec(7, Reason.UNSPECIFIED_ERROR)]
    assert 7 not in h.core.sessions["pub"].inbound_qos2
    pub.send(Pubrel(7))  # nothing is held under that id any more
    assert pub.received() == [Pubcomp(7, Reason.PACKET_IDENTIFIER_NOT_FOUND)]
    pub.send(Publish("d/1", b"x", qos=2, packet_id=7))  # the publisher tries again: a new message
    assert len(store.persists) == 2
    complete(h, store, 1)
    assert acks(pub.received()) == [("Pubrec", 7, True)]


def test_a_v311_publisher_is_never_refused() -> None:
    """3.1.1 has no negative PUBACK: its publishes wait for the store instead."""
    h, store = harness()
    pub = h.client(V311)
    pub.connect("pub")
    pub.send(Publish("d/1", b"x", qos=1, packet_id=1))
    assert not store.persists[0].may_refuse


def test_a_qos2_resend_while_persist_waits_is_not_persisted_twice() -> None:
    h, store = harness()
    pub = h.client()
    pub.connect("pub")
    pub.send(Publish("d/1", b"x", qos=2, packet_id=3))
    pub.send(Publish("d/1", b"x", qos=2, packet_id=3, dup=True))
    assert len(store.persists) == 1
    assert pub.received() == []  # the resend's PUBREC waits behind the first
    complete(h, store, 0)
    assert acks(pub.received()) == [("Pubrec", 3, True), ("Pubrec", 3, True)]


def test_a_resend_after_reconnect_is_not_acknowledged_before_the_store_says_durable() -> None:
    h, _store = harness()
    pub = h.client()
    persistent(pub, "pub")
    pub.send(Publish("d/1", b"x", qos=2, packet_id=7))
    pub.lose()
    again = h.client()
    persistent(again, "pub")
    again.send(Publish("d/1", b"x", qos=2, packet_id=7, dup=True))  # [MQTT-4.4.0-1] resend on reconnect
    assert ("Pubrec", 7, True) not in acks(again.received())


def test_a_message_queued_for_a_persistent_session_is_not_no_matching_subscribers() -> None:
    """0x10 says the server knows of no subscriber; the store's rows are subscribers."""
    h, store = harness()
    pub = h.client()
    pub.connect("pub")
    pub.send(Publish("d/1", b"x", qos=1, packet_id=1))
    assert len(store.persists[0].rows) == 1  # a persistent session elsewhere (offline, or on a node)
    complete(h, store, 0)
    assert pub.received() == [Puback(1, Reason.SUCCESS)]


def test_a_will_to_a_durable_topic_is_persisted_first_and_never_refused() -> None:
    h, store = harness()
    watcher, c = h.client(), h.client()
    watcher.connect("watcher")
    subscribe(watcher, Subscription("d/#", 1))
    c.connect("c", will=Will("d/will", b"bye", qos=1))
    c.lose()
    assert watcher.received() == []
    (p,) = store.persists
    assert p.message.payload == b"bye" and not p.may_refuse
    complete(h, store, 0)
    assert payloads(watcher.received()) == [b"bye"]


# -- acknowledging delivered rows ------------------------------------------------------------------


def deliver_durable(h: Harness, store: FakeStore, qos: int, payload: bytes = b"m", **props: object) -> int:
    """Publish one durable message from a fresh publisher and let the store commit it; its msg_id."""
    pub = h.client()
    pub.connect(f"pub-{len(store.persists)}")
    properties = Properties(**props) if props else Properties()  # type: ignore[arg-type]
    pub.send(Publish("d/x", payload, qos=qos, packet_id=1, properties=properties))
    complete(h, store, len(store.persists) - 1)
    return store.persists[-1].message.msg_id


def test_rows_are_acked_on_puback() -> None:
    h, store = harness()
    sub = h.client()
    persistent(sub, "sub")
    subscribe(sub, Subscription("d/#", 1))
    msg_id = deliver_durable(h, store, 1)
    (delivery,) = sub.received()
    assert isinstance(delivery, Publish)
    assert store.acks == []
    sub.send(Puback(delivery.packet_id))
    assert store.acks == [("sub", msg_id)]


def test_rows_are_acked_on_pubcomp_not_before() -> None:
    h, store = harness()
    sub = h.client()
    persistent(sub, "sub")
    subscribe(sub, Subscription("d/#", 2))
    msg_id = deliver_durable(h, store, 2)
    (delivery,) = sub.received()
    assert isinstance(delivery, Publish) and delivery.qos == 2
    sub.send(Pubrec(delivery.packet_id))
    assert sub.received() == [Pubrel(delivery.packet_id)]
    assert store.acks == []
    sub.send(Pubcomp(delivery.packet_id))
    assert store.acks == [("sub", msg_id)]


def test_rows_are_acked_when_the_client_refuses_with_pubrec() -> None:
    h, store = harness()
    sub = h.client()
    persistent(sub, "sub")
    subscribe(sub, Subscription("d/#", 2))
    msg_id = deliver_durable(h, store, 2)
    (delivery,) = sub.received()
    sub.send(Pubrec(delivery.packet_id, Reason.UNSPECIFIED_ERROR))  # type: ignore[union-attr]
    assert store.acks == [("sub", msg_id)]


def test_rows_are_acked_when_a_queued_message_expired() -> None:
    h, store = harness()
    sub = h.client()
    persistent(sub, "sub")
    subscribe(sub, Subscription("d/#", 1))
    sub.lose()
    msg_id = deliver_durable(h, store, 1, message_expiry_interval_s=1)
    assert len(h.core.sessions["sub"].queue) == 1
    h.clock.advance(5)
    again = h.client()
    persistent(again, "sub")
    assert again.received() == []  # expired: not sent [MQTT-3.3.2-5]
    assert store.acks == [("sub", msg_id)]


def test_rows_are_acked_when_an_in_flight_message_expired() -> None:
    h, store = harness()
    sub = h.client()
    persistent(sub, "sub")
    subscribe(sub, Subscription("d/#", 1))
    msg_id = deliver_durable(h, store, 1, message_expiry_interval_s=1)
    assert len(sub.received()) == 1  # sent, never acknowledged
    sub.lose()
    h.clock.advance(5)
    again = h.client()
    persistent(again, "sub")
    assert again.received() == []
    assert store.acks == [("sub", msg_id)]


def test_rows_are_acked_when_a_message_is_too_large_for_the_client() -> None:
    """[MQTT-3.1.2-25] a PUBLISH above the client's Maximum Packet Size is dropped, for this client."""
    h, store = harness()
    sub = h.client()
    persistent(sub, "sub", maximum_packet_bytes=64)
    subscribe(sub, Subscription("d/#", 1))
    msg_id = deliver_durable(h, store, 1, payload=b"z" * 200)
    assert sub.received() == []
    assert store.acks == [("sub", msg_id)]


def test_no_ack_for_a_session_the_store_does_not_hold() -> None:
    h, store = harness()
    sub = h.client()
    sub.connect("sub")  # clean, expiry 0: not stored
    subscribe(sub, Subscription("d/#", 1))
    deliver_durable(h, store, 1)
    (delivery,) = sub.received()
    sub.send(Puback(delivery.packet_id))  # type: ignore[union-attr]
    assert store.acks == []


def test_a_persistent_connect_loads_the_session_from_the_store() -> None:
    h, store = harness()
    c = h.client()
    c.send(Connect("c", V5, False, properties=Properties(session_expiry_interval_s=10)))
    assert store.loads == ["c"]
    assert isinstance(c.received()[0], Connack)
    c2 = h.client()
    c2.connect("c2")  # clean start: nothing to load
    assert store.loads == ["c"]


def test_a_session_handed_to_a_lost_claim_is_parked_in_the_store_not_kept() -> None:
    h, _store = harness()
    c = h.client()
    c.connect("moving", clean_start=False, properties=Properties(session_expiry_interval_s=300))
    c.send(Subscribe(1, (Subscription("a/+", 1),)))
    c.received()
    state = session_to_wire(h.core.sessions["moving"], h.clock.now)
    other, other_store = harness()
    done: list[float] = []
    other.core.park_in_store("moving", state, other.clock.now, done.append)
    assert other_store.saved == ["moving"] and done  # committed before `done`
    assert "moving" not in other.core.sessions  # not installed: it is not this worker's
    assert len(other.core.subscriptions) == 0
    # a session that ends with its connection leaves nothing to store
    ephemeral = dataclasses.replace(session_to_wire(h.core.sessions["moving"], h.clock.now), expiry_s=0)
    other.core.park_in_store("gone", ephemeral, other.clock.now, done.append)
    assert other_store.saved == ["moving"] and len(done) == 2
