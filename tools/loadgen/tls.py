"""The `tls` benchmark group: what TLS costs per message, MeshMQ against Mosquitto (issue 7).

Why: "`make bench` runs fan-in and latency over TLS as well; report the TLS cost per message
next to plain TCP." Two of `tools.loadgen`'s scenarios,

  fan-in   8 publishers -> 1 subscriber of `bench/in/+`, QoS 0, flooding
  latency  1 publisher at 1,000 msg/s -> 1 subscriber, QoS 0 (p50 / p99)

each run once over plain TCP and once over TLS against one MeshMQ node (`-workers 1` like the
other single-node columns; a `TCP` and a `TCPS` listener) and one Mosquitto (a plain listener and
a second `listener` with `cafile` / `certfile` / `keyfile`). Both brokers are started once for
the group on free 127.0.0.1 ports, with a throwaway PKI from `tools.certs` (EC P-256); the
generator verifies the broker against that CA, sends no client certificate, and negotiates
TLS 1.3 (the version and cipher each broker agreed to are probed once and printed).

The TLS cost per message is the broker's CPU µs per delivered message over TLS minus the same
over plain TCP: same scenario, same broker process, same generator. The generator pays for TLS
too (Python's `ssl`, one record per write): "generator CPU µs/msg" is the CPU of all generator
processes over the same window per delivered message (broker µs/msg × generator CPU / broker
CPU, as both come from the same window and count). It is not part of any broker figure, so the
cost and the MeshMQ/Mosquitto ratios are the brokers' own; but the generator shares the
machine's cores, so a generator process near 100% of a core caps msg/s (warned about): the
µs/msg figures stay comparable then, the msg/s ones measure the generator.

Must not: send traffic anywhere but 127.0.0.1; leave a broker running (both are stopped in
`finally`, through the process group of the PID this module spawned); stop any other process;
print (the caller renders).

Invariants:
- Runs go scenario by scenario, then transport, then broker, so slow drifts of the machine's
  load hit every column alike; plain and TLS figures of a broker come from one process.
- A broker that fails to start, or a run that fails, is reported with its reason; the other
  runs go on. `run_tls` never raises.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tools import certs
from tools.bench_brokers import (
    HOST,
    LISTEN_TIMEOUT_S,
    Broker,
    BrokerSpec,
    RssGuard,
    free_port,
    wait_listening,
)
from tools.loadgen import wire
from tools.loadgen.scenarios import Metric, Params, ScenarioResult, run_scenario
from tools.loadgen.worker import client_ssl_context

SCENARIO = "tls"
BASES = ("fan-in", "latency")
TRANSPORTS = ("plain", "tls")
KINDS = ("meshmq", "mosquitto")
DEFAULT_SECONDS = 3.0  # a window per run: 8 runs must stay within about a minute
MESHMQ_ARGS = ("-workers", "1")
BROKER_CPU = "broker CPU µs/msg"
GENERATOR_CPU = "generator CPU µs/msg"
PEAK_RSS = "broker peak RSS"
GENERATOR_SATURATED_PCT = 90.0
PROBE_TIMEOUT_S = 5.0
# (scenario, metric) rows of the table, in order
ROWS = (
    ("fan-in", "received msg/s"),
    ("fan-in", "loss"),
    ("fan-in", BROKER_CPU),
    ("fan-in", GENERATOR_CPU),
    ("fan-in", "generator busiest proc CPU"),
    ("latency", "p50"),
    ("latency", "p99"),
    ("latency", BROKER_CPU),
    ("latency", GENERATOR_CPU),
)
# Rows whose MeshMQ/Mosquitto ratio compares the brokers (the generator's rows are context).
RATIO_METRICS = frozenset({"received msg/s", BROKER_CPU, "p50", "p99"})


@dataclass(frozen=True, slots=True)
class TlsParams:
    seconds: float = DEFAULT_SECONDS
    warmup_s: float = 1.0
    version: int = wire.MQTT_311
    max_rss_mib: int = 4096  # a broker past this is killed, as in the rest of the bench
    meshmq_args: tuple[str, ...] = MESHMQ_ARGS


@dataclass(slots=True)
class TlsBroker(Broker):
    """A bench broker with a TLS listener too (`tls_port`), using the group's PKI.

    `Broker` writes its configuration file (`meshmq.yaml` or `mosquitto.conf` in its workdir)
    and starts it; this adds the TLS listener's lines to that file before the start and waits
    for the TLS port as well.
    """

    pki: certs.Pki | None = None
    tls_port: int = 0
    negotiated: str = ""  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", from `probe_tls` after start

    def start(self) -> bool:
        if not Broker.start(self):  # zero-argument super() does not work in slotted dataclasses
            return False
        assert self.proc is not None
        error = wait_listening(self.tls_port, self.proc, LISTEN_TIMEOUT_S)
        if error is None:
            assert self.pki is not None
            try:
                self.negotiated = probe_tls(self.tls_port, self.pki.ca_cert)
            except (OSError, ssl.SSLError) as exc:
                error = f"TLS handshake on port {self.tls_port} failed: {exc}"
        if error is not None:
            self.start_error = f"{error}; log: {self.log_tail()}"
            self.stop()
            return False
        return True

    def _command(self) -> tuple[str, ...]:
        command = Broker._command(self)
        assert self.pki is not None
        pki = self.pki
        self.tls_port = free_port()
        while self.tls_port == self.port:
            self.tls_port = free_port()
        if self.spec.kind == "mosquitto":
            # Started as root, Mosquitto drops to the `mosquitto` user before it reads the
            # certificates, and the PKI lives in this run's private (0700) directory.
            with (self.workdir / "mosquitto.conf").open("a") as conf:
                conf.write(
                    "user root\n"
                    f"listener {self.tls_port} {HOST}\n"
                    f"cafile {pki.ca_cert}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
                )
        else:
            with (self.workdir / "meshmq.yaml").open("a") as config:
                config.write(
                    f"TCPS: {self.tls_port}\nTLS:\n  CertFile: {pki.server_cert}\n  KeyFile: {pki.server_key}\n"
                )
        return command


def probe_tls(port: int, ca_file: Path) -> str:
    """Handshake once as the generator does; 'TLSv1.3 <cipher>' as negotiated."""
    context = client_ssl_context(str(ca_file))
    with (
        socket.create_connection((HOST, port), timeout=PROBE_TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        cipher = tls.cipher()
        return f"{tls.version()} {cipher[0] if cipher else '?'}"


@dataclass(frozen=True, slots=True)
class TlsRun:
    broker: str  # the broker's label
    scenario: str  # one of BASES
    transport: str  # "plain" or "tls"
    result: ScenarioResult


@dataclass(frozen=True, slots=True)
class TlsResult:
    labels: tuple[str, ...]  # brokers, in column order
    runs: tuple[TlsRun, ...]
    errors: tuple[str, ...] = ()  # no PKI, a broker that did not start
    negotiated: tuple[tuple[str, str], ...] = ()  # (broker label, "TLSv1.3 cipher")
    settings: TlsParams = TlsParams()

    def run(self, broker: str, scenario: str, transport: str) -> TlsRun | None:
        return next(
            (r for r in self.runs if (r.broker, r.scenario, r.transport) == (broker, scenario, transport)),
            None,
        )

    def value(self, broker: str, scenario: str, transport: str, metric: str) -> float | None:
        run = self.run(broker, scenario, transport)
        return run.result.value(metric) if run is not None else None

    def cost(self, broker: str, scenario: str, metric: str = BROKER_CPU) -> float | None:
        """TLS minus plain: for BROKER_CPU, the broker's TLS cost per message in µs."""
        tls = self.value(broker, scenario, "tls", metric)
        plain = self.value(broker, scenario, "plain", metric)
        return tls - plain if tls is not None and plain is not None else None

    @property
    def failed(self) -> bool:
        return bool(self.errors) or any(
            not r.result.metrics or r.result.errors or r.result.metrics[0].value == 0 for r in self.runs
        )


