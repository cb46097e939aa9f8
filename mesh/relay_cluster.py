"""What the relay does with the other nodes: routes, the client registry, claims, data, deaths.

Why: `mesh/cluster.py` moves frames between relays reliably; this mixin gives them meaning
(`mesh/PROTOCOL.md`, "The cluster plane"): it replicates this node's filters and clients to the
peers and holds theirs, forwards the workers' publishes to the nodes whose routes match (one
copy per node) and the peers' publishes to the workers, runs cluster-wide takeover with epochs,
and, when a node dies, removes its state and lets one survivor publish its wills. `Relay` mixes
this in when the node runs with `-cluster`.

Must not: decode a publish batch on the forwarding path (frames are passed on as they came);
answer a claim before every live peer agreed or timed out; send a `release` for an epoch that
is not older than the holder's.

Invariants:
- Remote prefixes: the relay's SUB is subscribed to the literal prefix of every peer filter
  exactly while some peer has a filter with that prefix (a count per prefix).
- A claim ends exactly once, `lost` when any peer holds or claims the client id with a newer
  `(epoch, node)`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from mesh import envelope as env
from mesh.cluster import ClusterLinks
from mesh.envelope import CH_DURABLE, CH_REMOTE, CH_RETAINED, CH_RETAINED_QUIET, CH_SHARED, Item
from mesh.errors import EnvelopeError
from mesh.hlc import ZERO, HybridClock, MergePolicy, Stamp, as_stamp, later, take_theirs
from mesh.peers import Frames, Peer, State, survivor
from mesh.routes import RouteTable, literal_prefix

if TYPE_CHECKING:
    from mesh.relay import RelaySettings, RelayState

log = logging.getLogger("mesh.relay")

TOMBSTONES_MAX = 100_000  # stamps of cleared retained topics kept for merges after a split


@dataclass(slots=True)
class PendingClaim:
    identity: bytes
    req_id: int
    client_id: str
    epoch: int
    holder: int | None
    waiting: set[str]
    deadline: float
    lost: bool = False


@dataclass(slots=True)
class Releasing:
    """A peer's claim waits for our worker to write the session to the store."""

    peer: str
    epoch: int
    deadline: float
    # Our own older claim lost while a local hand-off to its worker was under way: that worker
    # writes the handed session to the store and says `released` with this (its claim's) epoch.
    via_claim: int = -1


@dataclass(slots=True)
class ClusterState:
    routes: RouteTable = field(default_factory=RouteTable)
    prefix_counts: dict[str, int] = field(default_factory=dict)
    local_routes: dict[str, set[int]] = field(default_factory=dict)  # filter -> workers holding it
    remote_clients: dict[str, tuple[str, int]] = field(default_factory=dict)  # client -> (node, epoch)
    claims: dict[str, PendingClaim] = field(default_factory=dict)
    releasing: dict[str, Releasing] = field(default_factory=dict)
    declared_dead: set[str] = field(default_factory=set)  # nodes we declared DEAD (their sessions recovered)
    streams_seen: set[tuple[str, int]] = field(
        default_factory=set
    )  # (node, incarnation) that sent us a stream


