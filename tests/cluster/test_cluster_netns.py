"""Tier-2 cluster tests (issue 5): three MeshMQ nodes on hosts of their own, found by mDNS only.

Why: on loopback every node shares one host, one multicast interface and one port space; a real
LAN does not. Here each node runs in its own network namespace on one bridge
(`tests/cluster/netns.py`), discovers the others by mDNS across the bridge (no static list), and
the cluster plane survives a real silent partition (nftables drops every frame between two
hosts, mDNS included) that later heals. The database (`tests/cluster/lab_nodes.py`) and the
MQTT clients (`CLIENT_SCRIPT`, small paho-mqtt programs) live in the lab's client host.

The cut is n3 ↔ n1 and n3 ↔ n2 only (not `isolate(3)`): the client host, which holds the
database and the test clients, keeps reaching every node, so the test watches the cluster plane
alone (a database outage on n3 is another test's subject).

Must not: run where `ip netns add` fails (skipped), address a lab IP from the root namespace, or
leave a process, a namespace or the guard route behind: the fixture stops the nodes, the
database and the lab even when the test fails, then checks that nothing of the lab is left.
Each test takes 10-20 s here (measured: nodes listen 3.5-7 s after launch on an idle machine,
up to 13 s on a loaded one, and the mDNS cluster forms about 1 s later; a cut is DEAD on both
sides after 1.5 s; views are whole 0.4-1.2 s after the heal).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import pytest

from tests.cluster import netns
from tests.cluster.lab_nodes import LAB_MESH_PORT, LabCluster, LabNode, LabPostgres
from tests.cluster.netns import CLIENT, Lab
from tests.e2e.broker_proc import BROKER_KIND
from tests.process_group import kill_group

pytestmark = [pytest.mark.netns, pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(90)]

FORMATION_TIMEOUT_S = 20.0
DETECTION_TIMEOUT_S = 8.0
RECOVERY_TIMEOUT_S = 20.0
ALL = ("n1", "n2", "n3")
POLL_S = 0.05
GONE_TIMEOUT_S = 10.0


# --- MQTT clients in the client host ------------------------------------------------------------

# One small paho-mqtt program, run with `python -c` inside a lab host; every wait in it is bounded.
#   probe TIMEOUT HOST:PORT...                    each address accepts TCP (retried until TIMEOUT)
#   pubsub SUB_HOST PUB_HOST PORT TOPIC COUNT TIMEOUT   subscribe (QoS 1) on one node, publish
#                                                  COUNT messages (QoS 1) on the other; prints JSON
#   publish HOST PORT TOPIC TIMEOUT PAYLOAD...    publish each payload (QoS 1), wait for PUBACKs
#   subscribe HOST PORT TOPIC MAX_S               prints "ready" after SUBACK, then each payload,
#                                                  one per line, and exits after MAX_S by itself
CLIENT_SCRIPT: Final = r"""
import json, socket, sys, threading, time
import paho.mqtt.client as mqtt

def connect(host, port, client_id, deadline):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    while True:
        try:
            c.connect(host, port, keepalive=10)
            return c
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)

def subscribe(c, topic, deadline, on_line=None):
    acked = threading.Event()
    got = []
    def on_subscribe(client, userdata, mid, codes, props):
        if any(code.is_failure for code in codes):
            raise SystemExit("SUBACK refused: %r" % (codes,))
        acked.set()
    def on_message(client, userdata, msg):
        got.append(msg.payload.decode())
        if on_line is not None:
            on_line(msg.payload.decode())
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.loop_start()
    c.subscribe(topic, qos=1)
    if not acked.wait(max(0.1, deadline - time.monotonic())):
        raise SystemExit("no SUBACK")
    return got

