"""The byte format of every mesh envelope and control frame (`mesh/PROTOCOL.md`, version 1).

Why: one module owns the wire format (the ZeroMQ Guide's lesson), so that a change to it is one
diff here plus its tests, and every other mesh module speaks in the frozen values below instead
of in msgpack arrays. Data-plane envelopes (`P`, `D`, `S`, `H`, `Y`) travel as frame 1 of a
`[channel, envelope]` pair; control frames (`hello`, `hb`, `claim`, ...) travel alone over the
DEALER/ROUTER link.

Must not: import zmq, asyncio or the broker; read the clock; log. It turns values into bytes and
bytes into values, and raises `EnvelopeError` for anything else. What to do with a bad envelope
(drop, count, log once) is the receiver's decision.

Invariants:
- Every envelope is a msgpack array whose first item is `VERSION` and second the kind; bytes
  are exactly what PROTOCOL.md shows (the tests pin a few of them byte for byte).
- `unpack_data` and `unpack_control` raise `EnvelopeError` and nothing else, whatever the input;
  what they return has every field of the type and range its annotation and PROTOCOL.md give
  (integers are checked with `type(x) is int`, because msgpack booleans arrive as `bool`, a
  subclass of `int`, and `True` must not pass for QoS 1).
- Arrays come back as tuples (`use_list=False`), so an unpacked value compares equal to the
  value that was packed when that value was built from tuples, and it is immutable.
- The pack functions check only what is cheap (kind, arity, non-empty batch); a value msgpack
  cannot encode (an int past 64 bits, a lone surrogate, an unknown type) becomes an
  `EnvelopeError`. They do not deep-check fields: the receiver does, once.

Speed: `pack_publish_batch` is one `msgpack.packb` of a list, and the `P` path of `unpack_data`
is one `unpackb` plus a handful of `type(...) is` tests per item; both are on the path of every
cross-process publish. Error messages are built only when something is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, TypeAlias, TypeVar

import msgpack

from mesh.errors import EnvelopeError, MeshError

__all__ = [
    "CH_RETAINED",
    "CH_SHARED",
    "CH_SYNC",
    "CONTROL_KINDS",
    "VERSION",
    "Control",
    "DataMessage",
    "Directed",
    "EnvelopeError",
    "Handoff",
    "InflightWire",
    "Item",
    "MeshError",
    "Props",
    "PublishBatch",
    "QueuedWire",
    "SessionWire",
    "SharedUpdate",
    "SubscriptionWire",
    "SyncMarker",
    "inbox",
    "pack_control",
    "pack_directed",
    "pack_handoff",
    "pack_publish_batch",
    "pack_shared_update",
    "pack_sync",
    "unpack_control",
    "unpack_data",
]

VERSION: Final = 1

# Channels (frame 0) that are not topics: an MQTT topic never starts with U+0000 [MQTT-1.5.4-2].
CH_RETAINED: Final = b"\x00R"
CH_SHARED: Final = b"\x00S"
CH_SYNC: Final = b"\x00Y"  # + token: barrier subscriptions (upstream half of a barrier)
_CH_INBOX: Final = b"\x00W"

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


def inbox(worker: int) -> bytes:
    """The channel of messages directed to worker `worker` (`D` and `H` envelopes)."""
    # The "/" ends the number: ZeroMQ matches prefixes, and "\x00W1" would also match "\x00W12".
    return _CH_INBOX + str(worker).encode() + b"/"


# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class PublishBatch:
    """`P`: publishes to one topic, in publish order (channel: the topic, or `CH_RETAINED`)."""

    origin: str
    seq: int
    topic: str
    items: tuple[Item, ...]


@dataclass(frozen=True, slots=True)
class Directed:
    """`D`: one message for one session on the worker whose inbox carries it."""

    origin: str
    seq: int
    client_id: str
    qos: int
    retain: bool
    sub_ids: tuple[int, ...]
    topic: str
    item: Item


@dataclass(frozen=True, slots=True)
class SharedUpdate:
    """`S`: a shared-subscription member joined or changed options (`op` "+") or left ("-")."""

    origin: str
    seq: int
    op: str
    group: str
    topic_filter: str
    client_id: str
    qos: int
    sub_id: int | None


@dataclass(frozen=True, slots=True)
class SessionWire:
    """The session a `Handoff` carries from the previous owner to the new one."""

    expiry_s: int
    subscriptions: tuple[SubscriptionWire, ...]
    inflight: tuple[InflightWire, ...]
    queue: tuple[QueuedWire, ...]
    inbound_qos2: tuple[int, ...]
    next_packet_id: int


@dataclass(frozen=True, slots=True)
class Handoff:
    """`H`: the previous owner's answer to a `release`; `state` None means start clean."""

    origin: str
    seq: int
    client_id: str
    epoch: int
    state: SessionWire | None


