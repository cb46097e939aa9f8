"""Authentication and ACLs on one real node (broker/ACCESS.md): users in the SQLite store, managed
over the HTTP admin API, checked by both workers; rules with %u and %c; refusals with the right
codes for paho 3.1.1 / 5.0 and mosquitto_pub; run-time changes within a second; and a subscriber
that sees all of it go by unharmed.

Must not: send traffic anywhere but the node on 127.0.0.1; wait unbounded.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.admin_api import admin_call
from tests.e2e.broker_proc import REPO, BrokerProcess, free_port
from tests.e2e.clients import TestClient
from tests.e2e.workers_helpers import WorkerAddress, free_port_block

pytestmark = [pytest.mark.meshmq_only, pytest.mark.timeout(90)]

TOKEN = "auth-e2e-token"
CHANGE_S = 1.0  # users and rules reach every worker within a second (broker/ACCESS.md)
RULES = [
    {"User": "*", "Topic": "users/%u/#", "Access": "BOTH"},
    {"User": "*", "Topic": "devices/%c/#", "Access": "PUB"},
    {"User": "*", "Topic": "public/#", "Access": "SUB"},
]


class Node:
    def __init__(self, proc: BrokerProcess, http_port: int, base: int) -> None:
        self.proc = proc
        self.http_port = http_port
        self.base = base  # worker N also listens on base + N

    def at_worker(self, n: int) -> WorkerAddress:
        return WorkerAddress("127.0.0.1", self.base + n, n)

    def api(
        self, method: str, path: str, body: dict[str, Any] | None = None, anonymous: bool = False
    ) -> tuple[int, Any]:
        return admin_call(self.http_port, method, path, body, token=None if anonymous else TOKEN)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    workdir: Path = tmp_path_factory.mktemp("auth")
    http_port = free_port()
    base = free_port_block(2)
    proc = BrokerProcess(
        workdir,
        {
            "Workers": 2,
            "WorkerPortBase": base,
            "SessionStore": {"Type": "SQLITE", "SQLite": {"Path": str(workdir / "store.db")}},
            "Http": {"Port": http_port, "AdminToken": TOKEN},
            "Auth": {"Enabled": True, "Acl": RULES},
        },
    ).start()
    n = Node(proc, http_port, base)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # both workers listening, the relay answering
        try:
            if n.api("GET", "/health", anonymous=True)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.05)
    for name, password, admin in (
        ("alice", "wonderland", False),
        ("bob", "builder", False),
        ("root", "r00t", True),
    ):
        status, body = n.api("POST", "/api/users", {"username": name, "password": password, "admin": admin})
        assert status == 201, (status, body)
    try:
        yield n
    finally:
        proc.stop()


def within(seconds: float, check: Callable[[], bool], what: str) -> float:
    """Poll `check` until true; the time it took. AssertionError after `seconds`."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > seconds:
            raise AssertionError(f"{what} not within {seconds}s")
        time.sleep(0.02)


def client(node: Node, worker: int = 1, **kwargs: Any) -> TestClient:
    return TestClient(node.at_worker(worker), **kwargs)


def connect_code(node: Node, worker: int = 1, **kwargs: Any) -> int:
    c = client(node, worker, **kwargs)
    try:
        return c.connect().reason_code
    finally:
        c.close()


@pytest.fixture(scope="module")
def watcher(node: Node) -> Iterator[TestClient]:
    """An admin subscribed to everything: must stay connected through every refusal."""
    c = client(node, 2, client_id="watcher", username="root", password="r00t")
    assert c.connect().reason_code == 0
    assert c.subscribe("#", qos=1) == [1]
    yield c
    c.close()


