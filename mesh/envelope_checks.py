"""Field and shape checks for decoded mesh envelopes, and the wire-tuple shapes they prove.

Why: `mesh/envelope.py` owns the wire format; what it decodes must be checked field by field
before any other module sees it, and those checks (about half of the format's code) are one
concern of their own. They live here so that the envelope module reads as the format: values,
packing, and one unpacker per kind that says which check applies to which field.

Must not: be imported by anything but `mesh.envelope` (every other module, and every test, takes
the wire types from `mesh.envelope`, which re-exports them); import zmq, asyncio, msgpack or the
broker; read the clock; log. It checks values and raises `EnvelopeError`, nothing else.

Invariants:
- Every check takes the already-unpacked value as `object` and either returns it unchanged,
  typed as what it proved, or raises `EnvelopeError` naming the field relative to its own value
  (callers prepend where that value sits). Error messages are built only when a check fails.
- Integers are checked with `type(x) is int`: msgpack booleans arrive as `bool`, a subclass of
  `int`, and `True` must not pass for QoS 1. Arrays are tuples (`use_list=False` upstream).
- The checks are on the path of every cross-process publish (`check_item` per item): they stay
  plain `type(...) is` tests, with no allocation on success.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeAlias, TypeVar

from mesh.errors import EnvelopeError

__all__ = [
    "InflightWire",
    "Item",
    "Props",
    "QueuedWire",
    "SubscriptionWire",
    "bad",
    "check_arity",
    "check_array",
    "check_bool",
    "check_inflight",
    "check_item",
    "check_packet_id",
    "check_packet_id_element",
    "check_qos",
    "check_queued",
    "check_str",
    "check_sub_id",
    "check_sub_ids",
    "check_subscription",
    "check_topic",
    "check_uint",
    "position",
    "show",
]
# --------------------------------------------------------------------------------------------
# Wire shapes

# Wire forms. They are plain tuples rather than dataclasses because they are what msgpack
# produces and consumes directly: building a dataclass per item would double the hot-path cost.
# props: [payload_format, content_type, response_topic, correlation_data, user_properties]
Props: TypeAlias = tuple[int | None, str | None, str | None, bytes | None, tuple[tuple[str, str], ...]]
# item: [qos, retain, payload, client_id, props, expiry_ms, msg_id]
Item: TypeAlias = tuple[int, bool, bytes, str, Props | None, int | None, int]
# [key_filter, topic_filter, qos, no_local, rap, rh, sub_id, group]
SubscriptionWire: TypeAlias = tuple[str, str, int, bool, bool, int, int | None, str | None]
# [packet_id, state, qos, retain, sub_ids, topic, item]; state 1 = awaiting PUBACK,
# 2 = awaiting PUBREC, 3 = awaiting PUBCOMP
InflightWire: TypeAlias = tuple[int, int, int, bool, tuple[int, ...], str, Item]
# [qos, retain, sub_ids, topic, item]
QueuedWire: TypeAlias = tuple[int, bool, tuple[int, ...], str, Item]

_MAX_PACKET_ID: Final = 0xFFFF
_MAX_SUB_ID: Final = 268_435_455  # the largest Variable Byte Integer (MQTT 5 §3.3.2.3.8)
_SHOW_CHARS: Final = 80
_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# Error messages


def show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else text[: _SHOW_CHARS - 3] + "..."


def bad(field: str, expected: str, value: object) -> EnvelopeError:
    return EnvelopeError(f"{field}: expected {expected}, got {show(value)}")


def position(seq: tuple[object, ...], element: object) -> int:
    """Index of `element` (by identity) in `seq`: used only to name a bad array element."""
    return next((i for i, e in enumerate(seq) if e is element), -1)


# --------------------------------------------------------------------------------------------
# Scalar fields


def check_uint(field: str, value: object) -> int:
    if type(value) is not int or value < 0:
        raise bad(field, "an unsigned integer", value)
    return value


def check_str(field: str, value: object) -> str:
    if type(value) is not str:
        raise bad(field, "a string", value)
    return value


def check_topic(field: str, value: object) -> str:
    if type(value) is not str or not value:  # [MQTT-4.7.3-1]
        raise bad(field, "a non-empty string [MQTT-4.7.3-1]", value)
    return value


def check_qos(field: str, value: object) -> int:
    if type(value) is not int or not 0 <= value <= 2:  # [MQTT-3.3.1-4]
        raise bad(field, "a QoS of 0, 1 or 2 [MQTT-3.3.1-4]", value)
    return value


def check_bool(field: str, value: object) -> bool:
    if type(value) is not bool:
        raise bad(field, "a boolean", value)
    return value


def check_sub_id(field: str, value: object) -> int:
    if type(value) is not int or not 1 <= value <= _MAX_SUB_ID:
        raise bad(field, f"a subscription identifier 1..{_MAX_SUB_ID}", value)
    return value


def check_sub_ids(field: str, value: object) -> tuple[int, ...]:
    if type(value) is not tuple:
        raise bad(field, "an array of subscription identifiers", value)
    for sub_id in value:
        check_sub_id(f"{field}[{position(value, sub_id)}]", sub_id)
    return value


def check_packet_id(field: str, value: object) -> int:
    if type(value) is not int or not 1 <= value <= _MAX_PACKET_ID:  # [MQTT-2.2.1-3]
        raise bad(field, "a packet id 1..65535 [MQTT-2.2.1-3]", value)
    return value


# --------------------------------------------------------------------------------------------
# Composite values: an item, a session's entries, an array of them


def _check_props(props: tuple[object, ...]) -> None:
    if len(props) != 5:
        raise bad(
            "props",
            "nil or [payload_format, content_type, response_topic, correlation_data, user_properties]",
            props,
        )
    payload_format, content_type, response_topic, correlation_data, user_properties = props
    if payload_format is not None and (type(payload_format) is not int or not 0 <= payload_format <= 1):
        raise bad("props.payload_format", "nil, 0 or 1", payload_format)
    if content_type is not None and type(content_type) is not str:
        raise bad("props.content_type", "nil or a string", content_type)
    # Not required non-empty: the envelope is never stricter than the MQTT ingress that built it,
    # or one odd property would drop a whole batch on the receiving side.
    if response_topic is not None and type(response_topic) is not str:
        raise bad("props.response_topic", "nil or a string", response_topic)
    if correlation_data is not None and type(correlation_data) is not bytes:
        raise bad("props.correlation_data", "nil or binary", correlation_data)
    if type(user_properties) is not tuple:
        raise bad("props.user_properties", "an array of [key, value] pairs", user_properties)
    for pair in user_properties:
        if type(pair) is not tuple or len(pair) != 2 or type(pair[0]) is not str or type(pair[1]) is not str:
            index = position(user_properties, pair)
            raise bad(f"props.user_properties[{index}]", "a [key, value] pair of strings", pair)


def check_item(item: object) -> Item:
    """One application message: `[qos, retain, payload, client_id, props, expiry_ms, msg_id]`.

    `expiry_ms` may be zero or negative (the message expired on the way; the receiver drops it),
    so that a sender never has to clamp. `msg_id` is 0, or the node-unique id under which the
    store keeps the message's queue rows (acknowledged by it).
    """
    if type(item) is not tuple or len(item) != 7:
        raise bad("item", "[qos, retain, payload, client_id, props, expiry_ms, msg_id]", item)
    qos, retain, payload, client_id, props, expiry_ms, msg_id = item
    if type(msg_id) is not int or msg_id < 0:
        raise bad("item.msg_id", "an unsigned integer", msg_id)
    if type(qos) is not int or not 0 <= qos <= 2:  # [MQTT-3.3.1-4]
        raise bad("item.qos", "a QoS of 0, 1 or 2 [MQTT-3.3.1-4]", qos)
    if type(retain) is not bool:
        raise bad("item.retain", "a boolean", retain)
    if type(payload) is not bytes:
        raise bad("item.payload", "binary", payload)
    if type(client_id) is not str:
        raise bad("item.client_id", "a string", client_id)
    if props is not None:
        if type(props) is not tuple:
            raise bad("item.props", "nil or an array", props)
        try:
            _check_props(props)
        except EnvelopeError as exc:
            raise EnvelopeError(f"item.{exc}") from None
    if expiry_ms is not None and type(expiry_ms) is not int:
        raise bad("item.expiry_ms", "nil or an integer", expiry_ms)
    return item


def check_arity(kind: str, msg: tuple[object, ...], layout: str) -> None:
    expected = layout.count(",") + 1
    if len(msg) != expected:
        raise EnvelopeError(f"{kind!r} envelope has {len(msg)} fields, expected {expected}: {layout}")


def check_subscription(value: object) -> SubscriptionWire:
    layout = "[key_filter, topic_filter, qos, no_local, rap, rh, sub_id, group]"
    if type(value) is not tuple or len(value) != 8:
        raise bad("subscription", layout, value)
    key_filter, topic_filter, qos, no_local, rap, rh, sub_id, group = value
    check_topic("key_filter", key_filter)
    check_topic("topic_filter", topic_filter)
    check_qos("qos", qos)
    check_bool("no_local", no_local)
    check_bool("rap", rap)
    if type(rh) is not int or not 0 <= rh <= 2:
        raise bad("rh", "a Retain Handling of 0, 1 or 2", rh)
    if sub_id is not None:
        check_sub_id("sub_id", sub_id)
    if group is not None and (type(group) is not str or not group):  # [MQTT-4.8.2-1]
        raise bad("group", "nil or a non-empty share name [MQTT-4.8.2-1]", group)
    return value


def check_inflight(value: object) -> InflightWire:
    if type(value) is not tuple or len(value) != 7:
        raise bad("inflight", "[packet_id, state, qos, retain, sub_ids, topic, item]", value)
    packet_id, state, qos, retain, sub_ids, topic, item = value
    check_packet_id("packet_id", packet_id)
    if type(state) is not int or not 1 <= state <= 3:
        raise bad("state", "1 (awaiting PUBACK), 2 (awaiting PUBREC) or 3 (awaiting PUBCOMP)", state)
    if type(qos) is not int or not 1 <= qos <= 2:
        raise bad("qos", "a QoS of 1 or 2 (QoS 0 is never in flight)", qos)
    check_bool("retain", retain)
    check_sub_ids("sub_ids", sub_ids)
    check_topic("topic", topic)
    check_item(item)
    return value


def check_queued(value: object) -> QueuedWire:
    if type(value) is not tuple or len(value) != 5:
        raise bad("queued", "[qos, retain, sub_ids, topic, item]", value)
    qos, retain, sub_ids, topic, item = value
    check_qos("qos", qos)
    check_bool("retain", retain)
    check_sub_ids("sub_ids", sub_ids)
    check_topic("topic", topic)
    check_item(item)
    return value


def check_array(field: str, value: object, check: Callable[[object], _T]) -> tuple[_T, ...]:
    if type(value) is not tuple:
        raise bad(field, "an array", value)
    try:
        return tuple(check(element) for element in value)
    except EnvelopeError as exc:
        raise EnvelopeError(f"{field}[{_first_bad(value, check)}]: {exc}") from None


def _first_bad(values: tuple[object, ...], check: Callable[[object], object]) -> int:
    """Index of the first element that `check` rejects: used only to name a bad element."""
    for index, value in enumerate(values):
        try:
            check(value)
        except EnvelopeError:
            return index
    return -1


def check_packet_id_element(value: object) -> int:
    return check_packet_id("packet id", value)
