"""Users and ACL rules over a real node's HTTP API, driven by `meshctl` as an operator would.

Why: the unit tests cover the HTTP layer against a fake view and meshctl against a fake node;
here one real single node (SQLite store, `Http.Port`, `Http.AdminToken`) answers for real
through the relay and the store process (`mesh/PROTOCOL.md`, "The HTTP API of a node" and "The
store plane"): a user made with the token, listed without its hash, made an admin, whose Basic
credentials then add another user and rules; a wrong password and no credentials are refused
(401); a bad rule is a 400; deleting a user takes its rules along; no password reaches the
node's log. MQTT CONNECT authentication is tested elsewhere (tests/e2e/test_auth_acl.py).

Must not: send traffic anywhere but the node on 127.0.0.1; wait unbounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.broker_proc import REPO, free_port
from tests.e2e.conftest import BrokerFactory
from tests.e2e.test_http_single_node import READY_TIMEOUT_S, HttpNode, http_call, wait_for

pytestmark = [pytest.mark.meshmq_only, pytest.mark.timeout(90)]

TOKEN = "users-e2e-token"
MESHCTL_TIMEOUT_S = 20.0
SECRETS = ("alice-pw-1", "bob-pw-2", "wrong-pw-3")


def _meshctl_command() -> list[str]:
    exe = Path(sys.executable).with_name("meshctl")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tools.meshctl"]


class Meshctl:
    def __init__(self, http_port: int) -> None:
        self.node = f"127.0.0.1:{http_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MESHMQ_")}

    def __call__(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        done = subprocess.run(
            [*_meshctl_command(), "--node", self.node, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=REPO,
            env=self.env,
            timeout=MESHCTL_TIMEOUT_S,
            check=False,
        )
        return done.returncode, done.stdout, done.stderr

    def ok(self, *argv: str, stdin: str = "") -> str:
        code, out, err = self(*argv, stdin=stdin)
        assert code == 0, f"meshctl {' '.join(argv)}: exit {code}: {err}"
        return out

    def json(self, *argv: str) -> Any:
        return json.loads(self.ok("--json", *argv))


@pytest.fixture
def node(broker_factory: BrokerFactory, tmp_path: Path) -> HttpNode:
    port = free_port()
    config = {
        "NodeName": "users",
        "Workers": 1,
        "Http": {"Port": port, "BindAddress": "127.0.0.1", "AdminToken": TOKEN},
        "SessionStore": {"Type": "SQLITE", "SQLite": {"Path": str((tmp_path / "users.db").resolve())}},
    }
    n = HttpNode(broker_factory(config), port)
    wait_for("an ACTIVE /health", n.healthy, READY_TIMEOUT_S)
    return n


def test_users_and_rules_through_meshctl(node: HttpNode) -> None:
    meshctl = Meshctl(node.http_port)
    alice_pw, bob_pw, wrong_pw = SECRETS
    admin = ("--user", "alice", "--password", alice_pw)

    # a user made with the token; listed without its hash
    assert (
        meshctl.ok("--token", TOKEN, "user", "add", "alice", "--password", alice_pw) == "user alice added\n"
    )
    listed = meshctl.ok("--token", TOKEN, "user", "list")
    assert listed == "USERNAME  ADMIN\nalice     no\n"
    assert meshctl.json("--token", TOKEN, "user", "list") == [{"username": "alice", "admin": False}]
    assert "scrypt" not in meshctl.ok("--json", "--token", TOKEN, "user", "list")

    # not an admin yet: its credentials are refused
    code, _, err = meshctl(*admin, "user", "list")
    assert code == 1 and "user 'alice' is not an admin user, or the password is wrong" in err

    # made an admin with the token, its Basic credentials then add another user (password on stdin)
    assert meshctl.ok("--token", TOKEN, "user", "admin", "alice", "on") == "alice is now an admin user\n"
    assert meshctl.ok(*admin, "user", "add", "bob", stdin=bob_pw + "\n") == "user bob added\n"
    assert meshctl.json(*admin, "user", "list") == [
        {"username": "alice", "admin": True},
        {"username": "bob", "admin": False},
    ]

    # wrong password and no credentials: 401 (meshctl exit 1, and the raw answer)
    code, out, err = meshctl("--user", "alice", "--password", wrong_pw, "user", "list")
    assert (code, out) == (1, "") and "is not an admin user, or the password is wrong" in err
    code, out, err = meshctl("user", "list")
    assert (code, out) == (1, "") and "admin credentials are missing" in err
    assert http_call(node.http_port, "GET", "/api/users").status == 401
    assert http_call(node.http_port, "GET", "/api/users", token="wrong").status == 401

    # rules: added with Basic, listed in order, a bad one refused by the node (400)
    added = meshctl.json(*admin, "acl", "add", "bob", "bob/#", "both")
    assert isinstance(added["id"], int)
    meshctl.ok(*admin, "acl", "add", "*", "public/+", "sub")
    rules = meshctl.json("--token", TOKEN, "acl", "list")
    assert [(r["user"], r["topic"], r["access"]) for r in rules] == [
        ("bob", "bob/#", "both"),
        ("*", "public/+", "sub"),
    ]
    code, _, err = meshctl(*admin, "acl", "add", "bob", "a/#/b", "pub")
    assert code == 1 and "HTTP 400" in err

    # delete: the user and its own rules; a second delete is a 404
    assert meshctl.ok(*admin, "user", "del", "bob") == "user bob deleted (and its ACL rules)\n"
    assert meshctl.json(*admin, "user", "list") == [{"username": "alice", "admin": True}]
    assert [r["user"] for r in meshctl.json(*admin, "acl", "list")] == ["*"]
    code, _, err = meshctl(*admin, "user", "del", "bob")
    assert code == 1 and "HTTP 404" in err
    rule_id = meshctl.json(*admin, "acl", "list")[0]["id"]
    assert meshctl.ok(*admin, "acl", "del", str(rule_id)) == f"rule {rule_id} deleted\n"
    assert meshctl.json(*admin, "acl", "list") == []

    # a demoted admin loses access at once; no password ever reached the node's log
    meshctl.ok("--token", TOKEN, "user", "admin", "alice", "off")
    assert meshctl(*admin, "user", "list")[0] == 1
    log = node.broker.log()
    assert not any(secret in log for secret in SECRETS)