@pytest.mark.parametrize("worker", [1, 2])
@pytest.mark.parametrize(
    ("version", "username", "password", "code"),
    [
        (5, "alice", "wrong", 0x86),
        (5, "mallory", "wonderland", 0x86),
        (5, None, None, 0x87),
        (4, "alice", "wrong", 4),
        (4, "mallory", "x", 4),
        (4, None, None, 5),
    ],
)
def test_bad_credentials_are_refused(
    node: Node,
    watcher: TestClient,
    worker: int,
    version: int,
    username: str | None,
    password: str | None,
    code: int,
) -> None:
    assert connect_code(node, worker, version=version, username=username, password=password) == code
    assert connect_code(node, worker, version=version, username="alice", password="wonderland") == 0
    assert watcher.is_connected


def test_mosquitto_pub_with_and_without_the_password(node: Node, watcher: TestClient) -> None:
    base = [
        "mosquitto_pub",
        "-h",
        "127.0.0.1",
        "-p",
        str(node.base + 1),
        "-t",
        "users/bob/m",
        "-m",
        "hi",
        "-q",
        "1",
    ]
    bad = subprocess.run([*base, "-u", "bob", "-P", "nope"], capture_output=True, text=True, timeout=10)
    assert bad.returncode != 0
    assert (
        "not authorised" in (bad.stderr + bad.stdout).lower()
        or "bad user" in (bad.stderr + bad.stdout).lower()
    )
    good = subprocess.run([*base, "-u", "bob", "-P", "builder"], capture_output=True, text=True, timeout=10)
    assert good.returncode == 0, good.stderr
    assert any(m.topic == "users/bob/m" and m.payload == b"hi" for m in watcher.expect(1))


@pytest.mark.parametrize("version", [5, 4])
def test_publish_acl_with_user_and_client_id_rules(node: Node, watcher: TestClient, version: int) -> None:
    alice = client(
        node, 1, client_id=f"dev-{version}", version=version, username="alice", password="wonderland"
    )
    alice.connect()
    watcher.drain()
    try:
        assert alice.publish("users/alice/own", b"1", qos=1) == 0
        denied = alice.publish("users/bob/steal", b"2", qos=1)
        assert denied == (0x87 if version == 5 else 0)  # 3.1.1 has no refusal: acknowledged, dropped
        assert alice.publish(f"devices/dev-{version}/t", b"3", qos=1) == 0
        assert alice.publish("devices/other/t", b"4", qos=1) == (0x87 if version == 5 else 0)
        got = [m.topic for m in watcher.drain(quiet_s=0.5)]
        assert sorted(got) == sorted(["users/alice/own", f"devices/dev-{version}/t"])
    finally:
        alice.close()


@pytest.mark.parametrize("version", [5, 4])
def test_subscribe_acl_refuses_filters_that_reach_other_users(node: Node, version: int) -> None:
    refused = 0x87 if version == 5 else 0x80
    alice = client(node, 2, version=version, username="alice", password="wonderland")
    alice.connect()
    try:
        filters = ["users/alice/#", "users/+/secret", "#", "public/news", "$SYS/#"]
        codes = alice.subscribe([(f, 1) for f in filters])
        assert codes == [1, refused, refused, 1, refused]
    finally:
        alice.close()


def test_delivery_never_carries_a_topic_the_client_may_not_read(node: Node) -> None:
    # devices/%c/# is PUB only: alice's own device topic is writable but not readable
    alice = client(node, 1, client_id="reader", username="alice", password="wonderland")
    alice.connect()
    root = client(node, 2, username="root", password="r00t")
    root.connect()
    try:
        assert alice.subscribe("users/alice/#", qos=1) == [1]
        assert root.publish("users/alice/inbox", b"for alice", qos=1) == 0
        assert root.publish("users/bob/inbox", b"for bob", qos=1) == 0
        assert [m.topic for m in alice.drain(quiet_s=0.5)] == ["users/alice/inbox"]
    finally:
        alice.close()
        root.close()


