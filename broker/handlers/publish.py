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

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from broker.handlers.common import is_utf8
from broker.limits import publish_refused
from broker.messages import Message
from broker.protocol.connection import ConnectionState, ServerConnection
from broker.protocol.errors import MQTTError, ProtocolError, ReceiveMaximumExceeded, TopicAliasInvalid
from broker.protocol.packets import (
    NO_PROPERTIES,
    Packet,
    Properties,
    ProtocolVersion,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
)
from broker.protocol.reasons import Reason
from broker.protocol.topics import validate_topic_name
from broker.session import OutState, Session

if TYPE_CHECKING:
    from broker.core import BrokerCore

log = logging.getLogger("broker.handlers.publish")

V5 = ProtocolVersion.V5
NO_SUBSCRIBERS = Reason.NO_MATCHING_SUBSCRIBERS


def handle_publish(core: BrokerCore, conn: ServerConnection, packet: Publish, now: float) -> None:
    # The hottest function of the broker: every check costs on every message, so the common
    # case (no properties, topic given, QoS within limits) takes the fewest branches.
    session = conn.session
    assert session is not None
    qos = packet.qos
    topic = packet.topic
    props = packet.properties
    if props is not NO_PROPERTIES:
        topic = _apply_properties(core, conn, packet, topic, props)
    # The decoder already refused U+0000 and ill-formed UTF-8, and the 2-byte length bounds the
    # size; what is left of the topic name rules is: non-empty, no wildcards [MQTT-3.3.2-2].
    if not topic or "+" in topic or "#" in topic:
        validate_topic_name(topic)
    counters = core.counters
    counters.messages_received += 1
    if qos > core.config.maximum_qos or (packet.retain and not core.config.retain_available):
        _refuse_limits(core, packet)
    if core.refuse_publish:
        _refuse_in_minority(core, conn, packet)
        return
    access = session.access
    if access is not None and not access.may_publish(topic):
        _refuse_not_authorized(core, conn, session, packet, topic)
        return

    if qos == 0:
        counters.messages_received_qos0 += 1
    elif qos == 1:
        counters.messages_received_qos1 += 1
    else:
        counters.messages_received_qos2 += 1
        pid = packet.packet_id
        if pid in session.inbound_qos2:
            # a resend: acknowledge again, route once
            send_ack(conn, Pubrec(pid))
            return
        waiters = session.qos2_persisting.get(pid)
        if waiters is not None:
            # a resend of a message the store has not confirmed yet: its PUBREC waits for that
            step = hold_step(conn)
            waiters.append(
                lambda reason, now: complete_step(conn, step, lambda now: conn.send(Pubrec(pid, reason)), now)
            )
            return
        if len(session.inbound_qos2) >= core.config.max_inflight:
            raise ReceiveMaximumExceeded(
                f"more than {core.config.max_inflight} QoS 2 messages unreleased [MQTT-3.3.4-8]"
            )
    if conn.limits is not None and publish_refused(conn.limits, core, conn, packet, topic, now):
        return  # Limits: publish rate, topic levels / length (broker/limits.py)

    if props is NO_PROPERTIES:
        message = Message(topic, packet.payload, qos, packet.retain, NO_PROPERTIES, conn.client_id)
    else:
        if props.payload_format_indicator == 1 and not is_utf8(packet.payload):
            if qos:
                ack = Puback if qos == 1 else Pubrec
                send_ack(conn, ack(packet.packet_id, Reason.PAYLOAD_FORMAT_INVALID))
            return
        expiry = props.message_expiry_interval_s
        if props.topic_alias is not None:
            props = replace(props, topic_alias=None)
        message = Message(
            topic,
            packet.payload,
            qos,
            packet.retain,
            props,
            conn.client_id,
            None if expiry is None else now + expiry,
        )

    store = core.store
    if store.enabled:
        if qos:
            rows = store.durable_targets(message)
            if rows or message.retain:
                # The durability promise: acknowledge (and deliver) only once the store holds
                # the message for every persistent session it reaches, and the retained change.
                pid = packet.packet_id
                if qos == 2:
                    session.qos2_persisting[pid] = []
                step = hold_step(conn)
                store.persist(
                    message,
                    rows,
                    message.retain,
                    conn.version is V5,
                    lambda ok, now: _durable(core, conn, session, packet, message, step, ok, now),
                )
                return
        elif message.retain:
            store.retained_changed(message.topic, message)
    if conn.pipeline:
        # An earlier message of this client still waits for the store: this one is routed and
        # acknowledged after it, so that order holds [MQTT-4.6.0-2, -3, -5].
        step = hold_step(conn)
        complete_step(
            conn, step, lambda now: _route_and_ack(core, conn, session, packet, message, False, now), now
        )
        return
    _route_and_ack(core, conn, session, packet, message, False, now)


