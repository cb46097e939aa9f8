"""`meshctl user ...` and `meshctl acl ...` against the fake node of test_meshctl.py.

Covers the requests each command sends (method, path with the name URL-encoded, JSON body,
Bearer or Basic credentials from options or the environment), the new password from
`--password`, a terminal prompt asked twice (getpass) or one line of stdin, the tables and
--json, the check that `passwd` / `admin` do not create a missing user, and the errors: 401 with
a user, 403, 404, 400 (the node's reason), an unreachable node, bad usage (exit 2).
"""

from __future__ import annotations

import base64
import io
import json
import socket

import pytest

from tests.unit.tools import test_meshctl as base
from tests.unit.tools.test_meshctl import FakeNode, Run

node = base.node  # the fixtures of test_meshctl.py: the fake node and `run`
run = base.run

USERS = [{"username": "alice", "admin": True}, {"username": "bob", "admin": False}]
ACL = [
    {"id": 3, "user": "*", "topic": "public/#", "access": "sub"},
    {"id": 1, "user": "bob", "topic": "bob/%u/#", "access": "both"},
]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))


def prompts(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> list[str]:
    """A terminal on stdin whose getpass prompts answer `answers` in turn; returns the prompts."""
    asked: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        asked.append(prompt)
        return answers.pop(0)

    monkeypatch.setattr("sys.stdin", Tty(""))
    monkeypatch.setattr("getpass.getpass", fake_getpass)
    return asked


# -- users -----------------------------------------------------------------------------------------


def test_user_list_table_and_json(node: FakeNode, run: Run) -> None:
    node.answer("GET", "/api/users", USERS)
    assert run("user", "list", "--token", "t") == (0, "USERNAME  ADMIN\nalice     yes\nbob       no\n", "")
    assert node.seen[-1].authorization == "Bearer t"
    code, out, _ = run("--json", "--token", "t", "user", "list")
    assert code == 0 and json.loads(out) == USERS
    node.answer("GET", "/api/users", [])
    assert run("user", "list", "--token", "t")[1] == "USERNAME  ADMIN\n(none)\n"


def test_user_add_with_the_password_option(node: FakeNode, run: Run) -> None:
    node.answer("POST", "/api/users", {"username": "carol", "created": True, "version": 4}, status=201)
    assert run("--token", "t", "user", "add", "carol", "--admin", "--password", "pw 1") == (
        0,
        "admin user carol added\n",
        "",
    )
    seen = node.seen[-1]
    assert (seen.method, seen.path, seen.content_type) == ("POST", "/api/users", "application/json")
    assert json.loads(seen.body) == {"username": "carol", "password": "pw 1", "admin": True}
    node.answer("POST", "/api/users", {"username": "carol", "created": False, "version": 5})
    code, out, _ = run("--token", "t", "user", "add", "carol", "--password", "x")
    assert (code, out) == (0, "carol existed: its password was changed, and it is now a user\n")
    assert json.loads(node.seen[-1].body)["admin"] is False
    code, out, _ = run("--token", "t", "--json", "user", "add", "carol", "--password", "x")
    assert json.loads(out) == {"username": "carol", "created": False, "version": 5}


def test_user_add_reads_one_line_of_stdin(node: FakeNode, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    node.answer("POST", "/api/users", {"username": "dave", "created": True, "version": 2}, status=201)
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin  \nsecond line\n"))
    assert run("user", "add", "dave", "--token", "t")[0] == 0
    assert json.loads(node.seen[-1].body)["password"] == "from stdin  "  # only the newline goes
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    code, _, err = run("user", "add", "dave", "--token", "t")
    assert (code, err) == (1, "meshctl: the password is empty; nothing changed\n")
    assert len(node.seen) == 1


def test_user_add_prompts_twice_on_a_terminal(
    node: FakeNode, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.answer("POST", "/api/users", {"username": "erin", "created": True, "version": 2}, status=201)
    asked = prompts(monkeypatch, ["s3cret", "s3cret"])
    assert run("user", "add", "erin", "--token", "t")[0] == 0
    assert asked == ["New password for erin: ", "Again: "]
    assert json.loads(node.seen[-1].body)["password"] == "s3cret"
    prompts(monkeypatch, ["one", "two"])
    code, out, err = run("user", "add", "erin", "--token", "t")
    assert (code, out, err) == (1, "", "meshctl: the two passwords differ; nothing changed\n")
    assert len(node.seen) == 1


def test_user_passwd_checks_the_user_exists_first(node: FakeNode, run: Run) -> None:
    node.answer("GET", "/api/users", USERS)
    node.answer("POST", "/api/users", {"username": "bob", "created": False, "version": 6})
    assert run("user", "passwd", "bob", "--password", "new", "--token", "t") == (
        0,
        "password of bob changed\n",
        "",
    )
    assert json.loads(node.seen[-1].body) == {"username": "bob", "password": "new"}
    code, out, err = run("user", "passwd", "zoe", "--password", "new", "--token", "t")
    assert (code, out) == (1, "")
    assert err == f"meshctl: no user 'zoe' (see meshctl user list) (http://{node.address}/api/users)\n"
    assert node.seen[-1].method == "GET"  # nothing was posted


def test_user_admin_on_and_off(node: FakeNode, run: Run) -> None:
    node.answer("GET", "/api/users", USERS)
    node.answer("POST", "/api/users", {"username": "bob", "created": False, "version": 7})
    assert run("user", "admin", "bob", "on", "--token", "t") == (0, "bob is now an admin user\n", "")
    assert json.loads(node.seen[-1].body) == {"username": "bob", "admin": True}
    assert run("user", "admin", "bob", "off", "--token", "t")[1] == "bob is no longer an admin user\n"
    assert json.loads(node.seen[-1].body) == {"username": "bob", "admin": False}
    assert run("user", "admin", "bob", "maybe", "--token", "t")[0] == 2


def test_user_del_encodes_the_name(node: FakeNode, run: Run) -> None:
    node.answer("DELETE", "/api/users/a%2F%23%20b", {"deleted": "a/# b"})
    assert run("user", "del", "a/# b", "--token", "t") == (0, "user a/# b deleted (and its ACL rules)\n", "")
    code, _, err = run("user", "del", "ghost", "--token", "t")  # the fake has no answer: 404
    assert code == 1
    assert err.startswith("meshctl: HTTP 404 Not Found: no such path (http://")


# -- ACL rules ---------------------------------------------------------------------------------------


def test_acl_list_add_and_del(node: FakeNode, run: Run) -> None:
    node.answer("GET", "/api/acl", ACL)
    code, out, _ = run("acl", "list", "--token", "t")
    assert (code, out) == (
        0,
        "ID  USER  TOPIC     ACCESS\n 3  *     public/#  sub\n 1  bob   bob/%u/#  both\n",
    )
    assert json.loads(run("acl", "list", "--json", "--token", "t")[1]) == ACL
    node.answer("POST", "/api/acl", {"id": 4, "version": 9}, status=201)
    assert run("acl", "add", "$anonymous", "status/+", "PUB", "--token", "t") == (
        0,
        "rule 4 added: $anonymous status/+ pub\n",
        "",
    )
    assert json.loads(node.seen[-1].body) == {"user": "$anonymous", "topic": "status/+", "access": "pub"}
    node.answer("DELETE", "/api/acl/4", {"deleted": 4})
    assert run("acl", "del", "4", "--token", "t") == (0, "rule 4 deleted\n", "")
    assert json.loads(run("acl", "del", "4", "--token", "t", "--json")[1]) == {"deleted": 4}


def test_a_bad_rule_is_the_nodes_400_reason(node: FakeNode, run: Run) -> None:
    node.answer(
        "POST", "/api/acl", {"error": "'a/#/b': '#' must be a whole level, and the last one"}, status=400
    )
    code, _, err = run("acl", "add", "bob", "a/#/b", "pub", "--token", "t")
    assert code == 1
    assert err.startswith(
        "meshctl: HTTP 400 Bad Request: 'a/#/b': '#' must be a whole level, and the last one ("
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["acl", "add", "bob", "t", "write"],
        ["acl", "add", "bob", "t"],
        ["acl", "del", "x"],
        ["acl", "del", "-1"],
        ["acl"],
        ["user"],
        ["user", "add"],
        ["user", "rename", "a", "b"],
        ["--token", "t", "--user", "alice", "user", "list"],
    ],
)
def test_usage_errors_exit_2(run: Run, argv: list[str]) -> None:
    code, out, err = run(*argv)
    assert (code, out) == (2, "") and err and "Traceback" not in err


# -- credentials ---------------------------------------------------------------------------------------


def test_basic_credentials_from_options_and_the_environment(
    node: FakeNode, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.answer("GET", "/api/users", USERS)
    assert run("--user", "alice", "--password", "pw:1", "user", "list")[0] == 0
    assert node.seen[-1].authorization == basic("alice", "pw:1")
    assert run("user", "list", "--user", "alice", "--password", "pw2")[0] == 0  # after the command too
    assert node.seen[-1].authorization == basic("alice", "pw2")
    monkeypatch.setenv("MESHMQ_USER", "alice")
    monkeypatch.setenv("MESHMQ_PASSWORD", "from-env")
    node.answer("GET", "/api/acl", ACL)
    assert run("acl", "list")[0] == 0
    assert node.seen[-1].authorization == basic("alice", "from-env")
    monkeypatch.setenv("MESHMQ_TOKEN", "env-token")  # from the environment the token wins
    run("user", "list")
    assert node.seen[-1].authorization == "Bearer env-token"
    run("user", "list", "--user", "root", "--password", "x")  # ... but an option beats the environment
    assert node.seen[-1].authorization == basic("root", "x")


def test_the_admin_password_before_user_add_and_the_new_one_after(node: FakeNode, run: Run) -> None:
    node.answer("POST", "/api/users", {"username": "bob", "created": True, "version": 2}, status=201)
    assert (
        run("--user", "alice", "--password", "admin-pw", "user", "add", "bob", "--password", "bob-pw")[0] == 0
    )
    assert node.seen[-1].authorization == basic("alice", "admin-pw")
    assert json.loads(node.seen[-1].body)["password"] == "bob-pw"


def test_the_admin_password_is_asked_for_on_a_terminal(
    node: FakeNode, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.answer("GET", "/api/users", USERS)
    asked = prompts(monkeypatch, ["typed"])
    assert run("user", "list", "--user", "alice")[0] == 0
    assert asked == ["Password of alice: "]
    assert node.seen[-1].authorization == basic("alice", "typed")


def test_without_a_terminal_the_admin_password_must_be_given(node: FakeNode, run: Run) -> None:
    code, out, err = run("user", "list", "--user", "alice")
    assert (code, out) == (1, "")
    assert err == "meshctl: no password for user 'alice': pass --password or set MESHMQ_PASSWORD\n"
    assert node.seen == []


def test_refusals_say_which_credentials(node: FakeNode, run: Run) -> None:
    node.answer("GET", "/api/users", {"error": "missing or wrong admin credentials"}, status=401)
    err = run("user", "list")[2]
    assert err.startswith(
        "meshctl: admin credentials are missing: pass --token or set MESHMQ_TOKEN, or --user"
    )
    err = run("user", "list", "--user", "bob", "--password", "x")[2]
    assert err.startswith(
        "meshctl: user 'bob' is not an admin user, or the password is wrong (the node says:"
    )
    assert "x" not in err.replace("bob", "").replace("missing", "").split("(http")[0].replace("admin", "")
    assert run("user", "list", "--token", "t")[2].startswith("meshctl: the admin token is wrong")
    node.answer("GET", "/api/users", {"error": "admin endpoints are off: set Http.AdminToken"}, status=403)
    assert run("user", "list", "--token", "t")[2].startswith("meshctl: the node refuses admin requests")
    node.answer("GET", "/api/users", {"error": "the store did not answer within 2 s"}, status=503)
    err = run("user", "list", "--token", "t")[2]
    assert err.startswith("meshctl: HTTP 503 Service Unavailable: the store did not answer within 2 s (")


def test_an_unreachable_node(run: Run) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = run("user", "list", "--token", "t", "--node", f"127.0.0.1:{port}")
    assert (code, out) == (1, "")
    assert err.startswith("meshctl: connection refused: is the node's Http.Port right? (")
