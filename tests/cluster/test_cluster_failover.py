"""Tier-1 cluster failover tests (issue 5): takeover races, takeover across nodes, a node SIGKILLed
under a QoS 1 stream (a subscriber's node, the publisher's node, and the publisher's node with its
relay frozen first), mDNS on loopback, and a node that comes back.

Why: the cluster's promises that matter when something goes wrong are "a client id is connected
at most once in the whole cluster, also when two CONNECTs race on two nodes" and "a QoS 1
message acknowledged to its publisher is not lost for a persistent subscriber, even when a node
dies" (DESIGN.md, "Session takeover", "Durability promise", "A dead node"; mesh/PROTOCOL.md,
"The cluster plane"). These tests check them on real nodes (127.0.0.2.., one PostgreSQL) with
real clients, as a user would see them.

Must not: sleep-and-hope (every wait is bounded and ends on a condition; `expect_none` is the one
deliberate silence, where silence is the assertion); use fixed ports or names (the harness picks
them); send traffic anywhere but loopback (mDNS only on 127.0.0.1).

Invariants: each test builds its own cluster (`cluster_factory`), which the fixture stops even
when the test fails; every client is closed at the end of its test.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from broker.protocol.packets import Packet, Puback
from tests.cluster.conftest import ClusterFactory
from tests.cluster.failover_helpers import (
    Receiver,
    StreamPublisher,
    close_all,
    freeze_child,
    race_round,
    wait_delivered,
    wait_until,
)
from tests.cluster.nodes import CLUSTER_READY, Cluster, Node
from tests.e2e.clients import TestClient
from tests.e2e.rawclient import RawClient

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.e2e,
    pytest.mark.postgres,
    pytest.mark.skipif(not CLUSTER_READY, reason="mesh/cluster.py does not exist yet"),
]

SESSION_TAKEN_OVER = 0x8E
RACE_ROUNDS = 50  # per parameter: 100 in all
MAX_BAD_ROUNDS = 3
STREAM_TOTAL = 3000
# Room for the whole stream in every session's queue: a subscriber that falls behind for a while
# (2 shared cores) must not lose messages to the queue limit (`MQTT.MaxQueuedMessages`, dropped
# and counted by design), or a loss here would not be about failover.
STREAM_CONFIG = {"MQTT": {"MaxQueuedMessages": 4 * STREAM_TOTAL}}


@pytest.fixture
def clients() -> Iterator[list[TestClient]]:
    """Every `TestClient` a test appends here is closed at teardown."""
    made: list[TestClient] = []
    yield made
    close_all(made)


def connect(made: list[TestClient], node: Node, client_id: str, **kw: Any) -> TestClient:
    """A connected v5 `TestClient` on `node` (closed at teardown); CONNACK must be 0."""
    c = TestClient(node, client_id, **kw)
    made.append(c)
    ack = c.connect()
    assert ack.reason_code == 0, f"{client_id} on {node.name}: CONNACK {ack.reason_code:#x}"
    return c


def persistent(made: list[TestClient], node: Node, client_id: str, **kw: Any) -> TestClient:
    """A v5 client with a persistent session (clean start 0, Session Expiry Interval 300 s)."""
    return connect(made, node, client_id, clean_start=False, session_expiry_s=300, **kw)


def started(cluster_factory: ClusterFactory, **kw: object) -> Cluster:
    c = cluster_factory(**kw)
    c.wait_members(timeout_s=20)
    return c


# --- takeover -----------------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "clean_start",
    [
        pytest.param(True, id="clean-start-1"),
        pytest.param(False, id="clean-start-0"),
    ],
)
def test_takeover_races_leave_at_most_one_live_session(
    cluster_factory: ClusterFactory, clean_start: bool
) -> None:
    """50 rounds (x 2 parameters: clean start 1; clean start 0 with session expiry 300): one
    client id CONNECTs on n1 and n2 at the same moment. Once both are answered and things
    settle, at most one connection answers PINGREQ, and exactly one when neither CONNECT was
    refused (issue 5: "the loser is the older epoch, always"). Stops at the third bad round."""
    c = started(cluster_factory, n=3)
    n1, n2 = c.node(1), c.node(2)
    kinds: Counter[str] = Counter()
    failures: list[str] = []
    unusual: list[str] = []
    settle_ms: list[float] = []
    started_at = time.monotonic()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="race") as pool:
        for r in range(RACE_ROUNDS):
            result = race_round(
                pool, [(n1.name, n1), (n2.name, n2)], f"race-{int(clean_start)}-{r}", clean_start
            )
            kinds[" ".join(sorted(o.kind for o in result.outcomes)) + f" live={len(result.live)}"] += 1
            line = f"round {r}: {result.describe()}"
            if len(result.live) > 1 or (not result.refused() and len(result.live) != 1):
                failures.append(line)
                if len(failures) >= MAX_BAD_ROUNDS:
                    break
                continue
            settle_ms.append(result.settle_ms)
            if any(o.kind == "closed" for o in result.outcomes):
                unusual.append(line)
    elapsed_s = time.monotonic() - started_at
    print(
        f"{r + 1} takeover races in {elapsed_s:.1f}s: {dict(kinds)}; slowest settle {max(settle_ms, default=0):.0f}ms"
    )
    for line in unusual:
        print(f"closed without CONNACK: {line}")
    assert not failures, (
        "bad rounds (at most one live connection, exactly one unless refused):\n" + "\n".join(failures)
    )


def test_takeover_across_nodes_keeps_the_session(
    cluster_factory: ClusterFactory, clients: list[TestClient]
) -> None:
    """A persistent client subscribed on n1 reconnects to n3 (clean start 0): CONNACK session
    present 1 [MQTT-3.2.2-2], the n1 connection gets DISCONNECT 0x8E (session taken over), and
    what is published on n2 arrives on the n3 connection with no new SUBSCRIBE."""
    c = started(cluster_factory, n=3)
    n1, n2, n3 = c.node(1), c.node(2), c.node(3)
    old = persistent(clients, n1, "mover")
    assert old.subscribe("move/#", qos=1) == [1]
    new = persistent(clients, n3, "mover")
    assert new.connack.session_present, "the session made on n1 was not found on n3"
    assert old.wait_disconnected(timeout_s=10) == SESSION_TAKEN_OVER
    pub = connect(clients, n2, "mover-pub")
    payloads = [f"m{i}".encode() for i in range(5)]
    for p in payloads:
        assert pub.publish("move/x", p, qos=1) < 0x80
    got = new.expect(len(payloads), timeout_s=10)
    assert [m.payload for m in got] == payloads
    assert all(m.topic == "move/x" and m.qos == 1 for m in got)


# --- a node killed under a QoS 1 stream ----------------------------------------------------------


def _subscribe_streams(clients: list[TestClient], c: Cluster, prefix: str) -> dict[int, Receiver]:
    """A persistent QoS 1 subscriber to `s/#` on every node i, client id `<prefix>-<i>`."""
    receivers: dict[int, Receiver] = {}
    for nd in c.nodes:
        r = Receiver(f"{prefix}-{nd.index}")
        sub = r.add(persistent(clients, nd, r.name))
        assert sub.subscribe("s/#", qos=1) == [1]
        receivers[nd.index] = r
    return receivers


def _kill_mid_stream(pub: StreamPublisher, victim: Node) -> int:
    """SIGKILL `victim` once half the stream is acknowledged; the acknowledged count at the kill."""
    wait_until(
        lambda: len(pub.acked) >= STREAM_TOTAL // 2 or pub.closed or pub.error, 30, "half the stream acked"
    )
    at_kill = len(pub.acked)
    victim.kill()
    return at_kill


def _resume(clients: list[TestClient], r: Receiver, node: Node, timeout_s: float = 20.0) -> TestClient:
    """Reconnect `r`'s client id (clean start 0) to `node`, retrying a refusal (e.g. 0x89 while
    the cluster still settles the dead node) as a real client would, within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        new = TestClient(node, r.name, clean_start=False, session_expiry_s=300)
        clients.append(new)
        try:
            ack = new.connect(timeout_s=max(0.5, deadline - time.monotonic()))
        except ConnectionError:
            ack = None
        if ack is not None and ack.reason_code == 0:
            assert ack.session_present, f"{r.name}: session lost on reconnect to {node.name}"
            return r.add(new)
        new.close()
        if time.monotonic() >= deadline:
            raise AssertionError(f"{r.name}: no successful reconnect to {node.name} in {timeout_s}s ({ack})")
        time.sleep(0.1)  # a client's reconnect backoff


