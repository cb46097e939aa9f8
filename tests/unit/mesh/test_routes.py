"""The cluster route table (`mesh/routes.py`): which nodes want which topic.

What is pinned: `match` follows MQTT matching [MQTT-4.7] — `+` is exactly one (possibly empty)
level, `#` is this level and everything below including the parent [MQTT-4.7.1-2], and a filter
that starts with a wildcard never matches a `$` topic [MQTT-4.7.2-1] — and agrees with the
broker's reference matcher (`broker.protocol.topics.topic_matches`, a test may import the broker)
on random filters and topics, also after random adds and removes; filters are per node; the
per-topic cache is invalidated by every change; removing everything leaves an empty trie;
`literal_prefix` (the one rule the workers and the relay both use) is a prefix of every matched topic.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.protocol import topics
from mesh import routes
from mesh.routes import RouteTable, literal_prefix

pytestmark = pytest.mark.timeout(60)


def table(*pairs: tuple[str, str]) -> RouteTable:
    result = RouteTable()
    for node, topic_filter in pairs:
        result.add(node, topic_filter)
    return result


# -- add / remove ------------------------------------------------------------------------------


def test_add_reports_new_filters_only() -> None:
    rt = RouteTable()
    assert rt.add("b", "a/+")
    assert not rt.add("b", "a/+")  # a filter is present for a node at most once
    assert rt.add("c", "a/+")  # the same filter of another node is its own entry
    assert rt.filters == {"b": {"a/+"}, "c": {"a/+"}}


def test_remove_of_an_absent_filter_is_ignored() -> None:
    rt = table(("b", "a/b"))
    assert not rt.remove("b", "x")
    assert not rt.remove("c", "a/b")
    assert rt.remove("b", "a/b")
    assert not rt.remove("b", "a/b")
    assert rt.filters == {}


def test_remove_keeps_the_same_filter_of_other_nodes() -> None:
    rt = table(("b", "a/#"), ("c", "a/#"))
    rt.remove("b", "a/#")
    assert rt.match("a/x") == {"c"}
    assert rt.all_filters() == [("a/#", "c")]


def test_drop_node_returns_its_filters_sorted_and_keeps_the_others() -> None:
    rt = table(("b", "z"), ("b", "a/+"), ("b", "#"), ("c", "a/+"))
    assert rt.drop_node("b") == ["#", "a/+", "z"]
    assert rt.drop_node("b") == []
    assert rt.drop_node("nobody") == []
    assert rt.filters == {"c": {"a/+"}}
    assert rt.match("a/q") == {"c"}
    assert rt.match("z") == frozenset()


def test_all_filters_is_sorted_filter_node_pairs() -> None:
    rt = table(("c", "b"), ("b", "b"), ("b", "a"))
    assert rt.all_filters() == [("a", "b"), ("b", "b"), ("b", "c")]


def test_removing_everything_prunes_the_trie() -> None:
    filters = ["a/b/c", "a/b", "a/+/c", "a/#", "#", "+", "/", "a//b", "$SYS/#", "+/+/+"]
    rt = RouteTable()
    for node in ("b", "c"):
        for topic_filter in filters:
            rt.add(node, topic_filter)
    for topic_filter in reversed(filters):
        rt.remove("b", topic_filter)
    rt.drop_node("c")
    assert rt.filters == {}
    assert rt._root.children == {}
    assert rt._root.nodes == set()
    assert rt.match("a/b/c") == frozenset()


def test_remove_prunes_only_the_empty_branch() -> None:
    rt = table(("b", "a/b/c"), ("b", "a/x"))
    rt.remove("b", "a/b/c")
    assert set(rt._root.children) == {"a"}
    assert set(rt._root.children["a"].children) == {"x"}  # "b" and "b/c" are gone


# -- matching rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/b", "a", False),
        ("a/+", "a/b", True),
        ("a/+", "a", False),  # '+' is exactly one level [MQTT-4.7.1-3]
        ("a/+", "a/b/c", False),
        ("a/+", "a/", True),  # ... which may be empty
        ("a/+/b", "a//b", True),
        ("+/a", "/a", True),  # "/a" has an empty first level
        ("+", "/", False),
        ("+/+", "/", True),
        ("/", "/", True),
        ("a/#", "a", True),  # '#' matches the parent [MQTT-4.7.1-2]
        ("a/#", "a/", True),
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("a/+/#", "a/b", True),
        ("a/+/#", "a", False),
        ("#", "a/b", True),
        ("#", "/", True),
        ("#", "$SYS/x", False),  # [MQTT-4.7.2-1]
        ("+/x", "$SYS/x", False),  # [MQTT-4.7.2-1]
        ("+", "$SYS", False),
        ("$SYS/#", "$SYS/x", True),
        ("$SYS/#", "$SYS", True),
        ("$SYS/+", "$SYS/x", True),
        ("a/+", "a/$x", True),  # '$' only matters at the first level
        ("a/#", "a/$x", True),
    ],
)
def test_match_follows_mqtt_rules(topic_filter: str, topic: str, expected: bool) -> None:
    assert topics.topic_matches(topic_filter, topic) is expected  # the oracle agrees with the table
    rt = table(("b", topic_filter))
    assert (rt.match(topic) == {"b"}) is expected


def test_match_gives_every_node_once() -> None:
    rt = table(("b", "a/#"), ("b", "a/+"), ("b", "a/x"), ("c", "#"), ("d", "q"))
    assert rt.match("a/x") == {"b", "c"}
    assert rt.match("q") == {"c", "d"}
    assert rt.match("$q") == frozenset()


# -- the cache -----------------------------------------------------------------------------------


def test_add_invalidates_the_cache() -> None:
    rt = table(("b", "a/b"))
    assert rt.match("a/b") == {"b"}
    rt.add("c", "a/+")
    assert rt.match("a/b") == {"b", "c"}


def test_remove_invalidates_the_cache() -> None:
    rt = table(("b", "a/b"), ("c", "a/#"))
    assert rt.match("a/b") == {"b", "c"}
    rt.remove("c", "a/#")
    assert rt.match("a/b") == {"b"}


def test_drop_node_invalidates_the_cache() -> None:
    rt = table(("b", "a/b"), ("c", "a/#"))
    assert rt.match("a/b") == {"b", "c"}
    rt.drop_node("b")
    assert rt.match("a/b") == {"c"}


def test_a_miss_is_cached_and_invalidated_too() -> None:
    rt = RouteTable()
    assert rt.match("a/b") == frozenset()
    rt.add("b", "a/b")
    assert rt.match("a/b") == {"b"}


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "CACHE_MAX", 8)
    rt = table(("b", "t/+"))
    for index in range(100):
        assert rt.match(f"t/{index}") == {"b"}
        assert len(rt._cache) <= 8


# -- against the reference matcher ------------------------------------------------------------

FILTER_LEVELS = ["a", "b", "", "$SYS", "$x", "+"]
TOPIC_LEVELS = ["a", "b", "", "$SYS", "$x"]
NODES = ["b", "c", "d"]


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(FILTER_LEVELS), min_size=0, max_size=4))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    text = "/".join(levels) or "a"  # [""] joins to "", which is not a filter [MQTT-4.7.3-1]
    topics.validate_topic_filter(text)
    return text


@st.composite
def topic_names(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(TOPIC_LEVELS), min_size=1, max_size=5))
    text = "/".join(levels) or "a"
    topics.validate_topic_name(text)
    return text


def brute_force(held: dict[str, set[str]], topic: str) -> frozenset[str]:
    return frozenset(
        node for node, filters in held.items() if any(topics.topic_matches(f, topic) for f in filters)
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(NODES), topic_filters()), max_size=12),
    st.lists(topic_names(), min_size=1, max_size=12),
)
def test_match_agrees_with_the_reference_matcher(pairs: list[tuple[str, str]], names: list[str]) -> None:
    rt = RouteTable()
    held: dict[str, set[str]] = {}
    for node, topic_filter in pairs:
        rt.add(node, topic_filter)
        held.setdefault(node, set()).add(topic_filter)
    for topic in names:
        assert rt.match(topic) == brute_force(held, topic), topic
        assert rt.match(topic) == brute_force(held, topic), topic  # the cached answer too


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["+", "-", "drop"]), st.sampled_from(NODES), topic_filters()),
        max_size=30,
    ),
    st.lists(topic_names(), min_size=1, max_size=8),
)
def test_match_agrees_after_random_changes_and_prunes(
    ops: list[tuple[str, str, str]], names: list[str]
) -> None:
    rt = RouteTable()
    held: dict[str, set[str]] = {}
    for op, node, topic_filter in ops:
        if op == "+":
            assert rt.add(node, topic_filter) is (topic_filter not in held.get(node, set()))
            held.setdefault(node, set()).add(topic_filter)
        elif op == "-":
            assert rt.remove(node, topic_filter) is (topic_filter in held.get(node, set()))
            held.get(node, set()).discard(topic_filter)
        else:
            assert rt.drop_node(node) == sorted(held.pop(node, set()))
        for topic in names:  # interleaved, so a stale cache entry would show
            assert rt.match(topic) == brute_force(held, topic), (topic, ops)
    assert rt.all_filters() == sorted((f, n) for n, fs in held.items() for f in fs)
    for node in NODES:
        rt.drop_node(node)
    assert rt._root.children == {} and rt.filters == {}


@settings(max_examples=300, deadline=None)
@given(topic_filters(), topic_names())
def test_literal_prefix_is_a_prefix_of_every_matched_topic(topic_filter: str, topic: str) -> None:
    if topics.topic_matches(topic_filter, topic):
        assert topic.startswith(literal_prefix(topic_filter))


@pytest.mark.parametrize(
    ("topic_filter", "prefix"),
    [("a/b/+/c", "a/b/"), ("a/#", "a"), ("#", ""), ("+/x", ""), ("a/b", "a/b"), ("/#", "")],
)
def test_literal_prefix_examples(topic_filter: str, prefix: str) -> None:
    assert literal_prefix(topic_filter) == prefix
