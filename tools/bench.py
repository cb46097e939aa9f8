"""`make bench`: MeshMQ against mosquitto, same scenarios, same machine, same run.

Why: a throughput or latency figure means little alone; next to mosquitto's, measured minutes
apart by the same generator on the same cores, it says where MeshMQ stands. This module starts
the brokers on free loopback ports, runs every scenario of `tools.loadgen` against each broker
in turn (scenario by scenario, so slow drifts of the machine's load hit both alike), stops
them, prints one table and writes the figures to `bench-results/<date>.json`.

Cross-worker scenarios (issue 3): a MeshMQ node of two workers with `WorkerPortBase` set
listens on one extra port per worker, so the generator can put its clients on chosen workers.
`fan-in-same` / `fan-out-same` put publishers and subscribers on worker 1; `fan-in-cross` /
`fan-out-cross` put the publishers on worker 1 and the subscribers on worker 2, so that every
delivery crosses the node's ZeroMQ mesh. The table compares broker CPU µs per delivered
message (the whole process tree: supervisor, relay, workers) of cross against same; issue 3's
target is a ratio of at most 1.5.

Must not: send traffic anywhere but 127.0.0.1, leave a broker running, or stop a process it
did not start (brokers are stopped through the process group of the PID it spawned). A broker
that fails to start, dies, or fails a scenario is reported in the table and the JSON; the run
goes on with the others.

Invariants:
- MeshMQ runs several times in one bench run with different command-line arguments (by default
  `-workers 1` and `-workers 2`, `--meshmq-variants "w1:-workers 1;w2:-workers 2"`); each
  variant is its own column, with its ratio to Mosquitto.
- `idle-connections` runs first against a fresh broker: later scenarios would leave freed
  memory behind that new connections reuse, hiding their cost from the RSS delta.
- A broker whose process tree grows past `--max-broker-rss-mib` during a scenario is killed
  (SIGKILL to its process group) and the scenario reported as failed: a runaway queue in the
  broker must not take the machine down with it.
- Each cross-worker scenario runs against a fresh node (started for it, stopped after it), so
  a backlog one scenario leaves in the node cannot slow the next; the main brokers are stopped
  before these start, so they compete for no core.

The broker processes themselves (ports, command lines, process groups, the RSS guard) are
`tools/bench_brokers.py`'s; the names tests and callers know are re-exported from here.
The `cluster` group (issue 5: three nodes on 127.0.0.2-4 and their own database) is
`tools/loadgen/cluster.py`'s; this module only selects, prints and files it. So is the `tls`
group (issue 7: fan-in and latency over plain TCP and over TLS against MeshMQ and Mosquitto,
each with a TLS listener, and the TLS cost per message), `tools/loadgen/tls.py`'s; its window is
`--tls-seconds` (shorter than `--seconds` by default, to keep its eight runs near a minute).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# The broker processes are bench_brokers'; `tools.bench.<name>` keeps working for each of them.
from tools.bench_brokers import HOST as HOST
from tools.bench_brokers import LISTEN_TIMEOUT_S as LISTEN_TIMEOUT_S
from tools.bench_brokers import MAX_WORKER_PORT as MAX_WORKER_PORT
from tools.bench_brokers import MOSQUITTO as MOSQUITTO
from tools.bench_brokers import RSS_POLL_S as RSS_POLL_S
from tools.bench_brokers import STOP_TIMEOUT_S as STOP_TIMEOUT_S
from tools.bench_brokers import Broker as Broker
from tools.bench_brokers import BrokerSpec as BrokerSpec
from tools.bench_brokers import RssGuard as RssGuard
from tools.bench_brokers import free_port as free_port
from tools.bench_brokers import free_port_base as free_port_base
from tools.bench_brokers import port_free as port_free
from tools.bench_brokers import wait_listening as wait_listening
from tools.loadgen import cluster, durable, tls, wire
from tools.loadgen.scenarios import SCENARIOS, Metric, Params, ScenarioResult, run_scenario
from tools.loadgen.worker import raise_nofile_limit

REPO = Path(__file__).resolve().parents[1]
GENERATOR_SATURATED_PCT = 90.0
DEFAULT_MAX_BROKER_RSS_MIB = 4096  # the machine is shared: a broker that bloats past this is killed
BLOATED_RSS_MIB = 1024  # a peak above this is worth a warning
PEAK_RSS = "broker peak RSS"  # sampled every RSS_POLL_S over the whole scenario, not only the window
RUN_ORDER = ("idle-connections", "fan-in", "fan-out", "qos1-pairs", "latency")
DEFAULT_VARIANTS = "w1:-workers 1;w2:-workers 2"
CROSS_ARGS = "-workers 2"
CROSS_TARGET_RATIO = 1.5  # issue 3: cross-worker CPU per message at most 1.5x same-worker's


@dataclass(frozen=True, slots=True)
class CrossScenario:
    """A loadgen scenario with its publishers and subscribers on given workers (1-based)."""

    name: str
    base: str  # the tools.loadgen scenario it runs
    pub_worker: int
    sub_worker: int


CROSS_SCENARIOS = (
    CrossScenario("fan-in-same", "fan-in", 1, 1),
    CrossScenario("fan-in-cross", "fan-in", 1, 2),
    CrossScenario("fan-out-same", "fan-out", 1, 1),
    CrossScenario("fan-out-cross", "fan-out", 1, 2),
)
CROSS_BY_NAME = {c.name: c for c in CROSS_SCENARIOS}
# durable: its own node and database; cluster: its own three nodes and database; tls: its own
# MeshMQ and Mosquitto, each with a TLS listener
ALL_SCENARIOS = (*SCENARIOS, *CROSS_BY_NAME, tls.SCENARIO, durable.SCENARIO, cluster.SCENARIO)


def parse_variants(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """'w1:-workers 1;w2:-workers 2' -> [('w1', ('-workers', '1')), ('w2', ('-workers', '2'))]."""
    variants = []
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, args = part.partition(":")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"variant {part!r} is not NAME:ARGS")
        variants.append((name.strip(), tuple(shlex.split(args))))
    if not variants:
        raise argparse.ArgumentTypeError("no variants given")
    return variants


def _scenario_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_SCENARIOS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {bad}; known: {', '.join(ALL_SCENARIOS)}")
    return names


def _broker_list(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ("meshmq", "mosquitto")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown broker(s) {bad}; known: meshmq, mosquitto")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", type=_broker_list, default=["meshmq", "mosquitto"])
    parser.add_argument(
        "--scenarios",
        type=_scenario_list,
        default=list(ALL_SCENARIOS),
        help=f"comma-separated, default all: {', '.join(ALL_SCENARIOS)}",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window per scenario")
    parser.add_argument("--warmup", type=float, default=1.0, help="traffic before each window (s)")
    parser.add_argument(
        "--meshmq-args",
        default=None,
        help='one MeshMQ column with these arguments instead of the variants, e.g. --meshmq-args="-workers 2"',
    )
    parser.add_argument(
        "--meshmq-variants",
        type=parse_variants,
        default=None,
        help=f'NAME:ARGS;... one column each (default "{DEFAULT_VARIANTS}")',
    )
    parser.add_argument(
        "--cross-args",
        default=CROSS_ARGS,
        help=f"MeshMQ arguments of the cross-worker node (default {CROSS_ARGS!r}; needs 2 workers or more)",
    )
    parser.add_argument(
        "--tls-seconds",
        type=float,
        default=tls.DEFAULT_SECONDS,
        help=f"measured window of each run of the tls group (default {tls.DEFAULT_SECONDS:g})",
    )
    parser.add_argument("--idle-connections", type=int, default=5000)
    parser.add_argument(
        "--max-broker-rss-mib",
        type=int,
        default=DEFAULT_MAX_BROKER_RSS_MIB,
        help="kill a broker whose process tree's RSS passes this during a scenario",
    )
    parser.add_argument(
        "--mqtt-version", type=int, choices=(wire.MQTT_311, wire.MQTT_5), default=wire.MQTT_311
    )
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench-results")
    parser.add_argument("--no-json", action="store_true", help="print the table only")
    return parser


def broker_specs(args: argparse.Namespace) -> list[BrokerSpec]:
    specs = []
    if "meshmq" in args.brokers:
        variants = args.meshmq_variants
        if variants is None:
            given = args.meshmq_args
            variants = (
                [("", tuple(shlex.split(given)))] if given is not None else parse_variants(DEFAULT_VARIANTS)
            )
        for name, extra in variants:
            specs.append(BrokerSpec(f"MeshMQ {name}".strip(), "meshmq", extra))
    if "mosquitto" in args.brokers:
        specs.append(BrokerSpec("Mosquitto", "mosquitto"))
    return specs


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _cell(broker: Broker, scenario: str, metric: str) -> str:
    result = broker.results.get(scenario)
    if result is None:
        return "not run"
    if not result.metrics:
        return "FAILED"
    return _fmt(result.value(metric))


def _align(rows: list[list[str]], left: tuple[int, ...]) -> list[str]:
    """Columns padded to their widest cell (the `left` ones left-aligned), a rule under row 0."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def render_table(brokers: list[Broker], scenarios: list[str]) -> str:
    reference = next((b for b in brokers if b.spec.kind == "mosquitto"), None)
    mesh = [b for b in brokers if b.spec.kind == "meshmq"]
    header = ["scenario", "metric", *(b.spec.label for b in brokers)]
    if reference is not None:
        header += [f"{b.spec.label}/Mosquitto" for b in mesh]
    rows = [header]
    for scenario in scenarios:
        metrics: dict[str, Metric] = {}
        for broker in brokers:
            result = broker.results.get(scenario)
            for metric in result.metrics if result else ():
                metrics.setdefault(metric.name, metric)
        if not metrics:
            rows.append([scenario, "(all failed)", *(_cell(b, scenario, "") for b in brokers)])
            continue
        shown = scenario  # the scenario's name on its first row only
        for name, metric in metrics.items():
            label = f"{name} ({metric.unit})" if metric.unit and metric.unit not in name else name
            row = [shown, label, *(_cell(b, scenario, name) for b in brokers)]
            shown = ""
            if reference is not None:
                ref = reference.results.get(scenario)
                ref_value = ref.value(name) if ref else None
                for broker in mesh:
                    own = broker.results.get(scenario)
                    value = own.value(name) if own else None
                    ratio = value / ref_value if value is not None and ref_value else None
                    row.append(f"{ratio:.2f}" if ratio is not None else "-")
            rows.append(row)
    return "\n".join(_align(rows, left=(0, 1)))


