"""tools.meshctl against fakes: a small HTTP server on 127.0.0.1 serving the spec's JSON
(`mesh/PROTOCOL.md`, "The HTTP API of a node") and a tiny scripted MQTT broker for `tap`; one
e2e test taps a real single MeshMQ node.

Covers every command's table and --json, the global options before and after the command and
from the environment, the error paths (refused, timeout, 401/403, 404, 500, bad JSON, wrong
shape) as one `meshctl: <what> (<url>)` line with exit 1, health's exit codes, usage errors (2).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from broker.protocol.codec import Decoder, encode
from broker.protocol.packets import (
    Connack,
    Connect,
    Disconnect,
    Packet,
    ProtocolVersion,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
)
from tools import meshctl
from tools.meshctl_client import parse_address
from tools.meshctl_render import preview, table
from tools.meshctl_tap import TapMessage, tap

MEMBERS = [
    {"name": "n1", "address": "127.0.0.2:20002", "state": "ALIVE", "incarnation": 3, "rttMs": None, "clients": 2, "self": True},
    {"name": "n2", "address": "127.0.0.3:20004", "state": "ALIVE", "incarnation": 1, "rttMs": 0.412, "clients": 0, "self": False},
    {"name": "n3", "address": "127.0.0.4:20006", "state": "SUSPECT", "incarnation": 17, "rttMs": 12.5, "clients": 10, "self": False},
]  # fmt: skip
HEALTH = {
    "node": "n1", "version": "0.1.0", "nodeState": "ACTIVE", "clusterState": "ACTIVE",
    "clusterSafe": True, "nodeCount": 3, "clusterSize": 3, "store": "ok", "workers": 2,
}  # fmt: skip
ROUTES = [{"filter": "a/+/c", "nodes": ["n1", "n3"]}, {"filter": "#", "nodes": ["n2"]}]
SESSIONS = [
    {"clientId": "sensor-1", "node": "n2", "worker": 1, "epoch": 4, "online": True},
    {"clientId": "archiver", "node": None, "worker": None, "epoch": 2, "online": False, "queued": 42},
]
RETAINED = {
    "count": 3,
    "topics": [{"topic": "a/b", "qos": 1, "bytes": 5}, {"topic": "status/n1", "qos": 0, "bytes": 120}],
}
STATS = {
    "node": {"connections": 3, "messagesIn": 1200, "storeLatencyMs": 1.5},
    "workers": {"1": {"connections": 2, "messagesIn": 700}, "2": {"connections": 1, "messagesIn": 500}},
    "links": {"n2": {"sent": 10, "received": 9, "resends": 0, "unacked": 1, "rttMs": 0.25, "drops": 4}},
}


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    body: bytes = b""
    content_type: str | None = None


@dataclass
class FakeNode:
    """Canned answers by (method, path); records each request."""

    answers: dict[tuple[str, str], tuple[int, bytes]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    address: str = ""

    def answer(self, method: str, path: str, body: object, status: int = 200) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers[(method, path)] = (status, data)


@pytest.fixture
def node() -> Iterator[FakeNode]:
    fake = FakeNode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _reply(self, method: str) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            authorization, content_type = self.headers.get("Authorization"), self.headers.get("Content-Type")
            fake.seen.append(Seen(method, url.path, query, authorization, body, content_type))
            status, data = fake.answers.get((method, url.path), (404, b'{"error": "no such path"}'))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._reply("GET")

        def do_POST(self) -> None:
            self._reply("POST")

        def do_DELETE(self) -> None:
            self._reply("DELETE")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    fake.address = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(node: FakeNode, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """run("members", ...) → (exit code, stdout, stderr), against the fake node."""
    for name in ("MESHMQ_TOKEN", "MESHMQ_USER", "MESHMQ_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MESHMQ_NODE", node.address)

    def go(*argv: str) -> tuple[int, str, str]:
        code = meshctl.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return go


# --- tables and --json ---------------------------------------------------------------------------


def test_members_table_and_json(node: FakeNode, run: Run) -> None:
    node.answer("GET", "/api/members", MEMBERS)
    code, out, err = run("members")
    assert (code, err) == (0, "")
    assert out == (
        "NAME  ADDRESS          STATE    INCARNATION      RTT  CLIENTS\n"
        "n1*   127.0.0.2:20002  ALIVE              3        -        2\n"
        "n2    127.0.0.3:20004  ALIVE              1   0.41ms        0\n"
        "n3    127.0.0.4:20006  SUSPECT           17  12.50ms       10\n"
        "(* the node that answered)\n"
    )
    code, out, _ = run("members", "--json")
    assert code == 0 and json.loads(out) == MEMBERS and out.startswith("[\n  {")


def test_health_fields_and_exit_codes(node: FakeNode, run: Run) -> None:
    node.answer("GET", "/health", HEALTH)
    code, out, err = run("health")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "node          n1"
    assert "clusterSafe   true" in lines and "workers       2" in lines
    assert lines[-1] == "status        healthy (HTTP 200)"
    unhealthy = {**HEALTH, "nodeState": "DRAINING"}
    node.answer("GET", "/health", unhealthy, status=503)
    code, out, err = run("health")
    assert (code, err) == (1, "") and out.splitlines()[-1] == "status        unhealthy (HTTP 503)"
    code, out, _ = run("--json", "health")
    assert code == 1 and json.loads(out) == unhealthy


def test_routes_with_filter_sends_it_encoded(node: FakeNode, run: Run) -> None:
    node.answer("GET", "/api/routes", ROUTES)
    assert run("routes", "a/+/#") == (0, "FILTER  NODES\na/+/c   n1,n3\n#       n2\n", "")
    assert node.seen[-1].query == {"filter": "a/+/#"}
    assert run("routes")[0] == 0 and node.seen[-1].query == {}
    assert json.loads(run("routes", "--json")[1]) == ROUTES


def test_sessions_table(node: FakeNode, run: Run) -> None:
    node.answer("GET", "/api/sessions", SESSIONS)
    code, out, _ = run("sessions", "sensor-1")
    assert code == 0 and node.seen[-1].query == {"client": "sensor-1"}
    assert out == (
        "CLIENT    NODE  WORKER  ONLINE  QUEUED\n"
        "sensor-1  n2         1  yes          -\n"
        "archiver  -          -  no          42\n"
    )
    assert json.loads(run("--json", "sessions")[1]) == SESSIONS


def test_retained_count_and_topics(node: FakeNode, run: Run) -> None:
    node.answer("GET", "/api/retained", RETAINED)
    code, out, _ = run("retained", "status/#")
    assert code == 0 and node.seen[-1].query == {"filter": "status/#"}
    assert out == (
        "3 retained messages (showing 2)\nTOPIC      QOS  BYTES\na/b          1      5\nstatus/n1    0    120\n"
    )
    node.answer("GET", "/api/retained", {"count": 0, "topics": []})
    assert run("retained")[1] == "0 retained messages\nTOPIC  QOS  BYTES\n(none)\n"
    node.answer("GET", "/api/retained", RETAINED)
    assert json.loads(run("retained", "--json")[1]) == RETAINED


def test_stats_per_node_worker_and_link(node: FakeNode, run: Run) -> None:
    node.answer("GET", "/api/stats", STATS)
    code, out, _ = run("stats")
    assert code == 0
    assert out == (
        "NODE COUNTER    VALUE\n"
        "connections         3\n"
        "messagesIn       1200\n"
        "storeLatencyMs    1.5\n"
        "\n"
        "WORKER COUNTER    1    2\n"
        "connections       2    1\n"
        "messagesIn      700  500\n"
        "\n"
        "PEER  SENT  RECEIVED  RESENDS  UNACKED     RTT  DROPS\n"
        "n2      10         9        0        1  0.25ms      4\n"
    )
    assert json.loads(run("stats", "--json")[1]) == STATS


def test_ping_sends_the_token_and_prints_the_rtt(node: FakeNode, run: Run) -> None:
    node.answer("POST", "/api/ping", {"node": "n3", "rttMs": 0.52})
    assert run("ping", "n3", "--token", "t0ken") == (0, "n3: rtt 0.520 ms\n", "")
    assert (node.seen[-1].query, node.seen[-1].authorization) == ({"node": "n3"}, "Bearer t0ken")
    assert json.loads(run("--json", "--token", "t0ken", "ping", "n3")[1]) == {"node": "n3", "rttMs": 0.52}


def test_drain_with_token_from_the_environment(
    node: FakeNode, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.answer("POST", "/api/drain", {"draining": "n3"}, status=202)
    monkeypatch.setenv("MESHMQ_TOKEN", "t0ken")
    assert run("drain", "n3") == (0, "draining n3\n", "")
    assert (node.seen[-1].method, node.seen[-1].query) == ("POST", {"node": "n3"})
    assert node.seen[-1].authorization == "Bearer t0ken"
    assert json.loads(run("drain", "n3", "--json")[1]) == {"draining": "n3"}


# --- errors -------------------------------------------------------------------------------------


def test_missing_wrong_and_refused_tokens(node: FakeNode, run: Run) -> None:
    node.answer("POST", "/api/drain", {"error": "missing or wrong admin token"}, status=401)
    code, out, err = run("drain", "n3")
    url = f"http://{node.address}/api/drain?node=n3"
    assert (code, out) == (1, "")
    assert err == (
        "meshctl: admin credentials are missing: pass --token or set MESHMQ_TOKEN, or --user/--password "
        f"of an admin user (the node says: missing or wrong admin token) ({url})\n"
    )
    assert node.seen[-1].authorization is None
    assert run("drain", "n3", "--token", "nope")[2].startswith("meshctl: the admin token is wrong")
    node.answer("POST", "/api/drain", {"error": "write endpoints are off: set Http.AdminToken"}, status=403)
    err = run("--token", "x", "drain", "n3")[2]
    assert err.startswith("meshctl: the node refuses admin requests (the node says: write endpoints are off")


def test_http_errors_are_one_line_with_the_url(node: FakeNode, run: Run) -> None:
    code, out, err = run("members")  # nothing canned: the fake says 404
    assert (code, out) == (1, "")
    assert err == f"meshctl: HTTP 404 Not Found: no such path (http://{node.address}/api/members)\n"
    node.answer("POST", "/api/ping", {"error": "no answer from node 'n9' within 2 s"}, status=504)
    err = run("ping", "n9", "--token", "t")[2]
    assert err.startswith("meshctl: HTTP 504 Gateway Timeout: no answer from node 'n9' within 2 s (")
    node.answer("GET", "/api/stats", b"<html>oops</html>", status=500)
    assert run("stats")[2].startswith("meshctl: HTTP 500 Internal Server Error: <html>oops</html> (")


def test_bad_json_and_wrong_shapes(node: FakeNode, run: Run) -> None:
    node.answer("GET", "/api/members", b"{not json")
    assert run("members") == (
        1,
        "",
        f"meshctl: the node's answer is not valid JSON (http://{node.address}/api/members)\n",
    )
    node.answer("GET", "/api/members", {"members": []})
    assert run("members")[2].startswith("meshctl: unexpected answer: the members answer is not a JSON list (")
    node.answer("GET", "/api/members", [{"name": "n1", "state": "ALIVE", "clients": "many"}])
    assert "member 1: 'clients' is not an integer" in run("members", "--json")[2]  # checked in --json too
    node.answer("GET", "/api/retained", {"topics": []})
    assert "the retained answer: 'count' is missing" in run("retained")[2]


def test_connection_refused(run: Run) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = run("health", "--node", f"127.0.0.1:{port}")
    assert (code, out) == (1, "")
    assert (
        err
        == f"meshctl: connection refused: is the node's Http.Port right? (http://127.0.0.1:{port}/health)\n"
    )


def test_timeout_when_the_node_does_not_answer(run: Run) -> None:
    with socket.socket() as s:  # listens, never accepts: the connect succeeds, no answer comes
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        port = s.getsockname()[1]
        started = time.monotonic()
        code, _out, err = run("--timeout", "0.3", "members", "--node", f"127.0.0.1:{port}")
        assert time.monotonic() - started < 3
    assert code == 1 and err == f"meshctl: no answer within 0.3 s (http://127.0.0.1:{port}/api/members)\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["--node", "host:notaport", "members"],
        ["members", "--timeout", "0"],
        ["ping"],
        ["drain"],
        ["tap", "--count", "0"],
        ["routes", "a", "b"],
    ],
)
def test_usage_errors_exit_2(run: Run, argv: list[str]) -> None:
    code, out, err = run(*argv)
    assert (code, out) == (2, "") and err and "Traceback" not in err


def test_node_address_forms() -> None:
    assert parse_address("n1.lan", 8080) == ("n1.lan", 8080)
    assert parse_address("10.0.0.1:9000", 8080) == ("10.0.0.1", 9000)
    assert parse_address("[::1]:9000", 8080) == ("::1", 9000)
    assert parse_address("::1", 8080) == ("::1", 8080)
    for bad in (":80", "h:0", "h:70000", "[::1", "[::1]x"):
        with pytest.raises(ValueError):
            parse_address(bad, 8080)


def test_table_and_preview() -> None:
    assert table(("A", "N"), [("x", "1"), ("long", "100")]) == "A       N\nx       1\nlong  100\n"
    assert table(("A", "B"), []) == "A  B\n(none)\n"
    assert preview(b"hello\nworld") == "hello.world"
    assert preview(b"\xff\x00ab") == "..ab"
    assert preview(b"x" * 100, 10) == "x" * 10 + "..."


# --- tap ----------------------------------------------------------------------------------------

V311 = ProtocolVersion.V311


class FakeBroker:
    """Accepts one client and plays a script: CONNACK, SUBACK, three PUBLISHes (QoS 0, 1, 2) with
    their acknowledgements checked; records what the client sent."""

    def __init__(self, connack: int = 0, granted: int = 2, publishes: int = 3) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connack, self.granted, self.publishes = connack, granted, publishes
        self.got: list[Packet] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(5)
        conn, _ = self.listener.accept()
        conn.settimeout(5)
        decoder = Decoder()
        pending: list[Packet] = []

        def read() -> Packet | None:
            while not pending:
                data = conn.recv(4096)
                if not data:
                    return None
                pending.extend(decoder.feed(data))
            return pending.pop(0)

        with conn:
            while (packet := read()) is not None:
                self.got.append(packet)
                if isinstance(packet, Connect):
                    conn.sendall(encode(Connack(reason_code=self.connack), V311))
                elif isinstance(packet, Subscribe):
                    conn.sendall(encode(Suback(packet.packet_id, (self.granted,)), V311))
                    messages = [
                        Publish("t/0", b"zero", 0, retain=True),
                        Publish("t/1", b"\xff\x01binary", 1, packet_id=7),
                        Publish("t/2", b"two", 2, packet_id=8),
                    ]
                    if self.granted >= 0x80:
                        continue  # a refused subscription gets nothing (the client leaves)
                    for message in messages[: self.publishes]:
                        conn.sendall(encode(message, V311))
                elif isinstance(packet, Pubrec):
                    conn.sendall(encode(Pubrel(packet.packet_id), V311))
                elif isinstance(packet, Disconnect):
                    return

    def close(self) -> None:
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def fake_broker() -> Iterator[Callable[..., FakeBroker]]:
    made: list[FakeBroker] = []

    def make(**kwargs: Any) -> FakeBroker:
        made.append(FakeBroker(**kwargs))
        return made[-1]

    yield make
    for broker in made:
        broker.close()


def test_tap_prints_each_message_and_acknowledges(run: Run, fake_broker: Callable[..., FakeBroker]) -> None:
    broker = fake_broker()
    code, out, err = run("tap", "t/#", "--mqtt", f"127.0.0.1:{broker.port}", "--count", "3")
    assert (code, err) == (0, "")
    assert out == "t/0 0 4 zero\nt/1 1 8 ..binary\nt/2 2 3 two\n"
    broker.close()
    connect, subscribe = broker.got[0], broker.got[1]
    assert (
        isinstance(connect, Connect) and connect.clean_start and connect.client_id.startswith("meshctl-tap-")
    )
    assert isinstance(subscribe, Subscribe) and subscribe.subscriptions[0].topic_filter == "t/#"
    acks = [p for p in broker.got if isinstance(p, Puback | Pubrec | Pubcomp)]
    assert acks == [Puback(7), Pubrec(8)] or acks == [Puback(7), Pubrec(8), Pubcomp(8)]
    assert isinstance(broker.got[-1], Disconnect)


def test_tap_json_lines(run: Run, fake_broker: Callable[..., FakeBroker]) -> None:
    broker = fake_broker(publishes=2)
    code, out, _ = run("--json", "tap", "--mqtt", f"127.0.0.1:{broker.port}", "--count", "2")
    assert code == 0
    first, second = (json.loads(line) for line in out.splitlines())
    assert first == {
        "topic": "t/0",
        "qos": 0,
        "retain": True,
        "bytes": 4,
        "payload": "zero",
        "encoding": "utf-8",
    }
    assert second["encoding"] == "base64" and second["payload"] == "/wFiaW5hcnk="


def test_tap_stops_after_seconds(run: Run, fake_broker: Callable[..., FakeBroker]) -> None:
    broker = fake_broker(publishes=0)
    started = time.monotonic()
    assert run("tap", "--mqtt", f"127.0.0.1:{broker.port}", "--seconds", "0.3") == (0, "", "")
    assert 0.3 <= time.monotonic() - started < 3


def test_tap_refusals(run: Run, fake_broker: Callable[..., FakeBroker]) -> None:
    broker = fake_broker(connack=5)
    code, _, err = run("tap", "--mqtt", f"127.0.0.1:{broker.port}", "--count", "1")
    assert (
        code == 1
        and err
        == f"meshctl: the broker refused the connection (CONNACK code 5) (mqtt://127.0.0.1:{broker.port})\n"
    )
    broker = fake_broker(granted=0x80)
    code, _, err = run("tap", "bad/#", "--mqtt", f"127.0.0.1:{broker.port}", "--count", "1")
    assert code == 1 and err.startswith("meshctl: the broker refused the subscription to 'bad/#' (")


def test_tap_default_mqtt_address_is_the_node_host_on_1883(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int]] = []

    def fake_tap(host: str, port: int, *_a: object, **_k: object) -> int:
        seen.append((host, port))
        return 0

    monkeypatch.setattr(meshctl, "tap", fake_tap)
    assert run("tap", "--node", "127.0.0.9:8081")[0] == 0
    assert seen == [("127.0.0.9", 1883)]


@pytest.mark.e2e
def test_tap_against_a_real_node(tmp_path: Path) -> None:
    from tests.e2e.broker_proc import BROKER_KIND, BrokerProcess
    from tests.e2e.clients import TestClient

    if BROKER_KIND != "meshmq":
        pytest.skip("MeshMQ only")
    broker = BrokerProcess(workdir=tmp_path).start()
    got: list[TapMessage] = []
    result: list[int] = []

    def watch() -> None:
        result.append(tap(broker.host, broker.port, "tap/#", got.append, timeout_s=5, count=3, seconds=15))

    try:
        with TestClient(broker, "pub") as pub:
            pub.connect()
            pub.publish("tap/r", b"kept", qos=1, retain=True)
            tapper = threading.Thread(target=watch, daemon=True)
            tapper.start()
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                time.sleep(0.02)  # the retained message shows: the subscription is in force
            pub.publish("tap/a", b"one", qos=0)
            pub.publish("tap/b", b"two", qos=2)
            tapper.join(15)
    finally:
        broker.stop()
    assert result == [3]
    assert [(m.topic, m.qos, m.retain, m.payload) for m in got] == [
        ("tap/r", 1, True, b"kept"),
        ("tap/a", 0, False, b"one"),
        ("tap/b", 2, False, b"two"),
    ]
