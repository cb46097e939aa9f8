"""The broker of one worker, without IO: sessions, subscriptions, routing and timers.

Why: everything a worker decides — who gets a message, with which QoS and options, when a session
expires, when a will goes out — is decided here, driven by packets and a `now` that the IO layer
passes in. The per-packet behaviour lives in `broker/handlers/`; this class owns the state those
handlers work on and the delivery path they share.

Must not: touch sockets, the event loop or the clock; encode packets itself (the connection
does); scan all subscriptions to route a message (the topic tree does a trie walk, and match
results are cached per topic until the subscriptions change).

Invariants:
- A client id has at most one session, and a session at most one connection.
- Every subscription in `subscriptions`/`shared_subscriptions` belongs to a session in `sessions`.
- A QoS 1/2 delivery is either in a session's in-flight window, in its queue, or counted as
  dropped; a QoS 0 delivery to a client whose socket is not keeping up is dropped and counted.
"""

from __future__ import annotations

import heapq
import logging

from broker.acl import AuthTable, Rule
from broker.authn import InlineVerifier, PasswordVerifier
from broker.config import AuthConfig, LimitsConfig, MqttConfig
from broker.delivery import Delivery
from broker.handlers.common import CONNACK_UNSUPPORTED_VERSION
from broker.lifecycle import SessionLifecycle
from broker.limits import WorkerLimits
from broker.messages import Message
from broker.metrics import Counters
from broker.ports import ClientIdSource, MemorySessionStore, MeshPort, NoMesh, SessionStore, random_client_id
from broker.protocol.connection import ConnectionState, Link, ServerConnection
from broker.protocol.errors import MQTTError, UnsupportedProtocolVersion
from broker.protocol.packets import Packet, Properties
from broker.protocol.reasons import Reason
from broker.routing.retained import RetainedTree
from broker.routing.shared import SharedChoice
from broker.routing.topic_tree import TopicTree
from broker.session import NEVER_EXPIRES_S, Session, SubEntry
from store.passwords import CredentialCache

log = logging.getLogger("broker.core")

ROUTE_CACHE_MAX = 4096

# One matching client and its matching subscriptions (usually one).
Route = tuple[str, tuple[SubEntry, ...]]
SharedRoute = tuple[tuple[str, str], list[SubEntry]]  # ((group, filter), members)


