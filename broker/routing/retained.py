"""Retained messages: topic name -> message, looked up by topic filter at SUBSCRIBE time.

Why: a new subscription must receive the retained messages of every topic its filter matches
(spec 3.3.1.3). A trie keyed by level lets a filter walk only the branches it can match: a literal
level follows one child, '+' iterates the children of one node, '#' takes one subtree. A filter
with a literal prefix never looks at topics outside that prefix.

Must not: decide retention policy (empty payload = clear, Retain Handling, expiry, cluster merge
policy are the caller's), copy or inspect messages, do IO or read the clock. Messages that
expire know their own expiry; the caller drops them when it reads them.

Invariants:
- A node exists only if it, or a node below it, holds a message (discard prunes).
- A node holding a message also holds its full topic string, so `match` joins no strings.
- `match` applies the '$' rule: a filter whose first level is '+' or '#' does not match topics
  starting with '$' [MQTT-4.7.2-1]; "a/#" also matches "a" [MQTT-4.7.1-2].
- Topic names are stored as given (validated beforehand), never normalised [MQTT-4.7.3-4].
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar, cast

M = TypeVar("M")


class _Node(Generic[M]):
    __slots__ = ("children", "message", "topic")

    def __init__(self) -> None:
        self.children: dict[str, _Node[M]] = {}
        # `topic` is None exactly when this node holds no message (M itself may be None).
        self.topic: str | None = None
        self.message: M | None = None


def _collect(start: _Node[M], found: list[tuple[str, M]], skip_dollar: bool) -> None:
    """Append every message in the subtree of `start` (itself included) to `found`.

    `skip_dollar` leaves out the direct children whose level starts with '$' (the '$' rule for a
    '#' at the first level).
    """
    if start.topic is not None:
        found.append((start.topic, cast(M, start.message)))
    stack: list[_Node[M]] = [
        child for level, child in start.children.items() if not (skip_dollar and level[:1] == "$")
    ]
    while stack:
        node = stack.pop()
        if node.topic is not None:
            found.append((node.topic, cast(M, node.message)))
        stack.extend(node.children.values())


class RetainedTree(Generic[M]):
    """Retained messages keyed by topic name; `match(filter)` walks only matching branches."""

    __slots__ = ("_root", "_size")

    def __init__(self) -> None:
        self._root: _Node[M] = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def set(self, topic: str, message: M) -> None:
        """Store `message` as the retained message of `topic`, replacing any earlier one."""
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if node.topic is None:
            self._size += 1
            node.topic = topic
        node.message = message

    def discard(self, topic: str) -> bool:
        """Remove the retained message of `topic`; True if there was one."""
        path: list[tuple[_Node[M], str]] = []
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.topic is None:
            return False
        node.topic = None
        node.message = None
        self._size -= 1
        while path and node.topic is None and not node.children:
            parent, level = path.pop()
            del parent.children[level]
            node = parent
        return True

    def get(self, topic: str) -> M | None:
        """The retained message of exactly `topic`, or None."""
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return None
            node = child
        return node.message

    def match(self, topic_filter: str) -> list[tuple[str, M]]:
        """Every (topic, message) whose topic the plain filter `topic_filter` matches."""
        found: list[tuple[str, M]] = []
        levels = topic_filter.split("/")
        frontier: list[_Node[M]] = [self._root]
        for index, level in enumerate(levels):
            first = index == 0
            if level == "#":
                # "a/#" matches "a" too [MQTT-4.7.1-2]; the root itself never holds a message.
                for node in frontier:
                    _collect(node, found, skip_dollar=first)
                return found
            following: list[_Node[M]] = []
            if level == "+":
                for node in frontier:
                    if first:
                        following.extend(
                            child
                            for name, child in node.children.items()
                            if name[:1] != "$"  # [MQTT-4.7.2-1]
                        )
                    else:
                        following.extend(node.children.values())
            else:
                for node in frontier:
                    child = node.children.get(level)
                    if child is not None:
                        following.append(child)
            if not following:
                return found
            frontier = following
        for node in frontier:
            if node.topic is not None:
                found.append((node.topic, cast(M, node.message)))
        return found

    def items(self) -> Iterator[tuple[str, M]]:
        """Every (topic, message), in no particular order."""
        stack: list[_Node[M]] = list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.topic is not None:
                yield node.topic, cast(M, node.message)
            stack.extend(node.children.values())
