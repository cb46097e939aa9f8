"""The links between relays (`mesh/cluster.py`) over real tcp sockets on 127.0.0.1.

Two or three `ClusterLinks` live in one process (plaintext: no CURVE callbacks), each with a
static candidate source and a recording `LinkHandler`, driven by a bounded loop of
`tick`/`drain`/`flush_outboxes` with the real monotonic clock and small timeouts (heartbeat 50 ms,
SUSPECT after 300 ms, DEAD after 600 ms).

What is pinned (`mesh/PROTOCOL.md`, "The cluster plane"): nodes that can reach each other become
ALIVE to each other after a snapshot that ends with `snapend`, and gossip completes the mesh;
sequenced frames arrive exactly once, in order, with their extra frames, and acks trim the
sender's buffer; a lost frame (or a lost tail) is asked for with `resend` and resent, and a gap
the sender cannot fill restarts the stream with a fresh snapshot; a new incarnation of a node is
`peer_gone` (LEFT) then a fresh stream both ways; silence makes a peer SUSPECT then DEAD with one
`peer_gone(DEAD)`, and a DEAD peer that speaks again gets fresh streams; `leave` makes it LEFT at
once; frames of another cluster name, of an unknown version, of ourselves and broken frames are
dropped; `cluster view: alive=[...]` is logged once per change; a `peer_reset` always comes
before the first frame of a stream.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import msgpack
import pytest
import zmq

from mesh import cluster
from mesh.cluster import ClusterLinks, LinkSettings
from mesh.peers import Frames, Peer, State
from tests.unit.mesh.stepping import step_until

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
HEARTBEAT_S = 0.05
SUSPECT_S = 0.3
DEAD_S = 0.6


@dataclass(frozen=True, slots=True)
class Candidate:
    host: str
    port: int
    node: str = ""


class StaticSource:
    def __init__(self, candidates: Sequence[Candidate]) -> None:
        self.candidates = list(candidates)
        self.closed = False

    def poll(self, now: float) -> Sequence[object]:
        return self.candidates

    def close(self) -> None:
        self.closed = True


Event = tuple[object, ...]


class Recorder:
    """A `LinkHandler` that records every callback; on `peer_joined` it sends `snapshot`."""

    def __init__(self) -> None:
        self.links: ClusterLinks | None = None
        self.events: list[Event] = []
        self.snapshot: list[tuple[str, tuple[object, ...]]] = []
        self.views: list[list[str]] = []

    def peer_reset(self, peer: Peer) -> None:
        self.events.append(("reset", peer.name, peer.incarnation))

    def peer_frame(self, peer: Peer, kind: str, body: list[object], frames: Frames) -> None:
        self.events.append(("frame", peer.name, kind, list(body), tuple(frames)))

    def peer_joined(self, peer: Peer) -> None:
        self.events.append(("joined", peer.name, peer.incarnation))
        assert self.links is not None
        for kind, body in self.snapshot:
            self.links.send(peer, kind, body)

    def peer_gone(self, peer: Peer, why: State) -> None:
        self.events.append(("gone", peer.name, why))

    def view_changed(self, alive: list[str]) -> None:
        self.views.append(list(alive))

    # -- reading what was recorded --

    def count(self, what: str, name: str) -> int:
        return sum(1 for e in self.events if e[0] == what and e[1] == name)

    def frames(self, name: str, kind: str | None = None) -> list[tuple[str, list[object], Frames]]:
        """Every frame of the peer, in arrival order (across resets)."""
        return [
            (str(e[2]), e[3], e[4])  # type: ignore[misc]
            for e in self.events
            if e[0] == "frame" and e[1] == name and (kind is None or e[2] == kind)
        ]

    def since_reset(self, name: str) -> list[str]:
        """The kinds of the peer's frames since its last `peer_reset`."""
        kinds: list[str] = []
        for e in self.events:
            if e[1] != name:
                continue
            if e[0] == "reset":
                kinds = []
            elif e[0] == "frame":
                kinds.append(str(e[2]))
        return kinds

    def check_reset_first(self) -> None:
        """Invariant: a stream's first frame is announced by `peer_reset`."""
        seen: set[str] = set()
        for e in self.events:
            name = str(e[1])
            if e[0] == "reset":
                seen.add(name)
            elif e[0] == "frame":
                assert name in seen, f"frame from {name} before any peer_reset: {self.events}"
            elif e[0] == "gone":
                seen.discard(name)


