"""The HTTP port of one real `meshmq` node (no cluster): health, metrics, the read API, shutdown.

Why: `tests/unit/mesh/test_http.py` covers the HTTP handling against a fake view; here the
relay answers for real (`mesh/PROTOCOL.md`, "The HTTP API of a node"): `/health` once the
workers joined, `/metrics` as Prometheus text whose counters follow MQTT traffic (workers report
once a second), the node in `/api/members`, a retained message in `/api/retained`, the clients in
`/api/sessions`, `POST /admin/shutdown` draining the node like SIGTERM (exit 0, MQTT 5 clients
told 0x8B), and a second node that cannot take the same `Http.Port` stopping with exit code 3
and a log line naming the key.

Must not: send traffic anywhere but the node on 127.0.0.1; wait unbounded.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.broker_proc import BrokerProcess, _meshmq_command, free_port
from tests.e2e.clients import TestClient
from tests.e2e.conftest import BrokerFactory

pytestmark = [pytest.mark.meshmq_only, pytest.mark.timeout(60)]

TOKEN = "e2e-admin-token"
NODE = "solo"
HTTP_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 10.0
REPORT_TIMEOUT_S = 3.0  # workers report their counters every second; the brief allows 2 s, plus slack
GRACE_S = 5.0
POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        assert self.content_type == "application/json", self.content_type
        return json.loads(self.body)


def http_call(port: int, method: str, path: str, token: str | None = None, host: str = "127.0.0.1") -> Answer:
    """One request on a connection of its own."""
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
        except OSError as e:  # the port not (yet) open
            last = e
        if last and not isinstance(last, OSError):
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} within {timeout_s}s; last: {last!r}")
        time.sleep(POLL_S)


@dataclass
class HttpNode:
    broker: BrokerProcess
    http_port: int

    def get(self, path: str) -> Answer:
        return http_call(self.http_port, "GET", path)

    def post(self, path: str, token: str | None = TOKEN) -> Answer:
        return http_call(self.http_port, "POST", path, token)

    def healthy(self) -> dict[str, Any] | None:
        answer = self.get("/health")
        body: dict[str, Any] = answer.json()
        return body if answer.status == 200 and body["nodeState"] == "ACTIVE" else None


def http_config(port: int, workers: int = 1) -> dict[str, Any]:
    return {
        "NodeName": NODE,
        "Workers": workers,
        "ShutdownGrace": GRACE_S,
        "Http": {"Port": port, "BindAddress": "127.0.0.1", "AdminToken": TOKEN},
    }


@pytest.fixture
def node(broker_factory: BrokerFactory) -> HttpNode:
    port = free_port()
    return HttpNode(broker_factory(http_config(port)), port)


# -- Prometheus text format 0.0.4 -------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^(?P<name>{_NAME})(?:\{{(?P<labels>[^}}]*)\}})? (?P<value>\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
_HELP = re.compile(rf"^# HELP (?P<name>{_NAME}) (?P<text>.*)$")
_TYPE = re.compile(rf"^# TYPE (?P<name>{_NAME}) (?P<kind>counter|gauge|histogram|summary|untyped)$")


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_prometheus(text: str) -> tuple[dict[str, str], list[Sample]]:
    """Families (name -> type) and samples; AssertionError on anything the format does not allow
    for our exposition (HELP then TYPE per family, samples after their TYPE, `name{labels} value`)."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    families: dict[str, str] = {}
    samples: list[Sample] = []
    lines = text[:-1].split("\n")
    current = ""
    k = 0
    while k < len(lines):
        line = lines[k]
        if line.startswith("# HELP "):
            helped = _HELP.match(line)
            assert helped, f"bad HELP line {line!r}"
            typed = _TYPE.match(lines[k + 1]) if k + 1 < len(lines) else None
            assert typed, f"HELP not followed by TYPE: {line!r} then {lines[k + 1 : k + 2]!r}"
            name = helped["name"]
            assert typed["name"] == name, f"HELP {name} but TYPE {typed['name']}"
            assert name not in families, f"family {name} declared twice"
            if typed["kind"] == "counter":
                assert name.endswith("_total"), f"counter {name} without _total"
            families[name] = typed["kind"]
            current = name
            k += 2
            continue
        assert not line.startswith("#"), f"stray comment {line!r}"
        sample = _SAMPLE.match(line)
        assert sample, f"bad sample line {line!r}"
        assert sample["name"] == current, f"sample {sample['name']} outside its family ({current})"
        labels: dict[str, str] = {}
        text_labels = sample["labels"] or ""
        consumed = 0
        for found in _LABEL.finditer(text_labels):
            assert found.start() == consumed, f"bad labels {text_labels!r}"
            labels[found[1]] = found[2]
            consumed = found.end()
        assert consumed == len(text_labels), f"bad labels {text_labels!r}"
        value = float(sample["value"])
        assert not math.isnan(value), line
        samples.append(Sample(sample["name"], labels, value))
        k += 1
    return families, samples


