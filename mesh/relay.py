"""The relay: the node's one process that knows the whole node.

Why: some questions have one answer per node, not per worker — which worker holds client id X
(and with which epoch), which workers are alive, what the retained messages and shared members
are for a worker that just started — so one process answers them, over the control plane of
`mesh/PROTOCOL.md`. It also counts the acknowledgements of subscription barriers. (The cluster
issue adds its links to other nodes here.)

Must not: import the broker; touch MQTT payloads beyond keeping retained items as opaque wire
tuples; sit on the data path between workers (they talk to each other directly).

Invariants:
- Epochs only grow, also across relay restarts (they start from the clock in microseconds).
- A client id maps to at most one worker; a claim always gets an answer; a `release` goes only
  to a worker believed alive.
- Snapshot marks say, per origin, the last update included, so a joining worker drops exactly
  the buffered updates the snapshot already holds (Clone pattern).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections import deque
from dataclasses import dataclass, field

import msgpack
import zmq

from mesh import envelope as env
from mesh.cluster import ClusterLinks, LinkSettings
from mesh.envelope import CH_DURABLE, CH_REMOTE, CH_RETAINED, CH_SHARED, Item
from mesh.errors import EnvelopeError
from mesh.hlc import HybridClock, MergePolicy, Stamp
from mesh.http import HttpApi
from mesh.relay_cluster import ClusterRelay, ClusterState
from mesh.relay_view import RelayView
from mesh.sockets import DRAIN_SIGNAL, STOP_SIGNAL, endpoint, send_queued

log = logging.getLogger("mesh.relay")

MISSED_BEATS = 3
EXIT_CONFIG = 3  # the supervisor stops the node instead of restarting the relay (as for the store)


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """The relay's part of `-cluster` (from `Mesh` in the config; see mesh/cluster.py)."""

    links: LinkSettings
    handoff_timeout_ms: int = 3000
    mesh_config: object = None  # broker.config.MeshConfig (duck-typed: mesh never imports broker)
    curve_key_file: str = ""
    curve_allowed_dir: str = ""
    plaintext: bool = False
    minimum_cluster_size: int = 0  # split-brain protection (0 = off)
    allow_connect: bool = False  # keep serving clients in the minority
    allow_publish: bool = True  # with allow_connect: accept PUBLISH in the minority
    allow_subscribe: bool = True  # with allow_connect: accept SUBSCRIBE in the minority
    server_reference: str = ""  # sent with 0x9C to the clients of a minority node
    merge_policy: str = "LATEST_UPDATE"  # Cluster.MergePolicy.Type: retained messages after a split


@dataclass(frozen=True, slots=True)
class RelaySettings:
    ipc_dir: str
    worker_count: int
    heartbeat_ms: int = 1000
    recv_hwm: int = 10_000
    send_hwm: int = 10_000
    store: bool = False  # a store process holds the retained messages of earlier runs
    node: str = ""
    cluster: ClusterSettings | None = None
    http_host: str = ""
    http_port: int = 0  # 0: no HTTP port
    http_token: str = field(default="", repr=False)
    version: str = ""
    sys_interval_s: int = 0  # $SYS/meshmq/<node>/... every this many seconds; 0 = none


@dataclass(slots=True)
class _Worker:
    incarnation: int
    last_seen: float


@dataclass(slots=True)
class _Sync:
    identity: bytes
    req_id: int
    waiting: set[int]
    deadline: float
    marks: dict[str, int] = field(default_factory=dict)  # peer node -> stream seq it must acknowledge
    # Cluster: the marks are taken when this relay sees the worker's `Y` envelope on its SUB,
    # behind whatever the worker published before (retained updates travel there, not on the
    # DEALER that carries `sync`), so that a barrier covers them on every node too.
    relay_seen: bool = True


