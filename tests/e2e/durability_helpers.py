"""A durable node (SQLite or PostgreSQL store) that the durability tests can crash and restart.

Why: the durability promise (DESIGN.md, "Durability promise") is only worth something under a
real SIGKILL: no `atexit`, no flush, no goodbye. `DurableNode` owns one `meshmq` with a store
process, kills its whole process group, waits until every process of the group is really gone
(the kernel may still hand a connection to a dying worker's `SO_REUSEPORT` socket otherwise), and
starts it again with the same configuration, database and port. The rest of the module publishes
numbered messages through a bounded window and checks a received stream for losses,
duplicates and order, which is what every test here asserts.

Must not: signal any process but this node's own process group (through `BrokerProcess`), touch
any PostgreSQL server but the one a test gave it, leave a wait unbounded, or send traffic
anywhere but loopback.

Invariants:
- The node name and the IPC directory stay the same across restarts (the store recognises
  "sessions that were online on this node" by the node name); the IPC directory is short, under
  /tmp, and removed by `close`.
- `crash` returns only when no process of the node's group is alive (zombies count as gone);
  `restart` only when the new start logged that it listens on the node's port.
- The port lies below the kernel's ephemeral port range, out of reach of `bind(port 0)`.
"""

from __future__ import annotations

import queue
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.protocol.packets import Publish
from tests.e2e.broker_proc import BrokerProcess
from tests.e2e.clients import TestClient
from tests.e2e.rawclient import RawClient
from tests.e2e.workers_helpers import free_port_block
from tests.process_group import kill_group

__all__ = [
    "NODE_NAME",
    "DurableNode",
    "StreamCheck",
    "check_stream",
    "postgres_store",
    "publish_windowed",
    "read_publishes",
    "receive_numbered",
    "sqlite_store",
    "start_durable_node",
]

NODE_NAME = "durable-node"


def sqlite_store(path: Path) -> dict[str, Any]:
    """The `SessionStore` section for an SQLite file (an absolute path: the node's cwd moves)."""
    return {"Type": "SQLITE", "SQLite": {"Path": str(path.resolve())}}


def postgres_store(url: str, schema: str = "meshmq") -> dict[str, Any]:
    """The `SessionStore` section for a PostgreSQL database (trust auth: no user or password)."""
    return {"Type": "POSTGRES", "Postgres": {"Url": url, "Schema": schema, "PoolSize": 4}}


