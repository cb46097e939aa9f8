"""Tier-1 cluster routing: real nodes on 127.0.0.x, real MQTT clients, one broker to the clients.

Why: issue 5 promises that a client may connect to any node and sees one broker. These tests
start 2-3 real nodes (`tests/cluster/nodes.py`) and check, through the MQTT clients only, that
publishes reach subscribers on every node exactly once and in order for QoS 0, 1 and 2 (MQTT 5
and 3.1.1, one and two workers per node), wildcards and the '$' rule, unsubscribe, that a
subscription is in force cluster-wide at its SUBACK, retained messages, wills, shared
subscriptions, a node that joins late, CURVE admission, and the graceful drain of a node.

How the tests know without sleeping: every wait is bounded and waits on an event. Where the
claim is "nothing arrives", a *fence* proves it: a later message on the same path (same
publisher, same pair of nodes, so it travels behind whatever came before) is awaited, and it must
be the next thing the subscriber gets.

Must not: sleep and hope (the only fixed-length waits are where silence is the assertion and no
fence exists: the CURVE test's 3 s watch, and 0.3 s of quiet after the shared-subscription run,
whose duplicates could come from any node); use fixed ports or names (the harness picks them);
send traffic anywhere but loopback; leave a client or a node behind (fixtures close them).

Invariants: each test starts its own cluster on its own database, so client ids and topics are
free per test; every client is made by the `clients` fixture and closed before the cluster stops.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import pytest
import zmq.auth

from broker.protocol.packets import Disconnect, Packet, Will
from tests.cluster.conftest import ClusterFactory
from tests.cluster.nodes import Cluster, Node, parse_view
from tests.e2e.clients import ClientFactory, Message, TestClient
from tests.e2e.rawclient import RawClient, connected

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(90)]

MEMBERS_TIMEOUT_S: Final = 20.0
DELIVERY_TIMEOUT_S: Final = 10.0


class _NoDefaultBroker:
    """The `clients` factory has no default broker: every client names its node (`broker=`)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"no default broker ({name}): pass broker=<node> to the clients factory")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(name)

    host: str
    port: int


@pytest.fixture
def clients(cluster_factory: ClusterFactory) -> Iterator[ClientFactory]:
    """Makes connected paho clients (`clients("id", broker=node, version=4)`); all closed at
    teardown, before the clusters stop (it depends on `cluster_factory`, so it is torn down first)."""
    with ClientFactory(_NoDefaultBroker()) as make:
        yield make


def started(cluster_factory: ClusterFactory, **kwargs: Any) -> Cluster:
    """A started cluster whose every node sees every other node."""
    cluster = cluster_factory(**kwargs)
    cluster.wait_members(timeout_s=MEMBERS_TIMEOUT_S)
    return cluster


def shown(messages: list[Message]) -> list[tuple[str, bytes]]:
    return [(m.topic, m.payload) for m in messages]


def expect_until(client: TestClient, last: tuple[str, bytes], limit: int = 1000) -> list[Message]:
    """Every message that comes before the fence `last` (topic, payload); the fence is consumed."""
    got: list[Message] = []
    for _ in range(limit):
        m = client.expect_one(DELIVERY_TIMEOUT_S)
        if (m.topic, m.payload) == last:
            return got
        got.append(m)
    raise AssertionError(f"{client.client_id}: no fence {last} among {limit} messages: {shown(got)[:20]}")


def all_views(node: Node) -> list[frozenset[str]]:
    """Every `cluster view` the node's current log shows, in order."""
    return [view for line in node.log().splitlines() if (view := parse_view(line)) is not None]


# --- publish on every node, subscribe on every node -------------------------------------------


