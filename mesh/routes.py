"""The cluster route table: which nodes have subscribers for which topic filters.

Why: a relay sends a publish to another node only when that node has a subscriber whose filter
matches the topic, one copy per node (`mesh/PROTOCOL.md`, routing across nodes). Each node owns
its own filters and replicates them to the others; this module holds the replicas and answers
"which nodes want this topic" with an MQTT matcher (a trie over topic levels), cached per topic.

Must not: import the broker (the broker's own topic tree lives in `broker/routing`); read the
clock; do IO.

Invariants:
- `match` agrees with MQTT matching [MQTT-4.7]: `+` one level, `#` this level and below
  (including the parent), and a filter starting with a wildcard never matches a `$` topic
  [MQTT-4.7.2-1].
- A filter is present for a node at most once (the owner sends `route +` on 0 -> 1 and `route -`
  on 1 -> 0); a `-` for an absent filter is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CACHE_MAX = 16384


@dataclass(slots=True)
class _Level:
    children: dict[str, _Level] = field(default_factory=dict)
    nodes: set[str] = field(default_factory=set)  # nodes whose filter ends at this level


class RouteTable:
    """Filters of the other nodes, per node, with a topic -> nodes matcher."""

    def __init__(self) -> None:
        self._root = _Level()
        self.filters: dict[str, set[str]] = {}  # node -> its filters
        self._cache: dict[str, frozenset[str]] = {}

    def add(self, node: str, topic_filter: str) -> bool:
        """Record the filter for the node; True when it was new."""
        mine = self.filters.setdefault(node, set())
        if topic_filter in mine:
            return False
        mine.add(topic_filter)
        level = self._root
        for part in topic_filter.split("/"):
            level = level.children.setdefault(part, _Level())
        level.nodes.add(node)
        self._cache.clear()
        return True

    def remove(self, node: str, topic_filter: str) -> bool:
        mine = self.filters.get(node)
        if mine is None or topic_filter not in mine:
            return False
        mine.discard(topic_filter)
        if not mine:
            del self.filters[node]
        path = [self._root]
        for part in topic_filter.split("/"):
            path.append(path[-1].children[part])
        path[-1].nodes.discard(node)
        parts = topic_filter.split("/")
        for depth in range(len(parts), 0, -1):  # prune empty branches
            level = path[depth]
            if level.nodes or level.children:
                break
            del path[depth - 1].children[parts[depth - 1]]
        self._cache.clear()
        return True

    def drop_node(self, node: str) -> list[str]:
        """Forget every filter of a node (it died, left or resynchronises); returns them."""
        removed = sorted(self.filters.get(node, ()))
        for topic_filter in removed:
            self.remove(node, topic_filter)
        return removed

    def match(self, topic: str) -> frozenset[str]:
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        found: set[str] = set()
        parts = topic.split("/")
        self._walk(self._root, parts, 0, found, topic.startswith("$"))
        result = frozenset(found)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[topic] = result
        return result

    def _walk(self, level: _Level, parts: list[str], depth: int, found: set[str], dollar: bool) -> None:
        wild_ok = not (dollar and depth == 0)
        multi = level.children.get("#")
        if multi is not None and wild_ok:
            found |= multi.nodes  # '#' matches this level and everything below [MQTT-4.7.1-2]
        if depth == len(parts):
            found |= level.nodes
            return
        exact = level.children.get(parts[depth])
        if exact is not None:
            self._walk(exact, parts, depth + 1, found, dollar)
        single = level.children.get("+")
        if single is not None and wild_ok:
            self._walk(single, parts, depth + 1, found, dollar)

    def all_filters(self) -> list[tuple[str, str]]:
        """(filter, node) pairs, sorted: for meshctl and tests."""
        return sorted((f, node) for node, filters in self.filters.items() for f in filters)


def literal_prefix(topic_filter: str) -> str:
    """The text every topic matched by the filter starts with: what a ZeroMQ SUB subscribes to.

    The same rule as `broker.protocol.topics.literal_prefix` (mesh may not import the broker):
    "a/b/+/c" -> "a/b/", "a/#" -> "a" (it also matches "a" [MQTT-4.7.1-2]), "#" -> "".
    """
    plus = topic_filter.find("+")
    if plus >= 0:
        return topic_filter[:plus]
    if topic_filter.endswith("#"):
        return topic_filter[:-2] if len(topic_filter) > 1 else ""
    return topic_filter
