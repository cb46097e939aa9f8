"""`meshctl` end to end against a real 3-node cluster (tier 1: 127.0.0.x, no root).

Why: issue 6 promises an operator's tool that talks to any node. These tests start three real
nodes with an HTTP port each (`Http.Port`, `Http.AdminToken`), run `meshctl` as an operator
would (`python -m tools.meshctl`, a subprocess) and check what it shows against what the test
did with real MQTT clients: members, health, routes, sessions, retained messages, stats, a tap,
a ping over the cluster link, and a drain (refused without the token; with it, node 3 exits 0
and the others' view shrinks).

Must not: sleep and hope (every wait polls meshctl or a log, bounded in time); use fixed ports;
send traffic anywhere but loopback; leave a client or a node behind (fixtures close them).

Invariants: the cluster and its database are the test's own, so client ids and topics are free.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import pytest

from tests.cluster.conftest import ClusterFactory
from tests.cluster.nodes import Cluster, Node
from tests.e2e.broker_proc import REPO
from tests.e2e.clients import ClientFactory
from tests.e2e.workers_helpers import free_port_block, port_free

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(150)]

TOKEN: Final = "t0ken"
MEMBERS_TIMEOUT_S: Final = 20.0
WAIT_S: Final = 15.0
CTL_TIMEOUT_S: Final = 30.0


def http_ports(hosts: list[str]) -> list[int]:
    """One HTTP port per node, all distinct, each free now on its node's address."""
    for _ in range(50):
        base = free_port_block(len(hosts))
        ports = [base + k for k in range(1, len(hosts) + 1)]
        if all(port_free(host, port) for host, port in zip(hosts, ports, strict=True)):
            return ports
    raise RuntimeError("no free HTTP ports")


class Ctl:
    """Runs `meshctl --node <node's HTTP address> ...` as a subprocess."""

    def __init__(self, cluster: Cluster, ports: list[int]) -> None:
        self.cluster = cluster
        self.ports = ports

    def address(self, i: int) -> str:
        return f"{self.cluster.node(i).host}:{self.ports[i - 1]}"

    def __call__(
        self, i: int, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "tools.meshctl", "--node", self.address(i), *args]
        clean = {"PATH": "/usr/bin:/bin", **(env or {})}
        return subprocess.run(
            argv, cwd=REPO, env=clean, capture_output=True, text=True, timeout=CTL_TIMEOUT_S, check=False
        )

    def json(self, i: int, *args: str) -> Any:
        done = self(i, "--json", *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def until(self, i: int, args: tuple[str, ...], ok: Callable[[Any], bool], what: str) -> Any:
        """Poll `meshctl --json ARGS` on node i until `ok(answer)`; the answer."""
        deadline = time.monotonic() + WAIT_S
        while True:
            answer = self.json(i, *args)
            if ok(answer):
                return answer
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what}: not within {WAIT_S}s; last answer {answer}")
            time.sleep(0.1)


@pytest.fixture
def clients(cluster_factory: ClusterFactory) -> Iterator[ClientFactory]:
    """paho clients (`clients("id", broker=node)`), closed before the cluster stops."""
    with ClientFactory(None) as make:  # type: ignore[arg-type]  # every client names its node
        yield make


@pytest.fixture
def ctl(cluster_factory: ClusterFactory) -> Ctl:
    hosts = [f"127.0.0.{i + 1}" for i in range(1, 4)]  # the harness's addresses for n1..n3
    ports = http_ports(hosts)
    cluster = cluster_factory(n=3, extra=lambda i: {"Http": {"Port": ports[i - 1], "AdminToken": TOKEN}})
    assert [nd.host for nd in cluster.nodes] == hosts
    cluster.wait_members(timeout_s=MEMBERS_TIMEOUT_S)
    ctl = Ctl(cluster, ports)
    for i in (1, 2, 3):  # every node answers /health with 200 (ACTIVE, safe, store ok)
        deadline = time.monotonic() + WAIT_S
        while (done := ctl(i, "health")).returncode != 0:
            assert time.monotonic() < deadline, f"n{i} not healthy: {done.stdout}{done.stderr}"
            time.sleep(0.1)
    return ctl


