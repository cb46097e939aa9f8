"""The sans-IO core against a fake `MeshPort` (`broker/core.py`, `broker/handlers/`).

The fake completes claims and barriers only when the test says, so the tests can look at what
the core does while it waits: packets sent after CONNECT (or after a SUBSCRIBE that needs a
barrier) are held and handled in order afterwards; a connection lost during a claim; `release`
hands the local session over and disconnects the old connection with 0x8E; a claim completed
with a hand-off resumes the session; shared members on other workers are reached with
`direct`, and a message from another worker (`pick_shared=False`) never picks a shared member.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from broker.config import MqttConfig
from broker.core import BrokerCore
from broker.messages import Message
from broker.protocol.packets import (
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
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Will,
)
from broker.protocol.reasons import Reason
from broker.session import SubEntry
from mesh.envelope import Item, SessionWire
from tests.unit.core_harness import Harness, HarnessClient

pytestmark = pytest.mark.timeout(10)

V5 = ProtocolVersion.V5
V311 = ProtocolVersion.V311
ClaimDone = Callable[[int, SessionWire | None, float], None]


class FakeMesh:
    """Records what the core asks of the mesh; claims and barriers complete when told."""

    def __init__(self) -> None:
        self.auto_claim = True
        self.auto_barrier = True
        self.needs_barrier = False  # what `interest` answers for a new local filter
        self.forward_result = False
        self.next_epoch = 100
        self.claims: list[tuple[str, bool, ClaimDone]] = []
        self.barriers: list[Callable[[float], None]] = []
        self.handoffs: list[tuple[int, str, int, SessionWire | None]] = []
        self.directs: list[tuple[int, str, Message, int, bool, tuple[int, ...]]] = []
        self.forwarded: list[Message] = []
        self.ended: list[tuple[str, int]] = []
        self.interests: list[tuple[str, int]] = []
        self.shared: list[tuple[SubEntry, bool]] = []
        self.flushes = 0

    def forward(self, message: Message) -> bool:
        self.forwarded.append(message)
        return self.forward_result

    def direct(
        self, worker: int, client_id: str, message: Message, qos: int, retain: bool, sub_ids: tuple[int, ...]
    ) -> None:
        self.directs.append((worker, client_id, message, qos, retain, sub_ids))

    def claim(self, client_id: str, clean_start: bool, now: float, done: ClaimDone) -> None:
        if self.auto_claim:
            self.next_epoch += 1
            done(self.next_epoch, None, now)
        else:
            self.claims.append((client_id, clean_start, done))

    def handoff(self, worker: int, client_id: str, epoch: int, state: SessionWire | None) -> None:
        self.handoffs.append((worker, client_id, epoch, state))

    def session_ended(self, client_id: str, epoch: int) -> None:
        self.ended.append((client_id, epoch))

    def interest(self, topic_filter: str, delta: int) -> bool:
        self.interests.append((topic_filter, delta))
        return self.needs_barrier and delta > 0

    def shared_changed(self, entry: SubEntry, joined: bool) -> None:
        self.shared.append((entry, joined))

    def barrier(self, now: float, done: Callable[[float], None]) -> None:
        if self.auto_barrier:
            done(now)
        else:
            self.barriers.append(done)

    def flush(self) -> None:
        self.flushes += 1


def harness(mesh: FakeMesh, worker_index: int = 1, **mqtt: object) -> Harness:
    h = Harness(**mqtt)
    ids = iter(range(1, 1_000_000))
    h.core = BrokerCore(
        dataclasses.replace(MqttConfig(), **mqtt),  # type: ignore[arg-type]
        mesh=mesh,
        new_client_id=lambda: f"auto-{next(ids)}",
        worker_index=worker_index,
    )
    return h


def complete_claim(
    h: Harness, mesh: FakeMesh, epoch: int, state: SessionWire | None = None, index: int = 0
) -> None:
    _, _, done = mesh.claims.pop(index)
    done(epoch, state, h.clock.now)
    h.core.flush()


def complete_barrier(h: Harness, mesh: FakeMesh, index: int = 0) -> None:
    done = mesh.barriers.pop(index)
    done(h.clock.now)
    h.core.flush()


def names(packets: list[Packet]) -> list[str]:
    return [type(p).__name__ for p in packets]


def subscribe(c: HarnessClient, *subs: Subscription, pid: int = 1) -> Suback:
    c.send(Subscribe(pid, subs))
    got = c.received()
    assert isinstance(got[0], Suback), got
    c._pending = got[1:]
    return got[0]


def session_props(expiry_s: int) -> Properties:
    return Properties(session_expiry_interval_s=expiry_s)


# -- claims -----------------------------------------------------------------------------------------


def test_packets_after_connect_wait_for_the_claim_and_keep_their_order() -> None:
    mesh = FakeMesh()
    mesh.auto_claim = False
    h = harness(mesh)
    c = h.client()
    c.send(Connect("c1", V5, True), Subscribe(1, (Subscription("t", 1),)))
    c.send(Publish("t", b"x", qos=1, packet_id=2), Pingreq())  # arrives while the claim is pending
    assert c.received() == []
    assert [(cid, clean) for cid, clean, _ in mesh.claims] == [("c1", True)]
    assert "c1" not in h.core.sessions
    complete_claim(h, mesh, epoch=41)
    got = c.received()
    assert names(got) == ["Connack", "Suback", "Publish", "Puback", "Pingresp"]
    connack = got[0]
    assert isinstance(connack, Connack) and connack.reason_code == 0 and not connack.session_present
    assert got[1] == Suback(1, (1,))
    assert isinstance(got[2], Publish) and got[2].payload == b"x"
    assert got[3] == Puback(2, Reason.SUCCESS)
    assert h.core.sessions["c1"].epoch == 41
    assert h.core.connected_count == 1


def test_the_claim_says_clean_start() -> None:
    mesh = FakeMesh()
    mesh.auto_claim = False
    h = harness(mesh)
    h.client().send(Connect("c1", V5, False, properties=session_props(60)))
    assert [(cid, clean) for cid, clean, _ in mesh.claims] == [("c1", False)]


def test_two_clients_claiming_at_once_each_get_their_own_answer() -> None:
    mesh = FakeMesh()
    mesh.auto_claim = False
    h = harness(mesh)
    a, b = h.client(), h.client()
    a.send(Connect("a", V5, True), Pingreq())
    b.send(Connect("b", V5, True), Pingreq())
    complete_claim(h, mesh, epoch=7, index=1)  # b's answer comes first
    assert a.received() == []
    assert names(b.received()) == ["Connack", "Pingresp"]
    complete_claim(h, mesh, epoch=8)
    assert names(a.received()) == ["Connack", "Pingresp"]
    assert (h.core.sessions["a"].epoch, h.core.sessions["b"].epoch) == (8, 7)


def test_connection_lost_during_the_claim_ends_a_clean_session_and_sends_the_will() -> None:
    mesh = FakeMesh()
    h = harness(mesh)
    watcher = h.client()
    watcher.connect("watcher")
    subscribe(watcher, Subscription("will/#", 0))
    mesh.auto_claim = False
    c = h.client()
    c.send(Connect("c1", V5, True, will=Will("will/c1", b"gone")))
    c.lose()  # the socket is gone before the claim answered
    assert mesh.ended == []
    complete_claim(h, mesh, epoch=55)
    assert watcher.received() == [Publish("will/c1", b"gone")]
    assert "c1" not in h.core.sessions
    assert mesh.ended == [("c1", 55)]  # the registry forgets it
    assert h.core.connected_count == 1  # the watcher only
    assert c.link.written == b""


def test_connection_lost_during_the_claim_keeps_a_persistent_session_offline() -> None:
    mesh = FakeMesh()
    mesh.auto_claim = False
    h = harness(mesh)
    c = h.client()
    c.send(Connect("c1", V5, False, properties=session_props(100)), Subscribe(1, (Subscription("q", 1),)))
    c.lose()
    complete_claim(h, mesh, epoch=9)
    session = h.core.sessions["c1"]
    assert session.connection is None and session.epoch == 9
    assert session.expires_at == pytest.approx(h.clock.now + 100)
    assert session.subscriptions == {}  # the held SUBSCRIBE of a lost connection is not handled
    assert mesh.ended == []
    assert h.core.connected_count == 0
    assert c.link.written == b""


# -- release: another worker claimed a client id of ours -------------------------------------------


def test_release_hands_the_session_over_and_disconnects_with_0x8e() -> None:
    """[MQTT-3.1.4-3] the existing connection is closed; 5.0: DISCONNECT 0x8E, session taken over."""
    mesh = FakeMesh()
    h = harness(mesh)
    c, pub = h.client(), h.client()
    c.connect("c1", clean_start=False, properties=session_props(100))
    subscribe(c, Subscription("a/#", 1), Subscription("$share/g/s", 2))
    pub.connect("pub")
    pub.send(Publish("a/x", b"unacked", qos=1, packet_id=1))
    delivered = c.received()
    assert len(delivered) == 1 and isinstance(delivered[0], Publish)
    assert pub.received() == [Puback(1)]
    epoch = h.core.sessions["c1"].epoch
    h.core.release("c1", epoch + 5, 2, False, h.clock.now)
    h.core.flush()
    assert c.received() == [Disconnect(Reason.SESSION_TAKEN_OVER)]
    assert c.link.closed
    ((worker, client_id, handoff_epoch, state),) = mesh.handoffs
    assert (worker, client_id, handoff_epoch) == (2, "c1", epoch + 5)
    assert state is not None
    assert [s[0] for s in state.subscriptions] == ["a/#", "$share/g/s"]
    assert [(e[0], e[1], e[5], e[6][2]) for e in state.inflight] == [
        (delivered[0].packet_id, 1, "a/x", b"unacked")
    ]
    assert state.expiry_s == 100
    # forgotten here: subscriptions, shared membership, session
    assert "c1" not in h.core.sessions
    assert ("a/#", -1) in mesh.interests
    assert [(e.share_group, joined) for e, joined in mesh.shared] == [("g", True), ("g", False)]
    assert mesh.ended == []  # the session lives on at worker 2
    pub.send(Publish("a/y", b"later", qos=1, packet_id=2))
    assert pub.received() == [Puback(2, Reason.NO_MATCHING_SUBSCRIBERS)]
    c.lose()  # the IO layer reports the closed socket: nothing more happens
    assert h.core.connected_count == 1


def test_release_with_clean_start_hands_over_nothing_and_sends_the_will() -> None:
    mesh = FakeMesh()
    h = harness(mesh)
    watcher, c = h.client(), h.client()
    watcher.connect("watcher")
    subscribe(watcher, Subscription("will/#", 0))
    c.connect("c1", clean_start=False, properties=session_props(100), will=Will("will/c1", b"bye"))
    h.core.release("c1", 10_000, 3, True, h.clock.now)
    h.core.flush()
    assert c.received() == [Disconnect(Reason.SESSION_TAKEN_OVER)]
    assert mesh.handoffs == [(3, "c1", 10_000, None)]
    assert watcher.received() == [Publish("will/c1", b"bye")]


def test_release_of_an_offline_session_hands_it_over() -> None:
    mesh = FakeMesh()
    h = harness(mesh)
    c = h.client()
    c.connect("c1", clean_start=False, properties=session_props(100))
    subscribe(c, Subscription("a", 1))
    c.lose()
    h.core.release("c1", 10_000, 2, False, h.clock.now)
    ((_, _, _, state),) = mesh.handoffs
    assert state is not None and [s[0] for s in state.subscriptions] == ["a"]
    assert "c1" not in h.core.sessions


def test_release_of_an_unknown_client_still_answers() -> None:
    """The claimer waits for a hand-off: it gets one (empty) even if we hold nothing."""
    mesh = FakeMesh()
    h = harness(mesh)
    h.core.release("nobody", 5, 2, False, h.clock.now)
    assert mesh.handoffs == [(2, "nobody", 5, None)]


def test_a_stale_release_is_ignored() -> None:
    mesh = FakeMesh()
    h = harness(mesh)
    c = h.client()
    c.connect("c1")
    epoch = h.core.sessions["c1"].epoch
    h.core.release("c1", epoch - 1, 2, False, h.clock.now)
    h.core.flush()
    assert c.received() == [] and not c.link.closed
    assert h.core.sessions["c1"].connection is c.conn
    assert mesh.handoffs == []


# -- a claim that completes with a hand-off --------------------------------------------------------


def item(payload: bytes, qos: int, msg_id: int = 0) -> Item:
    return (qos, False, payload, "pub", None, None, msg_id)


HANDED = SessionWire(
    expiry_s=100,
    subscriptions=(("a/#", "a/#", 1, False, False, 0, None, None),),
    inflight=(
        (5, 1, 1, False, (), "a/1", item(b"one", 1)),
        (6, 3, 2, False, (), "a/2", item(b"two", 2)),
        (7, 2, 2, False, (), "a/3", item(b"three", 2)),
    ),
    queue=((1, False, (), "a/4", item(b"four", 1)),),
    inbound_qos2=(9,),
    next_packet_id=8,
)


def test_a_hand_off_resumes_the_session_and_resends_in_flight_with_dup() -> None:
    """[MQTT-4.4.0-1] PUBLISH again with DUP and the same packet id; PUBREL for those received."""
    mesh = FakeMesh()
    mesh.auto_claim = False
    h = harness(mesh)
    c = h.client()
    c.send(Connect("c1", V5, False, properties=session_props(100)))
    complete_claim(h, mesh, epoch=12, state=HANDED)
    got = c.received()
    connack = got[0]
    assert isinstance(connack, Connack) and connack.session_present  # [MQTT-3.2.2-3]
    assert [(type(p).__name__, p.packet_id) for p in got[1:]] == [  # type: ignore[union-attr]
        ("Publish", 5),
        ("Pubrel", 6),
        ("Publish", 7),
        ("Publish", 8),
    ]
    one, three, four = got[1], got[3], got[4]
    assert isinstance(one, Publish) and one.dup and one.qos == 1 and one.payload == b"one"
    assert isinstance(three, Publish) and three.dup and three.qos == 2
    assert isinstance(four, Publish) and not four.dup and four.payload == b"four"
    session = h.core.sessions["c1"]
    assert session.epoch == 12
    # the QoS 2 receive state came along: PUBREL 9 is known
    c.send(Pubrel(9))
    assert c.received() == [Pubcomp(9)]
    # the subscriptions are in force here now
    assert ("a/#", 1) in mesh.interests
    mesh.auto_claim = True
    pub = h.client()
    pub.connect("pub")
    pub.send(Publish("a/new", b"n", qos=1, packet_id=1))
    assert [p.payload for p in c.received()] == [b"n"]  # type: ignore[union-attr]


def test_a_hand_off_is_ignored_by_a_clean_start() -> None:
    mesh = FakeMesh()
    mesh.auto_claim = False
    h = harness(mesh)
    c = h.client()
    c.send(Connect("c1", V5, True))
    complete_claim(h, mesh, epoch=12, state=HANDED)
    got = c.received()
    assert len(got) == 1 and isinstance(got[0], Connack) and not got[0].session_present
    assert h.core.sessions["c1"].subscriptions == {}


def test_release_then_claim_moves_a_session_between_two_cores() -> None:
    mesh1, mesh2 = FakeMesh(), FakeMesh()
    h1, h2 = harness(mesh1, worker_index=1), harness(mesh2, worker_index=2)
    old = h1.client(V311)
    old.connect("c1", clean_start=False)
    subscribe(old, Subscription("t", 2))
    pub = h1.client(V311)
    pub.connect("pub")
    pub.send(Publish("t", b"m", qos=2, packet_id=3))
    (first,) = old.received()
    assert isinstance(first, Publish) and first.qos == 2
    mesh2.auto_claim = False
    new = h2.client(V311)
    new.send(Connect("c1", V311, False))
    h1.core.release("c1", 500, 2, False, h1.clock.now)  # what the relay's release makes worker 1 do
    h1.core.flush()
    assert old.link.closed and old.received() == []  # 3.1.1: no DISCONNECT from a server
    ((_, _, epoch, state),) = mesh1.handoffs
    complete_claim(h2, mesh2, epoch=epoch, state=state)
    got = new.received()
    assert isinstance(got[0], Connack) and got[0].session_present
    again = got[1]
    assert isinstance(again, Publish) and again.dup and again.packet_id == first.packet_id
    assert h2.core.sessions["c1"].subscriptions["t"].worker == 2


# -- barriers ---------------------------------------------------------------------------------------


def test_suback_waits_for_the_barrier_and_a_later_publish_waits_too() -> None:
    mesh = FakeMesh()
    mesh.needs_barrier = True
    mesh.auto_barrier = False
    h = harness(mesh)
    setter = h.client()
    setter.connect("setter")
    setter.send(Publish("t", b"retained", retain=True))
    c = h.client()
    c.connect("c1")
    c.send(Subscribe(1, (Subscription("t", 1),)), Publish("t", b"mine", qos=1, packet_id=2))
    c.send(Pingreq())
    assert c.received() == []
    assert len(mesh.barriers) == 1
    complete_barrier(h, mesh)
    got = c.received()
    assert names(got) == ["Suback", "Publish", "Publish", "Puback", "Pingresp"]
    assert got[0] == Suback(1, (1,))
    retained, mine = got[1], got[2]
    assert isinstance(retained, Publish) and retained.retain and retained.payload == b"retained"
    assert isinstance(mine, Publish) and mine.payload == b"mine"
    assert got[3] == Puback(2)


def test_no_barrier_when_the_mesh_says_none_is_needed() -> None:
    mesh = FakeMesh()
    mesh.auto_barrier = False
    h = harness(mesh)
    c = h.client()
    c.connect("c1")
    assert subscribe(c, Subscription("t", 0)) == Suback(1, (0,))
    assert mesh.barriers == []


def test_a_shared_subscription_always_waits_for_the_barrier() -> None:
    mesh = FakeMesh()
    mesh.auto_barrier = False
    h = harness(mesh, worker_index=3)
    c = h.client()
    c.connect("c1")
    c.send(Subscribe(1, (Subscription("$share/g/t", 1),)))
    assert c.received() == []
    ((entry, joined),) = mesh.shared
    assert joined and (entry.share_group, entry.topic_filter, entry.worker, entry.client_id) == (
        "g",
        "t",
        3,
        "c1",
    )
    complete_barrier(h, mesh)
    assert c.received() == [Suback(1, (1,))]


def test_a_barrier_that_completes_after_the_connection_is_gone_sends_nothing() -> None:
    mesh = FakeMesh()
    mesh.needs_barrier = True
    mesh.auto_barrier = False
    h = harness(mesh)
    c = h.client()
    c.connect("c1")
    c.send(Subscribe(1, (Subscription("t", 1),)), Pingreq())
    c.lose()
    complete_barrier(h, mesh)  # the FakeLink asserts nothing is written after close
    assert c.received() == []


# -- routing with other workers ---------------------------------------------------------------------


def remote_member(
    client_id: str = "remote", worker: int = 2, qos: int = 1, topic_filter: str = "s/+"
) -> SubEntry:
    return SubEntry(client_id, topic_filter, qos, share_group="g", worker=worker)


def test_a_shared_member_on_another_worker_gets_the_message_through_direct() -> None:
    mesh = FakeMesh()
    h = harness(mesh)
    h.core.apply_shared_update(remote_member(qos=1), True)
    pub = h.client()
    pub.connect("pub")
    pub.send(Publish("s/x", b"m", qos=2, packet_id=1))
    ((worker, client_id, message, qos, retain, sub_ids),) = mesh.directs
    assert (worker, client_id, qos, retain, sub_ids) == (2, "remote", 1, False, ())
    assert message.topic == "s/x" and message.payload == b"m"
    assert names(pub.received()) == ["Pubrec"]


def test_shared_picks_alternate_between_local_and_remote_members_one_each() -> None:
    mesh = FakeMesh()
    h = harness(mesh)
    h.core.apply_shared_update(remote_member(), True)
    local = h.client()
    local.connect("local")
    subscribe(local, Subscription("$share/g/s/+", 1))
    pub = h.client()
    pub.connect("pub")
    for n in range(6):
        pub.send(Publish("s/x", str(n).encode(), qos=1, packet_id=n + 1))
    local_got = [p.payload for p in local.received()]  # type: ignore[union-attr]
    remote_got = [d[2].payload for d in mesh.directs]
    assert len(local_got) == len(remote_got) == 3
    assert sorted(local_got + remote_got) == [str(n).encode() for n in range(6)]


def test_an_offline_local_member_is_skipped_for_a_remote_one() -> None:
    mesh = FakeMesh()
    h = harness(mesh)
    h.core.apply_shared_update(remote_member(), True)
    local = h.client()
    local.connect("local", clean_start=False, properties=session_props(100))
    subscribe(local, Subscription("$share/g/s/+", 1))
    local.lose()
    pub = h.client()
    pub.connect("pub")
    for n in range(4):
        pub.send(Publish("s/x", b"m", qos=1, packet_id=n + 1))
    assert len(mesh.directs) == 4
    assert not h.core.sessions["local"].queue


def test_a_dead_workers_members_are_forgotten() -> None:
    mesh = FakeMesh()
    h = harness(mesh)
    h.core.apply_shared_update(remote_member(worker=2), True)
    h.core.apply_shared_update(remote_member("other", worker=4), True)
    h.core.forget_worker(2)
    pub = h.client()
    pub.connect("pub")
    for n in range(3):
        pub.send(Publish("s/x", b"m", qos=1, packet_id=n + 1))
    assert {(d[0], d[1]) for d in mesh.directs} == {(4, "other")}
    h.core.apply_shared_update(remote_member("other", worker=4), False)
    pub.send(Publish("s/x", b"m", qos=1, packet_id=9))
    assert len(mesh.directs) == 3


def test_route_local_without_pick_shared_never_picks_a_shared_member() -> None:
    mesh = FakeMesh()
    h = harness(mesh)
    h.core.apply_shared_update(remote_member(), True)
    member, plain = h.client(), h.client()
    member.connect("member")
    subscribe(member, Subscription("$share/g/s/+", 1))
    plain.connect("plain")
    subscribe(plain, Subscription("s/#", 1))
    message = Message("s/x", b"from w2", 1, False, origin="someone-on-w2")
    for _ in range(3):
        assert h.core.route_local(message, h.clock.now, pick_shared=False) == 1
    h.core.flush()
    assert member.received() == []
    assert mesh.directs == []
    assert [p.payload for p in plain.received()] == [b"from w2"] * 3  # type: ignore[union-attr]
    assert mesh.forwarded == []  # route_local does not offer to the mesh again


def test_publish_is_offered_to_the_mesh_and_its_answer_decides_no_matching_subscribers() -> None:
    mesh = FakeMesh()
    h = harness(mesh)
    pub = h.client()
    pub.connect("pub")
    pub.send(Publish("nobody/here", b"1", qos=1, packet_id=1))
    assert pub.received() == [Puback(1, Reason.NO_MATCHING_SUBSCRIBERS)]
    mesh.forward_result = True  # another process has a subscriber
    pub.send(Publish("elsewhere", b"2", qos=1, packet_id=2))
    assert pub.received() == [Puback(2, Reason.SUCCESS)]
    assert [m.payload for m in mesh.forwarded] == [b"1", b"2"]


def test_flush_flushes_the_mesh() -> None:
    mesh = FakeMesh()
    h = harness(mesh)
    before = mesh.flushes
    h.core.flush()
    assert mesh.flushes == before + 1


def test_pingresp_is_not_held_without_a_wait() -> None:
    mesh = FakeMesh()
    h = harness(mesh)
    c = h.client()
    c.connect("c1")
    c.send(Pingreq())
    assert c.received() == [Pingresp()]


# -- retained changes take a barrier before their acknowledgement --------------------------------


def test_a_retained_publish_is_acknowledged_after_the_barrier_and_keeps_the_ack_order() -> None:
    mesh = FakeMesh()
    h = harness(mesh)
    c = h.client()
    c.connect("pub")
    mesh.auto_barrier = False
    c.send(
        Publish("r/1", b"kept", qos=1, packet_id=1, retain=True),
        Publish("plain", b"x", qos=1, packet_id=2),
        Publish("r/2", b"kept", qos=2, packet_id=3, retain=True),
    )
    # the retained change is routed at once (on its way to the other processes); what the
    # client sends after it waits behind its acknowledgement, in order
    assert [m.topic for m in mesh.forwarded] == ["r/1"]
    assert h.core.retained.get("r/1") is not None
    assert c.received() == []
    assert len(mesh.barriers) == 1
    complete_barrier(h, mesh, 0)
    assert [(type(p).__name__, p.packet_id) for p in c.received()] == [("Puback", 1), ("Puback", 2)]  # type: ignore[attr-defined]
    assert [m.topic for m in mesh.forwarded] == ["r/1", "plain", "r/2"]
    assert len(mesh.barriers) == 1  # r/2's
    c.send(Publish("r/2", b"kept", qos=2, packet_id=3, retain=True, dup=True))  # a resend meanwhile
    assert c.received() == []
    complete_barrier(h, mesh, 0)
    assert [(type(p).__name__, p.packet_id) for p in c.received()] == [("Pubrec", 3), ("Pubrec", 3)]  # type: ignore[attr-defined]
    assert [m.topic for m in mesh.forwarded] == ["r/1", "plain", "r/2"]  # the resend is not routed again
