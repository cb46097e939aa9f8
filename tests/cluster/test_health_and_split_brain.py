"""The HTTP port of cluster nodes, and split-brain protection (issue 6), on real nodes.

Why: a load balancer trusts `/health`, operators trust `/api/*` and `meshctl`, and the cluster's
promise under a partition is "a node in the minority sends its clients to the majority"
(DESIGN.md, "Split brain"; mesh/PROTOCOL.md, "The HTTP API of a node"). Tier 1 (loopback,
127.0.0.2..): members with RTTs, a route and a session made on another node, a ping and a
drain over the cluster plane; a survivor of two SIGKILLed peers with `MinimumClusterSize: 2`
turns 503 / MINORITY, sends its MQTT 5 client away (DISCONNECT 0x9C with the Server Reference),
refuses CONNECTs (5.0: CONNACK 0x9C with the reference, 3.1.1: 0x03) and serves again when a
peer returns; with `AllowConnect: true` it keeps serving but stays 503. Tier 2 (network
namespaces, root only): a silent cut leaves n3 alone; n3 refuses clients in the client host,
n1 and n2 serve, and the heal brings n3 back.

Must not: send traffic anywhere but loopback or the lab's own hosts (tier 2 clients run in the
lab's client host, never in the root namespace); sleep-and-hope (every wait is bounded and ends
on a condition); leave a node or a client behind (the fixtures stop nodes, clients are closed).
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import pytest
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.client import DisconnectFlags
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.cluster import test_cluster_netns as netns_tests
from tests.cluster.conftest import ClusterFactory
from tests.cluster.lab_nodes import LabCluster
from tests.cluster.netns import CLIENT, Lab
from tests.cluster.nodes import CLUSTER_READY, Cluster, deep_merge
from tests.e2e.broker_proc import REPO, free_port
from tests.e2e.clients import BrokerAddress, TestClient, prop

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.e2e,
    pytest.mark.postgres,
    pytest.mark.skipif(not CLUSTER_READY, reason="mesh/cluster.py does not exist yet"),
    pytest.mark.timeout(90),
]

# The tier-2 lab fixture of test_cluster_netns.py (a 3-host lab, PostgreSQL in its client host).
lab_env = netns_tests.lab_env

TOKEN: Final = "cluster-admin-token"
REFERENCE: Final = "mqtt-majority.example:1883"  # only ever sent to clients, never dialled
HEALTH_TIMEOUT_S: Final = 10.0  # a peer is DEAD 1.5 s after its kill (nodes.py timeouts)
RTT_TIMEOUT_S: Final = 5.0
STOP_TIMEOUT_S: Final = 15.0
USE_ANOTHER_SERVER: Final = 0x9C
SERVER_UNAVAILABLE_V311: Final = 0x03
SPLIT_BRAIN: Final = {
    "ServerReference": REFERENCE,
    "SplitBrainProtection": {"MinimumClusterSize": 2},
}

HTTP_TIMEOUT_S: Final = 5.0
POLL_S: Final = 0.05


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        assert self.content_type == "application/json", self.content_type
        return json.loads(self.body)


def http_call(host: str, port: int, method: str, path: str, token: str | None = None) -> Answer:
    """One request on a connection of its own (loopback node addresses only)."""
    conn = http.client.HTTPConnection(host, port, timeout=HTTP_TIMEOUT_S)
    try:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return Answer(resp.status, resp.headers.get("Content-Type", ""), resp.read())
    finally:
        conn.close()


def wait_for(what: str, check: Callable[[], Any], timeout_s: float) -> Any:
    """Poll `check` until it returns something truthy (returned); AssertionError at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = check()
        except OSError as e:  # a port not open (yet, or any more)
            last = e
        if last and not isinstance(last, OSError):
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} within {timeout_s}s; last: {last!r}")
        time.sleep(POLL_S)


