"""The relay's state without sockets (`mesh/relay.py`, `RelayState`).

What is pinned: claim epochs strictly increase; the previous holder of a client id is named only
if it is alive (or is the claiming worker itself); `unregister` removes an entry only with the
current epoch; `forget(worker)` drops the worker's clients, its shared members and its barrier
waits; `apply` keeps retained sets and clears and shared joins and leaves, with a mark per
origin; `snapshot` shortens the retained messages' expiry by their age and drops expired ones.
"""

from __future__ import annotations

import pytest

from mesh import envelope as env
from mesh.envelope import CH_RETAINED, CH_SHARED, Item
from mesh.relay import RelayState, _Sync, _Worker

pytestmark = pytest.mark.timeout(10)


def alive(*workers: int, epoch: int = 1000) -> RelayState:
    state = RelayState(epoch=epoch)
    for index in workers:
        state.workers[index] = _Worker(incarnation=1, last_seen=0.0)
    return state


def item(payload: bytes = b"x", expiry_ms: int | None = None, qos: int = 1) -> Item:
    return (qos, True, payload, "pub", None, expiry_ms, 0)


def retained(origin: str, seq: int, topic: str, *items: Item) -> env.PublishBatch:
    return env.PublishBatch(origin, seq, topic, items)


def shared(
    origin: str, seq: int, op: str, client_id: str = "c", group: str = "g", qos: int = 1
) -> env.SharedUpdate:
    return env.SharedUpdate(origin, seq, op, group, "a/+", client_id, qos, None)


# -- claims ------------------------------------------------------------------------------------


def test_claim_epochs_strictly_increase() -> None:
    state = alive(1, 2)
    epochs = [
        state.claim(cid, worker)[0] for cid, worker in [("a", 1), ("b", 2), ("a", 2), ("a", 1), ("c", 1)]
    ]
    assert epochs == sorted(set(epochs))
    assert epochs[0] > 1000
    assert state.registry["a"] == (1, epochs[3])


def test_default_epoch_starts_from_the_clock_so_it_grows_across_restarts() -> None:
    first = RelayState()
    epoch, _ = first.claim("a", 1)
    second = RelayState()  # a relay restarted later
    assert second.claim("a", 1)[0] > epoch


def test_first_claim_has_no_previous_holder() -> None:
    state = alive(1)
    assert state.claim("a", 1)[1] is None


def test_previous_holder_is_named_when_alive() -> None:
    state = alive(1, 2)
    state.claim("a", 1)
    epoch, holder = state.claim("a", 2)
    assert holder == 1
    assert state.registry["a"] == (2, epoch)


def test_dead_previous_holder_is_not_named() -> None:
    state = alive(2)  # worker 1 is not (or no longer) alive
    state.claim("a", 1)
    _, holder = state.claim("a", 2)
    assert holder is None
    assert state.registry["a"][0] == 2


def test_same_worker_is_named_even_if_not_known_alive() -> None:
    """The claimer itself holds the old session: it hands over to itself (no release is sent)."""
    state = alive()
    state.claim("a", 3)
    assert state.claim("a", 3)[1] == 3


def test_a_client_id_maps_to_one_worker() -> None:
    state = alive(1, 2, 3)
    for worker in (1, 2, 3, 2):
        state.claim("a", worker)
    assert state.registry == {"a": (2, state.epoch)}


def test_unregister_only_with_the_current_epoch() -> None:
    state = alive(1, 2)
    old, _ = state.claim("a", 1)
    new, _ = state.claim("a", 2)
    state.unregister("a", old)  # the old owner's session ended late: it must not drop the new one
    assert state.registry["a"] == (2, new)
    state.unregister("a", new + 1)
    assert "a" in state.registry
    state.unregister("a", new)
    assert "a" not in state.registry
    state.unregister("a", new)  # twice, and unknown ids, are fine
    state.unregister("nobody", 1)


# -- forget --------------------------------------------------------------------------------------


def test_forget_drops_the_workers_clients_shared_members_and_barrier_waits() -> None:
    state = alive(1, 2, 3)
    state.claim("on1", 1)
    state.claim("also-on1", 1)
    state.claim("on2", 2)
    state.apply(CH_SHARED, shared("w1", 1, "+", "on1"), 0.0)
    state.apply(CH_SHARED, shared("w2", 1, "+", "on2"), 0.0)
    state.syncs["t"] = _Sync(b"w3", 7, {1, 2}, 10.0)
    state.syncs["u"] = _Sync(b"w2", 8, {1}, 10.0)
    state.forget(1)
    assert not state.alive(1)
    assert set(state.registry) == {"on2"}
    assert [key[2] for key in state.shared] == ["w2"]
    assert state.syncs["t"].waiting == {2}
    assert state.syncs["u"].waiting == set()  # complete now (the Relay answers it)


def test_forget_an_unknown_worker_is_harmless() -> None:
    state = alive(1)
    state.claim("a", 1)
    state.forget(9)
    assert state.registry["a"][0] == 1 and state.alive(1)


def test_after_forget_the_dead_holder_is_not_asked_to_release() -> None:
    state = alive(1, 2)
    state.claim("a", 1)
    state.forget(1)
    assert state.claim("a", 2)[1] is None


# -- apply --------------------------------------------------------------------------------------


