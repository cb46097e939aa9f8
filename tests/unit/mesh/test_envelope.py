"""The mesh wire format (`mesh/envelope.py` against `mesh/PROTOCOL.md`).

Round trips of every data kind and control kind (pack, then unpack, gives the value back), the
exact byte layout PROTOCOL.md specifies (arrays, version first, kind second; a few envelopes
pinned byte for byte), and malformed input of every sort: whatever comes in, `unpack_data` and
`unpack_control` either return a well-typed value or raise `EnvelopeError`, never another
exception.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.envelope import (
    CH_RETAINED,
    CH_SHARED,
    CH_SYNC,
    CONTROL_KINDS,
    VERSION,
    Control,
    DataMessage,
    Directed,
    EnvelopeError,
    Handoff,
    InflightWire,
    Item,
    Props,
    PublishBatch,
    QueuedWire,
    SessionWire,
    SharedUpdate,
    SubscriptionWire,
    SyncMarker,
    inbox,
    pack_control,
    pack_directed,
    pack_handoff,
    pack_publish_batch,
    pack_shared_update,
    pack_sync,
    unpack_control,
    unpack_data,
)
from mesh.errors import MeshError

pytestmark = pytest.mark.timeout(60)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_SUB_ID = 268_435_455
U64 = 2**64 - 1

# --------------------------------------------------------------------------------------------
# Strategies: only valid values.

texts = st.text(max_size=12)
topics = st.text(min_size=1, max_size=12)
u64s = st.integers(0, U64)
qoss = st.integers(0, 2)
sub_idss = st.lists(st.integers(1, MAX_SUB_ID), max_size=3).map(tuple)
packet_ids = st.integers(1, 0xFFFF)

props: st.SearchStrategy[Props] = st.tuples(
    st.none() | st.integers(0, 1),
    st.none() | texts,
    st.none() | texts,
    st.none() | st.binary(max_size=8),
    st.lists(st.tuples(texts, texts), max_size=3).map(tuple),
)
items: st.SearchStrategy[Item] = st.tuples(
    qoss,
    st.booleans(),
    st.binary(max_size=64),
    texts,
    st.none() | props,
    st.none() | st.integers(-(2**63), U64),
    st.integers(0, U64),
)
subscriptions: st.SearchStrategy[SubscriptionWire] = st.tuples(
    topics,
    topics,
    qoss,
    st.booleans(),
    st.booleans(),
    qoss,
    st.none() | st.integers(1, MAX_SUB_ID),
    st.none() | topics,
)
inflights: st.SearchStrategy[InflightWire] = st.tuples(
    packet_ids, st.integers(1, 3), st.integers(1, 2), st.booleans(), sub_idss, topics, items
)
queued: st.SearchStrategy[QueuedWire] = st.tuples(qoss, st.booleans(), sub_idss, topics, items)
sessions = st.builds(
    SessionWire,
    expiry_s=st.integers(0, 0xFFFFFFFF),
    subscriptions=st.lists(subscriptions, max_size=3).map(tuple),
    inflight=st.lists(inflights, max_size=3, unique_by=lambda entry: entry[0]).map(tuple),
    queue=st.lists(queued, max_size=3).map(tuple),
    inbound_qos2=st.lists(packet_ids, max_size=3, unique=True).map(tuple),
    next_packet_id=packet_ids,
)

publish_batches = st.builds(
    PublishBatch,
    origin=texts,
    seq=u64s,
    topic=topics,
    items=st.lists(items, min_size=1, max_size=5).map(tuple),
)
directeds = st.builds(
    Directed,
    origin=texts,
    seq=u64s,
    client_id=texts,
    qos=qoss,
    retain=st.booleans(),
    sub_ids=sub_idss,
    topic=topics,
    item=items,
)
shared_updates = st.builds(
    SharedUpdate,
    origin=texts,
    seq=u64s,
    op=st.sampled_from(["+", "-"]),
    group=topics,
    topic_filter=topics,
    client_id=texts,
    qos=qoss,
    sub_id=st.none() | st.integers(1, MAX_SUB_ID),
)
handoffs = st.builds(Handoff, origin=texts, seq=u64s, client_id=texts, epoch=u64s, state=st.none() | sessions)
sync_markers = st.builds(SyncMarker, origin=texts, seq=u64s, token=st.binary(max_size=12))
data_messages: st.SearchStrategy[DataMessage] = st.one_of(
    publish_batches, directeds, shared_updates, handoffs, sync_markers
)


def pack(msg: DataMessage) -> bytes:
    match msg:
        case PublishBatch():
            return pack_publish_batch(msg.origin, msg.seq, msg.topic, msg.items)
        case Directed():
            return pack_directed(
                msg.origin, msg.seq, msg.client_id, msg.qos, msg.retain, msg.sub_ids, msg.topic, msg.item
            )
        case SharedUpdate():
            return pack_shared_update(
                msg.origin, msg.seq, msg.op, msg.group, msg.topic_filter, msg.client_id, msg.qos, msg.sub_id
            )
        case Handoff():
            return pack_handoff(msg.origin, msg.seq, msg.client_id, msg.epoch, msg.state)
        case SyncMarker():
            return pack_sync(msg.origin, msg.seq, msg.token)


def expected_array(msg: DataMessage) -> tuple[object, ...]:
    """The envelope as PROTOCOL.md writes it, field by field."""
    match msg:
        case PublishBatch():
            return (1, "P", msg.origin, msg.seq, msg.topic, msg.items)
        case Directed():
            return (
                1,
                "D",
                msg.origin,
                msg.seq,
                msg.client_id,
                msg.qos,
                msg.retain,
                msg.sub_ids,
                msg.topic,
                msg.item,
            )
        case SharedUpdate():
            return (
                1,
                "S",
                msg.origin,
                msg.seq,
                msg.op,
                msg.group,
                msg.topic_filter,
                msg.client_id,
                msg.qos,
                msg.sub_id,
            )
        case Handoff():
            s = msg.state
            state = (
                None
                if s is None
                else (s.expiry_s, s.subscriptions, s.inflight, s.queue, s.inbound_qos2, s.next_packet_id)
            )
            return (1, "H", msg.origin, msg.seq, msg.client_id, msg.epoch, state)
        case SyncMarker():
            return (1, "Y", msg.origin, msg.seq, msg.token)


def raw(*fields: object) -> bytes:
    """Any msgpack array, valid or not."""
    return bytes(msgpack.packb(list(fields)))


def assert_rejected(envelope: bytes, *words: str) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        unpack_data(envelope)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    return info.value


ITEM: Item = (1, False, b"payload", "pub", None, None, 0)
PROPS: Props = (1, "text/plain", "reply/to", b"corr", (("k", "v"), ("k", "v2")))
SESSION = SessionWire(
    expiry_s=3600,
    subscriptions=(
        ("$share/g/a/+", "a/+", 1, False, False, 0, 7, "g"),
        ("b/#", "b/#", 2, True, True, 2, None, None),
    ),
    inflight=((5, 1, 1, False, (7,), "a/x", ITEM), (6, 3, 2, True, (), "b/y", ITEM)),
    queue=((0, False, (), "b/z", ITEM),),
    inbound_qos2=(9, 10),
    next_packet_id=7,
)


# --------------------------------------------------------------------------------------------
# Round trips and layout


@FUZZ
@given(data_messages)
def test_data_round_trip(msg: DataMessage) -> None:
    assert unpack_data(pack(msg)) == msg


@FUZZ
@given(data_messages)
def test_data_layout_is_the_protocol_md_array(msg: DataMessage) -> None:
    assert msgpack.unpackb(pack(msg), use_list=False, raw=False) == expected_array(msg)


def test_examples_round_trip() -> None:
    for msg in (
        PublishBatch(
            "w1",
            0,
            "a/b",
            (ITEM, (0, True, b"", "", PROPS, 60_000, 7), (2, False, b"\x00", "c", None, -5, 2**63)),
        ),
        Directed("w2", U64, "sub", 1, True, (1, MAX_SUB_ID), "a/b", (1, True, b"x", "pub", PROPS, 0, 1)),
        SharedUpdate("w3", 4, "+", "grp", "a/#", "c1", 2, None),
        SharedUpdate("w3", 5, "-", "grp", "a/#", "c1", 0, 9),
        Handoff("w1", 6, "c1", 42, None),
        Handoff("w1", 7, "c1", 43, SESSION),
        SyncMarker("w2", 8, b"2.8"),
    ):
        assert unpack_data(pack(msg)) == msg


def test_bytes_are_exactly_the_protocol() -> None:
    # [1, "P", "w1", 0, "a", [[0, false, bin "x", "c", nil, nil, 0]]]
    assert pack_publish_batch("w1", 0, "a", [(0, False, b"x", "c", None, None, 0)]) == (
        b"\x96\x01\xa1P\xa2w1\x00\xa1a\x91\x97\x00\xc2\xc4\x01x\xa1c\xc0\xc0\x00"
    )
    # [1, "hb", 7, 2, 10]
    assert pack_control("hb", 7, 2, 10) == b"\x95\x01\xa2hb\x07\x02\x0a"
    # [1, "H", "w2", 1, "c", 3, nil]
    assert pack_handoff("w2", 1, "c", 3, None) == b"\x97\x01\xa1H\xa2w2\x01\xa1c\x03\xc0"


def test_lists_pack_like_tuples() -> None:
    as_list = pack_publish_batch("w1", 1, "t", [list(ITEM)])  # type: ignore[list-item]
    assert as_list == pack_publish_batch("w1", 1, "t", (ITEM,))
    assert unpack_data(as_list) == PublishBatch("w1", 1, "t", (ITEM,))


def test_channels() -> None:
    assert CH_RETAINED == b"\x00R"
    assert CH_SHARED == b"\x00S"
    assert CH_SYNC == b"\x00Y"
    assert inbox(0) == b"\x00W0/"
    assert inbox(12) == b"\x00W12/"
    assert not inbox(12).startswith(inbox(1))  # ZeroMQ prefix matching keeps inboxes apart
    assert VERSION == 1


def test_errors_share_the_package_base() -> None:
    assert issubclass(EnvelopeError, MeshError)


# --------------------------------------------------------------------------------------------
# Control frames

control_leaves = st.none() | st.booleans() | st.integers(-(2**63), U64) | texts | st.binary(max_size=8)
control_values = st.recursive(control_leaves, lambda c: st.lists(c, max_size=3).map(tuple), max_leaves=8)


@st.composite
def controls(draw: st.DrawFn) -> Control:
    kind = draw(st.sampled_from(sorted(CONTROL_KINDS)))
    body = tuple(draw(control_values) for _ in range(CONTROL_KINDS[kind]))
    return Control(kind, draw(u64s), body)


@FUZZ
@given(controls())
def test_control_round_trip(control: Control) -> None:
    frame = pack_control(control.kind, control.req_id, *control.body)
    assert msgpack.unpackb(frame, use_list=False, raw=False) == (
        1,
        control.kind,
        control.req_id,
        *control.body,
    )
    assert unpack_control(frame) == control


def test_control_examples() -> None:
    assert unpack_control(pack_control("hello", 1, 3, 2, 4242)) == Control("hello", 1, (3, 2, 4242))
    assert unpack_control(pack_control("claimed", 9, "c1", 17, None, False)) == Control(
        "claimed", 9, ("c1", 17, None, False)
    )
    assert unpack_control(pack_control("snapshot", 2)) == Control("snapshot", 2, ())
    assert unpack_control(pack_control("bye", 3, 4)) == Control("bye", 3, (4,))
    snap = unpack_control(pack_control("snap", 5, {"w1": 10, "relay": 3}, (("a/b", ITEM),), ()))
    assert snap == Control("snap", 5, ({"w1": 10, "relay": 3}, (("a/b", ITEM),), ()))


def test_control_kinds_table() -> None:
    assert dict(CONTROL_KINDS) == {
        "hello": 3,
        "hb": 2,
        "claim": 2,
        "claimed": 4,
        "release": 4,
        "unregister": 2,
        "snapshot": 0,
        "snap": 3,
        "bye": 1,
        "sync": 1,
        "seen": 2,
        "synced": 1,
        "dead": 1,
        "route": 2,
        "released": 2,
        "deadnode": 1,
        "reassert": 0,
        "resync": 0,
        "rescan": 0,
        "register": 2,
        "stats": 3,
        "minority": 2,
        "minorityops": 3,
        # the store plane
        "save": 1,
        "ok": 0,
        "drop": 1,
        "online": 4,
        "enqueue": 2,
        "retain": 3,
        "durable": 0,
        "refused": 1,
        "ack": 2,
        "load": 1,
        "loaded": 2,
        "failed": 1,
        "dsnap": 0,
        "dsubs": 1,
        "dsub": 2,
        "recover": 1,
        "wills": 1,
        "rsnap": 0,
        "sinfo": 1,
        "sessinfo": 1,
        "sstats": 0,
        "sstate": 1,
        "rstate": 1,
        "auth": 0,
        "authtable": 3,
        "uput": 3,
        "udel": 1,
        "aadd": 3,
        "adel": 1,
        "done": 2,
    }
    with pytest.raises(TypeError):
        CONTROL_KINDS["new"] = 1  # type: ignore[index]


def test_pack_control_rejects_unknown_kind_and_wrong_arity() -> None:
    with pytest.raises(EnvelopeError, match="unknown control kind"):
        pack_control("nope", 1)
    with pytest.raises(EnvelopeError, match="takes 2 body fields, got 1"):
        pack_control("hb", 1, 2)
    with pytest.raises(EnvelopeError, match="takes 0 body fields, got 1"):
        pack_control("snapshot", 1, None)


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (raw(2, "hb", 1, 2, 3), ["version 2"]),
        (raw(True, "hb", 1, 2, 3), ["version True"]),
        (raw("1", "hb", 1, 2, 3), ["version '1'"]),
        (raw(1, "P", 1), ["unknown kind 'P'"]),
        (raw(1, "HB", 1, 2, 3), ["unknown kind"]),
        (raw(1, 5, 1, 2, 3), ["unknown kind 5"]),
        (raw(1, "hb"), ["no req_id"]),
        (raw(1, "hb", 1, 2), ["1 body fields, expected 2"]),
        (raw(1, "hb", 1, 2, 3, 4), ["3 body fields, expected 2"]),
        (raw(1, "snapshot", 1, None), ["1 body fields, expected 0"]),
        (raw(1, "hb", -1, 2, 3), ["req_id"]),
        (raw(1, "hb", True, 2, 3), ["req_id"]),
        (raw(1, "hb", "1", 2, 3), ["req_id"]),
        (bytes(msgpack.packb({"kind": "hb"})), ["msgpack array"]),
        (raw(1), ["[version, kind, ...]"]),
        (b"", ["not one msgpack value"]),
        (raw(1, "hb", 1, 2, 3) + b"\x00", ["not one msgpack value"]),
    ],
)
def test_unpack_control_rejects(frame: bytes, words: list[str]) -> None:
    with pytest.raises(EnvelopeError) as info:
        unpack_control(frame)
    for word in words:
        assert word in str(info.value)


# --------------------------------------------------------------------------------------------
# Malformed data envelopes: each rejected with a message that says what is wrong


def test_wrong_version() -> None:
    good = list(msgpack.unpackb(pack_publish_batch("w1", 1, "t", [ITEM])))
    for version in (0, 2, 255, U64, -1, True, "1", 1.0, None):
        assert_rejected(raw(version, *good[1:]), "version")


def test_unknown_kind() -> None:
    for kind in ("X", "p", "PP", "", 80, None, b"P", ("P",)):
        assert_rejected(raw(1, kind, "w1", 1, "t", [ITEM]), "unknown kind")
    # control kinds are not data kinds
    assert_rejected(raw(1, "hb", 1, 2, 3), "unknown kind")


def test_not_an_array() -> None:
    assert_rejected(bytes(msgpack.packb({"v": 1, "kind": "P"})), "msgpack array")
    assert_rejected(bytes(msgpack.packb({1: 2})), "not one msgpack value")  # strict_map_key
    assert_rejected(bytes(msgpack.packb("P")), "msgpack array")
    assert_rejected(bytes(msgpack.packb(1)), "msgpack array")
    assert_rejected(raw(1), "[version, kind, ...]")
    assert_rejected(raw(), "[version, kind, ...]")


def test_not_msgpack() -> None:
    for frame in (
        b"",
        b"\xc1",
        b"\x96\x01",
        b"\xdd\xff\xff\xff\xff",
        pack(PublishBatch("w", 1, "t", (ITEM,))) + b"x",
    ):
        assert_rejected(frame, "not one msgpack value")
    assert_rejected(b"\x92\x01\xa2\xff\xfe", "not one msgpack value")  # invalid UTF-8 in a str


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ((1, "P", "w1", 1, "t"), ["5 fields, expected 6"]),
        ((1, "P", "w1", 1, "t", [ITEM], None), ["7 fields, expected 6"]),
        ((1, "D", "w1", 1, "c", 1, False, [], "t"), ["9 fields, expected 10"]),
        ((1, "S", "w1", 1, "+", "g", "f", "c", 1), ["9 fields, expected 10"]),
        ((1, "H", "w1", 1, "c", 1, None, None), ["8 fields, expected 7"]),
        ((1, "Y", "w1", 1), ["4 fields, expected 5"]),
    ],
)
def test_wrong_arity(fields: tuple[object, ...], words: list[str]) -> None:
    assert_rejected(raw(*fields), *words)


def test_publish_batch_fields() -> None:
    assert_rejected(raw(1, "P", 3, 1, "t", [ITEM]), "origin")
    assert_rejected(raw(1, "P", "w1", -1, "t", [ITEM]), "seq")
    assert_rejected(raw(1, "P", "w1", -(2**63), "t", [ITEM]), "seq")
    assert_rejected(raw(1, "P", "w1", True, "t", [ITEM]), "seq")
    assert_rejected(raw(1, "P", "w1", 1.5, "t", [ITEM]), "seq")
    assert_rejected(raw(1, "P", "w1", 1, "", [ITEM]), "topic", "[MQTT-4.7.3-1]")
    assert_rejected(raw(1, "P", "w1", 1, b"t", [ITEM]), "topic")
    assert_rejected(raw(1, "P", "w1", 1, "t", []), "items", "non-empty")
    assert_rejected(raw(1, "P", "w1", 1, "t", ITEM), "items[0]")
    assert_rejected(raw(1, "P", "w1", 1, "t", {"a": ITEM}), "items")


BAD_ITEM_FIELDS: list[tuple[int, object, str]] = [
    (0, 3, "qos"),  # [MQTT-3.3.1-4]
    (0, -1, "qos"),
    (0, U64, "qos"),
    (0, True, "qos"),  # a bool is not QoS 1
    (0, "1", "qos"),
    (0, None, "qos"),
    (1, 0, "retain"),
    (1, None, "retain"),
    (2, "text", "payload"),
    (2, None, "payload"),
    (2, [1, 2], "payload"),
    (3, b"cid", "client_id"),
    (3, None, "client_id"),
    (4, [], "props"),
    (4, "props", "props"),
    (4, {"a": 1}, "props"),
    (4, (2, None, None, None, ()), "payload_format"),
    (4, (True, None, None, None, ()), "payload_format"),
    (4, (None, b"ct", None, None, ()), "content_type"),
    (4, (None, None, b"rt", None, ()), "response_topic"),
    (4, (None, None, None, "corr", ()), "correlation_data"),
    (4, (None, None, None, None, None), "user_properties"),
    (4, (None, None, None, None, (("k",),)), "user_properties[0]"),
    (4, (None, None, None, None, (("k", "v"), ("k", b"v"))), "user_properties[1]"),
    (4, (None, None, None, None, ("kv",)), "user_properties[0]"),
    (4, (None, None, None, None, (), None), "props"),
    (5, 1.5, "expiry_ms"),
    (5, "60", "expiry_ms"),
    (5, False, "expiry_ms"),
    (6, -1, "msg_id"),
    (6, None, "msg_id"),
    (6, True, "msg_id"),
]


@pytest.mark.parametrize(("index", "value", "word"), BAD_ITEM_FIELDS)
def test_bad_item_field_in_every_kind_that_carries_items(index: int, value: object, word: str) -> None:
    bad: list[object] = list(ITEM)
    bad[index] = value
    assert_rejected(raw(1, "P", "w1", 1, "t", [ITEM, bad]), "items[1]", word)
    assert_rejected(raw(1, "D", "w1", 1, "c", 1, False, [], "t", bad), "item", word)
    state = list(msgpack.unpackb(msgpack.packb(pack_handoff_state(SESSION))))
    state[3] = [[0, False, [], "t", bad]]
    assert_rejected(raw(1, "H", "w1", 1, "c", 1, state), "state.queue[0]", word)


def pack_handoff_state(s: SessionWire) -> list[object]:
    return [s.expiry_s, s.subscriptions, s.inflight, s.queue, s.inbound_qos2, s.next_packet_id]


def test_item_of_wrong_length() -> None:
    assert_rejected(raw(1, "P", "w1", 1, "t", [ITEM[:5]]), "items[0]")
    assert_rejected(raw(1, "P", "w1", 1, "t", [(*ITEM, None)]), "items[0]")
    assert_rejected(raw(1, "P", "w1", 1, "t", [None]), "items[0]")


def test_directed_fields() -> None:
    good: list[Any] = [1, "D", "w1", 1, "c", 1, False, [3], "t", ITEM]
    for index, value, word in [
        (2, None, "origin"),
        (3, -1, "seq"),
        (4, 7, "client_id"),
        (5, 3, "qos"),
        (5, True, "qos"),
        (6, 1, "retain"),
        (7, None, "sub_ids"),
        (7, [0], "sub_ids[0]"),  # 0 is not a subscription identifier (MQTT 5 §3.8.2.1.2)
        (7, [1, MAX_SUB_ID + 1], "sub_ids[1]"),
        (7, [True], "sub_ids[0]"),
        (8, "", "topic"),
        (9, None, "item"),
    ]:
        bad = list(good)
        bad[index] = value
        assert_rejected(raw(*bad), "'D' envelope", word)


def test_shared_update_fields() -> None:
    good: list[Any] = [1, "S", "w1", 1, "+", "g", "a/#", "c", 1, None]
    assert unpack_data(raw(*good)) == SharedUpdate("w1", 1, "+", "g", "a/#", "c", 1, None)
    for index, value, word in [
        (4, "*", "op"),
        (4, None, "op"),
        (5, "", "[MQTT-4.8.2-1]"),
        (5, None, "group"),
        (6, "", "filter"),
        (7, None, "client_id"),
        (8, 3, "qos"),
        (9, 0, "sub_id"),
        (9, "1", "sub_id"),
    ]:
        bad = list(good)
        bad[index] = value
        assert_rejected(raw(*bad), "'S' envelope", word)


def test_handoff_fields() -> None:
    good: list[Any] = [1, "H", "w1", 1, "c", 5, None]
    assert unpack_data(raw(*good)) == Handoff("w1", 1, "c", 5, None)
    mutations: list[tuple[int, object, str]] = [
        (4, None, "client_id"),
        (5, -1, "epoch"),
        (5, "5", "epoch"),
        (6, [], "state"),
    ]
    for index, value, word in mutations:
        bad = list(good)
        bad[index] = value
        assert_rejected(raw(*bad), "'H' envelope", word)


SESSION_MUTATIONS: list[tuple[tuple[int, ...], object, str]] = [
    ((0,), -1, "expiry_s"),
    ((0,), None, "expiry_s"),
    ((1,), None, "subscriptions"),
    ((1, 0), ("a",), "subscriptions[0]"),
    ((1, 1, 0), "", "key_filter"),
    ((1, 1, 1), None, "topic_filter"),
    ((1, 1, 2), 3, "qos"),
    ((1, 1, 3), 0, "no_local"),
    ((1, 1, 4), None, "rap"),
    ((1, 1, 5), 3, "rh"),
    ((1, 1, 6), 0, "sub_id"),
    ((1, 1, 7), "", "[MQTT-4.8.2-1]"),
    ((2, 0, 0), 0, "[MQTT-2.2.1-3]"),  # packet id 0
    ((2, 0, 0), 0x10000, "packet_id"),
    ((2, 0, 1), 4, "state"),
    ((2, 0, 1), 0, "state"),
    ((2, 0, 2), 0, "QoS 0 is never in flight"),
    ((2, 0, 3), None, "retain"),
    ((2, 0, 4), [0], "sub_ids[0]"),
    ((2, 0, 5), "", "topic"),
    ((2, 0, 6), None, "item"),
    ((2, 1, 0), 5, "distinct packet ids"),  # the same id twice in flight
    ((3, 0, 0), 3, "qos"),
    ((3, 0), (), "queue[0]"),
    ((4,), [9, 9], "distinct packet ids"),
    ((4,), [0], "inbound_qos2[0]"),
    ((4,), [1, 65536], "inbound_qos2[1]"),
    ((5,), 0, "next_packet_id"),
    ((5,), 65536, "next_packet_id"),
]


def set_path(value: Any, path: tuple[int, ...], new: object) -> Any:
    if not path:
        return new
    as_list = list(value)
    as_list[path[0]] = set_path(as_list[path[0]], path[1:], new)
    return as_list


@pytest.mark.parametrize(("path", "value", "word"), SESSION_MUTATIONS)
def test_bad_session_state(path: tuple[int, ...], value: object, word: str) -> None:
    state = msgpack.unpackb(msgpack.packb(pack_handoff_state(SESSION)), use_list=False)
    assert_rejected(
        raw(1, "H", "w1", 1, "c", 5, set_path(state, path, value)), "'H' envelope", "state.", word
    )


def test_sync_marker_fields() -> None:
    assert unpack_data(raw(1, "Y", "w1", 1, b"")) == SyncMarker("w1", 1, b"")
    assert_rejected(raw(1, "Y", "w1", 1, "2.8"), "'Y' envelope", "token")
    assert_rejected(raw(1, "Y", "w1", -1, b"t"), "'Y' envelope", "seq")
    assert_rejected(raw(1, "Y", None, 1, b"t"), "'Y' envelope", "origin")


def test_huge_and_negative_integers_anywhere() -> None:
    for value in (U64, -(2**63), 2**32, -1):
        assert_rejected(raw(1, "P", "w1", 1, "t", [[value, False, b"", "", None, None]]), "qos")
        assert_rejected(raw(1, "S", "w1", 1, "+", "g", "f", "c", value, None), "qos")
        assert_rejected(raw(1, "H", "w1", 1, "c", 1, [0, [], [], [], [], value]), "next_packet_id")
    # full-range uint64 where the protocol says uint64
    assert unpack_data(raw(1, "P", "w1", U64, "t", [ITEM])) == PublishBatch("w1", U64, "t", (ITEM,))
    assert unpack_data(raw(1, "H", "w1", 1, "c", U64, None)) == Handoff("w1", 1, "c", U64, None)


def test_message_names_the_bad_item_and_is_bounded() -> None:
    error = assert_rejected(
        raw(1, "P", "w1", 1, "t", [ITEM, ITEM, [1, False, "x" * 10_000, "", None, None, 0]])
    )
    text = str(error)
    assert text.startswith("'P' envelope: items[2]: item.payload: expected binary")
    assert len(text) < 300


# --------------------------------------------------------------------------------------------
# Pack side


def test_pack_rejects_what_msgpack_cannot_carry() -> None:
    with pytest.raises(EnvelopeError, match="needs at least one item"):
        pack_publish_batch("w1", 1, "t", [])
    with pytest.raises(EnvelopeError, match="cannot pack"):
        pack_publish_batch("w1", 2**64, "t", [ITEM])
    with pytest.raises(EnvelopeError, match="cannot pack"):
        pack_publish_batch("w1", 1, "t\ud800", [ITEM])  # a lone surrogate is not UTF-8
    with pytest.raises(EnvelopeError, match="cannot pack"):
        pack_publish_batch("w1", 1, "t", [(1, False, object(), "c", None, None, 0)])  # type: ignore[list-item]
    with pytest.raises(EnvelopeError, match="cannot pack"):
        pack_directed("w1", 1, "c", 1, False, (), "t", (1, False, b"", "c", None, -(2**64)))
    with pytest.raises(EnvelopeError, match="cannot pack"):
        pack_shared_update("w1", 1, "+", "g", "f", "c", 1, 2**70)
    with pytest.raises(EnvelopeError, match="cannot pack"):
        pack_handoff("w1", 1, "c", -(2**64), None)
    with pytest.raises(EnvelopeError, match="cannot pack"):
        pack_control("hb", 1, 2, {1.5j})


# --------------------------------------------------------------------------------------------
# Fuzz: only EnvelopeError ever comes out


def unpack_either(frame: bytes) -> None:
    """Both decoders: a typed value or EnvelopeError; any other exception fails the test."""
    try:
        msg = unpack_data(frame)
    except EnvelopeError:
        pass
    else:
        assert isinstance(msg, PublishBatch | Directed | SharedUpdate | Handoff | SyncMarker)
        assert unpack_data(pack(msg)) == msg  # what was accepted is well-typed enough to re-pack
    try:
        control = unpack_control(frame)
    except EnvelopeError:
        pass
    else:
        assert control.kind in CONTROL_KINDS
        assert len(control.body) == CONTROL_KINDS[control.kind]


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(frame: bytes) -> None:
    unpack_either(frame)


@FUZZ
@given(st.binary(max_size=60))
def test_random_bytes_behind_a_valid_head(tail: bytes) -> None:
    for head in (
        b"\x96\x01\xa1P",
        b"\x9a\x01\xa1D",
        b"\x9a\x01\xa1S",
        b"\x97\x01\xa1H",
        b"\x95\x01\xa1Y",
        b"\x95\x01\xa2hb",
    ):
        unpack_either(head + tail)


any_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), U64)
    | st.sampled_from([0, 1, 2, 3, -1, 0xFFFF, 0x10000, MAX_SUB_ID])
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.binary(max_size=6)
)
any_values = st.recursive(
    any_leaves,
    lambda c: st.lists(c, max_size=7) | st.dictionaries(st.text(max_size=3), c, max_size=2),
    max_leaves=30,
)
any_kinds = st.sampled_from(["P", "D", "S", "H", "Y", "X", *CONTROL_KINDS]) | any_leaves


@FUZZ
@given(any_kinds, st.lists(any_values, max_size=11))
def test_arbitrary_trees_with_a_valid_version(kind: object, fields: list[object]) -> None:
    unpack_either(raw(1, kind, *fields))


@FUZZ
@given(data_messages, st.data())
def test_mutated_valid_envelopes(msg: DataMessage, data: st.DataObject) -> None:
    frame = bytearray(pack(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del frame[at:]
        else:
            frame[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    unpack_either(bytes(frame))


@FUZZ
@given(data_messages, st.data())
def test_replaced_subtrees_of_valid_envelopes(msg: DataMessage, data: st.DataObject) -> None:
    """Swap one node of a valid envelope's tree for an arbitrary value: deep type checks."""
    tree: Any = msgpack.unpackb(pack(msg), use_list=False)
    path: list[int] = []
    node = tree
    while isinstance(node, tuple) and node and data.draw(st.booleans()):
        index = data.draw(st.integers(0, len(node) - 1))
        path.append(index)
        node = node[index]
    unpack_either(bytes(msgpack.packb(set_path(tree, tuple(path), data.draw(any_values)))))