@dataclass
class DurableNode:
    """One durable `meshmq` node; see the module docstring."""

    broker: BrokerProcess
    ipc_dir: str

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    def log(self) -> str:
        return self.broker.log()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def crash(self) -> None:
        """SIGKILL the whole node (supervisor, store, relay, workers) and wait until it is gone."""
        proc = self.broker.proc
        assert proc is not None and proc.poll() is None, "the node is not running"
        pgid = proc.pid  # started with start_new_session: the supervisor leads its group
        self.broker.kill()
        kill_group(pgid, label="the killed node: ")  # waits; SIGKILLs a child that outlived it

    def restart(self) -> None:
        """Start the node again: same config, database, node name and port; return once this
        start's worker listens (its own log line: a connect alone could reach another process
        that took the port while the node was down)."""
        self.broker.start()
        self._wait_listening_logged()

    def _wait_listening_logged(self, timeout_s: float = 15.0) -> None:
        line = f"MQTT on {self.broker.host}:{self.broker.port}"
        deadline = time.monotonic() + timeout_s
        while line not in self.broker.log_path.read_text(errors="replace"):
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {line!r} in {self.broker.log_path} within {timeout_s}s")
            time.sleep(0.02)

    def crash_and_restart(self) -> None:
        self.crash()
        self.restart()

    def wait_log(self, pattern: str, timeout_s: float = 10.0, after: int = 0) -> re.Match[str]:
        """Wait until the node's log (from character `after` on) matches `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            found = regex.search(self.log(), after)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no log line matching {pattern!r} within {timeout_s}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def close(self) -> None:
        self.broker.stop()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


def start_durable_node(
    workdir: Path, store: dict[str, Any], config: dict[str, Any] | None = None
) -> DurableNode:
    """Start a one-worker node with `store` (`sqlite_store` / `postgres_store`) and `config` merged in."""
    ipc_dir = tempfile.mkdtemp(prefix="mqd", dir="/tmp")  # unix socket paths are short (108 bytes)
    cfg: dict[str, Any] = {"NodeName": NODE_NAME, "SessionStore": store, "Mesh": {"IpcDir": ipc_dir}}
    cfg.update(config or {})
    # A port below the kernel's ephemeral range: tests running in parallel take theirs from that
    # range (bind to port 0), so none of them takes ours while this node is down between a crash
    # and its restart (SO_REUSEPORT would even let two brokers share it).
    broker = BrokerProcess(workdir=workdir, config=cfg, port=free_port_block(1) + 1)
    node = DurableNode(broker, ipc_dir)
    try:
        node.restart()
    except BaseException:
        node.close()
        raise
    return node


# -- publishing and receiving numbered messages ------------------------------------------------


def publish_windowed(
    client: TestClient,
    topic: str,
    payloads: Sequence[bytes],
    qos: int = 1,
    window: int = 500,
    timeout_s: float = 60.0,
) -> list[int]:
    """Publish `payloads` in slices of `window` (paho keeps its own in-flight limit inside a
    slice) and wait for every acknowledgement; the v5 reason codes (0 for 3.1.1), in order."""
    codes: list[int] = []
    deadline = time.monotonic() + timeout_s
    for start in range(0, len(payloads), window):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"{len(codes)} of {len(payloads)} publishes acknowledged within {timeout_s}s"
            )
        codes += client.publish_many(topic, list(payloads[start : start + window]), qos=qos, timeout_s=left)
    return codes


def receive_numbered(
    client: TestClient, expected: Iterable[int], timeout_s: float = 60.0, quiet_s: float = 0.5
) -> list[int]:
    """The numbers (payloads) `client` receives until every `expected` one came, then for
    `quiet_s` more (a duplicate or a stray message then shows); stops at `timeout_s`."""
    want = set(expected)
    got: list[int] = []
    deadline = time.monotonic() + timeout_s
    while want and time.monotonic() < deadline:
        try:
            n = int(client.messages.get(timeout=min(0.5, max(0.001, deadline - time.monotonic()))).payload)
        except queue.Empty:
            continue
        got.append(n)
        want.discard(n)
    while True:
        try:
            got.append(int(client.messages.get(timeout=quiet_s).payload))
        except queue.Empty:
            return got


def read_publishes(client: RawClient, count: int, timeout_s: float = 30.0) -> list[Publish]:
    """The next `count` PUBLISH packets `client` receives (nothing acknowledged)."""
    got: list[Publish] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{len(got)} of {count} PUBLISH packets within {timeout_s}s")
        p = client.recv_packet(left)
        assert isinstance(p, Publish), f"expected PUBLISH, got {p!r}"
        got.append(p)
    return got


@dataclass(frozen=True, slots=True)
class StreamCheck:
    """What a received stream of numbers looks like against the numbers that must be in it."""

    received: int
    missing: tuple[int, ...]  # expected and never received: a loss
    duplicates: int  # deliveries of a number received before (allowed for QoS 1, counted)
    out_of_order: tuple[int, ...]  # numbers whose first delivery came after a higher number's
    unexpected: tuple[int, ...]  # received numbers that were not expected

    def summary(self) -> str:
        return (
            f"received {self.received}, missing {len(self.missing)} {list(self.missing[:10])}, "
            f"duplicates {self.duplicates}, out of order {len(self.out_of_order)} {list(self.out_of_order[:10])}, "
            f"unexpected {len(self.unexpected)} {list(self.unexpected[:10])}"
        )


def check_stream(received: Sequence[int], expected: Iterable[int]) -> StreamCheck:
    """Losses, duplicates and order of `received`: order is judged on first deliveries only, so
    a redelivered (duplicate) message does not count as out of order [MQTT-4.6.0-5 area]."""
    want = set(expected)
    seen: set[int] = set()
    duplicates = 0
    out_of_order: list[int] = []
    highest = -1
    for n in received:
        if n in seen:
            duplicates += 1
            continue
        seen.add(n)
        if n < highest:
            out_of_order.append(n)
        highest = max(highest, n)
    return StreamCheck(
        received=len(received),
        missing=tuple(sorted(want - seen)),
        duplicates=duplicates,
        out_of_order=tuple(out_of_order),
        unexpected=tuple(sorted(seen - want)),
    )
