"""Which member of a shared subscription gets the next message.

Why: a message that matches "$share/{group}/{filter}" goes to exactly one session of that group
(spec 4.8.2: the server sends each message to only one of the group's sessions), never to all of
them with duplicates dropped later (DESIGN.md). The spec leaves the choice to the server; we use a
round robin that stays fair while members come and go and can skip members that cannot take the
message now (disconnected, over their receive maximum).

Must not: know what a member or a group key is, read the clock, pick at random (tests and
cluster-wide reasoning need determinism), or keep references to members other than the last one
picked per group.

Invariants:
- Per group key we remember only the last member picked and its position. The next pick starts
  just after that member's current position; if it has left, at the position it held (where its
  successor now stands). So with a stable member order every member is picked once per cycle,
  a member that joins takes its turn when the rotation reaches it, and one that leaves does not
  make anyone else skip a turn or be picked twice.
- Fairness assumes the caller passes members in a stable order (e.g. subscription order, which
  is the order `TopicTree.match` returns them in).
- A pick that finds no usable member changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar, overload

K = TypeVar("K")


class SharedChoice:
    """Deterministic, membership-change-tolerant round robin per (group, filter) key."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[Hashable, tuple[object, int]] = {}

    def __len__(self) -> int:
        """How many group keys have state (for metrics and leak tests)."""
        return len(self._last)

    @overload
    def pick(self, group_key: Hashable, members: Sequence[K], usable: None = None) -> K: ...

    @overload
    def pick(self, group_key: Hashable, members: Sequence[K], usable: Callable[[K], bool]) -> K | None: ...

    def pick(
        self,
        group_key: Hashable,
        members: Sequence[K],
        usable: Callable[[K], bool] | None = None,
    ) -> K | None:
        """The member of `members` that gets the next message of `group_key`.

        With `usable`, members for which it returns False are skipped (their turn passes to the
        next one) and None is returned when no member is usable. `members` must not be empty.
        """
        count = len(members)
        if count == 0:
            raise ValueError(f"shared group {group_key!r} has no members")
        state = self._last.get(group_key)
        if state is None:
            start = 0
        else:
            last_member, last_position = state
            if last_position < count and members[last_position] == last_member:
                start = last_position + 1
            else:
                try:
                    start = members.index(last_member) + 1
                except ValueError:
                    # It left: its successor slid into its position and is next in turn.
                    start = last_position
        for offset in range(count):
            position = (start + offset) % count
            member = members[position]
            if usable is None or usable(member):
                self._last[group_key] = (member, position)
                return member
        return None

    def forget(self, group_key: Hashable) -> None:
        """Drop the state of a group (its last member unsubscribed)."""
        self._last.pop(group_key, None)