def test_meshctl_shows_the_cluster(ctl: Ctl, clients: ClientFactory) -> None:
    n1, n2, n3 = (ctl.cluster.node(i) for i in (1, 2, 3))

    # members: three, all ALIVE, as table and JSON
    members = ctl.until(1, ("members",), lambda ms: all(m["state"] == "ALIVE" for m in ms), "members")
    assert sorted(m["name"] for m in members) == ["n1", "n2", "n3"]
    table = ctl(1, "members")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ADDRESS", "STATE", "INCARNATION", "RTT", "CLIENTS"]
    assert sum(" ALIVE " in line for line in lines[1:]) == 3

    # health: fields and exit 0
    health = ctl(2, "health")
    assert health.returncode == 0, health.stderr
    assert re.search(r"^nodeState\s+ACTIVE$", health.stdout, re.M), health.stdout
    assert health.stdout.splitlines()[-1].endswith("healthy (HTTP 200)")

    # a subscription on n2 shows in routes (asked of n1) and its client in sessions
    sub = clients("ctl-sub", broker=n2, version=4)
    sub.subscribe("ctl/+/temp", qos=1)
    ctl.until(
        1,
        ("routes", "ctl/#"),
        lambda rs: any(r["filter"] == "ctl/+/temp" and "n2" in r["nodes"] for r in rs),
        "route",
    )
    routes = ctl(1, "routes", "ctl/#")
    assert re.search(r"^ctl/\+/temp\s+\S*n2", routes.stdout, re.M), routes.stdout
    ctl.until(
        1,
        ("sessions", "ctl-sub"),
        lambda ss: [(s["node"], s["online"]) for s in ss] == [("n2", True)],
        "session",
    )
    sessions = ctl(1, "sessions", "ctl-sub")
    assert re.search(r"^ctl-sub\s+n2\s+\S+\s+yes", sessions.stdout, re.M), sessions.stdout

    # a retained message published on n3 shows in retained (asked of n1)
    pub = clients("ctl-pub", broker=n3, version=4)
    pub.publish("ctl/r/1", b"hello", qos=1, retain=True)
    ctl.until(1, ("retained", "ctl/#"), lambda r: r["count"] == 1, "retained")
    retained = ctl(1, "retained", "ctl/#")
    assert retained.stdout.splitlines()[0] == "1 retained message", retained.stdout
    assert re.search(r"^ctl/r/1\s+1\s+5$", retained.stdout, re.M), retained.stdout

    # stats: per node, per worker, per link (both peers)
    stats = ctl(1, "stats")
    assert stats.returncode == 0, stats.stderr
    assert "NODE COUNTER" in stats.stdout and "WORKER COUNTER" in stats.stdout
    assert re.search(r"^n2\s", stats.stdout, re.M) and re.search(r"^n3\s", stats.stdout, re.M), stats.stdout

    # tap on n1 sees a publish made on n2 (published until the tap has it: its SUBACK is not ours to see)
    tap = subprocess.Popen(
        [sys.executable, "-m", "tools.meshctl", "tap", "ctl/tap", "--mqtt", f"{n1.host}:{n1.port}", "--count", "1",
         "--seconds", str(WAIT_S)],
        cwd=REPO, env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT_S + 5
        while tap.poll() is None and time.monotonic() < deadline:
            pub.publish("ctl/tap", b"seen", qos=0)
            time.sleep(0.2)
        out, err = tap.communicate(timeout=10)
    finally:
        if tap.poll() is None:
            tap.kill()
            tap.wait(5)
    assert (tap.returncode, out, err) == (0, "ctl/tap 0 4 seen\n", "")

    # ping n3 from n1 over the cluster link (a POST: it takes the token)
    ping = ctl(1, "ping", "n3", "--token", TOKEN)
    assert ping.returncode == 0, ping.stderr
    assert re.fullmatch(r"n3: rtt \d+\.\d{3} ms\n", ping.stdout), ping.stdout


def test_meshctl_drains_a_node_only_with_the_token(ctl: Ctl) -> None:
    cluster = ctl.cluster
    n3: Node = cluster.node(3)

    refused = ctl(1, "drain", "n3")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("meshctl: admin credentials are missing"), refused.stderr
    wrong = ctl(1, "drain", "n3", "--token", "nope")
    assert wrong.returncode == 1 and wrong.stderr.startswith("meshctl: the admin token is wrong"), (
        wrong.stderr
    )
    assert n3.running()

    n3.wanted = False  # its exit is expected now: the harness must not call it a crash
    drained = ctl(1, "drain", "n3", env={"MESHMQ_TOKEN": TOKEN})  # the token from the environment
    assert (drained.returncode, drained.stdout, drained.stderr) == (0, "draining n3\n", "")
    assert n3.proc is not None
    assert n3.proc.wait(30) == 0, n3.log_tail()
    cluster.wait_members(timeout_s=MEMBERS_TIMEOUT_S)  # n1 and n2 see {n1, n2}
    for i in (1, 2):
        ctl.until(
            i,
            ("members",),
            lambda ms: (
                all(m["state"] == "ALIVE" for m in ms if m["name"] != "n3")
                and all(m["state"] != "ALIVE" for m in ms if m["name"] == "n3")
            ),
            f"n{i}'s view without n3",
        )
    assert ctl(1, "health").returncode == 0
    assert ctl(3, "health", "--timeout", "2").returncode == 1  # n3 is gone: refused, one line, exit 1
