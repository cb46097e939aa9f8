"""Hybrid logical clock timestamps and the merge policies of retained messages.

Why: two sides of a partition both change retained messages; when the split heals every node
must end with the same retained set (`Cluster.MergePolicy.Type`, DESIGN.md "Split brain").
"Latest update" must not trust wall clocks alone (they drift between hosts), so every change
carries a hybrid logical clock stamp `(wall_ms, counter, node)`: it follows the wall clock,
never goes backwards, and orders any two changes the same way on every node [Kulkarni et al.,
"Logical Physical Clocks", 2014]. Live updates from other nodes are applied last-writer-wins by
stamp too, so concurrent writes on two nodes converge even without a partition.

Must not: read the clock (callers pass wall milliseconds); do IO.

Invariants: `HybridClock.stamp` is strictly increasing on one node and greater than every stamp
the clock has observed; `wins` is a total order (ties broken by node name), the same on every node.
"""

from __future__ import annotations

from enum import Enum

Stamp = tuple[int, int, str]  # (wall ms, counter, node)

ZERO: Stamp = (0, 0, "")


class MergePolicy(Enum):
    LATEST_UPDATE = "LATEST_UPDATE"  # the change with the later stamp wins (sets and clears alike)
    PUT_IF_ABSENT = "PUT_IF_ABSENT"  # a value beats none; between two values the first put stays
    HIGHER_HITS = "HIGHER_HITS"  # the value changed more often wins (ties: the later stamp)


class HybridClock:
    def __init__(self, node: str) -> None:
        self.node = node
        self.wall_ms = 0
        self.counter = 0

    def stamp(self, wall_ms: int) -> Stamp:
        if wall_ms > self.wall_ms:
            self.wall_ms, self.counter = wall_ms, 0
        else:
            self.counter += 1
        return (self.wall_ms, self.counter, self.node)

    def observe(self, stamp: Stamp) -> None:
        """A stamp from another node: ours stay above it from now on."""
        if (stamp[0], stamp[1]) > (self.wall_ms, self.counter):
            self.wall_ms, self.counter = stamp[0], stamp[1]


def later(a: Stamp, b: Stamp) -> bool:
    """True when `a` is the later change."""
    return a > b


def take_theirs(
    policy: MergePolicy,
    mine: Stamp | None,
    my_hits: int,
    i_have_it: bool,
    theirs: Stamp,
    their_hits: int,
    they_have_it: bool,
) -> bool:
    """After a split heals, does the other side's value (or clear) for a topic replace ours?

    `mine` is None when we never heard of the topic; `i_have_it` / `they_have_it` are False for a
    clear (kept as a stamped tombstone). Every rule is symmetric, so all nodes converge:
    - LATEST_UPDATE: the later stamp, set or clear;
    - PUT_IF_ABSENT: a value beats no value; between two values the first put (earlier stamp) stays;
    - HIGHER_HITS: the value changed more often; ties by the later stamp.
    """
    if mine is None:
        return True
    if policy is MergePolicy.PUT_IF_ABSENT:
        if i_have_it != they_have_it:
            return they_have_it
        return theirs < mine if they_have_it else later(theirs, mine)  # (two clears: the later one)
    if policy is MergePolicy.HIGHER_HITS and their_hits != my_hits:
        return their_hits > my_hits
    return later(theirs, mine)


def as_stamp(value: object) -> Stamp | None:
    """A stamp from the wire (`[ms, counter, node]`), or None if it is not one."""
    if isinstance(value, (list, tuple)) and len(value) == 3:
        ms, counter, node = value
        if isinstance(ms, int) and isinstance(counter, int) and isinstance(node, str):
            return (ms, counter, node)
    return None
