"""Store records as store-plane tuples (`store/wire.py`).

What is pinned: `x_from_wire(x_to_wire(r)) == r` for every record kind, also after the tuple went
through msgpack (arrays come back as lists or tuples, floats that are whole stay floats); and
whatever malformed value arrives — wrong arity, wrong types, anything msgpack can carry, in any
field — the `*_from_wire` functions return a record or raise `WireError`, nothing else. The
`authtable` body and the bodies of the auth requests round-trip and refuse malformed values too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store import wire
from store.errors import StoreError
from store.records import (
    AclRecord,
    QueuedRecord,
    RetainedRecord,
    SessionRecord,
    SubscriptionRecord,
    UserRecord,
    WillRecord,
)
from store.wire import WireError

pytestmark = pytest.mark.timeout(60)

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SUB = SubscriptionRecord("$share/g/a/#", "a/#", 1, False, True, 2, 7, "g")
SUB_PLAIN = SubscriptionRecord("b", "b", 0, True, False, 0, None, None)
WILL = WillRecord("will/t", b"bye", 2, True, b"\x95\xc0\xc0\xc0\xc0\x90", 30)
SESSION = SessionRecord("c1", 3600, (SUB, SUB_PLAIN), WILL, True, "node-a", 42, 1_700_000_000.25)
SESSION_BARE = SessionRecord("c2", 0, (), None, False, "", 0, 0.0)
QUEUED = QueuedRecord(
    "c1", 2**40 + 3, 2, True, (1, 268_435_455), "q/t", b"\x00\x01", b"props", "pub", 1.7e9, 12
)
QUEUED_BARE = QueuedRecord("c1", 1, 1, False, (), "q", b"", None, "", None)
RETAINED = RetainedRecord("r/t", b"v", 1, None, "pub", None, 1_700_000_000.5)
RETAINED_EXPIRING = RetainedRecord("r/t", b"v", 0, b"p", "", 1_700_000_100.0, 3.0)

KINDS: list[tuple[str, Callable[[Any], object], Callable[[object], object], list[object]]] = [
    ("subscription", wire.subscription_to_wire, wire.subscription_from_wire, [SUB, SUB_PLAIN]),
    ("will", wire.will_to_wire, wire.will_from_wire, [WILL]),
    ("session", wire.session_to_wire, wire.session_from_wire, [SESSION, SESSION_BARE]),
    ("queued", wire.queued_to_wire, wire.queued_from_wire, [QUEUED, QUEUED_BARE]),
    ("retained", wire.retained_to_wire, wire.retained_from_wire, [RETAINED, RETAINED_EXPIRING]),
]
FROM_WIRE = {name: from_wire for name, _, from_wire, _ in KINDS}
IDS = [name for name, *_ in KINDS]


def through_msgpack(value: object) -> object:
    return msgpack.unpackb(msgpack.packb(value), use_list=False, raw=False)


@pytest.mark.parametrize(("name", "to_wire", "from_wire", "records"), KINDS, ids=IDS)
def test_round_trip(
    name: str, to_wire: Callable[[Any], object], from_wire: Callable[[object], object], records: list[object]
) -> None:
    for record in records:
        assert from_wire(to_wire(record)) == record
        assert from_wire(through_msgpack(to_wire(record))) == record
        # a list-based unpacker (use_list=True) gives the same records
        as_lists = msgpack.unpackb(msgpack.packb(to_wire(record)), use_list=True, raw=False)
        assert from_wire(as_lists) == record


def test_whole_times_stay_floats() -> None:
    record = RetainedRecord("t", b"x", 0, None, "", 5.0, 7.0)
    t = list(wire.retained_to_wire(record))
    t[5], t[6] = 5, 7  # a sender that packed ints for whole seconds
    back = wire.retained_from_wire(tuple(t))
    assert back == record
    assert type(back.updated_at) is float and type(back.expires_at) is float


def test_session_order_of_subscriptions_is_kept() -> None:
    subs = tuple(
        SubscriptionRecord(f"f/{n}", f"f/{n}", n % 3, False, False, 0, None, None) for n in range(20)
    )
    record = SessionRecord("c", 1, subs, None, False, "n", 1, 1.0)
    assert wire.session_from_wire(through_msgpack(wire.session_to_wire(record))) == record


def test_wire_error_is_a_store_error() -> None:
    assert issubclass(WireError, StoreError)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("subscription", None),
        ("subscription", ("a", "a", 1, False, False, 0, None)),  # too short
        ("subscription", ("a", "a", True, False, False, 0, None, None)),  # bool is not a QoS
        ("subscription", ("a", "a", 1, 0, False, 0, None, None)),  # 0 is not a bool
        ("subscription", ("a", b"a", 1, False, False, 0, None, None)),
        ("will", ("t", "not bytes", 0, False, None, 0)),
        ("will", {"topic": "t"}),
        ("session", ("c", 1, "not an array", None, False, "n", 1, 1.0)),
        ("session", ("c", 1, (), ("t", b"", 0, False, None), False, "n", 1, 1.0)),  # short will
        ("session", ("c", 1, ((),), None, False, "n", 1, 1.0)),  # bad subscription inside
        ("session", ("c", 1, (), None, False, "n", 1, "yesterday")),
        ("queued", ("c", 1, 1, False, ("1",), "t", b"", None, "", None, 0)),
        ("queued", ("c", 1, 1, False, (), "t", b"", None, "", None, 0.5)),
        ("queued", ("c", 1.0, 1, False, (), "t", b"", None, "", None, 0)),
        ("retained", ("t", b"v", 1, None, "", None, True)),  # bool is not a time
        ("retained", ("t", b"v", 1, None, "", None)),
        ("retained", b"raw bytes"),
        ("retained", "a string"),
    ],
)
def test_malformed_examples_raise_wire_error(name: str, value: object) -> None:
    with pytest.raises(WireError):
        FROM_WIRE[name](value)


# -- fuzz: whatever msgpack can carry --------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=6)
    | st.binary(max_size=6)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=9) | st.lists(inner, max_size=9).map(tuple),
    max_leaves=12,
)


def good_tuples() -> st.SearchStrategy[tuple[str, tuple[object, ...]]]:
    return st.sampled_from([(name, to_wire(r)) for name, to_wire, _, records in KINDS for r in records])


@FUZZ
@given(name=st.sampled_from(IDS), value=values)
def test_any_value_gives_a_record_or_wire_error(name: str, value: object) -> None:
    with contextlib.suppress(WireError):
        FROM_WIRE[name](value)


@FUZZ
@given(good=good_tuples(), data=st.data())
def test_a_valid_tuple_with_one_field_replaced_gives_a_record_or_wire_error(
    good: tuple[str, tuple[object, ...]], data: st.DataObject
) -> None:
    name, t = good
    index = data.draw(st.integers(min_value=0, max_value=len(t) - 1))
    mutated = list(t)
    mutated[index] = data.draw(values)
    with contextlib.suppress(WireError):
        FROM_WIRE[name](tuple(mutated))


@FUZZ
@given(good=good_tuples(), data=st.data())
def test_a_valid_tuple_cut_or_extended_raises_wire_error(
    good: tuple[str, tuple[object, ...]], data: st.DataObject
) -> None:
    name, t = good
    cut = data.draw(st.integers(min_value=0, max_value=len(t) - 1))
    with pytest.raises(WireError):
        FROM_WIRE[name](t[:cut])
    with pytest.raises(WireError):
        FROM_WIRE[name]((*t, data.draw(scalars)))


@FUZZ
@given(data=st.binary(max_size=64), name=st.sampled_from(IDS))
def test_random_msgpack_bytes_give_a_record_or_wire_error(data: bytes, name: str) -> None:
    try:
        value = msgpack.unpackb(data, use_list=False, raw=False, strict_map_key=False)
    except Exception:
        return  # not one msgpack value: the envelope layer refuses it before us
    with contextlib.suppress(WireError):
        FROM_WIRE[name](value)


def test_an_int_too_large_for_a_float_is_a_wire_error() -> None:
    with pytest.raises(WireError):
        wire.retained_from_wire(("t", b"v", 1, None, "", None, 10**400))


# --- users and ACL rules (`authtable` and the auth requests) ---------------------------------------

USERS = (
    UserRecord("alice", "$scrypt$ln=10,r=8,p=1$c2FsdA$aGFzaA", True),
    UserRecord("bob", "$scrypt$x", False),
)
RULES = (AclRecord(1, "alice", "a/#", "PUB"), AclRecord(9, "*", "%u/+", "DENY"))


def test_authtable_round_trip_through_msgpack() -> None:
    body = wire.authtable_to_wire(7, list(USERS), list(RULES))
    assert body == (
        7,
        (("alice", USERS[0].password_hash, True), ("bob", "$scrypt$x", False)),
        (
            (1, "alice", "a/#", "PUB"),
            (9, "*", "%u/+", "DENY"),
        ),
    )
    again = tuple(msgpack.unpackb(msgpack.packb(body)))
    assert wire.authtable_from_wire(again) == (7, USERS, RULES)
    assert wire.authtable_from_wire((0, (), ())) == (0, (), ())


def test_auth_request_bodies() -> None:
    assert wire.user_change_from_wire(("alice", None, None)) == ("alice", None, None)
    assert wire.user_change_from_wire(("alice", "$h", False)) == ("alice", "$h", False)
    assert wire.acl_rule_from_wire(("*", "#", "SUB")) == ("*", "#", "SUB")
    assert wire.username_from_wire(("alice",)) == "alice"
    assert wire.rule_id_from_wire((3,)) == 3


@pytest.mark.parametrize(
    ("parse", "body"),
    [
        (wire.authtable_from_wire, (1, (), ())[:2]),
        (wire.authtable_from_wire, ("1", (), ())),
        (wire.authtable_from_wire, (1, (("a", "h"),), ())),
        (wire.authtable_from_wire, (1, (), ((1, "a", "t", 5),))),
        (wire.authtable_from_wire, (1, (), ((True, "a", "t", "PUB"),))),
        (wire.authtable_from_wire, (1, "users", ())),
        (wire.user_change_from_wire, ("alice", None)),
        (wire.user_change_from_wire, ("alice", b"hash", None)),
        (wire.user_change_from_wire, ("alice", None, 1)),
        (wire.acl_rule_from_wire, ("alice", "t", None)),
        (wire.username_from_wire, (5,)),
        (wire.username_from_wire, ("a", "b")),
        (wire.rule_id_from_wire, ("1",)),
        (wire.rule_id_from_wire, (1.0,)),
    ],
)
def test_malformed_auth_bodies_raise_wire_error(
    parse: Callable[[tuple[object, ...]], object], body: tuple[object, ...]
) -> None:
    with pytest.raises(WireError):
        parse(body)
