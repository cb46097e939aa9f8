"""What the relay does with other nodes (`mesh/relay_cluster.py`, mixed into `mesh/relay.py`).

A real `Relay` (node "a", one worker, ipc sockets in a private directory) gets a small fake
`links` object in the place of `ClusterLinks` that records what would be sent; worker 1 is a
DEALER with identity `w1` on `relay.ctl`, so replies are read as the worker reads them. The last
tests wire two relays with real `ClusterLinks` over 127.0.0.1.

What is pinned (`mesh/PROTOCOL.md`, "Routing across nodes", "Session takeover across nodes", "A
dead node"): a node's route goes to the peers only when its count on the node goes 0 <-> 1; a
peer's routes are matched and their literal prefixes subscribed exactly while some peer holds
them; the registry replicas follow `reg`/`unreg`; a peer's claim releases an older local holder
(to the store: new index 0) and is answered only after `released`, is refused when we hold or
claim the id with a newer `(epoch, node)`, and makes an older pending claim of ours lose; our
claim is answered to the worker once every live peer said ok (lost when one said no) or the time
is up; publishes go once to each node whose routes match; a node's state is dropped on reset or
death; the survivor with the smallest name asks its worker 1 to `recover` a dead node.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import cast

import pytest
import zmq

from mesh import envelope as env
from mesh.cluster import ClusterLinks, LinkSettings
from mesh.envelope import CH_DURABLE, CH_RETAINED, CH_RETAINED_QUIET, CH_SHARED, Item
from mesh.peers import Frames, OutStream, Peer, State
from mesh.relay import Relay, RelaySettings, _Worker
from mesh.sockets import endpoint
from tests.unit.mesh.stepping import step_until

pytestmark = pytest.mark.timeout(60)

Sent = tuple[str, str, tuple[object, ...], Frames]


class FakeLinks:
    """The part of `ClusterLinks` the relay uses, recording instead of sending."""

    def __init__(self, node: str = "a") -> None:
        self.node = node
        self.peers: dict[str, Peer] = {}
        self.sent: list[Sent] = []

    def add(self, name: str, state: State = State.ALIVE) -> Peer:
        routable = state in (State.JOINING, State.ALIVE, State.SUSPECT)
        peer = Peer(name, 1, "127.0.0.1", 1, state=state, out=OutStream(1) if routable else None)
        self.peers[name] = peer
        return peer

    def kill(self, name: str, why: State) -> Peer:
        """What `ClusterLinks._gone` does before it calls `peer_gone`."""
        peer = self.peers[name]
        peer.state = why
        peer.out = None
        return peer

    def send(self, peer: Peer, kind: str, body: tuple[object, ...] = (), frames: Frames = ()) -> None:
        if peer.out is None:
            return
        peer.out.next_seq()
        self.sent.append((peer.name, kind, tuple(body), tuple(frames)))

    def broadcast(self, kind: str, body: tuple[object, ...] = (), frames: Frames = ()) -> None:
        for peer in self.peers.values():
            if peer.routable and peer.out is not None:
                self.send(peer, kind, body, frames)

    def routable(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.routable and p.out is not None]

    def alive(self) -> list[str]:
        names = [p.name for p in self.peers.values() if p.state in (State.ALIVE, State.SUSPECT)]
        return sorted([self.node, *names])

    def take(self) -> list[Sent]:
        sent, self.sent = self.sent, []
        return sent


class RecordingSub:
    """Stands in for the relay's SUB: records (un)subscriptions and passes them on."""

    def __init__(self, real: zmq.Socket[bytes]) -> None:
        self.real = real
        self.calls: list[tuple[str, bytes]] = []

    def subscribe(self, prefix: bytes) -> None:
        self.calls.append(("+", prefix))
        self.real.subscribe(prefix)

    def unsubscribe(self, prefix: bytes) -> None:
        self.calls.append(("-", prefix))
        self.real.unsubscribe(prefix)


def new_ipc_dir() -> str:
    return tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # unix socket paths are short


