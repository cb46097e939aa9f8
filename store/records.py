"""What the store keeps, and the write operations that change it: plain values, no IO.

Why: the store process, its backends and their contract tests speak in these frozen values, so
that a backend is a translation of seven write ops and five reads into its own SQL (or dicts),
and nothing dict-shaped crosses the module boundary. Users and ACL rules (`broker/ACCESS.md`)
are values here too, with the checks every backend runs before it changes them.

Must not: import a database driver, the clock or anything of `broker` (imports run broker ->
store). MQTT 5 properties are opaque bytes here (`props`: the broker packs them with msgpack):
the store keeps them byte for byte and never looks inside, so every property survives.

Invariants:
- Times are wall-clock seconds since the epoch as floats (`updated_at`, `expires_at`), given by
  the caller; `expires_at` None means "never expires".
- `QueuedRecord.seq` is assigned by the backend when the row is enqueued (whatever the caller
  put there is ignored); within one `client_id` it only grows, so FIFO order is order by seq.
- `check_ops` accepts exactly what every backend can store and read back equal: exact types
  (`type(x) is int`, so `True` does not pass for QoS 1; `bytes`, not `bytearray`), ranges that
  fit the PostgreSQL columns, finite times, and no NUL character in text (PostgreSQL cannot
  store one, and MQTT forbids it in topics and client ids [MQTT-1.5.4-2]). Every backend calls
  it on the whole batch before writing anything, so a bad record rejects the batch as a whole.
- `check_user` / `check_acl` accept only what the broker can use: a username that is not empty,
  at most 256 characters, free of control characters, neither `*` nor starting with `$` (those
  name the rule targets `*` and `$anonymous`); a stored password hash in the format of
  `store.passwords`; a rule topic that is a non-empty MQTT filter of at most 65535 bytes as far
  as the store can tell without `broker` (`#` only as the whole last level, `+` only as a whole
  level; the broker checks the full syntax before it sends one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from store.errors import StoreRecordError
from store.passwords import is_hash

__all__ = [
    "ACL_ACCESS",
    "ANONYMOUS_USER",
    "EVERY_USER",
    "Ack",
    "AclRecord",
    "ClearRetained",
    "DeleteSession",
    "Enqueue",
    "QueuedRecord",
    "RetainedRecord",
    "SessionRecord",
    "SetOnline",
    "SetRetained",
    "SubscriptionRecord",
    "UpsertSession",
    "UserRecord",
    "WillRecord",
    "WriteOp",
    "check_acl",
    "check_acl_id",
    "check_ops",
    "check_user",
    "check_username",
]

MAX_U32: Final = 0xFFFF_FFFF
MAX_I64: Final = 0x7FFF_FFFF_FFFF_FFFF
MAX_SUBSCRIPTION_ID: Final = 268_435_455  # a Variable Byte Integer's largest value
_MAX_EXACT_INT: Final = 2**53  # the largest int a float (and a float8 column) holds exactly
ACL_ACCESS: Final = ("PUB", "SUB", "BOTH", "DENY")
ANONYMOUS_USER: Final = "$anonymous"  # a rule for clients that connect without a username
EVERY_USER: Final = "*"  # a rule for every client
MAX_USERNAME_CHARS: Final = 256
MAX_TOPIC_BYTES: Final = 65535  # what an MQTT string can hold


@dataclass(frozen=True, slots=True)
class SubscriptionRecord:
    key_filter: str  # the session's key for it: the filter, or "$share/group/filter"
    topic_filter: str
    qos: int
    no_local: bool
    retain_as_published: bool
    retain_handling: int
    subscription_id: int | None
    share_group: str | None


@dataclass(frozen=True, slots=True)
class WillRecord:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: bytes | None
    delay_s: int


@dataclass(frozen=True, slots=True)
class SessionRecord:
    client_id: str
    expiry_s: int
    subscriptions: tuple[SubscriptionRecord, ...]  # kept in this order
    will: WillRecord | None
    online: bool
    node: str
    epoch: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class QueuedRecord:
    client_id: str
    msg_id: int
    qos: int
    retain: bool
    sub_ids: tuple[int, ...]
    topic: str
    payload: bytes
    props: bytes | None
    origin: str
    expires_at: float | None
    seq: int = 0


@dataclass(frozen=True, slots=True)
class RetainedRecord:
    topic: str
    payload: bytes
    qos: int
    props: bytes | None
    origin: str
    expires_at: float | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class UpsertSession:
    """Replace the session row and ALL its subscription rows (queued rows are kept)."""

    record: SessionRecord


@dataclass(frozen=True, slots=True)
class DeleteSession:
    """Delete the session, its subscriptions and its queued rows."""

    client_id: str


@dataclass(frozen=True, slots=True)
class SetOnline:
    """Mark a session on- or offline at a node and epoch; a no-op if there is no session row."""

    client_id: str
    online: bool
    node: str
    epoch: int
    at: float


@dataclass(frozen=True, slots=True)
class Enqueue:
    """One row per message and subscriber; the backend assigns increasing `seq`."""

    records: tuple[QueuedRecord, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """Delete the queued rows of these message ids (ids that are not there are fine)."""

    client_id: str
    msg_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SetRetained:
    record: RetainedRecord


@dataclass(frozen=True, slots=True)
class ClearRetained:
    topic: str


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user of the store; `password_hash` is a `store.passwords` hash, never a password."""

    username: str
    password_hash: str
    admin: bool  # passes every ACL check and may use the admin HTTP API


