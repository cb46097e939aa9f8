"""A node of four workers (`meshmq -workers 4`), end to end: a client cannot tell its worker.

Why: with several workers, every MQTT guarantee that one process gave for free now depends on the
ZeroMQ mesh between them: fan-out, wildcard and `$` matching, per-topic order, session takeover
with its in-flight state, retained messages, shared subscriptions, wills, No Local, a worker
crash and the node's drain. Each test puts its clients on chosen workers through the test option
`WorkerPortBase` (worker i also listens on base + i, see `tests.e2e.workers_helpers`) and checks
exactly what a client sees, as the single-worker tests do.

Must not: rely on which worker the shared port picks; wait on sleeps except where silence is the
assertion (`expect_none`) or to pace a publisher; signal a process that is not this test's node.

Most tests share one node per module (`node`), with client ids and topics unique per test; tests
that kill a worker or stop the node start their own (`fresh_node`). The broker log written during
a test is printed at teardown, so that pytest shows it next to a failure.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.protocol.packets import (
    Properties,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscription,
)
from tests.e2e.clients import ClientFactory, Message, TestClient
from tests.e2e.rawclient import RawClient, connected, expect_disconnect
from tests.e2e.workers_helpers import (
    WorkerNode,
    collect,
    missing_and_duplicates,
    numbered,
    seqs,
    start_worker_node,
    take_until,
)

pytestmark = [pytest.mark.meshmq_only, pytest.mark.timeout(60)]

WORKERS = 4
SESSION_TAKEN_OVER = 0x8E
SERVER_SHUTTING_DOWN = 0x8B
# `ShutdownGrace` of the drain tests' node, and the slack allowed on top for the processes to exit.
SHUTDOWN_GRACE_S = 3.0
EXIT_SLACK_S = 1.5


# -- fixtures --------------------------------------------------------------------------------


class _SharedNode:
    """The module's node, restarted if an earlier test left it dead or a worker not listening."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        self.current: WorkerNode | None = None

    def get(self) -> WorkerNode:
        node = self.current
        if node is not None and node.alive():
            try:
                node.wait_ready(timeout_s=10)
                return node
            except TimeoutError:
                node.broker.stop()
        self.generation += 1
        self.current = start_worker_node(self.root / f"gen{self.generation}", WORKERS)
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.broker.stop()


def _print_log_since(node: WorkerNode, offset: int) -> None:
    text = node.log()[offset:]
    lines = text.splitlines()
    print(f"--- broker log during the test ({len(lines)} lines, last 80) ---")
    print("\n".join(lines[-80:]))


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_SharedNode]:
    holder = _SharedNode(tmp_path_factory.mktemp("workers"))
    yield holder
    holder.stop()


@pytest.fixture
def node(shared_node: _SharedNode) -> Iterator[WorkerNode]:
    n = shared_node.get()
    offset = len(n.log())
    yield n
    _print_log_since(n, offset)


def _own_node(tmp_path: Path, config: dict[str, Any] | None = None) -> Iterator[WorkerNode]:
    n = start_worker_node(tmp_path, WORKERS, config)
    try:
        yield n
    finally:
        _print_log_since(n, 0)
        n.broker.stop()


@pytest.fixture
def fresh_node(tmp_path: Path) -> Iterator[WorkerNode]:
    """A node of this test's own, for tests that kill a worker."""
    yield from _own_node(tmp_path)


@pytest.fixture
def durable_node(tmp_path: Path) -> Iterator[WorkerNode]:
    """A node of this test's own with an SQLite session store (so a store process runs)."""
    store = {"Type": "SQLITE", "SQLite": {"Path": str((tmp_path / "sessions.db").resolve())}}
    yield from _own_node(tmp_path, {"SessionStore": store})


@pytest.fixture
def draining_node(tmp_path: Path) -> Iterator[WorkerNode]:
    """A node of this test's own with a short `ShutdownGrace`, for tests that stop it."""
    yield from _own_node(tmp_path, {"ShutdownGrace": SHUTDOWN_GRACE_S})


@pytest.fixture
def make(node: WorkerNode) -> Iterator[ClientFactory]:
    with ClientFactory(node.shared) as factory:
        yield factory


