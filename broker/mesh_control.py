"""A worker's control plane: client-id claims, session hand-offs, barriers and the Clone snapshot.

Why: the questions a worker asks the relay (who holds client X, has every peer seen my new
subscription, what are the retained messages and shared members right now) and the answers that
come back over the DEALER socket are one concern, apart from moving publishes (`meshlink`).
`WorkerMesh` mixes this in.

Must not: move publishes; block (every answer arrives through a callback on the event loop).

Invariants: a claim's `done` is called exactly once — with the relay's epoch and the previous
owner's hand-off, or, when either does not come in time, with a fresh session; a barrier's `done`
is called exactly once, at the latest at its deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq

from broker.mesh_codec import item_to_message
from broker.ports import CLAIM_LOST
from mesh import envelope as env
from mesh.envelope import CH_SHARED, SessionWire
from mesh.errors import EnvelopeError

if TYPE_CHECKING:
    from broker.core import BrokerCore

log = logging.getLogger("broker.mesh")

CH_SYNC = b"\x00Y"  # upstream barrier marker (a subscription), see PROTOCOL.md, barriers
BARRIER_RESEND_S = 0.1  # the downstream marker again, for peers whose SUB was not linked yet


@dataclass(slots=True)
class Claim:
    client_id: str
    clean_start: bool
    done: Callable[[int, SessionWire | None, float], None]
    deadline: float
    epoch: int = -1  # set when the relay answered and a hand-off is awaited
    lost: bool = False  # lost to a newer claim elsewhere: the awaited session goes to the store


@dataclass(slots=True)
class Barrier:
    token: bytes
    done: Callable[[float], None]
    deadline: float
    sent_at: float


class ControlPlane:
    core: BrokerCore | None
    loop: asyncio.AbstractEventLoop
    index: int
    origin: str
    peers: int
    handoff_timeout_s: float
    dealer: zmq.Socket[bytes]
    sub: zmq.Socket[bytes]
    req_id: int
    local_epoch: int
    claims: dict[int, Claim]
    awaiting_handoff: dict[str, Claim]
    early_handoffs: dict[tuple[str, int], SessionWire | None]
    barriers: dict[int, Barrier]
    sync_seen: dict[bytes, int]
    snapshot: asyncio.Future[None] | None
    buffered: list[tuple[bytes, env.DataMessage]]

    if TYPE_CHECKING:  # provided by WorkerMesh

        def _send(self, channel: bytes, data: bytes, keep: bool) -> None: ...

        def _seq(self) -> int: ...

        def _kick(self) -> None: ...

        def _dispatch(self, channel: bytes, message: env.DataMessage, now: float) -> None: ...

        def _apply_shared(self, message: env.SharedUpdate) -> None: ...

        def forget_node(self, node: str) -> None: ...

        def _resend_routes(self) -> None: ...

    def claim(
        self,
        client_id: str,
        clean_start: bool,
        now: float,
        done: Callable[[int, SessionWire | None, float], None],
    ) -> None:
        if self.peers == 0:
            # The only worker of the node holds every client id: no registry round trip (the
            # relay only hears of it, for /api/sessions and meshctl).
            self.local_epoch += 1
            self._control("register", client_id, self.local_epoch)
            done(self.local_epoch, None, now)
            return
        req = self._control("claim", client_id, clean_start)
        self.claims[req] = Claim(client_id, clean_start, done, now + self.handoff_timeout_s)

    def session_ended(self, client_id: str, epoch: int) -> None:
        self._control("unregister", client_id, epoch)

    def barrier(self, now: float, done: Callable[[float], None]) -> None:
        if self.peers == 0:
            done(now)
            return
        token = f"{self.index}.{self._seq()}".encode()
        # Upstream: a subscription behind every earlier one on our SUB; downstream: an envelope
        # behind every earlier one on our XPUB. A peer reports once it has seen both.
        self.sub.subscribe(CH_SYNC + token)
        self._send(CH_SHARED, env.pack_sync(self.origin, self._seq(), token), True)
        req = self._control("sync", token.decode())
        self.barriers[req] = Barrier(token, done, now + self.handoff_timeout_s, now)

    def _control(self, kind: str, *body: object) -> int:
        self.req_id += 1
        self.dealer.send(env.pack_control(kind, self.req_id, *body), zmq.NOBLOCK)
        return self.req_id

    def _sync_seen(self, token: bytes, flag: int) -> None:
        seen = self.sync_seen.get(token, 0) | flag
        if seen == 3:
            self.sync_seen.pop(token, None)
            self._control("seen", token.decode(), self.index)
        else:
            self.sync_seen[token] = seen

    def _on_dealer(self) -> None:
        core = self.core
        if core is None:
            return
        dealer = self.dealer
        now = self.loop.time()
        while _events(dealer) & zmq.POLLIN:
            frame = dealer.recv(zmq.NOBLOCK)
            try:
                control = env.unpack_control(frame)
            except EnvelopeError as exc:
                log.warning("worker %d: bad control frame dropped: %s", self.index, exc)
                continue
            try:
                self._on_control(control, now)
            except Exception:
                log.exception("worker %d: control %r failed", self.index, control.kind)
        core.flush()
        self._kick()

    def _on_control(self, control: env.Control, now: float) -> None:
        core = self.core
        assert core is not None
        kind, body = control.kind, control.body
        if kind == "claimed":
            client_id, epoch, previous, lost = body
            claim = self.claims.pop(control.req_id, None)
            if claim is None:
                return
            assert isinstance(epoch, int)
            if lost and (previous is None or previous == self.index):
                claim.done(CLAIM_LOST, None, now)  # a newer connection on another node won
                return
            if lost:
                # ... while the session was being handed to us: it goes to the store for the
                # winner once it arrives (mesh/PROTOCOL.md, takeover across nodes)
                claim.lost = True
            if previous is None or previous == self.index:
                claim.done(epoch, None, now)
                return
            key = (claim.client_id, epoch)
            if key in self.early_handoffs:
                self._handed(claim, epoch, self.early_handoffs.pop(key), now)
                return
            claim.epoch = epoch
            claim.deadline = now + self.handoff_timeout_s
            self.awaiting_handoff[claim.client_id] = claim
        elif kind == "release":
            client_id, epoch, new_index, clean_start = body
            assert isinstance(client_id, str) and isinstance(epoch, int) and isinstance(new_index, int)
            if new_index == 0:
                # another node claimed it: the session goes to the store, then we say so
                core.release_to_store(
                    client_id,
                    epoch,
                    bool(clean_start),
                    now,
                    lambda now: self._released(client_id, epoch),
                )
            else:
                core.release(client_id, epoch, new_index, bool(clean_start), now)
        elif kind == "recover":
            (node,) = body
            assert isinstance(node, str)
            core.recover_node(node)
        elif kind == "minority":
            minority, reference = body
            core.set_minority(bool(minority), str(reference or ""))
        elif kind == "minorityops":
            minority, allow_publish, allow_subscribe = body
            core.set_minority_operations(bool(minority), bool(allow_publish), bool(allow_subscribe))
        elif kind == "rescan":
            core.rescan_online()
        elif kind == "reassert":
            core.reassert_online()
        elif kind == "resync":
            self._resend_routes()
        elif kind == "deadnode":
            (node,) = body
            assert isinstance(node, str)
            self.forget_node(node)
        elif kind == "synced":
            barrier = self.barriers.pop(control.req_id, None)
            if barrier is not None:
                self._finish_barrier(barrier, now)
        elif kind == "snap":
            marks, retained, shared = body
            self._apply_snapshot(marks, retained, shared, now)
        elif kind == "dead":
            (worker,) = body
            assert isinstance(worker, int)
            core.forget_worker(worker)

    def _handed(self, claim: Claim, epoch: int, state: SessionWire | None, now: float) -> None:
        """The session handed to a claim arrived: the claim's, or, if it lost meanwhile to a newer
        connection on another node, the store's (then `released`, and the winner may load it)."""
        if not claim.lost:
            claim.done(epoch, state, now)
            return
        core = self.core
        assert core is not None
        client_id = claim.client_id
        core.park_in_store(client_id, state, now, lambda now: self._released(client_id, epoch))
        claim.done(CLAIM_LOST, None, now)

    def _released(self, client_id: str, epoch: int) -> None:
        self._control("released", client_id, epoch)

    def _finish_barrier(self, barrier: Barrier, now: float) -> None:
        self.sub.unsubscribe(CH_SYNC + barrier.token)
        barrier.done(now)

    def _handoff_arrived(self, client_id: str, epoch: int, state: SessionWire | None, now: float) -> None:
        claim = self.awaiting_handoff.get(client_id)
        if claim is not None and claim.epoch == epoch:
            del self.awaiting_handoff[client_id]
            self._handed(claim, epoch, state, now)
        elif claim is None or claim.epoch < epoch:
            # The relay's answer has not come yet: keep it for the claim (bounded).
            if len(self.early_handoffs) > 10_000:
                self.early_handoffs.clear()
            self.early_handoffs[(client_id, epoch)] = state
        # else: a hand-off for an older epoch: the race was lost, ignore it

    def _apply_snapshot(self, marks: object, retained: object, shared: object, now: float) -> None:
        core = self.core
        assert core is not None
        assert isinstance(marks, dict) and isinstance(retained, tuple) and isinstance(shared, tuple)
        for topic, item in retained:
            core.apply_remote_retained(item_to_message(topic, item, now), now, route=False)
        for body in shared:
            self._apply_shared(env.SharedUpdate(*body))
        self._apply_buffered(marks)

    def _apply_buffered(self, marks: dict[object, object]) -> None:
        buffered, self.buffered = self.buffered, []
        if self.snapshot is not None and not self.snapshot.done():
            self.snapshot.set_result(None)
        now = self.loop.time()
        for channel, message in buffered:
            mark = marks.get(message.origin, -1)
            if isinstance(mark, int) and message.seq <= mark:
                continue
            self._dispatch(channel, message, now)

    def _control_timers(self, now: float) -> None:
        """Claims and hand-offs that did not come in time, barriers to repeat or give up."""
        for client_id, claim in list(self.awaiting_handoff.items()):
            if now >= claim.deadline:
                del self.awaiting_handoff[client_id]
                log.warning(
                    "worker %d: no hand-off of %r within %.1fs; starting a new session",
                    self.index,
                    client_id,
                    self.handoff_timeout_s,
                )
                claim.done(CLAIM_LOST if claim.lost else claim.epoch, None, now)
        for req, claim in list(self.claims.items()):
            if now >= claim.deadline + self.handoff_timeout_s:
                del self.claims[req]
                log.error("worker %d: the relay did not answer the claim of %r", self.index, claim.client_id)
                claim.done(0, None, now)
        for req, barrier in list(self.barriers.items()):
            if now - barrier.sent_at >= BARRIER_RESEND_S:
                # A peer whose SUB was not yet subscribed to us missed the marker: again.
                barrier.sent_at = now
                self._send(CH_SHARED, env.pack_sync(self.origin, self._seq(), barrier.token), True)
            if now >= barrier.deadline:
                del self.barriers[req]
                log.warning("worker %d: subscription barrier timed out", self.index)
                self._finish_barrier(barrier, now)


def _fd(sock: zmq.Socket[bytes]) -> int:
    return int(sock.getsockopt(zmq.FD))


def _events(sock: zmq.Socket[bytes]) -> int:
    return int(sock.getsockopt(zmq.EVENTS))


def _worker_of(origin: str) -> int | None:
    if origin.startswith("w") and origin[1:].isdigit():
        return int(origin[1:])
    return None
