"""ACL rules: matching, covering, substitution, order, `$` topics (broker/acl.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.acl import Access, AuthTable, Rule, User, covers, matches, table_from_wire
from broker.protocol.topics import topic_matches


def levels(text: str) -> tuple[str, ...]:
    return tuple(text.split("/"))


def access(
    *rules: Rule, user: str | None = "alice", client: str = "c1", allow: bool = False, admin: bool = False
) -> Access:
    return Access(user, client, admin, rules, allow)


# --- matching agrees with the broker's own MQTT matcher ------------------------------------------

LEVEL = st.sampled_from(["a", "b", "", "$SYS", "x y"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=4).map("/".join)
FILTER_LEVEL = st.sampled_from(["a", "b", "", "+", "$SYS"])


@st.composite
def filters(draw: st.DrawFn) -> str:
    parts = draw(st.lists(FILTER_LEVEL, min_size=1, max_size=4))
    if draw(st.booleans()):
        parts.append("#")
    return "/".join(parts)


@given(filters(), TOPIC)
def test_matches_is_mqtt_matching(pattern: str, topic: str) -> None:
    assert matches(levels(pattern), levels(topic)) == topic_matches(pattern, topic)


@given(filters(), filters(), st.lists(TOPIC, min_size=1, max_size=20))
def test_a_covering_pattern_matches_every_topic_of_the_filter(
    pattern: str, topic_filter: str, topics: list[str]
) -> None:
    if covers(levels(pattern), levels(topic_filter)):
        for topic in topics:
            if topic_matches(topic_filter, topic):
                assert topic_matches(pattern, topic), (pattern, topic_filter, topic)


@pytest.mark.parametrize(
    ("pattern", "topic_filter", "expected"),
    [
        ("a/#", "a/b/+", True),
        ("a/#", "a", True),
        ("a/+", "a/b", True),
        ("a/+", "a/+", True),
        ("a/b", "a/+", False),
        ("a/+", "a/#", False),
        ("#", "#", True),
        ("#", "$SYS/#", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/broker/+", True),
        ("$SYS/#", "#", False),
        ("users/alice/#", "users/+/secret", False),
    ],
)
def test_covers(pattern: str, topic_filter: str, expected: bool) -> None:
    assert covers(levels(pattern), levels(topic_filter)) is expected


# --- rules -----------------------------------------------------------------------------------------


def test_first_applicable_rule_decides_and_deny_refuses() -> None:
    a = access(Rule("*", "public/secret", "DENY"), Rule("*", "public/#", "BOTH"))
    assert a.may_publish("public/news")
    assert not a.may_publish("public/secret")
    assert not a.may_read("public/secret")
    assert a.may_read("public/news")


def test_access_kinds_separate_publish_and_read() -> None:
    a = access(Rule("alice", "in/#", "PUB"), Rule("alice", "out/#", "SUB"))
    assert a.may_publish("in/x") and not a.may_read("in/x")
    assert a.may_read("out/x") and not a.may_publish("out/x")
    assert a.may_subscribe("out/+") and not a.may_subscribe("in/#")


def test_no_match_falls_back_but_never_for_dollar_topics() -> None:
    deny = access()
    allow = access(allow=True)
    assert not deny.may_publish("x") and not deny.may_subscribe("x/#")
    assert allow.may_publish("x") and allow.may_subscribe("#")
    assert not allow.may_read("$SYS/meshmq/n1/uptime")
    assert not allow.may_subscribe("$SYS/#")
    assert access(Rule("*", "$SYS/#", "SUB"), allow=True).may_subscribe("$SYS/#")


def test_user_and_client_id_substitution() -> None:
    rules = (Rule("*", "users/%u/#", "BOTH"), Rule("*", "clients/%c", "PUB"))
    a = access(*rules, user="alice", client="dev-1")
    assert a.may_publish("users/alice/x") and not a.may_publish("users/bob/x")
    assert a.may_publish("clients/dev-1") and not a.may_publish("clients/dev-2")
    assert a.may_subscribe("users/alice/#")
    assert not a.may_subscribe("users/+/x")  # a wildcard that would reach other users' topics


@pytest.mark.parametrize("name", ["a/b", "+", "#", "x#"])
def test_a_name_with_wildcards_or_levels_never_widens_a_rule(name: str) -> None:
    a = access(Rule("*", "users/%u/#", "BOTH"), user=name, client=name)
    assert not a.may_publish(f"users/{name}/x")
    assert not a.may_subscribe("users/#")
    b = access(Rule("*", "c/%c", "PUB"), user="u", client=name)
    assert not b.may_publish("c/+")


def test_anonymous_and_named_rules() -> None:
    rules = (Rule("$anonymous", "public/#", "SUB"), Rule("bob", "bob/#", "BOTH"))
    anon = access(*rules, user=None)
    assert anon.may_read("public/x") and not anon.may_read("bob/x")
    assert not anon.may_publish("public/x")
    alice = access(*rules, user="alice")
    assert not alice.may_read("public/x")  # $anonymous rules are for clients without a name
    bob = access(*rules, user="bob")
    assert bob.may_publish("bob/1")
    # %u does not apply to an anonymous client
    assert not access(Rule("*", "%u/#", "BOTH"), user=None).may_publish("/x")


def test_subscribe_passes_over_a_deny_that_only_overlaps() -> None:
    a = access(Rule("*", "data/+/private", "DENY"), Rule("*", "data/#", "SUB"))
    assert a.may_subscribe("data/#")  # allowed ...
    assert not a.may_read("data/x/private")  # ... and the deny holds at delivery
    assert a.may_read("data/x/public")
    assert not a.may_subscribe("data/x/private")


def test_admin_passes_every_check() -> None:
    a = access(admin=True)
    assert a.may_publish("$SYS/x") and a.may_subscribe("#") and a.may_read("anything")


def test_cache_is_bounded() -> None:
    a = access(Rule("*", "#", "BOTH"))
    for i in range(5000):
        assert a.may_read(f"t/{i}")
    assert len(a._read_cache) <= 4096


def test_table_from_wire_puts_store_rules_before_config_rules() -> None:
    table = table_from_wire(
        7,
        [("alice", "$scrypt$...", True), ("bob", "$scrypt$...", False)],
        [(3, "*", "a/#", "deny")],
        [Rule("*", "a/#", "BOTH")],
        no_match_allow=False,
    )
    assert table.version == 7
    assert table.users["alice"] == User("$scrypt$...", True)
    assert [r.access for r in table.rules] == ["DENY", "BOTH"]
    assert table.access_for("alice", "c").admin
    bob = table.access_for("bob", "c")
    assert not bob.admin and not bob.may_publish("a/1")
    assert not AuthTable().access_for("ghost", "c").admin