@pytest.fixture(params=[4, 5], ids=["v311", "v5"])
def version(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def persistent(version: int, expiry_s: int = 300) -> dict[str, Any]:
    """Connect options for a session that outlives its connection, in either version."""
    return {"clean_start": False, "session_expiry_s": expiry_s if version == 5 else None}


def raw_persistent_props(receive_maximum: int | None = None) -> Properties:
    return Properties(session_expiry_interval_s=300, receive_maximum=receive_maximum)


# -- fan-out, matching ----------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_on_one_worker_reaches_subscribers_on_every_worker(
    node: WorkerNode, make: ClientFactory, version: int, qos: int
) -> None:
    """A publish on worker 1 reaches subscribers on workers 2, 3, 4 and on worker 1 itself, at
    QoS min(published, granted) [MQTT-3.8.4-8], in order, exactly once each."""
    topic = f"fan/{version}/{qos}"
    subs = [make(f"fan-s{i}-{version}-{qos}", broker=node.worker(i), version=version) for i in (2, 3, 4, 1)]
    for s in subs:
        assert s.subscribe(topic, 2) == [2]
    pub = make(f"fan-p-{version}-{qos}", broker=node.worker(1), version=version)
    payloads = numbered(20)
    pub.publish_many(topic, payloads, qos=qos)
    for s in subs:
        got = s.expect(len(payloads))
        assert [(m.topic, m.payload, m.qos, m.retain) for m in got] == [
            (topic, p, qos, False) for p in payloads
        ], s.client_id
    for s in subs:
        s.expect_none(0.1)


def test_subscription_and_unsubscription_take_effect_across_workers_at_once(
    node: WorkerNode, make: ClientFactory
) -> None:
    """Once SUBACK is back, a publish on another worker is delivered; once UNSUBACK is back, it
    is not [MQTT-3.10.4-2]. With one worker this is free; across workers the subscription has
    to reach the publishing worker before the SUBACK goes out (20 rounds to catch a race)."""
    subs = {i: make(f"live-s{i}", broker=node.worker(i)) for i in (2, 3, 4)}
    marker = make("live-marker", broker=node.worker(2))
    marker.subscribe("live/marker", 1)
    pub = make("live-p", broker=node.worker(1))
    for rnd in range(20):
        s = subs[2 + rnd % 3]
        topic = f"live/{rnd}/t"
        assert s.subscribe(topic, 1) == [1]
        pub.publish(topic, b"now", qos=1)
        m = s.expect_one(timeout_s=2)
        assert (m.topic, m.payload) == (topic, b"now"), f"round {rnd}"
        s.unsubscribe(topic)
        pub.publish(topic, b"too late", qos=1)
        pub.publish("live/marker", str(rnd).encode(), qos=1)
        assert marker.expect_one().payload == str(rnd).encode()
        s.expect_none(0.05)


def test_wildcard_filters_across_workers(node: WorkerNode, make: ClientFactory, version: int) -> None:
    """'#', 'a/+/c' and a filter that starts with a wildcard ('+/b/c'), on three other workers,
    match exactly as the MQTT matcher says (ZeroMQ prefix filtering is only an optimisation)."""
    topics = ["a/b/c", "a/x/c", "a/b/d", "a/b/c/d", "b/b/c", "a//c", "a/b"]
    hash_sub = make(f"wc-hash-{version}", broker=node.worker(2), version=version)
    plus_sub = make(f"wc-plus-{version}", broker=node.worker(3), version=version)
    lead_sub = make(f"wc-lead-{version}", broker=node.worker(4), version=version)
    same_sub = make(f"wc-same-{version}", broker=node.worker(1), version=version)
    hash_sub.subscribe("#", 1)
    plus_sub.subscribe("a/+/c", 1)
    lead_sub.subscribe("+/b/c", 1)
    same_sub.subscribe("a/#", 1)
    pub = make(f"wc-pub-{version}", broker=node.worker(1), version=version)
    for t in topics:
        pub.publish(t, f"{version}:{t}".encode(), qos=1)
    mine = {f"{version}:{t}".encode() for t in topics}

    def seen(c: TestClient) -> list[str]:
        # '#' also gets retained messages of earlier tests and other tests' traffic: skip those
        return [m.topic for m in c.drain(0.4) if m.payload in mine and not m.retain]

    assert seen(plus_sub) == ["a/b/c", "a/x/c", "a//c"]
    assert seen(lead_sub) == ["a/b/c", "b/b/c"]
    assert seen(same_sub) == ["a/b/c", "a/x/c", "a/b/d", "a/b/c/d", "a//c", "a/b"]
    assert seen(hash_sub) == topics


