"""One load-generator process: its connections, its phases, its counts.

Why: one Python process cannot drive a fast broker at full rate on both the publishing and the
subscribing side, so a scenario runs several of these (publishers in one, subscribers in
another, ...). The parent (`runner`) tells each one *when* things happen, in absolute
`time.monotonic()` seconds, which all processes of the host share; each worker takes its own
window readings at those instants and reports counts, never rates.

Must not: print, decide scenario metrics, or run unbounded. Every wait here has a timeout and
every publishing loop a deadline and a message bound; if the parent goes away (pipe closed) the
worker stops.

Invariants and protocol with the parent, over one multiprocessing Pipe:
  worker -> Ready (all its connections are up and subscribed)  | Failed
  parent -> Go(start, warm, end, ...)                          | Stop
  worker -> WorkerResult (after the drain that follows `end`)  | Failed
  parent -> Stop; the worker closes its connections and exits.
An idle-connection worker sends Ready at once and opens its connections at Go's `start`.

TLS (`WorkerSpec.tls_ca_file`): the choice is made once per connection, when it is opened
(`loop.create_connection(..., ssl=context)` with one client context per worker process, TLS 1.3
when the broker offers it, the server verified against that CA, no client certificate). The
protocols in `clients` are the same objects on both transports, so the plain path carries no
per-message test of any kind; the TLS records are the transport's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from multiprocessing.connection import Connection
from typing import TypeVar

from tools.loadgen import clients, wire

READY_TIMEOUT_S = 120.0  # parent's longest wait between our Ready and its Go
STOP_TIMEOUT_S = 60.0  # after our result, how long we hold connections waiting for Stop
POLL_S = 0.05
TUNE_S = 0.1  # how often counting subscribers re-tune SO_RCVLOWAT to the traffic's rate
MAX_ERRORS_REPORTED = 10

T = TypeVar("T")


class RoleKind(Enum):
    PUBLISH_QOS0 = "publish-qos0"  # flood identical QoS 0 batches
    PUBLISH_QOS1 = "publish-qos1"  # QoS 1 with a window of in-flight messages
    PUBLISH_PACED = "publish-paced"  # QoS 0 at rate_per_s, time-stamped
    SUBSCRIBE_COUNT = "subscribe-count"  # count deliveries
    SUBSCRIBE_QOS1 = "subscribe-qos1"  # count, PUBACK, check sequence numbers
    SUBSCRIBE_LATENCY = "subscribe-latency"  # record latencies
    IDLE = "idle"  # CONNECT, CONNACK, then nothing

    @property
    def publishes(self) -> bool:
        return self.value.startswith("publish")

    @property
    def subscribes(self) -> bool:
        return self.value.startswith("subscribe")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one worker process does. `topics` has one entry per connection: the topic it
    publishes to, or the filter it subscribes to (IDLE uses `idle_connections` instead)."""

    name: str
    kind: RoleKind
    host: str
    port: int
    topics: tuple[str, ...] = ()
    idle_connections: int = 0
    qos: int = 0
    version: int = wire.MQTT_311
    payload_bytes: int = 64
    batch_msgs: int = 64
    window: int = 10
    rate_per_s: float = 1000.0
    keepalive_s: int = 60
    connect_concurrency: int = 64
    connect_timeout_s: float = 10.0
    max_messages: int = 50_000_000  # per connection, a bound independent of time
    tls_ca_file: str | None = None  # connect over TLS, verifying the broker against this CA (PEM)


@dataclass(frozen=True, slots=True)
class Ready:
    name: str
    pid: int


@dataclass(frozen=True, slots=True)
class Go:
    start_s: float  # publishers start (monotonic clock)
    warm_s: float  # measured window opens
    end_s: float  # window closes and publishers stop
    drain_s: float  # longest wait after end for in-flight messages
    quiet_s: float  # subscribers stop once nothing arrived for this long


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Failed:
    name: str
    pid: int
    error: str


@dataclass(frozen=True, slots=True)
class ConnectionCounts:
    sent: int = 0
    acked: int = 0
    received: int = 0
    sent_window: int = 0
    received_window: int = 0
    duplicates: int = 0
    gaps: int = 0


@dataclass(frozen=True, slots=True)
class WorkerResult:
    name: str
    pid: int
    window_s: float  # measured length of this worker's window
    connections: tuple[ConnectionCounts, ...]
    latencies_ns: tuple[int, ...] = ()
    connected: int = 0
    connect_failed: int = 0
    connect_started_s: float = 0.0
    connect_done_s: float = 0.0
    errors: tuple[str, ...] = ()