def label(kind: str) -> str:
    return "MeshMQ" if kind == "meshmq" else "Mosquitto"


def with_generator_cpu(result: ScenarioResult) -> ScenarioResult:
    """Add GENERATOR_CPU: the generator's CPU per delivered message, over the broker's window."""
    broker_us = result.value(BROKER_CPU)
    broker_pct = result.value("broker CPU")
    generator_pct = result.value("generator CPU")
    value = None
    if broker_us is not None and broker_pct and generator_pct is not None:
        value = broker_us * generator_pct / broker_pct
    return replace(result, metrics=(*result.metrics, Metric(GENERATOR_CPU, value, "µs", "")))


def _run_one(broker: TlsBroker, scenario: str, transport: str, params: TlsParams) -> TlsRun:
    """One scenario over one transport against one broker; never raises."""
    name = label(broker.spec.kind)
    if not broker.alive() or broker.pid is None or broker.pki is None:
        error = f"broker not running: {broker.start_error or 'exited'}"
        return TlsRun(name, scenario, transport, ScenarioResult(scenario, (), (error,)))
    tls = transport == "tls"
    scenario_params = Params(
        seconds=params.seconds,
        warmup_s=params.warmup_s,
        version=params.version,
        tls_ca_file=str(broker.pki.ca_cert) if tls else None,
    )
    port = broker.tls_port if tls else broker.port
    with RssGuard(broker.pid, params.max_rss_mib << 20) as guard:
        try:
            result = run_scenario(scenario, HOST, port, scenario_params, broker.pid)
        except Exception as exc:  # one failed run must not end the group
            result = ScenarioResult(scenario, (), (f"{type(exc).__name__}: {exc}",))
    if result.metrics:
        result = with_generator_cpu(result)
        result = replace(
            result, metrics=(*result.metrics, Metric(PEAK_RSS, guard.peak_bytes / 2**20, "MiB", ""))
        )
    if guard.killed_at_bytes is not None:
        killed = f"broker killed: its RSS reached {guard.killed_at_bytes / 2**20:.0f} MiB"
        result = replace(result, errors=(*result.errors, killed))
    elif not broker.alive():
        result = replace(
            result, errors=(*result.errors, f"broker exited during the run; log: {broker.log_tail()}")
        )
    return TlsRun(name, scenario, transport, result)