def fan_out(
    pubs: list[TestClient],
    subs: list[TestClient],
    tag: str,
    count: int = 10,
    qos_levels: tuple[int, ...] = (0, 1, 2),
) -> None:
    """For each QoS: every subscriber subscribes `fan/<tag>/q<qos>/#` at that QoS, then every
    publisher sends `count` messages on its own topic; each subscriber must get every message
    exactly once, at that QoS, in publish order per publisher. A last QoS 1 `end` from each
    publisher fences the whole run: stray copies of earlier messages would come before it."""
    fence = f"fan/{tag}/end"
    for s in subs:
        assert s.subscribe(fence, 1) == [1]
    for qos in qos_levels:
        prefix = f"fan/{tag}/q{qos}"
        for s in subs:
            assert s.subscribe(f"{prefix}/#", qos) == [qos], s.client_id
        for p_index, p in enumerate(pubs):
            p.publish_many(f"{prefix}/p{p_index}", [f"{p_index}:{k}".encode() for k in range(count)], qos)
        for s in subs:
            got = s.expect(len(pubs) * count, DELIVERY_TIMEOUT_S)
            per_publisher: dict[int, list[int]] = {p_index: [] for p_index in range(len(pubs))}
            for m in got:
                p_text, k_text = m.payload.decode().split(":")
                assert m.topic == f"{prefix}/p{p_text}", (s.client_id, m.topic, m.payload)
                assert m.qos == qos, (s.client_id, qos, m.topic, m.payload, m.qos)
                per_publisher[int(p_text)].append(int(k_text))
            for p_index, ks in per_publisher.items():
                assert ks == list(range(count)), (
                    f"{s.client_id} (QoS {qos}) from publisher {p_index} ({pubs[p_index].client_id}): {ks}"
                )
    for p in pubs:
        p.publish(fence, p.client_id, 1)
    for s in subs:
        got = s.expect(len(pubs), DELIVERY_TIMEOUT_S)
        assert sorted(m.payload for m in got) == sorted(p.client_id.encode() for p in pubs), (
            f"{s.client_id}: after the last round got {shown(got)}"
        )


def test_publish_on_each_node_reaches_every_node_once_in_order(
    cluster_factory: ClusterFactory, clients: ClientFactory
) -> None:
    """QoS 0, 1, 2 on 3 nodes with 1 worker each: on every node a 5.0 and a 3.1.1 publisher and
    subscriber; every subscriber gets every message of every publisher once, in order per publisher."""
    cluster = started(cluster_factory, n=3, workers=1)
    subs = [clients(f"sub{nd.index}v{v}", broker=nd, version=v) for nd in cluster.nodes for v in (5, 4)]
    pubs = [clients(f"pub{nd.index}v{v}", broker=nd, version=v) for nd in cluster.nodes for v in (5, 4)]
    fan_out(pubs, subs, tag="w1")


def worker_of(cluster: Cluster, node: Node, client_id: str) -> int:
    """The worker (1..) of `node` that holds `client_id`, from the node's `connected` log line."""
    found = cluster.wait_log(
        node, rf"worker-(\d+) \S+: client '{re.escape(client_id)}' connected from", timeout_s=5
    )
    return int(found.group(1))


def spread_clients(
    cluster: Cluster, clients: ClientFactory, node: Node, prefix: str, at_least: int, limit: int = 16
) -> list[TestClient]:
    """At least `at_least` clients on `node` (5.0 and 3.1.1 alternately), more if needed until
    every worker holds one (the kernel's SO_REUSEPORT choice is random; `limit` bounds it)."""
    made: list[TestClient] = []
    workers: set[int] = set()
    for k in range(limit):
        c = clients(f"{prefix}{node.index}.{k}", broker=node, version=5 if k % 2 else 4)
        made.append(c)
        workers.add(worker_of(cluster, node, c.client_id))
        if len(made) >= at_least and len(workers) == cluster.workers:
            return made
    raise AssertionError(f"{node.name}: {limit} clients all landed on workers {sorted(workers)}")


def test_publish_fan_out_with_two_workers_per_node(
    cluster_factory: ClusterFactory, clients: ClientFactory
) -> None:
    """The same with 2 workers on every node: per node at least 4 subscribers and 2
    publishers, 5.0 and 3.1.1, with subscribers and publishers on both workers of every node."""
    cluster = started(cluster_factory, n=3, workers=2)
    subs = [c for nd in cluster.nodes for c in spread_clients(cluster, clients, nd, "sub", at_least=4)]
    pubs = [c for nd in cluster.nodes for c in spread_clients(cluster, clients, nd, "pub", at_least=2)]
    fan_out(pubs, subs, tag="w2", count=8)