def test_dollar_topics_across_workers(node: WorkerNode, make: ClientFactory) -> None:
    """A topic starting with '$' is not matched by a filter starting with a wildcard ('#',
    '+/...') [MQTT-4.7.2-1], on any worker, but '$W/#' and '$W/+' match it."""
    hash_sub = make("dl-hash", broker=node.worker(2))
    plus_sub = make("dl-plus", broker=node.worker(3))
    dollar_sub = make("dl-dollar", broker=node.worker(4))
    dollar_plus = make("dl-dollar-plus", broker=node.worker(1))
    hash_sub.subscribe("#", 1, options={"retain_handling": 2})
    plus_sub.subscribe("+/x", 1)
    dollar_sub.subscribe("$W/#", 1)
    dollar_plus.subscribe("$W/+", 1)
    pub = make("dl-pub", broker=node.worker(1))
    pub.publish("$W/x", b"dollar", qos=1)
    pub.publish("W/x", b"marker", qos=1)
    for c in (dollar_sub, dollar_plus):
        m = c.expect_one()
        assert (m.topic, m.payload) == ("$W/x", b"dollar")
    assert plus_sub.expect_one().topic == "W/x"
    plus_sub.expect_none(0.2)
    got = [m.topic for m in hash_sub.drain(0.4) if m.payload in (b"dollar", b"marker")]
    assert got == ["W/x"]


def test_v5_properties_and_subscription_identifier_cross_workers_unchanged(node: WorkerNode) -> None:
    """Properties survive the mesh: user properties unaltered and in order [MQTT-3.3.2-17]
    [MQTT-3.3.2-18], content type, response topic, correlation data, payload format; the
    expiry is the received value minus the time waited [MQTT-3.3.2-6]; the subscriber's own
    subscription identifier is added on its worker [MQTT-3.3.4-3]."""
    sent = Properties(
        payload_format_indicator=1,
        content_type="application/json",
        response_topic="reply/w",
        correlation_data=b"\x00corr\xff",
        message_expiry_interval_s=120,
        user_properties=(("k", "1"), ("z", "2"), ("k", "1"), ("a", "3")),
    )
    with connected(node.worker(3), "pr-sub") as sub, connected(node.worker(1), "pr-pub") as pub:
        sub.subscribe(Subscription("props/w/#", 1), properties=Properties(subscription_identifiers=(9,)))
        pub.publish("props/w/a", b'{"x": 1}', qos=1, properties=sent)
        m = sub.expect(Publish)
        p = m.properties
        assert (m.topic, m.payload) == ("props/w/a", b'{"x": 1}')
        assert p.user_properties == sent.user_properties
        assert (p.payload_format_indicator, p.content_type) == (1, "application/json")
        assert (p.response_topic, p.correlation_data) == ("reply/w", b"\x00corr\xff")
        assert p.message_expiry_interval_s is not None and 115 <= p.message_expiry_interval_s <= 120
        assert p.subscription_identifiers == (9,)


def test_inbound_topic_alias_resolved_before_the_mesh(node: WorkerNode, make: ClientFactory) -> None:
    """A publisher's topic alias is its own connection's business: the subscriber on another
    worker gets the full topic for the aliased publishes."""
    sub = make("ta-sub", broker=node.worker(2))
    sub.subscribe("alias/w/t", 1)
    with RawClient(node.worker(1)) as pub:
        ack = pub.connect("ta-pub")
        if not ack.properties.topic_alias_maximum:
            pytest.skip("the broker accepts no topic aliases")
        pub.publish("alias/w/t", b"1", qos=1, properties=Properties(topic_alias=1))
        pub.publish("", b"2", qos=1, properties=Properties(topic_alias=1))
        got = sub.expect(2)
        assert [(m.topic, m.payload) for m in got] == [("alias/w/t", b"1"), ("alias/w/t", b"2")]


# -- order ----------------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1])
def test_order_per_publisher_and_topic_across_workers(
    node: WorkerNode, make: ClientFactory, qos: int
) -> None:
    """1,000 messages from one publisher to one topic arrive complete and in publish order on
    every worker [MQTT-4.6.0-5] (QoS 0 too: nothing should be dropped at this rate)."""
    n = 1000
    topic = f"order/{qos}"
    subs = [make(f"ord-s{i}-{qos}", broker=node.worker(i)) for i in (1, 2, 3)]
    for s in subs:
        s.subscribe(topic, 1)
    pub = make(f"ord-p-{qos}", broker=node.worker(1))
    pub.publish_many(topic, numbered(n), qos=qos, timeout_s=20)
    for s in subs:
        got: list[Message] = []
        take_until(s, got, n, timeout_s=20)
        assert seqs(got) == list(range(n)), s.client_id
        s.expect_none(0.1)


# -- session takeover -----------------------------------------------------------------------


