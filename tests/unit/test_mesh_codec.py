"""Broker values in the mesh's wire forms (`broker/mesh_codec.py`).

What is pinned: a Message survives `message_to_item` / `item_to_message` in every field a
subscriber can see (topic, payload, QoS, retain, the five carried properties, origin, the
remaining expiry, the store's message id); a Session survives `session_to_wire` /
`session_from_wire` — also through the real hand-off envelope — with its subscriptions (shared
ones included), its in-flight window (packet ids and states), its queue order and its QoS 2
receive state.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.mesh_codec import (
    item_to_message,
    message_to_item,
    props_from_wire,
    props_to_wire,
    session_from_wire,
    session_to_wire,
)
from broker.messages import Message
from broker.protocol.packets import NO_PROPERTIES, Properties
from broker.session import Outgoing, OutState, Session, SubEntry
from mesh import envelope as env

pytestmark = pytest.mark.timeout(30)

FULL_PROPS = Properties(
    payload_format_indicator=1,
    content_type="text/plain",
    response_topic="reply/here",
    correlation_data=b"\x00corr\xff",
    user_properties=(("k", "v"), ("k", "v2"), ("a", "")),
)


def visible(message: Message, now: float) -> tuple[object, ...]:
    """What a subscriber can see of a message at `now` (the expiry as sent on delivery)."""
    p = message.properties
    return (
        message.topic,
        message.payload,
        message.qos,
        message.retain,
        message.origin,
        message.msg_id,
        p.payload_format_indicator,
        p.content_type,
        p.response_topic,
        p.correlation_data,
        p.user_properties,
        message.remaining_expiry_s(now),
    )


# -- messages -------------------------------------------------------------------------------------


def test_message_round_trip_with_every_carried_property() -> None:
    now = 500.0
    m = Message("a/b", b"payload", 2, True, FULL_PROPS, "pub-1", now + 30.0, 12345)
    item = message_to_item(m, now)
    assert item == (2, True, b"payload", "pub-1", props_to_wire(FULL_PROPS), 30_000, 12345)
    back = item_to_message("a/b", item, now)
    assert visible(back, now) == visible(m, now)
    assert back.properties == FULL_PROPS
    assert back.expires_at == pytest.approx(now + 30.0)


def test_message_without_properties_or_expiry() -> None:
    m = Message("t", b"", 0, False)
    item = message_to_item(m, 0.0)
    assert item == (0, False, b"", "", None, None, 0)
    back = item_to_message("t", item, 7.0)
    assert back.properties is NO_PROPERTIES
    assert back.expires_at is None and back.msg_id == 0
    assert visible(back, 7.0) == visible(m, 7.0)


def test_expiry_travels_as_time_left_and_is_rebased_on_the_receivers_clock() -> None:
    """[MQTT-3.3.2-6] the expiry sent on delivery is what is left of the interval."""
    m = Message("t", b"x", 1, False, Properties(message_expiry_interval_s=60), "p", 1000.0 + 60, 0)
    item = message_to_item(m, 1010.0)  # 50 s left when it leaves
    assert item[5] == 50_000
    back = item_to_message("t", item, 3.0)  # another process, another monotonic clock
    assert back.expires_at == pytest.approx(53.0)
    assert back.remaining_expiry_s(3.0) == 50
    assert back.remaining_expiry_s(13.0) == 40


def test_an_expired_message_leaves_with_zero_and_arrives_expired() -> None:
    m = Message("t", b"x", 1, False, NO_PROPERTIES, "p", 10.0, 0)
    item = message_to_item(m, 20.0)
    assert item[5] == 0
    assert item_to_message("t", item, 0.0).expired(0.0)


def test_only_the_five_carried_properties_travel() -> None:
    """The expiry interval is carried by expires_at, not by the properties; a topic alias or a
    subscription identifier is per connection and must not travel."""
    props = Properties(
        payload_format_indicator=0, message_expiry_interval_s=9, topic_alias=3, subscription_identifiers=(4,)
    )
    wire = props_to_wire(props)
    assert wire == (0, None, None, None, ())
    back = props_from_wire(wire)
    assert back.topic_alias is None and back.subscription_identifiers == ()
    assert back.message_expiry_interval_s is None
    assert props_to_wire(NO_PROPERTIES) is None
    assert props_from_wire(None) is NO_PROPERTIES


def test_an_item_packs_into_a_publish_envelope_and_back() -> None:
    now = 1.0
    m = Message("a/b", b"p", 1, True, FULL_PROPS, "pub", now + 2.5, 99)
    data = env.pack_publish_batch("w1", 1, "a/b", (message_to_item(m, now),))
    batch = env.unpack_data(data)
    assert isinstance(batch, env.PublishBatch)
    back = item_to_message(batch.topic, batch.items[0], now)
    assert visible(back, now) == visible(m, now)


texts = st.text(max_size=8)
opt_texts = st.none() | texts
props_strategy = st.builds(
    Properties,
    payload_format_indicator=st.none() | st.sampled_from([0, 1]),
    content_type=opt_texts,
    response_topic=opt_texts,
    correlation_data=st.none() | st.binary(max_size=8),
    user_properties=st.lists(st.tuples(texts, texts), max_size=3).map(tuple),
)


@settings(max_examples=100, deadline=None)
@given(
    topic=st.text(min_size=1, max_size=10),
    payload=st.binary(max_size=20),
    qos=st.sampled_from([0, 1, 2]),
    retain=st.booleans(),
    props=st.none() | props_strategy,
    origin=texts,
    left_ms=st.none() | st.integers(min_value=1, max_value=10**9),
    msg_id=st.integers(min_value=0, max_value=2**63 - 1),
    now=st.floats(min_value=0, max_value=1e6, allow_nan=False),
)
def test_message_round_trip_property(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    props: Properties | None,
    origin: str,
    left_ms: int | None,
    msg_id: int,
    now: float,
) -> None:
    properties = NO_PROPERTIES if props is None else props
    expires_at = None if left_ms is None else now + left_ms / 1000
    m = Message(topic, payload, qos, retain, properties, origin, expires_at, msg_id)
    item = message_to_item(m, now)
    unpacked = env.unpack_data(env.pack_publish_batch("w1", 1, topic, (item,)))
    assert isinstance(unpacked, env.PublishBatch)
    later = now + 3.0  # the receiver's clock reads differently: only time left matters
    back = item_to_message(topic, unpacked.items[0], later)
    assert visible(back, later)[:11] == visible(m, now)[:11]
    if expires_at is None:
        assert back.expires_at is None
    else:
        assert back.expires_at is not None
        # milliseconds on the wire, truncated: at most 1 ms shorter, never longer
        assert -0.0011 <= (back.expires_at - later) - (expires_at - now) <= 1e-6


# -- sessions -------------------------------------------------------------------------------------


def out(
    topic: str,
    payload: bytes,
    qos: int,
    state: OutState | None = None,
    sub_ids: tuple[int, ...] = (),
    msg_id: int = 0,
    expires_at: float | None = None,
    retain: bool = False,
) -> Outgoing:
    o = Outgoing(
        Message(topic, payload, qos, retain, NO_PROPERTIES, "pub", expires_at, msg_id), qos, retain, sub_ids
    )
    if state is not None:
        o.state = state
    return o


def full_session() -> Session:
    s = Session("client-1", 3600)
    s.subscriptions["a/+"] = SubEntry("client-1", "a/+", 1, True, True, 2, 17, None, 1)
    s.subscriptions["$share/g/b/#"] = SubEntry("client-1", "b/#", 2, False, False, 0, None, "g", 1)
    s.subscriptions["c"] = SubEntry("client-1", "c", 0, worker=1)
    s.inflight[7] = out("a/1", b"one", 1, OutState.AWAITING_PUBACK, (17,), msg_id=70)
    s.inflight[8] = out("a/2", b"two", 2, OutState.AWAITING_PUBREC, msg_id=80, retain=True)
    s.inflight[9] = out("a/3", b"three", 2, OutState.AWAITING_PUBCOMP)
    for n in range(5):
        s.queue.append(out(f"q/{n}", str(n).encode(), 1 + n % 2, sub_ids=(n + 1,), msg_id=100 + n))
    s.inbound_qos2 = {300, 5, 42}
    s.next_packet_id = 10
    return s


def check_same_session(
    back: Session, subs: list[tuple[str, SubEntry]], original: Session, worker: int
) -> None:
    assert back.client_id == original.client_id
    assert back.expiry_interval_s == original.expiry_interval_s
    assert [(k, e) for k, e in subs] == [
        (
            k,
            SubEntry(
                e.client_id,
                e.topic_filter,
                e.qos,
                e.no_local,
                e.retain_as_published,
                e.retain_handling,
                e.subscription_id,
                e.share_group,
                worker,
            ),
        )
        for k, e in original.subscriptions.items()
    ]
    assert back.subscriptions == {}  # the caller installs them (topic trees, mesh interest)
    assert list(back.inflight) == list(original.inflight)  # packet ids, in send order
    for pid, item in original.inflight.items():
        got = back.inflight[pid]
        assert (got.state, got.qos, got.retain, got.subscription_ids) == (
            item.state,
            item.qos,
            item.retain,
            item.subscription_ids,
        )
        assert visible(got.message, 0.0) == visible(item.message, 0.0)
    assert [visible(o.message, 0.0) for o in back.queue] == [visible(o.message, 0.0) for o in original.queue]
    assert [(o.qos, o.subscription_ids) for o in back.queue] == [
        (o.qos, o.subscription_ids) for o in original.queue
    ]
    assert back.inbound_qos2 == original.inbound_qos2
    assert back.next_packet_id == original.next_packet_id


def test_session_round_trip() -> None:
    s = full_session()
    wire = session_to_wire(s, 0.0)
    assert wire.inbound_qos2 == (5, 42, 300)
    assert [entry[1] for entry in wire.inflight] == [1, 2, 3]
    back, subs = session_from_wire("client-1", wire, 4, 0.0)
    check_same_session(back, subs, s, worker=4)


def test_session_round_trip_through_the_handoff_envelope() -> None:
    s = full_session()
    data = env.pack_handoff("w1", 9, "client-1", 77, session_to_wire(s, 0.0))
    handoff = env.unpack_data(data)
    assert isinstance(handoff, env.Handoff) and handoff.state is not None
    back, subs = session_from_wire("client-1", handoff.state, 2, 0.0)
    check_same_session(back, subs, s, worker=2)


def test_empty_session_round_trip() -> None:
    s = Session("c", 0)
    wire = session_to_wire(s, 0.0)
    assert wire == env.SessionWire(0, (), (), (), (), 1)
    back, subs = session_from_wire("c", wire, 1, 0.0)
    assert subs == [] and back.inflight == {} and not back.queue and back.inbound_qos2 == set()


def test_session_expiries_are_rebased() -> None:
    s = Session("c", 10)
    s.inflight[1] = out("t", b"x", 1, OutState.AWAITING_PUBACK, expires_at=100.0 + 20)
    s.queue.append(out("t", b"y", 1, expires_at=100.0 + 5))
    wire = session_to_wire(s, 100.0)
    back, _ = session_from_wire("c", wire, 1, 7.0)
    assert back.inflight[1].message.remaining_expiry_s(7.0) == 20
    assert back.queue[0].message.remaining_expiry_s(7.0) == 5


def test_out_of_range_next_packet_id_becomes_one() -> None:
    wire = env.SessionWire(0, (), (), (), (), 0)
    back, _ = session_from_wire("c", wire, 1, 0.0)
    assert back.next_packet_id == 1
    # and the next id handed out skips those in flight [MQTT-2.2.1-3]
    wire = env.SessionWire(0, (), ((1, 1, 1, False, (), "t", (1, False, b"", "", None, None, 0)),), (), (), 1)
    back, _ = session_from_wire("c", wire, 1, 0.0)
    assert back.allocate_packet_id() == 2