@dataclass(frozen=True, slots=True)
class AclRecord:
    """One ACL rule; rules are checked in `id` order (ids only grow)."""

    id: int
    user: str  # a username, ANONYMOUS_USER or EVERY_USER
    topic: str  # an MQTT filter, possibly with %u / %c (substituted by the broker)
    access: str  # one of ACL_ACCESS


WriteOp: TypeAlias = UpsertSession | DeleteSession | SetOnline | Enqueue | Ack | SetRetained | ClearRetained


# --- validation ---------------------------------------------------------------------------------


def check_username(username: object) -> None:
    """Raise `StoreRecordError` unless `username` can be the name of a stored user."""
    problem = _username_problem("username", username)
    if problem is not None:
        raise StoreRecordError(problem)


def check_user(username: object, password_hash: object, admin: object) -> None:
    """Check a user change (`put_user`): None for the hash or the flag means "unchanged"."""
    problem = _username_problem("username", username)
    if problem is None and password_hash is not None:
        if type(password_hash) is not str:
            problem = f"password_hash must be str or None, not {type(password_hash).__name__}"
        elif not is_hash(password_hash):
            problem = "password_hash is not a stored password hash ($scrypt$ln=..,r=..,p=..$salt$hash)"
    if problem is None and admin is not None and type(admin) is not bool:
        problem = f"admin must be bool or None, not {type(admin).__name__}"
    if problem is not None:
        raise StoreRecordError(problem)


def check_acl(user: object, topic: object, access: object) -> None:
    """Raise `StoreRecordError` unless `(user, topic, access)` is a rule the store keeps."""
    problem = None
    if user not in (ANONYMOUS_USER, EVERY_USER):
        problem = _username_problem("rule user", user)
        if problem is not None:
            problem += f" (or {ANONYMOUS_USER!r} / {EVERY_USER!r})"
    problem = problem or _filter_problem(topic)
    if problem is None and (type(access) is not str or access not in ACL_ACCESS):
        problem = f"access must be one of {', '.join(ACL_ACCESS)}, not {access!r}"
    if problem is not None:
        raise StoreRecordError(problem)


def check_acl_id(rule_id: object) -> None:
    problem = _int_problem("rule id", rule_id, -MAX_I64 - 1, MAX_I64)
    if problem is not None:
        raise StoreRecordError(problem)