def test_takeover_of_an_offline_session_on_another_worker(
    node: WorkerNode, make: ClientFactory, version: int
) -> None:
    """A persistent session left on worker 1 resumes on worker 2: session present [MQTT-3.2.2-2]
    (3.1.1) / [MQTT-3.2.2-3] (5.0), the QoS 1 messages queued while offline arrive in order,
    and the subscription now routes publishes from worker 3 to worker 2."""
    cid, topic = f"to-off-{version}", f"takeover/off/{version}"
    x = make(cid, broker=node.worker(1), version=version, **persistent(version))
    x.subscribe(topic, 1)
    x.disconnect()
    pub = make(f"to-off-pub-{version}", broker=node.worker(3), version=version)
    pub.publish_many(topic, numbered(5), qos=1)
    again = make(cid, broker=node.worker(2), version=version, **persistent(version))
    assert again.connack.session_present is True
    assert seqs(again.expect(5)) == list(range(5))
    pub.publish(topic, b"5", qos=1)
    assert again.expect_one().payload == b"5"
    again.expect_none(0.2)


def test_takeover_of_a_live_connection_on_another_worker(
    node: WorkerNode, make: ClientFactory, version: int
) -> None:
    """The same client id connecting on worker 2 closes the connection on worker 1
    ([MQTT-3.1.4-2] 3.1.1, [MQTT-3.1.4-3] 5.0; v5 with DISCONNECT 0x8E), and the new connection
    has the session and its subscriptions; the old one gets nothing more."""
    cid, topic = f"to-live-{version}", f"takeover/live/{version}"
    old = make(cid, broker=node.worker(1), version=version, **persistent(version))
    old.subscribe(topic, 1)
    new = make(cid, broker=node.worker(2), version=version, **persistent(version))
    reason = old.wait_disconnected()
    assert reason == (SESSION_TAKEN_OVER if version == 5 else None)
    assert new.connack.session_present is True
    pub = make(f"to-live-pub-{version}", broker=node.worker(3), version=version)
    pub.publish(topic, b"to the new one", qos=1)
    assert new.expect_one().payload == b"to the new one"
    old.expect_none(0.1)
    # and back again: the session keeps moving with the client id
    third = make(cid, broker=node.worker(4), version=version, **persistent(version))
    assert new.wait_disconnected() == (SESSION_TAKEN_OVER if version == 5 else None)
    assert third.connack.session_present is True
    pub.publish(topic, b"third", qos=1)
    assert third.expect_one().payload == b"third"


def test_takeover_resends_in_flight_with_dup_then_the_queue(node: WorkerNode, make: ClientFactory) -> None:
    """v5, receive maximum 2: two QoS 1 messages in flight (never acked) and three queued on
    worker 1 while the client is online. After takeover on worker 2 the two are resent with
    their packet ids and DUP [MQTT-4.4.0-1] [MQTT-3.3.1-1], then the three queued follow in
    order, then new traffic."""
    cid, topic = "to-inflight-v5", "takeover/inflight/v5"
    with RawClient(node.worker(1)) as old:
        assert old.connect(cid, clean_start=False, properties=raw_persistent_props(2)).reason_code == 0
        old.subscribe(Subscription(topic, 1))
        pub = make("to-inflight-pub", broker=node.worker(3))
        pub.publish_many(topic, numbered(5), qos=1)
        first = [old.expect(Publish) for _ in range(2)]
        assert [p.payload for p in first] == numbered(2)
        old.expect_none(0.2)  # the receive maximum holds the other three back
        with RawClient(node.worker(2)) as new:
            ack = new.connect(cid, clean_start=False, properties=raw_persistent_props(2))
            assert (ack.reason_code, ack.session_present) == (0, True)
            assert expect_disconnect(old, {SESSION_TAKEN_OVER}) == SESSION_TAKEN_OVER
            resent = [new.expect(Publish) for _ in range(2)]
            assert [(p.packet_id, p.payload, p.qos, p.dup) for p in resent] == [
                (p.packet_id, p.payload, 1, True) for p in first
            ]
            for p in resent:
                new.ack(p)
            rest = []
            for _ in range(3):
                p = new.expect(Publish)
                new.ack(p)
                rest.append(p)
            assert [(p.payload, p.dup) for p in rest] == [(b, False) for b in numbered(3, start=2)]
            pub.publish(topic, b"5", qos=1)
            last = new.expect(Publish)
            assert last.payload == b"5"
            new.ack(last)


