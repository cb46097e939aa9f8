"""mesh.http against a fake NodeView, over real HTTP on 127.0.0.1 (port 0).

Covers every route of `mesh/PROTOCOL.md` ("The HTTP API of a node") and its method (404, 405
with `Allow`), `/health` 200 vs 503, the Prometheus content type, the write endpoints' token
rules (403 without a configured token, 401 with `WWW-Authenticate` for a missing or wrong one,
202 with the right one and the view's `drain` called), `/api/ping` 400 / 504 / 200, a view that
raises (500 JSON, and the server keeps serving on the same connection), keep-alive, and that the
token never reaches the log.

Must not: talk to anything but the server the test started on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from mesh.http import JSON, PROMETHEUS, ApiError, HttpApi
from store.passwords import hash_password

TOKEN = "s3cret-token"
TIMEOUT_S = 5.0


@dataclass
class FakeView:
    """A NodeView with canned answers that records what it was asked."""

    healthy: bool = True
    ping_rtt_ms: float | None = 1.23456
    drain_ok: bool = True
    fail: str = ""  # the name of a method that raises
    store_down: bool = False  # the users and ACL methods raise ApiError 503
    calls: list[tuple[str, object]] = field(default_factory=list)
    accounts: dict[str, tuple[str, bool]] = field(default_factory=dict)  # name -> (hash, admin)
    rules: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # id -> (user, topic, access)
    version: int = 1

    def add_account(self, name: str, password: str, admin: bool) -> None:
        self.accounts[name] = (hash_password(password, log2_n=10), admin)  # cheap hashes in tests

    def _called(self, name: str, arg: object = None) -> None:
        self.calls.append((name, arg))
        if name == self.fail:
            raise RuntimeError(f"{name} broke")

    def health(self) -> tuple[bool, dict[str, object]]:
        self._called("health")
        state = "SAFE" if self.healthy else "MINORITY"
        return self.healthy, {"node": "n1", "clusterState": state, "clusterSafe": self.healthy}

    def metrics(self) -> str:
        self._called("metrics")
        return '# HELP meshmq_up up\n# TYPE meshmq_up gauge\nmeshmq_up{node="n1"} 1\n'

    def members(self) -> list[dict[str, object]]:
        self._called("members")
        return [{"name": "n1", "self": True}]

    def routes(self, topic_filter: str | None) -> list[dict[str, object]]:
        self._called("routes", topic_filter)
        return [{"filter": "a/#", "nodes": ["n1"]}]

    def sessions(self, client_id: str | None) -> list[dict[str, object]]:
        self._called("sessions", client_id)
        return [{"clientId": "c1", "node": "n1"}]

    def retained(self, topic_filter: str | None) -> dict[str, object]:
        self._called("retained", topic_filter)
        return {"count": 1, "topics": [{"topic": "a/b", "qos": 1, "bytes": 3}]}

    def stats(self) -> dict[str, object]:
        self._called("stats")
        return {"node": {"connections": 2}, "workers": {}, "links": {}}

    def ping(self, node: str, timeout_s: float) -> float | None:
        self._called("ping", (node, timeout_s))
        return self.ping_rtt_ms

    def drain(self, node: str | None) -> bool:
        self._called("drain", node)
        return self.drain_ok

    # users and ACL rules (a store in a dict)

    def _store(self, name: str, arg: object = None) -> None:
        self._called(name, arg)
        if self.store_down:
            raise ApiError(503, "the store did not answer within 2 s")

    def users(self) -> list[dict[str, object]]:
        self._store("users")
        return [{"username": n, "admin": a} for n, (_h, a) in sorted(self.accounts.items())]

    def put_user(self, username: str, password: str | None, admin: bool | None) -> tuple[int, bool]:
        self._store("put_user", (username, password, admin))
        old = self.accounts.get(username)
        if old is None and password is None:
            raise ApiError(400, "a new user needs a password")
        stored = hash_password(password, log2_n=10) if password is not None else old[0]  # type: ignore[index]
        self.accounts[username] = (stored, admin if admin is not None else (old is not None and old[1]))
        self.version += 1
        return self.version, old is None

    def delete_user(self, username: str) -> bool:
        self._store("delete_user", username)
        return self.accounts.pop(username, None) is not None

    def acl(self) -> list[dict[str, object]]:
        self._store("acl")
        return [{"id": i, "user": u, "topic": t, "access": a} for i, (u, t, a) in sorted(self.rules.items())]

    def add_acl(self, user: str, topic: str, access: str) -> tuple[int, int]:
        self._store("add_acl", (user, topic, access))
        rule_id = max(self.rules, default=0) + 1
        self.rules[rule_id] = (user, topic, access)
        self.version += 1
        return self.version, rule_id

    def delete_acl(self, rule_id: int) -> bool:
        self._store("delete_acl", rule_id)
        return self.rules.pop(rule_id, None) is not None

    def admin_hash(self, username: str) -> str | None:
        self._store("admin_hash", username)
        stored, admin = self.accounts.get(username, ("", False))
        return stored if admin else None

    def has_admin(self) -> bool:
        self._store("has_admin")
        return any(admin for _h, admin in self.accounts.values())


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> object:
        assert self.headers["Content-Type"] == JSON
        return json.loads(self.body)


class Client:
    """One keep-alive HTTP/1.1 connection to the server under test."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)

    def request(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: bytes | None = None,
        authorization: str | None = None,
    ) -> Reply:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        if authorization is not None:
            headers["Authorization"] = authorization
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        # every answer has a Content-Type and a Content-Length (mesh/http.py invariant)
        assert resp.headers["Content-Type"], f"{method} {path}: no Content-Type"
        assert resp.headers["Content-Length"] == str(len(data)), f"{method} {path}: Content-Length"
        return Reply(resp.status, resp.headers, data)

    def close(self) -> None:
        self.conn.close()