def render_problems(brokers: list[Broker]) -> list[str]:
    lines = []
    for broker in brokers:
        if broker.start_error:
            lines.append(f"{broker.spec.label}: {broker.start_error}")
        if broker.starts > 1:
            lines.append(f"{broker.spec.label}: started {broker.starts} times (it died during the run)")
        for scenario, result in broker.results.items():
            lines.extend(f"{broker.spec.label} {scenario}: {error}" for error in result.errors)
            if stalled(result):
                lines.append(
                    f"{broker.spec.label} {scenario}: nothing delivered in the measured window (stalled)"
                )
            peak_mib = result.value(PEAK_RSS)
            if peak_mib is not None and peak_mib >= BLOATED_RSS_MIB:
                lines.append(
                    f"{broker.spec.label} {scenario}: warning: the broker's RSS peaked at {peak_mib:,.0f} MiB"
                )
            busiest = result.value("generator busiest proc CPU")
            if busiest is not None and busiest >= GENERATOR_SATURATED_PCT:
                lines.append(
                    f"{broker.spec.label} {scenario}: warning: a generator process used {busiest:.0f}% CPU;"
                    " the figures may measure the generator, not the broker"
                )
    return lines


def stalled(result: ScenarioResult) -> bool:
    """Figures, but the headline (messages or connections per second) is zero."""
    return bool(result.metrics) and result.metrics[0].value == 0