def metric_sum(samples: list[Sample], name: str) -> float:
    return sum(s.value for s in samples if s.name == name)


# -- tests -----------------------------------------------------------------------------------------------


def test_health_is_200_active_and_standalone_once_the_workers_joined(broker_factory: BrokerFactory) -> None:
    port = free_port()
    n = HttpNode(broker_factory(http_config(port, workers=2)), port)
    health = wait_for("an ACTIVE /health", n.healthy, READY_TIMEOUT_S)
    assert health["node"] == NODE
    assert health["nodeState"] == "ACTIVE"
    assert health["clusterState"] == "STANDALONE"
    assert health["clusterSafe"] is True
    assert health["nodeCount"] == 1
    assert health["clusterSize"] == 1
    assert health["workers"] == 2
    assert health["store"] in ("none", "ok")
    assert isinstance(health["version"], str) and health["version"]


def test_metrics_parse_as_prometheus_text_and_counters_move(node: HttpNode) -> None:
    wait_for("an ACTIVE /health", node.healthy, READY_TIMEOUT_S)

    def scrape() -> list[Sample]:
        answer = node.get("/metrics")
        assert answer.status == 200
        assert answer.content_type.startswith("text/plain; version=0.0.4")
        families, samples = parse_prometheus(answer.body.decode())
        assert all(name.startswith("meshmq_") for name in families)
        assert all(s.labels.get("node") == NODE for s in samples)
        return samples

    before = wait_for(
        "a first worker report in /metrics",
        lambda: (s := scrape()) and any(x.name == "meshmq_messages_received_total" for x in s) and s,
        REPORT_TIMEOUT_S,
    )
    families, _ = parse_prometheus(node.get("/metrics").body.decode())
    assert families["meshmq_messages_received_total"] == "counter"
    assert families["meshmq_connections"] == "gauge"
    assert families["meshmq_up"] == "gauge"
    assert metric_sum(before, "meshmq_up") == 1.0
    received = metric_sum(before, "meshmq_messages_received_total")

    with TestClient(node.broker, "metrics-pub") as client:
        assert client.connect().reason_code == 0
        client.publish("metrics/t", b"x", qos=1)
        after = wait_for(
            "meshmq_messages_received_total to grow after a publish",
            lambda: (s := scrape()) and metric_sum(s, "meshmq_messages_received_total") > received and s,
            REPORT_TIMEOUT_S,
        )
        assert metric_sum(after, "meshmq_connections") >= 1
        assert [s.labels["worker"] for s in after if s.name == "meshmq_messages_received_total"] == ["1"]


