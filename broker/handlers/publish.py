"""PUBLISH from a client and the acknowledgements of both QoS flows.

Why: the inbound half (topic alias, topic checks, QoS and retain limits, QoS 2 duplicate
suppression, receive maximum) and the outbound half (PUBACK / PUBREC / PUBREL / PUBCOMP moving
the in-flight window) are the protocol's core flows [MQTT-4.3].

Must not: do IO or read the clock; decide who receives a message (the core routes).

Invariants: a QoS 2 message is routed once per packet id until PUBREL releases the id
[MQTT-4.3.3-10 area]; the acknowledgement goes out only after routing (later: after the store
says durable).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from broker.handlers.common import is_utf8

from broker.messages import Message
from broker.protocol.connection import ServerConnection
from broker.protocol.errors import MQTTError, ProtocolError, ReceiveMaximumExceeded, TopicAliasInvalid
from broker.protocol.packets import (
    NO_PROPERTIES,
    Packet,
    ProtocolVersion,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
)
from broker.protocol.reasons import Reason
from broker.protocol.topics import validate_topic_name
from broker.session import OutState

if TYPE_CHECKING:
    from broker.core import BrokerCore

V5 = ProtocolVersion.V5
NO_SUBSCRIBERS = Reason.NO_MATCHING_SUBSCRIBERS


def handle_publish(core: BrokerCore, conn: ServerConnection, packet: Packet, now: float) -> None:
    assert isinstance(packet, Publish)
    session = conn.session
    assert session is not None
    qos = packet.qos
    topic = packet.topic
    props = packet.properties
    v5 = conn.version is V5
    if v5 and props is not NO_PROPERTIES:
        alias = props.topic_alias
        if alias is not None:
            if alias == 0 or alias > core.config.max_topic_alias:
                raise TopicAliasInvalid(f"topic alias {alias} outside 1..{core.config.max_topic_alias}")  # [MQTT-3.3.2-8, -9]
            if topic:
                conn.alias_in[alias] = topic
            else:
                found = conn.alias_in.get(alias)
                if found is None:
                    raise ProtocolError(f"topic alias {alias} used before it was set")
                topic = found
        if props.subscription_identifiers:
            raise ProtocolError("PUBLISH from a client carries a subscription identifier [MQTT-3.3.4-6]")
    try:
        validate_topic_name(topic)
    except MQTTError as exc:
        raise MQTTError(str(exc), Reason.TOPIC_NAME_INVALID) from exc
    counters = core.counters
    counters.messages_received += 1
    cfg = core.config
    if qos > cfg.maximum_qos:
        raise MQTTError(f"QoS {qos} above maximum QoS {cfg.maximum_qos}", Reason.QOS_NOT_SUPPORTED)  # [MQTT-3.2.2-11]
    if packet.retain and not cfg.retain_available:
        raise MQTTError("retain not available", Reason.RETAIN_NOT_SUPPORTED)  # [MQTT-3.2.2-14]

    if qos == 2:
        counters.messages_received_qos2 += 1
        if packet.packet_id in session.inbound_qos2:
            conn.send(Pubrec(packet.packet_id))  # a resend: acknowledge again, route once
            return
        if len(session.inbound_qos2) >= cfg.max_inflight:
            raise ReceiveMaximumExceeded(f"more than {cfg.max_inflight} QoS 2 messages unreleased")  # [MQTT-3.3.4-8]
    elif qos == 1:
        counters.messages_received_qos1 += 1
    else:
        counters.messages_received_qos0 += 1

    if v5 and props is not NO_PROPERTIES:
        if props.payload_format_indicator == 1 and not is_utf8(packet.payload):
            if qos:
                ack = Puback if qos == 1 else Pubrec
                conn.send(ack(packet.packet_id, Reason.PAYLOAD_FORMAT_INVALID))
            return
        expiry = props.message_expiry_interval_s
        if props.topic_alias is not None:
            props = replace(props, topic_alias=None)
        message = Message(topic, packet.payload, qos, packet.retain, props, conn.client_id,
                          None if expiry is None else now + expiry)
    else:
        message = Message(topic, packet.payload, qos, packet.retain, NO_PROPERTIES, conn.client_id)

    if packet.retain:
        core.retain(message)
    delivered = core.publish(message, now)
    core.mesh.forward(message)
    if qos == 1:
        conn.send(Puback(packet.packet_id, Reason.SUCCESS if delivered or not v5 else NO_SUBSCRIBERS))
    elif qos == 2:
        session.inbound_qos2.add(packet.packet_id)
        conn.send(Pubrec(packet.packet_id, Reason.SUCCESS if delivered or not v5 else NO_SUBSCRIBERS))


def handle_pubrel(core: BrokerCore, conn: ServerConnection, packet: Packet, now: float) -> None:
    assert isinstance(packet, Pubrel)
    session = conn.session
    assert session is not None
    if packet.packet_id in session.inbound_qos2:
        session.inbound_qos2.discard(packet.packet_id)
        conn.send(Pubcomp(packet.packet_id))
    else:
        conn.send(Pubcomp(packet.packet_id, Reason.PACKET_IDENTIFIER_NOT_FOUND))


def handle_puback(core: BrokerCore, conn: ServerConnection, packet: Packet, now: float) -> None:
    assert isinstance(packet, Puback)
    session = conn.session
    assert session is not None
    item = session.inflight.get(packet.packet_id)
    if item is not None and item.state is OutState.AWAITING_PUBACK:
        del session.inflight[packet.packet_id]
        if session.queue:
            core.pump(session, now)


def handle_pubrec(core: BrokerCore, conn: ServerConnection, packet: Packet, now: float) -> None:
    assert isinstance(packet, Pubrec)
    session = conn.session
    assert session is not None
    item = session.inflight.get(packet.packet_id)
    if item is None or item.state is OutState.AWAITING_PUBACK:
        conn.send(Pubrel(packet.packet_id, Reason.PACKET_IDENTIFIER_NOT_FOUND))
        return
    if packet.reason_code >= 0x80:
        # The client refused it: the flow ends here [MQTT-4.3.3-4 area].
        del session.inflight[packet.packet_id]
        core.pump(session, now)
        return
    item.state = OutState.AWAITING_PUBCOMP
    conn.send(Pubrel(packet.packet_id))


def handle_pubcomp(core: BrokerCore, conn: ServerConnection, packet: Packet, now: float) -> None:
    assert isinstance(packet, Pubcomp)
    session = conn.session
    assert session is not None
    item = session.inflight.get(packet.packet_id)
    if item is not None and item.state is OutState.AWAITING_PUBCOMP:
        del session.inflight[packet.packet_id]
        if session.queue:
            core.pump(session, now)



