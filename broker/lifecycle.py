"""How sessions end, move and leave wills: the session lifecycle of one worker's core.

Why: the rules for the end of a session (clean start, expiry), a takeover by a newer connection
here or on another worker (release and hand-off), and wills (delayed, published durably) are
one concern, apart from connection handling and delivery. `BrokerCore` mixes this in.

Must not: do IO or read the clock (every entry point takes `now`); route a message other than
through `BrokerCore.publish`.

Invariants: a session ends at most once (its subscriptions are removed, the store and the
registry are told); a will is published at most once (`session.will` is cleared first).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from broker.handlers.connect import abort_connecting
from broker.mesh_codec import session_from_wire, session_to_wire
from broker.messages import Message
from broker.metrics import Counters
from broker.ports import MeshPort, SessionStore
from broker.protocol.packets import Will
from broker.protocol.reasons import Reason
from broker.session import Session
from store.records import QueuedRecord

if TYPE_CHECKING:
    from mesh.envelope import SessionWire

log = logging.getLogger("broker.core")


class SessionLifecycle:
    sessions: dict[str, Session]
    counters: Counters
    store: SessionStore
    mesh: MeshPort
    connected_count: int
    _timers: list[tuple[float, int, str, str]]
    _timer_seq: int
    worker_index: int

    if TYPE_CHECKING:  # provided by BrokerCore and Delivery

        def publish(self, message: Message, now: float) -> bool: ...

        def retain(self, message: Message, persist: bool = True) -> None: ...

        def remove_subscription(self, session: Session, key_filter: str) -> bool: ...

        def pump(self, session: Session, now: float) -> None: ...

        def deliver(
            self,
            session: Session,
            message: Message,
            qos: int,
            retain: bool,
            sub_ids: tuple[int, ...],
            now: float,
        ) -> None: ...

    def end_session(self, session: Session, now: float) -> None:
        """The session is over: drop its subscriptions and state; a pending will goes out now."""
        if self.sessions.get(session.client_id) is not session:
            return
        if session.will is not None and session.will_at is not None:
            self.publish_will(session, now)
        self._forget_session(session)
        if session.stored:
            self.store.session_removed(session.client_id)
        self.mesh.session_ended(session.client_id, session.epoch)

    def _forget_session(self, session: Session) -> None:
        for topic_filter in list(session.subscriptions):
            self.remove_subscription(session, topic_filter)
        del self.sessions[session.client_id]

    def take_over(self, session: Session, clean_start: bool, now: float) -> None:
        """A new connection claims the session: close the old one with 0x8E [MQTT-3.1.4-3].

        The old connection's will goes out unless the session continues and the will was
        delayed [MQTT-3.1.3-9]; a delayed will pending from an earlier connection goes out if
        the session ends now (clean start).
        """
        old = session.connection
        if old is not None:
            self.counters.sessions_taken_over += 1
            log.info("client %r: session taken over (was %s)", session.client_id, old.peer)
            old.close("session taken over", Reason.SESSION_TAKEN_OVER)
            old.session = None
            self.connected_count -= 1
            session.connection = None
            will = session.will
            if will is not None and (clean_start or not will.properties.will_delay_interval_s):
                self.publish_will(session, now)
        elif session.will_at is not None and clean_start:
            self.publish_will(session, now)
        session.will = None
        session.will_at = None

    def release(self, client_id: str, epoch: int, new_worker: int, clean_start: bool, now: float) -> None:
        """Another worker claimed `client_id`: hand the session over and forget it here."""
        session = self.sessions.get(client_id)
        state = None
        abort_connecting(self, client_id, epoch)  # type: ignore[arg-type]
        if session is not None:
            if session.epoch > epoch:
                log.info("client %r: stale release (epoch %d < %d) ignored", client_id, epoch, session.epoch)
                return
            self.take_over(session, clean_start, now)
            if not clean_start:
                state = session_to_wire(session, now)
            self._forget_session(session)
        self.mesh.handoff(new_worker, client_id, epoch, state)

    def release_to_store(
        self, client_id: str, epoch: int, clean_start: bool, now: float, done: Callable[[float], None]
    ) -> None:
        """A node elsewhere claimed `client_id`: close it here (0x8E) and leave its session in the
        store, committed before `done`, so that the new node loads exactly what we had."""
        session = self.sessions.get(client_id)
        abort_connecting(self, client_id, epoch)  # type: ignore[arg-type]
        if session is None or session.epoch > epoch:
            done(now)
            return
        self.take_over(session, clean_start, now)
        if clean_start or not session.persistent:
            stored = session.stored
            self._forget_session(session)
            if stored:
                self.store.session_removed(client_id, done)
            else:
                done(now)
            return
        self.store.session_saved(session, done)  # (offline: the connection is gone)
        self._forget_session(session)

    def park_in_store(
        self, client_id: str, state: SessionWire | None, now: float, done: Callable[[float], None]
    ) -> None:
        """A session handed to a CONNECT of ours that lost to a newer connection on another node:
        it is not ours to keep, so it goes to the store (committed before `done`), for the winner
        to load; a session that ends with its connection leaves nothing to store."""
        if state is None or state.expiry_s == 0 or not self.store.enabled:
            done(now)
            return
        session, subscriptions = session_from_wire(client_id, state, self.worker_index, now)
        for key_filter, entry in subscriptions:
            session.subscriptions[key_filter] = entry  # stored with it, not installed here
        self.store.session_saved(session, done)

    def reassert_online(self) -> None:
        """A node that took our sessions for dead is back: the store hears they are online."""
        for session in self.sessions.values():
            if session.connection is not None and session.stored:
                self.store.session_online(session, True)

    def rescan_online(self) -> None:
        """A node died (or its stream to us broke): messages it acknowledged to its publishers
        may be in the store and nowhere else. Our online persistent sessions read their queued
        rows again and get what they miss (by msg_id; a duplicate of QoS 1 is allowed)."""
        store = self.store
        if not store.enabled:
            return
        for session in list(self.sessions.values()):
            if session.connection is None or not session.stored:
                continue

            def loaded(
                record: object, rows: list[QueuedRecord], ok: bool, now: float, session: Session = session
            ) -> None:
                if (
                    not ok
                    or session.connection is None
                    or self.sessions.get(session.client_id) is not session
                ):
                    return
                known = {item.message.msg_id for item in session.inflight.values()}
                known.update(item.message.msg_id for item in session.queue)
                added = 0
                for row in rows:
                    if row.msg_id not in known:
                        session.queue.append(store.queued_to_outgoing(row, now))
                        added += 1
                if added:
                    log.warning(
                        "client %r: %d stored message(s) recovered after a node failure",
                        session.client_id,
                        added,
                    )
                    self.pump(session, now)

            store.load(session.client_id, loaded)

    def recover_node(self, node: str) -> None:
        """Node `node` died and this worker was chosen: publish the wills it left."""

        def publish(wills: list[tuple[str, Will]], now: float) -> None:
            if wills:
                log.warning("publishing %d will(s) of the dead node %s", len(wills), node)
            for client_id, will in wills:
                self.publish_server_message(self.will_message(will, client_id, now), now)

        self.store.recover(node, publish)

    def deliver_directed(
        self, client_id: str, message: Message, qos: int, retain: bool, sub_ids: tuple[int, ...], now: float
    ) -> None:
        """A message another worker picked one of our sessions for (a shared subscription)."""
        session = self.sessions.get(client_id)
        if session is None:
            self.counters.messages_dropped_no_session += 1
            return
        self.deliver(session, message, qos, retain, sub_ids, now)

    def schedule_will(self, session: Session, now: float) -> None:
        will = session.will
        assert will is not None
        delay = will.properties.will_delay_interval_s or 0
        if session.expiry_interval_s < delay:
            delay = session.expiry_interval_s  # the session ending sends it [MQTT-3.1.3-9 area]
        if delay <= 0:
            self.publish_will(session, now)
        else:
            session.will_at = now + delay
            self._add_timer(session.will_at, session.client_id, "will")

    def publish_will(self, session: Session, now: float) -> None:
        will = session.will
        session.will = None
        session.will_at = None
        if will is None:
            return
        access = session.access
        if access is not None and not access.may_publish(will.topic):
            # checked at CONNECT too; the rules changed since [broker/ACCESS.md]
            self.counters.wills_denied += 1
            log.warning("client %r: will to %r not published: not authorized", session.client_id, will.topic)
            return
        self.counters.wills_published += 1
        self.publish_server_message(self.will_message(will, session.client_id, now), now)

    def publish_server_message(self, message: Message, now: float) -> None:
        """Publish a message the server originates (a will): durable like a client's QoS 1/2
        publish, retained if it says so [MQTT-3.1.2-17], with nobody to acknowledge."""
        store = self.store
        if store.enabled:
            rows = store.durable_targets(message) if message.qos else []
            if rows or (message.retain and message.qos):
                store.persist(
                    message, rows, message.retain, False, lambda ok, now: self._publish_now(message, now)
                )
                return
            if message.retain:
                store.retained_changed(message.topic, message)
        self._publish_now(message, now)

    def _publish_now(self, message: Message, now: float) -> None:
        if message.retain:
            self.retain(message, persist=False)
        self.publish(message, now)

    @staticmethod
    def will_message(will: Will, client_id: str, now: float) -> Message:
        props = will.properties
        if props.will_delay_interval_s is not None:
            props = replace(props, will_delay_interval_s=None)  # a will property, not a PUBLISH one
        expiry = props.message_expiry_interval_s
        return Message(
            will.topic,
            will.payload,
            will.qos,
            will.retain,
            props,
            client_id,
            None if expiry is None else now + expiry,
        )

    def _add_timer(self, due: float, client_id: str, kind: str) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (due, self._timer_seq, client_id, kind))