def _username_problem(name: str, x: object) -> str | None:
    if type(x) is not str:
        return f"{name} must be str, not {type(x).__name__}"
    if not x:
        return f"{name} is empty"
    if len(x) > MAX_USERNAME_CHARS:
        return f"{name} is longer than {MAX_USERNAME_CHARS} characters"
    if _has_bad_char(x):
        return f"{name} {x[:40]!r} contains a control character"
    if x == EVERY_USER or x.startswith("$"):
        return f"{name} {x[:40]!r} is reserved ('*' and names starting with '$' name rule targets)"
    return None


def _filter_problem(x: object) -> str | None:
    if type(x) is not str:
        return f"topic must be str, not {type(x).__name__}"
    if not x:
        return "topic is empty"
    if "\x00" in x or any("\ud800" <= c <= "\udfff" for c in x):  # [MQTT-1.5.4-1], [MQTT-1.5.4-2]
        return "topic contains a NUL character or a lone surrogate"
    if len(x.encode()) > MAX_TOPIC_BYTES:
        return f"topic is longer than {MAX_TOPIC_BYTES} bytes"
    levels = x.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return f"topic {x[:80]!r}: '#' must be the whole last level"
        if "+" in level and level != "+":
            return f"topic {x[:80]!r}: '+' must be a whole level"
    return None


def _has_bad_char(x: str) -> bool:
    """C0 and C1 controls, DEL, and lone surrogates (not encodable, forbidden in MQTT strings)."""
    return any(c < " " or "\x7f" <= c <= "\x9f" or "\ud800" <= c <= "\udfff" for c in x)


def check_ops(ops: Sequence[WriteOp]) -> None:
    """Raise `StoreRecordError` naming the op and field if anything in `ops` does not fit."""
    for index, op in enumerate(ops):
        problem = _op_problem(op)
        if problem is not None:
            raise StoreRecordError(f"write op #{index} ({type(op).__name__}): {problem}; batch rejected")


def _op_problem(op: object) -> str | None:
    if type(op) is Enqueue:
        records = op.records
        if type(records) is not tuple:
            return "records must be a tuple"
        for i, r in enumerate(records):
            problem = _queued_problem(r)
            if problem is not None:
                return f"records[{i}]: {problem}"
        return None
    if type(op) is Ack:
        if type(op.msg_ids) is not tuple or not all(_is_i64(m) for m in op.msg_ids):
            return "msg_ids must be a tuple of 64-bit ints"
        return _text_problem("client_id", op.client_id)
    if type(op) is UpsertSession:
        return _session_problem(op.record)
    if type(op) is DeleteSession:
        return _text_problem("client_id", op.client_id)
    if type(op) is SetOnline:
        return (
            _text_problem("client_id", op.client_id)
            or _bool_problem("online", op.online)
            or _text_problem("node", op.node)
            or _int_problem("epoch", op.epoch, 0, MAX_I64)
            or _time_problem("at", op.at)
        )
    if type(op) is SetRetained:
        return _retained_problem(op.record)
    if type(op) is ClearRetained:
        return _text_problem("topic", op.topic)
    return f"not a write op: {type(op).__name__}"


def _queued_problem(r: object) -> str | None:
    if type(r) is not QueuedRecord:
        return f"not a QueuedRecord: {type(r).__name__}"
    sub_ids = r.sub_ids
    if type(sub_ids) is not tuple or not all(
        type(s) is int and 1 <= s <= MAX_SUBSCRIPTION_ID for s in sub_ids
    ):
        return f"sub_ids must be a tuple of ints in 1..{MAX_SUBSCRIPTION_ID}"
    return (
        _text_problem("client_id", r.client_id)
        or _int_problem("msg_id", r.msg_id, -MAX_I64 - 1, MAX_I64)
        or _int_problem("qos", r.qos, 0, 2)
        or _bool_problem("retain", r.retain)
        or _text_problem("topic", r.topic)
        or _bytes_problem("payload", r.payload)
        or _props_problem(r.props)
        or _text_problem("origin", r.origin)
        or _expiry_problem(r.expires_at)
        or _int_problem("seq", r.seq, 0, MAX_I64)
    )