class RefClient(TestClient):
    """A TestClient that also keeps the properties of the server's DISCONNECT (Server Reference)."""

    __test__ = False
    disconnect_properties: Properties | None = None

    def _on_disconnect(
        self,
        c: PahoClient,
        u: Any,
        flags: DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if flags.is_disconnect_packet_from_server:
            self.disconnect_properties = properties
        super()._on_disconnect(c, u, flags, reason, properties)


@dataclass
class HttpCluster:
    """A loopback cluster whose node i serves HTTP on its own address, port `ports[i]`."""

    cluster: Cluster
    ports: dict[int, int]

    def get(self, i: int, path: str) -> Answer:
        return http_call(self.cluster.node(i).host, self.ports[i], "GET", path)

    def post(self, i: int, path: str, token: str | None = TOKEN) -> Answer:
        return http_call(self.cluster.node(i).host, self.ports[i], "POST", path, token)

    def health(self, i: int) -> tuple[int, dict[str, Any]]:
        answer = self.get(i, "/health")
        body: dict[str, Any] = answer.json()
        return answer.status, body

    def wait_health(
        self, i: int, status: int, state: str, timeout_s: float = HEALTH_TIMEOUT_S
    ) -> dict[str, Any]:
        """Wait until node i's /health is `status` with `clusterState` `state`; its body."""

        def check() -> dict[str, Any] | None:
            got, body = self.health(i)
            return body if got == status and body["clusterState"] == state else None

        body: dict[str, Any] = wait_for(f"n{i}: /health {status} {state}", check, timeout_s)
        return body


def http_cluster(factory: ClusterFactory, cluster_keys: Mapping[str, Any] | None = None) -> HttpCluster:
    """3 nodes, 1 worker each, with `Http.Port` (and the token) and `Cluster` keys; all members."""
    ports = {i: free_port(f"127.0.0.{i + 1}") for i in (1, 2, 3)}

    def extra(i: int) -> dict[str, Any]:
        config: dict[str, Any] = {"Http": {"Port": ports[i], "AdminToken": TOKEN}}
        if cluster_keys:
            config["Cluster"] = dict(cluster_keys)
        return config

    cluster = factory(n=3, extra=extra)
    cluster.wait_members()
    hc = HttpCluster(cluster, ports)
    for i in (1, 2, 3):
        hc.wait_health(i, 200, "SAFE")
    return hc


def connect(node: BrokerAddress, client_id: str, version: int = 5) -> RefClient:
    client = RefClient(node, client_id, version=version)
    assert client.connect().reason_code == 0
    return client


# -- tier 1: the HTTP API of a cluster ---------------------------------------------------------------


def test_members_routes_sessions_ping_and_drain(cluster_factory: ClusterFactory) -> None:
    hc = http_cluster(cluster_factory, {"ServerReference": REFERENCE})
    cluster = hc.cluster
    status, health = hc.health(1)
    assert (status, health["clusterSafe"], health["nodeCount"], health["clusterSize"]) == (200, True, 3, 3)

    # members: all three ALIVE, with a measured heartbeat round trip to each peer
    def members_with_rtts() -> list[dict[str, Any]] | None:
        rows: list[dict[str, Any]] = hc.get(1, "/api/members").json()
        peers = [r for r in rows if not r["self"]]
        ok = (
            len(rows) == 3 and all(r["state"] == "ALIVE" for r in rows) and all(r["rttMs"] > 0 for r in peers)
        )
        return rows if ok else None

    rows = wait_for("3 ALIVE members with RTTs on n1", members_with_rtts, RTT_TIMEOUT_S)
    assert [r["name"] for r in rows] == ["n1", "n2", "n3"]
    assert [r["self"] for r in rows] == [True, False, False]
    assert rows[1]["address"] == f"{cluster.node(2).host}:{cluster.node(2).mesh_port}"

    sub = connect(cluster.node(2), "http-sub-n2")
    held = connect(cluster.node(3), "http-held-n3")
    try:
        assert sub.subscribe("httpc/+/x", qos=1) == [1]

        # routes: the subscription made on n2, seen by n1 (and by n2 itself)
        expected_route = [{"filter": "httpc/+/x", "nodes": ["n2"]}]
        wait_for(
            "n2's route on n1",
            lambda: hc.get(1, "/api/routes?filter=httpc%2F%23").json() == expected_route,
            RTT_TIMEOUT_S,
        )
        assert hc.get(2, "/api/routes?filter=httpc%2F%23").json() == expected_route
        assert {"filter": "httpc/+/x", "nodes": ["n2"]} in hc.get(3, "/api/routes").json()

        # sessions: the client of n2, seen from n1 (replica) and from n2 (its own registry)
        def session_on(i: int) -> dict[str, Any] | None:
            found: list[dict[str, Any]] = hc.get(i, "/api/sessions?client=http-sub-n2").json()
            return found[0] if found else None

        row = wait_for("n2's client in n1's /api/sessions", lambda: session_on(1), RTT_TIMEOUT_S)
        assert (row["clientId"], row["node"], row["online"]) == ("http-sub-n2", "n2", True)
        own = session_on(2)
        assert own is not None and (own["node"], own["worker"], own["epoch"]) == ("n2", 1, row["epoch"])
        clients = {r["name"]: r["clients"] for r in hc.get(1, "/api/members").json()}
        assert clients == {"n1": 0, "n2": 1, "n3": 1}

        # stats and metrics have a link per peer
        links = hc.get(1, "/api/stats").json()["links"]
        assert sorted(links) == ["n2", "n3"]
        metrics = hc.get(1, "/metrics").body.decode()
        assert 'meshmq_peer_up{node="n1",peer="n3"} 1.0' in metrics

        # ping over the cluster plane (a write: token needed)
        assert hc.post(1, "/api/ping?node=n3", token=None).status == 401
        pong = hc.post(1, "/api/ping?node=n3")
        assert pong.status == 200
        assert pong.json()["node"] == "n3" and pong.json()["rttMs"] > 0
        assert hc.post(1, "/api/ping?node=n9").status == 504

        # drain of n3, asked on n1: n3 sends its client away, exits 0, and the others see it go
        assert hc.post(1, "/api/drain?node=n3", token="wrong").status == 401
        n3 = cluster.node(3)
        n3.wanted = False  # the test stops it (through n1): its exit is no crash
        drained = hc.post(1, "/api/drain?node=n3")
        assert drained.status == 202
        assert drained.json() == {"draining": "n3"}
        assert held.wait_disconnected(STOP_TIMEOUT_S) == USE_ANOTHER_SERVER
        assert prop(held.disconnect_properties, "ServerReference") == REFERENCE
        assert n3.proc is not None and n3.proc.wait(STOP_TIMEOUT_S) == 0
        cluster.wait_members(HEALTH_TIMEOUT_S, expected=["n1", "n2"])

        def n3_gone() -> bool:
            rows = {r["name"]: r["state"] for r in hc.get(1, "/api/members").json()}
            return rows.get("n3", "LEFT") in ("LEFT", "DEAD")

        wait_for("n3 LEFT in n1's /api/members", n3_gone, HEALTH_TIMEOUT_S)
        status, health = hc.health(1)
        assert (status, health["nodeCount"]) == (200, 2)
    finally:
        sub.close()
        held.close()


# -- tier 1: split-brain protection ------------------------------------------------------------------


def test_a_minority_survivor_sends_clients_away_until_a_peer_returns(cluster_factory: ClusterFactory) -> None:
    hc = http_cluster(cluster_factory, SPLIT_BRAIN)
    cluster = hc.cluster
    n1 = cluster.node(1)
    held = connect(n1, "held-v5")
    try:
        cluster.node(2).kill()
        cluster.node(3).kill()

        body = hc.wait_health(1, 503, "MINORITY")
        assert body["clusterSafe"] is False
        assert body["nodeCount"] == 1
        assert body["nodeState"] == "ACTIVE"
        assert 'meshmq_cluster_safe{node="n1"} 0.0' in hc.get(1, "/metrics").body.decode()

        # the connected MQTT 5 client is sent to the majority
        assert held.wait_disconnected(5) == USE_ANOTHER_SERVER
        assert prop(held.disconnect_properties, "ServerReference") == REFERENCE

        # new CONNECTs are refused: 5.0 with 0x9C and the reference, 3.1.1 with 0x03
        with RefClient(n1, "new-v5", version=5) as v5:
            refused = v5.connect()
            assert refused.reason_code == USE_ANOTHER_SERVER
            assert prop(refused, "ServerReference") == REFERENCE
        with TestClient(n1, "new-v311", version=4) as v311:
            assert v311.connect().reason_code == SERVER_UNAVAILABLE_V311

        # a peer returns: two live members is enough again
        cluster.node(2).start()
        cluster.wait_members(HEALTH_TIMEOUT_S * 2, expected=["n1", "n2"])
        body = hc.wait_health(1, 200, "SAFE")
        assert body["clusterSafe"] is True and body["nodeCount"] == 2
        with RefClient(n1, "back-v5", version=5) as v5:
            assert v5.connect().reason_code == 0
        with TestClient(n1, "back-v311", version=4) as v311:
            assert v311.connect().reason_code == 0
    finally:
        held.close()


def test_allow_connect_keeps_serving_in_the_minority_but_health_is_503(
    cluster_factory: ClusterFactory,
) -> None:
    keys = deep_merge(SPLIT_BRAIN, {"SplitBrainProtection": {"AllowConnect": True}})
    hc = http_cluster(cluster_factory, keys)
    cluster = hc.cluster
    n1 = cluster.node(1)
    held = connect(n1, "kept-v5")
    try:
        cluster.node(2).kill()
        cluster.node(3).kill()
        body = hc.wait_health(1, 503, "MINORITY")
        assert body["clusterSafe"] is False

        # the client stays and is served: a round trip through the broker
        assert held.subscribe("allow/t", qos=1) == [1]
        held.publish("allow/t", b"still here", qos=1)
        message = held.messages.get(timeout=5)
        assert message.payload == b"still here"
        assert held.is_connected

        # and new clients are accepted, on both protocol versions
        with RefClient(n1, "allowed-v5", version=5) as v5:
            assert v5.connect().reason_code == 0
        with TestClient(n1, "allowed-v311", version=4) as v311:
            assert v311.connect().reason_code == 0
        assert held.is_connected
        status, _ = hc.health(1)
        assert status == 503
    finally:
        held.close()


# -- tier 2: a real silent partition in network namespaces ----------------------------------------------

LAB_HTTP_PORT: Final = 8080

# Runs in the lab's client host: the e2e TestClient (repo on sys.path), bounded retries.
#   connack HOST PORT VERSION EXPECT TIMEOUT   CONNECT until the CONNACK code is EXPECT (or the
#                                              deadline); prints {"code", "reference"} of the last
#   health HOST PORT                           prints {"status", "body"} of GET /health
LAB_SCRIPT: Final = r"""
import json, sys, time, urllib.error, urllib.request
sys.path.insert(0, sys.argv[1])
from tests.e2e.clients import TestClient, prop

class Address:
    def __init__(self, host, port):
        self.host, self.port = host, port

def connack(host, port, version, expect, timeout_s):
    deadline = time.monotonic() + timeout_s
    while True:
        client = TestClient(Address(host, port), "lab-probe-%d" % time.time_ns(), version=version)
        code = reference = None
        try:
            result = client.connect(timeout_s=3)
            code, reference = result.reason_code, prop(result, "ServerReference")
        except (OSError, ConnectionError, AssertionError):
            pass
        finally:
            client.close()
        if code == expect or time.monotonic() >= deadline:
            return {"code": code, "reference": reference}
        time.sleep(0.1)

def health(host, port):
    try:
        with urllib.request.urlopen("http://%s:%d/health" % (host, port), timeout=5) as r:
            return {"status": r.status, "body": json.loads(r.read())}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": json.loads(e.read())}

mode, args = sys.argv[2], sys.argv[3:]
if mode == "connack":
    out = connack(args[0], int(args[1]), int(args[2]), int(args[3]), float(args[4]))
elif mode == "health":
    out = health(args[0], int(args[1]))
else:
    raise SystemExit("unknown mode %r" % mode)
print(json.dumps(out), flush=True)
"""


def _lab(lab: Lab, *args: object, timeout_s: float = 10.0) -> dict[str, Any]:
    argv = [sys.executable, "-c", LAB_SCRIPT, str(REPO), *(str(a) for a in args)]
    done = lab.exec(CLIENT, argv, timeout_s=timeout_s + 15)
    assert done.returncode == 0, f"lab client {args} failed:\n{done.stdout[-1500:]}{done.stderr[-1500:]}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def lab_connack(lab: Lab, cluster: LabCluster, i: int, version: int, expect: int) -> dict[str, Any]:
    """From the client host: CONNECT to node i until the CONNACK code is `expect` (bounded)."""
    nd = cluster.node(i)
    return _lab(lab, "connack", nd.host, nd.port, version, expect, 8.0)


def lab_health(lab: Lab, cluster: LabCluster, i: int) -> dict[str, Any]:
    return _lab(lab, "health", cluster.node(i).host, LAB_HTTP_PORT)


@pytest.mark.netns
@pytest.mark.slow
def test_a_cut_off_node_refuses_clients_and_serves_again_after_the_heal(
    lab_env: netns_tests.LabEnv,
) -> None:
    lab, cluster = lab_env.lab, lab_env.cluster
    cluster.extra = {"Cluster": SPLIT_BRAIN, "Http": {"Port": LAB_HTTP_PORT}}
    for nd in cluster.nodes:
        nd.config = cluster.config_for(nd)
    started = time.monotonic()
    cluster.start()
    cluster.wait_members(netns_tests.FORMATION_TIMEOUT_S)
    lab_env.timings_s["formation"] = round(time.monotonic() - started, 2)
    for i in (1, 2, 3):
        assert lab_connack(lab, cluster, i, 5, 0)["code"] == 0

    cut_at = time.monotonic()
    lab.cut(1, 3)
    lab.cut(2, 3)
    cluster.wait_views({1: ("n1", "n2"), 2: ("n1", "n2"), 3: ("n3",)}, netns_tests.DETECTION_TIMEOUT_S)
    lab_env.timings_s["split views"] = round(time.monotonic() - cut_at, 2)

    refused = lab_connack(lab, cluster, 3, 5, USE_ANOTHER_SERVER)
    assert refused == {"code": USE_ANOTHER_SERVER, "reference": REFERENCE}
    assert lab_connack(lab, cluster, 3, 4, SERVER_UNAVAILABLE_V311)["code"] == SERVER_UNAVAILABLE_V311
    health = lab_health(lab, cluster, 3)
    assert health["status"] == 503
    assert (health["body"]["clusterState"], health["body"]["clusterSafe"]) == ("MINORITY", False)
    for i in (1, 2):  # the majority serves
        assert lab_connack(lab, cluster, i, 5, 0)["code"] == 0
        health = lab_health(lab, cluster, i)
        assert (health["status"], health["body"]["nodeCount"]) == (200, 2)

    healed_at = time.monotonic()
    lab.heal()
    cluster.wait_views({i: netns_tests.ALL for i in (1, 2, 3)}, netns_tests.RECOVERY_TIMEOUT_S)
    lab_env.timings_s["views whole after heal"] = round(time.monotonic() - healed_at, 2)
    assert lab_connack(lab, cluster, 3, 5, 0)["code"] == 0
    assert lab_connack(lab, cluster, 3, 4, 0)["code"] == 0
    health = lab_health(lab, cluster, 3)
    assert (health["status"], health["body"]["clusterState"]) == (200, "SAFE")