def _assert_no_losses(receivers: dict[int, Receiver], acked: set[int], label: str) -> None:
    checks = wait_delivered(list(receivers.values()), acked, timeout_s=30)
    for name, check in checks.items():
        print(f"{label} {name}: {check.summary()}")
    lost = {name: list(check.missing[:10]) for name, check in checks.items() if check.missing}
    assert not lost, f"PUBACKed messages lost (first 10 per subscriber): {lost}"


@pytest.mark.timeout(90)
def test_subscriber_node_killed_under_qos1_stream_loses_nothing(
    cluster_factory: ClusterFactory, clients: list[TestClient]
) -> None:
    """Persistent QoS 1 subscribers on n1, n2, n3; a numbered QoS 1 stream from n1; n3 is
    SIGKILLed midway and its subscriber resumes on n2: every subscriber gets every PUBACKed
    number at least once (DESIGN.md, "Durability promise"; duplicates are counted, allowed)."""
    c = started(cluster_factory, n=3, extra=STREAM_CONFIG)
    n2, n3 = c.node(2), c.node(3)
    receivers = _subscribe_streams(clients, c, "ks")
    pub = StreamPublisher(c.node(1), "ks-pub", "s/stream", STREAM_TOTAL).start()
    try:
        at_kill = _kill_mid_stream(pub, n3)
        assert at_kill < STREAM_TOTAL, "the stream ended before the kill: not a kill under a stream"
        assert receivers[3].connections[0].wait_disconnected(timeout_s=10) is None  # a crash: no DISCONNECT
        _resume(clients, receivers[3], n2)
        pub.join(60)
    finally:
        pub.close()
    assert not pub.closed, "the publisher's node (n1) closed its connection"
    assert pub.acked == set(range(STREAM_TOTAL)), f"refused: {dict(list(pub.refused.items())[:10])}"
    print(f"n3 killed at {at_kill} acked of {STREAM_TOTAL}")
    _assert_no_losses(receivers, pub.acked, "subscriber-node kill")


