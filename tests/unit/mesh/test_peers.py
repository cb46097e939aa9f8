"""Streams and membership states of the cluster plane (`mesh/peers.py`), without sockets.

What is pinned: an `OutStream` keeps every frame until it is acknowledged on its own stream and
`resend_from` returns every kept frame from the asked seq on, `[]` for a seq not sent yet, and
None when the frames were trimmed or the stream is another one (the stream must restart with a
snapshot); `InStream.accept` says `new` only for seq 1 of a new (incarnation, stream), `apply`
exactly once per seq in order, `dup` for what was applied and `gap` for what is ahead; `Peer.age`
moves only ALIVE -> SUSPECT and anything but DEAD/LEFT -> DEAD (a JOINING peer stays JOINING
until its snapshot ends or it dies), `heard` brings SUSPECT back to ALIVE; `survivor` is the
smallest live name but the dead one.
"""

from __future__ import annotations

import pytest

from mesh.peers import InStream, OutStream, Peer, State, survivor

pytestmark = pytest.mark.timeout(10)

SUSPECT_S = 1.5
DEAD_S = 4.0


def filled(count: int, stream: int = 7) -> OutStream:
    out = OutStream(stream)
    for _ in range(count):
        seq = out.next_seq()
        out.keep(seq, f"h{seq}".encode(), (b"ch", f"d{seq}".encode()))
    return out


def seqs(entries: list[tuple[int, bytes, tuple[bytes, ...]]] | None) -> list[int] | None:
    return None if entries is None else [entry[0] for entry in entries]


# -- OutStream ---------------------------------------------------------------------------------


def test_next_seq_starts_at_one_and_counts() -> None:
    out = OutStream(3)
    assert [out.next_seq() for _ in range(3)] == [1, 2, 3]
    assert out.unacked == 3


def test_keep_holds_frames_in_order_with_their_extra_frames() -> None:
    out = filled(3)
    assert list(out.buffer) == [(n, f"h{n}".encode(), (b"ch", f"d{n}".encode())) for n in (1, 2, 3)]


def test_ack_trims_up_to_the_acked_seq() -> None:
    out = filled(5)
    out.ack(7, 3)
    assert out.acked == 3
    assert [entry[0] for entry in out.buffer] == [4, 5]
    assert out.unacked == 2


def test_ack_of_another_stream_is_ignored() -> None:
    out = filled(5)
    out.ack(8, 5)
    assert out.acked == 0
    assert len(out.buffer) == 5


def test_ack_never_goes_back() -> None:
    out = filled(5)
    out.ack(7, 4)
    out.ack(7, 2)
    assert out.acked == 4
    assert [entry[0] for entry in out.buffer] == [5]


def test_ack_beyond_what_was_sent_is_clamped() -> None:
    out = filled(3)
    out.ack(7, 99)
    assert out.acked == 3
    assert not out.buffer
    assert out.unacked == 0


def test_resend_from_returns_every_kept_frame_from_the_asked_seq() -> None:
    out = filled(5)
    out.ack(7, 1)
    assert seqs(out.resend_from(7, 2)) == [2, 3, 4, 5]
    assert seqs(out.resend_from(7, 4)) == [4, 5]
    assert seqs(out.resend_from(7, 5)) == [5]
    assert len(out.buffer) == 4  # resending does not consume


def test_resend_from_a_trimmed_seq_is_none() -> None:
    out = filled(5)
    out.ack(7, 3)
    assert out.resend_from(7, 3) is None  # only a new stream (a snapshot) can repair it
    assert out.resend_from(7, 1) is None


def test_resend_from_when_everything_was_acked_is_none_or_empty() -> None:
    out = filled(3)
    out.ack(7, 3)
    assert out.resend_from(7, 2) is None
    assert out.resend_from(7, 4) == []  # the next one: nothing missing


def test_resend_of_another_stream_is_none() -> None:
    out = filled(3)
    assert out.resend_from(6, 1) is None


def test_resend_from_the_future_is_empty() -> None:
    out = filled(3)
    assert out.resend_from(7, 4) == []
    assert out.resend_from(7, 100) == []
    assert OutStream(1).resend_from(1, 1) == []


def test_resend_from_a_skipped_seq_is_none() -> None:
    """A seq taken but never kept cannot be resent: the stream has to start over."""
    out = filled(2)
    out.ack(7, 2)
    out.next_seq()  # 3, never kept
    seq = out.next_seq()
    out.keep(seq, b"h4", ())
    assert out.resend_from(7, 3) is None
    assert seqs(out.resend_from(7, 4)) == [4]


# -- InStream --------------------------------------------------------------------------------------


def test_first_frame_of_a_stream_is_new() -> None:
    inn = InStream()
    assert inn.accept(100, 5, 1) == "new"
    assert (inn.incarnation, inn.stream, inn.expected, inn.applied) == (100, 5, 2, 1)