@dataclass(slots=True)
class RelayState:
    """Everything the relay knows, without sockets (so it can be tested alone)."""

    workers: dict[int, _Worker] = field(default_factory=dict)
    registry: dict[str, tuple[int, int]] = field(default_factory=dict)  # client id -> (worker, epoch)
    epoch: int = field(default_factory=lambda: time.time_ns() // 1000)
    retained: dict[str, tuple[Item, float]] = field(default_factory=dict)
    # topic -> (stamp, hits) of its last change, kept for clears too (tombstones): mesh/hlc.py
    retained_meta: dict[str, tuple[Stamp, int]] = field(default_factory=dict)
    shared: dict[tuple[str, str, str, str], env.SharedUpdate] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)
    syncs: dict[str, _Sync] = field(default_factory=dict)
    early_seen: dict[str, set[int]] = field(default_factory=dict)
    early_marks: dict[str, dict[str, int]] = field(default_factory=dict)  # Y seen before its `sync`

    def alive(self, worker: int) -> bool:
        return worker in self.workers

    def claim(self, client_id: str, worker: int) -> tuple[int, int | None]:
        """Give `client_id` to `worker`: (new epoch, previous holder if it must release)."""
        self.epoch += 1
        previous = self.registry.get(client_id)
        self.registry[client_id] = (worker, self.epoch)
        if previous is None:
            return self.epoch, None
        holder = previous[0]
        if holder == worker or self.alive(holder):
            return self.epoch, holder
        return self.epoch, None

    def unregister(self, client_id: str, epoch: int) -> None:
        current = self.registry.get(client_id)
        if current is not None and current[1] == epoch:
            del self.registry[client_id]

    def forget(self, worker: int) -> None:
        """A worker died or left: its clients and shared members are gone."""
        self.workers.pop(worker, None)
        for client_id in [c for c, (w, _) in self.registry.items() if w == worker]:
            del self.registry[client_id]
        origin = f"w{worker}"
        for key in [k for k in self.shared if k[2] == origin]:
            del self.shared[key]
        for sync in self.syncs.values():
            sync.waiting.discard(worker)

    def apply(self, channel: bytes, message: env.DataMessage, now: float, mark: bool = True) -> None:
        if isinstance(message, env.PublishBatch) and channel == CH_RETAINED:
            for item in message.items:
                if item[2]:
                    self.retained[message.topic] = (item, now)
                else:
                    self.retained.pop(message.topic, None)
        elif isinstance(message, env.SharedUpdate):
            # origin: "wN" for our workers, "node/wN" for a worker of another node
            if _worker_of(message.origin.rpartition("/")[2]) is None:
                return
            key = (message.group, message.topic_filter, message.origin, message.client_id)
            if message.op == "+":
                self.shared[key] = message
            else:
                self.shared.pop(key, None)
        else:
            return
        if mark:
            self.marks[message.origin] = message.seq

    def snapshot(
        self, now: float
    ) -> tuple[dict[str, int], tuple[tuple[str, Item], ...], tuple[tuple[object, ...], ...]]:
        shared = tuple(
            (m.origin, m.seq, m.op, m.group, m.topic_filter, m.client_id, m.qos, m.sub_id)
            for m in self.shared.values()
        )
        return dict(self.marks), self.snapshot_retained(now), shared

    def snapshot_retained(self, now: float) -> tuple[tuple[str, Item], ...]:
        """The retained messages with their remaining lifetimes (expired ones are dropped)."""
        retained: list[tuple[str, Item]] = []
        for topic, (item, stored_at) in list(self.retained.items()):
            expiry_ms = item[5]
            if expiry_ms is not None:
                left = expiry_ms - int((now - stored_at) * 1000)
                if left <= 0:
                    del self.retained[topic]
                    continue
                item = (*item[:5], left, item[6])
            retained.append((topic, item))
        return tuple(retained)


def _worker_of(origin: str) -> int | None:
    if origin.startswith("w") and origin[1:].isdigit():
        return int(origin[1:])
    return None


