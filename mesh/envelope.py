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

The field checks, and the wire-tuple shapes they prove (`Item`, `Props`, `SubscriptionWire`,
`InflightWire`, `QueuedWire`), live in `mesh/envelope_checks.py`; this module re-exports the
shapes, and the rest of the code base imports them from here only.

Speed: `pack_publish_batch` is one `msgpack.packb` of a list, and the `P` path of `unpack_data`
is one `unpackb` plus a handful of `type(...) is` tests per item; both are on the path of every
cross-process publish. Error messages are built only when something is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, TypeAlias

import msgpack

from mesh.envelope_checks import (
    InflightWire,
    Item,
    Props,
    QueuedWire,
    SubscriptionWire,
    bad,
    check_arity,
    check_array,
    check_bool,
    check_inflight,
    check_item,
    check_packet_id,
    check_packet_id_element,
    check_qos,
    check_queued,
    check_str,
    check_sub_id,
    check_sub_ids,
    check_subscription,
    check_topic,
    check_uint,
    position,
    show,
)
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
CH_RETAINED_QUIET: Final = b"\x00r"  # retained from a peer's snapshot: store if absent, never route
CH_DURABLE: Final = b"\x00D"  # durable-subscription updates (store.pub, and relayed from peers)
CH_REMOTE: Final = b"\x00N"  # + node + "/" + worker + "/": a shared pick for a worker of another node
_CH_INBOX: Final = b"\x00W"


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
        "claimed": 4,  # [client_id, epoch, previous, lost]
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
        "sinfo": 1,  # [client_id | nil] -> `sessinfo`: stored sessions, online flag, node, queued rows
        "sessinfo": 1,  # [[client_id, online, node, expiry_s, queued], ...]
        "sstats": 0,  # relay -> store []: the writer's figures, for /metrics and /health
        "sstate": 1,  # store -> relay [{transactions, ops, last_batch_ops, ...}]
        "rstate": 1,  # [retained, ...]
        "auth": 0,  # [] -> `authtable`
        "authtable": 3,  # [version, users, rules]: also broadcast on store.pub (channel \x00A)
        "uput": 3,  # [username, password_hash | nil, admin | nil] -> `done [version, created]`
        "udel": 1,  # [username] -> `done [version, existed]`
        "aadd": 3,  # [user, topic, access] -> `done [version, id]`
        "adel": 1,  # [id] -> `done [version, existed]`
        "done": 2,  # [version, value]: an auth change is committed
        # barriers (worker code in broker/meshlink.py; PROTOCOL.md rows still to be written)
        "sync": 1,  # worker -> relay [token]: reply `synced` once every other worker sent `seen`
        "seen": 2,  # worker -> relay [token, index]
        "synced": 1,  # relay -> worker [token]
        "dead": 1,  # relay -> worker [index]: that worker is gone (bye, hello, missed beats)
        # the cluster (PROTOCOL.md, "The cluster plane")
        "route": 2,  # worker -> relay [op, filter]
        "released": 2,  # worker -> relay [client_id, epoch]: a release to the store is committed
        "deadnode": 1,  # relay -> workers [node]: forget the node's shared members
        "reassert": 0,  # relay -> worker []: a node that recovered our sessions is back: mark ours online
        "resync": 0,  # relay -> worker []: the relay restarted: send your routes again
        "rescan": 0,  # relay -> worker []: a node died or its stream broke: online sessions re-read their rows
        "register": 2,  # worker -> relay [client_id, epoch]: a single worker's own claim (no answer)
        "stats": 3,  # worker -> relay [index, counters, gauges]: every heartbeat, for /metrics
        "minority": 2,  # relay -> workers [minority, server_reference]: split-brain protection
        "minorityops": 3,  # relay -> workers [minority, allow_publish, allow_subscribe] (AllowConnect)
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
# Unpacking: the outer array. The field checks are in mesh/envelope_checks.py; each raises
# EnvelopeError naming the field relative to its own value, and the callers below prepend
# where that value sits.


