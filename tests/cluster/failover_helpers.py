"""Helpers of the cluster failover tests: racing CONNECTs, a windowed raw publisher, numbered receivers.

Why: `test_cluster_failover.py` asks questions the harness (`tests/cluster/nodes.py`) and the
e2e clients do not answer alone: "after two CONNECTs for one client id raced on two nodes, how
many live connections are left?" needs the CONNACK (or the refusal, or the close) of both and a
PINGREQ on what stays open; "was every PUBACKed message delivered?" needs a publisher that
knows exactly which numbers it got a PUBACK for, even when its node is SIGKILLed under it (paho
hides that: its `publish_many` raises on the disconnect and forgets what was acknowledged).

`freeze_child` SIGSTOPs one process of a node (its relay, say) so that a test can make "the node
acknowledged it but could not pass it on yet" happen every time instead of now and then.

Must not: signal a process outside the node's own process group (checked before `SIGSTOP`);
sleep-and-hope (every wait is bounded by a deadline and ends on a condition, except a
publisher's rate cap, which paces sending and decides nothing); reconnect on its own (a test
decides where a client goes after its node died); talk to anything but the nodes under test on
loopback.

Invariants:
- `race_round` returns only when both CONNECTs are answered (CONNACK, refusal, close) and then
  either at most one of the two connections is still open or `settle_s` passed; `RaceResult.live`
  counts the connections that answered a PINGREQ after that.
- `StreamPublisher.acked` holds exactly the numbers whose PUBLISH got a PUBACK with a reason code
  below 0x80; a number is sent at most once (no redelivery: after a close it stops).
- `Receiver` keeps every number delivered to any of its connections (old and new), in order.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from broker.protocol.packets import (
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
    Properties,
    ProtocolVersion,
    Puback,
    Publish,
)
from tests.cluster.nodes import Node
from tests.e2e.clients import BrokerAddress, TestClient
from tests.e2e.durability_helpers import StreamCheck, check_stream
from tests.e2e.rawclient import ConnectionClosed, RawClient

__all__ = [
    "ConnectOutcome",
    "RaceResult",
    "Receiver",
    "StreamPublisher",
    "close_all",
    "freeze_child",
    "race_round",
    "wait_delivered",
    "wait_until",
]

PERSISTENT = Properties(session_expiry_interval_s=300)


def wait_until(condition: object, timeout_s: float, what: str, poll_s: float = 0.02) -> None:
    """Poll `condition()` until true; AssertionError naming `what` after `timeout_s`."""
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(poll_s)


def freeze_child(node: Node, child: str) -> int:
    """SIGSTOP one child process of a running node (`relay`, `store`, `worker 1`): the pid the
    supervisor logged for it, checked to be in the node's own process group first. The node's
    `kill()` later takes it with the rest of the group (SIGKILL ends a stopped process too)."""
    started = re.findall(rf"{re.escape(child)} started \(pid (\d+)\)", node.log())
    assert started, f"{node.name}: no '{child} started (pid N)' line in its log"
    pid = int(started[-1])
    assert node.pid is not None and os.getpgid(pid) == node.pid, f"pid {pid} is not in {node.name}'s group"
    os.kill(pid, signal.SIGSTOP)
    return pid


# --- takeover races -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectOutcome:
    """How the broker answered one CONNECT: `accepted` (CONNACK 0), `refused` (CONNACK >= 0x80)
    or `closed` (no CONNACK: a DISCONNECT, whose code is `reason_code`, or a bare close)."""

    node: str
    kind: Literal["accepted", "refused", "closed"]
    reason_code: int | None
    session_present: bool = False


@dataclass(frozen=True, slots=True)
class RaceResult:
    outcomes: tuple[ConnectOutcome, ...]
    live: tuple[str, ...]  # nodes whose connection answered PINGREQ once things settled
    settle_ms: float  # from both answers to "at most one open" (or the end of the wait)
    late_disconnects: tuple[tuple[str, int | None], ...]  # accepted, then closed (node, reason)

    def refused(self) -> bool:
        return any(o.kind != "accepted" for o in self.outcomes)

    def describe(self) -> str:
        shown = ", ".join(
            f"{o.node}:{o.kind}" + (f"({o.reason_code:#x})" if o.reason_code is not None else "")
            for o in self.outcomes
        )
        return f"[{shown}] live={list(self.live)} late={list(self.late_disconnects)} settle={self.settle_ms:.0f}ms"


def _connect_raced(
    client: RawClient,
    node: str,
    connect: Connect,
    barrier: threading.Barrier,
    timeout_s: float,
) -> ConnectOutcome:
    """Wait at the barrier, send CONNECT at once, read what answers it."""
    data = client.encode(connect)  # encoded before the barrier: both sends leave together
    barrier.wait(timeout_s)
    try:
        client.send_bytes(data)
        answer = client.recv_packet(timeout_s)
    except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
        return ConnectOutcome(node, "closed", None)
    if isinstance(answer, Connack):
        kind: Literal["accepted", "refused"] = "accepted" if answer.reason_code == 0 else "refused"
        return ConnectOutcome(node, kind, answer.reason_code, answer.session_present)
    if isinstance(answer, Disconnect):
        return ConnectOutcome(node, "closed", answer.reason_code)
    raise AssertionError(f"{node}: {answer!r} in answer to CONNECT")


def _poll_closed(client: RawClient, closes: dict[int, int | None]) -> None:
    """Read what is there (briefly); on the close record the DISCONNECT code (or None)."""
    try:
        p = client.recv_packet(0.01)
    except TimeoutError:
        return
    except (ConnectionClosed, ConnectionResetError):
        closes.setdefault(id(client), None)
        return
    if isinstance(p, Disconnect):
        closes[id(client)] = p.reason_code
    else:
        raise AssertionError(f"unexpected packet {p!r} on a racing connection")


def _answers_ping(client: RawClient, timeout_s: float) -> bool:
    try:
        client.send(Pingreq())
        client.take(lambda p: isinstance(p, Pingresp), timeout_s)
    except (ConnectionClosed, TimeoutError, OSError):
        return False
    return True


def race_round(
    pool: ThreadPoolExecutor,
    nodes: Sequence[tuple[str, BrokerAddress]],
    client_id: str,
    clean_start: bool,
    timeout_s: float = 5.0,
    settle_s: float = 2.0,
) -> RaceResult:
    """Connect one socket per node, CONNECT the same `client_id` on all at once (a barrier), and
    await until at most one connection stays open; see the module invariants.

    `clean_start=False` asks for a persistent session (Session Expiry Interval 300 s)."""
    props = Properties() if clean_start else PERSISTENT
    connect = Connect(client_id, ProtocolVersion.V5, clean_start, 60, properties=props)
    clients = [RawClient(address, 5, timeout_s) for _, address in nodes]
    try:
        barrier = threading.Barrier(len(clients))
        futures = [
            pool.submit(_connect_raced, c, name, connect, barrier, timeout_s)
            for c, (name, _) in zip(clients, nodes, strict=True)
        ]
        outcomes = tuple(f.result(timeout_s * 2) for f in futures)
        answered = time.monotonic()
        accepted = [c for c, o in zip(clients, outcomes, strict=True) if o.kind == "accepted"]
        closes: dict[int, int | None] = {}
        deadline = answered + settle_s
        while sum(id(c) not in closes for c in accepted) > 1 and time.monotonic() < deadline:
            for c in accepted:
                if id(c) not in closes:
                    _poll_closed(c, closes)
        settle_ms = (time.monotonic() - answered) * 1000
        live = tuple(
            name
            for c, (name, _), o in zip(clients, nodes, outcomes, strict=True)
            if o.kind == "accepted" and id(c) not in closes and _answers_ping(c, timeout_s)
        )
        late = tuple(
            (name, closes[id(c)]) for c, (name, _) in zip(clients, nodes, strict=True) if id(c) in closes
        )
        return RaceResult(outcomes, live, settle_ms, late)
    finally:
        for c in clients:
            c.disconnect()


# --- a numbered QoS 1 stream ---------------------------------------------------------------------


class StreamPublisher:
    """Publishes `s/<topic>` payloads "0".."total-1" at QoS 1 on a raw connection, at most `window`
    unacknowledged and at most `rate_per_s` per second, in a thread; stops at the end or when
    the broker closes the connection (its node died)."""

    def __init__(
        self,
        broker: BrokerAddress,
        client_id: str,
        topic: str,
        total: int,
        window: int = 64,
        rate_per_s: float = 1500.0,
        timeout_s: float = 60.0,
    ) -> None:
        self.client = RawClient(broker, 5)
        ack = self.client.connect(client_id)
        assert ack.reason_code == 0, f"publisher CONNACK {ack.reason_code:#x}"
        self.topic = topic
        self.total = total
        self.window = window
        self.rate_per_s = rate_per_s
        self.timeout_s = timeout_s
        self.sent = 0
        self.acked: set[int] = set()
        self.refused: dict[int, int] = {}  # number -> PUBACK reason code >= 0x80
        self.closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"publisher-{client_id}", daemon=True)

    def start(self) -> StreamPublisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._publish_all()
        except BaseException as e:  # handed to the test by `join`
            self.error = e

    def _publish_all(self) -> None:
        inflight: dict[int, int] = {}  # packet id -> number
        started = time.monotonic()
        deadline = started + self.timeout_s
        while self.sent < self.total or inflight:
            now = time.monotonic()
            if now >= deadline:
                raise AssertionError(
                    f"publisher: {len(self.acked)} of {self.total} acknowledged in {self.timeout_s}s"
                )
            while (
                self.sent < self.total
                and len(inflight) < self.window
                and now >= started + self.sent / self.rate_per_s
            ):
                pid = self.sent % 65535 + 1
                inflight[pid] = self.sent
                try:
                    self.client.send(Publish(self.topic, str(self.sent).encode(), 1, False, False, pid))
                except OSError:
                    self.closed = True
                    return
                self.sent += 1
            try:
                p = self.client.recv_packet(0.005 if self.sent < self.total else 1.0)
            except TimeoutError:
                continue
            except (ConnectionClosed, ConnectionResetError):
                self.closed = True
                return
            if isinstance(p, Puback):
                number = inflight.pop(p.packet_id)
                if p.reason_code < 0x80:
                    self.acked.add(number)
                else:
                    self.refused[number] = p.reason_code
            elif isinstance(p, Disconnect):
                continue  # the close follows
            else:
                raise AssertionError(f"publisher got {p!r}")

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"publisher still running after {timeout_s}s"
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._thread.join(5)
        self.client.disconnect()


class Receiver:
    """The numbers one subscriber identity (client id) got over all its connections."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections: list[TestClient] = []
        self.numbers: list[int] = []

    def add(self, client: TestClient) -> TestClient:
        self.connections.append(client)
        return client

    def collect(self) -> list[int]:
        for c in self.connections:
            while True:
                try:
                    self.numbers.append(int(c.messages.get_nowait().payload))
                except queue.Empty:
                    break
        return self.numbers

    def check(self, expected: Iterable[int]) -> StreamCheck:
        return check_stream(self.collect(), expected)


def wait_delivered(
    receivers: Sequence[Receiver], expected: set[int], timeout_s: float
) -> dict[str, StreamCheck]:
    """Await (bounded) until every receiver has every `expected` number; the checks at the end."""
    deadline = time.monotonic() + timeout_s
    while True:
        checks = {r.name: r.check(expected) for r in receivers}
        if all(not c.missing for c in checks.values()) or time.monotonic() >= deadline:
            return checks
        time.sleep(0.05)


def close_all(clients: Iterable[TestClient]) -> None:
    for c in clients:
        with contextlib.suppress(Exception):
            c.close()
