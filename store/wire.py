"""Store records as msgpack-friendly tuples, for the store plane of `mesh/PROTOCOL.md`.

Why: workers and the store process exchange sessions, queued messages, retained messages, users
and ACL rules over ZeroMQ; this module is the one place that fixes their tuple layout, on both sides (the broker
imports it to build requests, the store process to read them).

Must not: do IO; know MQTT beyond the records' fields. Invariants: `x_from_wire(x_to_wire(r)) == r`
for every record kind; a malformed tuple raises `WireError` and nothing else.
"""

from __future__ import annotations

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

SubscriptionTuple = tuple[str, str, int, bool, bool, int, int | None, str | None]
WillTuple = tuple[str, bytes, int, bool, bytes | None, int]
SessionTuple = tuple[str, int, tuple[SubscriptionTuple, ...], WillTuple | None, bool, str, int, float]
QueuedTuple = tuple[str, int, int, bool, tuple[int, ...], str, bytes, bytes | None, str, float | None, int]
RetainedTuple = tuple[str, bytes, int, bytes | None, str, float | None, float]
UserTuple = tuple[str, str, bool]  # [username, password_hash, admin]
AclTuple = tuple[int, str, str, str]  # [id, user, topic, access]
AuthTable = tuple[int, tuple[UserRecord, ...], tuple[AclRecord, ...]]  # version, users, rules


class WireError(StoreError):
    """A store-plane tuple that does not have its record's shape."""


def subscription_to_wire(r: SubscriptionRecord) -> SubscriptionTuple:
    return (
        r.key_filter,
        r.topic_filter,
        r.qos,
        r.no_local,
        r.retain_as_published,
        r.retain_handling,
        r.subscription_id,
        r.share_group,
    )


def will_to_wire(r: WillRecord) -> WillTuple:
    return (r.topic, r.payload, r.qos, r.retain, r.props, r.delay_s)


def session_to_wire(r: SessionRecord) -> SessionTuple:
    return (
        r.client_id,
        r.expiry_s,
        tuple(subscription_to_wire(s) for s in r.subscriptions),
        None if r.will is None else will_to_wire(r.will),
        r.online,
        r.node,
        r.epoch,
        r.updated_at,
    )


def queued_to_wire(r: QueuedRecord) -> QueuedTuple:
    return (
        r.client_id,
        r.msg_id,
        r.qos,
        r.retain,
        r.sub_ids,
        r.topic,
        r.payload,
        r.props,
        r.origin,
        r.expires_at,
        r.seq,
    )


def retained_to_wire(r: RetainedRecord) -> RetainedTuple:
    return (r.topic, r.payload, r.qos, r.props, r.origin, r.expires_at, r.updated_at)


def _tuple(value: object, length: int, what: str) -> tuple[object, ...]:
    if not isinstance(value, tuple | list) or len(value) != length:
        raise WireError(f"{what}: expected an array of {length}, got {type(value).__name__}")
    return tuple(value)


def _int(value: object, what: str) -> int:
    if type(value) is not int:
        raise WireError(f"{what}: expected an integer, got {type(value).__name__}")
    return value


def _opt_int(value: object, what: str) -> int | None:
    return None if value is None else _int(value, what)


def _str(value: object, what: str) -> str:
    if type(value) is not str:
        raise WireError(f"{what}: expected a string, got {type(value).__name__}")
    return value


def _opt_str(value: object, what: str) -> str | None:
    return None if value is None else _str(value, what)


def _bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise WireError(f"{what}: expected a boolean, got {type(value).__name__}")
    return value


def _bytes(value: object, what: str) -> bytes:
    if type(value) is not bytes:
        raise WireError(f"{what}: expected binary, got {type(value).__name__}")
    return value


def _opt_bytes(value: object, what: str) -> bytes | None:
    return None if value is None else _bytes(value, what)


def _float(value: object, what: str) -> float:
    if type(value) not in (float, int):
        raise WireError(f"{what}: expected a number, got {type(value).__name__}")
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise WireError(f"{what}: number out of range") from None


def _opt_float(value: object, what: str) -> float | None:
    return None if value is None else _float(value, what)


def _array(value: object, what: str) -> tuple[object, ...]:
    if not isinstance(value, tuple | list):
        raise WireError(f"{what}: expected an array, got {type(value).__name__}")
    return tuple(value)


def subscription_from_wire(value: object) -> SubscriptionRecord:
    t = _tuple(value, 8, "subscription")
    w = "subscription"
    return SubscriptionRecord(
        _str(t[0], w),
        _str(t[1], w),
        _int(t[2], w),
        _bool(t[3], w),
        _bool(t[4], w),
        _int(t[5], w),
        _opt_int(t[6], w),
        _opt_str(t[7], w),
    )


