"""`meshctl`: the operator's tool for a running MeshMQ cluster (placeholder).

Why: members and their health, routes, sessions, retained counts, per-link traffic, a live tap,
ping and drain all talk to a node's relay, which does not exist yet. Until it does, this command
says so plainly, with a non-zero exit, rather than pretending to work.

Must not: import the broker's process machinery or open sockets (nothing answers yet).
"""

from __future__ import annotations

import argparse
import sys

from broker.cli import EXIT_USAGE, package_version

__all__ = ["main"]

_NOT_YET = "meshctl: the cluster commands arrive with the cluster (members, health, routes, ...)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshctl", description="Inspect and operate a MeshMQ cluster.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("command", nargs="?", help="not available yet")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # --version, --help or a usage error, already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    print(_NOT_YET, file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