def test_takeover_resends_in_flight_v311(node: WorkerNode, make: ClientFactory) -> None:
    """3.1.1: unacknowledged QoS 1 messages of the session on worker 1 are resent with DUP and
    their packet ids by worker 2 [MQTT-4.4.0-1]; the old connection is closed."""
    cid, topic = "to-inflight-v311", "takeover/inflight/v311"
    with RawClient(node.worker(1), version=4) as old:
        assert old.connect(cid, clean_start=False).reason_code == 0
        old.subscribe(Subscription(topic, 1))
        pub = make("to-inflight-pub311", broker=node.worker(3), version=4)
        pub.publish_many(topic, numbered(3), qos=1)
        first = [old.expect(Publish) for _ in range(3)]
        with RawClient(node.worker(2), version=4) as new:
            ack = new.connect(cid, clean_start=False)
            assert (ack.reason_code, ack.session_present) == (0, True)
            old.wait_closed()
            resent = [new.expect(Publish) for _ in range(3)]
            assert [(p.packet_id, p.payload, p.dup) for p in resent] == [
                (p.packet_id, p.payload, True) for p in first
            ]
            for p in resent:
                new.ack(p)
            new.expect_none(0.2)


def test_takeover_resends_pubrel_and_unreceived_qos2(node: WorkerNode, make: ClientFactory) -> None:
    """QoS 2 state moves with the session: a message that got PUBREC (server waits for PUBCOMP)
    is continued with a PUBREL, one that got nothing is resent with DUP [MQTT-4.4.0-1]; neither
    is delivered twice."""
    cid, topic = "to-qos2", "takeover/qos2"
    with RawClient(node.worker(1)) as old:
        assert old.connect(cid, clean_start=False, properties=raw_persistent_props()).reason_code == 0
        old.subscribe(Subscription(topic, 2))
        pub = make("to-qos2-pub", broker=node.worker(3))
        pub.publish_many(topic, [b"rec", b"none"], qos=2)
        p1, p2 = old.expect(Publish), old.expect(Publish)
        old.send(Pubrec(p1.packet_id))
        assert old.expect(Pubrel).packet_id == p1.packet_id
        with RawClient(node.worker(2)) as new:
            ack = new.connect(cid, clean_start=False, properties=raw_persistent_props())
            assert (ack.reason_code, ack.session_present) == (0, True)
            expect_disconnect(old, {SESSION_TAKEN_OVER})
            got = [new.recv_packet(), new.recv_packet()]
            rels = [p for p in got if isinstance(p, Pubrel)]
            pubs = [p for p in got if isinstance(p, Publish)]
            assert [r.packet_id for r in rels] == [p1.packet_id], got
            assert [(p.packet_id, p.payload, p.qos, p.dup) for p in pubs] == [
                (p2.packet_id, b"none", 2, True)
            ]
            new.send(Pubcomp(p1.packet_id))
            new.send(Pubrec(p2.packet_id))
            assert new.expect(Pubrel).packet_id == p2.packet_id
            new.send(Pubcomp(p2.packet_id))
            new.expect_none(0.3)


def test_takeover_keeps_the_inbound_qos2_state(node: WorkerNode, make: ClientFactory) -> None:
    """A client's own QoS 2 PUBLISH that got PUBREC on worker 1 is released on worker 2 after a
    takeover: PUBCOMP with success (not 0x92, packet id not found), delivered exactly once."""
    cid, topic = "to-in-qos2", "takeover/inqos2"
    sub = make("to-in-qos2-sub", broker=node.worker(3))
    sub.subscribe(topic, 2)
    with RawClient(node.worker(1)) as old:
        assert old.connect(cid, clean_start=False, properties=raw_persistent_props()).reason_code == 0
        old.send(Publish(topic, b"once", qos=2, packet_id=7))
        assert old.expect(Pubrec).packet_id == 7
        with RawClient(node.worker(2)) as new:
            ack = new.connect(cid, clean_start=False, properties=raw_persistent_props())
            assert (ack.reason_code, ack.session_present) == (0, True)
            new.send(Pubrel(7))
            comp = new.expect(Pubcomp)
            assert (comp.packet_id, comp.reason_code) == (7, 0)
    assert [m.payload for m in sub.drain(0.5)] == [b"once"]


# -- retained -------------------------------------------------------------------------------


def test_retained_set_and_cleared_on_different_workers(
    node: WorkerNode, make: ClientFactory, version: int
) -> None:
    """Set on worker 1, a new subscriber on worker 3 gets it (retain flag set [MQTT-3.3.1-8]);
    cleared by an empty retained publish on worker 2 ([MQTT-3.3.1-10] 3.1.1, [MQTT-3.3.1-6]
    5.0), new subscribers on workers 4 and 1 get nothing."""
    topic = f"ret/w/{version}"
    make(f"ret-p1-{version}", broker=node.worker(1), version=version).publish(
        topic, b"kept", qos=1, retain=True
    )
    s3 = make(f"ret-s3-{version}", broker=node.worker(3), version=version)
    s3.subscribe(topic, 1)
    m = s3.expect_one()
    assert (m.payload, m.retain) == (b"kept", True)
    make(f"ret-p2-{version}", broker=node.worker(2), version=version).publish(topic, b"", qos=1, retain=True)
    for i in (4, 1):
        s = make(f"ret-s{i}-{version}", broker=node.worker(i), version=version)
        s.subscribe(topic, 1)
        s.expect_none(0.3)


