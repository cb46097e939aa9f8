"""Store records as msgpack-friendly tuples, for the store plane of `mesh/PROTOCOL.md`.

Why: workers and the store process exchange sessions, queued messages and retained messages over
ZeroMQ; this module is the one place that fixes their tuple layout, on both sides (the broker
imports it to build requests, the store process to read them).

Must not: do IO; know MQTT beyond the records' fields. Invariants: `x_from_wire(x_to_wire(r)) == r`
for every record kind; a malformed tuple raises `WireError` and nothing else.
"""

from __future__ import annotations

from store.errors import StoreError
from store.records import QueuedRecord, RetainedRecord, SessionRecord, SubscriptionRecord, WillRecord

SubscriptionTuple = tuple[str, str, int, bool, bool, int, int | None, str | None]
WillTuple = tuple[str, bytes, int, bool, bytes | None, int]
SessionTuple = tuple[str, int, tuple[SubscriptionTuple, ...], WillTuple | None, bool, str, int, float]
QueuedTuple = tuple[str, int, int, bool, tuple[int, ...], str, bytes, bytes | None, str, float | None, int]
RetainedTuple = tuple[str, bytes, int, bytes | None, str, float | None, float]


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


def subscription_from_wire(value: object) -> SubscriptionRecord:
    t = _tuple(value, 8, "subscription")
    try:
        return SubscriptionRecord(
            str(t[0]),
            str(t[1]),
            int(t[2]),
            bool(t[3]),
            bool(t[4]),
            int(t[5]),  # type: ignore[call-overload]
            None if t[6] is None else int(t[6]),  # type: ignore[call-overload]
            None if t[7] is None else str(t[7]),
        )
    except (TypeError, ValueError) as exc:
        raise WireError(f"subscription: {exc}") from None


def will_from_wire(value: object) -> WillRecord:
    t = _tuple(value, 6, "will")
    if not isinstance(t[1], bytes) or not (t[4] is None or isinstance(t[4], bytes)):
        raise WireError("will: payload and props must be binary")
    try:
        return WillRecord(str(t[0]), t[1], int(t[2]), bool(t[3]), t[4], int(t[5]))  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise WireError(f"will: {exc}") from None


def session_from_wire(value: object) -> SessionRecord:
    t = _tuple(value, 8, "session")
    subs = t[2]
    if not isinstance(subs, tuple | list):
        raise WireError("session: subscriptions must be an array")
    try:
        return SessionRecord(
            str(t[0]),
            int(t[1]),  # type: ignore[call-overload]
            tuple(subscription_from_wire(s) for s in subs),
            None if t[3] is None else will_from_wire(t[3]),
            bool(t[4]),
            str(t[5]),
            int(t[6]),
            float(t[7]),  # type: ignore[call-overload, arg-type]
        )
    except (TypeError, ValueError) as exc:
        raise WireError(f"session: {exc}") from None


def queued_from_wire(value: object) -> QueuedRecord:
    t = _tuple(value, 11, "queued message")
    if not isinstance(t[6], bytes) or not (t[7] is None or isinstance(t[7], bytes)):
        raise WireError("queued message: payload and props must be binary")
    sub_ids = t[4]
    if not isinstance(sub_ids, tuple | list):
        raise WireError("queued message: sub_ids must be an array")
    try:
        return QueuedRecord(
            str(t[0]),
            int(t[1]),
            int(t[2]),
            bool(t[3]),  # type: ignore[call-overload]
            tuple(int(i) for i in sub_ids),
            str(t[5]),
            t[6],
            t[7],
            str(t[8]),
            None if t[9] is None else float(t[9]),  # type: ignore[arg-type]
            int(t[10]),  # type: ignore[call-overload]
        )
    except (TypeError, ValueError) as exc:
        raise WireError(f"queued message: {exc}") from None


def retained_from_wire(value: object) -> RetainedRecord:
    t = _tuple(value, 7, "retained message")
    if not isinstance(t[1], bytes) or not (t[3] is None or isinstance(t[3], bytes)):
        raise WireError("retained message: payload and props must be binary")
    try:
        return RetainedRecord(
            str(t[0]),
            t[1],
            int(t[2]),
            t[3],
            str(t[4]),  # type: ignore[call-overload]
            None if t[5] is None else float(t[5]),  # type: ignore[arg-type]
            float(t[6]),  # type: ignore[arg-type]
        )
    except (TypeError, ValueError) as exc:
        raise WireError(f"retained message: {exc}") from None