def _session_problem(r: object) -> str | None:
    if type(r) is not SessionRecord:
        return f"not a SessionRecord: {type(r).__name__}"
    if type(r.subscriptions) is not tuple:
        return "subscriptions must be a tuple"
    for i, s in enumerate(r.subscriptions):
        problem = _subscription_problem(s)
        if problem is not None:
            return f"subscriptions[{i}]: {problem}"
    if r.will is not None:
        problem = _will_problem(r.will)
        if problem is not None:
            return f"will: {problem}"
    return (
        _text_problem("client_id", r.client_id)
        or _int_problem("expiry_s", r.expiry_s, 0, MAX_U32)
        or _bool_problem("online", r.online)
        or _text_problem("node", r.node)
        or _int_problem("epoch", r.epoch, 0, MAX_I64)
        or _time_problem("updated_at", r.updated_at)
    )


def _subscription_problem(s: object) -> str | None:
    if type(s) is not SubscriptionRecord:
        return f"not a SubscriptionRecord: {type(s).__name__}"
    if s.subscription_id is not None:
        problem = _int_problem("subscription_id", s.subscription_id, 1, MAX_SUBSCRIPTION_ID)
        if problem is not None:
            return problem
    if s.share_group is not None:
        problem = _text_problem("share_group", s.share_group)
        if problem is not None:
            return problem
    return (
        _text_problem("key_filter", s.key_filter)
        or _text_problem("topic_filter", s.topic_filter)
        or _int_problem("qos", s.qos, 0, 2)
        or _bool_problem("no_local", s.no_local)
        or _bool_problem("retain_as_published", s.retain_as_published)
        or _int_problem("retain_handling", s.retain_handling, 0, 2)
    )


def _will_problem(w: object) -> str | None:
    if type(w) is not WillRecord:
        return f"not a WillRecord: {type(w).__name__}"
    return (
        _text_problem("topic", w.topic)
        or _bytes_problem("payload", w.payload)
        or _int_problem("qos", w.qos, 0, 2)
        or _bool_problem("retain", w.retain)
        or _props_problem(w.props)
        or _int_problem("delay_s", w.delay_s, 0, MAX_U32)
    )


def _retained_problem(r: object) -> str | None:
    if type(r) is not RetainedRecord:
        return f"not a RetainedRecord: {type(r).__name__}"
    return (
        _text_problem("topic", r.topic)
        or _bytes_problem("payload", r.payload)
        or _int_problem("qos", r.qos, 0, 2)
        or _props_problem(r.props)
        or _text_problem("origin", r.origin)
        or _expiry_problem(r.expires_at)
        or _time_problem("updated_at", r.updated_at)
    )


def _is_i64(x: object) -> bool:
    return type(x) is int and -MAX_I64 - 1 <= x <= MAX_I64


def _text_problem(name: str, x: object) -> str | None:
    if type(x) is not str:
        return f"{name} must be str, not {type(x).__name__}"
    if "\x00" in x:
        return f"{name} contains a NUL character"
    return None


def _bytes_problem(name: str, x: object) -> str | None:
    return None if type(x) is bytes else f"{name} must be bytes, not {type(x).__name__}"


def _props_problem(x: object) -> str | None:
    return None if x is None or type(x) is bytes else f"props must be bytes or None, not {type(x).__name__}"


def _bool_problem(name: str, x: object) -> str | None:
    return None if type(x) is bool else f"{name} must be bool, not {type(x).__name__}"


def _int_problem(name: str, x: object, low: int, high: int) -> str | None:
    if type(x) is not int:
        return f"{name} must be int, not {type(x).__name__}"
    if not low <= x <= high:
        return f"{name} {x} is out of range {low}..{high}"
    return None


def _time_problem(name: str, x: object) -> str | None:
    if type(x) is float:
        return None if math.isfinite(x) else f"{name} must be finite"
    if type(x) is int:  # accepted for convenience; must survive a float column unchanged
        return None if -_MAX_EXACT_INT <= x <= _MAX_EXACT_INT else f"{name} {x} is out of range"
    return f"{name} must be float seconds, not {type(x).__name__}"


def _expiry_problem(x: object) -> str | None:
    return None if x is None else _time_problem("expires_at", x)