@dataclass(frozen=True, slots=True)
class SyncMarker:
    """`Y`: the downstream half of a barrier: behind every envelope its sender sent earlier.

    Layout `[1, "Y", origin, seq, token]`, `token` binary (channel `CH_SHARED`); the upstream
    half is a subscription to `CH_SYNC + token` (see the barrier control kinds below).
    """

    origin: str
    seq: int
    token: bytes


DataMessage: TypeAlias = PublishBatch | Directed | SharedUpdate | Handoff | SyncMarker


@dataclass(frozen=True, slots=True)
class Control:
    """One control frame: `[VERSION, kind, req_id, *body]`; replies carry the request's req_id.

    `body` is as unpacked (arrays as tuples, `snap`'s marks as a dict); its length is checked
    against `CONTROL_KINDS`, the types of its fields are the caller's to check.
    """

    kind: str
    req_id: int
    body: tuple[object, ...]


# kind -> number of body fields (PROTOCOL.md, control plane table)
CONTROL_KINDS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "hello": 3,  # [index, incarnation, pid]
        "hb": 2,  # [index, connections]
        "claim": 2,  # [client_id, clean_start]
        "claimed": 3,  # [client_id, epoch, previous]
        "release": 4,  # [client_id, epoch, new_index, clean_start]
        "unregister": 2,  # [client_id, epoch]
        "snapshot": 0,  # []
        "snap": 3,  # [marks, retained, shared]
        "bye": 1,  # [index]
        # store plane (worker <-> store.ctl, store.pub): PROTOCOL.md, "The store plane"
        "save": 1,  # [session]
        "ok": 0,  # []
        "drop": 1,  # [client_id]
        "online": 4,  # [client_id, online, node, epoch]
        "enqueue": 2,  # [rows, may_refuse]
        "retain": 3,  # [topic, retained | nil, may_refuse]
        "durable": 0,  # []
        "refused": 1,  # [reason]
        "ack": 2,  # [client_id, msg_ids]
        "load": 1,  # [client_id]
        "loaded": 2,  # [session | nil, rows]
        "failed": 1,  # [reason]
        "dsnap": 0,  # []
        "dsubs": 1,  # [[client_id, subscriptions], ...]
        "dsub": 2,  # [client_id, subscriptions | nil]
        "recover": 1,  # [node]
        "wills": 1,  # [[client_id, will], ...]
        "rsnap": 0,  # []
        "rstate": 1,  # [retained, ...]
        # barriers (worker code in broker/meshlink.py; PROTOCOL.md rows still to be written)
        "sync": 1,  # worker -> relay [token]: reply `synced` once every other worker sent `seen`
        "seen": 2,  # worker -> relay [token, index]
        "synced": 1,  # relay -> worker [token]
        "dead": 1,  # relay -> worker [index]: that worker is gone (bye, hello, missed beats)
    }
)


# --------------------------------------------------------------------------------------------
# Packing


def _pack(kind: str, fields: list[object]) -> bytes:
    try:
        packed: bytes = msgpack.packb(fields)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EnvelopeError(f"cannot pack a {kind!r} envelope: {exc}") from exc
    return packed


def pack_publish_batch(origin: str, seq: int, topic: str, items: Sequence[Item]) -> bytes:
    """`[1, "P", origin, seq, topic, items]`; `items` a non-empty list or tuple of items."""
    if not items:
        raise EnvelopeError("a P envelope needs at least one item")
    try:
        packed: bytes = msgpack.packb([VERSION, "P", origin, seq, topic, items])
    except (TypeError, ValueError, OverflowError) as exc:
        raise EnvelopeError(f"cannot pack a 'P' envelope: {exc}") from exc
    return packed