def test_will_to_a_forbidden_topic_refuses_the_connect(node: Node) -> None:
    will = {"topic": "users/bob/will", "payload": b"x", "qos": 1}
    assert connect_code(node, 1, username="alice", password="wonderland", will=will) == 0x87
    assert connect_code(node, 1, version=4, username="alice", password="wonderland", will=will) == 5
    own = {"topic": "users/alice/will", "payload": b"x", "qos": 1}
    assert connect_code(node, 1, username="alice", password="wonderland", will=own) == 0


def test_rule_and_user_changes_reach_both_workers_within_a_second(node: Node, watcher: TestClient) -> None:
    publishers = []
    for worker in (1, 2):
        c = client(node, worker, username="bob", password="builder")
        c.connect()
        publishers.append(c)
    try:
        for c in publishers:
            assert c.publish("news/today", b"x", qos=1) == 0x87
        status, body = node.api("POST", "/api/acl", {"user": "bob", "topic": "news/#", "access": "pub"})
        assert status == 201, body
        rule_id = body["id"]
        for c in publishers:
            within(CHANGE_S, lambda c=c: c.publish("news/today", b"x", qos=1) == 0, "a new rule")
        assert node.api("DELETE", f"/api/acl/{rule_id}")[0] == 200
        for c in publishers:
            within(CHANGE_S, lambda c=c: c.publish("news/today", b"x", qos=1) == 0x87, "a removed rule")
        # a new user can connect on both workers; once deleted, it cannot
        assert node.api("POST", "/api/users", {"username": "carol", "password": "c4rol"})[0] == 201
        for worker in (1, 2):
            within(
                CHANGE_S,
                lambda w=worker: connect_code(node, w, username="carol", password="c4rol") == 0,
                "a new user",
            )
        assert node.api("DELETE", "/api/users/carol")[0] == 200
        for worker in (1, 2):
            within(
                CHANGE_S,
                lambda w=worker: connect_code(node, w, username="carol", password="c4rol") == 0x86,
                "a deleted user",
            )
        # a changed password: the old one stops working (no stale memory of the verified one)
        assert node.api("POST", "/api/users", {"username": "bob", "password": "b0b-new"})[0] == 200
        for worker in (1, 2):
            within(
                CHANGE_S,
                lambda w=worker: connect_code(node, w, username="bob", password="builder") == 0x86,
                "a new password",
            )
            assert connect_code(node, worker, username="bob", password="b0b-new") == 0
        assert watcher.is_connected
    finally:
        for c in publishers:
            c.close()
        node.api("POST", "/api/users", {"username": "bob", "password": "builder"})


def test_refusals_are_counted_in_metrics(node: Node) -> None:
    assert connect_code(node, 1, username="alice", password="nope") == 0x86
    status, _ = node.api("GET", "/health", anonymous=True)
    assert status == 200

    def counted() -> bool:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        return any(
            line.startswith("meshmq_auth_failures_total") and not line.rstrip().endswith(" 0")
            for line in text.splitlines()
        )

    within(3.0, counted, "auth failures in /metrics (workers report every second)")


def test_meshctl_tap_needs_a_user_when_auth_is_on(node: Node) -> None:
    base = [sys.executable, "-m", "tools.meshctl", "--node", f"127.0.0.1:{node.http_port}"]
    tap = ["tap", "users/alice/#", "--mqtt", f"127.0.0.1:{node.base + 1}", "--count", "1", "--seconds", "10"]
    env = {"PATH": "/usr/bin:/bin"}
    refused = subprocess.run([*base, *tap], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    assert "refused the connection" in refused.stderr
    with subprocess.Popen(
        [*base, "--user", "root", "--password", "r00t", *tap],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        root = client(node, 2, username="root", password="r00t")
        root.connect()
        try:
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:  # until the tap has subscribed
                root.publish("users/alice/tapped", b"seen", qos=1)
                time.sleep(0.1)
            out, err = proc.communicate(timeout=10)
        finally:
            root.close()
    assert proc.returncode == 0, err
    assert "users/alice/tapped" in out