def _route_and_ack(
    core: BrokerCore,
    conn: ServerConnection,
    session: Session,
    packet: Publish,
    message: Message,
    stored: bool,
    now: float,
) -> None:
    if message.retain:
        core.retain(message, persist=False)
    delivered = core.publish(message, now) or stored
    qos = packet.qos
    if qos:
        reason = Reason.SUCCESS if delivered or conn.version is not V5 else NO_SUBSCRIBERS
        pid = packet.packet_id
        ack: Packet
        if qos == 1:
            ack = Puback(pid, reason)
        else:
            session.inbound_qos2.add(pid)
            ack = Pubrec(pid, reason)
        if message.retain:
            # A retained change is in force on every worker and node before it is acknowledged
            # (a barrier, as for SUBACK): a subscriber that connects anywhere after the PUBACK
            # gets it. The acknowledgement keeps its place before later ones.
            step = _hold_first(conn)
            core.mesh.barrier(now, lambda now: complete_step(conn, step, lambda now: conn.send(ack), now))
            return
        conn.send(ack)


def _durable(
    core: BrokerCore,
    conn: ServerConnection,
    session: Session,
    packet: Publish,
    message: Message,
    step: _Step,
    ok: bool,
    now: float,
) -> None:
    """The store answered for a QoS 1/2 message: deliver and acknowledge, or refuse it."""
    pid = packet.packet_id
    waiters = session.qos2_persisting.pop(pid, None) if packet.qos == 2 else None
    if not ok:
        # The database could not make it durable in time: 5.0 publishers are told (and may
        # resend); 3.1.1 ones never get here (they wait for the store) [DESIGN.md, Store].
        log.warning(
            "client %r: QoS %d message to %r refused, the store is unavailable",
            session.client_id,
            packet.qos,
            message.topic,
        )
        ack = Puback if packet.qos == 1 else Pubrec
        complete_step(conn, step, lambda now: conn.send(ack(pid, Reason.UNSPECIFIED_ERROR)), now)
        for waiter in waiters or ():
            waiter(Reason.UNSPECIFIED_ERROR, now)
        return
    complete_step(
        conn, step, lambda now: _route_and_ack(core, conn, session, packet, message, True, now), now
    )
    for waiter in waiters or ():
        waiter(Reason.SUCCESS, now)


class _Step:
    """One PUBLISH of a connection whose routing and acknowledgement wait their turn."""

    __slots__ = ("ready", "run")

    def __init__(self) -> None:
        self.ready = False
        self.run: Callable[[float], None] | None = None


def hold_step(conn: ServerConnection) -> _Step:
    """A place in the connection's order for a PUBLISH whose outcome is not known yet."""
    step = _Step()
    if conn.pipeline is None:
        conn.pipeline = deque()
    conn.pipeline.append(step)
    return step


def _hold_first(conn: ServerConnection) -> _Step:
    """A place at the head of the order: for the acknowledgement of the PUBLISH being handled
    now (its own step, if it had one, has just left the head), before every later one."""
    step = _Step()
    if conn.pipeline is None:
        conn.pipeline = deque()
    conn.pipeline.appendleft(step)
    return step


def complete_step(conn: ServerConnection, step: _Step, run: Callable[[float], None], now: float) -> None:
    """The step's outcome is known: run every step at the head of the order that is ready."""
    step.run = run
    step.ready = True
    pipeline = conn.pipeline
    assert pipeline is not None
    while pipeline and pipeline[0].ready:
        head = pipeline.popleft()
        if head.run is not None and conn.state is not ConnectionState.CLOSED:
            head.run(now)


def _refuse_in_minority(core: BrokerCore, conn: ServerConnection, packet: Publish) -> None:
    """Split-brain protection with AllowConnect and not AllowPublish: a minority node takes no
    publishes (5.0: PUBACK/PUBREC 0x83; 3.1.1 has no refusal: the connection is closed)."""
    core.counters.messages_refused_minority += 1
    if conn.version is not V5:
        conn.close("publish refused: this node is in the cluster's minority")
        return
    if packet.qos:
        ack = Puback if packet.qos == 1 else Pubrec
        send_ack(conn, ack(packet.packet_id, Reason.IMPLEMENTATION_SPECIFIC_ERROR))


def _refuse_not_authorized(
    core: BrokerCore, conn: ServerConnection, session: Session, packet: Publish, topic: str
) -> None:
    """The rules do not let this client publish to `topic`: not delivered, not retained. 5.0
    QoS 1/2 are told (0x87); QoS 0 and 3.1.1 are acknowledged as usual [MQTT-3.3.5-2]."""
    core.counters.publish_denied += 1
    access = session.access
    assert access is not None
    access.denials += 1
    if access.denials == 1 or access.denials % 1000 == 0:
        log.warning(
            "client %r (user %r): publish to %r not authorized (%d refused so far)",
            session.client_id,
            access.username,
            topic,
            access.denials,
        )
    refuse_publish(conn, session, packet, Reason.NOT_AUTHORIZED)