ToParent = Ready | Failed | WorkerResult
ToWorker = Go | Stop


def raise_nofile_limit() -> int:
    """Raise this process's open-file limit to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def client_ssl_context(ca_file: str) -> ssl.SSLContext:
    """A client context that verifies the broker against `ca_file` (host name included).

    The standard library's defaults: TLS 1.2 at least, TLS 1.3 whenever the broker offers it,
    no client certificate.
    """
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)


def run_async(main: Callable[[], Coroutine[object, object, T]]) -> T:
    """Run on uvloop when it is installed, else on the default asyncio loop."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Process entry point (multiprocessing target)."""
    raise_nofile_limit()
    try:
        run_async(lambda: _worker(spec, conn))
    except Exception as exc:  # reported to the parent, which owns the error handling
        with contextlib.suppress(OSError):
            conn.send(Failed(spec.name, os.getpid(), f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class _Inbox:
    """Messages from the parent, read without blocking the event loop."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._queue: asyncio.Queue[ToWorker] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self._conn.poll():
                self._queue.put_nowait(self._conn.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            self._queue.put_nowait(Stop())  # the parent is gone

    async def get(self, timeout_s: float) -> ToWorker:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return Stop()

    def close(self) -> None:
        self._loop.remove_reader(self._conn.fileno())


def _make_client(spec: WorkerSpec, topic: str) -> clients.Client:
    kind, version = spec.kind, spec.version
    if kind is RoleKind.PUBLISH_QOS0:
        return clients.Qos0Publisher(version, topic, spec.payload_bytes, spec.batch_msgs)
    if kind is RoleKind.PUBLISH_QOS1:
        return clients.Qos1Publisher(version, topic, spec.payload_bytes, spec.window)
    if kind is RoleKind.PUBLISH_PACED:
        return clients.PacedPublisher(version, topic, spec.payload_bytes, spec.rate_per_s)
    if kind is RoleKind.SUBSCRIBE_QOS1:
        return clients.Qos1Subscriber(version)
    if kind is RoleKind.SUBSCRIBE_LATENCY:
        return clients.LatencySubscriber(version)
    return clients.CountingSubscriber(version)


async def _connect(
    spec: WorkerSpec,
    index: int,
    topic: str,
    gate: asyncio.Semaphore,
    took_ns: list[int] | None = None,
    tls: ssl.SSLContext | None = None,
) -> clients.Client:
    loop = asyncio.get_running_loop()
    async with gate:
        started_ns = time.perf_counter_ns()
        # ssl=None is asyncio's plain TCP; server_hostname only goes with a context.
        _transport, client = await asyncio.wait_for(
            loop.create_connection(
                lambda: _make_client(spec, topic),
                spec.host,
                spec.port,
                ssl=tls,
                server_hostname=spec.host if tls is not None else None,
            ),
            spec.connect_timeout_s,
        )
        try:
            client_id = f"lg{os.getpid()}-{spec.name.replace('/', '-')}-{index}"
            await client.handshake(client_id, spec.keepalive_s, spec.connect_timeout_s)
            if spec.kind.subscribes:
                await client.subscribe((topic,), spec.qos, spec.connect_timeout_s)
        except BaseException:
            client.close()
            raise
        if took_ns is not None:
            took_ns.append(time.perf_counter_ns() - started_ns)
        return client


async def _sleep_until(when_s: float) -> None:
    await asyncio.sleep(max(0.0, when_s - time.monotonic()))


def _reading(client: clients.Client) -> tuple[int, int, int]:
    return client.sent, client.acked, client.received


def _errors(conns: list[clients.Client], extra: list[str]) -> tuple[str, ...]:
    seen = dict.fromkeys([*extra, *(c.error for c in conns if c.error)])
    return tuple(seen)[:MAX_ERRORS_REPORTED]


async def _drain(spec: WorkerSpec, conns: list[clients.Client], go: Go) -> None:
    """After `end`: let in-flight publishes complete, or let deliveries stop arriving."""
    deadline_s = go.end_s + go.drain_s
    last_total = -1
    last_change_s = time.monotonic()
    while time.monotonic() < deadline_s:
        if spec.kind.publishes:
            busy = any(
                c.unflushed_messages() or (isinstance(c, clients.Qos1Publisher) and c.in_flight())
                for c in conns
                if not c.lost
            )
            if not busy:
                return
        else:
            total = sum(c.received for c in conns)
            now_s = time.monotonic()
            if total != last_total:
                last_total, last_change_s = total, now_s
            elif now_s - last_change_s >= go.quiet_s:
                return
        await asyncio.sleep(POLL_S)


async def _tune_receivers(conns: list[clients.Client], until_s: float) -> None:
    counting = [c for c in conns if isinstance(c, clients.CountingSubscriber)]
    while counting and time.monotonic() < until_s:
        now_s = time.monotonic()
        for client in counting:
            client.tune(now_s)
        await asyncio.sleep(TUNE_S)


async def _run_timed(spec: WorkerSpec, conns: list[clients.Client], go: Go) -> WorkerResult:
    await _sleep_until(go.start_s)
    tuner = asyncio.create_task(_tune_receivers(conns, go.end_s))
    for client in conns:
        client.start(go.end_s, spec.max_messages)
    await _sleep_until(go.warm_s)
    before = [_reading(c) for c in conns]
    window_opened_s = time.monotonic()
    for client in conns:
        if isinstance(client, clients.LatencySubscriber):
            client.open_window()
    await _sleep_until(go.end_s)
    after = [_reading(c) for c in conns]
    window_s = time.monotonic() - window_opened_s
    tuner.cancel()
    for client in conns:
        client.stop()
        if isinstance(client, clients.LatencySubscriber):
            client.close_window()
        if isinstance(client, clients.CountingSubscriber):
            client.untune()
    await _drain(spec, conns, go)
    counts = []
    latencies: list[int] = []
    for client, (sent0, _a0, recv0), (sent1, _a1, recv1) in zip(conns, before, after, strict=True):
        sent, acked, received = _reading(client)
        counts.append(
            ConnectionCounts(
                sent=sent - client.unflushed_messages(),
                acked=acked,
                received=received,
                sent_window=sent1 - sent0,
                received_window=recv1 - recv0,
                duplicates=client.duplicates,
                gaps=client.gaps,
            )
        )
        if isinstance(client, clients.LatencySubscriber):
            latencies.extend(client.latencies_ns)
    return WorkerResult(
        name=spec.name,
        pid=os.getpid(),
        window_s=window_s,
        connections=tuple(counts),
        latencies_ns=tuple(latencies),
        connected=len(conns),
        errors=_errors(conns, []),
    )


async def _run_idle(
    spec: WorkerSpec, conns: list[clients.Client], go: Go, tls: ssl.SSLContext | None
) -> WorkerResult:
    await _sleep_until(go.start_s)
    gate = asyncio.Semaphore(spec.connect_concurrency)
    started_s = time.monotonic()
    took_ns: list[int] = []
    outcomes = await asyncio.gather(
        *(_connect(spec, i, "", gate, took_ns, tls) for i in range(spec.idle_connections)),
        return_exceptions=True,
    )
    done_s = time.monotonic()
    failures: list[str] = []
    for outcome in outcomes:
        if isinstance(outcome, clients.Client):
            conns.append(outcome)
        else:
            failures.append(f"connect: {type(outcome).__name__}: {outcome}")
    return WorkerResult(
        name=spec.name,
        pid=os.getpid(),
        window_s=done_s - started_s,
        connections=(),
        latencies_ns=tuple(took_ns),  # per connection: TCP connect + CONNECT/CONNACK
        connected=len(conns),
        connect_failed=len(failures),
        connect_started_s=started_s,
        connect_done_s=done_s,
        errors=_errors(conns, failures),
    )


async def _worker(spec: WorkerSpec, conn: Connection) -> None:
    inbox = _Inbox(conn)
    conns: list[clients.Client] = []
    tls = client_ssl_context(spec.tls_ca_file) if spec.tls_ca_file is not None else None
    try:
        if spec.kind is not RoleKind.IDLE:
            gate = asyncio.Semaphore(spec.connect_concurrency)
            outcomes = await asyncio.gather(
                *(_connect(spec, i, t, gate, tls=tls) for i, t in enumerate(spec.topics)),
                return_exceptions=True,
            )
            conns.extend(c for c in outcomes if isinstance(c, clients.Client))
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        conn.send(Ready(spec.name, os.getpid()))
        go = await inbox.get(READY_TIMEOUT_S)
        if not isinstance(go, Go):
            return
        if spec.kind is RoleKind.IDLE:
            result = await _run_idle(spec, conns, go, tls)
        else:
            result = await _run_timed(spec, conns, go)
        conn.send(result)
        await inbox.get(STOP_TIMEOUT_S)
    finally:
        inbox.close()
        for client in conns:
            client.close()
        await asyncio.sleep(0.05)  # let DISCONNECTs and FINs go out
