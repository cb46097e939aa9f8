"""The relay's links to the other nodes: sockets, heartbeats, membership and sequenced streams.

Why: `mesh/PROTOCOL.md` ("The cluster plane") fixes how relays talk: a ROUTER bound on tcp for
what others send us, one DEALER per peer address for what we send, CURVE on both, ZMTP
heartbeats plus our own `hb` frames, and per-peer streams with sequence numbers, acks and a
resend buffer so that nothing sent to a live peer is lost when a TCP connection breaks. This
module is that transport and the membership it implies; what the frames *mean* (routes, the
client registry, claims, data) is the relay's business (`mesh/relay.py`), reached through the
`LinkHandler` callbacks.

Must not: block (every send is NOBLOCK; what cannot go waits in a per-address outbox, FIFO);
decide liveness from discovery (candidates only); interpret data frames.

Invariants:
- Sequenced frames to a peer are handed to the handler exactly once, in order, per stream; a new
  stream or incarnation of a peer is announced (`peer_reset`) before its first frame.
- A DEAD or LEFT peer's state is dropped once (`peer_gone`); if it speaks again it gets fresh
  streams both ways (we refuse to continue its old stream, so it must send a snapshot).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgpack
import zmq

from mesh.peers import Frames, InStream, OutStream, Peer, State
from mesh.sockets import send_queued

log = logging.getLogger("mesh.cluster")

VERSION = 1
RESEND_PAUSE_S = 0.2
NO_ANSWER_S = 10.0
ACK_EVERY = 256  # frames applied before an ack goes out at once
ACK_DELAY_S = 0.002  # otherwise an ack waits this long, to cover whatever else arrives  # a candidate that never answered this long is reported once
# Frames queued in libzmq per peer before our outbox takes over and the relay stops reading its
# workers: small, so that a slow node slows the publishers soon instead of filling memory (an
# envelope carries up to 64 messages).
DEALER_HWM = 1_000
BUFFER_LIMIT = 20_000  # unacknowledged frames per peer before the relay applies backpressure


class CandidateSource(Protocol):
    def poll(self, now: float) -> Sequence[object]: ...

    def close(self) -> None: ...


class LinkHandler(Protocol):
    def peer_reset(self, peer: Peer) -> None:
        """A new stream (or incarnation) of the peer begins: forget what it told us before."""

    def peer_frame(self, peer: Peer, kind: str, body: list[object], frames: Frames) -> None:
        """A sequenced frame of the peer, in order."""

    def peer_joined(self, peer: Peer) -> None:
        """We start a stream to the peer: send it our snapshot (then `snapend`)."""

    def peer_gone(self, peer: Peer, why: State) -> None:
        """The peer is DEAD or LEFT: remove its routes, registry entries and shared members."""

    def drain_requested(self, peer: Peer) -> None:
        """The peer asks this node to drain (`meshctl drain`, through its HTTP API)."""

    def view_changed(self, alive: list[str]) -> None:
        """The set of ALIVE nodes (with us) changed."""


@dataclass(frozen=True, slots=True)
class LinkSettings:
    node: str
    cluster_name: str
    bind_host: str
    port: int
    advertise_host: str
    heartbeat_s: float = 0.5
    suspect_after_s: float = 1.5
    dead_after_s: float = 4.0


@dataclass(slots=True)
class _Dealer:
    sock: zmq.Socket[bytes]
    host: str
    port: int
    outbox: deque[list[bytes]] = field(default_factory=deque)
    since: float = 0.0  # when we started dialling
    told: bool = False  # the "nobody answers" warning was logged


class ClusterLinks:
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        settings: LinkSettings,
        handler: LinkHandler,
        discovery: CandidateSource | None,
        curve_server: Callable[[zmq.Socket[bytes]], None] | None = None,
        curve_client: Callable[[zmq.Socket[bytes], str], bool] | None = None,
    ) -> None:
        self.ctx = ctx
        self.settings = settings
        self.handler = handler
        self.discovery = discovery
        self.curve_client = curve_client
        self.incarnation = time.time_ns() // 1000
        self.state = "JOINING"
        self.peers: dict[str, Peer] = {}
        self.dealers: dict[tuple[str, int], _Dealer] = {}
        self.keys_by_address: dict[tuple[str, int], str] = {}  # node names known for an address
        self._dealer_no = 0
        self._stream_no = int(time.time() * 1000)
        self._acked_sent: dict[str, tuple[int, int]] = {}
        self._alive_view: list[str] = []
        self._next_hb = 0.0
        self._next_discovery = 0.0
        self._foreign: set[tuple[str, str]] = set()
        self._ack_due: dict[str, float] = {}
        self._pings: dict[int, tuple[float, Callable[[float], object]]] = {}
        self._ping_no = 0
        self._held_at = -1.0
        self.router = ctx.socket(zmq.ROUTER)
        _tune(self.router, settings)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.setsockopt(zmq.RCVHWM, DEALER_HWM)
        if curve_server is not None:
            curve_server(self.router)
        host = settings.bind_host
        self.router.bind(f"tcp://{'[' + host + ']' if ':' in host else host}:{settings.port}")
        self.counters: dict[str, int] = {"frames_sent": 0, "frames_received": 0, "resends": 0, "restarts": 0}

    # -- membership -------------------------------------------------------------------------------

    def alive(self) -> list[str]:
        names = [p.name for p in self.peers.values() if p.state in (State.ALIVE, State.SUSPECT)]
        return sorted([self.settings.node, *names])

    def routable(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.routable and p.out is not None]

    def backlogged(self) -> bool:
        """True while a peer cannot take more (its outbox is not empty or too much is unacked)."""
        for dealer in self.dealers.values():
            if dealer.outbox:
                return True
        for peer in self.peers.values():
            if peer.out is not None and peer.routable and peer.out.unacked > BUFFER_LIMIT:
                return True
        return False

    def _check_view(self) -> None:
        alive = self.alive()
        if alive != self._alive_view:
            self._alive_view = alive
            log.info("cluster view: alive=[%s]", ", ".join(alive))
            self.handler.view_changed(alive)

    # -- sending ----------------------------------------------------------------------------------

    def send(self, peer: Peer, kind: str, body: Sequence[object] = (), frames: Frames = ()) -> None:
        """A sequenced frame on the peer's current stream."""
        out = peer.out
        if out is None:
            return
        seq = out.next_seq()
        header = msgpack.packb(
            [VERSION, kind, self.settings.node, self.incarnation, out.stream, seq, *body], use_bin_type=True
        )
        out.keep(seq, header, frames)
        self._raw(peer.host, peer.port, [header, *frames])

    def broadcast(self, kind: str, body: Sequence[object] = (), frames: Frames = ()) -> None:
        for peer in self.peers.values():
            if peer.routable and peer.out is not None:
                self.send(peer, kind, body, frames)

    def _unsequenced(self, host: str, port: int, kind: str, body: Sequence[object]) -> None:
        header = msgpack.packb(
            [VERSION, kind, self.settings.node, self.incarnation, 0, 0, *body], use_bin_type=True
        )
        self._raw(host, port, [header])

    def _raw(self, host: str, port: int, parts: list[bytes]) -> None:
        dealer = self._dealer(host, port)
        if dealer is None:
            return
        if dealer.outbox:
            dealer.outbox.append(parts)
            return
        try:
            dealer.sock.send_multipart(parts, zmq.NOBLOCK)
            self.counters["frames_sent"] += 1
        except zmq.Again:
            dealer.outbox.append(parts)

    def flush_outboxes(self) -> None:
        for dealer in self.dealers.values():
            if dealer.outbox:
                self.counters["frames_sent"] += send_queued(dealer.sock, dealer.outbox)

    def _dealer(self, host: str, port: int) -> _Dealer | None:
        key = (host, port)
        dealer = self.dealers.get(key)
        if dealer is not None:
            return dealer
        sock = self.ctx.socket(zmq.DEALER)
        _tune(sock, self.settings)
        sock.setsockopt(zmq.SNDHWM, DEALER_HWM)
        self._dealer_no += 1
        sock.setsockopt(zmq.IDENTITY, f"{self.settings.node}.{self._dealer_no}".encode())
        if self.curve_client is not None and not self.curve_client(sock, self.keys_by_address.get(key, "")):
            sock.close(0)
            return None
        sock.connect(f"tcp://{'[' + host + ']' if ':' in host else host}:{port}")
        dealer = _Dealer(sock, host, port, since=time.monotonic())
        self.dealers[key] = dealer
        return dealer

    # -- heartbeats, discovery, ageing --------------------------------------------------------------

    def tick(self, now: float) -> None:
        if self.state == "JOINING":
            self.state = "ALIVE"  # (LEAVING once leave() was called)
        if self.discovery is not None and now >= self._next_discovery:
            self._next_discovery = now + self.settings.heartbeat_s
            for candidate in self.discovery.poll(now):
                host, port = str(getattr(candidate, "host", "")), int(getattr(candidate, "port", 0))
                name = str(getattr(candidate, "node", "") or "")
                if not host or (host, port) == (self.settings.advertise_host, self.settings.port):
                    continue
                if name == self.settings.node:
                    continue
                if name:
                    self.keys_by_address[(host, port)] = name
                self._dealer(host, port)
        held = now - self._held_at < self.settings.heartbeat_s
        for peer in self.peers.values():
            if held and peer.routable:
                peer.heard(now)  # unread input may well hold its heartbeats
                continue
            changed = peer.age(now, self.settings.suspect_after_s, self.settings.dead_after_s)
            if changed is State.SUSPECT:
                log.warning("node %s is SUSPECT (nothing heard for %.1fs)", peer.name, now - peer.last_heard)
            elif changed is State.DEAD:
                log.warning("node %s is DEAD (nothing heard for %.1fs)", peer.name, now - peer.last_heard)
                self._gone(peer, State.DEAD)
        if now >= self._next_hb:
            self._next_hb = now + self.settings.heartbeat_s
            self._heartbeat()
            self._silent_candidates(now)
        self._check_view()

    def _heartbeat(self) -> None:
        sent_ms = int(time.monotonic() * 1000)
        alive = [[p.name, p.host, p.port] for p in self.peers.values() if p.state is State.ALIVE]
        by_address = {(p.host, p.port): p for p in self.peers.values()}
        for (host, port), _dealer in list(self.dealers.items()):
            peer = by_address.get((host, port))
            acked = head = None
            echo: list[int] | int = 0
            if peer is not None:
                if peer.inn.stream:
                    acked = [peer.inn.stream, peer.inn.applied]
                if peer.out is not None:
                    head = [peer.out.stream, peer.out.seq]
                # the peer's last hb time, and how long we held it: its round trip excludes our wait
                echo = [peer.last_sent_ms, sent_ms - peer.last_sent_seen_ms] if peer.last_sent_ms else 0
            self._unsequenced(
                host,
                port,
                "hb",
                [
                    self.settings.cluster_name,
                    self.settings.advertise_host,
                    self.settings.port,
                    self.state,
                    acked,
                    echo,
                    sent_ms,
                    alive,
                    head,
                ],
            )

    def _silent_candidates(self, now: float) -> None:
        """Say once per address when a candidate never answers: an operator otherwise cannot
        tell a node that is down from one of another cluster or with another CURVE key (a
        CURVE handshake that fails is silent on both sides)."""
        answered = {(p.host, p.port) for p in self.peers.values()}
        for key, dealer in self.dealers.items():
            if dealer.told or key in answered or now - dealer.since < NO_ANSWER_S:
                continue
            dealer.told = True
            log.warning(
                "no node answers at %s:%d after %.0fs (not running, another ClusterName, or a "
                "different Mesh.Curve key?)",
                dealer.host,
                dealer.port,
                NO_ANSWER_S,
            )

    def ping(self, peer: Peer, done: Callable[[float], object]) -> None:
        """A round trip over the link; done(rtt_ms) when the peer's pong comes back."""
        self._ping_no += 1
        if len(self._pings) > 1000:
            self._pings.clear()
        self._pings[self._ping_no] = (time.monotonic(), done)
        self._unsequenced(peer.host, peer.port, "ping", [self._ping_no])

    def ask_drain(self, peer: Peer) -> None:
        self._unsequenced(peer.host, peer.port, "drain", [])

    def leave(self) -> None:
        """Say `bye` to every peer (drain): they forget us at once instead of waiting."""
        self.state = "LEAVING"
        for peer in self.peers.values():
            if peer.routable:
                self._unsequenced(peer.host, peer.port, "bye", [])

    def _gone(self, peer: Peer, why: State) -> None:
        if peer.out is not None:
            peer.dropped += peer.out.unacked
        peer.state = why
        peer.out = None
        peer.inn = InStream()  # if it speaks again, it must start a new stream (a snapshot)
        self.handler.peer_gone(peer, why)
        self._check_view()

    # -- receiving ----------------------------------------------------------------------------------

    def drain(self, now: float, budget: int = 4096) -> None:
        router = self.router
        touched: set[str] = set()
        for _ in range(budget):
            try:
                parts = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.counters["frames_received"] += 1
            if len(parts) < 2:
                continue
            try:
                header = msgpack.unpackb(parts[1], raw=False)
                version, kind, node, incarnation, stream, seq = header[:6]
                body = header[6:]
            except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
                log.warning("bad cluster frame from %r dropped", parts[0][:40])
                continue
            if version != VERSION or not isinstance(node, str) or node == self.settings.node:
                continue
            try:
                self._on_frame(now, kind, node, incarnation, stream, seq, body, tuple(parts[2:]), touched)
            except Exception:
                log.exception("cluster frame %r from %s failed", kind, node)
        for name in touched:
            peer = self.peers.get(name)
            if peer is None:
                continue
            sent = self._acked_sent.get(name)
            if sent is None or sent[0] != peer.inn.stream or peer.inn.applied - sent[1] >= ACK_EVERY:
                self._ack(peer)
            else:
                self._ack_due.setdefault(name, now)
        self._check_view()

    def _ack(self, peer: Peer) -> None:
        self._ack_due.pop(peer.name, None)
        mark = (peer.inn.stream, peer.inn.applied)
        if self._acked_sent.get(peer.name) != mark:
            self._acked_sent[peer.name] = mark
            self._unsequenced(peer.host, peer.port, "ack", list(mark))

    def flush_acks(self, now: float) -> None:
        """Acknowledge what arrived ACK_DELAY_S ago or earlier: one ack covers many frames."""
        for name, since in list(self._ack_due.items()):
            if now - since >= ACK_DELAY_S:
                peer = self.peers.get(name)
                if peer is None:
                    self._ack_due.pop(name, None)
                else:
                    self._ack(peer)

    @property
    def acks_pending(self) -> bool:
        return bool(self._ack_due)

    def hold(self, now: float) -> None:
        """The relay cannot take peer frames right now (its workers are slow): while it does not
        read, the peers' silence is ours, so it must not make them SUSPECT or DEAD."""
        self._held_at = now

    def _on_frame(
        self,
        now: float,
        kind: str,
        node: str,
        incarnation: int,
        stream: int,
        seq: int,
        body: list[object],
        frames: Frames,
        touched: set[str],
    ) -> None:
        peer = self.peers.get(node)
        if kind == "hb":
            cluster, host, port, state = body[0], body[1], body[2], body[3]
            if cluster != self.settings.cluster_name:
                if len(self._foreign) < 1000 and (cluster, node) not in self._foreign:
                    self._foreign.add((str(cluster), node))
                    log.warning("node %s of another cluster %r ignored", node, cluster)
                return
            assert isinstance(host, str) and isinstance(port, int)
            known = self.peers.get(node)
            if state == "LEAVING" and (known is None or known.incarnation == incarnation):
                if known is not None and known.routable:
                    log.info("node %s is leaving the cluster", node)
                    self._gone(known, State.LEFT)
                return  # a node on its way out is never (re)joined
            peer = self._hello(now, node, incarnation, host, port)
            if peer is None:
                return
            acked, echo, sent_ms, alive, head = body[4], body[5], body[6], body[7], body[8]
            if acked is not None and peer.out is not None:
                peer.out.ack(int(acked[0]), int(acked[1]))  # type: ignore[index]
            if isinstance(head, list) and len(head) == 2:
                self._check_head(now, peer, int(head[0]), int(head[1]))
            if isinstance(echo, list) and len(echo) == 2:
                peer.rtt_ms = max(0.0, time.monotonic() * 1000 - int(echo[0]) - int(echo[1]))
            if isinstance(sent_ms, int):
                peer.last_sent_ms = sent_ms
                peer.last_sent_seen_ms = int(time.monotonic() * 1000)
            if isinstance(alive, list):
                for entry in alive:  # gossip: candidates only
                    name, other_host, other_port = entry
                    if name != self.settings.node and name not in self.peers:
                        self.keys_by_address[(other_host, other_port)] = name
                        self._dealer(other_host, other_port)
            return
        if peer is None or peer.incarnation != incarnation:
            return  # nothing from an unknown node or an old incarnation but its hb counts
        if peer.state in (State.DEAD, State.LEFT):
            return
        peer.heard(now)
        if kind == "ack":
            if peer.out is not None:
                peer.out.ack(int(body[0]), int(body[1]))  # type: ignore[call-overload]
            return
        if kind == "resend":
            self._resend(peer, int(body[0]), int(body[1]))  # type: ignore[call-overload]
            return
        if kind == "ping":
            self._unsequenced(peer.host, peer.port, "pong", [body[0]])
            return
        if kind == "pong":
            waiting = self._pings.pop(int(body[0]), None)  # type: ignore[call-overload]
            if waiting is not None:
                waiting[1]((time.monotonic() - waiting[0]) * 1000)
            return
        if kind == "drain":
            log.warning("node %s asks this node to drain", node)
            self.handler.drain_requested(peer)
            return
        if kind == "bye":
            log.info("node %s left the cluster", node)
            self._gone(peer, State.LEFT)
            return
        verdict = peer.inn.accept(incarnation, stream, seq)
        if verdict == "dup":
            return
        if verdict == "gap":
            if now - peer.inn.resend_asked_at >= RESEND_PAUSE_S:
                peer.inn.resend_asked_at = now
                first = peer.inn.expected if stream == peer.inn.stream else 1
                self._unsequenced(peer.host, peer.port, "resend", [stream, first])
            return
        if verdict == "new":
            self.handler.peer_reset(peer)
        touched.add(node)
        if kind == "snapend" and peer.state is State.JOINING:
            peer.state = State.ALIVE
            log.info("node %s is ALIVE (incarnation %d, %s:%d)", node, incarnation, peer.host, peer.port)
        self.handler.peer_frame(peer, kind, body, frames)

    def _check_head(self, now: float, peer: Peer, stream: int, seq: int) -> None:
        """The peer's hb says how far its stream to us goes: ask for what we are missing (the
        start of a new stream, or a tail lost in a broken connection) even when nothing else
        comes."""
        inn = peer.inn
        if stream == inn.stream and seq <= inn.applied:
            return
        if now - inn.resend_asked_at < RESEND_PAUSE_S:
            return
        inn.resend_asked_at = now
        first = inn.expected if stream == inn.stream else 1
        self._unsequenced(peer.host, peer.port, "resend", [stream, first])

    def _hello(self, now: float, node: str, incarnation: int, host: str, port: int) -> Peer | None:
        peer = self.peers.get(node)
        if peer is not None and incarnation < peer.incarnation:
            return None  # a late frame of an earlier life
        if peer is not None and peer.incarnation != incarnation:
            log.warning("node %s restarted (incarnation %d -> %d)", node, peer.incarnation, incarnation)
            if peer.routable:
                self._gone(peer, State.LEFT)
            peer = None
        if peer is None or peer.state in (State.DEAD, State.LEFT):
            if peer is None:
                log.info("node %s found at %s:%d (incarnation %d)", node, host, port, incarnation)
            else:
                log.info("node %s is back (%s)", node, peer.state.value)
            peer = Peer(node, incarnation, host, port, last_heard=now)
            self.peers[node] = peer
            self.keys_by_address[(host, port)] = node
            self._start_stream(peer)
            return peer
        peer.heard(now)
        if (peer.host, peer.port) != (host, port):
            peer.host, peer.port = host, port
        return peer

    def _start_stream(self, peer: Peer) -> None:
        self._stream_no += 1
        peer.out = OutStream(self._stream_no)
        self.counters["restarts"] += 1
        self.handler.peer_joined(peer)
        self.send(peer, "snapend")

    def _resend(self, peer: Peer, stream: int, first: int) -> None:
        out = peer.out
        if out is None:
            return
        if stream != out.stream:
            return  # about a stream we already replaced (a request queued before the restart)
        frames = out.resend_from(stream, first)
        if frames is None:
            log.warning("node %s asked for frames we no longer hold: starting a new stream", peer.name)
            peer.dropped += out.unacked
            self._start_stream(peer)
            return
        self.counters["resends"] += len(frames)
        for _seq, header, rest in frames:
            self._raw(peer.host, peer.port, [header, *rest])

    def close(self) -> None:
        if self.discovery is not None:
            self.discovery.close()
        for dealer in self.dealers.values():
            dealer.sock.close(0)
        self.router.close(0)


def _tune(sock: zmq.Socket[bytes], settings: LinkSettings) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(int(settings.heartbeat_s * 1000), 100))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(int(settings.suspect_after_s * 1000), 300))
    sock.setsockopt(zmq.HEARTBEAT_TTL, max(int(settings.suspect_after_s * 1000), 300))
    sock.setsockopt(zmq.CONNECT_TIMEOUT, 2000)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
