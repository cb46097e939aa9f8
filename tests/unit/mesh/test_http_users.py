"""mesh.http's users and ACL endpoints and its admin credentials, against a fake NodeView.

Covers (`mesh/PROTOCOL.md`, "The HTTP API of a node"): GET/POST /api/users, DELETE
/api/users/<name> (URL-decoded), GET/POST /api/acl, DELETE /api/acl/<id>; 405 with `Allow` for
the new routes; JSON bodies (400 for bad JSON, a non-object, an unknown field, a wrong type, a
missing field, an empty password; 411 for a chunked body); admin credentials: the Bearer token or
HTTP Basic of an admin user (a non-admin, an unknown user, a wrong password: 401 with both
challenges; no token and no admin user: 403), the Basic memory (one scrypt per user and stored
hash; a changed password forgets it); a view's ApiError (503) as its status; that no password,
hash or token reaches the log or an answer.

Must not: talk to anything but the server the test started on 127.0.0.1.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
from collections.abc import Iterator

import pytest

from mesh.http import HttpApi
from store.passwords import verify_password
from tests.unit.mesh.test_http import TOKEN, Client, FakeView, Server

ADMIN, ADMIN_PASSWORD = "root", "pa:ss wörd"  # a colon and non-ASCII: RFC 7617 UTF-8


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _serve(token: str) -> Iterator[HttpApi]:
    api = HttpApi(FakeView(), "127.0.0.1", 0, token)
    api.start()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="module")
def _with_token() -> Iterator[HttpApi]:
    yield from _serve(TOKEN)


@pytest.fixture(scope="module")
def _without_token() -> Iterator[HttpApi]:
    yield from _serve("")


def _fresh(api: HttpApi) -> Iterator[Server]:
    view = FakeView()
    view.add_account(ADMIN, ADMIN_PASSWORD, admin=True)
    view.add_account("bob", "bobs-password", admin=False)
    view.calls.clear()
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


def post_json(server: Server, path: str, body: object, auth: str | None = None) -> tuple[int, object]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = server.client.request("POST", path, token=None if auth else TOKEN, body=data, authorization=auth)
    return reply.status, reply.json()


def last_call(server: Server) -> tuple[str, object]:
    return server.view.calls[-1]


# -- users ----------------------------------------------------------------------------------------


def test_list_users_needs_admin_credentials_and_shows_no_hash(server: Server) -> None:
    reply = server.client.request("GET", "/api/users")
    assert reply.status == 401
    reply = server.client.request("GET", "/api/users", token=TOKEN)
    assert reply.status == 200
    assert reply.json() == [{"username": "bob", "admin": False}, {"username": ADMIN, "admin": True}]
    assert b"scrypt" not in reply.body


def test_create_then_change_a_user(server: Server) -> None:
    status, body = post_json(server, "/api/users", {"username": "carol", "password": "pw1", "admin": True})
    assert status == 201
    assert body == {"username": "carol", "created": True, "version": 2}
    assert last_call(server) == ("put_user", ("carol", "pw1", True))
    status, body = post_json(server, "/api/users", {"username": "carol", "admin": False})
    assert status == 200
    assert body == {"username": "carol", "created": False, "version": 3}
    assert last_call(server) == ("put_user", ("carol", None, False))
    status, body = post_json(server, "/api/users", {"username": "carol", "password": "pw2", "admin": None})
    assert (status, last_call(server)) == (200, ("put_user", ("carol", "pw2", None)))


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "not valid JSON"),
        (b"{nope", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'["carol"]', "must be a JSON object"),
        (b'{"username": "carol", "passwd": "x"}', "unknown field 'passwd'"),
        (b'{"username": 7, "password": "x"}', "'username' must be a string"),
        (b'{"username": "carol", "admin": "yes"}', "'admin' must be a true or false"),
        (b'{"username": "carol", "admin": 1}', "'admin' must be a true or false"),
        (b'{"password": "x"}', "'username' is missing"),
        (b'{"username": null, "password": "x"}', "'username' is missing"),
        (b'{"username": "carol", "password": ""}', "the password is empty"),
    ],
)
def test_bad_user_bodies_are_400(server: Server, body: bytes, error: str) -> None:
    status, answer = post_json(server, "/api/users", body)
    assert status == 400
    assert error in str(answer)
    assert [name for name, _ in server.view.calls if name == "put_user"] == []


def test_the_views_refusal_is_its_status(server: Server) -> None:
    status, answer = post_json(server, "/api/users", {"username": "dave", "admin": True})
    assert (status, answer) == (400, {"error": "a new user needs a password"})


def test_delete_a_user_url_decoded(server: Server) -> None:
    server.view.add_account("a/#", "x", admin=False)
    reply = server.client.request("DELETE", "/api/users/a%2F%23", token=TOKEN)
    assert (reply.status, reply.json()) == (200, {"deleted": "a/#"})
    reply = server.client.request("DELETE", "/api/users/a%2F%23", token=TOKEN)
    assert reply.status == 404
    assert "no user 'a/#'" in str(reply.json())
    reply = server.client.request("DELETE", "/api/users/%ff", token=TOKEN)
    assert reply.status == 400
    reply = server.client.request("DELETE", "/api/users/bob")  # no credentials
    assert reply.status == 401
    assert "bob" in server.view.accounts


# -- ACL rules --------------------------------------------------------------------------------------


def test_add_list_and_delete_rules(server: Server) -> None:
    status, body = post_json(server, "/api/acl", {"user": "bob", "topic": "bob/#", "access": "both"})
    assert (status, body) == (201, {"id": 1, "version": 2})
    assert last_call(server) == ("add_acl", ("bob", "bob/#", "both"))
    reply = server.client.request("GET", "/api/acl", token=TOKEN)
    assert reply.json() == [{"id": 1, "user": "bob", "topic": "bob/#", "access": "both"}]
    assert server.client.request("GET", "/api/acl").status == 401
    reply = server.client.request("DELETE", "/api/acl/1", token=TOKEN)
    assert (reply.status, reply.json()) == (200, {"deleted": 1})
    reply = server.client.request("DELETE", "/api/acl/1", token=TOKEN)
    assert (reply.status, reply.json()) == (404, {"error": "no ACL rule 1"})


@pytest.mark.parametrize("rule_id", ["x", "-1", "1.5", "%C2%B2", "9" * 19])
def test_a_rule_id_that_is_not_a_number_is_400(server: Server, rule_id: str) -> None:
    reply = server.client.request("DELETE", f"/api/acl/{rule_id}", token=TOKEN)
    assert reply.status == 400
    assert "whole number" in str(reply.json())


@pytest.mark.parametrize(
    "body",
    [
        {"user": "bob", "topic": "t"},
        {"user": "bob", "topic": "t", "access": 1},
        {"user": "bob", "topic": "t", "access": "pub", "extra": 1},
    ],
)
def test_bad_rule_bodies_are_400(server: Server, body: object) -> None:
    assert post_json(server, "/api/acl", body)[0] == 400
    assert [name for name, _ in server.view.calls if name == "add_acl"] == []


# -- routes and methods ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/api/users", "GET, POST"),
        ("DELETE", "/api/acl", "GET, POST"),
        ("GET", "/api/users/bob", "DELETE"),
        ("POST", "/api/acl/1", "DELETE"),
    ],
)
def test_wrong_methods_are_405(server: Server, method: str, path: str, allow: str) -> None:
    reply = server.client.request(method, path, token=TOKEN)
    assert reply.status == 405
    assert reply.headers["Allow"] == allow
    assert server.view.calls == []


@pytest.mark.parametrize("path", ["/api/users/", "/api/acl/", "/api/userss"])
def test_no_parameter_is_404(server: Server, path: str) -> None:
    assert server.client.request("DELETE", path, token=TOKEN).status == 404


def test_a_chunked_body_is_refused_and_closed(server: Server) -> None:
    conn = server.client.conn
    conn.request(
        "POST",
        "/api/users",
        body=iter([b'{"username": "x"}']),
        headers={"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"},
    )
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 411
    assert resp.will_close


def test_a_store_that_is_down_is_503(server: Server) -> None:
    server.view.store_down = True
    reply = server.client.request("GET", "/api/users", token=TOKEN)
    assert reply.status == 503
    assert reply.json() == {"error": "the store did not answer within 2 s"}
    reply = server.client.request("GET", "/api/acl", authorization=basic(ADMIN, ADMIN_PASSWORD))
    assert reply.status == 503  # the credential check itself needs the store
    assert server.client.request("GET", "/health").status == 200  # the same connection goes on


# -- Basic credentials of an admin user -----------------------------------------------------------------


def test_basic_of_an_admin_user_opens_every_admin_endpoint(server: Server) -> None:
    auth = basic(ADMIN, ADMIN_PASSWORD)
    assert server.client.request("GET", "/api/users", authorization=auth).status == 200
    status, _ = post_json(server, "/api/users", {"username": "eve", "password": "x"}, auth=auth)
    assert status == 201
    assert server.client.request("POST", "/api/drain?node=n2", authorization=auth).status == 202
    assert server.client.request("DELETE", "/api/users/eve", authorization=auth).status == 200


@pytest.mark.parametrize(
    "auth",
    [
        basic(ADMIN, "wrong"),
        basic(ADMIN, ADMIN_PASSWORD + " "),
        basic("bob", "bobs-password"),  # right password, not an admin
        basic("nobody", ADMIN_PASSWORD),
        basic("", ADMIN_PASSWORD),
        "Basic " + base64.b64encode(ADMIN.encode()).decode(),  # no colon
        "Basic !!not-base64!!",
        f"Basic {TOKEN}",
        "Bearer " + ADMIN_PASSWORD,
        "Digest x",
    ],
)
def test_wrong_credentials_are_401_with_both_challenges(server: Server, auth: str) -> None:
    reply = server.client.request("GET", "/api/users", authorization=auth)
    assert reply.status == 401
    assert reply.headers.get_all("WWW-Authenticate") == [
        'Bearer realm="meshmq"',
        'Basic realm="meshmq", charset="UTF-8"',
    ]
    assert "users" not in [name for name, _ in server.view.calls]


def test_without_a_token_an_admin_user_still_gets_in(tokenless: Server) -> None:
    reply = tokenless.client.request("GET", "/api/users", authorization=basic(ADMIN, ADMIN_PASSWORD))
    assert reply.status == 200
    assert tokenless.client.request("GET", "/api/users").status == 401  # there is an admin: 401
    assert tokenless.client.request("GET", "/api/users", token="anything").status == 401


def test_without_a_token_and_without_an_admin_user_it_is_403(tokenless: Server) -> None:
    del tokenless.view.accounts[ADMIN]
    for auth in (None, basic("bob", "bobs-password"), f"Bearer {TOKEN}"):
        reply = tokenless.client.request("POST", "/api/users", body=b"{}", authorization=auth)
        assert reply.status == 403
        assert "AdminToken" in str(reply.json())


def test_a_verified_password_is_remembered_until_it_changes(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    verified: list[str] = []

    def counting(password: str | bytes, stored: str) -> bool:
        verified.append(stored)
        return verify_password(password, stored)

    monkeypatch.setattr("mesh.http.verify_password", counting)
    auth = basic(ADMIN, ADMIN_PASSWORD)
    for _ in range(3):
        assert server.client.request("GET", "/api/acl", authorization=auth).status == 200
    assert len(verified) == 1  # one scrypt, then the HMAC memory
    assert server.client.request("GET", "/api/acl", authorization=basic(ADMIN, "wrong")).status == 401
    assert len(verified) == 2  # a wrong password is never answered from memory
    server.view.add_account(ADMIN, "new password", admin=True)  # a new stored hash
    assert server.client.request("GET", "/api/acl", authorization=auth).status == 401
    assert server.client.request("GET", "/api/acl", authorization=basic(ADMIN, "new password")).status == 200
    server.view.accounts[ADMIN] = (server.view.accounts[ADMIN][0], False)  # demoted
    assert server.client.request("GET", "/api/acl", authorization=basic(ADMIN, "new password")).status == 401


def test_an_unknown_user_costs_a_password_check_too(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    verified: list[str] = []

    def refusing(_password: str | bytes, stored: str) -> bool:
        verified.append(stored)
        return False

    monkeypatch.setattr("mesh.http.verify_password", refusing)
    assert server.client.request("GET", "/api/acl", authorization=basic("nobody", "x")).status == 401
    assert len(verified) == 1


def test_no_password_token_or_hash_is_logged_or_answered(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="mesh.http"):
        post_json(server, "/api/users", {"username": "frank", "password": "frank-secret"})
        post_json(server, "/api/users", {"username": "frank", "password": "x"}, auth=basic(ADMIN, "guess-pw"))
        server.client.request("GET", "/api/users", authorization=basic(ADMIN, ADMIN_PASSWORD))
        reply = server.client.request("GET", "/api/users", token=TOKEN)
    assert caplog.records
    secrets = ("frank-secret", "guess-pw", ADMIN_PASSWORD, TOKEN, "$scrypt$")
    for record in caplog.records:
        assert not any(s in record.getMessage() for s in secrets), record.getMessage()
    assert not any(s.encode() in reply.body for s in secrets)


def test_an_answer_on_a_connection_of_its_own(server: Server) -> None:
    """The plain http.client path meshctl uses: one connection, Basic, a JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.api.port, timeout=5)
    try:
        conn.request(
            "POST",
            "/api/acl",
            body=json.dumps({"user": "*", "topic": "public/#", "access": "sub"}),
            headers={"Authorization": basic(ADMIN, ADMIN_PASSWORD), "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())) == (201, {"id": 1, "version": 2})
    finally:
        conn.close()
