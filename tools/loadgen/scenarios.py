"""The benchmark scenarios: which workers each one runs, and what its numbers mean.

Why: `make bench` compares brokers on the same five workloads; their definitions (connection
counts, topics, QoS, payload size) and the formulas that turn counts into metrics live here
and nowhere else, so MeshMQ and mosquitto are measured by the same code.

  fan-in            8 publishers -> 1 subscriber of `bench/in/+`, QoS 0, flooding
  fan-out           1 publisher -> 50 subscribers of `bench/out`, QoS 0, flooding
  qos1-pairs        100 publisher/subscriber pairs, QoS 1 both ways, 10 in flight per publisher
  latency           1 publisher at 1,000 msg/s -> 1 subscriber, QoS 0, time-stamped payloads
  idle-connections  5,000 connections (CONNECT, CONNACK, keepalive 600 s), then idle

Where clients connect: publishers to `Params.pub_port`, subscribers to `Params.sub_port`, each
defaulting to the broker's port given to `run_scenario`. A broker that listens on one port per
worker (MeshMQ's `WorkerPortBase`) thus gets its publishers and subscribers placed on chosen
workers, which is how `tools.bench` measures same-worker against cross-worker delivery.
Idle connections always use the broker's port. With `Params.tls_ca_file` set, every
connection of the scenario is TLS (that port must be the broker's TLS listener), verified
against that CA; the workloads and the metrics do not change.

Must not: start or stop brokers (that is `tools.bench`), or print.

Invariants:
- Rates are counts inside the measured window divided by that window's measured length.
- Loss compares totals after the drain: every message handed to the transport vs every
  delivery counted (times the number of subscribers of the topic).
- "broker CPU µs/msg" divides the broker tree's CPU time over the window by the deliveries
  counted over the same window; a run whose workers failed reports its errors and no metrics.
- `ScenarioResult.broker_cpu_pct_by_pid` splits the same CPU time by process of the broker's
  tree (supervisor, relay, workers), over the same window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tools.loadgen import runner, wire
from tools.loadgen.worker import RoleKind, WorkerResult, WorkerSpec

SCENARIOS = ("fan-in", "fan-out", "qos1-pairs", "latency", "idle-connections")


@dataclass(frozen=True, slots=True)
class Params:
    seconds: float = 5.0
    warmup_s: float = 1.0
    drain_s: float = 5.0
    quiet_s: float = 1.0
    payload_bytes: int = 64
    version: int = wire.MQTT_311
    fan_in_publishers: int = 8
    fan_out_subscribers: int = 50
    qos1_pairs: int = 100
    qos1_window: int = 10
    latency_rate_per_s: float = 1000.0
    idle_connections: int = 5000
    idle_keepalive_s: int = 600
    # Connection attempts in flight per idle worker process. Keep the total (times idle_procs)
    # under the brokers' listen backlog (mosquitto and asyncio both use 100): beyond it SYNs
    # are dropped and retried a second later, which measures the backlog, not the broker.
    idle_concurrency: int = 32
    publisher_procs: int = 1
    subscriber_procs: int = 1
    idle_procs: int = 2
    max_messages: int = 50_000_000  # per publishing connection
    pub_port: int | None = None  # publishers connect here; None: the broker's port
    sub_port: int | None = None  # subscribers connect here; None: the broker's port
    tls_ca_file: str | None = None  # every client over TLS, the broker verified against this CA


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    value: float | None
    unit: str
    better: str = "higher"  # "higher", "lower", or "" for figures that are context only


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    scenario: str
    metrics: tuple[Metric, ...]
    errors: tuple[str, ...]  # run errors (no metrics) and client errors (metrics may be partial)
    notes: tuple[str, ...] = ()  # diagnostics: CPU of each generator process
    broker_cpu_pct_by_pid: tuple[tuple[int, float], ...] = ()  # (pid, % of one core) over the window

    @property
    def ok(self) -> bool:
        return bool(self.metrics) and not self.errors

    def value(self, name: str) -> float | None:
        for metric in self.metrics:
            if metric.name == name:
                return metric.value
        return None


Pairs = tuple[tuple[WorkerSpec, WorkerResult], ...]
Counter = Literal["sent", "acked", "received", "sent_window", "received_window", "duplicates", "gaps"]


def _split(items: Sequence[str], parts: int) -> list[tuple[str, ...]]:
    parts = max(1, min(parts, len(items)))
    return [tuple(items[i::parts]) for i in range(parts)]


def _keepalive_s(params: Params) -> int:
    """Long enough that no PINGREQ is due while a scenario runs (the clients send none)."""
    run_s = params.warmup_s + params.seconds + params.drain_s + params.quiet_s
    return min(65_535, max(60, int(2 * run_s) + 60))


def _specs(
    name: str,
    kind: RoleKind,
    topics: Sequence[str],
    procs: int,
    params: Params,
    host: str,
    port: int,
    qos: int = 0,
) -> list[WorkerSpec]:
    return [
        WorkerSpec(
            name=f"{name}/{kind.value}/{n}",
            kind=kind,
            host=host,
            port=port,
            topics=chunk,
            qos=qos,
            version=params.version,
            payload_bytes=params.payload_bytes,
            window=params.qos1_window,
            rate_per_s=params.latency_rate_per_s,
            keepalive_s=_keepalive_s(params),
            max_messages=params.max_messages,
            tls_ca_file=params.tls_ca_file,
        )
        for n, chunk in enumerate(_split(topics, procs))
    ]


def _rate(pairs: Pairs, field: Counter) -> float:
    total = 0.0
    for _spec, result in pairs:
        if result.window_s > 0:
            total += sum(int(getattr(c, field)) for c in result.connections) / result.window_s
    return total


def _total(pairs: Pairs, field: Counter) -> int:
    return sum(int(getattr(c, field)) for _spec, result in pairs for c in result.connections)


def _pct(part: float, whole: float) -> float | None:
    return 100.0 * part / whole if whole else None


def _cpu_metrics(outcome: runner.RunOutcome, delivered_per_s: float) -> list[Metric]:
    window_s = outcome.window_s or 1.0
    cpu_us_per_msg = None
    if outcome.broker_cpu_s is not None and delivered_per_s > 0:
        cpu_us_per_msg = 1e6 * outcome.broker_cpu_s / (delivered_per_s * window_s)
    broker_pct = None if outcome.broker_cpu_s is None else 100.0 * outcome.broker_cpu_s / window_s
    return [
        Metric("broker CPU µs/msg", cpu_us_per_msg, "µs", "lower"),
        Metric("broker CPU", broker_pct, "%", ""),
        Metric("generator CPU", 100.0 * outcome.generator_cpu_s / window_s, "%", ""),
        Metric("generator busiest proc CPU", 100.0 * outcome.generator_max_proc_cpu_s / window_s, "%", ""),
    ]


def _by_role(outcome: runner.RunOutcome) -> tuple[Pairs, Pairs]:
    pubs = tuple(p for p in outcome.results if p[0].kind.publishes)
    subs = tuple(p for p in outcome.results if p[0].kind.subscribes)
    return pubs, subs


def _flood_metrics(
    outcome: runner.RunOutcome, receivers_per_msg: int, recv_name: str, sent_name: str
) -> list[Metric]:
    pubs, subs = _by_role(outcome)
    received_per_s = _rate(subs, "received_window")
    expected = _total(pubs, "sent") * receivers_per_msg
    received = _total(subs, "received")
    return [
        Metric(recv_name, received_per_s, "msg/s"),
        Metric(sent_name, _rate(pubs, "sent_window"), "msg/s", ""),
        Metric("loss", _pct(max(0, expected - received), expected), "%", "lower"),
        # More deliveries than publishes times subscribers: duplicates, a broker bug.
        Metric("extra deliveries", float(max(0, received - expected)), "msgs", "lower"),
        *_cpu_metrics(outcome, received_per_s),
    ]


def _qos1_metrics(outcome: runner.RunOutcome) -> list[Metric]:
    pubs, subs = _by_role(outcome)
    sent_by_topic = {t: c for spec, r in pubs for t, c in zip(spec.topics, r.connections, strict=True)}
    lost = 0
    exact = 0
    for spec, result in subs:
        for topic, counts in zip(spec.topics, result.connections, strict=True):
            sent = sent_by_topic[topic].sent if topic in sent_by_topic else 0
            unique = counts.received - counts.duplicates
            lost += max(0, sent - unique)
            exact += int(unique == sent and counts.duplicates == 0 and counts.gaps == 0)
    received_per_s = _rate(subs, "received_window")
    return [
        Metric("msgs/s end to end", received_per_s, "msg/s"),
        Metric("acked msgs/s", _rate(pubs, "sent_window"), "msg/s", ""),
        Metric("lost msgs", float(lost), "msgs", "lower"),
        Metric("duplicate msgs", float(_total(subs, "duplicates")), "msgs", "lower"),
        Metric("unacked msgs", float(_total(pubs, "sent") - _total(pubs, "acked")), "msgs", "lower"),
        Metric("pairs exact", float(exact), "pairs"),
        *_cpu_metrics(outcome, received_per_s),
    ]


def _percentile_ms(ordered: Sequence[int], q: float) -> float | None:
    if not ordered:
        return None
    rank = max(0, math.ceil(q * len(ordered)) - 1)  # nearest-rank percentile
    return ordered[rank] / 1e6


def _latency_metrics(outcome: runner.RunOutcome) -> list[Metric]:
    pubs, subs = _by_role(outcome)
    ordered = sorted(ns for _spec, r in subs for ns in r.latencies_ns)
    expected = _total(pubs, "sent")
    received = _total(subs, "received")
    return [
        Metric("p50", _percentile_ms(ordered, 0.50), "ms", "lower"),
        Metric("p99", _percentile_ms(ordered, 0.99), "ms", "lower"),
        Metric("max", _percentile_ms(ordered, 1.0), "ms", "lower"),
        Metric("samples", float(len(ordered)), "msgs", ""),
        Metric("loss", _pct(max(0, expected - received), expected), "%", "lower"),
        *_cpu_metrics(outcome, _rate(subs, "received_window")),
    ]


def _idle_metrics(outcome: runner.RunOutcome) -> list[Metric]:
    results = [r for _spec, r in outcome.results]
    took_ns = sorted(ns for r in results for ns in r.latencies_ns)
    connected = sum(r.connected for r in results)
    failed = sum(r.connect_failed for r in results)
    span_s = max(r.connect_done_s for r in results) - min(r.connect_started_s for r in results)
    rss_per_conn = None
    if (
        outcome.broker_rss_before_bytes is not None
        and outcome.broker_rss_after_bytes is not None
        and connected
    ):
        rss_per_conn = (outcome.broker_rss_after_bytes - outcome.broker_rss_before_bytes) / connected / 1024
    window_s = outcome.window_s or 1.0
    cpu_us_per_conn = None
    if outcome.broker_cpu_s is not None and connected:
        cpu_us_per_conn = 1e6 * outcome.broker_cpu_s / connected
    return [
        Metric("connects/s", connected / span_s if span_s > 0 else None, "conn/s"),
        Metric("broker RSS per connection", rss_per_conn, "KiB", "lower"),
        Metric("connect p50", _percentile_ms(took_ns, 0.50), "ms", "lower"),
        Metric("connect max", _percentile_ms(took_ns, 1.0), "ms", "lower"),
        Metric("connected", float(connected), "conns"),
        Metric("failed", float(failed), "conns", "lower"),
        Metric("broker CPU µs/connect", cpu_us_per_conn, "µs", "lower"),
        Metric("generator CPU", 100.0 * outcome.generator_cpu_s / window_s, "%", ""),
        Metric("generator busiest proc CPU", 100.0 * outcome.generator_max_proc_cpu_s / window_s, "%", ""),
    ]


def stages_for(scenario: str, host: str, port: int, params: Params) -> list[list[WorkerSpec]]:
    """Worker specs of a scenario, subscribers' stage first."""
    pub_procs, sub_procs = params.publisher_procs, params.subscriber_procs
    pub_port = params.pub_port or port
    sub_port = params.sub_port or port
    if scenario == "fan-in":
        topics = [f"bench/in/{i}" for i in range(params.fan_in_publishers)]
        return [
            _specs(scenario, RoleKind.SUBSCRIBE_COUNT, ["bench/in/+"], 1, params, host, sub_port),
            _specs(scenario, RoleKind.PUBLISH_QOS0, topics, pub_procs, params, host, pub_port),
        ]
    if scenario == "fan-out":
        return [
            _specs(
                scenario,
                RoleKind.SUBSCRIBE_COUNT,
                ["bench/out"] * params.fan_out_subscribers,
                sub_procs,
                params,
                host,
                sub_port,
            ),
            _specs(scenario, RoleKind.PUBLISH_QOS0, ["bench/out"], 1, params, host, pub_port),
        ]
    if scenario == "qos1-pairs":
        topics = [f"bench/q1/{i}" for i in range(params.qos1_pairs)]
        return [
            _specs(scenario, RoleKind.SUBSCRIBE_QOS1, topics, sub_procs, params, host, sub_port, qos=1),
            _specs(scenario, RoleKind.PUBLISH_QOS1, topics, pub_procs, params, host, pub_port, qos=1),
        ]
    if scenario == "latency":
        return [
            _specs(scenario, RoleKind.SUBSCRIBE_LATENCY, ["bench/lat"], 1, params, host, sub_port),
            _specs(scenario, RoleKind.PUBLISH_PACED, ["bench/lat"], 1, params, host, pub_port),
        ]
    if scenario == "idle-connections":
        procs = max(1, params.idle_procs)
        shares = [
            params.idle_connections // procs + (i < params.idle_connections % procs) for i in range(procs)
        ]
        return [
            [
                WorkerSpec(
                    name=f"{scenario}/{n}",
                    kind=RoleKind.IDLE,
                    host=host,
                    port=port,
                    idle_connections=share,
                    version=params.version,
                    keepalive_s=params.idle_keepalive_s,
                    connect_concurrency=params.idle_concurrency,
                    tls_ca_file=params.tls_ca_file,
                )
                for n, share in enumerate(shares)
                if share
            ]
        ]
    raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")