def wait_for(relay: Relay, done: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    """Let the relay read its control socket until `done()`; bounded."""
    deadline = time.monotonic() + timeout_s
    for _ in range(1000):
        if done():
            return True
        if time.monotonic() > deadline:
            break
        if relay.router.poll(20):
            relay._drain_router(time.monotonic())
    return done()


class Harness:
    def __init__(self, node: str = "a", links: bool = True) -> None:
        self.ipc_dir = new_ipc_dir()
        self.relay = Relay(RelaySettings(ipc_dir=self.ipc_dir, worker_count=1, node=node, cluster=None))
        self.real_sub = self.relay.sub
        self.sub = RecordingSub(self.real_sub)
        self.relay.sub = cast(zmq.Socket[bytes], self.sub)
        self.links = FakeLinks(node)
        if links:
            self.relay.links = cast(ClusterLinks, self.links)
        self.published: list[list[bytes]] = []
        self.relay._publish_local = self.published.append  # type: ignore[method-assign,assignment]
        self.rescans = 0
        self.worker = self.relay.ctx.socket(zmq.DEALER)
        self.worker.setsockopt(zmq.LINGER, 0)
        self.worker.setsockopt(zmq.IDENTITY, b"w1")
        self.worker.connect(endpoint(self.ipc_dir, "relay.ctl"))
        self.control("hello", 0, 1, 1, os.getpid())
        assert wait_for(self.relay, lambda: 1 in self.relay.state.workers)

    def control(self, kind: str, req_id: int, *body: object) -> None:
        """Worker 1 sends a control frame; the relay reads what is there."""
        self.worker.send(env.pack_control(kind, req_id, *body))
        if self.relay.router.poll(2000):
            self.relay._drain_router(time.monotonic())

    def recv(self, timeout_ms: int = 2000) -> env.Control:
        """The next control for worker 1, past the `rescan`s a peer leaving sends (tested alone)."""
        while True:
            assert self.worker.poll(timeout_ms), "worker 1 got nothing"
            control = env.unpack_control(self.worker.recv())
            if control.kind != "rescan":
                return control
            self.rescans += 1

    def quiet(self, timeout_ms: int = 100) -> bool:
        while self.worker.poll(timeout_ms):
            if env.unpack_control(self.worker.recv()).kind != "rescan":
                return False
            self.rescans += 1
        return True

    def frame(self, peer: str, kind: str, *body: object, frames: Frames = ()) -> None:
        self.relay.peer_frame(self.links.peers[peer], kind, list(body), frames)

    def close(self) -> None:
        self.worker.close(0)
        for sock in (self.relay.router, self.relay.pub, self.real_sub):
            sock.close(0)
        if self.relay.links is not None and not isinstance(self.relay.links, FakeLinks):
            self.relay.links.close()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    harness.links.add("b")
    harness.links.add("c")
    yield harness
    harness.close()


def item(payload: bytes = b"x") -> Item:
    return (1, True, payload, "pub", None, None, 0)


def shared_update(origin: str, client_id: str = "s1", op: str = "+") -> env.SharedUpdate:
    return env.SharedUpdate(origin, 1, op, "g", "s/+", client_id, 1, None)


def pack_shared(member: env.SharedUpdate) -> bytes:
    m = member
    return env.pack_shared_update(
        m.origin, m.seq, m.op, m.group, m.topic_filter, m.client_id, m.qos, m.sub_id
    )


# -- local routes ------------------------------------------------------------------------------------


def test_local_route_goes_to_peers_only_on_zero_one_changes(h: Harness) -> None:
    h.relay.local_route(1, "+", "x/#")
    assert h.links.take() == [("b", "route", ("+", "x/#"), ()), ("c", "route", ("+", "x/#"), ())]
    h.relay.local_route(2, "+", "x/#")
    h.relay.local_route(1, "+", "x/#")
    h.relay.local_route(1, "-", "x/#")
    assert h.links.take() == []
    h.relay.local_route(2, "-", "x/#")
    assert h.links.take() == [("b", "route", ("-", "x/#"), ()), ("c", "route", ("-", "x/#"), ())]
    assert h.relay.cluster.local_routes == {}


def test_a_route_minus_for_an_unknown_filter_is_ignored(h: Harness) -> None:
    h.relay.local_route(1, "-", "never")
    assert h.links.take() == []
    assert h.relay.cluster.local_routes == {}


def test_local_routes_skip_dead_peers(h: Harness) -> None:
    h.links.kill("c", State.DEAD)
    h.relay.local_route(1, "+", "x")
    assert h.links.take() == [("b", "route", ("+", "x"), ())]


def test_route_control_from_a_worker(h: Harness) -> None:
    h.control("route", 0, "+", "ctl/+")
    assert h.relay.cluster.local_routes == {"ctl/+": {1}}
    assert ("b", "route", ("+", "ctl/+"), ()) in h.links.take()


def test_forget_worker_routes_withdraws_only_what_no_other_worker_holds(h: Harness) -> None:
    h.relay.local_route(1, "+", "x")
    h.relay.local_route(1, "+", "y")
    h.relay.local_route(2, "+", "y")
    h.links.take()
    h.relay.forget_worker_routes(1)
    assert h.links.take() == [("b", "route", ("-", "x"), ()), ("c", "route", ("-", "x"), ())]
    assert h.relay.cluster.local_routes == {"y": {2}}


# -- peers' routes and registry ---------------------------------------------------------------------


def test_peer_routes_are_matched_and_their_prefixes_counted(h: Harness) -> None:
    cluster = h.relay.cluster
    h.frame("b", "route", "+", "a/+/c")
    assert cluster.routes.match("a/q/c") == {"b"}
    assert cluster.prefix_counts == {"a/": 1}
    assert h.sub.calls == [("+", b"a/")]
    h.frame("b", "route", "+", "a/+/c")  # a repeated + changes nothing
    h.frame("c", "route", "+", "a/+/d")
    assert cluster.prefix_counts == {"a/": 2}
    assert h.sub.calls == [("+", b"a/")]
    h.frame("b", "route", "-", "a/+/c")
    assert cluster.prefix_counts == {"a/": 1}
    assert cluster.routes.match("a/q/c") == frozenset()
    assert h.sub.calls == [("+", b"a/")]
    h.frame("c", "route", "-", "a/+/d")
    h.frame("c", "route", "-", "a/+/d")  # a - for an absent filter is ignored
    assert cluster.prefix_counts == {}
    assert h.sub.calls == [("+", b"a/"), ("-", b"a/")]


def test_a_hash_filter_subscribes_its_parent(h: Harness) -> None:
    h.frame("b", "route", "+", "t/#")
    h.frame("b", "route", "+", "#")
    assert h.sub.calls == [("+", b"t"), ("+", b"")]  # "t/#" also matches "t" [MQTT-4.7.1-2]


def test_reg_and_unreg_keep_the_registry_replica(h: Harness) -> None:
    state, cluster = h.relay.state, h.relay.cluster
    state.epoch = 100
    h.frame("b", "reg", "c1", 500, 2)
    assert cluster.remote_clients == {"c1": ("b", 500)}
    assert state.epoch == 500  # our next epoch is newer than every one we saw
    h.frame("c", "reg", "c2", 400, 1)
    assert state.epoch == 500
    h.frame("b", "unreg", "c1", 499)  # another epoch: a newer connection holds it
    h.frame("c", "unreg", "c1", 500)  # another node
    assert cluster.remote_clients == {"c1": ("b", 500), "c2": ("c", 400)}
    h.frame("b", "unreg", "c1", 500)
    assert cluster.remote_clients == {"c2": ("c", 400)}


# -- peers' data -------------------------------------------------------------------------------------


def test_a_peers_publish_is_published_to_the_workers_unchanged(h: Harness) -> None:
    data = env.pack_publish_batch("b/w1", 1, "t/1", (item(),))
    h.frame("b", "d", frames=(b"t/1", data))
    assert h.published == [[b"t/1", data]]


def test_a_shared_pick_reaches_only_our_worker(h: Harness) -> None:
    h.frame("b", "d", frames=(b"\x00Na/1/", b"envelope"))
    h.frame("b", "d", frames=(b"\x00Nz/1/", b"other node"))
    h.frame("b", "d", frames=(b"\x00Na/x/", b"no worker number"))
    assert h.published == [[env.inbox(1), b"envelope"]]


def test_retained_from_a_peer_is_kept_and_published(h: Harness) -> None:
    data = env.pack_publish_batch("b/w1", 3, "r/1", (item(b"new"),))
    h.frame("b", "d", frames=(CH_RETAINED, data))
    assert h.relay.state.retained["r/1"][0][2] == b"new"
    assert h.published == [[CH_RETAINED, data]]


def test_a_snapshot_retained_merges_by_stamp(h: Harness) -> None:
    """LATEST_UPDATE (the default): a snapshot entry replaces ours only when its stamp is later;
    a topic we never heard of is taken (mesh/hlc.py)."""
    h.relay.state.retained["r/1"] = (item(b"ours"), time.monotonic())
    h.relay.state.retained_meta["r/1"] = ((2000, 0, "a"), 1)
    h.relay.state.retained["r/3"] = (item(b"ours too"), time.monotonic())
    h.relay.state.retained_meta["r/3"] = ((2000, 0, "a"), 1)
    older = env.pack_publish_batch("b/snap", 0, "r/1", (item(b"theirs"),))
    missing = env.pack_publish_batch("b/snap", 0, "r/2", (item(b"late joiner"),))
    newer = env.pack_publish_batch("b/snap", 0, "r/3", (item(b"newer"),))
    h.frame("b", "d", [1000, 0, "b"], 1, frames=(CH_RETAINED_QUIET, older))
    h.frame("b", "d", [1000, 0, "b"], 1, frames=(CH_RETAINED_QUIET, missing))
    h.frame("b", "d", [3000, 0, "b"], 1, frames=(CH_RETAINED_QUIET, newer))
    assert h.relay.state.retained["r/1"][0][2] == b"ours"
    assert h.relay.state.retained["r/2"][0][2] == b"late joiner"
    assert h.relay.state.retained["r/3"][0][2] == b"newer"
    assert h.published == [[CH_RETAINED_QUIET, missing], [CH_RETAINED_QUIET, newer]]


def test_a_live_retained_update_older_than_ours_is_routed_not_stored(h: Harness) -> None:
    h.relay.state.retained["r/1"] = (item(b"ours"), time.monotonic())
    h.relay.state.retained_meta["r/1"] = ((2000, 0, "a"), 1)
    older = env.pack_publish_batch("b/w1", 5, "r/1", (item(b"theirs"),))
    h.frame("b", "d", [1000, 0, "b"], 1, frames=(CH_RETAINED, older))
    assert h.relay.state.retained["r/1"][0][2] == b"ours"
    assert h.published == [[b"r/1", older]]  # the publish still reaches our subscribers


def test_durable_updates_of_a_peer_are_published(h: Harness) -> None:
    h.frame("b", "d", frames=(CH_DURABLE, b"dsub"))
    assert h.published == [[CH_DURABLE, b"dsub"]]


def test_a_bad_envelope_from_a_peer_is_dropped(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mesh.relay")
    h.frame("b", "d", frames=(CH_SHARED, b"\x93garbage"))
    assert h.published == []
    assert any("bad envelope from node b" in r.getMessage() for r in caplog.records)


# -- a peer's claim ----------------------------------------------------------------------------------


def test_a_claim_for_an_id_we_do_not_hold_is_granted(h: Harness) -> None:
    h.relay.state.epoch = 10
    h.frame("b", "claim", "cid", 500, False)
    assert h.links.take() == [("b", "claimed", ("cid", 500, True), ())]
    assert h.relay.cluster.remote_clients["cid"] == ("b", 500)
    assert h.relay.state.epoch == 500
    assert h.quiet()


def test_an_older_local_holder_is_released_to_the_store_before_the_answer(h: Harness) -> None:
    h.relay.state.registry["cid"] = (1, 400)
    h.frame("b", "claim", "cid", 500, True)
    release = h.recv()
    assert (release.kind, release.body) == ("release", ("cid", 500, 0, True))  # 0: to the store
    assert h.links.take() == []  # the answer waits for the worker's commit
    assert "cid" not in h.relay.state.registry
    h.relay.cluster_released("cid", 499)  # another epoch: not this release
    assert h.links.take() == []
    h.control("released", 0, "cid", 500)
    assert h.links.take() == [("b", "claimed", ("cid", 500, True), ())]
    assert h.relay.cluster.releasing == {}


def test_a_release_the_worker_does_not_confirm_is_answered_at_the_deadline(h: Harness) -> None:
    h.relay.state.registry["cid"] = (1, 400)
    h.frame("b", "claim", "cid", 500, False)
    h.recv()
    h.relay.cluster_timers(time.monotonic())
    assert h.links.take() == []
    h.relay.cluster_timers(time.monotonic() + h.relay.handoff_timeout_s + 0.1)
    assert h.links.take() == [("b", "claimed", ("cid", 500, True), ())]
    assert h.relay.cluster.releasing == {}


def test_a_newer_local_holder_refuses_the_claim(h: Harness) -> None:
    h.relay.state.registry["cid"] = (1, 600)
    h.frame("b", "claim", "cid", 500, False)
    assert h.links.take() == [("b", "claimed", ("cid", 500, False), ())]
    assert h.relay.state.registry["cid"] == (1, 600)
    assert "cid" not in h.relay.cluster.remote_clients
    assert h.quiet()


def test_equal_epochs_are_ordered_by_node_name(h: Harness) -> None:
    h.links.add("0")  # "0" < "a" < "b"
    h.relay.state.registry["cid"] = (1, 500)
    h.frame("0", "claim", "cid", 500, False)
    assert h.links.take() == [("0", "claimed", ("cid", 500, False), ())]  # (500, "a") > (500, "0")
    h.frame("b", "claim", "cid", 500, False)
    assert h.recv().kind == "release"  # (500, "b") > (500, "a")


def test_a_holder_whose_worker_is_gone_is_dropped_and_the_claim_granted(h: Harness) -> None:
    h.relay.state.registry["cid"] = (2, 400)  # worker 2 is not alive
    h.frame("b", "claim", "cid", 500, False)
    assert h.links.take() == [("b", "claimed", ("cid", 500, True), ())]
    assert "cid" not in h.relay.state.registry
    assert h.quiet()


def claim_locally(h: Harness, client_id: str = "cid", req_id: int = 7, clean_start: bool = False) -> int:
    """Worker 1 claims the id; returns the epoch the relay sent to the peers."""
    h.control("claim", req_id, client_id, clean_start)
    claims = [s for s in h.links.take() if s[1] == "claim"]
    assert claims, "no claim went to the peers"
    epoch = claims[0][2][1]
    assert isinstance(epoch, int)
    return epoch


def test_our_newer_pending_claim_refuses_the_peers(h: Harness) -> None:
    epoch = claim_locally(h)
    h.frame("b", "claim", "cid", epoch - 1, False)
    assert h.links.take() == [("b", "claimed", ("cid", epoch - 1, False), ())]
    assert not h.relay.cluster.claims["cid"].lost


def test_our_older_pending_claim_loses(h: Harness) -> None:
    epoch = claim_locally(h)
    h.frame("b", "claim", "cid", epoch + 1, False)
    assert h.links.take() == [("b", "claimed", ("cid", epoch + 1, True), ())]
    assert h.relay.cluster.claims["cid"].lost
    h.frame("b", "claimed", "cid", epoch, True)
    h.frame("c", "claimed", "cid", epoch, True)
    answer = h.recv()
    assert (answer.kind, answer.req_id, answer.body) == ("claimed", 7, ("cid", epoch, None, True))
    assert "cid" not in h.relay.state.registry


def test_a_peer_claim_waits_while_a_local_holder_is_being_handed_over(h: Harness) -> None:
    h.relay.state.workers[2] = _Worker(incarnation=1, last_seen=time.monotonic())
    h.relay.state.registry["cid"] = (2, 100)  # worker 2 holds the client's older connection
    epoch = claim_locally(h)  # worker 1 claims it: a release to worker 1 went to worker 2
    assert h.relay.cluster.claims["cid"].holder == 2
    h.frame("b", "claim", "cid", epoch + 1, False)
    assert ("b", "claimed", ("cid", epoch + 1, True), ()) not in h.links.take()
    # our claim ends lost; worker 1 is told so *with* the old holder: it waits for the session
    # being handed to it and writes it to the store
    h.frame("b", "claimed", "cid", epoch, False)
    h.frame("c", "claimed", "cid", epoch, True)
    answer = h.recv()
    assert (answer.kind, answer.req_id, answer.body) == ("claimed", 7, ("cid", epoch, 2, True))
    assert h.links.take() == []  # b still waits
    h.control("released", 0, "cid", epoch)  # worker 1: the handed session is in the store
    assert h.links.take() == [("b", "claimed", ("cid", epoch + 1, True), ())]
    assert "cid" not in h.relay.cluster.releasing


def test_a_lost_claim_without_a_hand_off_is_told_without_a_holder(h: Harness) -> None:
    epoch = claim_locally(h)  # nobody held the id
    h.frame("b", "claim", "cid", epoch + 1, False)
    assert h.links.take() == [("b", "claimed", ("cid", epoch + 1, True), ())]
    h.frame("b", "claimed", "cid", epoch, False)
    h.frame("c", "claimed", "cid", epoch, True)
    answer = h.recv()
    assert answer.body == ("cid", epoch, None, True)


# -- our claims --------------------------------------------------------------------------------------


def test_a_claim_without_links_is_answered_at_once() -> None:
    harness = Harness(links=False)
    try:
        harness.control("claim", 3, "cid", False)
        answer = harness.recv()
        epoch = harness.relay.state.registry["cid"][1]
        assert (answer.kind, answer.req_id, answer.body) == ("claimed", 3, ("cid", epoch, None, False))
    finally:
        harness.close()


def test_a_claim_without_live_peers_is_answered_at_once(h: Harness) -> None:
    h.links.kill("b", State.DEAD)
    h.links.kill("c", State.LEFT)
    h.control("claim", 3, "cid", False)
    answer = h.recv()
    assert answer.body[3] is False
    assert h.links.take() == []


def test_our_claim_is_answered_when_every_peer_agreed(h: Harness) -> None:
    epoch = claim_locally(h, clean_start=True)
    assert epoch == h.relay.state.registry["cid"][1]
    assert set(h.relay.cluster.claims["cid"].waiting) == {"b", "c"}
    h.frame("b", "claimed", "cid", epoch, True)
    assert h.quiet()
    h.frame("c", "claimed", "cid", epoch - 1, False)  # an answer to another claim
    assert h.quiet()
    h.frame("c", "claimed", "cid", epoch, True)
    answer = h.recv()
    assert (answer.kind, answer.req_id, answer.body) == ("claimed", 7, ("cid", epoch, None, False))
    assert h.links.take() == [("b", "reg", ("cid", epoch, 1), ()), ("c", "reg", ("cid", epoch, 1), ())]
    assert h.relay.cluster.claims == {}


def test_the_claim_went_to_every_live_peer(h: Harness) -> None:
    h.control("claim", 7, "cid", True)
    epoch = h.relay.state.registry["cid"][1]
    assert h.links.take() == [
        ("b", "claim", ("cid", epoch, True), ()),
        ("c", "claim", ("cid", epoch, True), ()),
    ]


def test_one_refusal_makes_our_claim_lose(h: Harness) -> None:
    epoch = claim_locally(h)
    h.frame("b", "claimed", "cid", epoch, False)
    assert h.quiet()
    h.frame("c", "claimed", "cid", epoch, True)
    answer = h.recv()
    assert answer.body == ("cid", epoch, None, True)
    assert "cid" not in h.relay.state.registry
    assert h.links.take() == []  # no reg for a lost claim


@pytest.mark.parametrize("why", [State.DEAD, State.LEFT])
def test_a_peer_that_goes_is_not_waited_for(h: Harness, why: State) -> None:
    epoch = claim_locally(h)
    h.frame("b", "claimed", "cid", epoch, True)
    h.relay.peer_gone(h.links.kill("c", why), why)
    answers = [h.recv()]
    if why is State.DEAD:  # a is the survivor of c: worker 1 also gets `recover`
        answers.append(h.recv())
    claimed = [a for a in answers if a.kind == "claimed"]
    assert [a.body for a in claimed] == [("cid", epoch, None, False)]


def test_our_claim_goes_on_after_the_handoff_timeout(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mesh.relay")
    epoch = claim_locally(h)
    h.frame("b", "claimed", "cid", epoch, True)
    h.relay.cluster_timers(time.monotonic())
    assert h.quiet()
    h.relay.cluster_timers(time.monotonic() + h.relay.handoff_timeout_s + 0.1)
    assert h.recv().body == ("cid", epoch, None, False)
    assert any(
        "did not answer the claim" in r.getMessage() and "'c'" in r.getMessage() for r in caplog.records
    )


def test_a_newer_local_claim_replaces_the_pending_one(h: Harness) -> None:
    first = claim_locally(h, req_id=1)
    second = claim_locally(h, req_id=2)
    assert second > first
    answer = h.recv()
    assert (answer.req_id, answer.body) == (1, ("cid", first, None, True))
    assert h.relay.cluster.claims["cid"].epoch == second


# -- forwarding our workers' data ------------------------------------------------------------------


def test_publishes_go_once_to_each_node_with_a_matching_route(h: Harness) -> None:
    h.frame("b", "route", "+", "x/#")
    h.frame("b", "route", "+", "x/+")
    h.frame("c", "route", "+", "x/y")
    now = time.monotonic()
    h.relay.forward_local(b"x/y", b"batch1", now)
    assert sorted(h.links.take()) == [
        ("b", "d", (), (b"x/y", b"batch1")),
        ("c", "d", (), (b"x/y", b"batch1")),
    ]
    h.relay.forward_local(b"x/z", b"batch2", now)
    assert h.links.take() == [("b", "d", (), (b"x/z", b"batch2"))]
    h.relay.forward_local(b"q", b"batch3", now)
    assert h.links.take() == []


def test_publishes_skip_a_dead_node_whose_routes_are_still_held(h: Harness) -> None:
    h.frame("b", "route", "+", "x")
    h.frame("c", "route", "+", "x")
    h.links.kill("c", State.DEAD)
    h.relay.forward_local(b"x", b"batch", time.monotonic())
    assert h.links.take() == [("b", "d", (), (b"x", b"batch"))]


def test_durable_updates_go_to_every_node(h: Harness) -> None:
    h.relay.forward_local(CH_DURABLE, b"dsub", time.monotonic())
    assert h.links.take() == [("b", "d", (), (CH_DURABLE, b"dsub")), ("c", "d", (), (CH_DURABLE, b"dsub"))]


def test_a_shared_pick_goes_to_its_node_only(h: Harness) -> None:
    h.relay.forward_local(b"\x00Nc/2/", b"pick", time.monotonic())
    h.relay.forward_local(b"\x00Nzz/2/", b"nobody", time.monotonic())
    assert h.links.take() == [("c", "d", (), (b"\x00Nc/2/", b"pick"))]


def test_our_retained_updates_go_to_every_node_relabelled(h: Harness) -> None:
    data = env.pack_publish_batch("w1", 9, "r/1", (item(b"v"),))
    h.relay.forward_local(CH_RETAINED, data, time.monotonic())
    sent = h.links.take()
    assert [(s[0], s[1], s[3][0]) for s in sent] == [("b", "d", CH_RETAINED), ("c", "d", CH_RETAINED)]
    message = env.unpack_data(sent[0][3][1])
    assert message == env.PublishBatch("a/w1", 9, "r/1", (item(b"v"),))


def test_our_shared_members_go_to_every_node_relabelled(h: Harness) -> None:
    h.relay.forward_local(CH_SHARED, pack_shared(shared_update("w1")), time.monotonic())
    sent = h.links.take()
    assert len(sent) == 2
    message = env.unpack_data(sent[0][3][1])
    assert isinstance(message, env.SharedUpdate) and message.origin == "a/w1"


def test_updates_of_other_nodes_and_bad_envelopes_are_not_forwarded(h: Harness) -> None:
    now = time.monotonic()
    h.relay.forward_local(CH_RETAINED, env.pack_publish_batch("b/w1", 1, "r", (item(),)), now)
    h.relay.forward_local(CH_SHARED, pack_shared(shared_update("b/w1")), now)
    h.relay.forward_local(CH_SHARED, b"\x93garbage", now)
    assert h.links.take() == []


# -- a node's state goes -----------------------------------------------------------------------------


def hold_state_of_b(h: Harness) -> None:
    state = h.relay.state
    h.frame("b", "route", "+", "x/#")
    h.frame("b", "route", "+", "y/+/z")
    h.frame("c", "route", "+", "y/+/q")
    h.frame("b", "reg", "c1", 5, 1)
    h.frame("c", "reg", "c2", 6, 1)
    for member in (shared_update("b/w1", "s1"), shared_update("c/w2", "s2"), shared_update("w1", "s3")):
        state.apply(CH_SHARED, member, time.monotonic())
    h.sub.calls.clear()


def test_a_reset_drops_the_nodes_routes_clients_and_shared_members(h: Harness) -> None:
    hold_state_of_b(h)
    h.relay.peer_reset(h.links.peers["b"])
    cluster, state = h.relay.cluster, h.relay.state
    assert cluster.routes.all_filters() == [("y/+/q", "c")]
    assert cluster.prefix_counts == {"y/": 1}
    assert h.sub.calls == [("-", b"x")]  # "y/" is still wanted by c
    assert cluster.remote_clients == {"c2": ("c", 6)}
    assert sorted(m.origin for m in state.shared.values()) == ["c/w2", "w1"]
    dead = h.recv()
    assert (dead.kind, dead.body) == ("deadnode", ("b",))
    assert h.quiet()  # a reset is not a death: no recover


def test_no_deadnode_for_a_node_without_shared_members(h: Harness) -> None:
    h.frame("b", "route", "+", "x")
    h.relay.peer_reset(h.links.peers["b"])
    assert h.relay.cluster.routes.all_filters() == []
    assert h.quiet()


def test_the_survivor_recovers_a_dead_node(h: Harness) -> None:
    hold_state_of_b(h)
    h.relay.peer_gone(h.links.kill("b", State.DEAD), State.DEAD)
    kinds = {}
    for _ in range(2):
        control = h.recv()
        kinds[control.kind] = control.body
    assert kinds == {"deadnode": ("b",), "recover": ("b",)}  # a < c: a is the survivor
    assert h.relay.cluster.routes.all_filters() == [("y/+/q", "c")]
    assert h.quiet()


def test_only_the_smallest_live_name_recovers(h: Harness) -> None:
    h.links.add("0")  # "0" < "a": "0" recovers, not us
    h.relay.peer_gone(h.links.kill("b", State.DEAD), State.DEAD)
    assert h.quiet(200)


def test_a_joining_node_is_not_a_survivor_candidate(h: Harness) -> None:
    h.links.add("0", State.JOINING)  # not in the view yet
    h.relay.peer_gone(h.links.kill("b", State.DEAD), State.DEAD)
    assert h.recv().body == ("b",)


def test_a_node_that_left_is_not_recovered(h: Harness) -> None:
    h.relay.peer_gone(h.links.kill("b", State.LEFT), State.LEFT)
    assert h.quiet(200)


def test_a_gone_peer_cancels_its_pending_releases(h: Harness) -> None:
    h.relay.state.registry["cid"] = (1, 400)
    h.frame("b", "claim", "cid", 500, False)
    h.recv()
    h.relay.peer_gone(h.links.kill("b", State.LEFT), State.LEFT)
    assert h.relay.cluster.releasing == {}
    h.control("released", 0, "cid", 500)
    assert h.links.take() == []


def test_a_barrier_does_not_wait_for_a_peer_that_goes(h: Harness) -> None:
    h.relay.local_route(1, "+", "x")  # seq 1 to b and c, not acknowledged
    h.control("sync", 4, "tok")
    h.relay._relay_saw(b"tok")  # the worker's Y envelope reached the relay's SUB
    assert h.relay.state.syncs["tok"].marks == {"b": 1, "c": 1}
    assert h.quiet()
    out_b = h.links.peers["b"].out
    assert out_b is not None
    out_b.ack(1, 1)
    h.relay._complete_syncs()
    assert h.quiet()
    h.relay.peer_gone(h.links.kill("c", State.LEFT), State.LEFT)
    synced = h.recv()
    assert (synced.kind, synced.req_id, synced.body) == ("synced", 4, ("tok",))


def test_a_cluster_barrier_takes_its_marks_when_the_relay_sees_the_workers_marker(h: Harness) -> None:
    # `sync` came on the DEALER before the worker's earlier retained update reached the relay's
    # SUB: the barrier must not complete on the marks of that moment
    h.control("sync", 5, "early")
    assert h.relay.state.syncs["early"].marks == {}
    h.relay._complete_syncs()
    assert h.quiet()
    h.relay.local_route(1, "+", "y")  # stands for what was forwarded before the marker: seq 1
    h.relay._relay_saw(b"early")
    assert h.relay.state.syncs["early"].marks == {"b": 1, "c": 1}
    assert h.quiet()
    for name in ("b", "c"):
        out = h.links.peers[name].out
        assert out is not None
        out.ack(1, 1)
    h.relay._complete_syncs()
    assert h.recv().kind == "synced"
    # the marker may also come first: its marks wait for the `sync`
    h.relay.local_route(1, "+", "z")  # seq 2
    h.relay._relay_saw(b"late")
    h.control("sync", 6, "late")
    assert h.relay.state.syncs["late"].marks == {"b": 2, "c": 2}


def test_marks_reached_follows_acks(h: Harness) -> None:
    h.relay.local_route(1, "+", "x")
    marks = h.relay.sync_marks()
    assert marks == {"b": 1, "c": 1}
    assert not h.relay.marks_reached(marks)
    for name in ("b", "c"):
        out = h.links.peers[name].out
        assert out is not None
        out.ack(1, 1)
    assert h.relay.marks_reached(marks)


# -- our snapshot for a joining peer ---------------------------------------------------------------


def test_the_snapshot_holds_routes_clients_shared_members_and_retained(h: Harness) -> None:
    state = h.relay.state
    h.relay.local_route(1, "+", "x/#")
    state.registry["cid"] = (1, 42)
    state.apply(CH_SHARED, shared_update("w1", "s-local"), time.monotonic())
    state.apply(CH_SHARED, shared_update("b/w1", "s-remote"), time.monotonic())
    state.retained["r/1"] = (item(b"kept"), time.monotonic())
    d = h.links.add("d", State.JOINING)
    h.links.take()
    h.relay.peer_joined(d)
    sent = h.links.take()
    assert [s[0] for s in sent] == ["d"] * 4
    assert sent[0][1:3] == ("route", ("+", "x/#"))
    assert sent[1][1:3] == ("reg", ("cid", 42, 1))
    assert sent[2][1] == "d" and sent[2][3][0] == CH_SHARED
    member = env.unpack_data(sent[2][3][1])
    assert isinstance(member, env.SharedUpdate)
    assert (member.origin, member.client_id) == ("a/w1", "s-local")  # only our own members
    assert sent[3][1] == "d" and sent[3][3][0] == CH_RETAINED_QUIET
    retained = env.unpack_data(sent[3][3][1])
    assert isinstance(retained, env.PublishBatch)
    assert (retained.origin, retained.topic, retained.items[0][2]) == ("a/snap", "r/1", b"kept")


# -- two relays over real links --------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture
def pair() -> Iterator[tuple[Harness, Harness]]:
    port_a, port_b = free_ports(2)
    harnesses: list[Harness] = []
    try:
        for name, port, peer_port in (("a", port_a, port_b), ("b", port_b, None)):
            harness = Harness(node=name, links=False)
            harnesses.append(harness)
            settings = LinkSettings(name, "relay-test", "127.0.0.1", port, "127.0.0.1", 0.05, 0.3, 0.6)
            source = _Static([] if peer_port is None else [_Candidate("127.0.0.1", peer_port, "b")])
            harness.relay.links = ClusterLinks(harness.relay.ctx, settings, harness.relay, source)
        a, b = harnesses
        assert drive([a, b], lambda: alive_to_each_other(a, b))
        yield a, b
    finally:
        for harness in harnesses:
            harness.close()


class _Candidate:
    def __init__(self, host: str, port: int, node: str) -> None:
        self.host, self.port, self.node = host, port, node


class _Static:
    def __init__(self, candidates: list[_Candidate]) -> None:
        self.candidates = candidates

    def poll(self, now: float) -> list[_Candidate]:
        return self.candidates

    def close(self) -> None:
        pass


def alive_to_each_other(a: Harness, b: Harness) -> bool:
    la, lb = a.relay.links, b.relay.links
    assert la is not None and lb is not None
    pa, pb = la.peers.get("b"), lb.peers.get("a")
    return pa is not None and pb is not None and pa.state is State.ALIVE and pb.state is State.ALIVE


def drive(harnesses: list[Harness], until: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """The relays' serve loop, minus the workers' data sockets; bounded in time and count."""

    def step(now: float) -> None:
        for harness in harnesses:
            relay = harness.relay
            links = relay.links
            assert links is not None
            relay._drain_router(now)
            links.flush_outboxes()
            links.drain(now)
            links.tick(now)
            relay.cluster_timers(now)
            relay._complete_syncs(now)

    return step_until(step, until, timeout_s)


def test_routes_reach_the_other_relay(pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    a.control("route", 0, "+", "t/#")
    assert drive([a, b], lambda: b.relay.cluster.routes.match("t/1") == {"a"})
    assert b.relay.cluster.prefix_counts == {"t": 1}
    a.control("route", 0, "-", "t/#")
    assert drive([a, b], lambda: b.relay.cluster.routes.all_filters() == [])
    assert b.relay.cluster.prefix_counts == {}


def test_a_takeover_across_two_relays(pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    b.control("claim", 1, "cid", False)
    answers: list[env.Control] = []

    def answered(harness: Harness) -> Callable[[], bool]:
        def check() -> bool:
            if harness.worker.poll(0):
                answers.append(env.unpack_control(harness.worker.recv()))
            return bool(answers)

        return check

    assert drive([a, b], answered(b))
    first = answers.pop()
    assert first.kind == "claimed" and first.body[3] is False
    b_epoch = first.body[1]
    assert drive([a, b], lambda: a.relay.cluster.remote_clients.get("cid") == ("b", b_epoch))

    a.control("claim", 2, "cid", True)  # the client reconnects to node a
    assert drive([a, b], answered(b))
    release = answers.pop()
    assert release.kind == "release"
    a_epoch = release.body[1]
    assert isinstance(a_epoch, int) and isinstance(b_epoch, int) and a_epoch > b_epoch
    assert release.body[2:] == (0, True)
    assert a.quiet(50)  # a waits for b's worker
    b.control("released", 0, "cid", a_epoch)
    assert drive([a, b], answered(a))
    claimed = answers.pop()
    assert (claimed.kind, claimed.req_id, claimed.body) == ("claimed", 2, ("cid", a_epoch, None, False))
    assert drive([a, b], lambda: b.relay.cluster.remote_clients.get("cid") == ("a", a_epoch))
    assert "cid" not in b.relay.state.registry


@pytest.mark.parametrize("why", [State.DEAD, State.LEFT])
def test_a_peer_that_goes_makes_the_workers_rescan_their_stored_rows(h: Harness, why: State) -> None:
    # What the peer acknowledged to its publishers may now be only in the store (PROTOCOL.md).
    h.relay.peer_gone(h.links.peers["b"], why)
    h.quiet(200)
    assert h.rescans == 1


def test_tombstones_of_cleared_retained_topics_are_bounded_oldest_first(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mesh.relay_cluster as relay_cluster

    monkeypatch.setattr(relay_cluster, "TOMBSTONES_MAX", 10)
    h.relay.state.retained["kept"] = ((1, True, b"x", "", None, None, 0), 0.0)  # a retained message
    h.relay.stamp_retained("kept")  # a set: never trimmed
    for i in range(20):
        h.relay.stamp_retained(f"gone/{i}")  # clears (not in the retained set): tombstones
        tombstones = [t for t in h.relay.state.retained_meta if t != "kept"]
        assert len(tombstones) <= 10
    assert "kept" in h.relay.state.retained_meta
    assert "gone/19" in h.relay.state.retained_meta and "gone/0" not in h.relay.state.retained_meta