def test_members_and_retained(node: HttpNode) -> None:
    wait_for("an ACTIVE /health", node.healthy, READY_TIMEOUT_S)
    members = node.get("/api/members")
    assert members.status == 200
    (own,) = members.json()
    assert own["name"] == NODE
    assert own["self"] is True
    assert own["state"] == "ALIVE"

    with TestClient(node.broker, "http-sess") as client:
        assert client.connect().reason_code == 0

        # The relay's SUB links to the worker's PUB up to ~100 ms after the worker listens, and a
        # retained update sent before that never reaches the relay (a bug, see the report of
        # this test file's author). A probe, sent until the relay has it, proves the link.
        def probe_held() -> bool:
            client.publish("probe/http", b"p", qos=1, retain=True)
            return bool(node.get("/api/retained?filter=probe%2Fhttp").json()["count"] == 1)

        wait_for("the relay to hold a probe retained message", probe_held, READY_TIMEOUT_S)
        client.publish("http/retained/a", b"hello", qos=1, retain=True)

        def retained() -> Any:
            body = node.get("/api/retained").json()
            topics = [t for t in body["topics"] if t["topic"].startswith("http/")]
            return topics or None

        topics = wait_for("the retained message in /api/retained", retained, REPORT_TIMEOUT_S)
        assert topics == [{"topic": "http/retained/a", "qos": 1, "bytes": 5}]
        assert node.get("/api/retained?filter=http%2F%2B%2Fa").json() == {"count": 1, "topics": topics}
        assert node.get("/api/retained?filter=http%2F%23").json() == {"count": 1, "topics": topics}
        assert node.get("/api/retained?filter=other%2F%23").json() == {"count": 0, "topics": []}


@pytest.mark.parametrize(
    "workers",
    [
        1,
        2,
    ],
)
def test_sessions_and_members_show_a_connected_client(broker_factory: BrokerFactory, workers: int) -> None:
    port = free_port()
    n = HttpNode(broker_factory(http_config(port, workers=workers)), port)
    wait_for("an ACTIVE /health", n.healthy, READY_TIMEOUT_S)
    with TestClient(n.broker, "http-sess") as client:
        assert client.connect().reason_code == 0

        def sessions() -> Any:
            rows = n.get("/api/sessions?client=http-sess").json()
            return rows or None

        (row,) = wait_for("the client in /api/sessions", sessions, REPORT_TIMEOUT_S)
        assert row["clientId"] == "http-sess"
        assert row["node"] == NODE
        assert row["online"] is True
        assert row["worker"] in range(1, workers + 1)
        assert n.get("/api/sessions?client=someone-else").json() == []
        (own,) = n.get("/api/members").json()
        assert own["clients"] == 1


def test_admin_shutdown_drains_the_node_and_exits_0(node: HttpNode) -> None:
    wait_for("an ACTIVE /health", node.healthy, READY_TIMEOUT_S)
    proc = node.broker.proc
    assert proc is not None
    assert node.post("/admin/shutdown", token="wrong").status == 401
    assert node.post("/admin/shutdown", token=None).status == 401
    assert node.healthy() is not None  # refused writes changed nothing

    with TestClient(node.broker, "http-v5", version=5) as client:
        assert client.connect().reason_code == 0
        answer = node.post("/admin/shutdown")
        assert answer.status == 202
        assert answer.json() == {"draining": "self"}
        assert client.wait_disconnected(GRACE_S) == 0x8B  # server shutting down
    assert proc.wait(GRACE_S + 5) == 0
    assert "SIGTERM received: draining" in node.broker.log()


def test_a_second_node_on_the_same_http_port_exits_3(node: HttpNode, tmp_path: Path) -> None:
    wait_for("an ACTIVE /health", node.healthy, READY_TIMEOUT_S)
    workdir = tmp_path / "second"
    workdir.mkdir()
    config = {
        "ListenAddress": "127.0.0.1",
        "TCP": free_port(),
        "Workers": 1,
        "SessionStore": {"Type": "MEMORY"},
        **http_config(node.http_port),
        "NodeName": "second",
    }
    path = workdir / "meshmq.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = workdir / "second.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*_meshmq_command(), "-config", str(path)],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        code = proc.wait(20)
    finally:
        if proc.poll() is None:
            BrokerProcess(workdir=workdir, proc=proc).kill()
    text = log_path.read_text(errors="replace")
    assert code == 3, text
    assert re.search(rf"Http\.Port {node.http_port}\b.*cannot listen", text), text
    assert node.healthy() is not None  # the first node is untouched
