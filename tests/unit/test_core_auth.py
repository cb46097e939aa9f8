"""Authentication and authorisation in the sans-IO core (broker/handlers/auth.py, broker/acl.py)."""

from __future__ import annotations

import dataclasses

import pytest

from broker.acl import Rule, table_from_wire
from broker.config import AclRule, AuthConfig, MqttConfig
from broker.core import BrokerCore
from broker.handlers.auth import apply_auth_table
from broker.protocol.packets import (
    Connack,
    Connect,
    Properties,
    ProtocolVersion,
    Puback,
    Publish,
    Pubrec,
    Suback,
    Subscribe,
    Subscription,
    Will,
)
from broker.protocol.reasons import Reason
from store.passwords import hash_password
from tests.unit.core_harness import Harness, HarnessClient

V5 = ProtocolVersion.V5
V311 = ProtocolVersion.V311
FAST = 10  # log2 n of test hashes: fast, still the real scrypt code path

ALICE = hash_password("wonderland", log2_n=FAST)
ADMIN = hash_password("root", log2_n=FAST)


class Pending:
    """A verifier that answers only when the test says so (a hash still being computed)."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, str, object]] = []

    def verify(self, password: bytes, stored: str, now: float, done: object) -> None:
        self.calls.append((password, stored, done))


def harness(auth: AuthConfig | None = None, rules: list[tuple[int, str, str, str]] | None = None) -> Harness:
    h = Harness()
    h.core = BrokerCore(
        dataclasses.replace(MqttConfig()),
        auth=auth or AuthConfig(enabled=True),
        new_client_id=lambda: "auto-1",
    )
    table = table_from_wire(
        1,
        [("alice", ALICE, False), ("root", ADMIN, True)],
        rules if rules is not None else [(1, "*", "users/%u/#", "BOTH"), (2, "*", "public/#", "SUB")],
        h.core.config_rules,
        h.core.auth_table.no_match_allow,
    )
    apply_auth_table(h.core, table)
    return h


def connack(client: HarnessClient, **kwargs: object) -> Connack:
    packet = client.connect(**kwargs)  # type: ignore[arg-type]
    assert isinstance(packet, Connack)
    return packet


@pytest.mark.parametrize(
    ("username", "password", "v5_code", "v311_code"),
    [
        ("alice", b"wrong", Reason.BAD_USER_NAME_OR_PASSWORD, 4),
        ("mallory", b"wonderland", Reason.BAD_USER_NAME_OR_PASSWORD, 4),
        ("alice", None, Reason.BAD_USER_NAME_OR_PASSWORD, 4),
        (None, None, Reason.NOT_AUTHORIZED, 5),
    ],
)
def test_bad_credentials_are_refused_with_the_right_code(
    username: str | None, password: bytes | None, v5_code: int, v311_code: int
) -> None:
    h = harness()
    for version, code in ((V5, v5_code), (V311, v311_code)):
        client = h.client(version)
        answer = connack(client, username=username, password=password)
        assert answer.reason_code == code
        assert client.link.closed
    assert h.core.counters.auth_failures + h.core.counters.connections_not_authorized == 2
    good = h.client(V5)
    assert connack(good, client_id="ok", username="alice", password=b"wonderland").reason_code == 0


def test_anonymous_clients_when_allowed_get_the_anonymous_rules() -> None:
    h = harness(
        AuthConfig(enabled=True, allow_anonymous=True, acl=(AclRule("$anonymous", "public/#", "SUB"),)),
        rules=[],
    )
    client = h.client(V5)
    assert connack(client, client_id="anon").reason_code == 0
    client.send(Subscribe(1, (Subscription("public/#", 0), Subscription("private/#", 0))))
    (suback,) = client.received()
    assert isinstance(suback, Suback)
    assert suback.reason_codes == (0, Reason.NOT_AUTHORIZED)


def test_auth_off_lets_everyone_in_and_checks_nothing() -> None:
    h = harness(AuthConfig(enabled=False))
    client = h.client(V5)
    assert connack(client, client_id="x", username="nobody", password=b"x").reason_code == 0
    assert h.core.sessions["x"].access is None


def test_publish_denied_gets_0x87_and_is_not_delivered_or_retained() -> None:
    h = harness()
    sub = h.client(V5)
    connack(sub, client_id="root-sub", username="root", password=b"root")
    sub.send(Subscribe(1, (Subscription("#", 1),)))
    assert isinstance(sub.received()[0], Suback)
    pub = h.client(V5)
    connack(pub, client_id="a1", username="alice", password=b"wonderland")
    pub.send(
        Publish("users/bob/x", b"no", qos=1, packet_id=1, retain=True),
        Publish("users/bob/x", b"no", qos=2, packet_id=2),
        Publish("users/bob/x", b"no", qos=0),
        Publish("users/alice/x", b"yes", qos=1, packet_id=3),
    )
    acks = pub.received()
    assert [(type(a).__name__, a.reason_code) for a in acks] == [  # type: ignore[union-attr]
        ("Puback", Reason.NOT_AUTHORIZED),
        ("Pubrec", Reason.NOT_AUTHORIZED),
        ("Puback", 0),
    ]
    got = [p for p in sub.received() if isinstance(p, Publish)]
    assert [p.topic for p in got] == ["users/alice/x"]
    assert h.core.retained.get("users/bob/x") is None
    assert h.core.counters.publish_denied == 3


def test_v311_denied_publish_is_acknowledged_and_dropped() -> None:
    h = harness()
    pub = h.client(V311)
    connack(pub, client_id="a1", username="alice", password=b"wonderland")
    pub.send(
        Publish("users/bob/x", b"no", qos=1, packet_id=1), Publish("users/bob/x", b"no", qos=2, packet_id=2)
    )
    acks = pub.received()
    assert [type(a) for a in acks] == [Puback, Pubrec]
    assert all(a.reason_code == 0 for a in acks)  # type: ignore[union-attr]
    assert h.core.counters.publish_denied == 2


def test_subscription_wildcards_that_reach_other_users_are_refused() -> None:
    h = harness()
    for version, refused in ((V5, Reason.NOT_AUTHORIZED), (V311, 0x80)):
        client = h.client(version)
        connack(client, client_id=f"a-{version}", username="alice", password=b"wonderland")
        client.send(
            Subscribe(
                1, (Subscription("users/alice/#", 1), Subscription("users/+/x", 1), Subscription("#", 0))
            )
        )
        (suback,) = client.received()
        assert isinstance(suback, Suback)
        assert suback.reason_codes == (1, refused, refused)


def test_will_to_a_forbidden_topic_refuses_the_connect() -> None:
    h = harness()
    client = h.client(V5)
    answer = connack(
        client, client_id="w", username="alice", password=b"wonderland", will=Will("users/bob/will", b"x")
    )
    assert answer.reason_code == Reason.NOT_AUTHORIZED
    assert h.core.counters.connections_not_authorized == 1


def test_rule_change_takes_effect_for_existing_subscriptions() -> None:
    h = harness()
    sub = h.client(V5)
    connack(sub, client_id="a-sub", username="alice", password=b"wonderland")
    sub.send(Subscribe(1, (Subscription("public/#", 0),)))
    sub.received()
    pub = h.client(V5)
    connack(pub, client_id="root", username="root", password=b"root")
    pub.send(Publish("public/1", b"a"))
    assert [p.topic for p in sub.received() if isinstance(p, Publish)] == ["public/1"]
    apply_auth_table(
        h.core,
        table_from_wire(
            2,
            [("alice", ALICE, False), ("root", ADMIN, True)],
            [(5, "alice", "public/#", "DENY")],
            (),
            False,
        ),
    )
    pub.send(Publish("public/2", b"b"))
    assert [p for p in sub.received() if isinstance(p, Publish)] == []
    assert h.core.counters.deliveries_denied == 1


def test_connect_waits_for_the_hash_and_keeps_what_follows_in_order() -> None:
    h = harness()
    pending = Pending()
    h.core.verifier = pending  # type: ignore[assignment]
    client = h.client(V5)
    client.send(
        Connect("slow", V5, True, username="alice", password=b"wonderland"),
        Subscribe(1, (Subscription("users/alice/#", 1),)),
    )
    assert client.received() == []  # nothing before the hash is checked
    (password, stored, done) = pending.calls[0]
    assert password == b"wonderland" and stored == ALICE
    done(True, h.clock.now)  # type: ignore[operator]
    h.core.flush()
    answers = client.received()
    assert isinstance(answers[0], Connack) and answers[0].reason_code == 0
    assert isinstance(answers[1], Suback) and answers[1].reason_codes == (1,)
    # a second connect of the same user with the same password needs no hash
    again = h.client(V5)
    assert connack(again, client_id="fast", username="alice", password=b"wonderland").reason_code == 0
    assert len(pending.calls) == 1


def test_a_connection_lost_while_the_hash_runs_is_forgotten() -> None:
    h = harness()
    pending = Pending()
    h.core.verifier = pending  # type: ignore[assignment]
    client = h.client(V5)
    client.send(Connect("gone", V5, True, username="alice", password=b"wonderland"))
    client.lose()
    pending.calls[0][2](True, h.clock.now)  # type: ignore[operator]
    assert "gone" not in h.core.sessions
    assert not h.core.connecting


def test_config_rules_come_after_store_rules() -> None:
    h = harness(
        AuthConfig(enabled=True, acl=(AclRule("*", "shared/#", "BOTH"),)),
        rules=[(1, "*", "shared/locked", "DENY")],
    )
    assert [r.topic for r in h.core.auth_table.rules] == ["shared/locked", "shared/#"]
    assert h.core.auth_table.rules[1] == Rule("*", "shared/#", "BOTH")
    client = h.client(V5)
    connack(client, client_id="c", username="alice", password=b"wonderland", properties=Properties())
    client.send(
        Publish("shared/locked", b"x", qos=1, packet_id=1), Publish("shared/open", b"x", qos=1, packet_id=2)
    )
    codes = [a.reason_code for a in client.received()]  # type: ignore[union-attr]
    assert codes == [Reason.NOT_AUTHORIZED, Reason.NO_MATCHING_SUBSCRIBERS]  # allowed, nobody listens