@pytest.mark.timeout(90)
def test_publisher_node_killed_mid_stream_loses_no_acked_message(
    cluster_factory: ClusterFactory, clients: list[TestClient]
) -> None:
    """The publisher's own node (n3) is SIGKILLed mid-stream: every number it got a PUBACK for
    reaches every persistent subscriber (n3's after resuming on n1), and the will of a client of
    n3 is published by a survivor exactly once."""
    c = started(cluster_factory, n=3, extra=STREAM_CONFIG)
    n1, n3 = c.node(1), c.node(3)
    receivers = _subscribe_streams(clients, c, "kp")
    wills = connect(clients, n1, "kp-wills")
    assert wills.subscribe("w/#", qos=1) == [1]
    connect(clients, n3, "kp-dying", will={"topic": "w/kp-dying", "payload": b"gone", "qos": 1})
    pub = StreamPublisher(n3, "kp-pub", "s/stream", STREAM_TOTAL).start()
    try:
        at_kill = _kill_mid_stream(pub, n3)
        assert 0 < at_kill < STREAM_TOTAL, f"{at_kill} acked at the kill: not a kill mid-stream"
        pub.join(30)
    finally:
        pub.close()
    assert pub.closed, "the publisher's connection outlived its node"
    assert not pub.refused, f"refused: {dict(list(pub.refused.items())[:10])}"
    _resume(clients, receivers[3], n1)
    will = wills.expect_one(timeout_s=10)  # published by a survivor once n3 is DEAD
    assert (will.topic, will.payload) == ("w/kp-dying", b"gone")
    wills.expect_none(within_s=1.0)  # exactly once: no second survivor publishes it again
    print(f"n3 killed at {at_kill} acked; {len(pub.acked)} acked, {pub.sent} sent of {STREAM_TOTAL}")
    # (a number PUBACKed just before the kill may reach n1's and n2's online subscribers only
    # through the store: the survivors' workers re-read their rows, see `rescan` in PROTOCOL.md)
    _assert_no_losses(receivers, pub.acked, "publisher-node kill")