def pack_directed(
    origin: str,
    seq: int,
    client_id: str,
    qos: int,
    retain: bool,
    sub_ids: tuple[int, ...],
    topic: str,
    item: Item,
) -> bytes:
    """`[1, "D", origin, seq, client_id, qos, retain, sub_ids, topic, item]`."""
    return _pack("D", [VERSION, "D", origin, seq, client_id, qos, retain, sub_ids, topic, item])


def pack_shared_update(
    origin: str,
    seq: int,
    op: str,
    group: str,
    topic_filter: str,
    client_id: str,
    qos: int,
    sub_id: int | None,
) -> bytes:
    """`[1, "S", origin, seq, op, group, filter, client_id, qos, sub_id]`."""
    return _pack("S", [VERSION, "S", origin, seq, op, group, topic_filter, client_id, qos, sub_id])


def pack_handoff(origin: str, seq: int, client_id: str, epoch: int, state: SessionWire | None) -> bytes:
    """`[1, "H", origin, seq, client_id, epoch, state]`, state nil or its six-field array."""
    wire_state = (
        None
        if state is None
        else [
            state.expiry_s,
            state.subscriptions,
            state.inflight,
            state.queue,
            state.inbound_qos2,
            state.next_packet_id,
        ]
    )
    return _pack("H", [VERSION, "H", origin, seq, client_id, epoch, wire_state])


def pack_sync(origin: str, seq: int, token: bytes) -> bytes:
    """`[1, "Y", origin, seq, token]`."""
    return _pack("Y", [VERSION, "Y", origin, seq, token])


def pack_control(kind: str, req_id: int, *body: object) -> bytes:
    """`[1, kind, req_id, *body]`; the kind must be known and the body of its length."""
    arity = CONTROL_KINDS.get(kind)
    if arity is None:
        raise EnvelopeError(f"unknown control kind {kind!r}")
    if len(body) != arity:
        raise EnvelopeError(f"control {kind!r} takes {arity} body fields, got {len(body)}")
    return _pack(kind, [VERSION, kind, req_id, *body])


# --------------------------------------------------------------------------------------------
# Unpacking: shared checks. Each raises EnvelopeError naming the field relative to its own
# value; callers prepend where that value sits.


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else text[: _SHOW_CHARS - 3] + "..."


def _bad(field: str, expected: str, value: object) -> EnvelopeError:
    return EnvelopeError(f"{field}: expected {expected}, got {_show(value)}")


def _position(seq: tuple[object, ...], element: object) -> int:
    """Index of `element` (by identity) in `seq`: used only to name a bad array element."""
    return next((i for i, e in enumerate(seq) if e is element), -1)


