"""`make bench`: MeshMQ against mosquitto, same scenarios, same machine, same run.

Why: a throughput or latency figure means little alone; next to mosquitto's, measured minutes
apart by the same generator on the same cores, it says where MeshMQ stands. This module starts
the brokers on free loopback ports, runs every scenario of `tools.loadgen` against each broker
in turn (scenario by scenario, so slow drifts of the machine's load hit both alike), stops
them, prints one table and writes the figures to `bench-results/<date>.json`.

Must not: send traffic anywhere but 127.0.0.1, leave a broker running, or stop a process it
did not start (brokers are stopped through the process group of the PID it spawned). A broker
that fails to start, dies, or fails a scenario is reported in the table and the JSON; the run
goes on with the others.

Invariants:
- MeshMQ can run several times in one bench run with different command-line arguments
  (`--meshmq-variants "w1:-workers 1;w2:-workers 2"`); each variant is its own column.
- `idle-connections` runs first against a fresh broker: later scenarios would leave freed
  memory behind that new connections reuse, hiding their cost from the RSS delta.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tools.loadgen import wire
from tools.loadgen.scenarios import SCENARIOS, Metric, Params, ScenarioResult, run_scenario
from tools.loadgen.worker import raise_nofile_limit

REPO = Path(__file__).resolve().parents[1]
MOSQUITTO = "/usr/sbin/mosquitto"
HOST = "127.0.0.1"
LISTEN_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
GENERATOR_SATURATED_PCT = 90.0
RUN_ORDER = ("idle-connections", "fan-in", "fan-out", "qos1-pairs", "latency")


@dataclass(frozen=True, slots=True)
class BrokerSpec:
    label: str  # the table's column name
    kind: str  # "meshmq" or "mosquitto"
    args: tuple[str, ...] = ()  # extra command-line arguments (MeshMQ variants)


@dataclass(slots=True)
class Broker:
    """One broker process of this run, owned by this module from start to stop."""

    spec: BrokerSpec
    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    command: tuple[str, ...] = ()
    start_error: str | None = None
    starts: int = 0
    results: dict[str, ScenarioResult] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        path = self.workdir / "broker.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def start(self) -> bool:
        self.starts += 1
        self.port = free_port()
        self.command = self._command()
        log = open(self.workdir / "broker.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                self.command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as exc:
            self.start_error = f"cannot start {self.command[0]}: {exc}"
            return False
        finally:
            log.close()
        error = wait_listening(self.port, self.proc, LISTEN_TIMEOUT_S)
        if error is not None:
            self.start_error = f"{error}; log: {self.log_tail()}"
            self.stop()
            return False
        self.start_error = None
        return True

    def _command(self) -> tuple[str, ...]:
        if self.spec.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} {HOST}\n"
                "allow_anonymous true\n"
                "max_queued_messages 100000\n"
                "max_inflight_messages 100\n"
                "persistence false\n"
            )
            return (MOSQUITTO, "-c", str(conf))
        config = self.workdir / "meshmq.yaml"
        config.write_text(f"ListenAddress: {HOST}\nTCP: {self.port}\nSessionStore:\n  Type: MEMORY\n")
        exe = Path(sys.executable).with_name("meshmq")
        base = (str(exe),) if exe.exists() else (sys.executable, "-m", "broker.cli")
        return (*base, "-config", str(config), "-port", str(self.port), *self.spec.args)

    def stop(self) -> None:
        """SIGTERM the process group we created, wait, then SIGKILL it if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        else:
            _signal_group(self.proc.pid, signal.SIGKILL)  # children the dead leader left behind


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> str | None:
    """None once a TCP connect succeeds; else why not (exited, or timed out)."""
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode} before listening"
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return None
        except OSError:
            time.sleep(0.05)
    return f"not listening on {HOST}:{port} after {timeout_s:.0f} s"


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
    bad = [n for n in names if n not in SCENARIOS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {bad}; known: {', '.join(SCENARIOS)}")
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
    parser.add_argument("--scenarios", type=_scenario_list, default=list(SCENARIOS))
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window per scenario")
    parser.add_argument("--warmup", type=float, default=1.0, help="traffic before each window (s)")
    parser.add_argument(
        "--meshmq-args", default="-workers 1", help='MeshMQ arguments, e.g. --meshmq-args="-workers 2"'
    )
    parser.add_argument(
        "--meshmq-variants", type=parse_variants, default=None, help='e.g. "w1:-workers 1;w2:-workers 2"'
    )
    parser.add_argument("--idle-connections", type=int, default=5000)
    parser.add_argument(
        "--mqtt-version", type=int, choices=(wire.MQTT_311, wire.MQTT_5), default=wire.MQTT_311
    )
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench-results")
    parser.add_argument("--no-json", action="store_true", help="print the table only")
    return parser


def broker_specs(args: argparse.Namespace) -> list[BrokerSpec]:
    specs = []
    if "meshmq" in args.brokers:
        variants = args.meshmq_variants or [("", tuple(shlex.split(args.meshmq_args)))]
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
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_problems(brokers: list[Broker]) -> list[str]:
    lines = []
    for broker in brokers:
        if broker.start_error:
            lines.append(f"{broker.spec.label}: {broker.start_error}")
        if broker.starts > 1:
            lines.append(f"{broker.spec.label}: started {broker.starts} times (it died during the run)")
        for scenario, result in broker.results.items():
            lines.extend(f"{broker.spec.label} {scenario}: {error}" for error in result.errors)
            busiest = result.value("generator busiest proc CPU")
            if busiest is not None and busiest >= GENERATOR_SATURATED_PCT:
                lines.append(
                    f"{broker.spec.label} {scenario}: warning: a generator process used {busiest:.0f}% CPU;"
                    " the figures may measure the generator, not the broker"
                )
    return lines


def failed(brokers: list[Broker]) -> bool:
    """A broker that did not start or a scenario without figures fails the run (exit code 1)."""
    return any(b.start_error or any(not r.metrics for r in b.results.values()) for b in brokers)


def to_json(brokers: list[Broker], args: argparse.Namespace, started: dt.datetime) -> dict[str, object]:
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
        "brokers": [
            {
                "label": b.spec.label,
                "kind": b.spec.kind,
                "command": list(b.command),
                "start_error": b.start_error,
                "starts": b.starts,
                "results": {
                    name: {
                        "ok": r.ok,
                        "metrics": [asdict(m) for m in r.metrics],
                        "errors": list(r.errors),
                        "notes": list(r.notes),
                    }
                    for name, r in b.results.items()
                },
            }
            for b in brokers
        ],
    }


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
    with tempfile.TemporaryDirectory(prefix="meshmq-bench-") as tmp:
        brokers = []
        for n, spec in enumerate(broker_specs(args)):
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
                    if not broker.alive():
                        broker.results[scenario] = ScenarioResult(
                            scenario, (), (f"broker not running: {broker.start_error or 'exited'}",)
                        )
                        continue
                    print(f"running {scenario} against {broker.spec.label} ...", flush=True)
                    try:
                        result = run_scenario(scenario, HOST, broker.port, params, broker.pid)
                    except Exception as exc:  # one failed scenario must not end the run
                        result = ScenarioResult(scenario, (), (f"{type(exc).__name__}: {exc}",))
                    if not broker.alive():
                        result = ScenarioResult(
                            result.scenario,
                            result.metrics,
                            (*result.errors, f"broker exited during the scenario; log: {broker.log_tail()}"),
                            result.notes,
                        )
                    broker.results[scenario] = result
        finally:
            for broker in brokers:
                broker.stop()
    print()
    print(render_table(brokers, [s for s in SCENARIOS if s in args.scenarios]))
    problems = render_problems(brokers)
    if problems:
        print("\nproblems:")
        for line in problems:
            print(f"  {line}")
    if not args.no_json:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        path = args.results_dir / f"{started.strftime('%Y-%m-%dT%H%M%S')}.json"
        path.write_text(json.dumps(to_json(brokers, args, started), indent=2, ensure_ascii=False) + "\n")
        print(f"\nwrote {path}")
    return 1 if failed(brokers) else 0


def main(argv: list[str] | None = None) -> int:
    return run_bench(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
