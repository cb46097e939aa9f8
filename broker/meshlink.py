"""A worker's end of the node's ZeroMQ mesh: the `MeshPort` the core talks to.

Why: the core routes locally and tells this module what else must happen — offer a message to
other processes, claim a client id, hand a session over, announce a shared member, wait until
the other processes have caught up (a barrier) — and this module turns that into envelopes
(`mesh/envelope.py`) on the sockets of `mesh/PROTOCOL.md`, and the envelopes that arrive back
into core calls. It owns the worker's three sockets (XPUB, SUB, DEALER).

Must not: interpret MQTT beyond the MQTT topic matcher's literal prefixes; decide delivery (the
receiving core matches exactly); block the event loop (every socket operation is NOBLOCK; what
cannot be sent waits in the outbox, FIFO, with the MQTT clients paused).

Invariants:
- Publishes go out in the order the core offered them, per topic; an envelope that may not be
  dropped (any QoS 1/2 item, and every control envelope) is never dropped: it waits in the
  outbox, and while the outbox is not empty every later envelope queues behind it.
- The SUB socket is subscribed to exactly the literal prefixes of the worker's local
  (non-shared) subscriptions, with a reference count per prefix.
- A CONNECT's claim always completes: with the relay's answer and the previous owner's
  hand-off, or, when either does not come in time, with a fresh session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING

import zmq

from broker.config import Config
from broker.mesh_codec import item_to_message, message_to_item
from broker.mesh_control import CH_SYNC, Barrier, Claim, ControlPlane, _events, _fd, _worker_of
from broker.messages import Message
from broker.session import SubEntry
from mesh import envelope as env
from mesh.envelope import CH_DURABLE, CH_REMOTE, CH_RETAINED, CH_RETAINED_QUIET, CH_SHARED, Item, SessionWire
from mesh.errors import EnvelopeError
from mesh.routes import literal_prefix
from mesh.sockets import endpoint, send_queued

if TYPE_CHECKING:
    from broker.core import BrokerCore

log = logging.getLogger("broker.mesh")

MAX_BATCH_ITEMS = 64  # messages per publish envelope
RECV_ITEMS = 2048  # messages from the mesh handled per turn of the event loop before yielding
MESH_HOLD_S = 0.1  # longest the mesh input waits for clients whose sockets are full
QOS0_PATIENCE_S = 1.0  # how long an outbox may make no progress before QoS 0 envelopes are dropped
TIMER_S = 0.05
REMOTE_SLOT_BASE = 1 << 20
# Channels a worker's SUB sees when it subscribes to every topic but must not handle: durable-
# subscription updates (the store link reads them) and shared picks for other nodes (the relay).
_NOT_OURS = frozenset(
    {CH_DURABLE, CH_REMOTE}
)  # worker ids of other nodes' workers in the core's shared tables
POLL_S = 0.002


class WorkerMesh(ControlPlane):
    def __init__(self, config: Config, index: int, ipc_dir: str, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.index = index
        self.origin = f"w{index}"
        self.loop = loop
        self.cluster = config.cluster
        # Other processes that must take part in claims and barriers: the other workers, and in a
        # cluster the relay on behalf of the other nodes (so a single worker asks it too).
        self.peers = config.worker_count - 1 + int(config.cluster)
        mesh_cfg = config.mesh
        self.handoff_timeout_s = mesh_cfg.handoff_timeout_ms / 1000
        self.core: BrokerCore | None = None
        self.seq = time.time_ns() // 1000  # increasing across restarts of this worker
        self.incarnation = self.seq
        self.local_epoch = self.seq  # epochs of a single-worker node, increasing across restarts
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.XPUB_NODROP, 1)
        self.pub.setsockopt(zmq.SNDHWM, mesh_cfg.send_hwm)
        self.pub.bind(endpoint(ipc_dir, f"w{index}.pub"))
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, mesh_cfg.recv_hwm)
        for other in range(1, config.worker_count + 1):
            if other != index:
                self.sub.connect(endpoint(ipc_dir, f"w{other}.pub"))
        self.sub.connect(endpoint(ipc_dir, "relay.pub"))
        self.inbox = env.inbox(index)
        for channel in (self.inbox, CH_RETAINED, CH_SHARED, CH_RETAINED_QUIET):
            self.sub.subscribe(channel)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.IDENTITY, self.origin.encode())
        self.dealer.setsockopt(zmq.SNDHWM, 0)  # control traffic is small and must never be dropped
        self.dealer.setsockopt(zmq.RCVHWM, 0)
        self.dealer.connect(endpoint(ipc_dir, "relay.ctl"))

        self.local_prefixes: dict[str, int] = {}
        self.local_filters: dict[str, int] = {}
        self.retained_listeners = 0  # subscriptions to \x00R seen on our XPUB (the relay's first)  # cluster: filter -> subscriptions (routes for the relay)
        self.remote_slots: dict[tuple[str, int], int] = {}  # (node, worker) -> worker id in the core
        self.slot_names: dict[int, tuple[str, int]] = {}
        self.remote_prefixes: set[str] = set()
        self.interest_cache: dict[str, bool] = {}
        self.batches: dict[str, list[Item]] = {}
        self.outbox: deque[list[bytes]] = deque()
        self.outbox_since = 0.0  # when the outbox started to fill or last made progress
        self.paused = False
        self.req_id = 0
        self.claims: dict[int, Claim] = {}
        self.awaiting_handoff: dict[str, Claim] = {}
        self.early_handoffs: dict[tuple[str, int], SessionWire | None] = {}
        self.barriers: dict[int, Barrier] = {}
        self.sync_seen: dict[bytes, int] = {}  # token -> 1 (subscription seen) | 2 (envelope seen)
        self.snapshot: asyncio.Future[None] | None = None
        self.buffered: list[tuple[bytes, env.DataMessage]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._poll_timer: asyncio.TimerHandle | None = None
        self._next_hb = 0.0
        self._kicked = False
        self.hold_since = 0.0

    # -- lifecycle --------------------------------------------------------------------------------

    def attach(self, core: BrokerCore) -> None:
        self.core = core
        loop = self.loop
        loop.add_reader(_fd(self.sub), self._on_sub)
        loop.add_reader(_fd(self.pub), self._on_pub)
        loop.add_reader(_fd(self.dealer), self._on_dealer)
        self._timer = loop.call_later(TIMER_S, self._on_timer)
        self._poll_timer = loop.call_later(POLL_S, self._on_poll)

    def _on_poll(self) -> None:
        """Look at the sockets every POLL_S whatever their FDs said.

        ZeroMQ's FD only says "something may have changed" and can stay quiet after an
        operation consumed its signal; measured here, input then waited for the next timer (up
        to 50 ms of latency between workers). A look every 2 ms bounds that at a cost of a few
        getsockopt calls.
        """
        self._kick()
        self._poll_timer = self.loop.call_later(POLL_S, self._on_poll)

    async def join(self, timeout_s: float = 10.0) -> None:
        """Say hello to the relay and load the retained messages and shared members (Clone)."""
        self._control("hello", self.index, self.incarnation, os.getpid())
        if self.peers == 0:
            # No barrier without peers: at least wait until the relay's SUB is linked to our XPUB,
            # so that a retained message published at once reaches the relay's copy too.
            deadline = self.loop.time() + timeout_s
            while not self.retained_listeners and self.loop.time() < deadline:
                self._on_pub()
                await asyncio.sleep(0.005)
        # First make sure every live peer and we are linked both ways and see each other's
        # subscriptions (a barrier), then take the snapshot: an update sent before our links
        # existed is then in the snapshot, and every later one reaches us [Clone pattern].
        linked: asyncio.Future[None] = self.loop.create_future()

        def on_linked(now: float) -> None:
            if not linked.done():
                linked.set_result(None)

        self.barrier(self.loop.time(), on_linked)
        try:
            await asyncio.wait_for(linked, timeout_s)
        except TimeoutError:
            log.warning("worker %d: peers did not answer within %.0fs; joining anyway", self.index, timeout_s)
        self.snapshot = self.loop.create_future()
        self._control("snapshot")
        try:
            await asyncio.wait_for(self.snapshot, timeout_s)
        except TimeoutError:
            log.warning(
                "worker %d: no snapshot from the relay within %.0fs; starting without", self.index, timeout_s
            )
            self._apply_buffered({})
        self._kick()

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._control("bye", self.index)
        for sock in (self.sub, self.pub, self.dealer):
            with contextlib.suppress(zmq.ZMQError, ValueError):
                self.loop.remove_reader(_fd(sock))
            sock.close(0)
        if self._timer is not None:
            self._timer.cancel()
        if self._poll_timer is not None:
            self._poll_timer.cancel()

    # -- MeshPort: what the core asks -------------------------------------------------------------

    def forward(self, message: Message) -> bool:
        topic = message.topic
        if message.retain:
            # Every process keeps every retained message: the update goes to all of them, and
            # each routes it to its own subscribers too.
            item = message_to_item(message, self.loop.time())
            self._flush_topic(topic)
            self._send(CH_RETAINED, env.pack_publish_batch(self.origin, self._seq(), topic, (item,)), True)
            return self._interested(topic)
        if not self._interested(topic):
            return False
        batch = self.batches.get(topic)
        item = message_to_item(message, self.loop.time())
        if batch is None:
            self.batches[topic] = [item]
        else:
            batch.append(item)
            if len(batch) >= MAX_BATCH_ITEMS:
                # Envelopes stay small so that the high-water mark (counted in envelopes)
                # bounds what waits between two workers, and backpressure comes early.
                self._flush_topic(topic)
        return True

    def direct(
        self, worker: int, client_id: str, message: Message, qos: int, retain: bool, sub_ids: tuple[int, ...]
    ) -> None:
        item = message_to_item(message, self.loop.time())
        data = env.pack_directed(
            self.origin, self._seq(), client_id, qos, retain, sub_ids, message.topic, item
        )
        remote = self.slot_names.get(worker)
        if remote is not None:
            # a member on another node: its relay turns the channel into that worker's inbox
            channel = CH_REMOTE + remote[0].encode() + b"/" + str(remote[1]).encode() + b"/"
            self._send(channel, data, qos > 0)
            return
        self._send(env.inbox(worker), data, qos > 0)

    def remote_slot(self, node: str, worker: int) -> int:
        """The core's worker id for a worker of another node (above every local index)."""
        key = (node, worker)
        slot = self.remote_slots.get(key)
        if slot is None:
            slot = REMOTE_SLOT_BASE + len(self.remote_slots)
            self.remote_slots[key] = slot
            self.slot_names[slot] = key
        return slot

    def forget_node(self, node: str) -> None:
        core = self.core
        if core is None:
            return
        for (name, _worker), slot in self.remote_slots.items():
            if name == node:
                core.forget_worker(slot)

    def handoff(self, worker: int, client_id: str, epoch: int, state: SessionWire | None) -> None:
        self._send(
            env.inbox(worker), env.pack_handoff(self.origin, self._seq(), client_id, epoch, state), True
        )

    def interest(self, topic_filter: str, delta: int) -> bool:
        routed = False
        if self.cluster:
            # The relay tells the other nodes which filters this node holds (0 <-> 1 per worker).
            count = self.local_filters.get(topic_filter, 0) + delta
            if count > 0:
                self.local_filters[topic_filter] = count
                if count == 1 and delta > 0:
                    self._control("route", "+", topic_filter)
                    routed = True
            else:
                self.local_filters.pop(topic_filter, None)
                if delta < 0:
                    self._control("route", "-", topic_filter)
        return self._prefix_interest(topic_filter, delta) or routed

    def _resend_routes(self) -> None:
        log.warning(
            "worker %d: the relay restarted; sending it our %d route(s) again",
            self.index,
            len(self.local_filters),
        )
        for topic_filter in self.local_filters:
            self._control("route", "+", topic_filter)

    def _prefix_interest(self, topic_filter: str, delta: int) -> bool:
        prefix = literal_prefix(topic_filter)
        count = self.local_prefixes.get(prefix, 0) + delta
        if count > 0:
            self.local_prefixes[prefix] = count
            if count == 1 and delta > 0:
                self.sub.subscribe(prefix.encode())
                return self.peers > 0
            return False
        self.local_prefixes.pop(prefix, None)
        if delta < 0:
            self.sub.unsubscribe(prefix.encode())
        return False

    def shared_changed(self, entry: SubEntry, joined: bool) -> None:
        data = env.pack_shared_update(
            self.origin,
            self._seq(),
            "+" if joined else "-",
            entry.share_group or "",
            entry.topic_filter,
            entry.client_id,
            entry.qos,
            entry.subscription_id,
        )
        self._send(CH_SHARED, data, True)

    def flush(self) -> None:
        if self.batches:
            for topic in list(self.batches):
                self._flush_topic(topic)

    # -- sending ------------------------------------------------------------------------------------

    def _seq(self) -> int:
        self.seq += 1
        return self.seq

    def _flush_topic(self, topic: str) -> None:
        items = self.batches.pop(topic, None)
        if not items:
            return
        keep = False
        for item in items:
            if item[0]:
                keep = True
                break
        self._send(topic.encode(), env.pack_publish_batch(self.origin, self._seq(), topic, items), keep)

    def _send(self, channel: bytes, data: bytes, keep: bool) -> None:
        """Send an envelope; at the high-water mark queue it in the outbox and pause the clients.

        Backpressure, not loss, is the answer to a busy peer: the outbox keeps FIFO order and the
        publishers are slowed through TCP. Only an envelope of QoS 0 messages that would wait
        behind an outbox blocked for more than QOS0_PATIENCE_S (a peer that stopped reading) is
        dropped, and counted, so that one stuck process cannot stall QoS 0 traffic for long.
        A peer that is slow but reading keeps the outbox moving and costs nothing.
        """
        core = self.core
        outbox = self.outbox
        if not outbox:
            try:
                self.pub.send_multipart((channel, data), zmq.NOBLOCK)
            except zmq.Again:
                self.outbox_since = self.loop.time()
                outbox.append([channel, data])
                self._pause()
                return
            if core is not None:
                core.counters.mesh_envelopes_sent += 1
            return
        if not keep and self.loop.time() - self.outbox_since > QOS0_PATIENCE_S:
            # (outbox_since moves on whenever the outbox drains a little: only a peer that
            # stopped reading altogether costs QoS 0 messages, a slow one slows the publishers)
            if core is not None:
                core.counters.mesh_dropped_qos0 += 1
            return
        outbox.append([channel, data])

    def _drain_outbox(self) -> None:
        if send_queued(self.pub, self.outbox):
            self.outbox_since = self.loop.time()  # progress: the peers are reading
        if not self.outbox:
            self._resume()

    def _pause(self) -> None:
        if not self.paused and self.core is not None:
            self.paused = True
            log.warning("worker %d: mesh high-water mark reached; pausing MQTT reads", self.index)
            self.core.pause_reading(True)

    def _resume(self) -> None:
        if self.paused and self.core is not None:
            self.paused = False
            log.info("worker %d: mesh drained; resuming MQTT reads", self.index)
            self.core.pause_reading(False)

    # -- interest in a topic from other processes ------------------------------------------------

    def _interested(self, topic: str) -> bool:
        cached = self.interest_cache.get(topic)
        if cached is not None:
            return cached
        found = False
        for prefix in self.remote_prefixes:
            if topic.startswith(prefix):
                found = True
                break
        if len(self.interest_cache) > 16384:
            self.interest_cache.clear()
        self.interest_cache[topic] = found
        return found

    def _on_pub(self) -> None:
        """Subscription changes of the other processes, and room to send again."""
        pub = self.pub
        while _events(pub) & zmq.POLLIN:
            frame = pub.recv(zmq.NOBLOCK)
            subscribe = frame[:1] == b"\x01"
            topic = frame[1:]
            if topic.startswith(b"\x00"):
                if subscribe and topic.startswith(CH_SYNC):
                    self._sync_seen(topic[len(CH_SYNC) :], 1)
                elif subscribe and topic == CH_RETAINED:
                    self.retained_listeners += 1  # the relay (and other workers) hear our \x00R
                continue
            prefix = topic.decode("utf-8", "replace")
            if subscribe:
                self.remote_prefixes.add(prefix)
            else:
                self.remote_prefixes.discard(prefix)
            self.interest_cache.clear()
        if self.outbox:
            self._drain_outbox()
        self._kick()

    # -- receiving --------------------------------------------------------------------------------

    def _on_sub(self) -> None:
        """Handle what other processes sent, a bounded amount per turn of the event loop.

        One envelope can carry thousands of publishes, each for many local subscribers: the
        clients are written to after every envelope, and after RECV_ITEMS messages the rest waits
        for the next turn, so the loop keeps serving clients and timers, and memory stays bounded.
        """
        core = self.core
        if core is None:
            return
        sub = self.sub
        now = self.loop.time()
        if core.writers_paused:
            # Some clients' sockets are full: hold the mesh back for a moment, so that the
            # backpressure reaches the publishing worker (its outbox fills and it reads its
            # publishers slower) instead of this worker dropping QoS 0 for its subscribers. A
            # client that stays stuck costs the others at most MESH_HOLD_S per hold.
            if not self.hold_since:
                self.hold_since = now
            if now - self.hold_since < MESH_HOLD_S:
                return
        self.hold_since = 0.0
        budget = RECV_ITEMS
        while budget > 0:
            try:
                channel, data = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except ValueError:
                core.counters.mesh_bad_envelopes += 1
                continue
            core.counters.mesh_envelopes_received += 1
            if channel[:2] in _NOT_OURS:
                continue  # seen through a "#" subscription: the store link's or the relay's business
            try:
                message = env.unpack_data(data)
            except EnvelopeError as exc:
                core.counters.mesh_bad_envelopes += 1
                log.warning("worker %d: bad envelope on %r dropped: %s", self.index, channel[:32], exc)
                continue
            try:
                self._dispatch(channel, message, now)
            except Exception:
                log.exception("worker %d: envelope on %r failed", self.index, channel[:32])
            budget -= len(message.items) if type(message) is env.PublishBatch else 1
            core.flush()
        self._kick()

    def _dispatch(self, channel: bytes, message: env.DataMessage, now: float) -> None:
        core = self.core
        assert core is not None
        if type(message) is env.PublishBatch:
            topic = message.topic
            if channel == CH_RETAINED:
                if self.snapshot is not None and not self.snapshot.done():
                    self.buffered.append((channel, message))
                    return
                for item in message.items:
                    core.apply_remote_retained(item_to_message(topic, item, now), now)
                return
            if channel == CH_RETAINED_QUIET:
                # another node's value won the relay's merge (mesh/hlc.py): stored, never routed
                for item in message.items:
                    core.apply_remote_retained(item_to_message(topic, item, now), now, route=False)
                return
            route = core.route_local
            for item in message.items:
                route(item_to_message(topic, item, now), now, False)
        elif channel[:2] == b"\x00W" and channel != self.inbox:
            return  # another worker's inbox, seen through a subscription to every topic ("#")
        elif type(message) is env.Directed:
            core.deliver_directed(
                message.client_id,
                item_to_message(message.topic, message.item, now),
                message.qos,
                message.retain,
                message.sub_ids,
                now,
            )
        elif type(message) is env.SharedUpdate:
            if self.snapshot is not None and not self.snapshot.done():
                self.buffered.append((channel, message))
                return
            self._apply_shared(message)
        elif type(message) is env.Handoff:
            self._handoff_arrived(message.client_id, message.epoch, message.state, now)
        elif type(message) is env.SyncMarker:
            self._sync_seen(message.token, 2)

    def _apply_shared(self, message: env.SharedUpdate) -> None:
        core = self.core
        assert core is not None
        origin = message.origin
        if "/" in origin:  # a member on another node ("node/wN")
            node, _, local = origin.rpartition("/")
            index = _worker_of(local)
            if index is None:
                return
            worker: int | None = self.remote_slot(node, index)
        else:
            worker = _worker_of(origin)
        if worker is None or worker == self.index:
            return
        entry = SubEntry(
            client_id=message.client_id,
            topic_filter=message.topic_filter,
            qos=message.qos,
            subscription_id=message.sub_id,
            share_group=message.group,
            worker=worker,
        )
        core.apply_shared_update(entry, message.op == "+")

    # -- timers ------------------------------------------------------------------------------------

    def _on_timer(self) -> None:
        now = self.loop.time()
        core = self.core
        try:
            if now >= self._next_hb:
                self._next_hb = now + self.config.mesh.heartbeat_ms / 1000
                self._control("hb", self.index, self.incarnation)
                if core is not None:
                    self._control("stats", self.index, core.counters.snapshot(), core.gauges(now))
            self._control_timers(now)
            if self.outbox:
                self._drain_outbox()
            if core is not None:
                core.flush()
        except Exception:
            log.exception("worker %d: mesh timer failed", self.index)
        self._kick()
        self._timer = self.loop.call_later(TIMER_S, self._on_timer)

    def _kick(self) -> None:
        """ZeroMQ's FD is edge-triggered: after any socket use, look again for pending input."""
        if self._kicked:
            return
        if (
            _events(self.sub) & zmq.POLLIN
            or _events(self.dealer) & zmq.POLLIN
            or _events(self.pub) & zmq.POLLIN
        ):
            self._kicked = True
            self.loop.call_soon(self._on_kick)

    def _on_kick(self) -> None:
        self._kicked = False
        self._on_dealer()
        self._on_pub()
        self._on_sub()
