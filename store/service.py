"""The store process: the only process of a node that talks to the database.

Why: workers must not block on a database, and every write must be paid for in batches. Workers
send requests over the store plane of `mesh/PROTOCOL.md` (DEALER → this ROUTER); this process
turns them into write operations for the group commit (`store/writer.py`), answers reads, and
tells workers which persistent subscriptions exist (so that a publishing worker knows which
messages need rows before it acknowledges them). Users and ACL rules are served by
`store/auth_service.py` (requests `auth`, `uput`, `udel`, `aadd`, `adel`; the `authtable`
broadcast on `\x00A`), which this loop calls.

Must not: know MQTT matching (workers match; the store keeps what they send); reorder a
worker's writes; answer "durable" before the commit.

Invariants:
- A reply `durable` / `ok` to a write follows the commit of that write's transaction.
- The persistent-subscription set broadcast on `store.pub` equals the sessions in the database.
- After a crash of the node, the wills of the sessions that were online on it are handed out
  exactly once (to the first `recover`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from mesh import envelope as env
from mesh.errors import EnvelopeError
from mesh.sockets import STOP_SIGNAL, endpoint
from store import wire
from store.auth_service import AUTH_KINDS, AuthService
from store.backend import Backend, open_backend
from store.errors import StoreConfigError, StoreError, StoreUnavailable
from store.records import (
    Ack,
    ClearRetained,
    DeleteSession,
    Enqueue,
    SessionRecord,
    SetOnline,
    SetRetained,
    SubscriptionRecord,
    UpsertSession,
    WriteOp,
)
from store.writer import GroupCommit

log = logging.getLogger("store.service")

CH_DURABLE = b"\x00D"
SINFO_LIMIT = 1000  # sessions listed at once by `sinfo` (meshctl sessions)
EXIT_CONFIG = 3  # the supervisor stops the node instead of restarting the store
NEVER_EXPIRES_S = 0xFFFFFFFF
SWEEP_S = 1.0
LOAD_LIMIT = 1_000_000


@dataclass(frozen=True, slots=True)
class StoreSettings:
    ipc_dir: str
    node: str
    kind: str
    sqlite_path: str = ""
    postgres_url: str = ""
    postgres_user: str = ""
    postgres_password: str = ""
    postgres_schema: str = "meshmq"
    pool_size: int = 4
    refuse_after_s: float = 1.0
    cluster: bool = False  # other nodes write the same database: re-read before deciding


@dataclass(slots=True)
class _Known:
    online: bool
    expiry_s: int
    since: float  # wall time of the last change of `online`


class StoreService:
    def __init__(self, settings: StoreSettings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.writer = GroupCommit(backend, refuse_after_s=settings.refuse_after_s)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        # Every request gets exactly one reply and a dropped reply stalls a client forever: no
        # high-water mark on replies (their number is bounded by the requests in flight).
        self.router.setsockopt(zmq.SNDHWM, 0)
        self.router.setsockopt(zmq.RCVHWM, 0)
        self.router.bind(endpoint(settings.ipc_dir, "store.ctl"))
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 0)  # subscription updates must never be dropped
        self.pub.bind(endpoint(settings.ipc_dir, "store.pub"))
        self.subscriptions: dict[str, tuple[SubscriptionRecord, ...]] = {}
        self.known: dict[str, _Known] = {}
        self.crashed: list[SessionRecord] = []
        self.auth = AuthService(backend, self._publish, cluster=settings.cluster)
        self.running = True

    # -- start ----------------------------------------------------------------------------------------

    def load(self) -> None:
        """Read what the database holds: persistent subscriptions, and the sessions that were
        online on this node when it last stopped (it crashed: their wills are due)."""
        for record in self.backend.sessions():
            self.subscriptions[record.client_id] = record.subscriptions
            self.known[record.client_id] = _Known(record.online, record.expiry_s, record.updated_at)
            if record.online and record.node == self.settings.node:
                self.crashed.append(record)
        if self.crashed:
            log.warning(
                "store: %d session(s) were online when the node stopped; their wills are due",
                len(self.crashed),
            )

    # -- loop -----------------------------------------------------------------------------------------

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)
        # The stop signal wakes the wait at once (an interrupted poll is retried with the rest of
        # its timeout): the signal's byte lands on this pipe.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            previous_wakeup: int | None = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread (tests): no signals here
            previous_wakeup = None
        poller.register(wake_r, zmq.POLLIN)
        next_sweep = time.monotonic()  # at once: sessions may have expired while the node was down
        log.info("store up (pid %d, %s)", os.getpid(), self.backend.name)
        self.auth.broadcast(time.monotonic())  # the backend is open: announce users and rules
        while self.running:
            now = time.monotonic()
            timeout_ms = 200
            if self.writer.pending:
                # while degraded, wake often enough to refuse what waited too long in time
                timeout_ms = (
                    0 if self.writer.due(now) else min(max(int((self.writer.retry_at - now) * 1000), 1), 100)
                )
            auth_wait_s = self.auth.wait_s(now)
            if auth_wait_s is not None:
                timeout_ms = min(timeout_ms, int(auth_wait_s * 1000) + 1)
            ready = dict(poller.poll(timeout=timeout_ms))
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
            if self.pub in ready:
                while self.pub.poll(0):
                    self.pub.recv()  # subscription changes of workers: nothing to do
            if self.router in ready:
                self._drain(time.monotonic())
            now = time.monotonic()
            try:
                if self.writer.pending:
                    self.writer.commit(now, time.monotonic)
                if now >= next_sweep:
                    next_sweep = now + SWEEP_S
                    self._sweep()
                self.auth.tick(time.monotonic())
            except Exception:
                log.exception("store: commit failed unexpectedly; the writes wait for the next try")
        if previous_wakeup is not None:
            signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        self.writer.commit(time.monotonic(), time.monotonic)
        for sock in (self.router, self.pub):
            sock.close(0)
        self.backend.close()
        log.info("store stopped")

    def _drain(self, now: float) -> None:
        for _ in range(4096):
            try:
                identity, frame = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            try:
                control = env.unpack_control(frame)
            except EnvelopeError as exc:
                log.warning("bad request from %r dropped: %s", identity, exc)
                continue
            try:
                self._on_request(identity, control, now)
            except (wire.WireError, ValueError, TypeError) as exc:
                log.warning("bad %s request from %r: %s", control.kind, identity, exc)
                self._reply(identity, "failed", control.req_id, str(exc))
            except StoreUnavailable as exc:
                self._reply(identity, "failed", control.req_id, f"database unavailable: {exc}")
            except StoreError as exc:
                log.exception("%s request failed", control.kind)
                self._reply(identity, "failed", control.req_id, str(exc))

    def _reply(self, identity: bytes, kind: str, req_id: int, *body: object) -> None:
        try:
            self.router.send_multipart((identity, env.pack_control(kind, req_id, *body)), zmq.NOBLOCK)
        except (zmq.ZMQError, EnvelopeError) as exc:
            log.warning("cannot answer %r with %r: %s", identity, kind, exc)

    def _publish(self, channel: bytes, frame: bytes) -> None:
        self.pub.send_multipart((channel, frame))

    def _after_commit(self, identity: bytes, req_id: int, ok_kind: str) -> Callable[[bool], None]:
        def done(committed: bool) -> None:
            if committed:
                self._reply(identity, ok_kind, req_id)
            else:
                self._reply(identity, "refused", req_id, "database unavailable")

        return done

    def _write(self, ops: list[WriteOp], now: float) -> None:
        self.writer.submit(ops, None, now)

    def _on_request(self, identity: bytes, control: env.Control, now: float) -> None:
        kind, body, req = control.kind, control.body, control.req_id
        wall = time.time()
        if kind in AUTH_KINDS:
            reply_kind, reply_body = self.auth.handle(kind, body, now)
            self._reply(identity, reply_kind, req, *reply_body)
        elif kind == "enqueue":
            rows_wire, may_refuse = body
            if not isinstance(rows_wire, tuple | list):
                raise wire.WireError("enqueue: rows must be an array")
            rows = tuple(wire.queued_from_wire(r) for r in rows_wire)
            self.writer.submit(
                [Enqueue(rows)], self._after_commit(identity, req, "durable"), now, bool(may_refuse)
            )
        elif kind == "ack":
            client_id, msg_ids = body
            if not isinstance(msg_ids, tuple | list):
                raise wire.WireError("ack: msg_ids must be an array")
            self._write([Ack(str(client_id), tuple(int(m) for m in msg_ids))], now)
        elif kind == "save":
            (session_wire,) = body
            record = wire.session_from_wire(session_wire)
            self.subscriptions[record.client_id] = record.subscriptions
            self.known[record.client_id] = _Known(record.online, record.expiry_s, wall)
            self.writer.submit([UpsertSession(record)], self._after_commit(identity, req, "ok"), now)
            self._broadcast(record.client_id, record.subscriptions)
        elif kind == "drop":
            (client_id,) = body
            client_id = str(client_id)
            # answered after the commit: a session moving to another node is gone before it loads
            self.writer.submit([DeleteSession(client_id)], self._after_commit(identity, req, "ok"), now)
            self.known.pop(client_id, None)
            if self.subscriptions.pop(client_id, None) is not None:
                self._broadcast(client_id, None)
        elif kind == "online":
            client_id, online, node, epoch = body
            client_id = str(client_id)
            known = self.known.get(client_id)
            if known is not None:
                known.online = bool(online)
                known.since = wall
            self._write([SetOnline(client_id, bool(online), str(node), int(epoch), wall)], now)  # type: ignore[call-overload]
        elif kind == "retain":
            topic, retained_wire, may_refuse = body
            op: WriteOp = (
                ClearRetained(str(topic))
                if retained_wire is None
                else SetRetained(wire.retained_from_wire(retained_wire))
            )
            self.writer.submit([op], self._after_commit(identity, req, "durable"), now, bool(may_refuse))
        elif kind == "load":
            (client_id,) = body
            self.writer.commit(now, time.monotonic)  # reads see every earlier write
            if self.writer.degraded:
                raise StoreUnavailable("writes are waiting for the database")
            if self._expire_if_due(str(client_id), wall):
                self._reply(identity, "loaded", req, None, ())
                return
            stored = self.backend.load_session(str(client_id))
            queued = (
                self.backend.fetch_queue(str(client_id), LOAD_LIMIT, 0.0, wall) if stored is not None else []
            )
            self._reply(
                identity,
                "loaded",
                req,
                None if stored is None else wire.session_to_wire(stored),
                tuple(wire.queued_to_wire(r) for r in queued),
            )
        elif kind == "dsnap":
            if self.settings.cluster:
                # other nodes save sessions too: the database, not our cache, has them all
                self.writer.commit(now, time.monotonic)
                self.subscriptions = {r.client_id: r.subscriptions for r in self.backend.sessions()}
            self._reply(
                identity,
                "dsubs",
                req,
                tuple(
                    (cid, tuple(wire.subscription_to_wire(s) for s in subs))
                    for cid, subs in self.subscriptions.items()
                ),
            )
        elif kind == "recover":
            (node,) = body
            if node == self.settings.node:
                crashed, self.crashed = [r for r in self.crashed if r.node == node], []
            else:
                # another node of the cluster died: its sessions that the database still has online
                self.writer.commit(now, time.monotonic)
                crashed = [r for r in self.backend.sessions() if r.online and r.node == node]
            wills = [(r.client_id, wire.will_to_wire(r.will)) for r in crashed if r.will is not None]
            ops: list[WriteOp] = [SetOnline(r.client_id, False, r.node, r.epoch, wall) for r in crashed]
            for r in crashed:
                known = self.known.get(r.client_id)
                if known is not None:
                    known.online, known.since = False, wall
            if ops:
                self._write(ops, now)
            self._reply(identity, "wills", req, tuple(wills))
        elif kind == "sinfo":
            (client_id,) = body
            self.writer.commit(now, time.monotonic)  # what was written is what we report
            if client_id is None:
                records = self.backend.sessions()[:SINFO_LIMIT]
            else:
                one = self.backend.load_session(str(client_id))
                records = [] if one is None else [one]
            self._reply(
                identity,
                "sessinfo",
                req,
                tuple(
                    (r.client_id, r.online, r.node, r.expiry_s, self.backend.queue_depth(r.client_id))
                    for r in records
                ),
            )
        elif kind == "sstats":
            stats = self.writer.stats
            self._reply(
                identity,
                "sstate",
                req,
                {
                    "transactions": stats.transactions,
                    "ops": stats.ops,
                    "last_batch_ops": stats.last_batch_ops,
                    "max_batch_ops": stats.max_batch_ops,
                    "failures": stats.failures,
                    "refused": stats.refused,
                    "last_commit_ms": round(stats.last_commit_s * 1000, 3),
                    "degraded": int(self.writer.degraded),
                    "pending_ops": self.writer.pending_ops,
                },
            )
        elif kind == "rsnap":
            self._reply(
                identity, "rstate", req, tuple(wire.retained_to_wire(r) for r in self.backend.retained(wall))
            )
        else:
            raise wire.WireError(f"unexpected request {kind!r}")

    def _broadcast(self, client_id: str, subscriptions: tuple[SubscriptionRecord, ...] | None) -> None:
        subs = None if subscriptions is None else tuple(wire.subscription_to_wire(s) for s in subscriptions)
        self.pub.send_multipart((CH_DURABLE, env.pack_control("dsub", 0, client_id, subs)))

    def _due(self, known: _Known, wall: float) -> bool:
        return not known.online and known.expiry_s != NEVER_EXPIRES_S and wall >= known.since + known.expiry_s

    def _expire(self, client_id: str) -> None:
        if self.settings.cluster and not self._still_due(client_id):
            return
        del self.known[client_id]
        self._write([DeleteSession(client_id)], time.monotonic())
        if self.subscriptions.pop(client_id, None) is not None:
            self._broadcast(client_id, None)

    def _still_due(self, client_id: str) -> bool:
        """In a cluster our `known` may be stale (another node resumed the session): ask the
        database, and keep what it says."""
        record = self.backend.load_session(client_id)
        if record is None:
            self.known.pop(client_id, None)
            return False
        known = _Known(record.online, record.expiry_s, record.updated_at)
        self.known[client_id] = known
        return self._due(known, time.time())

    def _expire_if_due(self, client_id: str, wall: float) -> bool:
        """A session asked for by a reconnecting client may have expired since the last sweep."""
        known = self.known.get(client_id)
        if known is None or not self._due(known, wall):
            return False
        if self.settings.cluster and not self._still_due(client_id):
            return False
        self._expire(client_id)
        self.writer.commit(time.monotonic(), time.monotonic)
        log.info("1 offline session(s) expired")
        return True

    def _sweep(self) -> None:
        """End offline sessions whose expiry interval has passed [MQTT-3.1.2-23]."""
        wall = time.time()
        expired = [cid for cid, k in self.known.items() if self._due(k, wall)]
        for cid in expired:
            self._expire(cid)
        if expired:
            log.info("%d offline session(s) expired", len(expired))


def run(settings: StoreSettings) -> None:
    """The store process's main: open the database (retrying while it is unreachable), serve."""
    backend = open_backend(
        settings.kind,
        sqlite_path=settings.sqlite_path,
        postgres_url=settings.postgres_url,
        postgres_user=settings.postgres_user,
        postgres_password=settings.postgres_password,
        postgres_schema=settings.postgres_schema,
        pool_size=settings.pool_size,
    )
    stopping = False
    service_ref: list[StoreService] = []

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for service in service_ref:
            service.running = False

    signal.signal(STOP_SIGNAL, stop)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the supervisor decides when (mesh/sockets.py)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    delay_s = 0.5
    while not stopping:
        try:
            backend.open()
            break
        except StoreConfigError as exc:
            log.error("%s", exc)
            raise SystemExit(EXIT_CONFIG) from None
        except StoreUnavailable as exc:
            log.error("database unavailable (%s); retrying in %.1fs", exc, delay_s)
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 10.0)
    if stopping:
        return
    service = StoreService(settings, backend)
    service_ref.append(service)
    service.load()
    service.serve()