def test_acked_message_of_a_node_dying_before_forwarding_reaches_online_subscriber(
    cluster_factory: ClusterFactory, clients: list[TestClient]
) -> None:
    """The deterministic form of the publisher-node kill: n3's relay is frozen (SIGSTOP), so
    whatever n3 acknowledges now cannot leave the node; n3 is then SIGKILLed. A message n3 did
    PUBACK must still reach the persistent subscriber that stays online on n1 (DESIGN.md,
    "Durability promise"); one it did not PUBACK is not promised."""
    c = started(cluster_factory, n=3)
    n1, n3 = c.node(1), c.node(3)
    sub = persistent(clients, n1, "fz-sub")
    assert sub.subscribe("fz/#", qos=1) == [1]
    with RawClient(n3) as pub:
        assert pub.connect("fz-pub").reason_code == 0
        before = pub.publish("fz/x", b"before", qos=1)
        assert isinstance(before, Puback) and before.reason_code == 0
        assert sub.expect_one(timeout_s=10).payload == b"before"  # the route is in force
        freeze_child(n3, "relay")
        try:
            ack: Packet | None = pub.publish("fz/x", b"frozen", qos=1, timeout_s=3)
        except TimeoutError:
            ack = None  # held back until it is safe: nothing promised, nothing to check
        n3.kill()
    if isinstance(ack, Puback) and ack.reason_code < 0x80:
        m = sub.expect_one(timeout_s=8)  # n3 is DEAD after 1.5 s: room to recover and deliver
        assert m.payload == b"frozen"


# --- discovery and rejoin --------------------------------------------------------------------------


def test_mdns_cluster_forms_on_loopback_and_routes(
    cluster_factory: ClusterFactory, clients: list[TestClient]
) -> None:
    """Three nodes that know nothing of each other but mDNS on 127.0.0.1 form one cluster and
    route a QoS 1 message from n1 to a subscriber on n3."""
    c = started(cluster_factory, n=3, mdns=True)
    sub = connect(clients, c.node(3), "md-sub")
    assert sub.subscribe("md/#", qos=1) == [1]
    pub = connect(clients, c.node(1), "md-pub")
    assert pub.publish("md/x", b"found", qos=1) < 0x80
    m = sub.expect_one(timeout_s=10)
    assert (m.topic, m.payload, m.qos) == ("md/x", b"found", 1)


def test_node_that_comes_back_gets_routes_and_retained(
    cluster_factory: ClusterFactory, clients: list[TestClient]
) -> None:
    """n2 is killed, seen DEAD by n1 and n3, and restarted: after it rejoins, a subscriber on n2
    gets what is published on n1, and the retained message set while n2 was down."""
    c = started(cluster_factory, n=3)
    n1, n2 = c.node(1), c.node(2)
    n2.kill()
    for survivor in (1, 3):
        c.wait_log(survivor, r"node n2 is DEAD", timeout_s=10)
    c.wait_members(timeout_s=10)
    pub = connect(clients, n1, "back-pub")
    assert pub.publish("back/kept", b"while-down", qos=1, retain=True) < 0x80
    n2.restart()
    c.wait_members(timeout_s=20)
    sub = connect(clients, n2, "back-sub")
    assert sub.subscribe("back/#", qos=1) == [1]
    kept = sub.expect_one(timeout_s=5)
    assert (kept.topic, kept.payload, kept.retain) == ("back/kept", b"while-down", True)
    assert pub.publish("back/live", b"after", qos=1) < 0x80
    live = sub.expect_one(timeout_s=10)
    assert (live.topic, live.payload, live.retain) == ("back/live", b"after", False)
