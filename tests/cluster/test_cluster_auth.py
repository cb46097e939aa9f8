"""Users and ACL rules across a real 2-node cluster (broker/ACCESS.md, "Changes at run time").

Why: the issue promises that a user or rule changed through one node takes effect on every node
within a second, without a restart. Users live in the cluster's PostgreSQL; each node's store
process polls the version of the auth tables and pushes them to its workers. The test changes
things through node 1's HTTP API and watches MQTT clients of node 2 (and node 1) follow.

Must not: sleep and hope (each wait polls, bounded by the promised second); send traffic anywhere
but loopback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

import pytest

from tests.cluster.conftest import ClusterFactory
from tests.cluster.nodes import Node
from tests.cluster.test_meshctl_cluster import http_ports
from tests.e2e.admin_api import admin_call
from tests.e2e.clients import TestClient

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

TOKEN: Final = "cluster-auth-token"
CHANGE_S: Final = 1.0
READY_S: Final = 20.0


def within(seconds: float, check: Callable[[], bool], what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"{what}: not within {seconds}s")
        time.sleep(0.02)
    return time.monotonic() - start


def connect_code(node: Node, username: str, password: str) -> int:
    c = TestClient(node, username=username, password=password)
    try:
        return c.connect().reason_code
    finally:
        c.close()


def test_a_user_or_rule_changed_on_node_1_takes_effect_on_node_2(cluster_factory: ClusterFactory) -> None:
    hosts = ["127.0.0.2", "127.0.0.3"]  # the harness's addresses for n1, n2
    ports = http_ports(hosts)
    cluster = cluster_factory(
        n=2,
        extra=lambda i: {
            "Http": {"Port": ports[i - 1], "AdminToken": TOKEN},
            "Auth": {"Enabled": True, "Acl": [{"User": "*", "Topic": "users/%u/#", "Access": "BOTH"}]},
        },
    )
    assert [nd.host for nd in cluster.nodes] == hosts
    cluster.wait_members(timeout_s=READY_S)
    n1, n2 = cluster.node(1), cluster.node(2)

    def api(method: str, path: str, body: dict[str, object] | None = None) -> tuple[int, object]:
        return admin_call(ports[0], method, path, body, token=TOKEN, host=n1.host)

    assert api("POST", "/api/users", {"username": "dora", "password": "expl0rer"})[0] == 201
    took = within(
        CHANGE_S, lambda: connect_code(n2, "dora", "expl0rer") == 0, "a user added on node 1, on node 2"
    )
    print(f"user reached node 2 in {took:.3f}s")
    assert connect_code(n2, "dora", "wrong") == 0x86

    # a rule added on node 1 lets dora publish on node 2, and a subscriber on node 1 gets it
    sub = TestClient(n1, client_id="root-sub", username="dora", password="expl0rer")
    sub.connect()
    pub = TestClient(n2, client_id="dora-pub", username="dora", password="expl0rer")
    pub.connect()
    try:
        assert sub.subscribe("users/dora/#", qos=1) == [1]
        assert pub.publish("shared/board", b"x", qos=1) == 0x87
        status, body = api("POST", "/api/acl", {"user": "dora", "topic": "shared/#", "access": "both"})
        assert status == 201, body
        within(
            CHANGE_S,
            lambda: pub.publish("shared/board", b"x", qos=1) in (0, 0x10),
            "a rule added on node 1, on node 2",
        )
        assert sub.subscribe("shared/#", qos=1) == [1]
        assert pub.publish("shared/board", b"hello", qos=1) == 0
        assert any(m.payload == b"hello" for m in sub.expect(1, timeout_s=5))
    finally:
        pub.close()
        sub.close()

    # deleted on node 1: refused on node 2
    assert api("DELETE", "/api/users/dora")[0] == 200
    within(
        CHANGE_S, lambda: connect_code(n2, "dora", "expl0rer") == 0x86, "a user deleted on node 1, on node 2"
    )
