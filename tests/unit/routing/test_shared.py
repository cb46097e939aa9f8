"""SharedChoice: one member per message, fair round robin while members come and go."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.routing.shared import SharedChoice

GROUP = ("g", "a/+")


def _picks(choice: SharedChoice, members: list[str], count: int) -> list[str]:
    return [choice.pick(GROUP, members) for _ in range(count)]


def test_round_robin_over_three_members() -> None:
    """Each message goes to exactly one member (spec 4.8.2), in turn."""
    choice = SharedChoice()
    assert _picks(choice, ["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]


def test_groups_are_independent() -> None:
    choice = SharedChoice()
    assert choice.pick("g1", ["a", "b"]) == "a"
    assert choice.pick("g2", ["a", "b"]) == "a"
    assert choice.pick("g1", ["a", "b"]) == "b"
    assert len(choice) == 2
    choice.forget("g1")
    choice.forget("unknown")
    assert len(choice) == 1
    assert choice.pick("g1", ["a", "b"]) == "a"


def test_member_leaving_passes_turn_to_its_successor() -> None:
    choice = SharedChoice()
    assert _picks(choice, ["a", "b", "c"], 2) == ["a", "b"]
    # b (just picked) leaves: c is next, nobody is skipped or repeated.
    assert _picks(choice, ["a", "c"], 3) == ["c", "a", "c"]


def test_other_member_leaving_does_not_disturb_order() -> None:
    choice = SharedChoice()
    assert _picks(choice, ["a", "b", "c", "d"], 2) == ["a", "b"]
    assert _picks(choice, ["b", "c", "d"], 3) == ["c", "d", "b"]


def test_last_member_leaving_wraps() -> None:
    choice = SharedChoice()
    assert _picks(choice, ["a", "b", "c"], 3) == ["a", "b", "c"]
    assert _picks(choice, ["a", "b"], 2) == ["a", "b"]


def test_member_joining_takes_its_turn() -> None:
    choice = SharedChoice()
    assert _picks(choice, ["a", "b", "c"], 2) == ["a", "b"]
    assert _picks(choice, ["a", "b", "c", "d"], 4) == ["c", "d", "a", "b"]
    assert _picks(choice, ["x", "a", "b", "c", "d"], 5) == ["c", "d", "x", "a", "b"]


def test_usable_predicate_skips_members() -> None:
    choice = SharedChoice()
    members = ["a", "b", "c"]
    offline = {"b"}

    def usable(member: str) -> bool:
        return member not in offline

    picks = [choice.pick(GROUP, members, usable) for _ in range(4)]
    assert picks == ["a", "c", "a", "c"]
    offline.clear()
    assert [choice.pick(GROUP, members, usable) for _ in range(3)] == ["a", "b", "c"]


def test_no_usable_member_returns_none_and_keeps_state() -> None:
    choice = SharedChoice()
    members = ["a", "b", "c"]
    assert choice.pick(GROUP, members) == "a"
    assert choice.pick(GROUP, members, lambda _member: False) is None
    assert choice.pick(GROUP, members) == "b"


def test_empty_members_is_an_error() -> None:
    with pytest.raises(ValueError):
        SharedChoice().pick(GROUP, [])


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5))
def test_fair_with_stable_members(size: int, rounds: int) -> None:
    choice = SharedChoice()
    members = [f"m{index}" for index in range(size)]
    counts = Counter(_picks(choice, members, size * rounds))
    assert counts == dict.fromkeys(members, rounds)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sets(st.integers(0, 5), min_size=1), min_size=1, max_size=12))
def test_no_member_picked_twice_before_others_in_a_stable_stretch(
    memberships: list[set[int]],
) -> None:
    """After any membership change, a stretch of len(members) picks covers every member once."""
    choice = SharedChoice()
    for membership in memberships:
        members = sorted(membership)
        assert sorted(_picks(choice, [str(m) for m in members], len(members))) == sorted(
            str(m) for m in members
        )
