"""The `cluster` benchmark group: three MeshMQ nodes on loopback, delivery across them.

Why: issue 5 ("Speed") asks what a cluster costs: cross-node throughput, latency at 1,000 msg/s
across nodes (target: p99 under 2 ms) and the CPU of a cross-node delivery against a same-node
one (target: at most 2×). Three nodes (`-cluster`, `Workers: 1`, `Mesh.Plaintext: true`, static
members, one throwaway PostgreSQL database from `durable.database`) run on 127.0.0.2/.3/.4, each
with free MQTT and mesh ports, started once for the group:

  cluster-latency      1 publisher on n1 at 1,000 msg/s -> 1 subscriber on n2 and 1 on n3
                       (p50 / p99 across nodes), plus 1 on n1 as a same-node reference
  cluster-paced-same   4 QoS 0 publishers on n1 at 1,250 msg/s each on `bench/cluster/fan`
                       (64-byte payloads) -> 20 subscribers on n1: 100,000 deliveries/s
  cluster-paced        the same with 10 subscribers on n2 and 10 on n3
  cluster-fanout-same  the 4 publishers flooding -> 20 subscribers on n1
  cluster-fanout       the 4 publishers flooding -> 10 on n2 + 10 on n3: deliveries/s across nodes

"cluster CPU µs/delivery" is the CPU time (user + sys, /proc) of every process of all three nodes
over the measured window, divided by the deliveries counted in it. Every fan-out delivers each
message 20 times, so cross / same compares like with like; it is given for both pairs, since
flooding fills every envelope (64 messages) and hides per-hop costs that a fixed rate shows.
A peer declared SUSPECT or DEAD during a run (all nodes are alive) is counted and warned about. To give the loadgen
runner one root for that whole forest, the nodes are children of one small launcher process
(`python -m tools.loadgen.cluster --launch CONFIG...`, `launch` below) in the launcher's own
process group.

Must not: send traffic anywhere but 127.0.0.0/8; leave a node, the launcher or the database server
running (`Cluster.stop` in `finally`: SIGTERM to the launcher's process group, then SIGKILL to it;
the launcher stops its group by itself when its parent dies or its lifetime bound passes);
signal any other process; run unbounded (every wait has a deadline, every load loop the runner's
time and message bounds); print (the caller renders).

Invariants:
- Every process of the three nodes is in the launcher's process group and under its process tree.
- A run starts only when every node listens and every node's latest `cluster view` is all three.
- Every fan-out run has the same subscriber connections and generator processes, placed apart.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType

import yaml

from tools import procstat
from tools.bench_brokers import RssGuard
from tools.loadgen import durable, runner, wire
from tools.loadgen.scenarios import Metric, ScenarioResult
from tools.loadgen.worker import RoleKind, WorkerResult, WorkerSpec

SCENARIO = "cluster"
TITLE = "cluster: 3 MeshMQ nodes on 127.0.0.2-4 (1 worker each, plaintext mesh, static members, PostgreSQL)"
FANOUT, FANOUT_SAME, LATENCY = "cluster-fanout", "cluster-fanout-same", "cluster-latency"
PACED, PACED_SAME = "cluster-paced", "cluster-paced-same"
# Latency first and floods last: a flood may leave backlogs (or broken streams) behind.
RUN_ORDER = (LATENCY, PACED_SAME, PACED, FANOUT_SAME, FANOUT)
SAME_NODE = frozenset({FANOUT_SAME, PACED_SAME})
RATIO_PAIRS = {"flooding": (FANOUT, FANOUT_SAME), "paced": (PACED, PACED_SAME)}  # (cross, same)
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
FAN_TOPIC = "bench/cluster/fan"
LATENCY_TOPIC = "bench/cluster/lat"
P99_TARGET_MS = 2.0  # issue 5: p99 across nodes at 1,000 msg/s
CPU_RATIO_TARGET = 2.0  # issue 5: a cross-node delivery costs at most 2× a same-node one
CPU_PER_DELIVERY = "cluster CPU µs/delivery"
PEAK_RSS = "cluster peak RSS"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
SETTLE_S = 1.0  # between runs: what one run left in flight is gone before the next
IDLE_SAMPLE_S = 2.0  # the cluster's own CPU with no client at all, before the first run
LAUNCHER_MAX_LIFE_S = 3600.0
POLL_S = 0.05
START_ATTEMPTS = 3
GENERATOR_SATURATED_PCT = 90.0
REPO = Path(__file__).resolve().parents[2]
VIEW_LINE = re.compile(r"cluster view: alive=\[([^\]]*)\]")
ROLE_LINE = re.compile(r"\b(relay|worker \d+|store) started \(pid (\d+)\)")
LAUNCH_LINE = re.compile(r"^node (\S+) pid (\d+)$", re.MULTILINE)
MEMBERSHIP_LINE = re.compile(r"node (\S+) is (SUSPECT|DEAD)\b")
MEMBERSHIP_EVENT = re.compile(r"^\S+ saw \S+ (SUSPECT|DEAD)$")  # as `membership_events` writes them
FLAPS = "peer SUSPECT/DEAD events"  # a live node declared SUSPECT or DEAD by another during a run


@dataclass(frozen=True, slots=True)
class ClusterParams:
    seconds: float = 5.0
    warmup_s: float = 1.0
    drain_s: float = 5.0
    quiet_s: float = 1.0
    version: int = wire.MQTT_311
    payload_bytes: int = 64
    publishers: int = 4
    subscribers_per_node: int = 10  # cross-node: on n2 and on n3; same-node: twice this on n1
    latency_rate_per_s: float = 1000.0
    paced_rate_per_s: float = 1250.0  # per publisher of the paced fan-outs: 5,000 msg/s, 100,000 deliveries/s
    max_messages: int = 50_000_000  # per publishing connection
    max_rss_mib: int = 4096  # all three nodes together; past it they are killed


@dataclass(frozen=True, slots=True)
class NodeAddress:
    name: str  # n1, n2, n3 (NodeName)
    host: str
    port: int  # MQTT
    mesh_port: int


@dataclass(frozen=True, slots=True)
class ClusterRun:
    scenario: str
    placement: str  # which clients run on which node
    result: ScenarioResult
    cpu_by_process: tuple[tuple[str, float], ...] = ()  # ("n1 worker 1", % of one core), busiest first


@dataclass(frozen=True, slots=True)
class ClusterResult:
    runs: tuple[ClusterRun, ...]
    errors: tuple[str, ...] = ()  # the cluster could not start, or died
    nodes: tuple[NodeAddress, ...] = ()
    idle_cpu_pct: float | None = None  # all three nodes, no clients: heartbeats and timers

    def run(self, scenario: str) -> ClusterRun | None:
        return next((r for r in self.runs if r.scenario == scenario), None)

    def value(self, scenario: str, metric: str) -> float | None:
        run = self.run(scenario)
        return None if run is None else run.result.value(metric)

    def cpu_ratio(self, pair: str = "flooding") -> float | None:
        """Cluster CPU µs per delivery of a cross-node fan-out over that of its same-node twin."""
        cross_run, same_run = RATIO_PAIRS[pair]
        same, cross = self.value(same_run, CPU_PER_DELIVERY), self.value(cross_run, CPU_PER_DELIVERY)
        return cross / same if same and cross is not None else None

    def p99_ms(self) -> float | None:
        return self.value(LATENCY, "p99")

    @property
    def failed(self) -> bool:
        """An error, a run without figures, or one whose headline (first metric) is zero."""
        return bool(self.errors) or any(
            not r.result.metrics or r.result.errors or not r.result.metrics[0].value for r in self.runs
        )


# --- the nodes ------------------------------------------------------------------------------------


def meshmq_command() -> list[str]:
    exe = Path(sys.executable).with_name("meshmq")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "broker.cli"]


def free_addresses(hosts: Sequence[str] = HOSTS) -> tuple[NodeAddress, ...]:
    """Node n<i> on hosts[i-1], with an MQTT and a mesh port the kernel says are free there."""
    with contextlib.ExitStack() as stack:  # held together, so no two ports are the same
        ports = []
        for host in hosts:
            for _ in range(2):
                sock = stack.enter_context(socket.socket())
                sock.bind((host, 0))
                ports.append(int(sock.getsockname()[1]))
    return tuple(
        NodeAddress(f"n{i + 1}", host, ports[2 * i], ports[2 * i + 1]) for i, host in enumerate(hosts)
    )


def node_config(
    node: NodeAddress, nodes: Sequence[NodeAddress], db_url: str, ipc_dir: Path, cluster_name: str
) -> dict[str, object]:
    """The YAML configuration of one node (the keys of `etc/meshmq.yaml`)."""
    return {
        "NodeName": node.name,
        "ListenAddress": node.host,
        "TCP": node.port,
        "Workers": 1,
        "SessionStore": {"Type": "POSTGRES", "Postgres": {"Url": db_url}},
        "Mesh": {
            "IpcDir": str(ipc_dir),
            "ClusterName": cluster_name,
            "Port": node.mesh_port,
            "BindAddress": node.host,
            "Plaintext": True,
            "TcpIp": {"Members": [f"{n.host}:{n.mesh_port}" for n in nodes]},
        },
    }


def latest_view(log_text: str) -> frozenset[str] | None:
    """The node names of the last `cluster view: alive=[...]` line, None before the first."""
    views = VIEW_LINE.findall(log_text)
    if not views:
        return None
    return frozenset(n.strip() for n in views[-1].split(",") if n.strip())


def membership_events(node: str, log_text: str) -> list[str]:
    """'n2 saw n1 DEAD' for each SUSPECT or DEAD line of `node`'s log text."""
    return [f"{node} saw {peer} {state}" for peer, state in MEMBERSHIP_LINE.findall(log_text)]