# --- filters ---------------------------------------------------------------------------------


def test_wildcards_across_nodes_and_the_dollar_rule(
    cluster_factory: ClusterFactory, clients: ClientFactory
) -> None:
    """`+` and `#` match across nodes; `#` and `+/...` never match `$SYS/...` [MQTT-4.7.2-1],
    which only a `$SYS/#` subscriber gets. Publishers on nodes 1 and 2, each run fenced."""
    cluster = started(cluster_factory, n=3)
    n1, n2, n3 = cluster.nodes
    filters = {
        "plus": (n3, "wc/+/b"),
        "hash": (n2, "wc/#"),
        "all": (n3, "#"),
        "plus_first": (n1, "+/+/b"),
        "sys": (n2, "$SYS/#"),
    }
    subs = {name: clients(name, broker=nd) for name, (nd, _) in filters.items()}
    for name, (_, topic_filter) in filters.items():
        assert subs[name].subscribe(topic_filter, 1) == [1]
        if name != "all":  # "#" gets the fence anyway; a second matching filter could double it
            assert subs[name].subscribe("fence", 1) == [1]
    topics = ["wc/a/b", "wc/a/c", "wc", "wc/a/b/c", "x/y/b", "$SYS/y/b", "$SYS/wc/a/b"]
    expected = {
        "plus": ["wc/a/b"],
        "hash": ["wc/a/b", "wc/a/c", "wc", "wc/a/b/c"],  # "wc/#" matches its parent "wc" [MQTT-4.7.1-2]
        "all": ["wc/a/b", "wc/a/c", "wc", "wc/a/b/c", "x/y/b"],
        "plus_first": ["wc/a/b", "x/y/b"],
        "sys": ["$SYS/y/b", "$SYS/wc/a/b"],
    }
    for pub_node in (n1, n2):
        pub = clients(f"pub{pub_node.index}", broker=pub_node)
        for topic in topics:
            pub.publish(topic, pub.client_id, 1)
        pub.publish("fence", pub.client_id, 1)
        for name, sub in subs.items():
            got = expect_until(sub, ("fence", pub.client_id.encode()))
            # (the nodes' own $SYS/meshmq/<node>/... figures reach "$SYS/#" too: not this test's)
            got = [m for m in got if not m.topic.startswith("$SYS/meshmq/")]
            assert shown(got) == [(t, pub.client_id.encode()) for t in expected[name]], (
                f"{name} ({filters[name][1]} on {filters[name][0].name}) from {pub_node.name}"
            )


def test_unsubscribe_on_node_2_stops_delivery_from_node_1(
    cluster_factory: ClusterFactory, clients: ClientFactory
) -> None:
    """After UNSUBACK on node 2, a publish on node 1 still reaches node 3's subscriber but not
    node 2's; node 2's next message is the control message published after it."""
    cluster = started(cluster_factory, n=3)
    n1, n2, n3 = cluster.nodes
    leaver = clients("leaver", broker=n2)
    stayer = clients("stayer", broker=n3)
    pub = clients("pub", broker=n1)
    for qos in (0, 1):
        topic = f"un/q{qos}"
        assert leaver.subscribe("ctl/#", 1) == [1]
        assert leaver.subscribe("un/#", qos) == [qos]
        assert stayer.subscribe("un/#", qos) == [qos]
        pub.publish(topic, b"before", qos)
        assert shown([leaver.expect_one(DELIVERY_TIMEOUT_S)]) == [(topic, b"before")]
        assert shown([stayer.expect_one(DELIVERY_TIMEOUT_S)]) == [(topic, b"before")]
        assert leaver.unsubscribe("un/#") in ([], [0])  # 3.1.1: no codes; 5.0: Success
        pub.publish(topic, b"after", qos)
        pub.publish("ctl/x", f"control {qos}", 1)
        assert shown([stayer.expect_one(DELIVERY_TIMEOUT_S)]) == [(topic, b"after")]
        assert shown([leaver.expect_one(DELIVERY_TIMEOUT_S)]) == [("ctl/x", f"control {qos}".encode())]