class BrokerCore(SessionLifecycle, Delivery):
    def __init__(
        self,
        config: MqttConfig,
        *,
        store: SessionStore | None = None,
        mesh: MeshPort | None = None,
        new_client_id: ClientIdSource = random_client_id,
        worker_index: int = 0,
        limits: LimitsConfig | None = None,
        auth: AuthConfig | None = None,
    ) -> None:
        self.config = config
        # Limits against abuse (Limits section; MaxConnectRate already this worker's share)
        self.limits_config = limits or LimitsConfig()
        self.limits = WorkerLimits(self.limits_config)
        self.auth_config = auth = auth or AuthConfig()
        # Users and rules (broker/acl.py): the store's, sent on the store plane, then Auth.Acl.
        self.config_rules = tuple(Rule(r.user, r.topic, r.access) for r in auth.acl)
        self.auth_table = AuthTable(rules=self.config_rules, no_match_allow=auth.acl_no_match == "ALLOW")
        self.verifier: PasswordVerifier = InlineVerifier()  # the worker sets a thread-pool one
        self.credentials = CredentialCache()
        self.worker_index = worker_index
        self.store: SessionStore = store or MemorySessionStore()
        self.mesh: MeshPort = mesh or NoMesh()
        self.new_client_id = new_client_id
        self.counters = Counters()
        self.sessions: dict[str, Session] = {}
        # CONNECTs whose session is still being claimed or loaded, by client id: a newer claim
        # elsewhere must abort them, since they have no session to release yet
        self.connecting: dict[str, ServerConnection] = {}
        self.minority = False  # split-brain protection: refuse clients (see set_minority)
        self.minority_reference = ""
        self.refuse_publish = False  # in the minority with AllowConnect but not AllowPublish
        self.refuse_subscribe = False  # ... not AllowSubscribe
        self.connections: set[ServerConnection] = set()
        self.connected_count = 0
        self.subscriptions: TopicTree[str, SubEntry] = TopicTree()
        # Shared members of the whole node, keyed (group, worker, client id): the publishing
        # worker alone picks the member of each message.
        self.shared_subscriptions: TopicTree[tuple[str, int, str], SubEntry] = TopicTree()
        self.shared_choice = SharedChoice()
        self.retained: RetainedTree[Message] = RetainedTree()
        self.dirty: list[ServerConnection] = []
        self._routes: dict[str, tuple[list[Route], list[SharedRoute]]] = {}
        self._routes_generation = (-1, -1)
        # (due, seq, client_id, kind): delayed wills and session expiries, checked by tick().
        self._timers: list[tuple[float, int, str, str]] = []
        self._timer_seq = 0
        self.stopping = False
        self.reading_paused = False
        self.writers_paused = 0
        from broker.handlers import dispatch  # the handlers import this module's types

        self._dispatch = dispatch.TABLE

    # -- connections ----------------------------------------------------------------------------

    def open_connection(self, peer: str, link: Link, now: float) -> ServerConnection:
        conn = ServerConnection(peer, self.config.max_packet_bytes, now, link, self.dirty)
        limits = self.limits
        if limits.active:  # Limits section (broker/limits.py): connection rate, per-client state
            conn.limits = limits.open(peer, now)
        self.connections.add(conn)
        if self.reading_paused:
            link.pause_reading()
        return conn

    def data_received(self, conn: ServerConnection, data: bytes, now: float) -> None:
        """Bytes from a client: decode, handle every packet, never raise."""
        if conn.closing:
            return
        conn.last_rx = now
        self.counters.bytes_received += len(data)
        try:
            packets = conn.receive(data)
        except MQTTError as exc:
            # Act on the good packets that came before the bad one, then close.
            try:
                self._handle(conn, exc.packets_before, now)  # type: ignore[arg-type]
            except MQTTError as first:
                exc = first
            self.protocol_error(conn, exc)
            return
        try:
            self._handle(conn, packets, now)
        except MQTTError as exc:
            self.protocol_error(conn, exc)

    def _handle(self, conn: ServerConnection, packets: list[Packet], now: float) -> None:
        held = conn.held
        if held is not None:
            held.extend(packets)  # the connection waits for the node; keep the order
            return
        dispatch = self._dispatch
        for i in range(len(packets)):
            packet = packets[i]
            dispatch[type(packet)](self, conn, packet, now)
            if conn.closing:
                return
            held = conn.held
            if held is not None:  # the handler made the connection wait
                held.extend(packets[i + 1 :])
                return

    def release_held(self, conn: ServerConnection, now: float) -> None:
        """The connection's wait is over: handle what arrived meanwhile."""
        held = conn.held
        conn.held = None
        if held and not conn.closing and conn.state is not ConnectionState.CLOSED:
            try:
                self._handle(conn, held, now)
            except MQTTError as exc:
                self.protocol_error(conn, exc)

    def protocol_error(self, conn: ServerConnection, exc: MQTTError) -> None:
        """The one place a peer's protocol violation ends its connection [MQTT-4.13.1]."""
        self.counters.protocol_errors += 1
        if isinstance(exc, UnsupportedProtocolVersion):
            log.warning("connection from %s: %s; answering CONNACK 0x01", conn.peer, exc)
            conn.push(CONNACK_UNSUPPORTED_VERSION)
            conn.close("unsupported protocol version")
            return
        reason = Reason(exc.reason_code) if exc.reason_code in Reason._value2member_map_ else exc.reason_code
        log.warning(
            "client %r from %s: closing, reason 0x%02X %s: %s",
            conn.client_id or "-",
            conn.peer,
            int(exc.reason_code),
            getattr(reason, "name", "?"),
            exc,
        )
        conn.close(f"protocol error: {exc}", exc.reason_code)

    def connection_lost(self, conn: ServerConnection, now: float) -> None:
        """The socket is gone, for whatever reason: run the will and session-end rules."""
        if conn.state is ConnectionState.CLOSED:
            return
        if conn.state is ConnectionState.AWAITING_CONNECT and conn.held is not None and conn.client_id:
            # CONNECT is waiting for its claim: the claim's completion runs the rest.
            conn.link_lost = True
            self.connections.discard(conn)
            return
        was_connected = conn.state is ConnectionState.CONNECTED
        conn.state = ConnectionState.CLOSED
        if conn.write_paused:
            conn.write_paused = False
            self.writers_paused -= 1
        self.connections.discard(conn)
        pending = conn.decoder.buffered_bytes
        if not was_connected:
            log.info(
                "connection from %s closed before CONNECT%s",
                conn.peer,
                f" (with {pending} bytes of an incomplete packet)" if pending else "",
            )
        else:
            log.info(
                "client %r from %s disconnected: %s%s",
                conn.client_id,
                conn.peer,
                conn.close_reason or "connection lost",
                f" (with {pending} bytes of an incomplete packet)" if pending else "",
            )
        session = conn.session
        if not was_connected or session is None or session.connection is not conn:
            return  # never connected, or taken over: the new owner has the session
        self.connected_count -= 1
        session.connection = None
        if session.will is not None and not conn.will_cleared and not self.stopping:
            # A draining broker keeps the will with the session rather than sending it: the
            # client did not go away, the server did, and it may resume elsewhere.
            self.schedule_will(session, now)
        if session.expiry_interval_s == 0:
            self.end_session(session, now)
        else:
            if session.expiry_interval_s != NEVER_EXPIRES_S:
                session.expires_at = now + session.expiry_interval_s
                self._add_timer(session.expires_at, session.client_id, "expiry")
            self.store.session_online(session, False)

    def gauges(self, now: float) -> dict[str, int]:
        """What this worker holds right now (for /metrics and $SYS)."""
        online = sum(1 for s in self.sessions.values() if s.connection is not None)
        return {
            "connections": len(self.connections),
            "sessions_online": online,
            "sessions_offline": len(self.sessions) - online,
            "queued_messages": sum(len(s.queue) for s in self.sessions.values()),
            "inflight_messages": sum(len(s.inflight) for s in self.sessions.values()),
            "subscriptions": len(self.subscriptions),
            "retained_messages": len(self.retained),
            "store_wait_ms": self.store.oldest_wait_ms(now),
        }

    def set_minority_operations(self, minority: bool, allow_publish: bool, allow_subscribe: bool) -> None:
        """Split-brain protection with AllowConnect: clients stay; these operations may not."""
        self.refuse_publish = minority and not allow_publish
        self.refuse_subscribe = minority and not allow_subscribe

    def set_minority(self, minority: bool, server_reference: str) -> None:
        """Split-brain protection: this node sees too few live members. New CONNECTs are refused
        and connected clients are sent elsewhere (0x9C, with the server reference if one is
        configured), so that a load balancer moves them to the majority."""
        was, self.minority = self.minority, minority
        self.minority_reference = server_reference
        if minority and not was:
            moved = Properties(server_reference=server_reference or None)
            for conn in list(self.connections):
                if conn.session is not None:
                    conn.close("this node is in the cluster's minority", Reason.USE_ANOTHER_SERVER, moved)

    def shutdown(self, server_reference: str = "") -> None:
        """Drain: tell 5.0 clients the server is shutting down [MQTT-4.13 / 0x8B] and close all;
        with a server reference (a cluster node), 0x9C "use another server" and where to go."""
        self.stopping = True
        reference = server_reference
        if reference:
            # A cluster node that drains sends its clients to another server [MQTT-4.11 0x9C]
            moved = Properties(server_reference=reference)  # [MQTT-3.14.2.2.5]
            for conn in list(self.connections):
                conn.close("server shutting down, use another server", Reason.USE_ANOTHER_SERVER, moved)
            return
        for conn in list(self.connections):
            conn.close("server shutting down", Reason.SERVER_SHUTTING_DOWN)

    # -- output ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every connection's pending output once, and close those that asked for it."""
        self.mesh.flush()
        self.store.flush()
        dirty = self.dirty
        if not dirty:
            return
        counters = self.counters
        for conn in dirty:
            out = conn.out
            if out:
                data = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                counters.bytes_sent += len(data)
                conn.link.write(data)
            if conn.closing and conn.state is not ConnectionState.CLOSED:
                conn.link.close()
        dirty.clear()

    def tick(self, now: float) -> None:
        """Run what is due: keepalive and CONNECT timeouts, delayed wills, session expiry."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, client_id, kind = heapq.heappop(timers)
            session = self.sessions.get(client_id)
            if session is None or session.connection is not None:
                continue
            if kind == "will" and session.will_at is not None and session.will_at <= now:
                self.publish_will(session, now)
            elif kind == "expiry" and session.expires_at is not None and session.expires_at <= now:
                self.counters.sessions_expired += 1
                self.end_session(session, now)
        connect_timeout = self.config.connect_timeout_s
        for conn in list(self.connections):
            if conn.closing:
                continue
            if conn.state is ConnectionState.AWAITING_CONNECT:
                if now - conn.connected_at > connect_timeout:
                    log.info(
                        "connection from %s: no CONNECT within %.1fs, closing", conn.peer, connect_timeout
                    )
                    conn.close("connect timeout")
            elif conn.keepalive_s and now - conn.last_rx > conn.keepalive_s * 1.5:
                # [MQTT-3.1.2-24]
                self.counters.keepalive_timeouts += 1
                log.info("client %r from %s: keep alive timeout", conn.client_id, conn.peer)
                conn.close("keep alive timeout", Reason.KEEP_ALIVE_TIMEOUT)

    # -- subscriptions --------------------------------------------------------------------------

    def add_subscription(self, session: Session, key_filter: str, entry: SubEntry) -> tuple[bool, bool]:
        """Add or replace a subscription of a local session.

        Returns (is_new, needs_barrier): whether the session had no subscription to that filter
        before, and whether other processes must catch up before the SUBACK goes out.
        """
        is_new = key_filter not in session.subscriptions
        if not is_new:
            self._drop_subscription(session, key_filter, replacing=True)
        session.subscriptions[key_filter] = entry
        if entry.share_group is None:
            self.subscriptions.add(entry.topic_filter, session.client_id, entry)
            return is_new, self.mesh.interest(entry.topic_filter, +1)
        self.shared_subscriptions.add(
            entry.topic_filter, (entry.share_group, entry.worker, session.client_id), entry
        )
        self.mesh.shared_changed(entry, True)
        return is_new, True

    def remove_subscription(self, session: Session, key_filter: str) -> bool:
        return self._drop_subscription(session, key_filter, replacing=False)

    def _drop_subscription(self, session: Session, key_filter: str, replacing: bool) -> bool:
        entry = session.subscriptions.pop(key_filter, None)
        if entry is None:
            return False
        if entry.share_group is None:
            self.subscriptions.remove(entry.topic_filter, session.client_id)
            self.mesh.interest(entry.topic_filter, -1)
        else:
            self.shared_subscriptions.remove(
                entry.topic_filter, (entry.share_group, entry.worker, session.client_id)
            )
            if not replacing:
                self.mesh.shared_changed(entry, False)
        return True

    def apply_shared_update(self, entry: SubEntry, joined: bool) -> None:
        """A shared member on another worker joined or left (from the mesh)."""
        key = (entry.share_group or "", entry.worker, entry.client_id)
        if joined:
            self.shared_subscriptions.add(entry.topic_filter, key, entry)
        else:
            self.shared_subscriptions.remove(entry.topic_filter, key)

    def forget_worker(self, worker: int) -> None:
        """Another worker died: its shared members are gone."""
        for topic_filter in list(self.shared_subscriptions.filters()):
            for key in list(self.shared_subscriptions.entries(topic_filter)):
                if key[1] == worker:
                    self.shared_subscriptions.remove(topic_filter, key)

    def _resolve(self, topic: str) -> tuple[list[Route], list[SharedRoute]]:
        generation = (self.subscriptions.generation, self.shared_subscriptions.generation)
        if generation != self._routes_generation:
            self._routes.clear()
            self._routes_generation = generation
        routes = self._routes.get(topic)
        if routes is not None:
            return routes
        by_client: dict[str, list[SubEntry]] = {}
        for client_id, entry in self.subscriptions.match(topic):
            by_client.setdefault(client_id, []).append(entry)
        normal = [(cid, tuple(entries)) for cid, entries in by_client.items()]
        groups: dict[tuple[str, str], list[SubEntry]] = {}
        for (group, _worker, _cid), entry in self.shared_subscriptions.match(topic):
            groups.setdefault((group, entry.topic_filter), []).append(entry)
        for members in groups.values():
            members.sort(key=lambda e: (e.worker, e.client_id))  # stable order for fair round robin
        routes = (normal, list(groups.items()))
        if len(self._routes) >= ROUTE_CACHE_MAX:
            self._routes.clear()
        self._routes[topic] = routes
        return routes

    # -- routing and delivery -------------------------------------------------------------------

    def publish(self, message: Message, now: float) -> bool:
        """Route a message published on this worker: here, and to every process that wants it.

        True if any subscriber may get it (for PUBACK's "no matching subscribers").
        """
        local = self.route_local(message, now)
        remote = self.mesh.forward(message)
        if not local and not remote:
            self.counters.messages_no_subscribers += 1
        return bool(local) or remote

    def route_local(self, message: Message, now: float, pick_shared: bool = True) -> int:
        """Deliver to the matching sessions of this worker; returns how many got it.

        Shared groups are picked from the members of the whole node, by the worker where the
        message was published only (`pick_shared`); a member on another worker gets the message
        through the mesh. A message that arrives from another worker is routed with
        `pick_shared=False`: its publisher already picked.
        """
        normal, shared = self._resolve(message.topic)
        sessions = self.sessions
        origin = message.origin
        qos = message.qos
        deliver = self.deliver
        count = 0
        for client_id, entries in normal:
            session = sessions[client_id]
            if len(entries) == 1:
                entry = entries[0]
                if entry.no_local and client_id == origin:
                    continue  # [MQTT-3.8.3-3]
                deliver(
                    session,
                    message,
                    entry.qos if entry.qos < qos else qos,
                    message.retain and entry.retain_as_published,
                    entry.subscription_ids,
                    now,
                )
            else:
                # Overlapping subscriptions: one copy with the highest QoS and every
                # subscription identifier [MQTT-3.3.4-2, -3].
                usable = [e for e in entries if not (e.no_local and client_id == origin)]
                if not usable:
                    continue
                best = max(e.qos for e in usable)
                ids = tuple(e.subscription_id for e in usable if e.subscription_id is not None)
                rap = any(e.retain_as_published for e in usable)
                deliver(session, message, best if best < qos else qos, message.retain and rap, ids, now)
            count += 1
        if not pick_shared:
            return count
        me = self.worker_index
        for group_key, members in shared:
            chosen = self.shared_choice.pick(
                group_key, members, lambda e: e.worker != me or sessions[e.client_id].connection is not None
            ) or self.shared_choice.pick(group_key, members)
            if chosen is None:
                continue
            granted = chosen.qos if chosen.qos < qos else qos
            retain = message.retain and chosen.retain_as_published
            if chosen.worker == me:
                deliver(sessions[chosen.client_id], message, granted, retain, chosen.subscription_ids, now)
            else:
                self.mesh.direct(
                    chosen.worker, chosen.client_id, message, granted, retain, chosen.subscription_ids
                )
            count += 1
        return count

    def pause_reading(self, pause: bool) -> None:
        """Stop (or restart) reading from every client: the mesh cannot take more for now."""
        self.reading_paused = pause
        for conn in self.connections:
            if pause:
                conn.link.pause_reading()
            else:
                conn.link.resume_reading()

    # -- retained -------------------------------------------------------------------------------

    def retain(self, message: Message, persist: bool = True) -> None:
        """Store, replace or clear (empty payload) the retained message of a topic [MQTT-3.3.1-5..7].

        `persist=False` when the caller already made the change durable (a QoS 1/2 publish).
        """
        if not message.payload:
            if self.retained.discard(message.topic) and persist:
                self.store.retained_changed(message.topic, None)
            return
        if (
            self.retained.get(message.topic) is None
            and len(self.retained) >= self.config.max_retained_messages
        ):
            log.warning("retained store full (%d), not retaining %r", len(self.retained), message.topic)
            return
        self.retained.set(message.topic, message)
        if persist:
            self.store.retained_changed(message.topic, message)

    def apply_remote_retained(self, message: Message, now: float, route: bool = True) -> None:
        """A retained publish made on another worker: keep our copy and deliver it here."""
        if not message.payload:
            self.retained.discard(message.topic)
        else:
            self.retained.set(message.topic, message)
        if route:
            self.route_local(message, now, pick_shared=False)

    def retained_for(self, topic_filter: str, now: float) -> list[Message]:
        out = []
        for topic, message in self.retained.match(topic_filter):
            if message.expired(now):
                self.retained.discard(topic)
                self.store.retained_changed(topic, None)
                continue
            out.append(message)
        return out
