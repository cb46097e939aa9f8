"""mesh/hlc.py: hybrid logical clock stamps and the retained merge policies converge."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.hlc import HybridClock, MergePolicy, Stamp, as_stamp, take_theirs


def test_stamps_never_go_backwards_and_stay_above_what_was_observed() -> None:
    clock = HybridClock("a")
    first = clock.stamp(1000)
    assert clock.stamp(999) > first  # the wall clock stepped back: the counter carries on
    clock.observe((5000, 7, "b"))
    after = clock.stamp(1001)
    assert after > (5000, 7, "b") and after[2] == "a"
    assert clock.stamp(6000) == (6000, 0, "a")


def test_as_stamp_reads_the_wire_form() -> None:
    assert as_stamp([1, 2, "n"]) == (1, 2, "n")
    assert as_stamp([1, "2", "n"]) is None and as_stamp(None) is None and as_stamp([1, 2]) is None


side = st.tuples(
    st.tuples(st.integers(0, 50), st.integers(0, 3), st.sampled_from(["a", "b"])),  # stamp
    st.integers(0, 5),  # hits
    st.booleans(),  # has a value (False: cleared)
)


@given(st.sampled_from(list(MergePolicy)), side, side)
def test_both_sides_end_with_the_same_value(
    policy: MergePolicy, a: tuple[Stamp, int, bool], b: tuple[Stamp, int, bool]
) -> None:
    """Merging each side's entry into the other gives one answer on both (every node converges)."""
    if a[0] == b[0] and a != b:
        return  # two different changes never share a stamp (the node name is part of it)

    def merged(mine: tuple[Stamp, int, bool], theirs: tuple[Stamp, int, bool]) -> tuple[Stamp, int, bool]:
        take = take_theirs(policy, mine[0], mine[1], mine[2], theirs[0], theirs[1], theirs[2])
        return theirs if take else mine

    assert merged(a, b) == merged(b, a)


def test_the_policies_pick_as_documented() -> None:
    old, new = (1000, 0, "a"), (2000, 0, "b")
    assert take_theirs(MergePolicy.LATEST_UPDATE, old, 1, True, new, 1, False)  # a later clear wins
    assert not take_theirs(MergePolicy.LATEST_UPDATE, new, 1, True, old, 9, True)
    assert take_theirs(MergePolicy.PUT_IF_ABSENT, new, 1, False, old, 1, True)  # a value beats none
    assert take_theirs(MergePolicy.PUT_IF_ABSENT, new, 1, True, old, 1, True)  # the first put stays
    assert not take_theirs(MergePolicy.PUT_IF_ABSENT, old, 1, True, new, 1, True)
    assert take_theirs(MergePolicy.HIGHER_HITS, new, 1, True, old, 3, True)  # more changes win
    assert take_theirs(MergePolicy.HIGHER_HITS, old, 2, True, new, 2, True)  # tie: the later
    assert take_theirs(MergePolicy.HIGHER_HITS, None, 0, False, old, 1, True)  # never heard of it