def failed(brokers: list[Broker]) -> bool:
    """A broker that did not start, a scenario without figures or a stalled one fails the run."""
    return any(b.start_error or any(not r.metrics or stalled(r) for r in b.results.values()) for b in brokers)


# --- cross-worker scenarios --------------------------------------------------------------------

CrossRun = tuple[CrossScenario, Broker]  # the scenario and the fresh node it ran against


def cpu_by_process(broker: Broker, result: ScenarioResult) -> str:
    """'worker 1 95%, worker 2 60%, relay 1%, ...' over the scenario's window, busiest first."""
    names = broker.process_names()
    shares = sorted(result.broker_cpu_pct_by_pid, key=lambda pid_pct: -pid_pct[1])
    return ", ".join(f"{names.get(pid, f'pid {pid}')} {pct:.0f}%" for pid, pct in shares if pct >= 0.5)


def cross_ratios(runs: list[CrossRun]) -> dict[str, float | None]:
    """Per base scenario: broker CPU µs/msg of its -cross run over that of its -same run."""
    cpu = {c.name: b.results[c.name].value("broker CPU µs/msg") for c, b in runs if c.name in b.results}
    ratios: dict[str, float | None] = {}
    for base in dict.fromkeys(c.base for c, _b in runs):
        same, cross = cpu.get(f"{base}-same"), cpu.get(f"{base}-cross")
        if f"{base}-same" in cpu and f"{base}-cross" in cpu:
            ratios[base] = cross / same if same and cross is not None else None
    return ratios


