"""SUBSCRIBE and UNSUBSCRIBE.

Why: turning a SUBSCRIBE into entries of the topic trees with their options, granting QoS,
answering with one reason code per filter in order, and sending the retained messages each
new subscription is owed (retain handling 0/1/2).

Must not: do IO or read the clock; match topics itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from broker.limits import filter_refusal, subscribe_refused
from broker.protocol.connection import ConnectionState, ServerConnection
from broker.protocol.errors import MQTTError, ProtocolError
from broker.protocol.packets import ProtocolVersion, Suback, Subscribe, Unsuback, Unsubscribe
from broker.protocol.reasons import Reason
from broker.protocol.topics import parse_shared, validate_topic_filter
from broker.session import SubEntry

if TYPE_CHECKING:
    from broker.core import BrokerCore
    from broker.messages import Message

log = logging.getLogger("broker.handlers.subscribe")

V5 = ProtocolVersion.V5


def handle_subscribe(core: BrokerCore, conn: ServerConnection, packet: Subscribe, now: float) -> None:
    session = conn.session
    assert session is not None
    limits = conn.limits
    if limits is not None and subscribe_refused(limits, core, conn, packet, now):
        return  # Limits: subscribe rate, every filter refused (broker/limits.py)
    cfg = core.config
    v5 = conn.version is V5
    ids = packet.properties.subscription_identifiers
    sub_id = ids[0] if ids else None
    codes: list[int] = []
    owed: list[tuple[SubEntry, list[Message]]] = []
    wait = False
    for sub in packet.subscriptions:
        try:
            validate_topic_filter(sub.topic_filter)
        except MQTTError:
            # [MQTT-3.8.4-5] a failure code for this filter only; 3.1.1 knows only 0x80
            codes.append(Reason.TOPIC_FILTER_INVALID if v5 else Reason.UNSPECIFIED_ERROR)
            continue
        if core.refuse_subscribe:
            # split-brain protection (AllowConnect, not AllowSubscribe): no new subscriptions
            codes.append(Reason.IMPLEMENTATION_SPECIFIC_ERROR if v5 else Reason.UNSPECIFIED_ERROR)
            continue
        group, topic_filter = parse_shared(sub.topic_filter)
        if group is not None and sub.no_local:
            raise ProtocolError("No Local on a shared subscription [MQTT-3.8.3-4]")
        access = session.access
        if access is not None and not access.may_subscribe(topic_filter):
            core.counters.subscribe_denied += 1
            log.info(
                "client %r (user %r): subscription to %r not authorized",
                session.client_id,
                access.username,
                sub.topic_filter,
            )
            codes.append(Reason.NOT_AUTHORIZED if v5 else Reason.UNSPECIFIED_ERROR)
            continue
        if limits is not None and (
            refused := filter_refusal(limits, core, conn, session, sub.topic_filter, topic_filter, now)
        ):
            codes.append(refused)  # Limits: topic levels / length, MaxSubscriptions
            continue
        granted = sub.qos if sub.qos <= cfg.maximum_qos else cfg.maximum_qos  # [MQTT-3.2.2-10 area]
        entry = SubEntry(
            client_id=session.client_id,
            topic_filter=topic_filter,
            qos=granted,
            no_local=sub.no_local,
            retain_as_published=sub.retain_as_published,
            retain_handling=sub.retain_handling,
            subscription_id=sub_id,
            share_group=group,
            worker=core.worker_index,
        )
        is_new, needs_barrier = core.add_subscription(session, sub.topic_filter, entry)
        wait = wait or needs_barrier
        codes.append(granted)
        # Retained messages: not for shared subscriptions [MQTT-4.8.2]; retain handling
        # 0 = always, 1 = only if new, 2 = never [MQTT-3.3.1-9, -10, -11].
        if group is None and (sub.retain_handling == 0 or (sub.retain_handling == 1 and is_new)):
            retained = core.retained_for(topic_filter, now)
            if retained:
                owed.append((entry, retained))
    suback = Suback(packet.packet_id, tuple(codes))

    def finish(now: float) -> None:
        conn.send(suback)
        for entry, messages in owed:
            for message in messages:
                if entry.no_local and message.origin == session.client_id:
                    continue
                qos = entry.qos if entry.qos < message.qos else message.qos
                # A retained message sent because of a new subscription has RETAIN set [MQTT-3.3.1-8].
                core.deliver(session, message, qos, True, entry.subscription_ids, now)

    # A subscription is in force when every other process of the node knows of it (the mesh
    # barrier) and, for a session that outlives its connection, when the store holds it (a crash
    # after the SUBACK must not lose it); until both, the SUBACK and what the client sends next
    # wait, in order.
    durable = core.store.enabled and session.persistent
    waits = int(wait) + int(durable)
    if not waits:
        core.store.session_saved(session)
        finish(now)
        return
    conn.held = []
    remaining = [waits]

    def one_done(now: float) -> None:
        remaining[0] -= 1
        if remaining[0]:
            return
        if conn.session is session and not conn.closing and conn.state is not ConnectionState.CLOSED:
            finish(now)
        core.release_held(conn, now)

    if durable:
        core.store.session_saved(session, one_done)
    else:
        core.store.session_saved(session)
    if wait:
        core.mesh.barrier(now, one_done)


def handle_unsubscribe(core: BrokerCore, conn: ServerConnection, packet: Unsubscribe, now: float) -> None:
    session = conn.session
    assert session is not None
    codes: list[int] = []
    for topic_filter in packet.topic_filters:
        try:
            validate_topic_filter(topic_filter)
        except MQTTError:
            codes.append(Reason.TOPIC_FILTER_INVALID)
            continue
        removed = core.remove_subscription(session, topic_filter)
        codes.append(Reason.SUCCESS if removed else Reason.NO_SUBSCRIPTION_EXISTED)
    # [MQTT-3.10.4-4, -5] one UNSUBACK, with a code per filter in 5.0
    conn.send(Unsuback(packet.packet_id, tuple(codes)))
    core.store.session_saved(session)