def will_from_wire(value: object) -> WillRecord:
    t = _tuple(value, 6, "will")
    w = "will"
    return WillRecord(
        _str(t[0], w), _bytes(t[1], w), _int(t[2], w), _bool(t[3], w), _opt_bytes(t[4], w), _int(t[5], w)
    )


def session_from_wire(value: object) -> SessionRecord:
    t = _tuple(value, 8, "session")
    w = "session"
    return SessionRecord(
        _str(t[0], w),
        _int(t[1], w),
        tuple(subscription_from_wire(s) for s in _array(t[2], w)),
        None if t[3] is None else will_from_wire(t[3]),
        _bool(t[4], w),
        _str(t[5], w),
        _int(t[6], w),
        _float(t[7], w),
    )


def queued_from_wire(value: object) -> QueuedRecord:
    t = _tuple(value, 11, "queued message")
    w = "queued message"
    return QueuedRecord(
        _str(t[0], w),
        _int(t[1], w),
        _int(t[2], w),
        _bool(t[3], w),
        tuple(_int(i, w) for i in _array(t[4], w)),
        _str(t[5], w),
        _bytes(t[6], w),
        _opt_bytes(t[7], w),
        _str(t[8], w),
        _opt_float(t[9], w),
        _int(t[10], w),
    )


def retained_from_wire(value: object) -> RetainedRecord:
    t = _tuple(value, 7, "retained message")
    w = "retained message"
    return RetainedRecord(
        _str(t[0], w),
        _bytes(t[1], w),
        _int(t[2], w),
        _opt_bytes(t[3], w),
        _str(t[4], w),
        _opt_float(t[5], w),
        _float(t[6], w),
    )


# --- users and ACL rules: the body of `authtable` and of the auth requests -----------------------


def user_to_wire(r: UserRecord) -> UserTuple:
    return (r.username, r.password_hash, r.admin)


def acl_to_wire(r: AclRecord) -> AclTuple:
    return (r.id, r.user, r.topic, r.access)


def authtable_to_wire(
    version: int,
    users: list[UserRecord] | tuple[UserRecord, ...],
    rules: list[AclRecord] | tuple[AclRecord, ...],
) -> tuple[int, tuple[UserTuple, ...], tuple[AclTuple, ...]]:
    """The body of `authtable`: `[version, users, rules]` (users by name, rules by id)."""
    return (version, tuple(user_to_wire(u) for u in users), tuple(acl_to_wire(r) for r in rules))


def user_from_wire(value: object) -> UserRecord:
    t = _tuple(value, 3, "user")
    return UserRecord(_str(t[0], "user"), _str(t[1], "user"), _bool(t[2], "user"))


def acl_from_wire(value: object) -> AclRecord:
    t = _tuple(value, 4, "ACL rule")
    w = "ACL rule"
    return AclRecord(_int(t[0], w), _str(t[1], w), _str(t[2], w), _str(t[3], w))


def authtable_from_wire(body: tuple[object, ...]) -> AuthTable:
    """The inverse of `authtable_to_wire` (a worker reads the `authtable` body with it)."""
    t = _tuple(body, 3, "authtable")
    return (
        _int(t[0], "authtable version"),
        tuple(user_from_wire(u) for u in _array(t[1], "authtable users")),
        tuple(acl_from_wire(r) for r in _array(t[2], "authtable rules")),
    )


def user_change_from_wire(body: tuple[object, ...]) -> tuple[str, str | None, bool | None]:
    """The body of `uput`: `[username, password_hash or nil, admin or nil]`."""
    t = _tuple(body, 3, "uput")
    return (
        _str(t[0], "uput username"),
        _opt_str(t[1], "uput password_hash"),
        None if t[2] is None else _bool(t[2], "uput admin"),
    )


def acl_rule_from_wire(body: tuple[object, ...]) -> tuple[str, str, str]:
    """The body of `aadd`: `[user, topic, access]`."""
    t = _tuple(body, 3, "aadd")
    return (_str(t[0], "aadd user"), _str(t[1], "aadd topic"), _str(t[2], "aadd access"))


def username_from_wire(body: tuple[object, ...]) -> str:
    """The body of `udel`: `[username]`."""
    return _str(_tuple(body, 1, "udel")[0], "udel username")


def rule_id_from_wire(body: tuple[object, ...]) -> int:
    """The body of `adel`: `[id]`."""
    return _int(_tuple(body, 1, "adel")[0], "adel id")
