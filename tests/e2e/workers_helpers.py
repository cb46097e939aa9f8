"""Put test clients on a chosen worker of a multi-worker node, and kill / watch its workers.

Why: with `-workers N` the kernel spreads connections to the shared MQTT port over the workers
(SO_REUSEPORT), so a test cannot choose where a client lands. The node's test option
`WorkerPortBase: P` makes worker i (1..N) also listen on port P + i; `WorkerNode.worker(i)` is
the address of that port, which `TestClient`, `ClientFactory` and `RawClient` accept wherever
they take a broker. The supervisor logs `worker N started (pid P)` and
`worker N exited ... restarting`; this module reads those lines to find and kill one worker and
to wait, on an event rather than a guess, until the supervisor has replaced it. The last part
reads numbered messages from several clients at once (`collect`, `take_until`) for the tests
that check completeness, duplicates and order.

Must not: signal any process but the one worker pid it read from this node's own log (never by
name, never the node's process group except through `BrokerProcess`); leave a loop unbounded in
time; send traffic anywhere but loopback.

Invariants: the port block P+1..P+N was free (bind-tested) when chosen, below the kernel's
ephemeral range so that client sockets do not take it meanwhile; `worker_pid(i)` is the pid of
the latest start of worker i that the log shows.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import re
import signal
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.broker_proc import BrokerProcess, free_port
from tests.e2e.clients import Message, TestClient

__all__ = [
    "WorkerAddress",
    "WorkerNode",
    "collect",
    "free_port_block",
    "missing_and_duplicates",
    "numbered",
    "port_free",
    "seqs",
    "start_worker_node",
    "take_until",
    "wait_accepting",
]

_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


@dataclass(slots=True)
class WorkerAddress:
    """Where a client connects to reach one worker: what `clients.BrokerAddress` asks for.

    Not frozen: `BrokerAddress` is a Protocol with plain (settable) attributes, which a frozen
    dataclass does not satisfy for mypy. Treat it as a value all the same.
    """

    host: str
    port: int
    worker: int  # 1..N; 0 = the shared port (any worker)


def port_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now (TCP; closed again at once)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _below_ephemeral() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(count: int, host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A base port P such that P+1 .. P+count are all free now (P itself is not used)."""
    top = _below_ephemeral() - count - 1
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20_000, top)
        if all(port_free(host, base + i) for i in range(1, count + 1)):
            return base
    raise RuntimeError(f"no block of {count} free ports found in {attempts} attempts")


