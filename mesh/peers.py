"""Peers of the cluster: membership states and the sequenced streams between relays.

Why: between two nodes, ZeroMQ loses whatever was in a TCP connection that broke (TESTBED.md:
"PUB and DEALER both lose what was sent into the dead link"), so everything that must arrive —
QoS 1/2 publishes, routes, registry updates, claims — travels on a stream with sequence numbers,
acknowledgements and a resend buffer, and a stream that cannot be repaired starts over with a
snapshot (the Clone pattern of `mesh/PROTOCOL.md`). Liveness is decided here from what arrives,
never from discovery.

Must not: touch sockets or read the clock (callers pass `now`); know what the frames mean.

Invariants:
- A receiver applies frames of one stream exactly once and in order (`InStream.accept`).
- A sender keeps a frame until the peer acknowledged it; `resend_from` either returns every
  frame from the asked seq on, or None (the stream must restart with a snapshot).
- States move JOINING -> ALIVE <-> SUSPECT -> DEAD, and any -> LEFT on `bye`; DEAD and LEFT are
  final for an incarnation's stream (a return starts fresh streams).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

Frames = tuple[bytes, ...]  # the frames after the header: () or (channel, envelope)


class State(enum.Enum):
    JOINING = "JOINING"
    ALIVE = "ALIVE"
    SUSPECT = "SUSPECT"
    DEAD = "DEAD"
    LEFT = "LEFT"


@dataclass(slots=True)
class OutStream:
    """What this node sends one peer: numbered frames kept until acknowledged."""

    stream: int
    seq: int = 0
    acked: int = 0
    buffer: deque[tuple[int, bytes, Frames]] = field(default_factory=deque)  # (seq, header body, frames)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def keep(self, seq: int, header: bytes, frames: Frames) -> None:
        self.buffer.append((seq, header, frames))

    def ack(self, stream: int, seq: int) -> None:
        if stream != self.stream or seq <= self.acked:
            return
        self.acked = min(seq, self.seq)
        buffer = self.buffer
        while buffer and buffer[0][0] <= self.acked:
            buffer.popleft()

    def resend_from(self, stream: int, first: int) -> list[tuple[int, bytes, Frames]] | None:
        if stream != self.stream:
            return None
        if first > self.seq:
            return []
        if not self.buffer or self.buffer[0][0] > first:
            return None  # trimmed: only a new stream (a snapshot) can repair it
        return [entry for entry in self.buffer if entry[0] >= first]

    @property
    def unacked(self) -> int:
        return self.seq - self.acked


@dataclass(slots=True)
class InStream:
    """What this node receives from one peer: the next seq it can apply."""

    incarnation: int = 0
    stream: int = 0
    expected: int = 1
    resend_asked_at: float = -1.0

    def accept(self, incarnation: int, stream: int, seq: int) -> str:
        """'new' (a new stream: forget the peer's state, then apply), 'apply', 'dup', or 'gap'."""
        if (incarnation, stream) != (self.incarnation, self.stream):
            if seq != 1:
                return "gap"
            self.incarnation, self.stream, self.expected = incarnation, stream, 2
            return "new"
        if seq == self.expected:
            self.expected += 1
            return "apply"
        if seq < self.expected:
            return "dup"
        return "gap"

    @property
    def applied(self) -> int:
        return self.expected - 1


@dataclass(slots=True)
class Peer:
    """Another node as this relay sees it."""

    name: str
    incarnation: int
    host: str
    port: int
    state: State = State.JOINING
    last_heard: float = 0.0
    rtt_ms: float = 0.0
    out: OutStream | None = None
    inn: InStream = field(default_factory=InStream)
    last_sent_ms: int = 0  # the peer's last hb sent_ms, echoed back for its round trip
    last_sent_seen_ms: int = 0  # when that hb arrived (our clock): the echo says how long we held it
    dropped: int = 0  # frames sent and never acknowledged (lost with a restarted stream or a death)

    @property
    def routable(self) -> bool:
        return self.state in (State.JOINING, State.ALIVE, State.SUSPECT)

    def heard(self, now: float) -> bool:
        """Something arrived; True when this changed a SUSPECT peer back to ALIVE."""
        self.last_heard = now
        if self.state is State.SUSPECT:
            self.state = State.ALIVE
            return True
        return False

    def age(self, now: float, suspect_after_s: float, dead_after_s: float) -> State | None:
        """The state silence has brought the peer to, if it changed."""
        if self.state in (State.DEAD, State.LEFT):
            return None
        silent = now - self.last_heard
        if silent >= dead_after_s:
            self.state = State.DEAD
            return State.DEAD
        if silent >= suspect_after_s and self.state is State.ALIVE:
            self.state = State.SUSPECT
            return State.SUSPECT
        return None


def survivor(dead: str, alive: list[str]) -> str | None:
    """The node that recovers a dead node's wills: the smallest name among the alive ones."""
    candidates = sorted(name for name in alive if name != dead)
    return candidates[0] if candidates else None