class Relay(ClusterRelay, RelayView):
    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.state = RelayState()
        self.clock = HybridClock(settings.node)
        self.merge_policy = MergePolicy(
            settings.cluster.merge_policy if settings.cluster else "LATEST_UPDATE"
        )
        self.init_view()
        self.draining = False
        self.minority = False
        self.http: HttpApi | None = None
        self._store_dealer: zmq.Socket[bytes] | None = None
        self.store_stats: dict[str, object] = {}  # the store's writer figures (sstate)
        self.node = settings.node
        self.cluster = ClusterState()
        self.links: ClusterLinks | None = None
        self.authenticator: object | None = None
        self.pub_outbox: deque[list[bytes]] = deque()
        self._next_check = 0.0
        self._next_tick = 0.0
        self._next_sys = 0.0
        self._sys_seq = time.time_ns() // 1000
        # sockets used since the loop last read their EVENTS (0 relay.ctl, 1 sub, 2 relay.pub):
        # any operation may consume a ZeroMQ FD's signal, so these are looked at again
        self._touched: set[int] = set()
        cluster = settings.cluster
        self.handoff_timeout_s = (cluster.handoff_timeout_ms if cluster is not None else 3000) / 1000
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # A dropped reply (a claim, a barrier) would leave a client waiting: no high-water mark.
        self.router.setsockopt(zmq.SNDHWM, 0)
        self.router.setsockopt(zmq.RCVHWM, 0)
        self.router.bind(endpoint(settings.ipc_dir, "relay.ctl"))
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.XPUB_NODROP, 1)  # traffic from other nodes: backpressure, not loss
        self.pub.setsockopt(zmq.SNDHWM, settings.send_hwm)
        self.pub.bind(endpoint(settings.ipc_dir, "relay.pub"))
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, settings.recv_hwm)
        for index in range(1, settings.worker_count + 1):
            self.sub.connect(endpoint(settings.ipc_dir, f"w{index}.pub"))
        self.sub.subscribe(CH_RETAINED)
        self.sub.subscribe(CH_SHARED)
        if cluster is not None:
            self.sub.subscribe(CH_REMOTE)
            if settings.store:
                self.sub.connect(endpoint(settings.ipc_dir, "store.pub"))
                self.sub.subscribe(CH_DURABLE)
            self.links = self._open_links(cluster)
        self.running = True

    def _open_links(self, cluster: ClusterSettings) -> ClusterLinks:
        curve_server = curve_client = None
        public_key = ""
        if not cluster.plaintext:
            from mesh import curve

            keys = curve.load_keys(cluster.curve_key_file, cluster.curve_allowed_dir)
            public_key = keys.public.decode("ascii")
            self.authenticator = curve.start_authenticator(self.ctx, keys)

            def curve_server(sock: zmq.Socket[bytes]) -> None:
                curve.server_socket(sock, keys)

            def curve_client(sock: zmq.Socket[bytes], node: str) -> bool:
                server_key = keys.public if keys.shared else keys.peers.get(node)
                if server_key is None:
                    log.warning("no CURVE key for node %r (per-node keys need its name): not dialled", node)
                    return False
                curve.client_socket(sock, keys, server_key)
                return True
        else:
            log.warning(
                "Mesh.Plaintext: the links to other nodes are NOT encrypted or authenticated; "
                "use Mesh.Curve on any network you do not fully trust"
            )
        links_settings = cluster.links
        discovery = None
        if cluster.mesh_config is not None:
            from mesh.discovery import build_discovery

            incarnation = time.time_ns() // 1000
            discovery = build_discovery(
                cluster.mesh_config, self.node, incarnation, links_settings.advertise_host, public_key
            )
        links = ClusterLinks(self.ctx, links_settings, self, discovery, curve_server, curve_client)
        log.info(
            "cluster %r: node %s listening for nodes on %s:%d (advertised as %s)",
            links_settings.cluster_name,
            self.node,
            links_settings.bind_host,
            links_settings.port,
            links_settings.advertise_host,
        )
        return links

    def load_retained(self, timeout_s: float = 60.0) -> None:
        """Ask the store for the retained messages it keeps (the node restarted)."""
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint(self.settings.ipc_dir, "store.ctl"))
        try:
            dealer.send(env.pack_control("rsnap", 1))
            if not dealer.poll(int(timeout_s * 1000)):
                log.error("the store did not send the retained messages within %.0fs", timeout_s)
                return
            control = env.unpack_control(dealer.recv())
        finally:
            dealer.close(0)
        if control.kind != "rstate":
            log.error("the store could not send the retained messages: %s", control.body)
            return
        now, wall = time.monotonic(), time.time()
        (records,) = control.body
        assert isinstance(records, tuple)
        for topic, payload, qos, props, origin, expires_at, _updated in records:
            expiry_ms = None if expires_at is None else int((expires_at - wall) * 1000)
            if expiry_ms is not None and expiry_ms <= 0:
                continue
            props_tuple = None if props is None else msgpack.unpackb(props, use_list=False)
            self.state.retained[topic] = ((qos, True, payload, origin, props_tuple, expiry_ms, 0), now)
        log.info("%d retained message(s) loaded from the store", len(self.state.retained))

    def serve(self) -> None:
        if self.settings.store:
            self.load_retained()
        if self.settings.http_port:
            try:
                self.http = HttpApi(
                    self, self.settings.http_host, self.settings.http_port, self.settings.http_token
                )
            except OSError as exc:
                log.error(
                    "Http.Port %d on %r: cannot listen (%s); stopping the node",
                    self.settings.http_port,
                    self.settings.http_host,
                    exc,
                )
                raise SystemExit(EXIT_CONFIG) from None
            self.http.start()
        try:
            self._serve()
        finally:
            if self.http is not None:
                self.http.close()

    def _serve(self) -> None:
        links = self.links
        sockets = [self.router, self.sub, self.pub] + ([links.router] if links is not None else [])
        # One epoll set over the sockets' FDs, registered once (zmq.Poller sets up its items at
        # every call, which cost more than the forwarding itself at moderate rates). A ZeroMQ FD
        # only says "look again": the loop reads EVENTS of every socket and blocks only when none
        # has input, so no wake-up is ever missed.
        waiter = select.epoll()
        by_fd: dict[int, int] = {}
        for index, sock in enumerate(sockets):
            fd = int(sock.getsockopt(zmq.FD))
            by_fd[fd] = index
            waiter.register(fd, select.EPOLLIN)
        # A stop or drain signal wakes the wait at once (Python retries an interrupted epoll
        # with the rest of its timeout): the signal's byte lands on this pipe.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            previous_wakeup: int | None = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread (tests run a relay in a thread): no signals here
            previous_wakeup = None
        waiter.register(wake_r, select.EPOLLIN)
        beat_s = self.settings.heartbeat_ms / 1000
        self._next_check = time.monotonic() + beat_s
        self._next_tick = 0.0
        log.info("relay up (pid %d, %d workers)", os.getpid(), self.settings.worker_count)
        pollin = zmq.POLLIN
        look = set(range(len(sockets)))  # sockets whose EVENTS may have changed
        has_input = [False] * len(sockets)
        touched = self._touched
        while self.running:
            for index in look:
                has_input[index] = bool(int(sockets[index].getsockopt(zmq.EVENTS)) & pollin)
            look.clear()
            router_in, sub_in, pub_in = has_input[0], has_input[1], has_input[2]
            links_in = links is not None and has_input[3]
            backlogged = links is not None and links.backlogged()
            if not (router_in or (sub_in and not backlogged) or pub_in or (links_in and not self.pub_outbox)):
                if links is not None and links.acks_pending:
                    timeout_s = 0.002
                elif self.pub_outbox or backlogged:
                    timeout_s = 0.005
                else:
                    timeout_s = 0.02 if links is not None else beat_s / 2
                for fd, _event in waiter.poll(timeout_s):
                    if fd == wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 512)
                        continue
                    look.add(by_fd[fd])
                if sub_in:
                    look.add(1)  # input held back by backpressure: look again
                if links_in:
                    look.add(3)
                with self.lock:
                    self._timers(time.monotonic())
                look |= touched
                touched.clear()
                continue
            now = time.monotonic()
            self.lock.acquire()  # the HTTP thread reads our state between turns (relay_view.py)
            try:
                self._turn(now, router_in, sub_in, pub_in, links_in, backlogged, look)
            finally:
                self.lock.release()
            look |= touched
            touched.clear()
        waiter.close()
        if previous_wakeup is not None:
            signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        if links is not None:
            links.leave()
            links.flush_outboxes()
            links.close()
        if self.authenticator is not None:
            self.authenticator.stop()  # type: ignore[attr-defined]
        if self._store_dealer is not None:
            self._store_dealer.close(0)
        for sock in (self.router, self.sub, self.pub):
            sock.close(0)
        log.info("relay stopped")

    def _turn(
        self,
        now: float,
        router_in: bool,
        sub_in: bool,
        pub_in: bool,
        links_in: bool,
        backlogged: bool,
        look: set[int],
    ) -> None:
        """One turn of the loop over the sockets that have input (under the view's lock)."""
        links = self.links
        if router_in:
            self._drain_router(now)
            look.add(0)
        if self.pub_outbox:
            self._flush_pub()
        if links is not None:
            links.flush_outboxes()
            if links_in:
                look.add(3)
                if self.pub_outbox:
                    links.hold(now)  # backpressure: peer frames wait in TCP, peers stay alive
                else:
                    links.drain(now)
        if sub_in:
            look.add(1)
            if not backlogged:
                self._drain_sub(now)
        if pub_in:
            look.add(2)
            while int(self.pub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                self.pub.recv()  # subscription changes of the workers: nothing to do with them
        self._timers(now)

    def _timers(self, now: float) -> None:
        self.serve_requests()
        interval = self.settings.sys_interval_s
        if interval and now >= self._next_sys and len(self.state.workers) >= self.settings.worker_count:
            self._next_sys = now + interval
            self._publish_sys(now)
        links = self.links
        if links is not None:
            if self.pub_outbox:
                self._flush_pub()
            links.flush_outboxes()
            links.flush_acks(now)
            if now >= self._next_tick:
                self._next_tick = now + 0.02
                links.tick(now)
                self.cluster_timers(now)
                self._complete_syncs(now)
        if now >= self._next_check:
            self._next_check = now + self.settings.heartbeat_ms / 1000
            self._check_liveness(now, self.settings.heartbeat_ms / 1000)
            if self.settings.store:
                self._poll_store()
                with contextlib.suppress(zmq.ZMQError):
                    self._store().send(env.pack_control("sstats", 0), zmq.NOBLOCK)

    def _store(self) -> zmq.Socket[bytes]:
        if self._store_dealer is None:
            self._store_dealer = self.ctx.socket(zmq.DEALER)
            self._store_dealer.setsockopt(zmq.LINGER, 0)
            self._store_dealer.connect(endpoint(self.settings.ipc_dir, "store.ctl"))
        return self._store_dealer

    def _poll_store(self) -> None:
        """Answers of the store: its figures (`sstate`); retain answers are not awaited."""
        dealer = self._store()
        while dealer.poll(0):
            try:
                control = env.unpack_control(dealer.recv())
            except EnvelopeError:
                continue
            if control.kind == "sstate" and isinstance(control.body[0], dict):
                self.store_stats = control.body[0]

    def _store_retained(self, topic: str, item: Item | None) -> None:
        """Write a retained message (or its clear) to the store: the result of a merge."""
        dealer = self._store()
        retained = None
        if item is not None:
            qos, _retain, payload, origin, props, expiry_ms, _msg_id = item
            wall = time.time()
            retained = (
                topic,
                payload,
                qos,
                None if props is None else msgpack.packb(props, use_bin_type=True),
                origin,
                None if expiry_ms is None else wall + expiry_ms / 1000,
                wall,
            )
        with contextlib.suppress(zmq.ZMQError):
            dealer.send(env.pack_control("retain", 0, topic, retained, False), zmq.NOBLOCK)
        self._poll_store()

    def _publish_sys(self, now: float) -> None:
        """$SYS topics as retained messages: to our workers, and to every other node."""
        origin = f"{self.node}/sys"
        for topic, payload in self.sys_messages():
            self._sys_seq += 1
            item: Item = (0, True, payload, "", None, None, 0)
            data = env.pack_publish_batch(origin, self._sys_seq, topic, (item,))
            self.state.apply(CH_RETAINED, env.unpack_data(data), now)
            stamp, hits = self.stamp_retained(topic)
            self._publish_local([CH_RETAINED, data])
            if self.links is not None:
                self.links.broadcast("d", (list(stamp), hits), (CH_RETAINED, data))

    # -- towards our workers -------------------------------------------------------------------------

    def _publish_local(self, parts: list[bytes]) -> None:
        self._touched.add(2)
        if self.pub_outbox:
            self.pub_outbox.append(parts)
            return
        try:
            self.pub.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            self.pub_outbox.append(parts)

    def _flush_pub(self) -> None:
        self._touched.add(2)
        send_queued(self.pub, self.pub_outbox)

    # -- control plane ---------------------------------------------------------------------------

    def _reply(self, identity: bytes, kind: str, req_id: int, *body: object) -> None:
        self._touched.add(0)
        try:
            self.router.send_multipart((identity, env.pack_control(kind, req_id, *body)), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("cannot send %s to %r: %s", kind, identity, exc)

    def _drain_router(self, now: float) -> None:
        for _ in range(1024):
            try:
                identity, frame = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            try:
                control = env.unpack_control(frame)
            except EnvelopeError as exc:
                log.warning("bad control frame from %r dropped: %s", identity, exc)
                continue
            try:
                self._on_control(identity, control, now)
            except Exception:
                log.exception("control %r from %r failed", control.kind, identity)

    def _on_control(self, identity: bytes, control: env.Control, now: float) -> None:
        state = self.state
        kind, body, req = control.kind, control.body, control.req_id
        sender = _worker_of(identity.decode("ascii", "replace"))
        if kind in ("hello", "hb"):
            index, incarnation = body[0], body[1]
            assert isinstance(index, int) and isinstance(incarnation, int)
            known = state.workers.get(index)
            if known is not None and known.incarnation != incarnation:
                self._worker_gone(index, "restarted")
            if known is None or known.incarnation != incarnation:
                log.info("worker %d joined (incarnation %d)", index, incarnation)
                state.workers[index] = _Worker(incarnation, now)
                if self.minority:
                    self._tell_worker_minority(identity)
                if kind == "hb" and self.links is not None:
                    # a worker we never heard say hello: we restarted, and lost what it told us
                    self._reply(identity, "resync", 0)
            else:
                known.last_seen = now
        elif kind == "bye":
            (leaving,) = body
            assert isinstance(leaving, int)
            self._worker_gone(leaving, "left")
        elif kind == "claim" and sender is not None:
            client_id, clean_start = body
            assert isinstance(client_id, str)
            epoch, holder = state.claim(client_id, sender)
            if holder is not None and holder != sender:
                self._reply(f"w{holder}".encode(), "release", 0, client_id, epoch, sender, bool(clean_start))
            if not self.cluster_claim(identity, req, client_id, epoch, holder, bool(clean_start), now):
                self._reply(identity, "claimed", req, client_id, epoch, holder, False)
                if self.links is not None:
                    self.links.broadcast("reg", (client_id, epoch, sender))
        elif kind == "register" and sender is not None:
            # a single-worker node's claim, answered by the worker itself (no other holder)
            registered_id, registered_epoch = body
            assert isinstance(registered_id, str) and isinstance(registered_epoch, int)
            state.registry[registered_id] = (sender, registered_epoch)
        elif kind == "unregister":
            client_id, ended_epoch = body
            assert isinstance(client_id, str) and isinstance(ended_epoch, int)
            current = state.registry.get(client_id)
            state.unregister(client_id, ended_epoch)
            if current is not None and current[1] == ended_epoch:
                self.cluster_unregister(client_id, ended_epoch)
        elif kind == "stats":
            index, counters, gauges = body
            assert isinstance(index, int)
            self.worker_reported(index, counters, gauges, now)
        elif kind == "released":
            released_id, released_epoch = body
            assert isinstance(released_id, str) and isinstance(released_epoch, int)
            self.cluster_released(released_id, released_epoch)
        elif kind == "route" and sender is not None:
            op, topic_filter = body
            assert isinstance(op, str) and isinstance(topic_filter, str)
            self.local_route(sender, op, topic_filter)
        elif kind == "snapshot":
            marks, retained, shared = state.snapshot(now)
            self._reply(identity, "snap", req, marks, retained, shared)
        elif kind == "sync" and sender is not None:
            (token,) = body
            assert isinstance(token, str)
            waiting = set(state.workers) - {sender} - state.early_seen.pop(token, set())
            if self.links is None:
                state.syncs[token] = _Sync(identity, req, waiting, now + 2.0, self.sync_marks())
            else:
                seen = token in state.early_marks
                marks = state.early_marks.pop(token) if seen else {}
                state.syncs[token] = _Sync(identity, req, waiting, now + 2.0, marks, seen)
            self._complete_syncs()
        elif kind == "seen":
            token, seen_by = body
            assert isinstance(token, str) and isinstance(seen_by, int)
            sync = state.syncs.get(token)
            if sync is None:
                state.early_seen.setdefault(token, set()).add(seen_by)
                if len(state.early_seen) > 10_000:
                    state.early_seen.clear()
                return
            sync.waiting.discard(seen_by)
            self._complete_syncs()

    def _complete_syncs(self, now: float | None = None) -> None:
        for token, sync in list(self.state.syncs.items()):
            done = not sync.waiting and sync.relay_seen and self.marks_reached(sync.marks)
            if done or (now is not None and now >= sync.deadline):
                if not done:
                    log.warning(
                        "barrier %s completed without workers %s / nodes %s",
                        token,
                        sorted(sync.waiting),
                        sorted(sync.marks),
                    )
                del self.state.syncs[token]
                self._reply(sync.identity, "synced", sync.req_id, token)

    def _worker_gone(self, index: int, why: str) -> None:
        if index not in self.state.workers:
            return
        log.warning("worker %d %s; forgetting its clients and shared members", index, why)
        gone = [c for c, (w, _) in self.state.registry.items() if w == index]
        self.state.forget(index)
        for client_id in gone:
            self.cluster_unregister(client_id, 0)
        self.forget_worker_routes(index)
        for other in self.state.workers:
            self._reply(f"w{other}".encode(), "dead", 0, index)
        self._complete_syncs()

    def _check_liveness(self, now: float, beat_s: float) -> None:
        for index, worker in list(self.state.workers.items()):
            if now - worker.last_seen > MISSED_BEATS * beat_s:
                self._worker_gone(index, f"missed {MISSED_BEATS} heartbeats")
        self._complete_syncs(now)

    # -- data plane (retained, shared members, traffic for other nodes) -------------------------

    def _drain_sub(self, now: float) -> None:
        cluster = self.links is not None
        message: env.DataMessage | None
        for _ in range(1024):
            try:
                channel, data = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            if channel in (CH_RETAINED, CH_SHARED):
                try:
                    message = env.unpack_data(data)
                except EnvelopeError as exc:
                    log.warning("bad envelope on %r dropped: %s", channel[:32], exc)
                    continue
                self.state.apply(channel, message, now)
                if channel == CH_RETAINED and isinstance(message, env.PublishBatch):
                    self.stamp_retained(message.topic)
            else:
                message = None
            if cluster:
                self.forward_local(channel, data, now, message)
                if isinstance(message, env.SyncMarker):
                    self._relay_saw(message.token)

    def _relay_saw(self, token: bytes) -> None:
        """A worker's barrier marker reached this relay: what it published before is on its way
        to every peer (forwarded above), so the barrier's marks are taken now."""
        state = self.state
        key = token.decode(errors="replace")
        sync = state.syncs.get(key)
        if sync is None:
            state.early_marks[key] = self.sync_marks()  # the `sync` request is still on its way
            if len(state.early_marks) > 10_000:
                state.early_marks.clear()
            return
        sync.marks = self.sync_marks()
        sync.relay_seen = True
        self._complete_syncs()


def run(settings: RelaySettings) -> None:
    """The relay process's main: serve until the supervisor's STOP_SIGNAL."""
    relay = Relay(settings)

    def stop(signum: int, frame: object) -> None:
        relay.running = False

    def draining(signum: int, frame: object) -> None:
        relay.draining = True

    signal.signal(STOP_SIGNAL, stop)
    signal.signal(DRAIN_SIGNAL, draining)
    # the supervisor decides when (after the workers drained): see mesh/sockets.py
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    relay.serve()
