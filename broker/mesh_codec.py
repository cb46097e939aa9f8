"""Broker values in the mesh's wire forms: a Message as an envelope item, a Session as a hand-off.

Why: `mesh/envelope.py` owns the bytes and knows nothing of the broker (imports run broker →
mesh); this module is the one place that maps the broker's own values onto those wire tuples and
back, so the rest of the worker never builds a tuple by position.

Must not: do IO; read the clock (times are relative on the wire and absolute in the broker,
converted with the `now` given).

Invariants: `item_to_message(topic, message_to_item(m, now), now)` equals `m` in every field a
subscriber can see; a session survives `session_from_wire(session_to_wire(s))` with its
subscriptions, in-flight window (packet ids and states), queue order and QoS 2 receive state.
"""

from __future__ import annotations

from broker.messages import Message
from broker.protocol.packets import NO_PROPERTIES, Properties
from broker.session import Outgoing, OutState, Session, SubEntry
from mesh.envelope import Item, Props, SessionWire

_OUT_STATES = {OutState.AWAITING_PUBACK: 1, OutState.AWAITING_PUBREC: 2, OutState.AWAITING_PUBCOMP: 3}
_OUT_STATE_OF = {v: k for k, v in _OUT_STATES.items()}


def props_to_wire(props: Properties) -> Props | None:
    if props is NO_PROPERTIES:
        return None
    return (
        props.payload_format_indicator,
        props.content_type,
        props.response_topic,
        props.correlation_data,
        props.user_properties,
    )


def props_from_wire(props: Props | None) -> Properties:
    if props is None:
        return NO_PROPERTIES
    return Properties(
        payload_format_indicator=props[0],
        content_type=props[1],
        response_topic=props[2],
        correlation_data=props[3],
        user_properties=props[4],
    )


def message_to_item(message: Message, now: float) -> Item:
    expires_at = message.expires_at
    expiry_ms = None if expires_at is None else max(int((expires_at - now) * 1000), 0)
    props = message.properties
    return (
        message.qos,
        message.retain,
        message.payload,
        message.origin,
        None if props is NO_PROPERTIES else props_to_wire(props),
        expiry_ms,
        message.msg_id,
    )


def item_to_message(topic: str, item: Item, now: float) -> Message:
    qos, retain, payload, origin, props, expiry_ms, msg_id = item
    properties = NO_PROPERTIES if props is None else props_from_wire(props)
    # The Message Expiry Interval itself is recomputed on delivery from expires_at [MQTT-3.3.2-6].
    expires_at = None if expiry_ms is None else now + expiry_ms / 1000
    return Message(topic, payload, qos, retain, properties, origin, expires_at, msg_id)


def _sub_to_wire(
    key_filter: str, e: SubEntry
) -> tuple[str, str, int, bool, bool, int, int | None, str | None]:
    return (
        key_filter,
        e.topic_filter,
        e.qos,
        e.no_local,
        e.retain_as_published,
        e.retain_handling,
        e.subscription_id,
        e.share_group,
    )


def session_to_wire(session: Session, now: float) -> SessionWire:
    return SessionWire(
        expiry_s=session.expiry_interval_s,
        subscriptions=tuple(_sub_to_wire(k, e) for k, e in session.subscriptions.items()),
        inflight=tuple(
            (
                pid,
                _OUT_STATES[o.state],
                o.qos,
                o.retain,
                o.subscription_ids,
                o.message.topic,
                message_to_item(o.message, now),
            )
            for pid, o in session.inflight.items()
        ),
        queue=tuple(
            (o.qos, o.retain, o.subscription_ids, o.message.topic, message_to_item(o.message, now))
            for o in session.queue
        ),
        inbound_qos2=tuple(sorted(session.inbound_qos2)),
        next_packet_id=session.next_packet_id,
    )


def session_from_wire(
    client_id: str, state: SessionWire, worker: int, now: float
) -> tuple[Session, list[tuple[str, SubEntry]]]:
    """A Session with its message state, and its subscriptions for the caller to install."""
    session = Session(client_id, state.expiry_s)
    for pid, out_state, qos, retain, sub_ids, topic, item in state.inflight:
        out = Outgoing(item_to_message(topic, item, now), qos, retain, tuple(sub_ids))
        out.state = _OUT_STATE_OF.get(out_state, OutState.AWAITING_PUBACK)
        session.inflight[pid] = out
    for qos, retain, sub_ids, topic, item in state.queue:
        session.queue.append(Outgoing(item_to_message(topic, item, now), qos, retain, tuple(sub_ids)))
    session.inbound_qos2 = set(state.inbound_qos2)
    session.next_packet_id = state.next_packet_id if 1 <= state.next_packet_id <= 0xFFFF else 1
    subs = [
        (key, SubEntry(client_id, topic_filter, qos, no_local, rap, rh, sub_id, group, worker))
        for key, topic_filter, qos, no_local, rap, rh, sub_id, group in state.subscriptions
    ]
    return session, subs
