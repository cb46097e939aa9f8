"""RetainedTree: set/get/discard, the '$' rule, pruning, and equality with brute force."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.protocol.topics import topic_matches
from broker.routing.retained import RetainedTree
from tests.unit.routing.test_topic_tree import topic_filters, topic_names


def _tree(*topics: str) -> RetainedTree[str]:
    tree: RetainedTree[str] = RetainedTree()
    for topic in topics:
        tree.set(topic, f"m:{topic}")
    return tree


def _topics(tree: RetainedTree[str], topic_filter: str) -> list[str]:
    return sorted(topic for topic, _ in tree.match(topic_filter))


def test_set_get_replace_discard() -> None:
    tree: RetainedTree[str] = RetainedTree()
    assert tree.get("a/b") is None
    tree.set("a/b", "one")
    tree.set("a/b", "two")
    assert tree.get("a/b") == "two"
    assert tree.get("a") is None
    assert len(tree) == 1
    assert tree.discard("a") is False
    assert tree.discard("a/b/c") is False
    assert tree.discard("a/b") is True
    assert tree.discard("a/b") is False
    assert len(tree) == 0
    assert not tree._root.children  # pruned


def test_none_is_a_storable_message() -> None:
    tree: RetainedTree[str | None] = RetainedTree()
    tree.set("a", None)
    assert len(tree) == 1
    assert tree.match("a") == [("a", None)]
    assert list(tree.items()) == [("a", None)]


def test_discard_keeps_children_and_parents() -> None:
    tree = _tree("a", "a/b", "a/b/c")
    assert tree.discard("a/b")
    assert sorted(tree.items()) == [("a", "m:a"), ("a/b/c", "m:a/b/c")]
    assert tree.discard("a/b/c")
    assert list(tree._root.children["a"].children) == []


def test_match_examples() -> None:
    tree = _tree("sport", "sport/tennis", "sport/tennis/player1", "/finance", "a//b", "sport/")
    assert _topics(tree, "sport/tennis/#") == ["sport/tennis", "sport/tennis/player1"]
    assert _topics(tree, "sport/#") == [
        "sport",
        "sport/",
        "sport/tennis",
        "sport/tennis/player1",
    ]
    assert _topics(tree, "sport/+") == ["sport/", "sport/tennis"]
    assert _topics(tree, "+") == ["sport"]
    assert _topics(tree, "+/+") == ["/finance", "sport/", "sport/tennis"]
    assert _topics(tree, "/+") == ["/finance"]
    assert _topics(tree, "a/+/b") == ["a//b"]
    assert _topics(tree, "sport/tennis") == ["sport/tennis"]
    assert _topics(tree, "nothing/#") == []


def test_dollar_rule_mqtt_4_7_2_1() -> None:
    """[MQTT-4.7.2-1] '#' / '+' first levels skip '$' topics; "$SYS/#" and "a/+" do not."""
    tree = _tree("$SYS/broker/uptime", "$SYS", "a/$x", "b")
    assert _topics(tree, "#") == ["a/$x", "b"]
    assert _topics(tree, "+") == ["b"]
    assert _topics(tree, "+/broker/+") == []
    assert _topics(tree, "$SYS/#") == ["$SYS", "$SYS/broker/uptime"]
    assert _topics(tree, "a/+") == ["a/$x"]


def test_hash_matches_parent_mqtt_4_7_1_2() -> None:
    """[MQTT-4.7.1-2] "sport/tennis/#" matches the retained topic "sport/tennis"."""
    tree = _tree("sport/tennis")
    assert tree.match("sport/tennis/#") == [("sport/tennis", "m:sport/tennis")]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), topic_names), max_size=40),
    st.lists(topic_filters(), min_size=1, max_size=10),
)
def test_match_equals_brute_force(operations: list[tuple[bool, str]], topic_filters_: list[str]) -> None:
    tree: RetainedTree[str] = RetainedTree()
    model: dict[str, str] = {}
    for serial, (is_set, topic) in enumerate(operations):
        if is_set:
            tree.set(topic, f"{topic}#{serial}")
            model[topic] = f"{topic}#{serial}"
        else:
            assert tree.discard(topic) is (topic in model)
            model.pop(topic, None)
        assert len(tree) == len(model)
    assert sorted(tree.items()) == sorted(model.items())
    for topic, message in model.items():
        assert tree.get(topic) == message
    for topic_filter in topic_filters_:
        expected = sorted((t, m) for t, m in model.items() if topic_matches(topic_filter, t))
        assert sorted(tree.match(topic_filter)) == expected, topic_filter
    for topic in list(model):
        tree.discard(topic)
    assert not tree._root.children