@dataclass
class Server:
    view: FakeView
    api: HttpApi
    client: Client

    def new_client(self) -> Client:
        return Client(self.api.port)


def _serve(token: str) -> Iterator[HttpApi]:
    api = HttpApi(FakeView(), "127.0.0.1", 0, token)
    api.start()
    try:
        yield api
    finally:
        api.close()  # up to half a second (serve_forever's poll): one server per module


@pytest.fixture(scope="module")
def _with_token() -> Iterator[HttpApi]:
    yield from _serve(TOKEN)


@pytest.fixture(scope="module")
def _without_token() -> Iterator[HttpApi]:
    yield from _serve("")


def _fresh(api: HttpApi) -> Iterator[Server]:
    """The module's server with a new fake view and a new connection for this test."""
    view = FakeView()
    api.view = view
    client = Client(api.port)
    try:
        yield Server(view, api, client)
    finally:
        client.close()


@pytest.fixture
def server(_with_token: HttpApi) -> Iterator[Server]:
    yield from _fresh(_with_token)


@pytest.fixture
def tokenless(_without_token: HttpApi) -> Iterator[Server]:
    yield from _fresh(_without_token)


# -- reads ----------------------------------------------------------------------------------------


def test_port_zero_gets_a_real_port(server: Server) -> None:
    assert server.api.port > 0


@pytest.mark.parametrize(
    ("path", "call", "body"),
    [
        ("/api/members", ("members", None), [{"name": "n1", "self": True}]),
        ("/api/routes", ("routes", None), [{"filter": "a/#", "nodes": ["n1"]}]),
        ("/api/routes?filter=a%2F%2B%2F%23", ("routes", "a/+/#"), [{"filter": "a/#", "nodes": ["n1"]}]),
        ("/api/sessions", ("sessions", None), [{"clientId": "c1", "node": "n1"}]),
        ("/api/sessions?client=c1", ("sessions", "c1"), [{"clientId": "c1", "node": "n1"}]),
        (
            "/api/retained?filter=a%2F%23",
            ("retained", "a/#"),
            {"count": 1, "topics": [{"topic": "a/b", "qos": 1, "bytes": 3}]},
        ),
        (
            "/api/retained",
            ("retained", None),
            {"count": 1, "topics": [{"topic": "a/b", "qos": 1, "bytes": 3}]},
        ),
        ("/api/stats", ("stats", None), {"node": {"connections": 2}, "workers": {}, "links": {}}),
    ],
)
def test_get_routes_answer_the_views_json(
    server: Server, path: str, call: tuple[str, object], body: object
) -> None:
    reply = server.client.request("GET", path)
    assert reply.status == 200
    assert reply.json() == body
    assert server.view.calls == [call]
    assert reply.headers["Cache-Control"] == "no-store"


def test_health_is_200_when_the_view_says_healthy(server: Server) -> None:
    reply = server.client.request("GET", "/health")
    assert reply.status == 200
    assert reply.json() == {"node": "n1", "clusterState": "SAFE", "clusterSafe": True}