def test_subscription_in_force_cluster_wide_at_suback(
    cluster_factory: ClusterFactory, clients: ClientFactory
) -> None:
    """Subscribe on node 3, publish QoS 1 on node 1 right after the SUBACK: 20 rounds with fresh
    topics (exact filters and `+` filters alternately), each message always arrives."""
    cluster = started(cluster_factory, n=3)
    n1, _, n3 = cluster.nodes
    sub = clients("sub", broker=n3)
    pub = clients("pub", broker=n1)
    for r in range(20):
        topic = f"fresh/{r}/t"
        assert sub.subscribe(topic if r % 2 else f"fresh/{r}/+", 1) == [1]
        pub.publish(topic, str(r), 1)
        m = sub.expect_one(DELIVERY_TIMEOUT_S)
        assert (m.topic, m.payload) == (topic, str(r).encode()), f"round {r}"


# --- retained, wills, shared ----------------------------------------------------------------


def test_retained_set_and_cleared_across_nodes(
    cluster_factory: ClusterFactory, clients: ClientFactory
) -> None:
    """Retained set on node 1 reaches a new subscriber on node 3; cleared on node 2 (empty
    payload), a new subscriber on node 1 gets nothing: after its SUBACK, the next message it
    gets is a control message published later."""
    cluster = started(cluster_factory, n=3)
    n1, n2, n3 = cluster.nodes
    setter = clients("setter", broker=n1)
    assert setter.publish("ret/a", b"kept", 1, retain=True) in (0, 0x10)
    first = clients("first", broker=n3)
    assert first.subscribe("ret/#", 1) == [1]
    m = first.expect_one(DELIVERY_TIMEOUT_S)
    assert (m.topic, m.payload, m.retain) == ("ret/a", b"kept", True)

    clearer = clients("clearer", broker=n2)
    clearer.publish("ret/a", b"", 1, retain=True)
    # The live clear (zero-length, non-retained copy) reaches the existing subscriber [MQTT-3.3.1-9/10].
    m = first.expect_one(DELIVERY_TIMEOUT_S)
    assert (m.topic, m.payload) == ("ret/a", b"")

    later = clients("later", broker=n1)
    assert later.subscribe("ret/#", 1) == [1]
    clearer.publish("ret/control", b"live", 1)
    m = later.expect_one(DELIVERY_TIMEOUT_S)
    assert (m.topic, m.payload, m.retain) == ("ret/control", b"live", False), (
        "a cleared retained message was sent"
    )


def test_will_of_a_dropped_client_reaches_other_nodes(
    cluster_factory: ClusterFactory, clients: ClientFactory
) -> None:
    """A 5.0 and a 3.1.1 client with wills on node 2 close their TCP connections without
    DISCONNECT [MQTT-3.1.2-8]: subscribers on nodes 1 and 3 get both wills."""
    cluster = started(cluster_factory, n=3)
    n1, n2, n3 = cluster.nodes
    watchers = [clients(f"watch{nd.index}", broker=nd) for nd in (n1, n3)]
    for w in watchers:
        assert w.subscribe("will/#", 1) == [1]
    for version in (5, 4):
        dying = RawClient(n2, version=version)
        try:
            ack = dying.connect(f"dying{version}", will=Will(f"will/v{version}", b"gone", qos=1))
            assert ack.reason_code == 0
        finally:
            dying.close()
        for w in watchers:
            m = w.expect_one(DELIVERY_TIMEOUT_S)
            assert (m.topic, m.payload, m.qos) == (f"will/v{version}", b"gone", 1), w.client_id