def render_cross_table(runs: list[CrossRun]) -> str:
    header = [
        "scenario",
        "clients",
        "msgs/s",
        "loss %",
        "CPU µs/msg",
        "peak RSS MiB",
        "broker CPU %",
        "CPU by process",
    ]
    rows = [header]
    for cross, broker in runs:
        result = broker.results.get(cross.name)
        clients = f"pub w{cross.pub_worker} -> sub w{cross.sub_worker}"
        if result is None or not result.metrics:
            rows.append([cross.name, clients, "FAILED" if result else "not run", *[""] * 5])
            continue
        rate = result.metrics[0].value  # received msg/s or deliveries/s: the scenario's headline
        cells = [
            _fmt(rate),
            _fmt(result.value("loss")),
            _fmt(result.value("broker CPU µs/msg")),
            _fmt(result.value(PEAK_RSS)),
        ]
        rows.append(
            [cross.name, clients, *cells, _fmt(result.value("broker CPU")), cpu_by_process(broker, result)]
        )
    lines = _align(rows, left=(0, 1, 7))
    verdicts = []
    for base, ratio in cross_ratios(runs).items():
        if ratio is None:
            verdicts.append(f"{base} -")
        else:
            verdicts.append(f"{base} {ratio:.2f} ({'met' if ratio <= CROSS_TARGET_RATIO else 'MISSED'})")
    if verdicts:
        lines.append(
            f"\ncross/same broker CPU µs/msg (target <= {CROSS_TARGET_RATIO}): " + ", ".join(verdicts)
        )
    return "\n".join(lines)


# --- report ------------------------------------------------------------------------------------