def _unpack(frame: bytes, what: str) -> tuple[object, ...]:
    try:
        msg = msgpack.unpackb(frame, use_list=False, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise EnvelopeError(f"{what} is not one msgpack value: {exc}") from exc
    if type(msg) is not tuple:
        raise bad(what, "a msgpack array", msg)
    if len(msg) < 2:
        raise bad(what, "an array [version, kind, ...]", msg)
    version = msg[0]
    if type(version) is not int or version != VERSION:
        raise EnvelopeError(f"{what} has protocol version {show(version)}; this node speaks {VERSION}")
    return msg


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
        check_arity("P", msg, _P_LAYOUT)
    _, _, origin, seq, topic, items = msg
    if type(origin) is not str:
        raise bad("origin", "a string", origin)
    if type(seq) is not int or seq < 0:
        raise bad("seq", "an unsigned integer", seq)
    if type(topic) is not str or not topic:  # [MQTT-4.7.3-1]
        raise bad("topic", "a non-empty string [MQTT-4.7.3-1]", topic)
    if type(items) is not tuple or not items:
        raise bad("items", "a non-empty array of items", items)
    check_one = check_item  # a local: one lookup per batch, not per item
    try:
        for item in items:
            check_one(item)
    except EnvelopeError as exc:
        raise EnvelopeError(f"items[{position(items, item)}]: {exc}") from None
    return PublishBatch(origin, seq, topic, items)


def _unpack_directed(msg: tuple[object, ...]) -> Directed:
    check_arity("D", msg, _D_LAYOUT)
    _, _, origin, seq, client_id, qos, retain, sub_ids, topic, item = msg
    return Directed(
        check_str("origin", origin),
        check_uint("seq", seq),
        check_str("client_id", client_id),
        check_qos("qos", qos),
        check_bool("retain", retain),
        check_sub_ids("sub_ids", sub_ids),
        check_topic("topic", topic),
        check_item(item),
    )


def _unpack_shared_update(msg: tuple[object, ...]) -> SharedUpdate:
    check_arity("S", msg, _S_LAYOUT)
    _, _, origin, seq, op, group, topic_filter, client_id, qos, sub_id = msg
    if type(op) is not str or op not in ("+", "-"):
        raise bad("op", "'+' or '-'", op)
    if type(group) is not str or not group:  # [MQTT-4.8.2-1]
        raise bad("group", "a non-empty share name [MQTT-4.8.2-1]", group)
    return SharedUpdate(
        check_str("origin", origin),
        check_uint("seq", seq),
        op,
        group,
        check_topic("filter", topic_filter),
        check_str("client_id", client_id),
        check_qos("qos", qos),
        None if sub_id is None else check_sub_id("sub_id", sub_id),
    )


def _check_session(value: object) -> SessionWire:
    if type(value) is not tuple or len(value) != 6:
        raise bad("state", f"nil or {_STATE_LAYOUT}", value)
    try:
        session = SessionWire(
            check_uint("expiry_s", value[0]),
            check_array("subscriptions", value[1], check_subscription),
            check_array("inflight", value[2], check_inflight),
            check_array("queue", value[3], check_queued),
            check_array("inbound_qos2", value[4], check_packet_id_element),
            check_packet_id("next_packet_id", value[5]),
        )
    except EnvelopeError as exc:
        raise EnvelopeError(f"state.{exc}") from None
    # A session holds each packet id at most once per direction [MQTT-2.2.1-3].
    inflight_ids = [entry[0] for entry in session.inflight]
    if len(set(inflight_ids)) != len(inflight_ids):
        raise bad("state.inflight", "distinct packet ids [MQTT-2.2.1-3]", inflight_ids)
    if len(set(session.inbound_qos2)) != len(session.inbound_qos2):
        raise bad("state.inbound_qos2", "distinct packet ids [MQTT-2.2.1-3]", session.inbound_qos2)
    return session


def _unpack_handoff(msg: tuple[object, ...]) -> Handoff:
    check_arity("H", msg, _H_LAYOUT)
    _, _, origin, seq, client_id, epoch, state = msg
    return Handoff(
        check_str("origin", origin),
        check_uint("seq", seq),
        check_str("client_id", client_id),
        check_uint("epoch", epoch),
        None if state is None else _check_session(state),
    )


def _unpack_sync_marker(msg: tuple[object, ...]) -> SyncMarker:
    check_arity("Y", msg, _Y_LAYOUT)
    _, _, origin, seq, token = msg
    if type(token) is not bytes:
        raise bad("token", "binary", token)
    return SyncMarker(check_str("origin", origin), check_uint("seq", seq), token)


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
    raise EnvelopeError(f"envelope of unknown kind {show(kind)}")


# --------------------------------------------------------------------------------------------
# Unpacking: control frames


def unpack_control(frame: bytes) -> Control:
    """The value of one control frame; checks version, kind, req_id and body length."""
    msg = _unpack(frame, "control frame")
    kind = msg[1]
    if type(kind) is not str or (arity := CONTROL_KINDS.get(kind)) is None:
        raise EnvelopeError(f"control frame of unknown kind {show(kind)}")
    if len(msg) < 3:
        raise EnvelopeError(f"control {kind!r} has no req_id")
    req_id = msg[2]
    if type(req_id) is not int or req_id < 0:
        raise bad(f"control {kind!r}: req_id", "an unsigned integer", req_id)
    body = msg[3:]
    if len(body) != arity:
        raise EnvelopeError(f"control {kind!r} has {len(body)} body fields, expected {arity}")
    return Control(kind, req_id, body)