def refuse_publish(conn: ServerConnection, session: Session, packet: Publish, reason: Reason) -> None:
    """Answer a PUBLISH that is not routed (rules, limits): 5.0 QoS 1/2 get `reason` in their
    PUBACK / PUBREC; 3.1.1 has no way to say no, so QoS 1/2 are acknowledged as usual and QoS 2
    goes on to PUBREL / PUBCOMP [MQTT-3.3.5-2]; QoS 0 gets nothing. Acks keep their order."""
    qos = packet.qos
    if not qos:
        return
    pid = packet.packet_id
    if conn.version is V5:
        send_ack(conn, Puback(pid, reason) if qos == 1 else Pubrec(pid, reason))
    elif qos == 1:
        send_ack(conn, Puback(pid))
    else:
        session.inbound_qos2.add(pid)
        send_ack(conn, Pubrec(pid))


def send_ack(conn: ServerConnection, ack: Packet) -> None:
    """Acknowledge in the order the PUBLISHes came [MQTT-4.6.0-2, -3]: behind any still waiting."""
    if conn.pipeline:
        step = hold_step(conn)
        step.run = lambda now: conn.send(ack)
        step.ready = True
    else:
        conn.send(ack)


def _apply_properties(
    core: BrokerCore, conn: ServerConnection, packet: Publish, topic: str, props: Properties
) -> str:
    """Resolve a topic alias [MQTT-3.3.2-8..12] and refuse what a client may not send."""
    alias = props.topic_alias
    if alias is not None:
        if alias == 0 or alias > core.config.max_topic_alias:
            raise TopicAliasInvalid(
                f"topic alias {alias} outside 1..{core.config.max_topic_alias} [MQTT-3.3.2-9]"
            )
        if topic:
            conn.alias_in[alias] = topic
        else:
            found = conn.alias_in.get(alias)
            if found is None:
                raise ProtocolError(f"topic alias {alias} used before it was set")
            topic = found
    if props.subscription_identifiers:
        raise ProtocolError("PUBLISH from a client carries a subscription identifier [MQTT-3.3.4-6]")
    return topic


def _refuse_limits(core: BrokerCore, packet: Publish) -> None:
    cfg = core.config
    if packet.qos > cfg.maximum_qos:
        raise MQTTError(
            f"QoS {packet.qos} above maximum QoS {cfg.maximum_qos} [MQTT-3.2.2-11]", Reason.QOS_NOT_SUPPORTED
        )
    raise MQTTError("retain not available [MQTT-3.2.2-14]", Reason.RETAIN_NOT_SUPPORTED)


def handle_pubrel(core: BrokerCore, conn: ServerConnection, packet: Pubrel, now: float) -> None:
    session = conn.session
    assert session is not None
    if packet.packet_id in session.inbound_qos2:
        session.inbound_qos2.discard(packet.packet_id)
        conn.send(Pubcomp(packet.packet_id))
    else:
        conn.send(Pubcomp(packet.packet_id, Reason.PACKET_IDENTIFIER_NOT_FOUND))


def handle_puback(core: BrokerCore, conn: ServerConnection, packet: Puback, now: float) -> None:
    session = conn.session
    assert session is not None
    item = session.inflight.get(packet.packet_id)
    if item is not None and item.state is OutState.AWAITING_PUBACK:
        del session.inflight[packet.packet_id]
        core.done_with(session, item)
        if session.queue:
            core.pump(session, now)


def handle_pubrec(core: BrokerCore, conn: ServerConnection, packet: Pubrec, now: float) -> None:
    session = conn.session
    assert session is not None
    item = session.inflight.get(packet.packet_id)
    if item is None or item.state is OutState.AWAITING_PUBACK:
        conn.send(Pubrel(packet.packet_id, Reason.PACKET_IDENTIFIER_NOT_FOUND))
        return
    if packet.reason_code >= 0x80:
        # The client refused it: the flow ends here [MQTT-4.3.3-4 area].
        del session.inflight[packet.packet_id]
        core.done_with(session, item)
        core.pump(session, now)
        return
    item.state = OutState.AWAITING_PUBCOMP
    conn.send(Pubrel(packet.packet_id))


def handle_pubcomp(core: BrokerCore, conn: ServerConnection, packet: Pubcomp, now: float) -> None:
    session = conn.session
    assert session is not None
    item = session.inflight.get(packet.packet_id)
    if item is not None and item.state is OutState.AWAITING_PUBCOMP:
        del session.inflight[packet.packet_id]
        core.done_with(session, item)
        if session.queue:
            core.pump(session, now)