def _broker_json(b: Broker) -> dict[str, object]:
    names = b.process_names()
    return {
        "label": b.spec.label,
        "kind": b.spec.kind,
        "command": list(b.command),
        "worker_port_base": b.worker_port_base or None,
        "start_error": b.start_error,
        "starts": b.starts,
        "results": {
            name: {
                "ok": r.ok,
                "metrics": [asdict(m) for m in r.metrics],
                "errors": list(r.errors),
                "notes": list(r.notes),
                "broker_cpu_pct_by_process": {
                    names.get(pid, f"pid {pid}"): round(pct, 1) for pid, pct in r.broker_cpu_pct_by_pid
                },
            }
            for name, r in b.results.items()
        },
    }


def to_json(
    brokers: list[Broker], args: argparse.Namespace, started: dt.datetime, runs: list[CrossRun] | None = None
) -> dict[str, object]:
    return {
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "idle_connections": args.idle_connections,
            "mqtt_version": args.mqtt_version,
            "payload_bytes": Params().payload_bytes,
        },
        "brokers": [_broker_json(b) for b in brokers],
        "cross_worker": {
            "target_ratio": CROSS_TARGET_RATIO,
            "cpu_us_per_msg_ratio_cross_to_same": cross_ratios(runs or []),
            "runs": [
                {
                    "scenario": c.name,
                    "base": c.base,
                    "pub_worker": c.pub_worker,
                    "sub_worker": c.sub_worker,
                    "node": _broker_json(b),
                }
                for c, b in runs or []
            ],
        },
    }


# --- running -----------------------------------------------------------------------------------


def run_on(broker: Broker, name: str, base: str, params: Params, max_rss_mib: int) -> ScenarioResult:
    """Run loadgen scenario `base` against the broker, filed under `name`; never raises."""
    if not broker.alive() or broker.pid is None:
        return ScenarioResult(name, (), (f"broker not running: {broker.start_error or 'exited'}",))
    print(f"running {name} against {broker.spec.label} ...", flush=True)
    with RssGuard(broker.pid, max_rss_mib << 20) as guard:
        try:
            result = replace(run_scenario(base, HOST, broker.port, params, broker.pid), scenario=name)
        except Exception as exc:  # one failed scenario must not end the run
            result = ScenarioResult(name, (), (f"{type(exc).__name__}: {exc}",))
    metrics = result.metrics
    if metrics:
        metrics = (*metrics, Metric(PEAK_RSS, guard.peak_bytes / 2**20, "MiB", "lower"))
    errors = result.errors
    if guard.killed_at_bytes is not None:
        errors = (*errors, f"broker killed: its RSS reached {guard.killed_at_bytes / 2**20:.0f} MiB")
    elif not broker.alive():
        errors = (*errors, f"broker exited during the scenario; log: {broker.log_tail()}")
    return replace(result, metrics=metrics, errors=errors)


def run_cross(
    scenarios: list[CrossScenario], args: argparse.Namespace, params: Params, tmp: Path
) -> list[CrossRun]:
    runs = []
    for cross in scenarios:
        workdir = tmp / f"cross-{cross.name}"
        workdir.mkdir()
        spec = BrokerSpec("MeshMQ cross", "meshmq", tuple(shlex.split(args.cross_args)), worker_ports=2)
        broker = Broker(spec, workdir)
        runs.append((cross, broker))
        try:
            if not broker.start():
                print(f"MeshMQ for {cross.name}: FAILED: {broker.start_error}", flush=True)
                broker.results[cross.name] = ScenarioResult(
                    cross.name, (), (f"broker not running: {broker.start_error}",)
                )
                continue
            placed = replace(
                params,
                pub_port=broker.worker_port(cross.pub_worker),
                sub_port=broker.worker_port(cross.sub_worker),
            )
            broker.results[cross.name] = run_on(
                broker, cross.name, cross.base, placed, args.max_broker_rss_mib
            )
        finally:
            broker.stop()
    return runs


