"""Command line: run scenarios against a broker that is already listening.

Why: to measure one broker by hand (or profile it) without `tools.bench` starting anything.
`--pub-port` / `--sub-port` put publishers and subscribers on other ports than `--port`, e.g.
on chosen workers of a MeshMQ node that has `WorkerPortBase` set (worker i on base + i).
`--tls-ca FILE` makes every connection TLS, verifying the broker against that CA (give the
broker's TLS port as `--port`).
Must not: start, stop or signal the broker; `--broker-pid` is only read from /proc.
"""

from __future__ import annotations

import argparse
import sys

from tools.loadgen import wire
from tools.loadgen.scenarios import SCENARIOS, Metric, Params, run_scenario
from tools.loadgen.worker import raise_nofile_limit


def format_metric(metric: Metric) -> str:
    if metric.value is None:
        return "-"
    value = metric.value
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def parse_scenarios(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.loadgen", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pub-port", type=int, default=None, help="publishers' port (default: --port)")
    parser.add_argument("--sub-port", type=int, default=None, help="subscribers' port (default: --port)")
    parser.add_argument(
        "--tls-ca",
        default=None,
        metavar="FILE",
        help="connect over TLS, verifying the broker against this CA",
    )
    parser.add_argument("--scenarios", type=parse_scenarios, default=list(SCENARIOS))
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window per scenario")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of traffic before the window")
    parser.add_argument("--broker-pid", type=int, default=None, help="root of the broker's process tree")
    parser.add_argument(
        "--mqtt-version", type=int, choices=(wire.MQTT_311, wire.MQTT_5), default=wire.MQTT_311
    )
    parser.add_argument("--idle-connections", type=int, default=5000)
    parser.add_argument("--idle-procs", type=int, default=2)
    parser.add_argument("--idle-concurrency", type=int, default=32)
    parser.add_argument("--publisher-procs", type=int, default=1)
    parser.add_argument("--subscriber-procs", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.host.startswith("127."):
        print("loadgen: refusing a non-loopback host", file=sys.stderr)
        return 2
    raise_nofile_limit()
    params = Params(
        seconds=args.seconds,
        warmup_s=args.warmup,
        version=args.mqtt_version,
        idle_connections=args.idle_connections,
        idle_procs=args.idle_procs,
        idle_concurrency=args.idle_concurrency,
        publisher_procs=args.publisher_procs,
        subscriber_procs=args.subscriber_procs,
        pub_port=args.pub_port,
        sub_port=args.sub_port,
        tls_ca_file=args.tls_ca,
    )
    failed = False
    for scenario in args.scenarios:
        result = run_scenario(scenario, args.host, args.port, params, args.broker_pid)
        print(f"{scenario}:")
        for metric in result.metrics:
            print(f"  {metric.name:<28} {format_metric(metric):>14} {metric.unit}")
        for note in result.notes:
            print(f"  note: {note}")
        for error in result.errors:
            print(f"  ERROR {error}")
        failed |= not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