class Node:
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        name: str,
        port: int,
        candidates: Sequence[Candidate] = (),
        cluster_name: str = "test",
    ) -> None:
        self.name = name
        self.port = port
        self.handler = Recorder()
        self.source = StaticSource(candidates)
        settings = LinkSettings(name, cluster_name, HOST, port, HOST, HEARTBEAT_S, SUSPECT_S, DEAD_S)
        deadline = time.monotonic() + 3.0
        while True:  # a port just closed by an earlier node of the same name may linger briefly
            try:
                self.links = ClusterLinks(ctx, settings, self.handler, self.source)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.handler.links = self.links
        self.running = True
        self.closed = False

    def step(self, now: float) -> None:
        self.links.tick(now)
        self.links.drain(now)
        self.links.flush_outboxes()

    def peer(self, name: str) -> Peer:
        return self.links.peers[name]

    def state_of(self, name: str) -> State | None:
        peer = self.links.peers.get(name)
        return None if peer is None else peer.state

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.running = False
            self.links.close()


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def pump(nodes: Sequence[Node], until: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Drive the running nodes until `until()` holds or the time is up; bounded in time and count."""

    def step(now: float) -> None:
        for node in nodes:
            if node.running:
                node.step(now)

    return step_until(step, until, timeout_s)


def run_for(nodes: Sequence[Node], seconds: float) -> None:
    pump(nodes, lambda: False, seconds)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


class Lab:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.ctx = ctx
        self.nodes: list[Node] = []

    def node(
        self, name: str, port: int, candidates: Sequence[Candidate] = (), cluster_name: str = "test"
    ) -> Node:
        node = Node(self.ctx, name, port, candidates, cluster_name)
        self.nodes.append(node)
        return node

    def pair(self) -> tuple[Node, Node]:
        """a (which knows b's address) and b (which learns a's from its heartbeats), both ALIVE."""
        port_a, port_b = free_ports(2)
        b = self.node("b", port_b)
        a = self.node("a", port_a, [Candidate(HOST, port_b, "b")])
        assert pump([a, b], lambda: both_alive(a, b)), (a.handler.events, b.handler.events)
        return a, b

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@pytest.fixture
def lab(ctx: zmq.Context[zmq.Socket[bytes]]) -> Iterator[Lab]:
    result = Lab(ctx)
    yield result
    result.close()
    for node in result.nodes:
        node.handler.check_reset_first()


def both_alive(a: Node, b: Node) -> bool:
    return a.state_of(b.name) is State.ALIVE and b.state_of(a.name) is State.ALIVE


def data(index: int) -> Frames:
    return (b"t/1", f"payload-{index}".encode())


def lose(node: Node, peer: Peer, kind: str, frames: Frames = ()) -> int:
    """Take a seq and keep the frame for resends, but never send it: a frame lost on the wire."""
    out = peer.out
    assert out is not None
    seq = out.next_seq()
    header = msgpack.packb(
        [cluster.VERSION, kind, node.name, node.links.incarnation, out.stream, seq], use_bin_type=True
    )
    out.keep(seq, header, frames)
    return seq


# -- joining ---------------------------------------------------------------------------------------


def test_two_nodes_become_alive_after_each_others_snapshot(lab: Lab) -> None:
    port_a, port_b = free_ports(2)
    b = lab.node("b", port_b)
    b.handler.snapshot = [("route", ("+", "b/#")), ("reg", ("client-b", 5, 1))]
    a = lab.node("a", port_a, [Candidate(HOST, port_b, "b")])
    a.handler.snapshot = [("route", ("+", "a/+"))]
    assert pump([a, b], lambda: both_alive(a, b))
    assert a.handler.count("joined", "b") == 1
    assert b.handler.count("joined", "a") == 1
    assert b.handler.since_reset("a") == ["route", "snapend"]
    assert a.handler.since_reset("b") == ["route", "reg", "snapend"]
    assert a.handler.frames("b", "route") == [("route", ["+", "b/#"], ())]
    assert a.handler.frames("b", "reg") == [("reg", ["client-b", 5, 1], ())]
    assert a.links.alive() == ["a", "b"] and b.links.alive() == ["a", "b"]
    assert a.peer("b").incarnation == b.links.incarnation
    assert (a.peer("b").host, a.peer("b").port) == (HOST, port_b)
    assert (b.peer("a").host, b.peer("a").port) == (HOST, port_a)
    assert a.handler.views[-1] == ["a", "b"]
    assert not any(e[0] == "gone" for e in a.handler.events + b.handler.events)


def test_a_peer_is_joining_until_its_snapend_arrives(lab: Lab) -> None:
    port_a, port_b = free_ports(2)
    b = lab.node("b", port_b)
    a = lab.node("a", port_a, [Candidate(HOST, port_b, "b")])
    a.step(time.monotonic())  # a dials b and sends its first heartbeat; a does not know b yet
    assert pump([b], lambda: "a" in b.links.peers)  # only b runs: a cannot have sent a snapshot
    assert b.state_of("a") is State.JOINING
    assert b.links.alive() == ["b"]  # JOINING is not part of the view
    assert [p.name for p in b.links.routable()] == ["a"]  # but it is routable: its stream is open
    assert b.handler.count("joined", "a") == 1 and b.handler.count("reset", "a") == 0
    assert pump([a, b], lambda: both_alive(a, b))


def test_three_nodes_complete_the_mesh_by_gossip(lab: Lab) -> None:
    port_a, port_b, port_c = free_ports(3)
    b = lab.node("b", port_b)
    a = lab.node("a", port_a, [Candidate(HOST, port_b, "b")])
    c = lab.node("c", port_c, [Candidate(HOST, port_a, "a")])  # c knows only a; b only hears
    nodes = [a, b, c]
    assert pump(nodes, lambda: all(both_alive(x, y) for x in nodes for y in nodes if x is not y))
    for node in nodes:
        assert node.links.alive() == ["a", "b", "c"]
        for other in nodes:
            if other is not node:
                assert node.handler.count("joined", other.name) == 1


# -- sequenced frames ------------------------------------------------------------------------------


def test_frames_arrive_once_in_order_with_their_extra_frames(lab: Lab) -> None:
    a, b = lab.pair()
    peer = a.peer("b")
    expected: list[tuple[str, list[object], Frames]] = []
    for index in range(300):
        if index % 7 == 0:
            a.links.send(peer, "route", ("+", f"f/{index}"))
            expected.append(("route", ["+", f"f/{index}"], ()))
        else:
            a.links.send(peer, "d", (), data(index))
            expected.append(("d", [], data(index)))

    def arrived() -> list[tuple[str, list[object], Frames]]:
        return [f for f in b.handler.frames("a") if f[0] != "snapend"]

    assert pump([a, b], lambda: len(arrived()) >= len(expected))
    run_for([a, b], 0.2)  # nothing more may come (no duplicates from resends)
    assert arrived() == expected
    assert b.handler.count("reset", "a") == 1


def test_acks_trim_the_senders_buffer(lab: Lab) -> None:
    a, b = lab.pair()
    peer = a.peer("b")
    for index in range(50):
        a.links.send(peer, "d", (), data(index))
    out = peer.out
    assert out is not None
    assert out.unacked >= 50
    assert pump([a, b], lambda: not out.buffer)
    assert out.acked == out.seq
    assert out.unacked == 0


def test_send_to_a_peer_without_a_stream_does_nothing(lab: Lab) -> None:
    a, b = lab.pair()
    stranger = Peer("x", 1, HOST, b.port)  # never joined: no out stream
    a.links.send(stranger, "d", (), data(0))
    run_for([a, b], 0.1)
    assert b.handler.frames("x") == []


def test_broadcast_reaches_every_peer_once(lab: Lab) -> None:
    port_a, port_b, port_c = free_ports(3)
    b = lab.node("b", port_b)
    c = lab.node("c", port_c)
    a = lab.node("a", port_a, [Candidate(HOST, port_b, "b"), Candidate(HOST, port_c, "c")])
    nodes = [a, b, c]
    assert pump(nodes, lambda: both_alive(a, b) and both_alive(a, c))
    a.links.broadcast("route", ("+", "q/#"))
    assert pump(nodes, lambda: bool(b.handler.frames("a", "route")) and bool(c.handler.frames("a", "route")))
    run_for(nodes, 0.15)
    assert b.handler.frames("a", "route") == [("route", ["+", "q/#"], ())]
    assert c.handler.frames("a", "route") == [("route", ["+", "q/#"], ())]


def test_backlogged_while_too_much_is_unacknowledged(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = lab.pair()
    monkeypatch.setattr(cluster, "BUFFER_LIMIT", 5)
    peer = a.peer("b")
    for index in range(10):
        a.links.send(peer, "d", (), data(index))
    assert a.links.backlogged()
    assert pump([a, b], lambda: not a.links.backlogged())


# -- repairs ----------------------------------------------------------------------------------------


def test_a_lost_frame_is_asked_for_and_resent(lab: Lab) -> None:
    a, b = lab.pair()
    peer = a.peer("b")
    a.links.send(peer, "d", (), data(0))
    lose(a, peer, "d", data(1))
    a.links.send(peer, "d", (), data(2))
    a.links.send(peer, "d", (), data(3))
    assert pump([a, b], lambda: len(b.handler.frames("a", "d")) >= 4)
    run_for([a, b], 0.3)
    assert b.handler.frames("a", "d") == [("d", [], data(i)) for i in range(4)]
    assert a.links.counters["resends"] >= 3
    assert b.handler.count("reset", "a") == 1  # repaired in place: no new stream
    assert a.links.counters["restarts"] == 1


def test_a_lost_tail_is_repaired_by_the_heartbeat_head(lab: Lab) -> None:
    a, b = lab.pair()
    peer = a.peer("b")
    a.links.send(peer, "d", (), data(0))
    lose(a, peer, "d", data(1))  # nothing comes after it: only the hb's head tells b
    assert pump([a, b], lambda: len(b.handler.frames("a", "d")) >= 2)
    run_for([a, b], 0.2)
    assert b.handler.frames("a", "d") == [("d", [], data(0)), ("d", [], data(1))]
    assert b.handler.count("reset", "a") == 1


def test_a_gap_the_sender_cannot_fill_restarts_the_stream_with_a_snapshot(lab: Lab) -> None:
    a, b = lab.pair()
    a.handler.snapshot = [("route", ("+", "snap/#"))]
    peer = a.peer("b")
    assert peer.out is not None
    assert pump([a, b], lambda: peer.out is not None and not peer.out.buffer)  # all acked
    first_stream = peer.out.stream
    peer.out.next_seq()  # taken, never kept: nobody can resend it
    a.links.send(peer, "d", (), data(1))
    assert pump(
        [a, b], lambda: b.handler.count("reset", "a") == 2 and b.handler.since_reset("a")[-1:] == ["snapend"]
    )
    assert a.handler.count("joined", "b") == 2
    assert a.links.counters["restarts"] == 2
    current = a.peer("b").out
    assert current is not None and current.stream != first_stream
    assert b.handler.since_reset("a") == ["route", "snapend"]  # the snapshot replaces the lost part
    assert b.state_of("a") is State.ALIVE
    a.links.send(a.peer("b"), "d", (), data(2))
    assert pump([a, b], lambda: b.handler.since_reset("a")[-1:] == ["d"])


def test_a_resend_for_an_older_stream_does_not_restart_the_current_one(lab: Lab) -> None:
    a, b = lab.pair()
    out = a.peer("b").out
    assert out is not None
    # what b sends after reading a heartbeat of a that was queued before a's last restart
    b.links._unsequenced(HOST, a.port, "resend", [out.stream - 1, 1])
    run_for([a, b], 0.3)
    assert a.links.counters["restarts"] == 1
    assert b.handler.count("reset", "a") == 1


# -- incarnations, silence, leaving ------------------------------------------------------------------


def test_a_new_incarnation_is_gone_then_joins_with_fresh_streams(lab: Lab) -> None:
    a, b = lab.pair()
    old_incarnation = a.links.incarnation
    a.close()
    time.sleep(0.002)  # the incarnation is the clock in microseconds
    a2 = lab.node("a", a.port, [Candidate(HOST, b.port, "b")])
    assert a2.links.incarnation > old_incarnation
    assert pump(
        [a2, b],
        lambda: (
            both_alive(a2, b)
            and b.peer("a").incarnation == a2.links.incarnation
            and b.handler.since_reset("a")[-1:] == ["snapend"]
        ),
    ), b.handler.events
    gone = [e for e in b.handler.events if e[0] == "gone"]
    assert gone == [("gone", "a", State.LEFT)]  # the old incarnation, once, no will recovery
    assert b.handler.count("joined", "a") >= 2
    resets = [e for e in b.handler.events if e[0] == "reset" and e[1] == "a"]
    assert resets[0][2] == old_incarnation and resets[-1][2] == a2.links.incarnation
    assert a2.handler.count("joined", "b") >= 1
    assert a2.handler.since_reset("b")[-1:] == ["snapend"]  # b sent the new a a fresh snapshot


def test_silence_makes_a_peer_suspect_then_dead(lab: Lab) -> None:
    a, b = lab.pair()
    b.running = False  # b stops talking (its sockets stay open: only our heartbeats notice)
    seen: list[State] = []

    def watch() -> bool:
        state = a.state_of("b")
        assert state is not None
        if not seen or seen[-1] is not state:
            seen.append(state)
        return state is State.DEAD

    started = time.monotonic()
    assert pump([a], watch)
    elapsed = time.monotonic() - started
    assert seen == [State.ALIVE, State.SUSPECT, State.DEAD]
    assert DEAD_S - 0.1 <= elapsed < DEAD_S + 1.0
    run_for([a], 0.1)
    assert [e for e in a.handler.events if e[0] == "gone"] == [("gone", "b", State.DEAD)]
    assert a.links.alive() == ["a"]
    assert a.handler.views[-1] == ["a"]
    assert a.links.routable() == []
    peer = a.peer("b")
    assert peer.out is None and peer.inn.stream == 0  # its streams are dropped


def test_a_suspect_peer_that_speaks_again_is_alive(lab: Lab) -> None:
    a, b = lab.pair()
    b.running = False
    assert pump([a], lambda: a.state_of("b") is State.SUSPECT)
    b.running = True
    assert pump([a, b], lambda: a.state_of("b") is State.ALIVE)
    assert a.handler.count("gone", "b") == 0
    assert a.handler.count("joined", "b") == 1  # the same stream goes on


def test_a_dead_peer_that_speaks_again_gets_fresh_streams_both_ways(lab: Lab) -> None:
    a, b = lab.pair()
    b.running = False
    assert pump([a], lambda: a.state_of("b") is State.DEAD)
    b.running = True
    #
    assert pump(
        [a, b],
        lambda: (
            both_alive(a, b)
            and a.handler.count("reset", "b") >= 2
            and b.handler.count("reset", "a") >= 2
            and a.handler.since_reset("b")[-1:] == ["snapend"]
            and b.handler.since_reset("a")[-1:] == ["snapend"]
        ),
    ), (a.handler.events, b.handler.events)
    assert a.handler.count("joined", "b") >= 2
    assert a.handler.count("gone", "b") == 1
    assert b.handler.count("gone", "a") <= 1
    a.links.send(a.peer("b"), "d", (), data(7))
    assert pump([a, b], lambda: b.handler.since_reset("a")[-1:] == ["d"])


def test_leave_makes_the_node_left_at_once(lab: Lab) -> None:
    a, b = lab.pair()
    a.links.leave()
    a.links.flush_outboxes()
    a.running = False
    started = time.monotonic()
    assert pump([b], lambda: b.state_of("a") is State.LEFT)
    assert time.monotonic() - started < SUSPECT_S  # not by silence
    run_for([b], DEAD_S + 0.2)
    assert [e for e in b.handler.events if e[0] == "gone"] == [("gone", "a", State.LEFT)]  # never DEAD
    assert b.links.alive() == ["b"]
    assert a.links.state == "LEAVING"


def test_a_leaving_node_stays_left_while_it_still_heartbeats(lab: Lab) -> None:
    a, b = lab.pair()
    a.links.leave()
    assert pump([a, b], lambda: b.state_of("a") is State.LEFT)
    run_for([a, b], 0.3)  # a drains: it still ticks, its heartbeats say LEAVING
    assert b.state_of("a") is State.LEFT
    assert b.handler.count("joined", "a") == 1


def test_candidates_naming_ourselves_are_not_dialled(lab: Lab) -> None:
    port_a, port_b = free_ports(2)
    b = lab.node("b", port_b)
    a = lab.node(
        "a",
        port_a,
        [Candidate(HOST, port_a, "a"), Candidate("127.0.0.2", port_a, "a"), Candidate(HOST, port_b, "b")],
    )
    assert pump([a, b], lambda: both_alive(a, b))
    assert set(a.links.dealers) == {(HOST, port_b)}
    assert a.links.keys_by_address[(HOST, port_b)] == "b"


# -- what is dropped ---------------------------------------------------------------------------------


def test_a_node_of_another_cluster_is_never_joined(lab: Lab) -> None:
    port_a, port_x = free_ports(2)
    a = lab.node("a", port_a, [Candidate(HOST, port_x, "x")])
    x = lab.node("x", port_x, [Candidate(HOST, port_a, "a")], cluster_name="other")
    run_for([a, x], 0.5)
    assert a.links.peers == {} and x.links.peers == {}
    assert a.handler.events == [] and x.handler.events == []
    assert a.links.alive() == ["a"]


def test_a_frame_of_another_cluster_is_logged_once(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mesh.cluster")
    port_a, port_x = free_ports(2)
    a = lab.node("a", port_a)
    x = lab.node("x", port_x, [Candidate(HOST, port_a, "a")], cluster_name="other")
    run_for([a, x], 0.5)  # about ten heartbeats of x reach a
    about_other = [r for r in caplog.records if "other" in r.getMessage()]
    assert len(about_other) == 1


def raw_dealer(ctx: zmq.Context[zmq.Socket[bytes]], port: int) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{HOST}:{port}")
    return sock


def test_broken_foreign_and_own_frames_are_dropped(
    lab: Lab, ctx: zmq.Context[zmq.Socket[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mesh.cluster")
    a, b = lab.pair()
    sock = raw_dealer(ctx, a.port)
    try:
        inc = b.links.incarnation
        stream = b.peer("a").out.stream  # type: ignore[union-attr]
        frames = [
            [b"\xc1not msgpack"],
            [msgpack.packb([1, "d"])],  # too short a header
            [msgpack.packb([2, "route", "b", inc, stream, 99, "+", "v2/#"])],  # unknown version
            [msgpack.packb([1, "route", "a", a.links.incarnation, 1, 1, "+", "self"])],  # ourselves
            [msgpack.packb([1, "route", "zz", 1, 1, 1, "+", "unknown"])],  # nobody we know
            [msgpack.packb([1, "route", "b", inc - 1, stream, 99, "+", "old"])],  # an old life of b
        ]
        for parts in frames:
            sock.send_multipart(parts)
        sock.send(b"")  # one empty frame is shorter than identity + header
        run_for([a, b], 0.3)
    finally:
        sock.close(0)
    assert a.links.counters["frames_received"] >= len(frames)
    assert a.handler.frames("b", "route") == []
    assert a.handler.frames("zz") == [] and "zz" not in a.links.peers
    assert both_alive(a, b)
    assert any("bad cluster frame" in r.getMessage() for r in caplog.records)


def test_a_handler_error_is_logged_and_the_links_go_on(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    a, b = lab.pair()
    original = b.handler.peer_frame

    def failing(peer: Peer, kind: str, body: list[object], frames: Frames) -> None:
        if kind == "route":
            raise RuntimeError("boom")
        original(peer, kind, body, frames)

    b.handler.peer_frame = failing  # type: ignore[method-assign]
    caplog.set_level(logging.ERROR, logger="mesh.cluster")
    a.links.send(a.peer("b"), "route", ("+", "x"))
    a.links.send(a.peer("b"), "d", (), data(1))
    assert pump([a, b], lambda: bool(b.handler.frames("a", "d")))
    assert any("failed" in r.getMessage() for r in caplog.records)


# -- the view ---------------------------------------------------------------------------------------


def test_cluster_view_is_logged_once_per_change(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mesh.cluster")
    a, b = lab.pair()
    run_for([a, b], 0.2)

    def views(text: str) -> int:
        return sum(1 for r in caplog.records if r.getMessage() == f"cluster view: alive=[{text}]")

    assert views("a") == 1 and views("b") == 1  # each node's first view: itself
    assert views("a, b") == 2  # then once on each node, not at every tick
    b.running = False
    assert pump([a], lambda: a.state_of("b") is State.DEAD)
    run_for([a], 0.1)
    assert views("a") == 2
    assert a.handler.views == [["a"], ["a", "b"], ["a"]]


def test_close_closes_the_discovery(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    (port,) = free_ports(1)
    node = Node(ctx, "a", port)
    node.close()
    assert node.source.closed