def process_names(launcher_log: str, node_logs: dict[str, str]) -> dict[int, str]:
    """PID -> 'n1 supervisor', 'n2 relay', 'n3 worker 1', ... from the launcher's and nodes' logs."""
    names = {int(pid): f"{name} supervisor" for name, pid in LAUNCH_LINE.findall(launcher_log)}
    for name, text in node_logs.items():
        names.update({int(pid): f"{name} {role}" for role, pid in ROLE_LINE.findall(text)})
    return names


class Cluster:
    """Three nodes under one launcher process; see the module docstring."""

    def __init__(self, workdir: Path, db_url: str) -> None:
        self.workdir = workdir
        self.db_url = db_url
        self.cluster_name = f"bench-{uuid.uuid4().hex[:12]}"
        self.nodes = free_addresses()
        self.proc: subprocess.Popen[bytes] | None = None
        self.names: dict[int, str] = {}

    @property
    def launcher_log(self) -> Path:
        return self.workdir / "launcher.log"

    def node_log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"  # the launcher names it after the configuration

    def node(self, name: str) -> NodeAddress:
        return next(n for n in self.nodes if n.name == name)

    def _write_configs(self) -> list[Path]:
        paths = []
        for node in self.nodes:
            ipc_dir = self.workdir / node.name / "ipc"
            config = node_config(node, self.nodes, self.db_url, ipc_dir, self.cluster_name)
            path = self.workdir / f"{node.name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            paths.append(path)
        return paths

    def start(self) -> None:
        """Start the launcher and wait until the nodes form the cluster; RuntimeError if not."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_once()
                return
            except RuntimeError:
                taken = "Address already in use" in self.logs_tail(40)
                self.stop()
                if not taken or attempt == START_ATTEMPTS:
                    raise
                self.nodes = free_addresses()  # a port was taken meanwhile: new ones, once more

    def _start_once(self) -> None:
        configs = self._write_configs()
        with open(self.launcher_log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools.loadgen.cluster", "--launch", *map(str, configs)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its group holds every node process: stop() ends them all
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        for node in self.nodes:
            while not self._accepts(node):
                self._check(deadline, f"{node.name} is not listening on {node.host}:{node.port}")
                time.sleep(POLL_S)
        want = frozenset(n.name for n in self.nodes)
        while not all(latest_view(self._read(self.node_log(n.name))) == want for n in self.nodes):
            self._check(deadline, f"the nodes do not all see {sorted(want)}")
            time.sleep(POLL_S)
        self.process_names()

    def _accepts(self, node: NodeAddress) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((node.host, node.port), timeout=0.2):
            return True
        return False

    def _check(self, deadline: float, waiting_for: str) -> None:
        if not self.alive():
            raise RuntimeError(f"a node exited while starting: {self.logs_tail()}")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"after {READY_TIMEOUT_S:.0f} s {waiting_for}: {self.logs_tail()}")

    @staticmethod
    def _read(path: Path) -> str:
        return path.read_text(errors="replace") if path.exists() else ""

    def process_names(self) -> dict[int, str]:
        """PID -> role ('n2 relay'), remembered so that the names outlive the logs."""
        logs = {n.name: self._read(self.node_log(n.name)) for n in self.nodes}
        self.names.update(process_names(self._read(self.launcher_log), logs))
        return dict(self.names)

    def log_sizes(self) -> dict[str, int]:
        """Each node's log length in bytes: where `membership_events_since` starts reading."""
        return {n.name: len(self._read(self.node_log(n.name)).encode()) for n in self.nodes}

    def membership_events_since(self, sizes: dict[str, int]) -> list[str]:
        events = []
        for node in self.nodes:
            with contextlib.suppress(FileNotFoundError), open(self.node_log(node.name), "rb") as f:
                f.seek(sizes.get(node.name, 0))
                events += membership_events(node.name, f.read().decode(errors="replace"))
        return events

    def supervisor_pids(self) -> list[int]:
        return [int(pid) for _name, pid in LAUNCH_LINE.findall(self._read(self.launcher_log))]

    def alive(self) -> bool:
        """The launcher runs, and so does every node it started (its children)."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        pids = self.supervisor_pids()
        if len(pids) < len(self.nodes):
            return True  # still launching
        stats = [procstat.read_proc(pid) for pid in pids]
        return all(s is not None and s.ppid == self.proc.pid for s in stats)

    def idle_cpu_pct(self, span_s: float) -> float | None:
        """CPU of every node process over `span_s` of no traffic, in % of one core."""
        if self.proc is None:
            return None
        before, at = procstat.sample_tree(self.proc.pid), time.monotonic()
        time.sleep(span_s)
        after = procstat.sample_tree(self.proc.pid)
        return 100.0 * procstat.cpu_s_between(before, after) / (time.monotonic() - at)

    def logs_tail(self, lines: int = 6) -> str:
        parts = []
        for path in (self.launcher_log, *(self.node_log(n.name) for n in self.nodes)):
            tail = self._read(path).strip().splitlines()[-lines:]
            if tail:
                parts.append(f"[{path.stem}] " + " | ".join(tail))
        return " || ".join(parts)

    def stop(self) -> None:
        """SIGTERM to the launcher's group (every node drains), wait, then SIGKILL to the group."""
        if self.proc is None:
            return
        self.process_names()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever lingers, the launcher included
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def launch(configs: Sequence[Path], max_life_s: float = LAUNCHER_MAX_LIFE_S) -> int:
    """The launcher process: one node per configuration, as children in this process group.

    Prints `node NAME pid PID` per node and returns once every node has exited. SIGTERM (to the
    group) only makes it wait for the nodes; if its parent dies or `max_life_s` passes, it stops
    the group itself (SIGTERM, then SIGKILL after STOP_TIMEOUT_S)."""
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # lead a group of our own, so killpg(0) reaches only what we start
    stop_at: list[float] = []  # when stopping began

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        stop_at.append(time.monotonic())

    signal.signal(signal.SIGTERM, on_term)
    parent = os.getppid()
    procs = []
    for config in configs:
        with open(config.with_suffix(".log"), "ab") as log:
            proc = subprocess.Popen(
                [*meshmq_command(), "-cluster", "-config", str(config)],
                cwd=config.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        print(f"node {config.stem} pid {proc.pid}", flush=True)
    deadline = time.monotonic() + max_life_s
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if not stop_at and (os.getppid() != parent or now >= deadline):
            print("parent gone or lifetime over: stopping the nodes", flush=True)
            os.killpg(0, signal.SIGTERM)  # our handler records it
        if stop_at and now >= stop_at[0] + STOP_TIMEOUT_S:
            os.killpg(0, signal.SIGKILL)  # this process too
        time.sleep(POLL_S)
    return 0


# --- the runs -------------------------------------------------------------------------------------


def _keepalive_s(params: ClusterParams) -> int:
    """Long enough that no PINGREQ is due while a run lasts (the clients send none)."""
    return min(65_535, int(2 * (params.warmup_s + params.seconds + params.drain_s + params.quiet_s)) + 60)


def _spec(
    scenario: str,
    kind: RoleKind,
    node: NodeAddress,
    topics: Sequence[str],
    params: ClusterParams,
    n: int = 0,
    rate_per_s: float | None = None,
) -> WorkerSpec:
    return WorkerSpec(
        name=f"{scenario}/{kind.value}/{node.name}/{n}",
        kind=kind,
        host=node.host,
        port=node.port,
        topics=tuple(topics),
        version=params.version,
        payload_bytes=params.payload_bytes,
        rate_per_s=params.latency_rate_per_s if rate_per_s is None else rate_per_s,
        keepalive_s=_keepalive_s(params),
        max_messages=params.max_messages,
    )


def fanout_stages(
    nodes: Sequence[NodeAddress], scenario: str, params: ClusterParams
) -> list[list[WorkerSpec]]:
    """Subscribers (one generator process per 10) then publishers on n1, flooding or paced.

    Same-node puts both subscriber processes on n1, cross-node one on n2 and one on n3: the same
    connections, generator processes and deliveries per message either way."""
    same_node = scenario in SAME_NODE
    homes = (nodes[0], nodes[0]) if same_node else (nodes[1], nodes[2])
    subs = [
        _spec(scenario, RoleKind.SUBSCRIBE_COUNT, home, [FAN_TOPIC] * params.subscribers_per_node, params, n)
        for n, home in enumerate(homes)
    ]
    kind = RoleKind.PUBLISH_PACED if scenario in (PACED, PACED_SAME) else RoleKind.PUBLISH_QOS0
    topics = [FAN_TOPIC] * params.publishers
    pubs = [_spec(scenario, kind, nodes[0], topics, params, rate_per_s=params.paced_rate_per_s)]
    return [subs, pubs]


def latency_stages(nodes: Sequence[NodeAddress], params: ClusterParams) -> list[list[WorkerSpec]]:
    """A timing subscriber on n2, on n3 and (the same-node reference) on n1; a paced publisher on n1."""
    subs = [_spec(LATENCY, RoleKind.SUBSCRIBE_LATENCY, node, [LATENCY_TOPIC], params) for node in nodes]
    return [subs, [_spec(LATENCY, RoleKind.PUBLISH_PACED, nodes[0], [LATENCY_TOPIC], params)]]


def placement(stages: Sequence[Sequence[WorkerSpec]]) -> str:
    """'4 pub n1 -> 10 sub n2, 10 sub n3' (connections per node)."""

    def side(specs: list[WorkerSpec]) -> str:
        per_node: dict[str, int] = {}
        for spec in specs:
            node = spec.name.split("/")[2]
            per_node[node] = per_node.get(node, 0) + len(spec.topics)
        role = "pub" if specs[0].kind.publishes else "sub"
        return ", ".join(f"{count} {role} {node}" for node, count in per_node.items())

    specs = [s for stage in stages for s in stage]
    pubs, subs = [s for s in specs if s.kind.publishes], [s for s in specs if s.kind.subscribes]
    return f"{side(pubs)} -> {side(subs)}"


def _percentile_ms(ordered: Sequence[int], q: float) -> float | None:
    """Nearest-rank percentile of nanosecond samples, in milliseconds."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] / 1e6


def _pct(part: float, whole: float) -> float | None:
    return 100.0 * part / whole if whole else None


def _node_of(spec: WorkerSpec) -> str:
    return spec.name.split("/")[2]


def outcome_metrics(scenario: str, outcome: runner.RunOutcome) -> list[Metric]:
    """The figures of one run, headline first."""
    pubs = [(s, r) for s, r in outcome.results if s.kind.publishes]
    subs = [(s, r) for s, r in outcome.results if s.kind.subscribes]
    window_s = outcome.window_s or 1.0

    def rate(pairs: list[tuple[WorkerSpec, WorkerResult]], sent: bool) -> float:
        return sum(
            sum(c.sent_window if sent else c.received_window for c in r.connections) / r.window_s
            for _s, r in pairs
            if r.window_s > 0
        )

    sent = sum(c.sent for _s, r in pubs for c in r.connections)
    received = sum(c.received for _s, r in subs for c in r.connections)
    expected = sent * sum(len(s.topics) for s, _r in subs)
    delivered_per_s = rate(subs, sent=False)
    cpu_us = None
    if outcome.broker_cpu_s is not None and delivered_per_s > 0:
        cpu_us = 1e6 * outcome.broker_cpu_s / (delivered_per_s * window_s)
    metrics = []
    if scenario == LATENCY:
        by_node = {_node_of(s): sorted(r.latencies_ns) for s, r in subs}
        cross = sorted(ns for node, samples in by_node.items() if node != "n1" for ns in samples)
        metrics += [
            Metric("p50", _percentile_ms(cross, 0.5), "ms", "lower"),
            Metric("p99", _percentile_ms(cross, 0.99), "ms", "lower"),
            Metric("max", _percentile_ms(cross, 1.0), "ms", "lower"),
            *(
                Metric(f"p99 {node}", _percentile_ms(by_node[node], 0.99), "ms", "lower")
                for node in sorted(by_node)
                if node != "n1"
            ),
            Metric("p50 same-node n1", _percentile_ms(by_node.get("n1", []), 0.5), "ms", ""),
            Metric("p99 same-node n1", _percentile_ms(by_node.get("n1", []), 0.99), "ms", ""),
            Metric("samples", float(len(cross)), "msgs", ""),
            Metric("publishes/s", rate(pubs, sent=True), "msg/s", ""),
        ]
    else:
        metrics += [
            Metric("deliveries/s", delivered_per_s, "msg/s"),
            Metric("publishes/s", rate(pubs, sent=True), "msg/s", ""),
        ]
    cluster_pct = None if outcome.broker_cpu_s is None else 100.0 * outcome.broker_cpu_s / window_s
    return [
        *metrics,
        Metric("loss", _pct(max(0, expected - received), expected), "%", "lower"),
        Metric("extra deliveries", float(max(0, received - expected)), "msgs", "lower"),
        Metric(CPU_PER_DELIVERY, cpu_us, "µs", "lower"),
        Metric("cluster CPU", cluster_pct, "%", ""),
        Metric("generator CPU", 100.0 * outcome.generator_cpu_s / window_s, "%", ""),
        Metric("generator busiest proc CPU", 100.0 * outcome.generator_max_proc_cpu_s / window_s, "%", ""),
    ]


def _run_one(
    cluster: Cluster, scenario: str, stages: list[list[WorkerSpec]], params: ClusterParams
) -> ClusterRun:
    """One run against the started cluster; never raises."""
    where = placement(stages)
    assert cluster.proc is not None
    if not cluster.alive():
        error = f"the cluster is not running: {cluster.logs_tail()}"
        return ClusterRun(scenario, where, ScenarioResult(scenario, (), (error,)))
    timing = runner.Timing(params.seconds, params.warmup_s, params.drain_s, params.quiet_s)
    log_sizes = cluster.log_sizes()
    with RssGuard(cluster.proc.pid, params.max_rss_mib << 20) as guard:
        try:
            outcome = runner.run(stages, timing, cluster.proc.pid)
        except Exception as exc:  # one failed run must not end the group
            outcome = runner.RunOutcome((), (f"{type(exc).__name__}: {exc}",), 0.0, None, None, None, 0, 0)
    errors = list(outcome.errors) + [e for _s, r in outcome.results for e in r.errors]
    if guard.killed_at_bytes is not None:
        errors.append(f"cluster killed: its RSS reached {guard.killed_at_bytes / 2**20:.0f} MiB")
    elif not cluster.alive():
        errors.append(f"a node exited during the run: {cluster.logs_tail()}")
    if not outcome.ok or not outcome.results:
        return ClusterRun(scenario, where, ScenarioResult(scenario, (), tuple(dict.fromkeys(errors))))
    flaps = cluster.membership_events_since(log_sizes)
    metrics = (
        *outcome_metrics(scenario, outcome),
        Metric(PEAK_RSS, guard.peak_bytes / 2**20, "MiB", ""),
        Metric(FLAPS, float(len(flaps)), "events", "lower"),
    )
    window_s = outcome.window_s or 1.0
    by_pid = tuple((pid, 100.0 * cpu_s / window_s) for pid, cpu_s in outcome.broker_proc_cpu_s)
    notes = (
        *(f"{name}: {100 * cpu_s / window_s:.0f}% CPU" for name, cpu_s in outcome.worker_cpu_s),
        *flaps,
    )
    names = cluster.process_names()
    shares = sorted(((names.get(pid, f"pid {pid}"), pct) for pid, pct in by_pid), key=lambda s: -s[1])
    result = ScenarioResult(scenario, metrics, tuple(dict.fromkeys(errors)), notes, by_pid)
    return ClusterRun(scenario, where, result, tuple(s for s in shares if s[1] >= 0.5))


def run_cluster(params: ClusterParams, scenarios: Sequence[str] = RUN_ORDER) -> ClusterResult:
    """Start the database and the three nodes, run the scenarios in order, stop both; never raises."""
    runs: list[ClusterRun] = []
    cluster: Cluster | None = None
    idle_pct = None
    with tempfile.TemporaryDirectory(prefix="meshmq-cluster-") as tmp:
        try:
            with durable.database("postgres", Path(tmp)) as db:
                assert db.url is not None
                cluster = Cluster(Path(tmp), db.url)
                try:
                    cluster.start()
                    idle_pct = cluster.idle_cpu_pct(IDLE_SAMPLE_S)
                    for n, scenario in enumerate(s for s in RUN_ORDER if s in scenarios):
                        if n:
                            time.sleep(SETTLE_S)
                        stages = (
                            latency_stages(cluster.nodes, params)
                            if scenario == LATENCY
                            else fanout_stages(cluster.nodes, scenario, params)
                        )
                        runs.append(_run_one(cluster, scenario, stages, params))
                finally:
                    cluster.stop()
            return ClusterResult(tuple(runs), (), cluster.nodes, idle_pct)
        except Exception as exc:  # a cluster or database that fails must not end the bench
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            error = f"{type(exc).__name__}: {exc} (in {frame.name}, line {frame.lineno})"
            return ClusterResult(tuple(runs), (error,), cluster.nodes if cluster else (), idle_pct)


# --- report ---------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def verdicts(result: ClusterResult) -> list[str]:
    """The two targets of issue 5, each with its figure and 'met' or 'MISSED'."""
    p99 = result.p99_ms()
    lines = []
    if result.run(LATENCY) is not None:
        state = "-" if p99 is None else "met" if p99 < P99_TARGET_MS else "MISSED"
        lines.append(
            f"p99 across nodes at 1,000 msg/s: {_fmt(p99)} ms (target < {P99_TARGET_MS:g} ms: {state})"
        )
    for pair, (cross, same) in RATIO_PAIRS.items():
        if result.run(cross) is None or result.run(same) is None:
            continue
        ratio = result.cpu_ratio(pair)
        state = "-" if ratio is None else "met" if ratio <= CPU_RATIO_TARGET else "MISSED"
        lines.append(
            f"cluster CPU per delivery, cross-node / same-node, {pair} ({cross} / {same}): {_fmt(ratio)}"
            f" (target <= {CPU_RATIO_TARGET:g}: {state})"
        )
    return lines


def render(result: ClusterResult) -> str:
    """One row per metric of each run, then the targets, the CPU by process and the problems."""
    rows = [["scenario", "clients", "metric", "value"]]
    for run in result.runs:
        shown = [run.scenario, run.placement]
        if not run.result.metrics:
            rows.append([*shown, "FAILED", ""])
        for metric in run.result.metrics:
            unit = f" ({metric.unit})" if metric.unit and metric.unit not in metric.name else ""
            rows.append([*shown, metric.name + unit, _fmt(metric.value)])
            shown = ["", ""]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", *verdicts(result)]
    if result.idle_cpu_pct is not None:
        lines.append(
            f"idle cluster CPU (no clients, over {IDLE_SAMPLE_S:g} s): {_fmt(result.idle_cpu_pct)} %"
        )
    for run in result.runs:
        if run.cpu_by_process:
            shares = ", ".join(f"{name} {pct:.0f}%" for name, pct in run.cpu_by_process)
            lines.append(f"{run.scenario} CPU by process: {shares}")
    problems = [f"cluster: {e}" for e in result.errors]
    for run in result.runs:
        problems += [f"{run.scenario}: {e}" for e in run.result.errors]
        if run.result.metrics and not run.result.metrics[0].value:
            problems.append(f"{run.scenario}: nothing measured in the window (stalled)")
        flaps = [n for n in run.result.notes if MEMBERSHIP_EVENT.match(n)]
        if flaps:
            listed = ", ".join(flaps[:4]) + (", ..." if len(flaps) > 4 else "")
            problems.append(
                f"{run.scenario}: warning: {len(flaps)} peer SUSPECT/DEAD event(s) among live nodes ({listed})"
            )
        busiest = run.result.value("generator busiest proc CPU")
        if busiest is not None and busiest >= GENERATOR_SATURATED_PCT:
            problems.append(
                f"{run.scenario}: warning: a generator process used {busiest:.0f}% CPU;"
                " the figures may measure the generator, not the cluster"
            )
    if problems:
        lines += ["problems:", *(f"  {p}" for p in problems)]
    return "\n".join(lines)


def as_json(result: ClusterResult) -> dict[str, object]:
    """The group for `bench-results/*.json`."""
    return {
        "nodes": [asdict(n) for n in result.nodes],
        "targets": {"p99_ms_below": P99_TARGET_MS, "cpu_ratio_at_most": CPU_RATIO_TARGET},
        "idle_cpu_pct": result.idle_cpu_pct,
        "p99_ms_across_nodes": result.p99_ms(),
        "cpu_us_per_delivery_ratio_cross_to_same": {pair: result.cpu_ratio(pair) for pair in RATIO_PAIRS},
        "runs": [
            {
                "scenario": r.scenario,
                "placement": r.placement,
                "ok": r.result.ok,
                "metrics": [asdict(m) for m in r.result.metrics],
                "errors": list(r.result.errors),
                "notes": list(r.result.notes),
                "cpu_pct_by_process": {name: round(pct, 1) for name, pct in r.cpu_by_process},
            }
            for r in result.runs
        ],
        "errors": list(result.errors),
    }


# --- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    defaults = ClusterParams()
    parser = argparse.ArgumentParser(
        prog="python -m tools.loadgen.cluster", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--launch", nargs="+", type=Path, help="(internal) be the launcher of these nodes")
    parser.add_argument("--scenarios", default=",".join(RUN_ORDER), help=f"of {', '.join(RUN_ORDER)}")
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--warmup", type=float, default=defaults.warmup_s)
    parser.add_argument(
        "--mqtt-version", type=int, choices=(wire.MQTT_311, wire.MQTT_5), default=wire.MQTT_311
    )
    args = parser.parse_args(argv)
    if args.launch:
        return launch(args.launch)
    # SIGTERM must still run the `finally`s that stop the nodes and the database server.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if unknown := [s for s in chosen if s not in RUN_ORDER]:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(RUN_ORDER)}")
    params = replace(defaults, seconds=args.seconds, warmup_s=args.warmup, version=args.mqtt_version)
    result = run_cluster(params, chosen)
    print(render(result))
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