def wait_accepting(host: str, port: int, timeout_s: float = 15.0) -> None:
    """Wait until `host:port` accepts a TCP connection (closed again at once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing accepts on {host}:{port} after {timeout_s}s") from None
            time.sleep(0.02)


@dataclass(slots=True)
class WorkerNode:
    """A running `meshmq -workers N` node with `WorkerPortBase` set; see the module docstring."""

    broker: BrokerProcess
    workers: int
    port_base: int

    @property
    def shared(self) -> WorkerAddress:
        """The shared MQTT port: the kernel picks the worker."""
        return WorkerAddress(self.broker.host, self.broker.port, 0)

    def worker(self, index: int) -> WorkerAddress:
        if not 1 <= index <= self.workers:
            raise ValueError(f"worker index {index} not in 1..{self.workers}")
        return WorkerAddress(self.broker.host, self.port_base + index, index)

    def all_workers(self) -> list[WorkerAddress]:
        return [self.worker(i) for i in range(1, self.workers + 1)]

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """Every worker port accepts connections (the shared port did, or `start` failed)."""
        deadline = time.monotonic() + timeout_s
        for w in self.all_workers():
            wait_accepting(w.host, w.port, max(0.1, deadline - time.monotonic()))

    def log(self) -> str:
        return self.broker.log()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def worker_pids(self, index: int) -> list[int]:
        """The pid of every start of worker `index` so far, oldest first."""
        return [int(pid) for i, pid in _STARTED.findall(self.log()) if int(i) == index]

    def worker_pid(self, index: int, timeout_s: float = 10.0) -> int:
        """The pid of the current (latest) start of worker `index`."""
        deadline = time.monotonic() + timeout_s
        while not (pids := self.worker_pids(index)):
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no 'worker {index} started (pid P)' line in the log:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        return pids[-1]

    def kill_worker(self, index: int, sig: int = signal.SIGKILL) -> int:
        """Signal (default SIGKILL) the current process of worker `index`; its pid."""
        pid = self.worker_pid(index)
        os.kill(pid, sig)
        return pid

    def wait_worker_restarted(self, index: int, old_pid: int, timeout_s: float = 15.0) -> int:
        """Wait until the log shows a new start of worker `index` and its port accepts again;
        the new pid."""
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.worker_pids(index)
            if pids and pids[-1] != old_pid:
                break
            if self.broker.proc is not None and self.broker.proc.poll() is not None:
                raise AssertionError(
                    f"the node exited ({self.broker.proc.returncode}) instead of restarting "
                    f"worker {index}:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"worker {index} (pid {old_pid}) not restarted within {timeout_s}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        w = self.worker(index)
        wait_accepting(w.host, w.port, max(0.1, deadline - time.monotonic()))
        return pids[-1]

    def alive(self) -> bool:
        return self.broker.proc is not None and self.broker.proc.poll() is None


def start_worker_node(
    workdir: Path, workers: int = 4, config: dict[str, Any] | None = None, attempts: int = 3
) -> WorkerNode:
    """Start `meshmq -workers N` with a fresh `WorkerPortBase` block and wait for every worker.

    Retries with another port block if the node fails to start (another process may have
    taken a port of the block between the bind test and the broker's bind).
    """
    last: Exception | None = None
    broker: BrokerProcess | None = None
    for attempt in range(1, attempts + 1):
        base = free_port_block(workers)
        attempt_dir = workdir / f"node-{attempt}"
        attempt_dir.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {"WorkerPortBase": base}
        cfg.update(config or {})
        broker = BrokerProcess(
            workdir=attempt_dir, config=cfg, args=("-workers", str(workers)), port=free_port()
        )
        try:
            broker.start()
            node = WorkerNode(broker, workers, base)
            node.wait_ready()
            return node
        except (RuntimeError, TimeoutError) as exc:
            last = exc
            broker.stop()
    tail = broker.log()[-4000:] if broker is not None else ""
    raise RuntimeError(f"multi-worker node did not start: {last}\n{tail}")


# -- reading what several clients received ---------------------------------------------------


def numbered(n: int, start: int = 0) -> list[bytes]:
    """Payloads b"0", b"1", ...: a message's payload is its sequence number."""
    return [str(i).encode() for i in range(start, start + n)]


def seqs(messages: Iterable[Message]) -> list[int]:
    return [int(m.payload) for m in messages]


def collect(
    clients: Sequence[TestClient], total: int, timeout_s: float = 10.0, quiet_s: float = 0.3
) -> list[list[Message]]:
    """Per client, what it received until `total` messages came in all, then `quiet_s` more
    (so that a duplicate or an extra message shows)."""
    got: list[list[Message]] = [[] for _ in clients]
    deadline = time.monotonic() + timeout_s
    while sum(map(len, got)) < total and time.monotonic() < deadline:
        for i, c in enumerate(clients):
            with contextlib.suppress(queue.Empty):
                while True:
                    got[i].append(c.messages.get(timeout=0.005))
    quiet_deadline = time.monotonic() + quiet_s
    while time.monotonic() < quiet_deadline:
        for i, c in enumerate(clients):
            with contextlib.suppress(queue.Empty):
                got[i].append(c.messages.get(timeout=0.01))
    return got


def take_until(client: TestClient, got: list[Message], n: int, timeout_s: float = 10.0) -> None:
    """Append what `client` receives to `got` until it holds `n` messages."""
    deadline = time.monotonic() + timeout_s
    while len(got) < n:
        left = deadline - time.monotonic()
        try:
            got.append(client.messages.get(timeout=max(0.001, left)))
        except queue.Empty:
            raise AssertionError(
                f"{client.client_id}: {len(got)} of {n} messages within {timeout_s}s; "
                f"last {seqs(got[-3:]) if got else []}"
            ) from None


def missing_and_duplicates(received: Iterable[int], expected: Iterable[int]) -> tuple[list[int], list[int]]:
    """(expected numbers never received, numbers received more than once), both sorted."""
    counts: dict[int, int] = {}
    for n in received:
        counts[n] = counts.get(n, 0) + 1
    missing = sorted(n for n in expected if n not in counts)
    duplicates = sorted(n for n, c in counts.items() if c > 1)
    return missing, duplicates