def test_apply_retained_set_replace_and_clear_with_marks() -> None:
    state = alive(1)
    state.apply(CH_RETAINED, retained("w1", 1, "t/a", item(b"one")), 5.0)
    state.apply(CH_RETAINED, retained("w2", 4, "t/b", item(b"b")), 5.0)
    assert state.retained["t/a"] == (item(b"one"), 5.0)
    state.apply(CH_RETAINED, retained("w1", 2, "t/a", item(b"two")), 6.0)
    assert state.retained["t/a"] == (item(b"two"), 6.0)
    state.apply(CH_RETAINED, retained("w1", 3, "t/a", item(b"")), 7.0)  # empty payload clears
    assert "t/a" not in state.retained
    state.apply(CH_RETAINED, retained("w1", 4, "t/none", item(b"")), 7.0)  # clearing nothing is fine
    assert state.marks == {"w1": 4, "w2": 4}


def test_apply_retained_batch_last_item_wins() -> None:
    state = alive()
    state.apply(CH_RETAINED, retained("w1", 1, "t", item(b"1"), item(b"2"), item(b"3")), 0.0)
    assert state.retained["t"][0][2] == b"3"
    state.apply(CH_RETAINED, retained("w1", 2, "t", item(b"4"), item(b"")), 0.0)
    assert "t" not in state.retained


def test_apply_ignores_publishes_on_other_channels() -> None:
    state = alive()
    state.apply(b"t/a", retained("w1", 9, "t/a", item()), 0.0)
    assert state.retained == {} and state.marks == {}


def test_apply_shared_join_change_leave_with_marks() -> None:
    state = alive(1, 2)
    state.apply(CH_SHARED, shared("w1", 1, "+", "c", qos=1), 0.0)
    state.apply(CH_SHARED, shared("w1", 2, "+", "c", qos=2), 0.0)  # changed options: replaces
    state.apply(CH_SHARED, shared("w2", 5, "+", "d"), 0.0)
    assert len(state.shared) == 2
    assert state.shared[("g", "a/+", "w1", "c")].qos == 2
    state.apply(CH_SHARED, shared("w1", 3, "-", "c"), 0.0)
    assert list(state.shared) == [("g", "a/+", "w2", "d")]
    state.apply(CH_SHARED, shared("w1", 4, "-", "nobody"), 0.0)
    assert state.marks == {"w1": 4, "w2": 5}


def test_apply_shared_from_an_origin_that_is_no_worker_is_ignored() -> None:
    state = alive()
    state.apply(CH_SHARED, shared("relay", 1, "+"), 0.0)
    state.apply(CH_SHARED, shared("wx", 1, "+"), 0.0)
    assert state.shared == {} and state.marks == {}


def test_apply_ignores_other_kinds() -> None:
    state = alive()
    state.apply(CH_SHARED, env.SyncMarker("w1", 3, b"tok"), 0.0)
    state.apply(b"\x00W1/", env.Handoff("w2", 4, "c", 1, None), 0.0)
    assert state.marks == {} and state.retained == {} and state.shared == {}


# -- snapshot -------------------------------------------------------------------------------------


def test_snapshot_marks_retained_and_shared() -> None:
    state = alive(1)
    state.apply(CH_RETAINED, retained("w1", 1, "t/a", item(b"a")), 0.0)
    state.apply(CH_SHARED, shared("w1", 2, "+", "c"), 0.0)
    marks, retained_items, shared_rows = state.snapshot(0.0)
    assert marks == {"w1": 2}
    assert retained_items == (("t/a", item(b"a")),)
    assert shared_rows == (("w1", 2, "+", "g", "a/+", "c", 1, None),)
    marks["w1"] = 99  # a copy: the caller cannot change the state
    assert state.marks == {"w1": 2}


def test_snapshot_shortens_retained_expiry_by_age_and_drops_expired() -> None:
    state = alive()
    state.apply(CH_RETAINED, retained("w1", 1, "keeps", item(b"k", expiry_ms=10_000)), 100.0)
    state.apply(CH_RETAINED, retained("w1", 2, "expires", item(b"e", expiry_ms=2_000)), 100.0)
    state.apply(CH_RETAINED, retained("w1", 3, "forever", item(b"f")), 100.0)
    _, items, _ = state.snapshot(101.5)
    by_topic = dict(items)
    assert by_topic["keeps"][5] == 8_500
    assert by_topic["expires"][5] == 500
    assert by_topic["forever"][5] is None
    assert by_topic["keeps"][:5] == item(b"k")[:5] and by_topic["keeps"][6] == 0
    # the stored copy is not rewritten: a later snapshot ages it from the original time
    _, items, _ = state.snapshot(103.0)
    by_topic = dict(items)
    assert by_topic["keeps"][5] == 7_000
    assert "expires" not in by_topic
    assert "expires" not in state.retained  # dropped for good
    assert "forever" in by_topic


def test_snapshot_drops_a_message_that_expires_exactly_now() -> None:
    state = alive()
    state.apply(CH_RETAINED, retained("w1", 1, "t", item(expiry_ms=1_000)), 0.0)
    _, items, _ = state.snapshot(1.0)
    assert items == ()


def test_snapshot_values_pack_as_a_snap_control() -> None:
    """What snapshot returns is what the `snap` reply carries: it must pack and unpack."""
    state = alive(1)
    state.apply(CH_RETAINED, retained("w1", 1, "t/a", item(b"a", expiry_ms=5_000)), 0.0)
    state.apply(CH_SHARED, shared("w1", 2, "+", "c"), 0.0)
    control = env.unpack_control(env.pack_control("snap", 3, *state.snapshot(1.0)))
    marks, retained_items, shared_rows = control.body
    assert marks == {"w1": 2}
    assert retained_items == (("t/a", (1, True, b"a", "pub", None, 4_000, 0)),)
    assert shared_rows == (("w1", 2, "+", "g", "a/+", "c", 1, None),)