def test_a_new_stream_must_start_at_seq_one() -> None:
    inn = InStream()
    assert inn.accept(100, 5, 2) == "gap"
    assert (inn.incarnation, inn.stream, inn.expected) == (0, 0, 1)  # unchanged
    assert inn.accept(100, 5, 1) == "new"


def test_in_order_frames_apply_once() -> None:
    inn = InStream()
    inn.accept(100, 5, 1)
    assert [inn.accept(100, 5, seq) for seq in (2, 3, 4)] == ["apply"] * 3
    assert inn.applied == 4
    assert [inn.accept(100, 5, seq) for seq in (1, 3, 4)] == ["dup"] * 3
    assert inn.applied == 4


def test_a_frame_ahead_is_a_gap_and_is_not_applied() -> None:
    inn = InStream()
    inn.accept(100, 5, 1)
    assert inn.accept(100, 5, 3) == "gap"
    assert inn.expected == 2
    assert inn.accept(100, 5, 2) == "apply"
    assert inn.accept(100, 5, 3) == "apply"


def test_a_new_stream_of_the_same_incarnation_is_new() -> None:
    inn = InStream()
    inn.accept(100, 5, 1)
    inn.accept(100, 5, 2)
    assert inn.accept(100, 6, 3) == "gap"
    assert inn.accept(100, 6, 1) == "new"
    assert inn.expected == 2
    assert inn.accept(100, 5, 3) == "gap"  # the old stream is over


def test_a_new_incarnation_is_new() -> None:
    inn = InStream()
    inn.accept(100, 5, 1)
    assert inn.accept(200, 5, 1) == "new"
    assert inn.incarnation == 200


# -- Peer ----------------------------------------------------------------------------------------


def peer(state: State, last_heard: float = 10.0) -> Peer:
    return Peer("b", 1, "127.0.0.1", 7000, state=state, last_heard=last_heard)


@pytest.mark.parametrize(
    ("state", "routable"),
    [
        (State.JOINING, True),
        (State.ALIVE, True),
        (State.SUSPECT, True),
        (State.DEAD, False),
        (State.LEFT, False),
    ],
)
def test_routable_states(state: State, routable: bool) -> None:
    assert peer(state).routable is routable


def state_of(p: Peer) -> State:
    return p.state  # read through a call: mypy would narrow `p.state` across the steps


def test_alive_becomes_suspect_then_dead() -> None:
    p = peer(State.ALIVE)
    assert p.age(10.0 + SUSPECT_S - 0.01, SUSPECT_S, DEAD_S) is None
    assert state_of(p) is State.ALIVE
    assert p.age(10.0 + SUSPECT_S, SUSPECT_S, DEAD_S) is State.SUSPECT
    assert p.age(10.0 + SUSPECT_S + 1, SUSPECT_S, DEAD_S) is None  # reported once
    assert state_of(p) is State.SUSPECT
    assert p.age(10.0 + DEAD_S, SUSPECT_S, DEAD_S) is State.DEAD
    assert state_of(p) is State.DEAD


def test_long_silence_goes_straight_to_dead() -> None:
    p = peer(State.ALIVE)
    assert p.age(10.0 + DEAD_S + 5, SUSPECT_S, DEAD_S) is State.DEAD


def test_a_joining_peer_stays_joining_until_dead() -> None:
    p = peer(State.JOINING)
    assert p.age(10.0 + SUSPECT_S + 0.5, SUSPECT_S, DEAD_S) is None
    assert p.state is State.JOINING
    assert p.age(10.0 + DEAD_S, SUSPECT_S, DEAD_S) is State.DEAD


@pytest.mark.parametrize("state", [State.DEAD, State.LEFT])
def test_dead_and_left_are_final(state: State) -> None:
    p = peer(state)
    assert p.age(10.0 + DEAD_S * 10, SUSPECT_S, DEAD_S) is None
    assert p.state is state
    assert not p.heard(100.0)
    assert p.state is state


def test_heard_brings_a_suspect_back() -> None:
    p = peer(State.ALIVE)
    p.age(10.0 + SUSPECT_S, SUSPECT_S, DEAD_S)
    assert p.heard(12.0)
    assert p.state is State.ALIVE
    assert p.last_heard == 12.0
    assert p.age(12.0 + SUSPECT_S - 0.01, SUSPECT_S, DEAD_S) is None  # silence counts from 12.0


@pytest.mark.parametrize("state", [State.ALIVE, State.JOINING])
def test_heard_updates_the_time_without_a_change(state: State) -> None:
    p = peer(state)
    assert not p.heard(11.0)
    assert p.state is state
    assert p.last_heard == 11.0


# -- survivor ------------------------------------------------------------------------------------


def test_survivor_is_the_smallest_live_name_but_the_dead() -> None:
    assert survivor("a", ["a", "c", "b"]) == "b"
    assert survivor("b", ["c", "a", "b"]) == "a"
    assert survivor("z", ["node10", "node2"]) == "node10"  # plain string order, the same everywhere


def test_no_survivor_without_live_nodes() -> None:
    assert survivor("a", []) is None
    assert survivor("a", ["a"]) is None
