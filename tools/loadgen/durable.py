"""The `durable` benchmark: QoS 1 into persistent sessions, with PostgreSQL and with SQLite.

Why: issue 4's promise (nothing acknowledged is lost, even to SIGKILL) is paid for in database
transactions, and its price must be measured: how many durable QoS 1 messages per second a node
acknowledges (target: 20,000 into PostgreSQL on this machine), how long a publisher waits for its
PUBACK (p50 / p99, publish -> PUBACK), how many queue rows one transaction carries (group
commit), and whether an offline queue drains at least as fast as it was filled.

Unlike the other loadgen scenarios this one owns its broker: it needs a node with a store and
(for PostgreSQL) a throwaway database server (`tests.pg.throwaway_server`), both started and
stopped here (`python -m tools.loadgen.durable` runs it alone; the clients are in
`durable_clients`). Three phases run against one node, `pairs` topics each with one QoS 1 publisher
(`window` messages in flight) and one persistent subscriber (3.1.1 Clean Session 0, or 5.0
with Session Expiry 0xFFFFFFFF):
  online   subscribers connected and acknowledging; warm-up, then a measured window
  fill     subscribers gone (sessions kept): every message becomes a queue row
  drain    subscribers reconnect: from CONNECT until every filled message arrived
Rows per transaction come from PostgreSQL itself: write transactions are counted as the growth
of `pg_current_xact_id()` over a phase (read-only transactions take no xid), rows as the
messages acknowledged (one row per message: one subscriber per topic). SQLite exposes no such
count, so its column shows none.

Must not: send traffic anywhere but 127.0.0.1, leave a broker or a database server running (both
are stopped in `finally`, the broker through its own process group), run unbounded (every phase
has a deadline and a message bound), or print (the caller renders).

Invariants: messages of one topic carry increasing sequence numbers from their publisher, so a
subscriber counts duplicates (below the expected number) and gaps (above) without a set; a
publisher's latency samples are taken only while the window is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from tools import procstat
from tools.loadgen import clients, wire
from tools.loadgen.durable_clients import DurablePublisher, PersistentSubscriber
from tools.loadgen.scenarios import Metric
from tools.loadgen.worker import run_async

SCENARIO = "durable"
STORES = ("postgres", "sqlite")
HOST = "127.0.0.1"
LISTEN_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 30.0  # a persistent session's CONNECT waits for the store's load
KEEPALIVE_S = 600  # no PINGREQ is due while a phase runs (the clients send none)
OFFLINE_SETTLE_S = 0.3  # after DISCONNECT, before the fill: the broker marks the sessions offline


@dataclass(frozen=True, slots=True)
class DurableParams:
    seconds: float = 5.0  # measured window of the online phase, and length of the fill
    warmup_s: float = 1.0
    pairs: int = 16  # topics, each with one publisher and one persistent subscriber
    window: int = 100  # QoS 1 messages in flight per publisher (the node's MaxInflight)
    payload_bytes: int = 64
    version: int = wire.MQTT_311
    workers: int = 0  # 0: the node's default, one worker per core
    fill_max_msgs: int = 300_000  # bound of the fill, all publishers together
    settle_timeout_s: float = 60.0  # longest wait for in-flight messages after a phase
    drain_timeout_s: float = 180.0


@dataclass(frozen=True, slots=True)
class PhaseResult:
    phase: str
    msgs: int  # acknowledged with success (online, fill) or delivered (drain)
    seconds: float
    p50_ms: float | None = None  # publish -> PUBACK
    p99_ms: float | None = None
    refused: int = 0  # PUBACK >= 0x80 (5.0): not durable, not delivered
    transactions: int | None = None  # PostgreSQL write transactions during the phase
    broker_cpu_pct: float | None = None
    database_cpu_pct: float | None = None
    generator_cpu_pct: float = 0.0
    unacked: int = 0  # PUBLISHes still without PUBACK `settle_timeout_s` after the phase

    @property
    def msgs_per_s(self) -> float | None:
        return self.msgs / self.seconds if self.seconds > 0 else None

    @property
    def rows_per_transaction(self) -> float | None:
        return self.msgs / self.transactions if self.transactions else None


@dataclass(frozen=True, slots=True)
class DurableResult:
    store: str
    phases: tuple[PhaseResult, ...]
    lost: int  # acknowledged with success, never delivered
    duplicates: int
    errors: tuple[str, ...]

    def phase(self, name: str) -> PhaseResult | None:
        return next((p for p in self.phases if p.phase == name), None)

    def metrics(self) -> tuple[Metric, ...]:
        """The figures as bench metrics (one table column per store)."""
        online, fill, drain = self.phase("online"), self.phase("fill"), self.phase("drain")
        out = []
        if online is not None:
            out += [
                Metric("online acked msgs/s", online.msgs_per_s, "msg/s"),
                Metric("online PUBACK p50", online.p50_ms, "ms", "lower"),
                Metric("online PUBACK p99", online.p99_ms, "ms", "lower"),
                Metric("online rows/transaction", online.rows_per_transaction, "rows", ""),
                Metric("online broker CPU", online.broker_cpu_pct, "%", ""),
                Metric("online database CPU", online.database_cpu_pct, "%", ""),
            ]
        if fill is not None:
            out += [
                Metric("fill acked msgs/s", fill.msgs_per_s, "msg/s"),
                Metric("fill PUBACK p99", fill.p99_ms, "ms", "lower"),
                Metric("fill rows/transaction", fill.rows_per_transaction, "rows", ""),
            ]
        if drain is not None:
            out.append(Metric("drain msgs/s", drain.msgs_per_s, "msg/s"))
        if fill is not None and drain is not None and fill.msgs_per_s and drain.msgs_per_s:
            out.append(Metric("drain/fill", drain.msgs_per_s / fill.msgs_per_s, "x"))
        if online is not None:
            out.append(Metric("online generator CPU", online.generator_cpu_pct, "%", ""))
        out += [
            Metric("lost msgs", float(self.lost), "msgs", "lower"),
            Metric("duplicate msgs", float(self.duplicates), "msgs", "lower"),
        ]
        return tuple(out)


# -- the node and the database -----------------------------------------------------------------


class Node:
    """One MeshMQ node of this benchmark, in its own process group."""

    def __init__(self, workdir: Path, store_yaml: str, params: DurableParams) -> None:
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = int(s.getsockname()[1])
        config = workdir / "meshmq.yaml"
        config.write_text(
            f"ListenAddress: {HOST}\nTCP: {self.port}\nWorkers: {params.workers}\n"
            f"MQTT:\n  MaxQueuedMessages: {params.fill_max_msgs + 100_000}\n"
            f"Mesh:\n  IpcDir: {workdir / 'ipc'}\n{store_yaml}"
        )
        exe = Path(sys.executable).with_name("meshmq")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "broker.cli"]
        self.log_path = workdir / "broker.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*cmd, "-config", str(config)],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + LISTEN_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node exited ({self.proc.returncode}): {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=0.2):
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"the node did not listen within {LISTEN_TIMEOUT_S}s: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 8) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@dataclass(frozen=True, slots=True)
class Database:
    """Where the node stores, and how to count PostgreSQL's write transactions (None: SQLite)."""

    store_yaml: str
    url: str | None = None
    server_pid: int | None = None

    def xid(self) -> int | None:
        """The next transaction id (this call takes one); None for SQLite."""
        if self.url is None:
            return None
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        return None if row is None else int(row[0])


