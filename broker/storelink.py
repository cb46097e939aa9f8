"""A worker's end of the store plane: the `SessionStore` port over ZeroMQ.

Why: a QoS 1/2 message that the broker acknowledges must already be in the database for every
persistent session it will reach [the durability promise, DESIGN.md]. The worker decides which
persistent subscriptions a message matches — from its replica of the store's persistent
subscriptions (`dsub` updates on `store.pub`, Clone pattern with `dsnap`) — sends the queue rows,
and acknowledges only when the store says `durable`. It also saves sessions, marks them online
and offline, acknowledges delivered rows, and loads a session when its client comes back.

Must not: touch the database (the store process does); decide delivery (the core does); block
(every request is asynchronous, answered through a callback).

Invariants: a callback is called exactly once; rows of one worker reach the store in the order
this worker sent them (one DEALER), so per-subscriber FIFO order holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgpack
import zmq

from broker.acl import table_from_wire
from broker.config import Config
from broker.handlers.auth import apply_auth_table
from broker.mesh_codec import props_from_wire, props_to_wire
from broker.messages import Message
from broker.protocol.packets import NO_PROPERTIES, Properties, Will
from broker.routing.topic_tree import TopicTree
from broker.session import Outgoing, Session, SubEntry
from mesh import envelope as env
from mesh.errors import EnvelopeError
from mesh.sockets import endpoint
from store import wire
from store.records import QueuedRecord, SessionRecord, SubscriptionRecord, WillRecord

if TYPE_CHECKING:
    from broker.core import BrokerCore

log = logging.getLogger("broker.store")

CH_DURABLE = b"\x00D"
CH_AUTH = b"\x00A"
POLL_S = 0.002  # see WorkerMesh._on_poll: ZeroMQ FDs can stay quiet after a signal was consumed
LoadDone = Callable[[SessionRecord | None, list[QueuedRecord], bool, float], None]
PersistDone = Callable[[bool, float], None]


def pack_props(props: Properties) -> bytes | None:
    wire_props = props_to_wire(props)
    return None if wire_props is None else msgpack.packb(wire_props)


def unpack_props(blob: bytes | None) -> Properties:
    if blob is None:
        return NO_PROPERTIES
    value = msgpack.unpackb(blob, use_list=False)
    return props_from_wire(value)


class StoreLink:
    """The worker's client of the store process."""

    enabled = True

    def __init__(self, config: Config, index: int, ipc_dir: str, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.index = index
        self.node = config.node_name
        self.loop = loop
        self.core: BrokerCore | None = None
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 2000)  # acks and saves still in the pipe at exit
        # never drop a request (the store applies backpressure by latency) nor a reply (a lost
        # "durable" would stall a publisher)
        self.dealer.setsockopt(zmq.SNDHWM, 0)
        self.dealer.setsockopt(zmq.RCVHWM, 0)
        self.dealer.setsockopt(zmq.IDENTITY, f"w{index}".encode())
        self.dealer.connect(endpoint(ipc_dir, "store.ctl"))
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.connect(endpoint(ipc_dir, "store.pub"))
        if config.cluster:
            # the other nodes' persistent subscriptions, relayed (mesh/PROTOCOL.md, the cluster plane)
            self.sub.connect(endpoint(ipc_dir, "relay.pub"))
        self.sub.subscribe(CH_DURABLE)
        self.sub.subscribe(CH_AUTH)  # users and ACL rules (broker/ACCESS.md)
        self.req_id = 0
        self.waiting: dict[int, Callable[[env.Control, float], None]] = {}
        self.sent_at: dict[int, float] = {}  # req_id -> when it was sent (insertion order = age order)
        self.durable: TopicTree[str, SubEntry] = TopicTree()
        self.durable_subs: dict[str, tuple[SubscriptionRecord, ...]] = {}
        self.acks: dict[str, list[int]] = {}
        self.snapshot_done = False
        self.buffered: list[tuple[str, object]] = []
        # Message ids identify a message's queue rows (merge on reconnect, ack). Workers of every
        # node of a cluster write rows for the same clients, so an id must be unique cluster-wide
        # without asking anyone: a random start in 2**61 and +1 per message makes two workers'
        # ranges overlap with a probability of about (messages of both) / 2**61.
        self.next_msg_id = random.getrandbits(61) + 1
        self.stats_refused = 0
        self._timer: asyncio.TimerHandle | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def attach(self, core: BrokerCore) -> None:
        self.core = core
        self.loop.add_reader(int(self.dealer.getsockopt(zmq.FD)), self._on_dealer)
        self.loop.add_reader(int(self.sub.getsockopt(zmq.FD)), self._on_sub)
        self._timer = self.loop.call_later(POLL_S, self._on_timer)

    def _on_timer(self) -> None:
        """ZeroMQ's FD is edge-triggered: look again now and then, whatever it signalled."""
        try:
            if int(self.dealer.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                self._on_dealer()
            if int(self.sub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                self._on_sub()
        except zmq.ZMQError:
            return  # closed
        self._timer = self.loop.call_later(POLL_S, self._on_timer)

    async def join(self, patience_s: float = 10.0) -> list[tuple[str, Will]]:
        """Load the persistent subscriptions; worker 1 also collects the wills a crash left due.

        The store answers once its database is open; until then the worker waits (a node must
        not accept persistent sessions it cannot find), saying so every `patience_s`.
        """
        control = await self._ask("dsnap", (), patience_s)
        (entries,) = control.body
        assert isinstance(entries, tuple)
        for client_id, subs in entries:
            self._set_durable(client_id, tuple(wire.subscription_from_wire(s) for s in subs))
        self.snapshot_done = True
        for client_id, subs in self.buffered:
            self._apply_dsub(client_id, subs)
        self.buffered = []
        if self.config.auth.enabled:
            control = await self._ask("auth", (), patience_s)
            self._apply_auth(control.body)
        if self.index != 1:
            return []
        control = await self._ask("recover", (self.node,), patience_s)
        return _wills(control)

    async def _ask(self, kind: str, body: tuple[object, ...], patience_s: float) -> env.Control:
        answer: asyncio.Future[env.Control] = self.loop.create_future()
        self._request(kind, body, lambda c, now: None if answer.done() else answer.set_result(c))
        waited_s = 0.0
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(answer), patience_s)
            except TimeoutError:
                waited_s += patience_s
                log.warning(
                    "worker %d: waiting for the store (%.0fs so far; is the database up?)",
                    self.index,
                    waited_s,
                )

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        for sock in (self.dealer, self.sub):
            with contextlib.suppress(zmq.ZMQError, ValueError):
                self.loop.remove_reader(int(sock.getsockopt(zmq.FD)))
        self.sub.close(0)
        self.dealer.close()

    # -- requests ---------------------------------------------------------------------------------

    def _request(
        self, kind: str, body: tuple[object, ...], done: Callable[[env.Control, float], None] | None
    ) -> None:
        self.req_id += 1
        if done is not None:
            self.waiting[self.req_id] = done
            self.sent_at[self.req_id] = self.loop.time()
        self.dealer.send(env.pack_control(kind, self.req_id, *body), zmq.NOBLOCK)

    def session_saved(self, session: Session, done: Callable[[float], None] | None = None) -> None:
        """Store a session that outlives its connection, or that has a will: a crash of the
        node must not lose the will of a client connected at that moment [MQTT-3.1.2-8]."""
        if session.expiry_interval_s == 0 and session.will is None:
            if session.stored:
                self.session_removed(session.client_id)
                session.stored = False
            if done is not None:
                done(self.loop.time())
            return
        session.stored = True
        will = session.will
        will_record = None
        if will is not None:
            will_record = WillRecord(
                will.topic,
                will.payload,
                will.qos,
                will.retain,
                pack_props(will.properties),
                will.properties.will_delay_interval_s or 0,
            )
        record = SessionRecord(
            session.client_id,
            session.expiry_interval_s,
            tuple(
                SubscriptionRecord(
                    key,
                    e.topic_filter,
                    e.qos,
                    e.no_local,
                    e.retain_as_published,
                    e.retain_handling,
                    e.subscription_id,
                    e.share_group,
                )
                for key, e in session.subscriptions.items()
            ),
            will_record,
            session.connection is not None,
            self.node,
            session.epoch,
            time.time(),
        )
        # Keep our replica current at once (the store's broadcast confirms it a moment later).
        self._set_durable(session.client_id, record.subscriptions)
        self._request(
            "save", (wire.session_to_wire(record),), None if done is None else lambda control, now: done(now)
        )

    def oldest_wait_ms(self, now: float) -> int:
        for sent in self.sent_at.values():
            return max(0, int((now - sent) * 1000))
        return 0

    def session_removed(self, client_id: str, done: Callable[[float], None] | None = None) -> None:
        self._set_durable(client_id, None)
        self._request("drop", (client_id,), None if done is None else lambda control, now: done(now))

    def recover(self, node: str, done: Callable[[list[tuple[str, Will]], float], None]) -> None:
        """Another node died: the store marks its sessions offline and hands out their wills."""

        def answered(control: env.Control, now: float) -> None:
            if control.kind != "wills":
                log.error("store: recovering node %s failed: %s", node, control.body)
                return
            done(_wills(control), now)

        self._request("recover", (node,), answered)

    def session_online(self, session: Session, online: bool) -> None:
        if session.stored:
            self._request("online", (session.client_id, online, self.node, session.epoch), None)

    def retained_changed(self, topic: str, message: Message | None) -> None:
        """Fire-and-forget persistence of a retained change (the durable path is `persist`)."""
        self._request("retain", (topic, self._retained_wire(message), False), None)

    def durable_targets(self, message: Message) -> list[wire.QueuedTuple]:
        """Queue rows this QoS 1/2 message needs: one per persistent session it matches."""
        matches = self.durable.match(message.topic)
        if not matches:
            return []
        by_client: dict[str, list[SubEntry]] = {}
        for client_id, entry in matches:
            if entry.no_local and client_id == message.origin:
                continue
            by_client.setdefault(client_id, []).append(entry)
        if not by_client:
            return []
        if not message.msg_id:
            self.next_msg_id += 1
            message.msg_id = self.next_msg_id
        expires_at = None
        if message.expires_at is not None:
            expires_at = time.time() + (message.expires_at - self.loop.time())
        props = pack_props(message.properties)
        rows = []
        for client_id, entries in by_client.items():
            qos = min(message.qos, max(e.qos for e in entries))
            if qos == 0:
                continue
            retain = message.retain and any(e.retain_as_published for e in entries)
            sub_ids = tuple(e.subscription_id for e in entries if e.subscription_id is not None)
            rows.append(
                (
                    client_id,
                    message.msg_id,
                    qos,
                    retain,
                    sub_ids,
                    message.topic,
                    message.payload,
                    props,
                    message.origin,
                    expires_at,
                    0,
                )
            )
        return rows

    def persist(
        self,
        message: Message,
        rows: list[wire.QueuedTuple],
        retained: bool,
        may_refuse: bool,
        done: PersistDone,
    ) -> None:
        """Make rows (and the retained change) durable; done(True) after the commit."""
        pending = (1 if rows else 0) + (1 if retained else 0)
        results: list[bool] = []

        def one(control: env.Control, now: float) -> None:
            results.append(control.kind == "durable")
            if len(results) == pending:
                ok = all(results)
                if not ok:
                    self.stats_refused += 1
                done(ok, now)

        if retained:
            self._request("retain", (message.topic, self._retained_wire(message), may_refuse), one)
        if rows:
            self._request("enqueue", (tuple(rows), may_refuse), one)

    def ack(self, client_id: str, msg_id: int) -> None:
        acks = self.acks.get(client_id)
        if acks is None:
            self.acks[client_id] = [msg_id]
        else:
            acks.append(msg_id)

    def load(self, client_id: str, done: LoadDone) -> None:
        def loaded(control: env.Control, now: float) -> None:
            if control.kind != "loaded":
                log.error("store: cannot load session %r: %s", client_id, control.body)
                done(None, [], False, now)
                return
            record_wire, rows = control.body
            record = None if record_wire is None else wire.session_from_wire(record_wire)
            assert isinstance(rows, tuple)
            done(record, [wire.queued_from_wire(r) for r in rows], True, now)

        self.flush()  # acks sent before the load are applied before it
        self._request("load", (client_id,), loaded)

    def flush(self) -> None:
        if self.acks:
            for client_id, msg_ids in self.acks.items():
                self._request("ack", (client_id, tuple(msg_ids)), None)
            self.acks = {}

    # -- conversions ------------------------------------------------------------------------------

    def _retained_wire(self, message: Message | None) -> wire.RetainedTuple | None:
        if message is None or not message.payload:
            return None
        expires_at = None
        if message.expires_at is not None:
            expires_at = time.time() + (message.expires_at - self.loop.time())
        return (
            message.topic,
            message.payload,
            message.qos,
            pack_props(message.properties),
            message.origin,
            expires_at,
            time.time(),
        )

    def queued_to_outgoing(self, row: QueuedRecord, now: float) -> Outgoing:
        expires_at = None if row.expires_at is None else now + (row.expires_at - time.time())
        message = Message(
            row.topic,
            row.payload,
            row.qos,
            row.retain,
            unpack_props(row.props),
            row.origin,
            expires_at,
            row.msg_id,
        )
        return Outgoing(message, row.qos, row.retain, row.sub_ids)

    # -- replica of the persistent subscriptions ----------------------------------------------------

    def _set_durable(self, client_id: str, subs: tuple[SubscriptionRecord, ...] | None) -> None:
        old = self.durable_subs.pop(client_id, None)
        if old is not None:
            for s in old:
                if s.share_group is None:
                    self.durable.remove(s.topic_filter, client_id)
        if subs is None:
            return
        self.durable_subs[client_id] = subs
        for s in subs:
            if s.share_group is None:
                self.durable.add(
                    s.topic_filter,
                    client_id,
                    SubEntry(
                        client_id,
                        s.topic_filter,
                        s.qos,
                        s.no_local,
                        s.retain_as_published,
                        s.retain_handling,
                        s.subscription_id,
                    ),
                )

    def _apply_dsub(self, client_id: str, subs: object) -> None:
        if subs is None:
            self._set_durable(client_id, None)
        else:
            assert isinstance(subs, tuple)
            self._set_durable(client_id, tuple(wire.subscription_from_wire(s) for s in subs))

    # -- receiving ----------------------------------------------------------------------------------

    def _on_dealer(self) -> None:
        now = self.loop.time()
        dealer = self.dealer
        while int(dealer.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            frame = dealer.recv(zmq.NOBLOCK)
            try:
                control = env.unpack_control(frame)
            except EnvelopeError as exc:
                log.warning("store: bad reply dropped: %s", exc)
                continue
            done = self.waiting.pop(control.req_id, None)
            self.sent_at.pop(control.req_id, None)
            if done is None:
                continue
            try:
                done(control, now)
            except Exception:
                log.exception("store: handling %s failed", control.kind)
        if self.core is not None:
            self.core.flush()

    def _on_sub(self) -> None:
        sub = self.sub
        while int(sub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            try:
                _channel, frame = sub.recv_multipart(zmq.NOBLOCK)
                control = env.unpack_control(frame)
            except (ValueError, EnvelopeError) as exc:
                log.warning("store: bad subscription update dropped: %s", exc)
                continue
            if control.kind == "authtable":
                self._apply_auth(control.body)
                continue
            client_id, subs = control.body
            if not self.snapshot_done:
                self.buffered.append((str(client_id), subs))
            else:
                self._apply_dsub(str(client_id), subs)

    def _apply_auth(self, body: tuple[object, ...]) -> None:
        """A table of users and rules from the store (a snapshot, or a broadcast after a change)."""
        core = self.core
        if core is None:
            return
        try:
            version, users, rules = wire.authtable_from_wire(body)
        except wire.WireError as exc:
            log.warning("store: bad users/rules table dropped: %s", exc)
            return
        if version < core.auth_table.version:
            return  # an older snapshot than a broadcast already applied
        table = table_from_wire(
            version,
            ((u.username, u.password_hash, u.admin) for u in users),
            ((r.id, r.user, r.topic, r.access) for r in rules),
            core.config_rules,
            core.auth_table.no_match_allow,
        )
        apply_auth_table(core, table)


def _wills(control: env.Control) -> list[tuple[str, Will]]:
    (wills,) = control.body
    assert isinstance(wills, tuple)
    out = []
    for client_id, will_wire in wills:
        w = wire.will_from_wire(will_wire)
        out.append((str(client_id), Will(w.topic, w.payload, w.qos, w.retain, unpack_props(w.props))))
    return out