def test_health_is_503_with_the_same_body_when_not(server: Server) -> None:
    server.view.healthy = False
    reply = server.client.request("GET", "/health")
    assert reply.status == 503
    assert reply.json() == {"node": "n1", "clusterState": "MINORITY", "clusterSafe": False}


def test_metrics_are_prometheus_text(server: Server) -> None:
    reply = server.client.request("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == PROMETHEUS
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert reply.body.decode() == server.view.metrics()


# -- unknown paths and wrong methods --------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/", "/nope", "/api", "/health/", "/api/members/x"])
def test_unknown_paths_are_404(server: Server, method: str, path: str) -> None:
    reply = server.client.request(method, path, token=TOKEN)
    assert reply.status == 404
    assert "error" in reply.json()  # type: ignore[operator]
    assert server.view.calls == []


GET_ROUTES = [
    "/health",
    "/metrics",
    "/api/members",
    "/api/routes",
    "/api/sessions",
    "/api/retained",
    "/api/stats",
]
POST_ROUTES = ["/api/ping?node=n2", "/api/drain?node=n2", "/admin/shutdown"]


@pytest.mark.parametrize("path", GET_ROUTES)
def test_post_to_a_read_route_is_405_with_allow_get(server: Server, path: str) -> None:
    reply = server.client.request("POST", path, token=TOKEN)
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET"
    assert server.view.calls == []


@pytest.mark.parametrize("path", POST_ROUTES)
def test_get_on_a_write_route_is_405_with_allow_post(server: Server, path: str) -> None:
    reply = server.client.request("GET", path, token=TOKEN)
    assert reply.status == 405
    assert reply.headers["Allow"] == "POST"
    assert server.view.calls == []


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_other_methods_are_405_too(server: Server, method: str) -> None:
    reply = server.client.request(method, "/health", token=TOKEN)
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET"


# -- write endpoints and the admin token --------------------------------------------------------------


@pytest.mark.parametrize("path", POST_ROUTES)
def test_writes_are_403_when_no_token_is_configured(tokenless: Server, path: str) -> None:
    for token in (None, "", "anything"):
        reply = tokenless.client.request("POST", path, token=token)
        assert reply.status == 403
        assert "AdminToken" in str(reply.json())
    assert {name for name, _ in tokenless.view.calls} == {"has_admin"}  # nothing else was asked


@pytest.mark.parametrize("path", POST_ROUTES)
@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", TOKEN[:-1], ""])
def test_writes_are_401_with_a_missing_or_wrong_token(server: Server, path: str, token: str | None) -> None:
    reply = server.client.request("POST", path, token=token)
    assert reply.status == 401
    assert reply.headers.get_all("WWW-Authenticate") == [
        'Bearer realm="meshmq"',
        'Basic realm="meshmq", charset="UTF-8"',
    ]
    assert server.view.calls == []


def test_a_token_without_the_bearer_scheme_is_401(server: Server) -> None:
    server.client.conn.request("POST", "/admin/shutdown", headers={"Authorization": TOKEN})
    resp = server.client.conn.getresponse()
    resp.read()
    assert resp.status == 401
    assert server.view.calls == []


def test_admin_shutdown_with_the_token_drains_this_node(server: Server) -> None:
    reply = server.client.request("POST", "/admin/shutdown", token=TOKEN)
    assert reply.status == 202
    assert reply.json() == {"draining": "self"}
    assert server.view.calls == [("drain", None)]


def test_drain_of_a_node_with_the_token(server: Server) -> None:
    reply = server.client.request("POST", "/api/drain?node=n3", token=TOKEN)
    assert reply.status == 202
    assert reply.json() == {"draining": "n3"}
    assert server.view.calls == [("drain", "n3")]


def test_drain_of_an_unknown_node_is_404(server: Server) -> None:
    server.view.drain_ok = False
    reply = server.client.request("POST", "/api/drain?node=n9", token=TOKEN)
    assert reply.status == 404
    assert server.view.calls == [("drain", "n9")]


def test_a_post_body_is_read_and_ignored(server: Server) -> None:
    reply = server.client.request("POST", "/admin/shutdown", token=TOKEN, body=b'{"x": 1}')
    assert reply.status == 202
    reply = server.client.request("GET", "/health")  # the body did not spill into this request
    assert reply.status == 200


@pytest.mark.parametrize("path", ["/health", "/nope"])
def test_a_refused_post_body_does_not_spill_into_the_next_request(server: Server, path: str) -> None:
    reply = server.client.request("POST", path, token=TOKEN, body=b"abc")
    assert reply.status in (404, 405)
    reply = server.client.request("GET", "/health")
    assert reply.status == 200


def test_a_body_over_64_kib_does_not_spill_into_the_next_request(server: Server) -> None:
    conn = server.client.conn
    conn.request("POST", "/admin/shutdown", body=b"x" * 70_000, headers={"Authorization": f"Bearer {TOKEN}"})
    resp = conn.getresponse()
    resp.read()
    if resp.will_close:  # refusing and closing is fine too
        return
    reply = server.client.request("GET", "/health")
    assert reply.status == 200


def test_a_bad_content_length_is_answered(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.api.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"POST /admin/shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert server.view.calls == []


# -- ping ---------------------------------------------------------------------------------------------


def test_ping_without_a_node_is_400(server: Server) -> None:
    for path in ("/api/ping", "/api/ping?node="):
        reply = server.client.request("POST", path, token=TOKEN)
        assert reply.status == 400
    assert server.view.calls == []


def test_ping_without_an_answer_is_504(server: Server) -> None:
    server.view.ping_rtt_ms = None
    reply = server.client.request("POST", "/api/ping?node=n2", token=TOKEN)
    assert reply.status == 504
    assert "n2" in str(reply.json())
    assert server.view.calls == [("ping", ("n2", 2.0))]


def test_ping_answers_the_round_trip(server: Server) -> None:
    reply = server.client.request("POST", "/api/ping?node=n2", token=TOKEN)
    assert reply.status == 200
    assert reply.json() == {"node": "n2", "rttMs": 1.235}


# -- errors and connections ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fail", "method", "path"),
    [
        ("health", "GET", "/health"),
        ("metrics", "GET", "/metrics"),
        ("members", "GET", "/api/members"),
        ("routes", "GET", "/api/routes"),
        ("sessions", "GET", "/api/sessions"),
        ("retained", "GET", "/api/retained"),
        ("stats", "GET", "/api/stats"),
        ("ping", "POST", "/api/ping?node=n2"),
        ("drain", "POST", "/admin/shutdown"),
    ],
)
def test_a_view_that_raises_is_500_json_and_the_server_keeps_serving(
    server: Server, caplog: pytest.LogCaptureFixture, fail: str, method: str, path: str
) -> None:
    server.view.fail = fail
    with caplog.at_level(logging.ERROR, logger="mesh.http"):
        reply = server.client.request(method, path, token=TOKEN)
    assert reply.status == 500
    assert reply.json() == {"error": "internal error (see the node's log)"}
    assert any(f"{path.split('?')[0]} failed" in r.getMessage() for r in caplog.records)
    server.view.fail = ""
    sock = server.client.conn.sock
    reply = server.client.request("GET", "/api/members")  # the same connection still works
    assert reply.status == 200
    assert server.client.conn.sock is sock
    other = server.new_client()  # and so do new ones
    try:
        assert other.request("GET", "/health").status == 200
    finally:
        other.close()


def test_keep_alive_serves_two_requests_on_one_connection(server: Server) -> None:
    conn = server.client.conn
    conn.request("GET", "/health")
    first = conn.getresponse()
    first.read()
    assert first.status == 200
    assert first.version == 11
    assert not first.will_close
    sock = conn.sock
    assert sock is not None
    conn.request("GET", "/metrics")
    second = conn.getresponse()
    second.read()
    assert second.status == 200
    assert conn.sock is sock  # http.client would have opened a new socket had the server closed


def test_several_connections_at_once(server: Server) -> None:
    clients = [server.new_client() for _ in range(4)]
    try:
        for c in clients:  # each holds its connection open while the next is served
            assert c.request("GET", "/health").status == 200
        for c in clients:
            assert c.request("GET", "/api/stats").status == 200
    finally:
        for c in clients:
            c.close()


def test_the_token_is_never_logged(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="mesh.http"):
        server.client.request("POST", "/admin/shutdown", token=TOKEN)
        server.client.request("POST", "/admin/shutdown", token="wrong-" + TOKEN)
        server.client.request("GET", "/health")
    assert caplog.records  # the requests were logged at debug level
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


def test_close_stops_the_server() -> None:
    api = HttpApi(FakeView(), "127.0.0.1", 0, TOKEN)
    api.start()
    port = api.port
    api.close()
    api.thread.join(TIMEOUT_S)
    assert not api.thread.is_alive()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    with pytest.raises(OSError):
        conn.request("GET", "/health")
        conn.getresponse()
    conn.close()