def test_retained_messages_survive_a_worker_restart(fresh_node: WorkerNode) -> None:
    """Retained messages set on worker 1 and on worker 2 before worker 2 is SIGKILLed are
    delivered by the restarted worker 2 (and by worker 3) to new subscribers."""
    node = fresh_node
    with ClientFactory(node.shared) as make:
        make("rk-p1", broker=node.worker(1)).publish("rk/a", b"from w1", qos=1, retain=True)
        make("rk-p2", broker=node.worker(2)).publish("rk/b", b"from w2", qos=1, retain=True)
        check = make("rk-check", broker=node.worker(4))
        check.subscribe("rk/#", 1)
        assert sorted(m.payload for m in check.expect(2)) == [b"from w1", b"from w2"]
        old = node.kill_worker(2)
        node.wait_worker_restarted(2, old)
        for i in (2, 3):
            s = make(f"rk-s{i}", broker=node.worker(i))
            s.subscribe("rk/#", 1)
            got = {(m.topic, m.payload, m.retain) for m in s.expect(2)}
            assert got == {("rk/a", b"from w1", True), ("rk/b", b"from w2", True)}, f"worker {i}"
            s.expect_none(0.2)


# -- shared subscriptions -------------------------------------------------------------------


def _assert_each_once(got: list[list[Message]], n: int) -> None:
    missing, duplicates = missing_and_duplicates((s for msgs in got for s in seqs(msgs)), range(n))
    assert (missing, duplicates) == ([], []), f"lost {missing[:20]}, duplicated {duplicates[:20]}"
    assert all(got), f"a member got nothing: {[len(m) for m in got]}"
    for msgs in got:  # each member sees its share in publish order
        assert seqs(msgs) == sorted(seqs(msgs))


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_shared_group_spread_over_workers_gets_each_message_once(
    node: WorkerNode, make: ClientFactory, qos: int
) -> None:
    """`$share/g/t` with one member on each of workers 2, 3, 4 and the publisher on worker 1:
    300 messages, each delivered to exactly one member (spec 4.8.2), every member some."""
    n, topic = 300, f"shw/{qos}"
    members = [make(f"shw-m{i}-{qos}", broker=node.worker(i)) for i in (2, 3, 4)]
    for m in members:
        assert m.subscribe(f"$share/g/{topic}", qos) == [qos]
    make(f"shw-p-{qos}", broker=node.worker(1)).publish_many(topic, numbered(n), qos=qos, timeout_s=20)
    _assert_each_once(collect(members, n), n)


def test_shared_group_with_members_on_the_publishers_worker_and_another(
    node: WorkerNode, make: ClientFactory
) -> None:
    """Two members on worker 2 (one 3.1.1), one on worker 3, the publisher on worker 2, QoS 1:
    each of 300 messages once in the group; a plain subscriber on worker 4 gets all 300."""
    n, topic = 300, "shmix/t"
    members = [
        make("shmix-a", broker=node.worker(2)),
        make("shmix-b", broker=node.worker(2), version=4),
        make("shmix-c", broker=node.worker(3)),
    ]
    for m in members:
        assert m.subscribe(f"$share/mix/{topic}", 1) == [1]
    plain = make("shmix-plain", broker=node.worker(4))
    plain.subscribe(topic, 1)
    make("shmix-p", broker=node.worker(2)).publish_many(topic, numbered(n), qos=1, timeout_s=20)
    _assert_each_once(collect(members, n), n)
    got: list[Message] = []
    take_until(plain, got, n)
    assert seqs(got) == list(range(n))


# -- will, no local -------------------------------------------------------------------------


def test_will_of_a_client_on_one_worker_reaches_another(
    node: WorkerNode, make: ClientFactory, version: int
) -> None:
    """The will of a client on worker 1 whose connection drops is published [MQTT-3.1.2-8] to
    subscribers on worker 2 and on worker 1."""
    topic = f"will/w/{version}"
    watchers = [make(f"will-w{i}-{version}", broker=node.worker(i), version=version) for i in (2, 1)]
    for w in watchers:
        w.subscribe(topic, 1)
    will = {"topic": topic, "payload": b"gone", "qos": 1, "retain": False}
    dying = make(f"will-d-{version}", broker=node.worker(1), version=version, will=will)
    dying.close_abruptly()
    for w in watchers:
        m = w.expect_one()
        assert (m.topic, m.payload, m.qos) == (topic, b"gone", 1)