def test_shared_subscription_picks_one_member_cluster_wide(
    cluster_factory: ClusterFactory, clients: ClientFactory
) -> None:
    """`$share/g/sh/#` members on nodes 1, 2 and 3; 100 QoS 1 messages published on node 1:
    each goes to exactly one member (no loss, no duplicate) and more than one member gets some."""
    cluster = started(cluster_factory, n=3)
    n1, n2, n3 = cluster.nodes
    members = [clients(f"member{nd.index}", broker=nd) for nd in (n1, n2, n3)]
    for mb in members:
        assert mb.subscribe("$share/g/sh/#", 1) == [1]
    pub = clients("pub", broker=n1)
    count = 100
    pub.publish_many("sh/x", [str(k).encode() for k in range(count)], 1, timeout_s=DELIVERY_TIMEOUT_S)
    got: dict[str, list[int]] = {mb.client_id: [] for mb in members}
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while sum(map(len, got.values())) < count and time.monotonic() < deadline:
        for mb in members:
            got[mb.client_id] += [int(m.payload) for m in mb.drain(quiet_s=0.05)]
    # Silence is the assertion here: a duplicate may come from any member's node, with no fence.
    for mb in members:
        got[mb.client_id] += [int(m.payload) for m in mb.drain(quiet_s=0.3)]
    every = sorted(k for ks in got.values() for k in ks)
    assert every == list(range(count)), {name: len(ks) for name, ks in got.items()}
    assert sum(1 for ks in got.values() if ks) > 1, {name: len(ks) for name, ks in got.items()}


# --- membership: late joiner, CURVE, drain ----------------------------------------------------


def test_late_joiner_gets_retained_and_routes(
    cluster_factory: ClusterFactory, clients: ClientFactory
) -> None:
    """Nodes 1 and 2 run; 3 retained messages and a subscriber on node 1; node 3 starts: a new
    subscriber there gets the 3 retained messages, and a publish on node 3 reaches node 1."""
    cluster = cluster_factory(n=3, start=False)
    cluster.start([1, 2])
    cluster.wait_members(timeout_s=MEMBERS_TIMEOUT_S)
    n1, _, n3 = cluster.nodes
    setter = clients("setter", broker=n1)
    retained = {f"late/{k}": f"value {k}".encode() for k in range(3)}
    for topic, payload in retained.items():
        setter.publish(topic, payload, 1, retain=True)
    old = clients("old", broker=n1)
    assert old.subscribe("news/#", 1) == [1]

    n3.start()
    cluster.wait_members(timeout_s=MEMBERS_TIMEOUT_S)
    new = clients("new", broker=n3)
    assert new.subscribe("late/#", 1) == [1]
    got = new.expect(3, DELIVERY_TIMEOUT_S)
    assert {m.topic: m.payload for m in got} == retained
    assert all(m.retain for m in got)
    clients("pub3", broker=n3).publish("news/from3", b"hello", 1)
    m = old.expect_one(DELIVERY_TIMEOUT_S)
    assert (m.topic, m.payload) == ("news/from3", b"hello")


def test_curve_cluster_routes_and_refuses_a_node_with_another_key(
    tmp_path: Path, cluster_factory: ClusterFactory, clients: ClientFactory
) -> None:
    """A CURVE cluster of 2 forms and routes; a third node with its own key pair (not the
    cluster's) is refused: for 3 s the 2 nodes' views stay [n1, n2] and node 3 never sees them."""
    intruder_secret = _intruder_keys(tmp_path)

    def extra(index: int) -> Mapping[str, Any]:
        return {"Mesh": {"Curve": {"KeyFile": intruder_secret}}} if index == 3 else {}

    cluster = cluster_factory(n=3, curve=True, extra=extra, start=False)
    assert cluster.node(3).config["Mesh"]["Curve"]["KeyFile"] == intruder_secret
    assert cluster.node(1).config["Mesh"]["Curve"]["KeyFile"] == cluster.key_file != intruder_secret
    assert _public_key(cluster.key_file) != _public_key(intruder_secret)
    cluster.start([1, 2])
    cluster.wait_members(timeout_s=MEMBERS_TIMEOUT_S)
    n1, n2, n3 = cluster.nodes
    sub = clients("sub", broker=n2)
    assert sub.subscribe("curve/#", 1) == [1]
    clients("pub", broker=n1).publish("curve/x", b"secret", 1)
    m = sub.expect_one(DELIVERY_TIMEOUT_S)
    assert (m.topic, m.payload) == ("curve/x", b"secret")

    n3.start()
    pair = frozenset({"n1", "n2"})
    # Node 3's relay is up (it logs its first view) and dials nodes 1 and 2 from the static list;
    # the CURVE handshake fails before ZAP is asked (wrong server key), so nobody logs a refusal.
    cluster.wait_log(n3, r"cluster view: alive=", timeout_s=10)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        views = cluster.views()
        assert views["n1"] == pair and views["n2"] == pair, views
        assert n3.running(), n3.log_tail()
        time.sleep(0.1)
    n3_views = all_views(n3)
    assert n3_views, f"node 3 logged no view\n{n3.log_tail()}"
    assert all(not (view & pair) for view in n3_views), n3_views