def run_tls(
    params: TlsParams, kinds: Sequence[str] = KINDS, progress: bool = True, workdir: Path | None = None
) -> TlsResult:
    """Make a PKI, start the brokers, run every scenario over both transports, stop them."""
    labels = tuple(label(k) for k in KINDS if k in kinds)
    with tempfile.TemporaryDirectory(prefix="meshmq-bench-tls-", dir=workdir) as tmp:
        try:
            pki = certs.make_pki(Path(tmp) / "pki")
        except (certs.CertError, OSError) as exc:
            return TlsResult(labels, (), (f"cannot make the PKI: {exc}",), settings=params)
        brokers: list[TlsBroker] = []
        for kind in (k for k in KINDS if k in kinds):
            directory = Path(tmp) / kind
            directory.mkdir()
            args = params.meshmq_args if kind == "meshmq" else ()
            brokers.append(
                TlsBroker(BrokerSpec(f"{label(kind)} (TLS group)", kind, args), directory, pki=pki)
            )
        runs: list[TlsRun] = []
        errors: list[str] = []
        try:
            for broker in brokers:
                if not broker.start():
                    errors.append(f"{label(broker.spec.kind)}: {broker.start_error}")
                elif progress:
                    print(
                        f"started {label(broker.spec.kind)} for the tls group: pid {broker.pid},"
                        f" port {broker.port}, TLS port {broker.tls_port} ({broker.negotiated})",
                        flush=True,
                    )
            for scenario in BASES:
                for transport in TRANSPORTS:
                    for broker in brokers:
                        if progress:
                            print(
                                f"running tls {scenario} over {transport} against {label(broker.spec.kind)} ...",
                                flush=True,
                            )
                        runs.append(_run_one(broker, scenario, transport, params))
        finally:
            for broker in brokers:
                broker.stop()
        negotiated = tuple((label(b.spec.kind), b.negotiated) for b in brokers if b.negotiated)
        return TlsResult(labels, tuple(runs), tuple(errors), negotiated, params)


# --- report ---------------------------------------------------------------------------------------


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    sign = "+" if signed and value > 0 else ""
    if abs(value) >= 1000:
        return f"{sign}{value:,.0f}"
    if abs(value) >= 10:
        return f"{sign}{value:.1f}"
    return f"{sign}{value:.3g}"


