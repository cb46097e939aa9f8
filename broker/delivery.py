"""Delivery of a message to one session: the in-flight window, the queue, resends.

Why: QoS 0 goes straight to the socket (or is dropped and counted for a client that does not
keep up); QoS 1/2 takes a packet id inside the client's receive maximum, or waits in the session's
queue, FIFO; a resumed session resends what was in flight with DUP. That bookkeeping is one
concern, shared by local routing, shared-subscription picks from other workers, retained messages
and queued rows from the store. `BrokerCore` mixes this in.

Must not: do IO or read the clock; decide who gets a message (routing does).

Invariants: a session never has more unacknowledged QoS 1/2 PUBLISHes than the client's receive
maximum (and MaxInflight) [MQTT-3.3.4-9]; a QoS 1/2 delivery is in flight, queued, or counted as
dropped, and a dropped or finished one with a store row is acknowledged to the store.
"""

from __future__ import annotations

import logging

from broker.config import MqttConfig
from broker.messages import Message
from broker.metrics import Counters
from broker.ports import SessionStore
from broker.protocol.connection import ServerConnection
from broker.protocol.packets import Pubrel
from broker.session import Outgoing, OutState, Session

log = logging.getLogger("broker.core")


class Delivery:
    config: MqttConfig
    counters: Counters
    store: SessionStore
    # Connections whose socket is not keeping up; the mesh reads less while there are any.
    writers_paused: int

    def write_paused(self, conn: ServerConnection) -> None:
        """The socket's buffer is full: QoS 0 is dropped for it, QoS 1/2 waits in its queue."""
        if not conn.write_paused:
            conn.write_paused = True
            self.writers_paused += 1

    def deliver(
        self, session: Session, message: Message, qos: int, retain: bool, sub_ids: tuple[int, ...], now: float
    ) -> None:
        access = session.access
        if access is not None and not access.may_read(message.topic):
            self.counters.deliveries_denied += 1  # the rules changed, or a wildcard reaches further
            return
        conn = session.connection
        if qos == 0:
            if conn is None:
                return  # QoS 0 is not queued for offline sessions
            if conn.write_paused:
                self.counters.messages_dropped_qos0_slow_client += 1
                return
            data = conn.publish_bytes(message, 0, retain, sub_ids, 0, False, now)
            if data is None:
                self.counters.messages_dropped_too_large += 1
                return
            conn.push(data)
            counters = self.counters
            counters.messages_sent += 1
            counters.messages_sent_qos0 += 1
            return
        item = Outgoing(message, qos, retain, sub_ids)
        if (
            conn is not None
            and not conn.write_paused
            and not session.queue
            and len(session.inflight) < self.send_window(conn)
        ):
            self.send_outgoing(session, conn, item, now)
        elif len(session.queue) < self.config.max_queued_messages:
            session.queue.append(item)
        else:
            session.dropped_messages += 1
            self.counters.messages_dropped_queue_full += 1
            if session.dropped_messages == 1 or session.dropped_messages % 1000 == 0:
                log.warning(
                    "session %r: queue full (%d), %d message(s) dropped so far",
                    session.client_id,
                    self.config.max_queued_messages,
                    session.dropped_messages,
                )

    def send_window(self, conn: ServerConnection) -> int:
        """How many QoS 1/2 PUBLISHes may be unacknowledged [MQTT-3.3.4-9]."""
        limit = self.config.max_inflight
        return conn.client_receive_maximum if conn.client_receive_maximum < limit else limit

    def send_outgoing(self, session: Session, conn: ServerConnection, item: Outgoing, now: float) -> bool:
        """Give the item a packet id and send it; False if it cannot go (too large or expired)."""
        if item.message.expired(now):
            self.counters.messages_dropped_expired += 1
            self.done_with(session, item)
            return False
        pid = session.allocate_packet_id()
        data = conn.publish_bytes(item.message, item.qos, item.retain, item.subscription_ids, pid, False, now)
        if data is None:
            self.counters.messages_dropped_too_large += 1
            self.done_with(session, item)
            return False
        session.inflight[pid] = item
        conn.push(data)
        counters = self.counters
        counters.messages_sent += 1
        if item.qos == 1:
            counters.messages_sent_qos1 += 1
        else:
            counters.messages_sent_qos2 += 1
        return True

    def done_with(self, session: Session, item: Outgoing) -> None:
        """A QoS 1/2 delivery is over (acknowledged, or dropped): its queue row can go."""
        msg_id = item.message.msg_id
        if msg_id and session.stored:
            self.store.ack(session.client_id, msg_id)

    def pump(self, session: Session, now: float) -> None:
        """Move queued messages into the in-flight window while there is room."""
        conn = session.connection
        if conn is None or conn.closing or conn.write_paused:
            return
        queue = session.queue
        window = self.send_window(conn)
        while queue and len(session.inflight) < window:
            self.send_outgoing(session, conn, queue.popleft(), now)

    def resume(self, session: Session, conn: ServerConnection, now: float) -> None:
        """After CONNACK on a resumed session: resend what was in flight, then the queue.

        PUBLISH again with DUP set and the same packet id, PUBREL for those already
        received by the client [MQTT-4.4.0-1].
        """
        for pid, item in list(session.inflight.items()):
            if item.state is OutState.AWAITING_PUBCOMP:
                conn.send(Pubrel(pid))
                continue
            if item.message.expired(now):
                del session.inflight[pid]
                self.counters.messages_dropped_expired += 1
                self.done_with(session, item)
                continue
            data = conn.publish_bytes(
                item.message, item.qos, item.retain, item.subscription_ids, pid, True, now
            )
            if data is None:
                del session.inflight[pid]
                self.counters.messages_dropped_too_large += 1
                self.done_with(session, item)
                continue
            conn.push(data)
        self.pump(session, now)

    def writable_again(self, conn: ServerConnection, now: float) -> None:
        """The socket drained: queued QoS 1/2 messages can flow again."""
        if conn.write_paused:
            conn.write_paused = False
            self.writers_paused -= 1
        if conn.session is not None and conn.session.connection is conn:
            self.pump(conn.session, now)