def test_no_local_across_workers(node: WorkerNode, make: ClientFactory) -> None:
    """No Local [MQTT-3.8.3-3]: the publisher's own subscription gets nothing of its own, while
    subscribers on its worker and on other workers get it; and the option moves with the
    session when the client is taken over onto another worker."""
    topic = "nolocal/w"
    a = make("nl-a", broker=node.worker(1), clean_start=False, session_expiry_s=300)
    a.subscribe(topic, 1, options={"no_local": True})
    same = make("nl-same", broker=node.worker(1))
    other = make("nl-other", broker=node.worker(2))
    for c in (same, other):
        c.subscribe(topic, 1)
    a.publish(topic, b"from a on w1", qos=1)
    for c in (same, other):
        assert c.expect_one().payload == b"from a on w1"
    a.expect_none(0.3)
    other.publish(topic, b"from other", qos=1)
    assert a.expect_one().payload == b"from other"
    for c in (same, other):
        assert c.expect_one().payload == b"from other"
    a2 = make("nl-a", broker=node.worker(3), clean_start=False, session_expiry_s=300)
    assert a2.connack.session_present is True
    a2.publish(topic, b"from a on w3", qos=1)
    for c in (same, other):
        assert c.expect_one().payload == b"from a on w3"
    # What a2 may get is a resend (DUP) of "from other" if a's PUBACK had not reached the broker
    # before the takeover [MQTT-4.4.0-1]; never its own message.
    got = a2.drain(quiet_s=0.3)
    assert all(m.dup and m.payload == b"from other" for m in got), got


# -- a worker dies, the node stops -----------------------------------------------------------


class _Stream:
    """A QoS 1 publisher in a thread: one message at a time, each acknowledged before the next,
    numbered from 0, until `stop()` (or `max_count`, a safety bound)."""

    def __init__(self, pub: TestClient, topic: str, pause_s: float = 0.005, max_count: int = 5000) -> None:
        self.pub, self.topic, self.pause_s, self.max_count = pub, topic, pause_s, max_count
        self.acked = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stream-{topic}", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.acked < self.max_count:
                self.pub.publish(self.topic, str(self.acked).encode(), qos=1, timeout_s=10)
                self.acked += 1
                time.sleep(self.pause_s)
        except BaseException as exc:  # handed to the test's thread by stop()
            self.error = exc

    def start(self) -> _Stream:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop after the message in flight; raise what the thread raised; the count acked."""
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "publisher thread still running"
        if self.error is not None:
            raise self.error
        return self.acked


def test_killed_worker_is_restarted_and_the_others_are_undisturbed(fresh_node: WorkerNode) -> None:
    """SIGKILL of worker 2: the supervisor logs it and restarts it; its clients lose their
    connection (no DISCONNECT: the process is gone), reconnect to the shared port or to worker
    2's port and work across workers; a QoS 1 stream from worker 1 to worker 3 running all the
    while loses nothing and keeps its order."""
    node = fresh_node
    with ClientFactory(node.shared) as make:
        sub = make("st-sub", broker=node.worker(3))
        sub.subscribe("stream/t", 1)
        k_shared = make("k-shared", broker=node.worker(2))
        k_port = make("k-port", broker=node.worker(2))
        stream = _Stream(make("st-pub", broker=node.worker(1)), "stream/t").start()
        got: list[Message] = []
        take_until(sub, got, 50)
        old = node.kill_worker(2)
        assert k_shared.wait_disconnected() is None
        assert k_port.wait_disconnected() is None
        node.wait_worker_restarted(2, old)
        assert "worker 2 exited" in node.log()
        k1 = make("k-shared", broker=node.shared)
        k2 = make("k-port", broker=node.worker(2))
        for k in (k1, k2):
            k.subscribe("back/t", 1)
        make("back-pub", broker=node.worker(4)).publish("back/t", b"hello", qos=1)
        for k in (k1, k2):
            assert k.expect_one().payload == b"hello"
        from_w2 = make("from-w2", broker=node.worker(4))
        from_w2.subscribe("from2/t", 1)
        k2.publish("from2/t", b"out of w2", qos=1)
        assert from_w2.expect_one().payload == b"out of w2"
        n = stream.stop()
        take_until(sub, got, n, timeout_s=10)
        missing, duplicates = missing_and_duplicates(seqs(got), range(n))
        assert (missing, duplicates) == ([], []), f"lost {missing[:20]}, duplicated {duplicates[:20]}"
        assert seqs(got) == list(range(n))
        sub.expect_none(0.2)


def test_shared_members_of_a_killed_worker_leave_the_group(fresh_node: WorkerNode) -> None:
    """After worker 2 is killed and restarted, its dead members are out of the shared group: the
    member left on worker 3 gets every QoS 1 message."""
    node = fresh_node
    with ClientFactory(node.shared) as make:
        dead = make("shk-dead", broker=node.worker(2))
        live = make("shk-live", broker=node.worker(3))
        for m in (dead, live):
            m.subscribe("$share/k/shk/t", 1)
        old = node.kill_worker(2)
        node.wait_worker_restarted(2, old)
        make("shk-p", broker=node.worker(1)).publish_many("shk/t", numbered(50), qos=1)
        got: list[Message] = []
        take_until(live, got, 50)
        assert seqs(got) == list(range(50))


def test_persistent_subscriber_on_a_killed_worker_gets_every_qos1_message(durable_node: WorkerNode) -> None:
    """Durability: a persistent subscriber on worker 2 while worker 2 is SIGKILLed mid-stream
    gets, after reconnecting, every QoS 1 message that the broker acknowledged to the publisher
    (duplicates allowed, QoS 1 is at least once), and its session is present."""
    node = durable_node
    with ClientFactory(node.shared) as make:
        k = make("dur-k", broker=node.worker(2), clean_start=False, session_expiry_s=300)
        k.subscribe("dur/t", 1)
        stream = _Stream(make("dur-pub", broker=node.worker(1)), "dur/t").start()
        got: list[Message] = []
        take_until(k, got, 30)
        old = node.kill_worker(2)
        k.wait_disconnected()
        node.wait_worker_restarted(2, old)
        time.sleep(0.3)  # pacing: let the stream go on past the restart
        n = stream.stop()
        k2 = make("dur-k", broker=node.worker(2), clean_start=False, session_expiry_s=300)
        assert k2.connack.session_present is True
        deadline = time.monotonic() + 10
        while (missing := missing_and_duplicates(seqs(got), range(n))[0]) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                got.append(k2.messages.get(timeout=0.1))
        assert missing == [], f"lost {len(missing)} of {n}: {missing[:20]}"


def _live_members(pgid: int) -> list[int]:
    """Pids of the processes of group `pgid` that are not zombies (a zombie has exited; its
    reaping is up to whoever adopted it)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _assert_no_process_left(pgid: int) -> None:
    deadline = time.monotonic() + 3
    while left := _live_members(pgid):
        if time.monotonic() > deadline:
            os.killpg(pgid, signal.SIGKILL)  # our own node's group: leave nothing behind
            raise AssertionError(f"processes {left} of the node still ran after it exited")
        time.sleep(0.05)


