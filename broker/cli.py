"""The `meshmq` command: parse the command line, load the configuration, start the node.

Why: the operator's entry point, in the spirit of the broker MeshMQ replaces
(`meshmq -config etc/meshmq.yaml [-cluster] [-log LEVEL] [-workers N] [-port N]`). Options take
one dash or two (`-config`, `--config`) and `-config=FILE` works too.

Must not: start anything before the whole configuration (file plus options) is valid, or print a
stack trace for an operator's mistake: a bad configuration is one line on stderr,
`meshmq: config error: <key>: <what is wrong>`, and exit status 2 (as for bad usage).

Invariants: `main` returns the process exit status and never calls `sys.exit` itself; the
supervisor is imported only once the configuration is valid, so `--help` and configuration
errors need none of the node's process machinery.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from broker.config import LOG_LEVELS, Config, ConfigError, StoreType, load_config, with_overrides
from broker.logs import configure_logging

__all__ = ["EXIT_USAGE", "build_parser", "main", "package_version"]

EXIT_USAGE = 2  # bad usage or configuration, as argparse uses


def package_version() -> str:
    try:
        return metadata.version("meshmq")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshmq",
        description="MeshMQ: an MQTT 3.1.1 and 5.0 broker for the cores of a server and a LAN cluster.",
        epilog="Options take one dash or two: -config FILE, --config FILE and -config=FILE are the same.",
        allow_abbrev=False,  # --options only; Python 3.11's argparse still takes unique -prefixes
    )
    parser.add_argument(
        "-config", "--config", metavar="FILE", help="YAML configuration file (default: built-in defaults)"
    )
    parser.add_argument(
        "-log",
        "--log",
        metavar="LEVEL",
        help=f"log level, overrides Logging.Level ({', '.join(LOG_LEVELS)})",
    )
    parser.add_argument(
        "-workers",
        "--workers",
        metavar="N",
        type=int,
        help="worker processes, overrides Workers (0: one per core)",
    )
    parser.add_argument(
        "-port", "--port", metavar="N", type=int, help="MQTT TCP port, overrides TCP (0: off)"
    )
    parser.add_argument(
        "-cluster",
        "--cluster",
        action="store_true",
        default=None,
        help="join a cluster (needs SessionStore.Type: POSTGRES)",
    )
    parser.add_argument("-version", "--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


def _config_from(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    return with_overrides(
        config, workers=args.workers, tcp_port=args.port, log_level=args.log, cluster=args.cluster
    )


def _cluster_refusal(config: Config) -> str | None:
    """Why cluster mode cannot start with this configuration, or None (also outside cluster mode).

    Checked before any process starts, so that a missing database choice or key is one line on
    stderr rather than a relay that dies later. The key file is loaded here only to check it; the
    relay loads it again for use.
    """
    if not config.cluster:
        return None
    if config.session_store.type is not StoreType.POSTGRES:
        return "cluster mode requires SessionStore.Type: POSTGRES"
    curve = config.mesh.curve
    if not curve.key_file:
        if config.mesh.plaintext:
            return None
        return (
            "cluster mode needs Mesh.Curve.KeyFile (make keys with `meshctl keygen`) or Mesh.Plaintext: true"
        )
    from mesh.curve import CurveError, load_keys  # pyzmq only once cluster mode is asked for

    try:
        load_keys(curve.key_file, curve.allowed_keys_dir)
    except CurveError as e:
        return f"Mesh.Curve: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error that argparse already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        config = _config_from(args)
    except ConfigError as e:
        print(f"meshmq: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    refusal = _cluster_refusal(config)
    if refusal is not None:
        print(f"meshmq: {refusal}", file=sys.stderr)
        return EXIT_USAGE
    try:  # certificate files: checked once here, so that a bad one stops the node before it starts
        from broker.worker import load_tls

        load_tls(config)
    except ConfigError as e:
        print(f"meshmq: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.logging, "supervisor")
    from broker.supervisor import run_node

    return run_node(config)


if __name__ == "__main__":
    sys.exit(main())