@contextlib.contextmanager
def database(store: str, workdir: Path) -> Iterator[Database]:
    """A fresh PostgreSQL server and database (stopped afterwards), or an SQLite file."""
    if store == "sqlite":
        yield Database(f"SessionStore:\n  Type: SQLITE\n  SQLite:\n    Path: {workdir / 'store.db'}\n")
        return
    from tests.pg import throwaway_server  # the tests' helper: no fixed port, no PG* variables

    with throwaway_server() as server:
        with server.connect() as conn:
            conn.execute("CREATE DATABASE meshmq_bench")
        url = server.url("meshmq_bench")
        pid_file = Path(server.data_dir, "postmaster.pid")
        pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
        yield Database(f"SessionStore:\n  Type: POSTGRES\n  Postgres:\n    Url: {url}\n", url, pid)


# -- the phases ---------------------------------------------------------------------------------


def _percentile_ms(ordered: list[int], q: float) -> float | None:
    """Nearest-rank percentile of nanosecond samples, in milliseconds."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] / 1e6


def _transactions(xid_before: int | None, xid_after: int | None) -> int | None:
    """Write transactions between two `Database.xid` samples (the second sample took one)."""
    if xid_before is None or xid_after is None:
        return None
    return max(1, xid_after - xid_before - 1)


class _Meter:
    """CPU of the broker tree, the database server and this process between two instants."""

    def __init__(self, node: Node, db: Database) -> None:
        self.roots = {"broker": node.proc.pid}
        if db.server_pid is not None:
            self.roots["db"] = db.server_pid
        self.before = {k: procstat.sample_tree(pid) for k, pid in self.roots.items()}
        self.own_before = time.process_time()
        self.at = time.monotonic()

    def pct(self) -> tuple[float | None, float | None, float]:
        """(broker, database, generator) CPU in % of one core since the meter was made."""
        span_s = max(time.monotonic() - self.at, 1e-9)
        after = {k: procstat.sample_tree(pid) for k, pid in self.roots.items()}
        share = {k: 100 * procstat.cpu_s_between(self.before[k], after[k]) / span_s for k in after}
        return share.get("broker"), share.get("db"), 100 * (time.process_time() - self.own_before) / span_s


async def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _handshake(client: clients.Client, client_id: str) -> None:
    try:
        await client.handshake(client_id, KEEPALIVE_S, CONNECT_TIMEOUT_S)
    except TimeoutError:
        raise clients.ClientError(f"{client_id}: no CONNACK within {CONNECT_TIMEOUT_S}s") from None


async def _open_publisher(port: int, client_id: str, topic: str, params: DurableParams) -> DurablePublisher:
    loop = asyncio.get_running_loop()
    v, size, window = params.version, params.payload_bytes, params.window
    _t, client = await asyncio.wait_for(
        loop.create_connection(lambda: DurablePublisher(v, topic, size, window), HOST, port),
        CONNECT_TIMEOUT_S,
    )
    await _handshake(client, client_id)
    return client


async def _open_subscriber(
    port: int, client_id: str, topic: str | None, params: DurableParams, expected_seq: int = 0
) -> PersistentSubscriber:
    loop = asyncio.get_running_loop()
    v = params.version
    _t, client = await asyncio.wait_for(
        loop.create_connection(lambda: PersistentSubscriber(v, expected_seq), HOST, port), CONNECT_TIMEOUT_S
    )
    await _handshake(client, client_id)
    if topic is not None:
        try:
            await client.subscribe((topic,), 1, CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise clients.ClientError(f"{client_id}: no SUBACK within {CONNECT_TIMEOUT_S}s") from None
    return client


async def _publish_phase(
    name: str,
    pubs: list[DurablePublisher],
    params: DurableParams,
    node: Node,
    db: Database,
    warmup_s: float,
    max_msgs: int,
) -> PhaseResult:
    """Publish for warmup + `params.seconds` (at most `max_msgs` in all), measure after the
    warm-up, then let what is in flight complete."""
    per_pub = max(1, max_msgs // len(pubs))
    for pub in pubs:
        pub.run_until(pub.seq + per_pub)
    await asyncio.sleep(warmup_s)
    ok0, refused0 = sum(p.ok for p in pubs), sum(p.refused for p in pubs)
    xid0 = db.xid()
    meter = _Meter(node, db)
    for pub in pubs:
        pub.latencies_ns.clear()
        pub.recording = True
    await _wait(lambda: all(p.finished for p in pubs), params.seconds)
    span_s = time.monotonic() - meter.at
    broker_pct, db_pct, own_pct = meter.pct()
    for pub in pubs:
        pub.recording = False
    ok1, refused1 = sum(p.ok for p in pubs), sum(p.refused for p in pubs)
    xid1 = db.xid()
    for pub in pubs:
        pub.run_until(0)
    await _wait(lambda: not any(p.in_flight() for p in pubs), params.settle_timeout_s)
    unacked = sum(p.in_flight() for p in pubs)  # after the settle: a stalled node
    ordered = sorted(ns for p in pubs for ns in p.latencies_ns)
    return PhaseResult(
        name,
        ok1 - ok0,
        span_s,
        _percentile_ms(ordered, 0.5),
        _percentile_ms(ordered, 0.99),
        refused1 - refused0,
        _transactions(xid0, xid1),
        broker_pct,
        db_pct,
        own_pct,
        unacked,
    )


async def _run_phases(params: DurableParams, node: Node, db: Database) -> DurableResult:
    topics = [f"bench/durable/{i}" for i in range(params.pairs)]
    sub_ids = [f"durable-sub-{i}" for i in range(params.pairs)]
    first = [
        await _open_subscriber(node.port, cid, t, params) for cid, t in zip(sub_ids, topics, strict=True)
    ]
    pubs = [await _open_publisher(node.port, f"durable-pub-{i}", t, params) for i, t in enumerate(topics)]
    second: list[PersistentSubscriber] = []
    errors: list[str] = []
    try:
        phases = [await _publish_phase("online", pubs, params, node, db, params.warmup_s, 50_000_000)]
        pairs = list(zip(first, pubs, strict=True))
        if not await _wait(lambda: all(s.unique >= p.ok for s, p in pairs), params.settle_timeout_s):
            errors.append("online: not every acknowledged message arrived before the fill")
        for sub in first:
            sub.close()  # DISCONNECT: the sessions stay, their messages go to the store
        await asyncio.sleep(OFFLINE_SETTLE_S)
        phases.append(await _publish_phase("fill", pubs, params, node, db, 0.0, params.fill_max_msgs))

        xid0 = db.xid()
        meter = _Meter(node, db)
        for cid, sub in zip(sub_ids, first, strict=True):
            second.append(await _open_subscriber(node.port, cid, None, params, sub.expected_seq))
        pairs = list(zip(second, pubs, strict=True))
        done = await _wait(
            lambda: all(a.unique + b.unique >= p.ok for a, b, p in zip(first, second, pubs, strict=True)),
            params.drain_timeout_s,
        )
        span_s = time.monotonic() - meter.at
        broker_pct, db_pct, own_pct = meter.pct()
        if not done:
            errors.append(f"drain: not complete within {params.drain_timeout_s:.0f}s")
        phases.append(
            PhaseResult(
                "drain",
                sum(s.unique for s in second),
                span_s,
                transactions=_transactions(xid0, db.xid()),
                broker_cpu_pct=broker_pct,
                database_cpu_pct=db_pct,
                generator_cpu_pct=own_pct,
            )
        )
        lost = sum(max(0, p.ok - a.unique - b.unique) for a, b, p in zip(first, second, pubs, strict=True))
        errors += [f"client: {c.error}" for c in (*first, *second, *pubs) if c.error and not c.closing]
        errors += [
            f"{p.phase}: {p.unacked} PUBLISH(es) never acknowledged (waited {params.settle_timeout_s:.0f}s)"
            for p in phases
            if p.unacked
        ]
        duplicates = sum(s.duplicates for s in (*first, *second))
        return DurableResult("", tuple(phases), lost, duplicates, tuple(dict.fromkeys(errors)))
    finally:
        for client in (*pubs, *first, *second):
            client.close()
        await asyncio.sleep(0.05)


def run_durable(store: str, params: DurableParams) -> DurableResult:
    """Start the database and a node, run the three phases, stop both; never raises."""
    with tempfile.TemporaryDirectory(prefix="meshmq-durable-") as tmp:
        node: Node | None = None
        try:
            with database(store, Path(tmp)) as db:
                node = Node(Path(tmp), db.store_yaml, params)
                started = node
                try:
                    result = run_async(lambda: _run_phases(params, started, db))
                finally:
                    node.stop()
            if node.proc.returncode not in (0, -signal.SIGTERM):
                result = replace(result, errors=(*result.errors, f"node exited {node.proc.returncode}"))
            return replace(result, store=store)
        except Exception as exc:  # one failed store must not end the bench
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            tail = f"; node log: {node.log_tail()}" if node is not None else ""
            error = f"{type(exc).__name__}: {exc} (in {frame.name}, line {frame.lineno}){tail}"
            return DurableResult(store, (), 0, 0, (error,))


def as_json(result: DurableResult) -> dict[str, object]:
    """The result for `bench-results/*.json`."""
    return {
        "store": result.store,
        "metrics": [{"name": m.name, "value": m.value, "unit": m.unit} for m in result.metrics()],
        "phases": [
            {
                "phase": p.phase,
                "msgs": p.msgs,
                "seconds": round(p.seconds, 3),
                "msgs_per_s": p.msgs_per_s,
                "p50_ms": p.p50_ms,
                "p99_ms": p.p99_ms,
                "refused": p.refused,
                "transactions": p.transactions,
                "rows_per_transaction": p.rows_per_transaction,
                "broker_cpu_pct": p.broker_cpu_pct,
                "database_cpu_pct": p.database_cpu_pct,
                "generator_cpu_pct": p.generator_cpu_pct,
            }
            for p in result.phases
        ],
        "lost": result.lost,
        "duplicates": result.duplicates,
        "errors": list(result.errors),
    }


# -- command line ---------------------------------------------------------------------------------


def render(results: list[DurableResult]) -> str:
    """One row per metric, one column per store."""
    names = list(dict.fromkeys(m.name for r in results for m in r.metrics()))
    rows = [["durable", *(r.store for r in results)]]
    for name in names:
        cells = []
        for r in results:
            value = next((m.value for m in r.metrics() if m.name == name), None)
            cells.append("-" if value is None else f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}")
        unit = next(m.unit for r in results for m in r.metrics() if m.name == name)
        rows.append([f"{name} ({unit})", *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    for r in results:
        lines += [f"{r.store}: ERROR {e}" for e in r.errors]
        for p in r.phases:
            if p.generator_cpu_pct >= 90:
                lines.append(
                    f"{r.store} {p.phase}: warning: the generator used {p.generator_cpu_pct:.0f}% CPU"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    defaults = DurableParams()
    parser = argparse.ArgumentParser(
        prog="python -m tools.loadgen.durable", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated: postgres, sqlite")
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--warmup", type=float, default=defaults.warmup_s)
    parser.add_argument("--pairs", type=int, default=defaults.pairs)
    parser.add_argument("--window", type=int, default=defaults.window)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--fill-max", type=int, default=defaults.fill_max_msgs)
    parser.add_argument(
        "--mqtt-version", type=int, choices=(wire.MQTT_311, wire.MQTT_5), default=wire.MQTT_311
    )
    args = parser.parse_args(argv)
    # SIGTERM (a timeout, an impatient caller) must still run the `finally`s that stop the node
    # and the database server.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if unknown := [s for s in stores if s not in STORES]:
        parser.error(f"unknown store(s) {unknown}; known: {', '.join(STORES)}")
    params = DurableParams(
        seconds=args.seconds,
        warmup_s=args.warmup,
        pairs=args.pairs,
        window=args.window,
        workers=args.workers,
        fill_max_msgs=args.fill_max,
        version=args.mqtt_version,
    )
    results = [run_durable(store, params) for store in stores]
    print(render(results))
    return 1 if any(r.errors or not r.phases for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