def run_scenario(
    scenario: str, host: str, port: int, params: Params, broker_pid: int | None = None
) -> ScenarioResult:
    """Run one scenario against a broker listening on host:port; `broker_pid` roots its process tree."""
    stages = stages_for(scenario, host, port, params)
    idle = scenario == "idle-connections"
    timing = runner.Timing(
        seconds=0.0 if idle else params.seconds,
        warmup_s=0.0 if idle else params.warmup_s,
        drain_s=params.drain_s,
        quiet_s=params.quiet_s,
    )
    outcome = runner.run(stages, timing, broker_pid)
    if not outcome.ok or not outcome.results:
        return ScenarioResult(scenario, (), outcome.errors or ("no results",))
    if scenario in ("fan-in", "fan-out"):
        fan_out = scenario == "fan-out"
        metrics = _flood_metrics(
            outcome,
            params.fan_out_subscribers if fan_out else 1,
            "deliveries/s" if fan_out else "received msg/s",
            "publishes/s" if fan_out else "sent msg/s",
        )
    elif scenario == "qos1-pairs":
        metrics = _qos1_metrics(outcome)
    elif scenario == "latency":
        metrics = _latency_metrics(outcome)
    else:
        metrics = _idle_metrics(outcome)
    client_errors = tuple(dict.fromkeys(e for _spec, r in outcome.results for e in r.errors))
    window_s = outcome.window_s or 1.0
    notes = tuple(f"{name}: {100 * cpu_s / window_s:.0f}% CPU" for name, cpu_s in outcome.worker_cpu_s)
    by_pid = tuple((pid, 100.0 * cpu_s / window_s) for pid, cpu_s in outcome.broker_proc_cpu_s)
    return ScenarioResult(scenario, tuple(metrics), client_errors, notes, by_pid)
