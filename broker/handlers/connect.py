"""CONNECT: admit a client, create or resume its session, take it over from an older connection.

Why: the rules of the first packet are many and all in one place here — client identifier,
clean start and session expiry, will checks, keep alive, the limits the server announces in
CONNACK, and session takeover.

Must not: do IO or read the clock (`now` is given); route messages except the wills that a
takeover or a clean start releases.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.handlers.auth import authenticate
from broker.handlers.common import is_utf8, refuse_connect
from broker.limits import connect_refused, will_refused
from broker.mesh_codec import session_from_wire
from broker.ports import CLAIM_LOST
from broker.protocol.codec import MAX_PACKET_BYTES
from broker.protocol.connection import ConnectionState, ServerConnection
from broker.protocol.errors import MQTTError, ProtocolError
from broker.protocol.packets import Connack, Connect, Properties, ProtocolVersion, Will
from broker.protocol.reasons import Reason
from broker.protocol.topics import validate_topic_name
from broker.session import NEVER_EXPIRES_S, Session, SubEntry

if TYPE_CHECKING:
    from broker.acl import Access
    from broker.core import BrokerCore
    from mesh.envelope import SessionWire
    from store.records import QueuedRecord, SessionRecord

log = logging.getLogger("broker.handlers.connect")

V5 = ProtocolVersion.V5


def handle_connect(core: BrokerCore, conn: ServerConnection, packet: Connect, now: float) -> None:
    if conn.state is not ConnectionState.AWAITING_CONNECT:
        raise ProtocolError("second CONNECT on one connection [MQTT-3.1.0-2]")
    cfg = core.config
    conn.version = ProtocolVersion.V5 if packet.protocol_version is V5 else ProtocolVersion.V311
    v5 = conn.version is V5
    props = packet.properties
    conn.client_id = packet.client_id  # for the log lines of a refusal
    if conn.limits is not None and connect_refused(conn.limits, core, conn, now):
        return  # Limits: opened over the connection rate of its address (broker/limits.py)

    if core.minority:
        core.counters.connections_refused += 1
        if v5:
            conn.send(
                Connack(
                    False,
                    Reason.USE_ANOTHER_SERVER,
                    Properties(server_reference=core.minority_reference or None),
                )
            )
            conn.close("connect refused: this node is in the cluster's minority (0x9C)")
        else:
            refuse_connect(conn, Reason.SERVER_UNAVAILABLE, "this node is in the cluster's minority")
        return
    if core.connected_count >= cfg.max_connections:
        core.counters.connections_refused += 1
        refuse_connect(
            conn, Reason.QUOTA_EXCEEDED if v5 else Reason.SERVER_UNAVAILABLE, "too many connections"
        )
        return
    if v5 and props.authentication_method is not None:
        # No enhanced authentication method is supported [MQTT-4.12.0-1].
        refuse_connect(conn, Reason.BAD_AUTHENTICATION_METHOD, "unsupported authentication method")
        return

    client_id = packet.client_id
    assigned = False
    if not client_id:
        if not packet.clean_start and not v5:
            # [MQTT-3.1.3-8]
            refuse_connect(conn, Reason.CLIENT_IDENTIFIER_NOT_VALID, "empty client id needs clean session")
            return
        if not cfg.allow_empty_client_id:
            refuse_connect(conn, Reason.CLIENT_IDENTIFIER_NOT_VALID, "empty client id not allowed")
            return
        client_id = core.new_client_id()
        assigned = True

    will = packet.will
    if will is not None:
        try:
            validate_topic_name(will.topic)
        except MQTTError:
            refuse_connect(conn, Reason.TOPIC_NAME_INVALID, f"invalid will topic {will.topic!r}")
            return
        if conn.limits is not None and will_refused(conn.limits, core, conn, will.topic, now):
            return  # Limits: will topic over the topic levels / length
        if will.qos > cfg.maximum_qos:
            refuse_connect(conn, Reason.QOS_NOT_SUPPORTED, "will QoS above maximum QoS")  # [MQTT-3.2.2-12]
            return
        if will.retain and not cfg.retain_available:
            refuse_connect(conn, Reason.RETAIN_NOT_SUPPORTED, "will retain not available")  # [MQTT-3.2.2-13]
            return
        if will.properties.payload_format_indicator == 1 and not is_utf8(will.payload):
            refuse_connect(conn, Reason.PAYLOAD_FORMAT_INVALID, "will payload is not UTF-8")
            return

    authenticate(
        core,
        conn,
        packet,
        now,
        lambda username, now: _admit(core, conn, packet, client_id, assigned, username, now),
    )


def _admit(
    core: BrokerCore,
    conn: ServerConnection,
    packet: Connect,
    client_id: str,
    assigned: bool,
    username: str | None,
    now: float,
) -> None:
    """The client is who it says: check its will against the rules, then claim the client id."""
    cfg = core.config
    v5 = conn.version is V5
    props = packet.properties
    will = packet.will
    conn.username = username
    access = core.auth_table.access_for(username, client_id) if core.auth_config.enabled else None
    if will is not None and access is not None and not access.may_publish(will.topic):
        core.counters.connections_not_authorized += 1
        refuse_connect(conn, Reason.NOT_AUTHORIZED, f"will topic {will.topic!r} not authorized")
        return

    # Session expiry: 3.1.1 clean session 0 means "never expires" (capped by config).
    if v5:
        requested_expiry = props.session_expiry_interval_s or 0
    else:
        requested_expiry = 0 if packet.clean_start else NEVER_EXPIRES_S
    expiry = min(requested_expiry, cfg.max_session_expiry_s)

    keepalive = packet.keepalive_s
    server_keepalive: int | None = None
    if v5 and keepalive > cfg.max_keepalive_s:
        keepalive = server_keepalive = cfg.max_keepalive_s  # [MQTT-3.2.2-21]

    # The client's own limits.
    conn.client_id = client_id
    conn.keepalive_s = keepalive
    if v5:
        conn.client_receive_maximum = props.receive_maximum or 65535
        conn.client_max_packet_bytes = props.maximum_packet_bytes or MAX_PACKET_BYTES
        conn.client_topic_alias_maximum = props.topic_alias_maximum or 0
        conn.problem_information = props.request_problem_information != 0

    connack_props = Properties()
    if v5:
        connack_props = Properties(
            assigned_client_identifier=client_id if assigned else None,
            server_keep_alive_s=server_keepalive,
            session_expiry_interval_s=expiry if expiry != requested_expiry else None,
            receive_maximum=cfg.max_inflight if cfg.max_inflight < 65535 else None,
            maximum_packet_bytes=cfg.max_packet_bytes if cfg.max_packet_bytes < MAX_PACKET_BYTES else None,
            topic_alias_maximum=cfg.max_topic_alias or None,
            maximum_qos=cfg.maximum_qos if cfg.maximum_qos < 2 else None,
            retain_available=None if cfg.retain_available else 0,
            response_information=(
                cfg.response_information + client_id
                if props.request_response_information == 1 and cfg.response_information
                else None
            ),
        )
    # The client id may be held elsewhere in the node: claim it, and answer CONNACK once it is
    # ours (with the session the previous owner hands over). Packets that follow CONNECT wait.
    pending = _Pending(client_id, packet.clean_start, expiry, will, connack_props, access)
    if conn.held is None:  # (not None: packets held while the password was checked)
        conn.held = []
    core.connecting[client_id] = conn
    core.mesh.claim(
        client_id,
        packet.clean_start,
        now,
        lambda epoch, state, now: _claimed(core, conn, pending, epoch, state, now),
    )


@dataclass(frozen=True, slots=True)
class _Pending:
    """What CONNECT decided, kept while the client id is being claimed."""

    client_id: str
    clean_start: bool
    expiry_s: int
    will: Will | None
    connack_props: Properties
    access: Access | None


def _claimed(
    core: BrokerCore,
    conn: ServerConnection,
    pending: _Pending,
    epoch: int,
    state: SessionWire | None,
    now: float,
) -> None:
    conn.claim_epoch = epoch
    if conn.closing:
        # refused meanwhile (a newer claim elsewhere aborted it, or the CONNECT timed out)
        _not_connecting(core, conn, pending.client_id)
        core.mesh.session_ended(pending.client_id, epoch)
        return
    if epoch == CLAIM_LOST:
        _not_connecting(core, conn, pending.client_id)
        # Another node took the client id with a newer connection at the same moment: it wins.
        if not conn.link_lost:
            refuse_connect(
                conn,
                Reason.SERVER_BUSY if conn.version is V5 else Reason.SERVER_UNAVAILABLE,
                "client id taken by a newer connection on another node",
            )
            core.release_held(conn, now)
        return
    store = core.store
    if store.enabled and not pending.clean_start:
        # The store holds what a crash (or another node) left of the session: load it first.
        store.load(
            pending.client_id,
            lambda record, rows, ok, now: _loaded(core, conn, pending, epoch, state, record, rows, ok, now),
        )
        return
    _connected(core, conn, pending, epoch, state, None, (), now)


def _loaded(
    core: BrokerCore,
    conn: ServerConnection,
    pending: _Pending,
    epoch: int,
    state: SessionWire | None,
    record: SessionRecord | None,
    rows: Sequence[QueuedRecord],
    ok: bool,
    now: float,
) -> None:
    if conn.closing and not conn.link_lost:
        _not_connecting(core, conn, pending.client_id)  # aborted while the store read (see above)
        core.mesh.session_ended(pending.client_id, epoch)
        return
    if not ok:
        _not_connecting(core, conn, pending.client_id)
        core.mesh.session_ended(pending.client_id, epoch)
        if conn.link_lost:
            return
        refuse_connect(conn, Reason.SERVER_UNAVAILABLE, "the session store is unavailable")
        core.release_held(conn, now)
        return
    _connected(core, conn, pending, epoch, state, record, rows, now)


def _connected(
    core: BrokerCore,
    conn: ServerConnection,
    pending: _Pending,
    epoch: int,
    state: SessionWire | None,
    record: SessionRecord | None,
    rows: Sequence[QueuedRecord],
    now: float,
) -> None:
    _not_connecting(core, conn, pending.client_id)
    session_present, wait = _attach_session(core, conn, pending, state, record, rows, now)
    session = conn.session
    assert session is not None
    session.epoch = epoch
    session.access = access = pending.access
    if access is not None and session.queue:
        _drop_unreadable(core, session, access)
    session.will = pending.will
    session.will_at = None
    conn.state = ConnectionState.CONNECTED
    core.connected_count += 1
    if conn.link_lost:
        # The client went away while we waited: its session is ours now, and ends or stays
        # like that of any connection that drops.
        core.connection_lost(conn, now)
        return
    if conn.closing:
        return  # closed by us meanwhile (CONNECT timeout); connection_lost follows
    core.counters.connections_accepted += 1

    def answer(now: float) -> None:
        if conn.closing or conn.state is not ConnectionState.CONNECTED or conn.session is not session:
            return  # gone or taken over while the store wrote
        conn.send(Connack(session_present, Reason.SUCCESS, pending.connack_props))
        log.info(
            "client %r connected from %s (%s%s, keep alive %ds, session present %s)",
            pending.client_id,
            conn.peer,
            "5.0" if conn.version is V5 else "3.1.1",
            "" if conn.username is None else f", user {conn.username!r}",
            conn.keepalive_s,
            session_present,
        )
        if session_present:
            core.resume(session, conn, now)
        core.release_held(conn, now)

    # CONNACK waits until a session that outlives its connection, or a will, is in the store (a
    # crash right after it must not lose them [MQTT-3.1.2-8]) and until the subscriptions a
    # moved session brought are in force on every worker (a barrier, as for SUBSCRIBE).
    durable = core.store.enabled and (session.persistent or session.will is not None)
    remaining = [int(durable) + int(wait)]
    if not remaining[0]:
        core.store.session_saved(session)
        answer(now)
        return

    def one_done(now: float) -> None:
        remaining[0] -= 1
        if not remaining[0]:
            answer(now)

    if durable:
        core.store.session_saved(session, one_done)
    else:
        core.store.session_saved(session)
    if wait:
        core.mesh.barrier(now, one_done)


def _attach_session(
    core: BrokerCore,
    conn: ServerConnection,
    pending: _Pending,
    state: SessionWire | None,
    record: SessionRecord | None,
    rows: Sequence[QueuedRecord],
    now: float,
) -> tuple[bool, bool]:
    """Bind the connection to a new, resumed, handed-over or stored session; returns Session
    Present [MQTT-3.2.2-2, -3] and whether the subscriptions it brought need a mesh barrier.

    Sources, freshest first: this worker's own session, the hand-off of the worker that held it,
    the store's copy; the store's queued rows are merged into the first two by message id, so a
    message that reached only the store (a crash, a hand-off under way) is not lost.
    """
    client_id = pending.client_id
    wait = False
    session = core.sessions.get(client_id)
    if session is not None:
        core.take_over(session, pending.clean_start, now)
        if pending.clean_start:
            core.end_session(session, now)
            session = None
    if session is None and state is not None and not pending.clean_start:
        session, subscriptions = session_from_wire(client_id, state, core.worker_index, now)
        core.sessions[client_id] = session
        for key_filter, entry in subscriptions:
            wait |= core.add_subscription(session, key_filter, entry)[1]
    if session is None and record is not None and record.expiry_s > 0:
        # (a stored session of expiry 0 was kept only for its will; it is not resumed)
        session = Session(client_id, pending.expiry_s)
        core.sessions[client_id] = session
        for sub in record.subscriptions:
            wait |= core.add_subscription(
                session,
                sub.key_filter,
                SubEntry(
                    client_id,
                    sub.topic_filter,
                    sub.qos,
                    sub.no_local,
                    sub.retain_as_published,
                    sub.retain_handling,
                    sub.subscription_id,
                    sub.share_group,
                    core.worker_index,
                ),
            )[1]
    if session is not None and rows:
        known = {item.message.msg_id for item in session.inflight.values()}
        known.update(item.message.msg_id for item in session.queue)
        for row in rows:
            if row.msg_id not in known:
                session.queue.append(core.store.queued_to_outgoing(row, now))
    present = session is not None
    if session is None:
        session = Session(client_id, pending.expiry_s)
        core.sessions[client_id] = session
    if record is not None:
        session.stored = True
    session.expiry_interval_s = pending.expiry_s
    session.expires_at = None
    session.connection = conn
    conn.session = session
    return present, wait


def _drop_unreadable(core: BrokerCore, session: Session, access: Access) -> None:
    """Queued messages (from the store, or kept while offline) this client may not read now."""
    kept = [item for item in session.queue if access.may_read(item.message.topic)]
    if len(kept) == len(session.queue):
        return
    for item in session.queue:
        if not access.may_read(item.message.topic):
            core.counters.deliveries_denied += 1
            core.done_with(session, item)
    session.queue.clear()
    session.queue.extend(kept)


def _not_connecting(core: BrokerCore, conn: ServerConnection, client_id: str) -> None:
    if core.connecting.get(client_id) is conn:
        del core.connecting[client_id]


def abort_connecting(core: BrokerCore, client_id: str, epoch: int) -> bool:
    """A newer claim for `client_id` (epoch) was made elsewhere while our CONNECT still waits for
    its session: refuse ours, so that the client id is never connected twice. True if one was."""
    conn = core.connecting.get(client_id)
    if conn is None or conn.claim_epoch < 0 or conn.claim_epoch >= epoch:
        return False
    del core.connecting[client_id]
    if not conn.link_lost and not conn.closing:
        refuse_connect(
            conn,
            Reason.SERVER_BUSY if conn.version is V5 else Reason.SERVER_UNAVAILABLE,
            "client id taken by a newer connection",
        )
        core.release_held(conn, 0.0)
    return True