def run_bench(args: argparse.Namespace) -> int:
    raise_nofile_limit()
    started = dt.datetime.now().astimezone()
    params = Params(
        seconds=args.seconds,
        warmup_s=args.warmup,
        version=args.mqtt_version,
        idle_connections=args.idle_connections,
    )
    order = [s for s in RUN_ORDER if s in args.scenarios]
    crosses = [c for c in CROSS_SCENARIOS if c.name in args.scenarios] if "meshmq" in args.brokers else []
    runs: list[CrossRun] = []
    with tempfile.TemporaryDirectory(prefix="meshmq-bench-") as tmp:
        brokers = []
        for n, spec in enumerate(broker_specs(args) if order else ()):
            workdir = Path(tmp) / f"{n}-{spec.kind}"
            workdir.mkdir()
            brokers.append(Broker(spec, workdir))
        try:
            for broker in brokers:
                ok = broker.start()
                state = f"pid {broker.pid}, port {broker.port}" if ok else f"FAILED: {broker.start_error}"
                print(f"started {broker.spec.label}: {state}", flush=True)
            for scenario in order:
                for broker in brokers:
                    if not broker.alive() and broker.starts and broker.start_error is None:
                        print(f"{broker.spec.label} died; restarting it", flush=True)
                        broker.start()
                    broker.results[scenario] = run_on(
                        broker, scenario, scenario, params, args.max_broker_rss_mib
                    )
        finally:
            for broker in brokers:
                broker.stop()
        runs = run_cross(crosses, args, params, Path(tmp))
        everyone = [*brokers, *(b for _c, b in runs)]
        report = to_json(brokers, args, started, runs)  # before the workdirs (broker logs) go
    tls_params = tls.TlsParams(
        seconds=args.tls_seconds,
        warmup_s=args.warmup,
        version=args.mqtt_version,
        max_rss_mib=args.max_broker_rss_mib,
    )
    secured = tls.run_tls(tls_params, args.brokers) if tls.SCENARIO in args.scenarios else None
    report["tls"] = tls.as_json(secured) if secured is not None else None
    durable_params = durable.DurableParams(
        seconds=args.seconds, warmup_s=args.warmup, version=args.mqtt_version
    )
    run_durable = durable.SCENARIO in args.scenarios and "meshmq" in args.brokers
    durables = [durable.run_durable(store, durable_params) for store in durable.STORES] if run_durable else []
    report["durable"] = [durable.as_json(r) for r in durables]
    cluster_params = cluster.ClusterParams(
        seconds=args.seconds,
        warmup_s=args.warmup,
        version=args.mqtt_version,
        max_rss_mib=args.max_broker_rss_mib,
    )
    run_cluster = cluster.SCENARIO in args.scenarios and "meshmq" in args.brokers
    clustered = cluster.run_cluster(cluster_params) if run_cluster else None
    report["cluster"] = cluster.as_json(clustered) if clustered is not None else None
    if brokers:
        print()
        print(render_table(brokers, [s for s in SCENARIOS if s in args.scenarios]))
    if runs:
        print(
            f"\ncross-worker delivery (MeshMQ {args.cross_args}, clients placed by WorkerPortBase, a fresh node each):"
        )
        print(render_cross_table(runs))
    if secured is not None:
        print(f"\n{tls.title(secured)}:")
        print(tls.render(secured))
    if durables:
        print("\ndurable QoS 1 into persistent sessions (MeshMQ, its own node and database each):")
        print(durable.render(durables))
    if clustered is not None:
        print(f"\n{cluster.TITLE}:")
        print(cluster.render(clustered))
    problems = render_problems(everyone)
    if problems:
        print("\nproblems:")
        for line in problems:
            print(f"  {line}")
    if not args.no_json:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        path = args.results_dir / f"{started.strftime('%Y-%m-%dT%H%M%S')}.json"
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"\nwrote {path}")
    cluster_failed = clustered is not None and clustered.failed
    group_failed = cluster_failed or (secured is not None and secured.failed)
    return 1 if failed(everyone) or any(r.errors or not r.phases for r in durables) or group_failed else 0


def main(argv: list[str] | None = None) -> int:
    return run_bench(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