def _clients_on_every_worker(node: WorkerNode, make: ClientFactory) -> tuple[list[TestClient], TestClient]:
    v5 = [make(f"drain-{i}", broker=node.worker(i)) for i in range(1, WORKERS + 1)]
    v311 = make("drain-311", broker=node.worker(2), version=4)
    return v5, v311


@pytest.mark.parametrize("how", ["sigterm-supervisor", "sigint-process-group"])
def test_node_drains_on_signal(draining_node: WorkerNode, how: str) -> None:
    """SIGTERM to the supervisor (as `kill` or an orchestrator sends) or SIGINT to the whole
    process group (Ctrl-C in a terminal): every v5 client on every worker gets DISCONNECT 0x8B,
    a 3.1.1 client is closed, a client with an unacknowledged message is not waited for, the
    node exits 0 within its `ShutdownGrace` and leaves no process behind."""
    node = draining_node
    proc = node.broker.proc
    assert proc is not None
    with (
        ClientFactory(node.shared) as make,
        connected(node.worker(3), "drain-raw", properties=raw_persistent_props()) as stubborn,
    ):
        v5, v311 = _clients_on_every_worker(node, make)
        stubborn.subscribe(Subscription("drain/t", 1))
        make("drain-pub", broker=node.worker(1)).publish("drain/t", b"never acked", qos=1)
        stubborn.expect(Publish)
        started = time.monotonic()
        if how == "sigterm-supervisor":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        for c in v5:
            assert c.wait_disconnected(SHUTDOWN_GRACE_S) == SERVER_SHUTTING_DOWN, c.client_id
        assert v311.wait_disconnected(SHUTDOWN_GRACE_S) is None
        expect_disconnect(stubborn, {SERVER_SHUTTING_DOWN}, timeout_s=SHUTDOWN_GRACE_S)
        deadline_s = SHUTDOWN_GRACE_S + EXIT_SLACK_S
        try:
            rc = proc.wait(max(0.1, deadline_s - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the node still ran {deadline_s}s after the signal") from None
        assert rc == 0, f"exit status {rc}"
        _assert_no_process_left(proc.pid)