def main(argv):
    mode = argv[0]
    if mode == "probe":
        deadline = time.monotonic() + float(argv[1])
        for address in argv[2:]:
            host, port = address.rsplit(":", 1)
            while True:
                try:
                    socket.create_connection((host, int(port)), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("%s does not accept connections" % address)
                    time.sleep(0.1)
        print("ok", flush=True)
    elif mode == "pubsub":
        sub_host, pub_host, port, topic = argv[1], argv[2], int(argv[3]), argv[4]
        count, timeout = int(argv[5]), float(argv[6])
        deadline = time.monotonic() + timeout
        sub = connect(sub_host, port, "lab-sub-%d" % time.time_ns(), deadline)
        got = subscribe(sub, topic, deadline)
        pub = connect(pub_host, port, "lab-pub-%d" % time.time_ns(), deadline)
        pub.loop_start()
        started = time.monotonic()
        sent = []
        for k in range(count):
            payload = "m%d" % k
            pub.publish(topic, payload, qos=1).wait_for_publish(max(0.1, deadline - time.monotonic()))
            sent.append(payload)
        while len(got) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed_ms = (time.monotonic() - started) * 1000
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
        print(json.dumps({"sent": sent, "received": list(got), "elapsed_ms": elapsed_ms}), flush=True)
    elif mode == "publish":
        host, port, topic, timeout = argv[1], int(argv[2]), argv[3], float(argv[4])
        deadline = time.monotonic() + timeout
        pub = connect(host, port, "lab-pub-%d" % time.time_ns(), deadline)
        pub.loop_start()
        for payload in argv[5:]:
            pub.publish(topic, payload, qos=1).wait_for_publish(max(0.1, deadline - time.monotonic()))
        pub.disconnect()
        pub.loop_stop()
        print("ok", flush=True)
    elif mode == "subscribe":
        host, port, topic, max_s = argv[1], int(argv[2]), argv[3], float(argv[4])
        deadline = time.monotonic() + max_s
        c = connect(host, port, "lab-keep-%d" % time.time_ns(), deadline)
        subscribe(c, topic, deadline, on_line=lambda line: print(line, flush=True))
        print("ready", flush=True)
        while time.monotonic() < deadline:
            time.sleep(0.1)
        c.disconnect()
        c.loop_stop()
    else:
        raise SystemExit("unknown mode %r" % mode)

main(sys.argv[1:])
"""


def _script(*args: object) -> list[str]:
    return [sys.executable, "-c", CLIENT_SCRIPT, *(str(a) for a in args)]


def _checked(done: subprocess.CompletedProcess[str], what: str) -> str:
    if done.returncode != 0:
        raise AssertionError(
            f"{what} failed ({done.returncode}):\n{done.stdout[-1500:]}{done.stderr[-1500:]}"
        )
    return done.stdout


def client_probe(lab: Lab, addresses: Sequence[tuple[str, int]], timeout_s: float = 10.0) -> None:
    """From the client host: wait until every (host, port) accepts TCP (AssertionError if not)."""
    argv = _script("probe", timeout_s, *(f"{h}:{p}" for h, p in addresses))
    _checked(lab.exec(CLIENT, argv, timeout_s=timeout_s + 15), "client probe")


@dataclass(frozen=True, slots=True)
class PubSubResult:
    sent: tuple[str, ...]
    received: tuple[str, ...]
    elapsed_ms: float  # from the first publish until everything arrived (or the deadline)


def client_pubsub(
    lab: Lab, sub_node: LabNode, pub_node: LabNode, topic: str, count: int = 5, timeout_s: float = 10.0
) -> PubSubResult:
    """From the client host: subscribe on `sub_node`, publish `count` QoS 1 messages on `pub_node`."""
    argv = _script("pubsub", sub_node.host, pub_node.host, pub_node.port, topic, count, timeout_s)
    out = _checked(lab.exec(CLIENT, argv, timeout_s=timeout_s + 15), "client pubsub")
    result = json.loads(out.strip().splitlines()[-1])
    return PubSubResult(
        sent=tuple(result["sent"]), received=tuple(result["received"]), elapsed_ms=float(result["elapsed_ms"])
    )


def client_publish(
    lab: Lab, node: LabNode, topic: str, payloads: Sequence[str], timeout_s: float = 10.0
) -> None:
    """From the client host: publish each payload (QoS 1) on `node` and wait for its PUBACK."""
    argv = _script("publish", node.host, node.port, topic, timeout_s, *payloads)
    _checked(lab.exec(CLIENT, argv, timeout_s=timeout_s + 15), "client publish")


class LabSubscriber:
    """A subscriber that stays connected (client host), writing each payload to a file line."""

    def __init__(self, lab: Lab, node: LabNode, topic: str, out_path: Path, max_s: float = 60.0) -> None:
        self.node = node
        self.out_path = out_path
        self._out: IO[bytes] = open(out_path, "wb")  # noqa: SIM115  (closed in close())
        self.proc = lab.run(
            CLIENT,
            _script("subscribe", node.host, node.port, topic, max_s),
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def lines(self) -> list[str]:
        return self.out_path.read_text(errors="replace").splitlines()

    def received(self) -> list[str]:
        """The payloads received so far."""
        lines = self.lines()
        return lines[lines.index("ready") + 1 :] if "ready" in lines else []

    def wait_for(self, predicate_lines: Sequence[str], timeout_s: float) -> float:
        """Wait until every payload of `predicate_lines` was received; the seconds waited."""
        started = time.monotonic()
        while True:
            if "ready" in self.lines() and set(predicate_lines) <= set(self.received()):
                return time.monotonic() - started
            if self.proc.poll() is not None or time.monotonic() - started >= timeout_s:
                raise AssertionError(
                    f"subscriber on {self.node.name}: wanted {list(predicate_lines)} within {timeout_s}s, "
                    f"output so far: {self.lines()[-20:]} (exit {self.proc.poll()})"
                )
            time.sleep(POLL_S)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        self.wait_for([], timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            kill_group(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(GONE_TIMEOUT_S)
        self._out.close()


# --- the tests ---------------------------------------------------------------------------------


@dataclass
class LabEnv:
    lab: Lab
    pg: LabPostgres
    cluster: LabCluster
    tmp_path: Path
    subscribers: list[LabSubscriber] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    def subscriber(self, node: int, topic: str) -> LabSubscriber:
        sub = LabSubscriber(
            self.lab, self.cluster.node(node), topic, self.tmp_path / f"sub{len(self.subscribers)}.out"
        )
        self.subscribers.append(sub)
        return sub


@pytest.fixture
def lab_env(tmp_path: Path) -> Iterator[LabEnv]:
    """A 3-host lab, PostgreSQL in its client host, a 3-node mDNS cluster (not started yet)."""
    if not netns.available():
        pytest.skip("needs root and `ip netns add` (network-namespace lab)")
    if BROKER_KIND != "meshmq":
        pytest.skip(f"cluster tests need MeshMQ (MESHMQ_TEST_BROKER={BROKER_KIND})")
    netns.ensure_nft()
    lab = Lab(netns.unique_prefix(), 3)
    env: LabEnv | None = None
    pg: LabPostgres | None = None
    try:
        lab.up()
        pg = LabPostgres(lab).start()
        cluster = LabCluster(lab, tmp_path / "cluster", pg.create_database("meshmq"), workers=1)
        env = LabEnv(lab=lab, pg=pg, cluster=cluster, tmp_path=tmp_path)
        yield env
    finally:
        errors: list[BaseException] = []
        if env is not None:
            print(f"\n=== lab {lab.prefix}: timings {env.timings_s} ===\n{env.cluster.log_tails()}")
            for sub in env.subscribers:
                with _collect(errors):
                    sub.close()
            with _collect(errors):
                env.cluster.stop_all()
        if pg is not None:
            with _collect(errors):
                pg.stop()
        with _collect(errors):
            lab.teardown()
        # Nothing of the lab may outlive the test (labs of parallel test processes share the guard).
        with _collect(errors):
            assert lab.namespaces() == [], f"namespaces left behind: {lab.namespaces()}"
            if not netns.guard_holders():
                assert not netns.guard_present(), "the guard route was left behind"
        if errors:
            raise errors[0]


@contextlib.contextmanager
def _collect(errors: list[BaseException]) -> Iterator[None]:
    try:
        yield
    except BaseException as e:  # teardown goes on with the next step; the first error is raised
        errors.append(e)


def test_three_hosts_find_each_other_by_mdns_and_route_across_the_bridge(lab_env: LabEnv) -> None:
    lab, cluster = lab_env.lab, lab_env.cluster
    started = time.monotonic()
    cluster.start()
    lab_env.timings_s["listening"] = round(time.monotonic() - started, 2)
    cluster.wait_members(FORMATION_TIMEOUT_S)
    lab_env.timings_s["formation"] = round(time.monotonic() - started, 2)

    # Found by mDNS across the bridge (static discovery is off), at each other's lab address.
    for i in (1, 2, 3):
        for j in (1, 2, 3):
            if i != j:
                cluster.wait_log(i, rf"mDNS: found n{j} at {lab.addr(j)}:{LAB_MESH_PORT}\b", timeout_s=1.0)

    client_probe(lab, [(nd.host, nd.port) for nd in cluster.nodes])
    result = client_pubsub(lab, sub_node=cluster.node(3), pub_node=cluster.node(1), topic="lab/t1/x", count=5)
    lab_env.timings_s["n1->n3 5 msgs ms"] = round(result.elapsed_ms, 1)
    assert result.received == result.sent

    result = client_pubsub(lab, sub_node=cluster.node(1), pub_node=cluster.node(2), topic="lab/t1/y", count=3)
    assert result.received == result.sent


def test_a_cut_is_noticed_and_a_heal_rejoins_the_cluster(lab_env: LabEnv) -> None:
    lab, cluster = lab_env.lab, lab_env.cluster
    started = time.monotonic()
    cluster.start()
    cluster.wait_members(FORMATION_TIMEOUT_S)
    lab_env.timings_s["formation"] = round(time.monotonic() - started, 2)

    # A subscriber on n1 that stays connected through the cut and the heal.
    sub = lab_env.subscriber(1, "lab/heal/#")
    sub.wait_ready(10)
    client_publish(lab, cluster.node(3), "lab/heal/x", ["before"])
    sub.wait_for(["before"], 5)

    # The cut: n3 loses n1 and n2 (both ways, mDNS included); the client host still reaches all.
    marks = {i: cluster.node(i).log_lines() for i in (1, 2, 3)}
    cut_at = time.monotonic()
    lab.cut(1, 3)
    lab.cut(2, 3)
    for i in (1, 2):
        cluster.wait_log(i, r"node n3 is DEAD", DETECTION_TIMEOUT_S, after=marks[i])
    lab_env.timings_s["n3 DEAD on n1+n2"] = round(time.monotonic() - cut_at, 2)
    for other in ("n1", "n2"):
        cluster.wait_log(3, rf"node {other} is DEAD", DETECTION_TIMEOUT_S, after=marks[3])
    lab_env.timings_s["n1+n2 DEAD on n3"] = round(time.monotonic() - cut_at, 2)
    cluster.wait_views({1: ("n1", "n2"), 2: ("n1", "n2"), 3: ("n3",)}, DETECTION_TIMEOUT_S)
    lab_env.timings_s["split views"] = round(time.monotonic() - cut_at, 2)

    # The majority side still routes between its own nodes, and the split views hold (no flapping).
    client_publish(lab, cluster.node(2), "lab/heal/x", ["during"])
    sub.wait_for(["during"], 5)
    split = {"n1": frozenset({"n1", "n2"}), "n2": frozenset({"n1", "n2"}), "n3": frozenset({"n3"})}
    assert cluster.views() == split

    # The heal: mDNS re-announces and ZMTP reconnects; every view is whole again.
    healed_at = time.monotonic()
    lab.heal()
    cluster.wait_views({1: ALL, 2: ALL, 3: ALL}, RECOVERY_TIMEOUT_S)
    lab_env.timings_s["recovery after heal"] = round(time.monotonic() - healed_at, 2)

    # n3 learned n1's routes again (a fresh snapshot): its publishes reach the subscriber on n1.
    payloads = ["after1", "after2", "after3"]
    published_at = time.monotonic()
    client_publish(lab, cluster.node(3), "lab/heal/x", payloads)
    sub.wait_for(payloads, 10)
    lab_env.timings_s["n3->n1 after heal"] = round(time.monotonic() - published_at, 2)
    assert sub.received().count("before") == sub.received().count("during") == 1
    assert all(sub.received().count(p) >= 1 for p in payloads)
