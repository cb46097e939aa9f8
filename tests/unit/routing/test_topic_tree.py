"""TopicTree: examples, the '$' rule, pruning, and equality with the brute-force reference."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.protocol.topics import topic_matches, validate_topic_filter, validate_topic_name
from broker.routing.topic_tree import TopicTree

# Shared with test_retained: a tiny level alphabet so that random filters and topics collide.
LEVELS = ["a", "b", "", "$SYS", "$x", "é"]

topic_names = (
    st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4)
    .map("/".join)
    .filter(bool)  # a lone empty level is the empty string, never a topic name [MQTT-4.7.3-1]
)


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from([*LEVELS, "+", "+"]), min_size=0, max_size=4))
    if not levels or draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "#"


def _keys(tree: TopicTree[str, int], topic: str) -> list[str]:
    return sorted(key for key, _ in tree.match(topic))


def test_match_examples() -> None:
    tree: TopicTree[str, int] = TopicTree()
    for index, topic_filter in enumerate(
        ["sport/tennis/#", "sport/+", "+/+", "/+", "+", "#", "a//b", "$SYS/#", "sport/tennis"]
    ):
        tree.add(topic_filter, topic_filter, index)
    assert _keys(tree, "sport/tennis") == sorted(["sport/tennis/#", "sport/+", "+/+", "#", "sport/tennis"])
    assert _keys(tree, "/finance") == sorted(["+/+", "/+", "#"])
    assert _keys(tree, "sport") == sorted(["+", "#"])
    assert _keys(tree, "sport/") == sorted(["sport/+", "+/+", "#"])
    assert _keys(tree, "a//b") == sorted(["a//b", "#"])
    assert _keys(tree, "x/y/z") == ["#"]


def test_dollar_rule_mqtt_4_7_2_1() -> None:
    """[MQTT-4.7.2-1] '#' and '+' as first level never match '$' topics; later levels do."""
    tree: TopicTree[str, int] = TopicTree()
    for topic_filter in ["#", "+", "+/#", "+/broker", "$SYS/#", "$SYS/+", "a/+", "a/#"]:
        tree.add(topic_filter, topic_filter, 0)
    assert _keys(tree, "$SYS/broker") == ["$SYS/#", "$SYS/+"]
    assert _keys(tree, "$SYS") == ["$SYS/#"]
    assert _keys(tree, "a/$x") == sorted(["#", "+/#", "a/+", "a/#"])


def test_hash_matches_parent_mqtt_4_7_1_2() -> None:
    """[MQTT-4.7.1-2] "sport/tennis/#" matches "sport/tennis"; "#" alone matches everything."""
    tree: TopicTree[str, int] = TopicTree()
    tree.add("sport/tennis/#", "k", 1)
    assert tree.match("sport/tennis") == [("k", 1)]
    assert tree.match("sport/tennis/x/y") == [("k", 1)]
    assert tree.match("sport") == []


def test_add_replace_remove_len_generation() -> None:
    tree: TopicTree[str, str] = TopicTree()
    assert len(tree) == 0
    generation = tree.generation
    assert tree.add("a/+", "c1", "qos0") is True
    assert tree.add("a/+", "c2", "qos1") is True
    assert tree.add("a/+", "c1", "qos2") is False  # replaced, not added
    assert len(tree) == 2
    assert sorted(tree.match("a/b")) == [("c1", "qos2"), ("c2", "qos1")]
    assert tree.generation > generation
    generation = tree.generation
    assert tree.remove("a/+", "nobody") is False
    assert tree.remove("a/b", "c1") is False
    assert tree.remove("a", "c1") is False
    assert tree.generation == generation
    assert tree.remove("a/+", "c1") is True
    assert tree.generation > generation
    assert tree.match("a/b") == [("c2", "qos1")]
    assert len(tree) == 1
    assert list(tree.filters()) == ["a/+"]
    assert tree.entries("a/+") == {"c2": "qos1"}
    assert tree.entries("a/b") == {}


def test_remove_prunes_empty_nodes() -> None:
    tree: TopicTree[str, int] = TopicTree()
    tree.add("a/b/c/#", "k", 0)
    tree.add("a/+/c", "k", 0)
    tree.remove("a/b/c/#", "k")
    tree.remove("a/+/c", "k")
    root = tree._root
    assert not root.children and root.plus is None and root.hash is None


def test_same_key_many_filters_one_entry_per_filter() -> None:
    tree: TopicTree[str, int] = TopicTree()
    tree.add("a/#", "c", 1)
    tree.add("a/+", "c", 2)
    tree.add("#", "c", 3)
    assert sorted(tree.match("a/b")) == [("c", 1), ("c", 2), ("c", 3)]


def test_filters_lists_every_filter() -> None:
    tree: TopicTree[str, int] = TopicTree()
    filters = ["#", "+", "a", "a/#", "/", "a//+", "$SYS/#", "+/+/#"]
    for topic_filter in filters:
        tree.add(topic_filter, "k", 0)
    assert sorted(tree.filters()) == sorted(filters)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(topic_filters(), st.integers(0, 3)), max_size=25),
    st.lists(topic_names, min_size=1, max_size=10),
)
def test_match_equals_brute_force(subs: list[tuple[str, int]], topics: list[str]) -> None:
    tree: TopicTree[int, str] = TopicTree()
    for topic_filter, key in subs:
        validate_topic_filter(topic_filter)
        tree.add(topic_filter, key, topic_filter)
    stored = set(subs)
    assert len(tree) == len(stored)
    assert sorted(tree.filters()) == sorted({topic_filter for topic_filter, _ in stored})
    for topic in topics:
        validate_topic_name(topic)
        expected = Counter((key, f) for f, key in stored if topic_matches(f, topic))
        assert Counter(tree.match(topic)) == expected, topic


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), topic_filters(), st.integers(0, 2)),
        max_size=40,
    ),
    st.lists(topic_names, min_size=1, max_size=8),
)
def test_match_after_add_remove_sequences(operations: list[tuple[bool, str, int]], topics: list[str]) -> None:
    tree: TopicTree[int, str] = TopicTree()
    model: set[tuple[str, int]] = set()
    for is_add, topic_filter, key in operations:
        before = tree.generation
        if is_add:
            assert tree.add(topic_filter, key, topic_filter) is ((topic_filter, key) not in model)
            model.add((topic_filter, key))
        else:
            changed = tree.remove(topic_filter, key)
            assert changed is ((topic_filter, key) in model)
            assert (tree.generation != before) is changed
            model.discard((topic_filter, key))
        assert len(tree) == len(model)
    for topic in topics:
        expected = Counter((key, f) for f, key in model if topic_matches(f, topic))
        assert Counter(tree.match(topic)) == expected, topic
    for topic_filter, key in list(model):
        assert tree.remove(topic_filter, key)
    root = tree._root
    assert len(tree) == 0
    assert not root.children and root.plus is None and root.hash is None
