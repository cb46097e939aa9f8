"""The subscription trie: topic filter -> {subscriber key: value}, matched by topic name.

Why: a publish must find its subscribers by walking the levels of its topic, touching only the
nodes that can match (the literal child, the '+' child and the '#' child of each node reached),
never by scanning every filter (the amqtt counter-example in STYLE.md).

Must not: know what a key or a value is (client ids, shared-group keys, QoS options, node ids are
the caller's business), deliver, check ACLs, queue, do IO or read the clock. Shared
subscriptions live in the same tree under keys that carry their group; the tree stays generic.

Invariants:
- A node exists only if it, or a node below it, holds at least one entry (remove prunes).
- `len(tree)` is the number of (filter, key) entries; `generation` changes exactly when an
  `add` or `remove` changed the tree, so a caller may cache `match` results per generation.
- `match` applies the '$' rule: a '+' or '#' as the *first* level never matches a topic whose
  first character is '$' [MQTT-4.7.2-1]. A filter "a/#" also matches "a" [MQTT-4.7.1-2].
- `match` returns each matching (filter, key) entry exactly once; a key subscribed through two
  overlapping filters appears once per filter (MQTT 5 lets the server deliver per subscription;
  the caller merges if it wants one copy).
- Filters are taken as given (validated by `broker.protocol.topics` beforehand); the tree never
  normalises them [MQTT-4.7.3-4].
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Node(Generic[K, V]):
    """One level of the trie. Wildcard children are attributes, so a walk is three lookups."""

    __slots__ = ("children", "entries", "hash", "plus")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K, V]] = {}
        self.plus: _Node[K, V] | None = None
        self.hash: _Node[K, V] | None = None
        self.entries: dict[K, V] = {}

    def is_empty(self) -> bool:
        return not self.entries and not self.children and self.plus is None and self.hash is None


class TopicTree(Generic[K, V]):
    """Topic filters -> {key: value}; `match(topic)` walks only the nodes that can match."""

    __slots__ = ("_root", "_size", "generation")

    def __init__(self) -> None:
        self._root: _Node[K, V] = _Node()
        self._size = 0
        self.generation = 0

    def __len__(self) -> int:
        return self._size

    def add(self, topic_filter: str, key: K, value: V) -> bool:
        """Store `value` for `key` under `topic_filter`; True if `key` was new at that filter.

        An existing entry gets the new value (a re-SUBSCRIBE replaces the subscription).
        """
        node = self._root
        for level in topic_filter.split("/"):
            if level == "+":
                child = node.plus
                if child is None:
                    child = node.plus = _Node()
            elif level == "#":
                child = node.hash
                if child is None:
                    child = node.hash = _Node()
            else:
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _Node()
            node = child
        entries = node.entries
        is_new = key not in entries
        if is_new:
            self._size += 1
            self.generation += 1
        elif entries[key] is not value:
            self.generation += 1
        entries[key] = value
        return is_new

    def remove(self, topic_filter: str, key: K) -> bool:
        """Drop `key` from `topic_filter`; True if it was there. Empty nodes are pruned."""
        path: list[tuple[_Node[K, V], str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            if level == "+":
                child = node.plus
            elif level == "#":
                child = node.hash
            else:
                child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if key not in node.entries:
            return False
        del node.entries[key]
        self._size -= 1
        self.generation += 1
        while path and node.is_empty():
            parent, level = path.pop()
            if level == "+":
                parent.plus = None
            elif level == "#":
                parent.hash = None
            else:
                del parent.children[level]
            node = parent
        return True

    def match(self, topic: str) -> list[tuple[K, V]]:
        """Every (key, value) whose filter matches the topic name `topic`."""
        found: list[tuple[K, V]] = []
        levels = topic.split("/")
        root = self._root
        # First level handled apart: it is where the '$' rule applies [MQTT-4.7.2-1].
        frontier: list[_Node[K, V]] = []
        if topic[:1] != "$":
            wild = root.hash
            if wild is not None:
                found.extend(wild.entries.items())
            wild = root.plus
            if wild is not None:
                frontier.append(wild)
        child = root.children.get(levels[0])
        if child is not None:
            frontier.append(child)
        for index in range(1, len(levels)):
            if not frontier:
                return found
            level = levels[index]
            following: list[_Node[K, V]] = []
            for node in frontier:
                wild = node.hash
                if wild is not None:
                    found.extend(wild.entries.items())
                wild = node.plus
                if wild is not None:
                    following.append(wild)
                child = node.children.get(level)
                if child is not None:
                    following.append(child)
            frontier = following
        for node in frontier:
            if node.entries:
                found.extend(node.entries.items())
            # "a/#" matches "a": the parent level itself [MQTT-4.7.1-2].
            wild = node.hash
            if wild is not None:
                found.extend(wild.entries.items())
        return found

    def filters(self) -> Iterator[str]:
        """Every filter that holds at least one key (order unspecified)."""
        stack: list[tuple[_Node[K, V], str | None]] = [(self._root, None)]
        while stack:
            node, name = stack.pop()
            if node.entries and name is not None:
                yield name
            for level, child in node.children.items():
                stack.append((child, level if name is None else f"{name}/{level}"))
            if node.plus is not None:
                stack.append((node.plus, "+" if name is None else f"{name}/+"))
            if node.hash is not None:
                stack.append((node.hash, "#" if name is None else f"{name}/#"))

    def entries(self, topic_filter: str) -> dict[K, V]:
        """A copy of the keys stored under exactly `topic_filter` (for UNSUBSCRIBE, admin)."""
        node: _Node[K, V] | None = self._root
        for level in topic_filter.split("/"):
            if node is None:
                return {}
            if level == "+":
                node = node.plus
            elif level == "#":
                node = node.hash
            else:
                node = node.children.get(level)
        return dict(node.entries) if node is not None else {}