def _intruder_keys(tmp_path: Path) -> str:
    """A key pair of our own, not the cluster's: the path of its secret key file."""
    from mesh.curve import generate

    _public_path, secret_path = generate(str(tmp_path / "intruder-keys"), "intruder")
    return secret_path


def _public_key(secret_path: str) -> bytes:
    public, _secret = zmq.auth.load_certificate(secret_path)
    return public


def drain(cluster: Cluster, node: Node) -> list[Packet]:
    """SIGTERM `node` (`Node.stop`) with a 5.0 client connected to it; what the client got
    before the close. The other running nodes must log that the node left, and their views
    shrink, because of its `bye`: no `is DEAD` line (the DeadAfterMs timeout) shows up."""
    others = [nd for nd in cluster.running() if nd is not node]
    marks = {nd.name: len(nd.log().splitlines()) for nd in others}
    client = connected(node, f"drained-{node.name}", version=5)
    stopper = threading.Thread(target=node.stop, name=f"stop-{node.name}", daemon=True)
    try:
        stopper.start()
        got = client.wait_closed(timeout_s=15)
    finally:
        client.close()
        stopper.join(20)
    assert not stopper.is_alive() and not node.running(), node.log_tail()
    for nd in others:
        cluster.wait_log(nd, rf"node {node.name} left the cluster", timeout_s=10, after=marks[nd.name])
    cluster.wait_members(timeout_s=MEMBERS_TIMEOUT_S, expected=[nd.name for nd in others])
    for nd in others:
        after = nd.log().splitlines()[marks[nd.name] :]
        assert not [line for line in after if f"node {node.name} is DEAD" in line], nd.log_tail()
    return got


def test_sigterm_drains_a_node_with_0x8b_or_0x9c(cluster_factory: ClusterFactory) -> None:
    """SIGTERM on a node with a 5.0 client there: the client gets DISCONNECT 0x8B (node 3), or
    0x9C with the Server Reference configured on node 2 [MQTT-3.14.2.2.5]; the other nodes log
    that it left and their view shrinks (`bye`, not the DeadAfterMs timeout)."""
    cluster = cluster_factory(n=3, start=False)
    n1, n2, n3 = cluster.nodes
    # Node 1's port is known only now; if the start picks new ports, write_configs follows them.
    cluster.extra = lambda index: (
        {"Cluster": {"ServerReference": f"{n1.host}:{n1.port}"}} if index == 2 else {}
    )
    cluster.write_configs()
    cluster.start()
    cluster.wait_members(timeout_s=MEMBERS_TIMEOUT_S)
    assert n2.config["Cluster"]["ServerReference"] == f"{n1.host}:{n1.port}"
    assert "Cluster" not in n3.config

    got = drain(cluster, n3)
    disconnects = [p for p in got if isinstance(p, Disconnect)]
    assert [d.reason_code for d in disconnects] == [0x8B], got
    assert disconnects[0].properties.server_reference is None

    got = drain(cluster, n2)
    disconnects = [p for p in got if isinstance(p, Disconnect)]
    assert [d.reason_code for d in disconnects] == [0x9C], got
    assert disconnects[0].properties.server_reference == f"{n1.host}:{n1.port}"
