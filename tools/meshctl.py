"""`meshctl`: the operator's tool for a MeshMQ cluster.

Why: one command for what an operator does around a cluster. Today that is `keygen`, which makes
the CURVE key pair the nodes' links need (`Mesh.Curve.KeyFile`). The commands that talk to a
running node's relay (members, health, routes, sessions, retained, stats, tap, ping, drain) are
declared already, so that their names are reserved and `meshctl --help` shows what is coming, but
they say plainly that they are not available yet, with a non-zero exit, rather than pretend.

Must not: import the broker's process machinery or open sockets (nothing answers yet); print a
stack trace for an operator's mistake.

Invariants: `main` returns the exit status and never calls `sys.exit` itself: 0 done, 1 the
command failed (`meshctl: <what>` on stderr), 2 bad usage or a command not available yet.
"""

from __future__ import annotations

import argparse
import sys
from typing import Final

from broker.cli import EXIT_USAGE, package_version
from mesh.curve import CurveError, generate, load_keys

__all__ = ["EXIT_FAILED", "build_parser", "main"]

EXIT_FAILED: Final = 1

# The relay's commands of issue 6, with their one-line help.
_LATER_COMMANDS: Final = {
    "members": "cluster members and their health",
    "health": "one node's health, as its GET /health",
    "routes": "the route table: filter -> nodes",
    "sessions": "sessions and where they live",
    "retained": "retained message counts",
    "stats": "per-link traffic and drops",
    "tap": "a live tap of mesh traffic",
    "ping": "ping between nodes",
    "drain": "drain a node (graceful shutdown)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description="Inspect and operate a MeshMQ cluster.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument(
        "--json", action="store_true", help="print JSON instead of text (where a command supports it)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    keygen = commands.add_parser(
        "keygen",
        help="make a CURVE key pair for Mesh.Curve.KeyFile",
        description="Write NAME.key (public) and NAME.key_secret (public and secret, mode 0600) in "
        "the ZeroMQ certificate format. Existing files are never overwritten.",
    )
    keygen.add_argument(
        "--dir", default=".", help="directory for the key files (default: .; created if missing)"
    )
    keygen.add_argument(
        "name",
        nargs="?",
        default="cluster",
        metavar="NAME",
        help="'cluster' (default) for one pair shared by every node, or the node's NodeName for per-node keys",
    )
    for name, text in _LATER_COMMANDS.items():
        commands.add_parser(name, help=f"{text} (not available yet)", add_help=False)
    return parser


def _keygen(directory: str, name: str) -> int:
    try:
        public_path, secret_path = generate(directory, name)
        public_key = load_keys(secret_path).public
    except CurveError as e:
        print(f"meshctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"public key file: {public_path}")
    print(f"secret key file: {secret_path}  (mode 0600; copy it only over a secure channel)")
    print(f"public key: {public_key.decode('ascii')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        # parse_known_args: the commands that are not available yet take their future options
        # (`health --node n1`) without a usage error; keygen's leftovers are refused below.
        args, rest = parser.parse_known_args(argv)
    except SystemExit as e:  # --version, --help or a usage error, already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("meshctl: a command is required (see meshctl --help)", file=sys.stderr)
        return EXIT_USAGE
    if args.command in _LATER_COMMANDS:
        print(f"meshctl: {args.command} is not available yet", file=sys.stderr)
        return EXIT_USAGE
    if rest:
        print(f"meshctl: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
        return EXIT_USAGE
    return _keygen(args.dir, args.name)


if __name__ == "__main__":
    sys.exit(main())