def _unpack(frame: bytes, what: str) -> tuple[object, ...]:
    try:
        msg = msgpack.unpackb(frame, use_list=False, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise EnvelopeError(f"{what} is not one msgpack value: {exc}") from exc
    if type(msg) is not tuple:
        raise _bad(what, "a msgpack array", msg)
    if len(msg) < 2:
        raise _bad(what, "an array [version, kind, ...]", msg)
    version = msg[0]
    if type(version) is not int or version != VERSION:
        raise EnvelopeError(f"{what} has protocol version {_show(version)}; this node speaks {VERSION}")
    return msg


def _check_uint(field: str, value: object) -> int:
    if type(value) is not int or value < 0:
        raise _bad(field, "an unsigned integer", value)
    return value


def _check_str(field: str, value: object) -> str:
    if type(value) is not str:
        raise _bad(field, "a string", value)
    return value


def _check_topic(field: str, value: object) -> str:
    if type(value) is not str or not value:  # [MQTT-4.7.3-1]
        raise _bad(field, "a non-empty string [MQTT-4.7.3-1]", value)
    return value


def _check_qos(field: str, value: object) -> int:
    if type(value) is not int or not 0 <= value <= 2:  # [MQTT-3.3.1-4]
        raise _bad(field, "a QoS of 0, 1 or 2 [MQTT-3.3.1-4]", value)
    return value


def _check_bool(field: str, value: object) -> bool:
    if type(value) is not bool:
        raise _bad(field, "a boolean", value)
    return value


def _check_sub_id(field: str, value: object) -> int:
    if type(value) is not int or not 1 <= value <= _MAX_SUB_ID:
        raise _bad(field, f"a subscription identifier 1..{_MAX_SUB_ID}", value)
    return value


def _check_sub_ids(field: str, value: object) -> tuple[int, ...]:
    if type(value) is not tuple:
        raise _bad(field, "an array of subscription identifiers", value)
    for sub_id in value:
        _check_sub_id(f"{field}[{_position(value, sub_id)}]", sub_id)
    return value


def _check_packet_id(field: str, value: object) -> int:
    if type(value) is not int or not 1 <= value <= _MAX_PACKET_ID:  # [MQTT-2.2.1-3]
        raise _bad(field, "a packet id 1..65535 [MQTT-2.2.1-3]", value)
    return value


def _check_props(props: tuple[object, ...]) -> None:
    if len(props) != 5:
        raise _bad(
            "props",
            "nil or [payload_format, content_type, response_topic, correlation_data, user_properties]",
            props,
        )
    payload_format, content_type, response_topic, correlation_data, user_properties = props
    if payload_format is not None and (type(payload_format) is not int or not 0 <= payload_format <= 1):
        raise _bad("props.payload_format", "nil, 0 or 1", payload_format)
    if content_type is not None and type(content_type) is not str:
        raise _bad("props.content_type", "nil or a string", content_type)
    # Not required non-empty: the envelope is never stricter than the MQTT ingress that built it,
    # or one odd property would drop a whole batch on the receiving side.
    if response_topic is not None and type(response_topic) is not str:
        raise _bad("props.response_topic", "nil or a string", response_topic)
    if correlation_data is not None and type(correlation_data) is not bytes:
        raise _bad("props.correlation_data", "nil or binary", correlation_data)
    if type(user_properties) is not tuple:
        raise _bad("props.user_properties", "an array of [key, value] pairs", user_properties)
    for pair in user_properties:
        if type(pair) is not tuple or len(pair) != 2 or type(pair[0]) is not str or type(pair[1]) is not str:
            index = _position(user_properties, pair)
            raise _bad(f"props.user_properties[{index}]", "a [key, value] pair of strings", pair)


def _check_item(item: object) -> Item:
    """One application message: `[qos, retain, payload, client_id, props, expiry_ms, msg_id]`.

    `expiry_ms` may be zero or negative (the message expired on the way; the receiver drops it),
    so that a sender never has to clamp. `msg_id` is 0, or the node-unique id under which the
    store keeps the message's queue rows (acknowledged by it).
    """
    if type(item) is not tuple or len(item) != 7:
        raise _bad("item", "[qos, retain, payload, client_id, props, expiry_ms, msg_id]", item)
    qos, retain, payload, client_id, props, expiry_ms, msg_id = item
    if type(msg_id) is not int or msg_id < 0:
        raise _bad("item.msg_id", "an unsigned integer", msg_id)
    if type(qos) is not int or not 0 <= qos <= 2:  # [MQTT-3.3.1-4]
        raise _bad("item.qos", "a QoS of 0, 1 or 2 [MQTT-3.3.1-4]", qos)
    if type(retain) is not bool:
        raise _bad("item.retain", "a boolean", retain)
    if type(payload) is not bytes:
        raise _bad("item.payload", "binary", payload)
    if type(client_id) is not str:
        raise _bad("item.client_id", "a string", client_id)
    if props is not None:
        if type(props) is not tuple:
            raise _bad("item.props", "nil or an array", props)
        try:
            _check_props(props)
        except EnvelopeError as exc:
            raise EnvelopeError(f"item.{exc}") from None
    if expiry_ms is not None and type(expiry_ms) is not int:
        raise _bad("item.expiry_ms", "nil or an integer", expiry_ms)
    return item


def _check_arity(kind: str, msg: tuple[object, ...], layout: str) -> None:
    expected = layout.count(",") + 1
    if len(msg) != expected:
        raise EnvelopeError(f"{kind!r} envelope has {len(msg)} fields, expected {expected}: {layout}")


# --------------------------------------------------------------------------------------------
# Unpacking: data envelopes


_P_LAYOUT: Final = "[1, 'P', origin, seq, topic, items]"
_D_LAYOUT: Final = "[1, 'D', origin, seq, client_id, qos, retain, sub_ids, topic, item]"
_S_LAYOUT: Final = "[1, 'S', origin, seq, op, group, filter, client_id, qos, sub_id]"
_H_LAYOUT: Final = "[1, 'H', origin, seq, client_id, epoch, state]"
_Y_LAYOUT: Final = "[1, 'Y', origin, seq, token]"
_STATE_LAYOUT: Final = "[expiry_s, subscriptions, inflight, queue, inbound_qos2, next_packet_id]"


def _unpack_publish_batch(msg: tuple[object, ...]) -> PublishBatch:
    if len(msg) != 6:
        _check_arity("P", msg, _P_LAYOUT)
    _, _, origin, seq, topic, items = msg
    if type(origin) is not str:
        raise _bad("origin", "a string", origin)
    if type(seq) is not int or seq < 0:
        raise _bad("seq", "an unsigned integer", seq)
    if type(topic) is not str or not topic:  # [MQTT-4.7.3-1]
        raise _bad("topic", "a non-empty string [MQTT-4.7.3-1]", topic)
    if type(items) is not tuple or not items:
        raise _bad("items", "a non-empty array of items", items)
    check_item = _check_item
    try:
        for item in items:
            check_item(item)
    except EnvelopeError as exc:
        raise EnvelopeError(f"items[{_position(items, item)}]: {exc}") from None
    return PublishBatch(origin, seq, topic, items)


def _unpack_directed(msg: tuple[object, ...]) -> Directed:
    _check_arity("D", msg, _D_LAYOUT)
    _, _, origin, seq, client_id, qos, retain, sub_ids, topic, item = msg
    return Directed(
        _check_str("origin", origin),
        _check_uint("seq", seq),
        _check_str("client_id", client_id),
        _check_qos("qos", qos),
        _check_bool("retain", retain),
        _check_sub_ids("sub_ids", sub_ids),
        _check_topic("topic", topic),
        _check_item(item),
    )


def _unpack_shared_update(msg: tuple[object, ...]) -> SharedUpdate:
    _check_arity("S", msg, _S_LAYOUT)
    _, _, origin, seq, op, group, topic_filter, client_id, qos, sub_id = msg
    if type(op) is not str or op not in ("+", "-"):
        raise _bad("op", "'+' or '-'", op)
    if type(group) is not str or not group:  # [MQTT-4.8.2-1]
        raise _bad("group", "a non-empty share name [MQTT-4.8.2-1]", group)
    return SharedUpdate(
        _check_str("origin", origin),
        _check_uint("seq", seq),
        op,
        group,
        _check_topic("filter", topic_filter),
        _check_str("client_id", client_id),
        _check_qos("qos", qos),
        None if sub_id is None else _check_sub_id("sub_id", sub_id),
    )


def _check_subscription(value: object) -> SubscriptionWire:
    layout = "[key_filter, topic_filter, qos, no_local, rap, rh, sub_id, group]"
    if type(value) is not tuple or len(value) != 8:
        raise _bad("subscription", layout, value)
    key_filter, topic_filter, qos, no_local, rap, rh, sub_id, group = value
    _check_topic("key_filter", key_filter)
    _check_topic("topic_filter", topic_filter)
    _check_qos("qos", qos)
    _check_bool("no_local", no_local)
    _check_bool("rap", rap)
    if type(rh) is not int or not 0 <= rh <= 2:
        raise _bad("rh", "a Retain Handling of 0, 1 or 2", rh)
    if sub_id is not None:
        _check_sub_id("sub_id", sub_id)
    if group is not None and (type(group) is not str or not group):  # [MQTT-4.8.2-1]
        raise _bad("group", "nil or a non-empty share name [MQTT-4.8.2-1]", group)
    return value


def _check_inflight(value: object) -> InflightWire:
    if type(value) is not tuple or len(value) != 7:
        raise _bad("inflight", "[packet_id, state, qos, retain, sub_ids, topic, item]", value)
    packet_id, state, qos, retain, sub_ids, topic, item = value
    _check_packet_id("packet_id", packet_id)
    if type(state) is not int or not 1 <= state <= 3:
        raise _bad("state", "1 (awaiting PUBACK), 2 (awaiting PUBREC) or 3 (awaiting PUBCOMP)", state)
    if type(qos) is not int or not 1 <= qos <= 2:
        raise _bad("qos", "a QoS of 1 or 2 (QoS 0 is never in flight)", qos)
    _check_bool("retain", retain)
    _check_sub_ids("sub_ids", sub_ids)
    _check_topic("topic", topic)
    _check_item(item)
    return value


def _check_queued(value: object) -> QueuedWire:
    if type(value) is not tuple or len(value) != 5:
        raise _bad("queued", "[qos, retain, sub_ids, topic, item]", value)
    qos, retain, sub_ids, topic, item = value
    _check_qos("qos", qos)
    _check_bool("retain", retain)
    _check_sub_ids("sub_ids", sub_ids)
    _check_topic("topic", topic)
    _check_item(item)
    return value


def _check_array(field: str, value: object, check: Callable[[object], _T]) -> tuple[_T, ...]:
    if type(value) is not tuple:
        raise _bad(field, "an array", value)
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


def _check_packet_id_element(value: object) -> int:
    return _check_packet_id("packet id", value)


def _check_session(value: object) -> SessionWire:
    if type(value) is not tuple or len(value) != 6:
        raise _bad("state", f"nil or {_STATE_LAYOUT}", value)
    try:
        session = SessionWire(
            _check_uint("expiry_s", value[0]),
            _check_array("subscriptions", value[1], _check_subscription),
            _check_array("inflight", value[2], _check_inflight),
            _check_array("queue", value[3], _check_queued),
            _check_array("inbound_qos2", value[4], _check_packet_id_element),
            _check_packet_id("next_packet_id", value[5]),
        )
    except EnvelopeError as exc:
        raise EnvelopeError(f"state.{exc}") from None
    # A session holds each packet id at most once per direction [MQTT-2.2.1-3].
    inflight_ids = [entry[0] for entry in session.inflight]
    if len(set(inflight_ids)) != len(inflight_ids):
        raise _bad("state.inflight", "distinct packet ids [MQTT-2.2.1-3]", inflight_ids)
    if len(set(session.inbound_qos2)) != len(session.inbound_qos2):
        raise _bad("state.inbound_qos2", "distinct packet ids [MQTT-2.2.1-3]", session.inbound_qos2)
    return session


def _unpack_handoff(msg: tuple[object, ...]) -> Handoff:
    _check_arity("H", msg, _H_LAYOUT)
    _, _, origin, seq, client_id, epoch, state = msg
    return Handoff(
        _check_str("origin", origin),
        _check_uint("seq", seq),
        _check_str("client_id", client_id),
        _check_uint("epoch", epoch),
        None if state is None else _check_session(state),
    )


def _unpack_sync_marker(msg: tuple[object, ...]) -> SyncMarker:
    _check_arity("Y", msg, _Y_LAYOUT)
    _, _, origin, seq, token = msg
    if type(token) is not bytes:
        raise _bad("token", "binary", token)
    return SyncMarker(_check_str("origin", origin), _check_uint("seq", seq), token)


def unpack_data(envelope: bytes) -> DataMessage:
    """The value of one data-plane envelope (frame 1); `EnvelopeError` for anything else."""
    msg = _unpack(envelope, "envelope")
    kind = msg[1]
    try:
        if kind == "P":  # first: the hot path
            return _unpack_publish_batch(msg)
        if kind == "D":
            return _unpack_directed(msg)
        if kind == "S":
            return _unpack_shared_update(msg)
        if kind == "H":
            return _unpack_handoff(msg)
        if kind == "Y":
            return _unpack_sync_marker(msg)
    except EnvelopeError as exc:
        raise EnvelopeError(f"{kind!r} envelope: {exc}") from None
    raise EnvelopeError(f"envelope of unknown kind {_show(kind)}")


# --------------------------------------------------------------------------------------------
# Unpacking: control frames


def unpack_control(frame: bytes) -> Control:
    """The value of one control frame; checks version, kind, req_id and body length."""
    msg = _unpack(frame, "control frame")
    kind = msg[1]
    if type(kind) is not str or (arity := CONTROL_KINDS.get(kind)) is None:
        raise EnvelopeError(f"control frame of unknown kind {_show(kind)}")
    if len(msg) < 3:
        raise EnvelopeError(f"control {kind!r} has no req_id")
    req_id = msg[2]
    if type(req_id) is not int or req_id < 0:
        raise _bad(f"control {kind!r}: req_id", "an unsigned integer", req_id)
    body = msg[3:]
    if len(body) != arity:
        raise EnvelopeError(f"control {kind!r} has {len(body)} body fields, expected {arity}")
    return Control(kind, req_id, body)