class ClusterRelay:
    """Mixed into `Relay`; expects the attributes below."""

    state: RelayState
    settings: RelaySettings
    minority: bool
    links: ClusterLinks | None
    cluster: ClusterState
    router: zmq.Socket[bytes]
    pub: zmq.Socket[bytes]
    sub: zmq.Socket[bytes]
    node: str
    handoff_timeout_s: float
    pub_outbox: deque[list[bytes]]
    clock: HybridClock
    merge_policy: MergePolicy

    if TYPE_CHECKING:

        def _reply(self, identity: bytes, kind: str, req_id: int, *body: object) -> None: ...

        def _complete_syncs(self, now: float | None = None) -> None: ...

        def _publish_local(self, parts: list[bytes]) -> None: ...

        def _store_retained(self, topic: str, item: Item | None) -> None: ...

        def drain(self, node: str | None) -> bool: ...

    # -- from our workers --------------------------------------------------------------------------

    def local_route(self, worker: int, op: str, topic_filter: str) -> None:
        holders = self.cluster.local_routes.setdefault(topic_filter, set())
        before = bool(holders)
        if op == "+":
            holders.add(worker)
        else:
            holders.discard(worker)
        if not holders:
            del self.cluster.local_routes[topic_filter]
        if bool(holders) != before and self.links is not None:
            self.links.broadcast("route", ("+" if holders else "-", topic_filter))

    def forget_worker_routes(self, worker: int) -> None:
        for topic_filter in [f for f, ws in self.cluster.local_routes.items() if worker in ws]:
            self.local_route(worker, "-", topic_filter)

    def cluster_claim(
        self,
        identity: bytes,
        req_id: int,
        client_id: str,
        epoch: int,
        holder: int | None,
        clean_start: bool,
        now: float,
    ) -> bool:
        """Ask the peers; False when there is nobody to ask (answer at once)."""
        links = self.links
        if links is None:
            return False
        peers = links.routable()
        if not peers:
            return False
        old = self.cluster.claims.pop(client_id, None)
        if old is not None:  # an older claim of ours for the same id: the newer one wins
            self._reply(old.identity, "claimed", old.req_id, client_id, old.epoch, None, True)
        self.cluster.claims[client_id] = PendingClaim(
            identity, req_id, client_id, epoch, holder, {p.name for p in peers}, now + self.handoff_timeout_s
        )
        for peer in peers:
            links.send(peer, "claim", (client_id, epoch, clean_start))
        return True

    def _finish_claim(self, claim: PendingClaim) -> None:
        self.cluster.claims.pop(claim.client_id, None)
        if claim.lost:
            self.state.unregister(claim.client_id, claim.epoch)
            log.info("client %r: claim lost to a newer connection on another node", claim.client_id)
            # with the old holder, if a hand-off to the claiming worker is under way: it waits
            # for the session and writes it to the store (see _peer_claim)
            releasing = self.cluster.releasing.get(claim.client_id)
            holder = claim.holder if releasing is not None and releasing.via_claim == claim.epoch else None
            self._reply(claim.identity, "claimed", claim.req_id, claim.client_id, claim.epoch, holder, True)
            return
        self._reply(
            claim.identity, "claimed", claim.req_id, claim.client_id, claim.epoch, claim.holder, False
        )
        entry = self.state.registry.get(claim.client_id)
        if self.links is not None and entry is not None and entry[1] == claim.epoch:
            self.links.broadcast("reg", (claim.client_id, claim.epoch, entry[0]))

    def cluster_released(self, client_id: str, epoch: int) -> None:
        releasing = self.cluster.releasing.get(client_id)
        if releasing is None or epoch not in (releasing.epoch, releasing.via_claim):
            return
        del self.cluster.releasing[client_id]
        self._answer_claim(releasing.peer, client_id, releasing.epoch, True)

    def cluster_unregister(self, client_id: str, epoch: int) -> None:
        if self.links is not None:
            self.links.broadcast("unreg", (client_id, epoch))

    def _answer_claim(self, peer_name: str, client_id: str, epoch: int, ok: bool) -> None:
        links = self.links
        if links is None:
            return
        peer = links.peers.get(peer_name)
        if peer is not None and peer.routable:
            links.send(peer, "claimed", (client_id, epoch, ok))

    # -- the workers' data for other nodes ----------------------------------------------------------

    def forward_local(
        self, channel: bytes, data: bytes, now: float, message: env.DataMessage | None = None
    ) -> None:
        """A message from a local worker (or the store's `\\x00D`) that other nodes may want;
        `message` is the envelope already decoded (`\\x00R`, `\\x00S`), so it is not decoded twice."""
        links = self.links
        if links is None:
            return
        if channel[:1] != b"\x00":
            nodes = self.cluster.routes.match(channel.decode("utf-8", "replace"))
            if nodes:
                frames = (channel, data)
                for name in nodes:
                    peer = links.peers.get(name)
                    if peer is not None and peer.routable:
                        links.send(peer, "d", (), frames)
            return
        if channel in (CH_RETAINED, CH_SHARED):
            if message is None:
                try:
                    message = env.unpack_data(data)
                except EnvelopeError:
                    return
            if isinstance(message, env.SyncMarker) or "/" in message.origin:
                return
            relabelled = self._relabel(message)
            if relabelled is None:
                return
            if channel == CH_RETAINED and isinstance(message, env.PublishBatch):
                stamp, hits = self.state.retained_meta.get(message.topic, (ZERO, 0))
                links.broadcast("d", (list(stamp), hits), (channel, relabelled))
            else:
                links.broadcast("d", (), (channel, relabelled))
        elif channel == CH_DURABLE:
            links.broadcast("d", (), (channel, data))
        elif channel.startswith(CH_REMOTE):
            name = channel[2:].split(b"/", 1)[0].decode("utf-8", "replace")
            peer = links.peers.get(name)
            if peer is not None and peer.routable:
                links.send(peer, "d", (), (channel, data))

    def _relabel(self, message: env.DataMessage) -> bytes | None:
        """The envelope again, with origin `node/wN`, so that receivers key it by node."""
        origin = f"{self.node}/{message.origin}"
        if isinstance(message, env.PublishBatch):
            return env.pack_publish_batch(origin, message.seq, message.topic, message.items)
        if isinstance(message, env.SharedUpdate):
            return env.pack_shared_update(
                origin,
                message.seq,
                message.op,
                message.group,
                message.topic_filter,
                message.client_id,
                message.qos,
                message.sub_id,
            )
        return None

    # -- LinkHandler: what the peers say ------------------------------------------------------------

    def peer_joined(self, peer: Peer) -> None:
        """Our snapshot at the start of a stream to the peer (PROTOCOL.md)."""
        links = self.links
        assert links is not None
        if peer.name in self.cluster.declared_dead:
            # A node we declared dead is back (a cut healed): it may have declared us dead too
            # and marked our sessions offline meanwhile; our workers write the online ones again.
            self.cluster.declared_dead.discard(peer.name)
            self._reassert()
        for topic_filter in self.cluster.local_routes:
            links.send(peer, "route", ("+", topic_filter))
        for client_id, (worker, epoch) in self.state.registry.items():
            links.send(peer, "reg", (client_id, epoch, worker))
        for member in self.state.shared.values():
            if "/" in member.origin:
                continue
            data = self._relabel(member)
            if data is not None:
                links.send(peer, "d", (), (CH_SHARED, data))
        meta = self.state.retained_meta
        held = dict(self.state.snapshot_retained(now=_now()))
        for topic, (stamp, hits) in list(meta.items()):
            item = held.pop(topic, None)
            if item is None:
                if topic in self.state.retained:
                    continue  # expired just now
                item = (0, True, b"", "", None, None, 0)  # a clear (tombstone)
            data = env.pack_publish_batch(f"{self.node}/snap", 0, topic, (item,))
            links.send(peer, "d", (list(stamp), hits), (CH_RETAINED_QUIET, data))
        for topic, item in held.items():  # (no stamp: loaded from the store at start)
            data = env.pack_publish_batch(f"{self.node}/snap", 0, topic, (item,))
            links.send(peer, "d", ([0, 0, ""], 0), (CH_RETAINED_QUIET, data))

    def peer_reset(self, peer: Peer) -> None:
        self._drop_node_state(peer.name)
        key = (peer.name, peer.incarnation)
        if key in self.cluster.streams_seen:
            # the same life of the node restarted its stream to us: it lost us for a while (it
            # may have declared us dead and recovered our sessions, and frames were lost)
            self._reassert()
            self._tell_workers("rescan")
        self.cluster.streams_seen.add(key)

    def _reassert(self) -> None:
        self._tell_workers("reassert")

    def _tell_workers(self, kind: str) -> None:
        for index in self.state.workers:
            self._reply(f"w{index}".encode(), kind, 0)

    def peer_gone(self, peer: Peer, why: State) -> None:
        self._drop_node_state(peer.name)
        self._tell_workers("rescan")  # what it acknowledged may be only in the store now
        for claim in list(self.cluster.claims.values()):
            claim.waiting.discard(peer.name)
            if not claim.waiting:
                self._finish_claim(claim)
        for client_id, releasing in list(self.cluster.releasing.items()):
            if releasing.peer == peer.name:
                del self.cluster.releasing[client_id]
        self._complete_syncs()
        if why is State.DEAD and self.links is not None:
            self.cluster.declared_dead.add(peer.name)
            chosen = survivor(peer.name, self.links.alive())
            if chosen == self.node:
                log.warning("node %s is dead: recovering its wills and sessions here", peer.name)
                self._reply(b"w1", "recover", 0, peer.name)

    def view_changed(self, alive: list[str]) -> None:
        """Split-brain protection: fewer live members than MinimumClusterSize is the minority."""
        cluster = self.settings.cluster
        if cluster is None or not cluster.minimum_cluster_size:
            return
        minority = len(alive) < cluster.minimum_cluster_size
        if minority == self.minority:
            return
        self.minority = minority
        if minority:
            log.error(
                "only %d of the %d live members split-brain protection needs: this node is in the minority%s",
                len(alive),
                cluster.minimum_cluster_size,
                "" if cluster.allow_connect else "; refusing clients and sending them elsewhere",
            )
        else:
            log.warning("%d live members: the cluster is safe again", len(alive))
        self._tell_workers_minority()

    def _minority_reference(self) -> str:
        cluster = self.settings.cluster
        return "" if cluster is None else cluster.server_reference

    def _tell_workers_minority(self) -> None:
        for index in self.state.workers:
            self._tell_worker_minority(f"w{index}".encode())

    def _tell_worker_minority(self, identity: bytes) -> None:
        cluster = self.settings.cluster
        if cluster is None:
            return
        if cluster.allow_connect:
            self._reply(
                identity, "minorityops", 0, self.minority, cluster.allow_publish, cluster.allow_subscribe
            )
        else:
            self._reply(identity, "minority", 0, self.minority, self._minority_reference())

    def drain_requested(self, peer: Peer) -> None:
        self.drain(None)  # as POST /admin/shutdown: the supervisor drains the node

    def _drop_node_state(self, name: str) -> None:
        cluster = self.cluster
        for topic_filter in cluster.routes.drop_node(name):
            self._remote_prefix(literal_prefix(topic_filter), -1)
        for client_id in [c for c, (n, _) in cluster.remote_clients.items() if n == name]:
            del cluster.remote_clients[client_id]
        prefix = name + "/"
        gone = [k for k, m in self.state.shared.items() if m.origin.startswith(prefix)]
        for key in gone:
            del self.state.shared[key]
        if gone:
            for index in self.state.workers:
                self._reply(f"w{index}".encode(), "deadnode", 0, name)

    def _remote_prefix(self, prefix: str, delta: int) -> None:
        counts = self.cluster.prefix_counts
        count = counts.get(prefix, 0) + delta
        if count > 0:
            counts[prefix] = count
            if count == 1 and delta > 0:
                self.sub.subscribe(prefix.encode())
        else:
            counts.pop(prefix, None)
            if delta < 0:
                self.sub.unsubscribe(prefix.encode())

    def peer_frame(self, peer: Peer, kind: str, body: list[object], frames: Frames) -> None:
        cluster = self.cluster
        if kind == "d":
            if len(frames) == 2:
                self._remote_data(peer, frames[0], frames[1], body)
        elif kind == "route":
            op, topic_filter = body
            assert isinstance(topic_filter, str)
            if op == "+":
                if cluster.routes.add(peer.name, topic_filter):
                    self._remote_prefix(literal_prefix(topic_filter), 1)
            elif cluster.routes.remove(peer.name, topic_filter):
                self._remote_prefix(literal_prefix(topic_filter), -1)
        elif kind == "reg":
            client_id, epoch = str(body[0]), int(body[1])  # type: ignore[call-overload]
            self.state.epoch = max(self.state.epoch, epoch)
            known = cluster.remote_clients.get(client_id)
            if known is not None and (known[1], known[0]) > (epoch, peer.name):
                return  # an older registration than one we know of (a healed split)
            cluster.remote_clients[client_id] = (peer.name, epoch)
            held = self.state.registry.get(client_id)
            if (
                held is not None
                and (held[1], self.node) < (epoch, peer.name)
                and client_id not in cluster.claims
            ):
                # Both sides of a healed split had the client connected: the older epoch goes
                # (its session to the store), so one live session per client id remains.
                worker = held[0]
                log.warning(
                    "client %r is also connected on node %s (newer): releasing ours", client_id, peer.name
                )
                del self.state.registry[client_id]
                self.cluster_unregister(client_id, held[1])
                if self.state.alive(worker):
                    self._reply(f"w{worker}".encode(), "release", 0, client_id, epoch, 0, False)
        elif kind == "unreg":
            client_id, epoch = str(body[0]), int(body[1])  # type: ignore[call-overload]
            if cluster.remote_clients.get(client_id) == (peer.name, epoch):
                del cluster.remote_clients[client_id]
        elif kind == "claim":
            self._peer_claim(peer, str(body[0]), int(body[1]), bool(body[2]))  # type: ignore[call-overload]
        elif kind == "claimed":
            client_id, epoch, ok = str(body[0]), int(body[1]), bool(body[2])  # type: ignore[call-overload]
            claim = cluster.claims.get(client_id)
            if claim is None or claim.epoch != epoch:
                return
            claim.waiting.discard(peer.name)
            if not ok:
                claim.lost = True
            if not claim.waiting:
                self._finish_claim(claim)

    def _peer_claim(self, peer: Peer, client_id: str, epoch: int, clean_start: bool) -> None:
        state = self.state
        state.epoch = max(state.epoch, epoch)  # our next epoch is newer than every one we saw
        theirs = (epoch, peer.name)
        pending = self.cluster.claims.get(client_id)
        if pending is not None:
            if (pending.epoch, self.node) > theirs:
                self._answer_claim(peer.name, client_id, epoch, False)
                return
            pending.lost = True  # ours is older: it loses when it ends
            if pending.holder is not None and state.alive(pending.holder):
                # The session is on its way from its old worker to our claiming worker: the peer
                # may load it only once that worker has written it to the store (`released`).
                self.cluster.releasing[client_id] = Releasing(
                    peer.name, epoch, _now() + self.handoff_timeout_s, pending.epoch
                )
                return
        held = state.registry.get(client_id)
        if held is not None and pending is None:
            worker, mine = held
            if (mine, self.node) > theirs:
                self._answer_claim(peer.name, client_id, epoch, False)
                return
            if state.alive(worker):
                self.cluster.releasing[client_id] = Releasing(
                    peer.name, epoch, _now() + self.handoff_timeout_s
                )
                self._reply(f"w{worker}".encode(), "release", 0, client_id, epoch, 0, clean_start)
                del state.registry[client_id]
                return
            del state.registry[client_id]
        self.cluster.remote_clients[client_id] = (peer.name, epoch)
        self._answer_claim(peer.name, client_id, epoch, True)

    def _remote_data(self, peer: Peer, channel: bytes, data: bytes, body: list[object] | None = None) -> None:
        if channel[:1] != b"\x00":
            self._publish_local([channel, data])
            return
        if channel in (CH_RETAINED, CH_SHARED, CH_RETAINED_QUIET):
            try:
                message = env.unpack_data(data)
            except EnvelopeError as exc:
                log.warning("bad envelope from node %s dropped: %s", peer.name, exc)
                return
            if isinstance(message, env.PublishBatch) and channel != CH_SHARED:
                self._remote_retained(channel, message, data, body or [])
                return
            self.state.apply(channel, message, _now())
            self._publish_local([channel, data])
        elif channel == CH_DURABLE:
            self._publish_local([channel, data])
        elif channel.startswith(CH_REMOTE):
            rest = channel[2:].split(b"/")
            if len(rest) >= 2 and rest[0].decode("utf-8", "replace") == self.node and rest[1].isdigit():
                self._publish_local([env.inbox(int(rest[1])), data])

    # -- retained messages across nodes (mesh/hlc.py) -------------------------------------------------

    def stamp_retained(self, topic: str) -> tuple[Stamp, int]:
        """A local change of a topic's retained message: a new stamp, one more hit."""
        stamp = self.clock.stamp(int(time.time() * 1000))
        hits = self.state.retained_meta.get(topic, (ZERO, 0))[1] + 1
        self.state.retained_meta[topic] = (stamp, hits)
        self._bound_tombstones()
        return stamp, hits

    def _bound_tombstones(self) -> None:
        """The stamps of cleared topics (tombstones) make a clear win over an older set after a
        split heals; past TOMBSTONES_MAX the oldest go (a set older than a forgotten clear could
        then come back after a very long split). Trimmed to 90% at once: sorting is amortised."""
        meta = self.state.retained_meta
        retained = self.state.retained
        if len(meta) - len(retained) <= TOMBSTONES_MAX:
            return
        dead = sorted((stamp, topic) for topic, (stamp, _hits) in meta.items() if topic not in retained)
        for _stamp, topic in dead[: len(dead) - TOMBSTONES_MAX * 9 // 10]:
            del meta[topic]

    def _remote_retained(
        self, channel: bytes, message: env.PublishBatch, data: bytes, body: list[object]
    ) -> None:
        """A live change from another node (last writer by stamp wins) or a snapshot entry after
        a (re)join (the merge policy decides)."""
        state = self.state
        topic = message.topic
        theirs = as_stamp(body[0]) if body else None
        their_hits = int(body[1]) if len(body) > 1 and isinstance(body[1], int) else 1
        if theirs is None:
            theirs = self.clock.stamp(int(time.time() * 1000))  # (a sender without stamps)
        self.clock.observe(theirs)
        mine = state.retained_meta.get(topic)
        present = bool(message.items[-1][2])
        if channel == CH_RETAINED_QUIET:
            take = take_theirs(
                self.merge_policy,
                None if mine is None else mine[0],
                0 if mine is None else mine[1],
                topic in state.retained,
                theirs,
                their_hits,
                present,
            )
        else:
            take = mine is None or later(theirs, mine[0])
        if take:
            state.retained_meta[topic] = (theirs, their_hits)
            if not present:
                self._bound_tombstones()
            state.apply(CH_RETAINED, message, _now(), mark=channel == CH_RETAINED)
            self._publish_local([channel, data])  # (quiet: stored by the workers, not routed)
            if channel == CH_RETAINED_QUIET and self.settings.store:
                # a merge after a split: the database must end with the winner too (a later
                # start loads it); every node that did not hold the winner writes it
                self._store_retained(topic, message.items[-1] if present else None)
        elif channel == CH_RETAINED:
            # an older value than ours: our subscribers still get the publish, nobody stores it
            self._publish_local([topic.encode(), data])

    # -- timers ---------------------------------------------------------------------------------------

    def cluster_timers(self, now: float) -> None:
        for claim in list(self.cluster.claims.values()):
            if now >= claim.deadline:
                log.warning(
                    "client %r: nodes %s did not answer the claim within %.1fs; going on",
                    claim.client_id,
                    sorted(claim.waiting),
                    self.handoff_timeout_s,
                )
                claim.waiting.clear()
                self._finish_claim(claim)
        for client_id, releasing in list(self.cluster.releasing.items()):
            if now >= releasing.deadline:
                del self.cluster.releasing[client_id]
                log.warning("client %r: the worker did not release the session in time", client_id)
                self._answer_claim(releasing.peer, client_id, releasing.epoch, True)

    def sync_marks(self) -> dict[str, int]:
        """What each routable peer must acknowledge before a barrier started now completes."""
        if self.links is None:
            return {}
        return {p.name: p.out.seq for p in self.links.routable() if p.out is not None}

    def marks_reached(self, marks: dict[str, int]) -> bool:
        links = self.links
        if links is None:
            return True
        for name, seq in marks.items():
            peer = links.peers.get(name)
            if peer is None or not peer.routable or peer.out is None or peer.out.acked >= seq:
                continue
            return False
        return True


def _now() -> float:
    return time.monotonic()