def _ratio(mine: float | None, reference: float | None) -> str:
    """MeshMQ / Mosquitto; '-' unless both are positive (a ratio of a gain to a cost means nothing)."""
    return f"{mine / reference:.2f}" if mine is not None and reference and mine > 0 and reference > 0 else "-"


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def title(result: TlsResult) -> str:
    meshmq = " ".join(result.settings.meshmq_args)
    return (
        f"tls: fan-in 8->1 (QoS 0 flood) and latency at 1,000 msg/s, plain TCP vs TLS (MeshMQ {meshmq},"
        f" Mosquitto; {result.settings.seconds:g} s windows)"
    )


def render(result: TlsResult) -> str:
    labels = result.labels
    both = labels == ("MeshMQ", "Mosquitto")
    header = ["scenario", "metric"]
    for name in labels:
        header += [f"{name} plain", f"{name} TLS", f"{name} +TLS"]
    if both:
        header += ["ratio plain", "ratio TLS", "ratio +TLS"]
    rows = [header]
    shown = ""
    for scenario, metric in ROWS:
        unit = next(
            (
                m.unit
                for r in result.runs
                if r.scenario == scenario
                for m in r.result.metrics
                if m.name == metric
            ),
            "",
        )
        row = [
            scenario if scenario != shown else "",
            f"{metric} ({unit})" if unit and unit not in metric else metric,
        ]
        shown = scenario
        figures: dict[str, tuple[float | None, float | None, float | None]] = {}
        for name in labels:
            plain = result.value(name, scenario, "plain", metric)
            tls = result.value(name, scenario, "tls", metric)
            figures[name] = (plain, tls, result.cost(name, scenario, metric))
            row += [_fmt(plain), _fmt(tls), _fmt(figures[name][2], signed=True)]
        if both and metric in RATIO_METRICS:
            row += [_ratio(m, r) for m, r in zip(figures["MeshMQ"], figures["Mosquitto"], strict=True)]
        elif both:
            row += ["", "", ""]
        rows.append(row)
    lines = _align(rows)
    lines.append(
        "+TLS = TLS - plain; ratio = MeshMQ / Mosquitto ('-' where either is not positive)."
        " Generator CPU is the load generator's own, in no broker figure."
    )
    for scenario in BASES:
        costs = [f"{name} {_fmt(result.cost(name, scenario), signed=True)} µs" for name in labels]
        ratio = ""
        if both:
            ratio = f" (MeshMQ/Mosquitto {_ratio(result.cost('MeshMQ', scenario), result.cost('Mosquitto', scenario))})"
        lines.append(f"TLS cost per message, {scenario} (broker CPU, TLS - plain): {', '.join(costs)}{ratio}")
    for name, negotiated in result.negotiated:
        lines.append(f"{name} negotiated {negotiated}")
    problems = list(result.errors)
    for run in result.runs:
        where = f"{run.broker} {run.scenario} over {run.transport}"
        problems += [f"{where}: {error}" for error in run.result.errors]
        if not run.result.metrics and not run.result.errors:
            problems.append(f"{where}: no figures")
        busiest = run.result.value("generator busiest proc CPU")
        if busiest is not None and busiest >= GENERATOR_SATURATED_PCT:
            problems.append(
                f"{where}: warning: a generator process used {busiest:.0f}% CPU; its msg/s may measure the generator"
            )
    lines += [f"problem: {p}" for p in problems]
    return "\n".join(lines)


def as_json(result: TlsResult) -> dict[str, object]:
    return {
        "settings": asdict(result.settings),
        "errors": list(result.errors),
        "negotiated": dict(result.negotiated),
        "tls_cost_us_per_msg": {s: {name: result.cost(name, s) for name in result.labels} for s in BASES},
        "runs": [
            {
                "broker": r.broker,
                "scenario": r.scenario,
                "transport": r.transport,
                "ok": r.result.ok,
                "metrics": [asdict(m) for m in r.result.metrics],
                "errors": list(r.result.errors),
                "notes": list(r.result.notes),
            }
            for r in result.runs
        ],
    }
