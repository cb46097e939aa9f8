"""`meshctl`: the operator's tool for a MeshMQ cluster.

Why: one command for what an operator does around a cluster: see the members and their health,
the route table, where sessions live, the retained messages, per-node, per-worker and per-link
counters; watch the traffic (`tap`); ping a node over the cluster links; drain a node; manage
the store's users and ACL rules (`user`, `acl`); and make the CURVE key pair the links need
(`keygen`). Every command but `keygen` and `tap` is a request to any node's HTTP API
(`mesh/PROTOCOL.md`, "The HTTP API of a node"; `tools/meshctl_client.py`), printed as a table
(`tools/meshctl_render.py`) or, with `--json`, as the JSON the node returned. `tap` subscribes
over MQTT (`tools/meshctl_tap.py`).

Must not: import the broker's process machinery; print a stack trace for an operator's mistake or
an unreachable node; print the admin token or a password (new passwords are read from a prompt
without echo, or one line of stdin, unless given with `--password`).

Invariants: `main` returns the exit status and never calls `sys.exit` itself: 0 done, 1 the
command failed or the node is unhealthy (`meshctl: <what> (<url>)` on stderr), 2 bad usage.
The global options (`--node`, `--token`, `--user`, `--password`, `--json`, `--timeout`) may come
before or after the command, except that after `user add|passwd` `--password` is the new
password (the admin's then comes before the command or from $MESHMQ_PASSWORD); `--node`
defaults to $MESHMQ_NODE, then 127.0.0.1:8080; `--token` to $MESHMQ_TOKEN, `--user` to
$MESHMQ_USER and `--password` to $MESHMQ_PASSWORD. Given on the command line, `--token` and
`--user` exclude each other; from the environment the token wins.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import getpass
import json
import os
import sys
from collections.abc import Callable
from typing import Final
from urllib.parse import quote

from broker.cli import EXIT_USAGE, package_version
from mesh.curve import CurveError, generate, load_keys
from tools import meshctl_render as render
from tools.meshctl_client import (
    DEFAULT_HTTP_PORT,
    Json,
    MeshctlError,
    NodeClient,
    Reply,
    parse_address,
    parse_health,
    parse_members,
    parse_ping,
    parse_retained,
    parse_routes,
    parse_sessions,
    parse_stats,
)
from tools.meshctl_tap import DEFAULT_MQTT_PORT, TapMessage, tap
from tools.meshctl_users import parse_acl, parse_acl_added, parse_user_change, parse_users

__all__ = ["EXIT_FAILED", "build_parser", "main"]

EXIT_FAILED: Final = 1
DEFAULT_NODE: Final = f"127.0.0.1:{DEFAULT_HTTP_PORT}"
DEFAULT_TIMEOUT_S: Final = 5.0

_COMMANDS: Final = {
    "members": "cluster members: address, state, incarnation, heartbeat RTT, clients",
    "health": "one node's health, as its GET /health (exit 1 when unhealthy)",
    "routes": "the route table: filter -> nodes",
    "sessions": "sessions and where they live: node, worker, online, queued messages",
    "retained": "retained messages: count, topics, QoS, size",
    "stats": "counters per node, per worker and per link",
    "tap": "a live view of the messages on a topic filter (over MQTT; --user/--password when the node has Auth.Enabled)",
    "ping": "round trip from the node to NODE over the cluster link (needs the token)",
    "drain": "drain NODE: it sheds its clients and leaves (needs the token)",
    "user": "users of the store: add, passwd, admin, del, list (needs admin credentials)",
    "acl": "ACL rules of the store: add, del, list (needs admin credentials)",
    "keygen": "make a CURVE key pair for Mesh.Curve.KeyFile",
}


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 1")
    return int(text)


_CREDENTIALS: Final = """\
admin credentials (ping, drain, user, acl): the nodes' Http.AdminToken with --token
($MESHMQ_TOKEN), or an admin user of the store with --user/--password ($MESHMQ_USER,
$MESHMQ_PASSWORD; without a password meshctl asks for it). The first admin user is made with
the token: meshctl --token T user add root --admin"""


def _rule_id(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a rule id (see meshctl acl list)")
    return int(text)


def _add_global_options(parser: argparse.ArgumentParser, in_command: bool, password: bool = True) -> None:
    # Defaults live on the top parser only: a command's parser would otherwise overwrite an
    # option given before the command with its own default.
    def default(value: object) -> object:
        return argparse.SUPPRESS if in_command else value

    parser.add_argument(
        "--node",
        metavar="HOST:PORT",
        default=default(None),
        help=f"HTTP address of any node (default: $MESHMQ_NODE, else {DEFAULT_NODE})",
    )
    parser.add_argument(
        "--token", default=default(None), help="the nodes' Http.AdminToken (default: $MESHMQ_TOKEN)"
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        default=default(None),
        help="an admin user of the store (default: $MESHMQ_USER)",
    )
    if password:
        parser.add_argument(
            "--password",
            metavar="P",
            default=default(None),
            help="the --user's password (default: $MESHMQ_PASSWORD, else asked for)",
        )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the JSON the node returned (pretty), for scripts",
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=_positive_float,
        default=default(DEFAULT_TIMEOUT_S),
        help=f"seconds to wait for the node (default: {DEFAULT_TIMEOUT_S:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshctl",
        description="Inspect and operate a MeshMQ cluster.",
        epilog=_CREDENTIALS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _add_global_options(parser, in_command=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub: dict[str, argparse.ArgumentParser] = {}
    for name, text in _COMMANDS.items():
        sub[name] = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _add_global_options(sub[name], in_command=True)
    sub["routes"].add_argument("filter", nargs="?", metavar="FILTER", help="only routes matching this filter")
    sub["sessions"].add_argument("client", nargs="?", metavar="CLIENT", help="only this client id")
    sub["retained"].add_argument(
        "filter", nargs="?", metavar="FILTER", help="only topics matching this filter"
    )
    sub["ping"].add_argument("target", metavar="NODE", help="the node name to ping")
    sub["drain"].add_argument("target", metavar="NODE", help="the node name to drain")
    tap_parser = sub["tap"]
    tap_parser.add_argument(
        "topic", nargs="?", default="#", metavar="TOPIC", help="topic filter (default: #)"
    )
    tap_parser.add_argument(
        "--mqtt",
        metavar="HOST:PORT",
        help=f"the node's MQTT address (default: the node's host, port {DEFAULT_MQTT_PORT})",
    )
    tap_parser.add_argument("--count", type=_positive_int, metavar="N", help="stop after N messages")
    tap_parser.add_argument("--seconds", type=_positive_float, metavar="S", help="stop after S seconds")
    _add_user_commands(sub["user"])
    _add_acl_commands(sub["acl"])
    keygen = sub["keygen"]
    keygen.description = (
        "Write NAME.key (public) and NAME.key_secret (public and secret, mode 0600) in "
        "the ZeroMQ certificate format. Existing files are never overwritten."
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
    return parser


def _leaf(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str, password: bool = True
) -> argparse.ArgumentParser:
    leaf = commands.add_parser(
        name,
        help=text,
        description=text[0].upper() + text[1:] + ".",
        epilog=_CREDENTIALS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(leaf, in_command=True, password=password)
    return leaf


_NEW_PASSWORD_HELP: Final = (
    "the new password (default: asked twice without echo, or one line of stdin when it is not a "
    "terminal); here --password is the new user's, give the admin's before the command or in $MESHMQ_PASSWORD"
)


def _add_user_commands(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _CREDENTIALS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = _leaf(
        actions, "add", "create a user (or set an existing one's password and admin flag)", password=False
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--admin", action="store_true", help="an admin user: passes every ACL check, may use the admin API"
    )
    add.add_argument("--password", dest="new_password", metavar="P", help=_NEW_PASSWORD_HELP)
    passwd = _leaf(actions, "passwd", "change a user's password", password=False)
    passwd.add_argument("name", metavar="NAME")
    passwd.add_argument("--password", dest="new_password", metavar="P", help=_NEW_PASSWORD_HELP)
    admin = _leaf(actions, "admin", "make a user an admin user (on) or not (off)")
    admin.add_argument("name", metavar="NAME")
    admin.add_argument("flag", choices=("on", "off"), metavar="on|off")
    delete = _leaf(actions, "del", "delete a user and the ACL rules of that user name")
    delete.add_argument("name", metavar="NAME")
    _leaf(actions, "list", "the users and their admin flag (never a password hash)")


def _add_acl_commands(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _CREDENTIALS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = _leaf(actions, "add", "append a rule (rules are checked in id order, then Auth.Acl of the config)")
    add.add_argument("rule_user", metavar="USER", help="a user name, '$anonymous' or '*' (everyone)")
    add.add_argument("topic", metavar="TOPIC", help="an MQTT filter; %%u is the user name, %%c the client id")
    add.add_argument(
        "access",
        metavar="ACCESS",
        type=str.lower,
        choices=("pub", "sub", "both", "deny"),
        help="pub, sub, both or deny",
    )
    delete = _leaf(actions, "del", "delete a rule")
    delete.add_argument("rule_id", metavar="ID", type=_rule_id, help="its id (see meshctl acl list)")
    _leaf(actions, "list", "the rules in the order they are checked")


# --- commands ----------------------------------------------------------------------------------


def _print_json(body: Json) -> None:
    print(json.dumps(body, indent=2, sort_keys=False))


def _show(args: argparse.Namespace, reply: Reply, text: Callable[[Reply], str]) -> int:
    """Print the reply as JSON or, parsed and rendered, as text (parsing first, so that an answer
    of the wrong shape is an error in both modes)."""
    rendered = text(reply)
    if args.json:
        _print_json(reply.body)
    else:
        sys.stdout.write(rendered)
    return 0


def _filter(value: str | None, key: str) -> dict[str, str]:
    return {key: value} if value else {}


def _run_http(args: argparse.Namespace, client: NodeClient) -> int:
    command = args.command
    if command == "health":
        reply = client.get("/health", accept=(200, 503))
        health = parse_health(reply)
        _show(args, reply, lambda _r: render.render_health(health))
        return 0 if health.healthy else EXIT_FAILED
    if command == "members":
        return _show(args, client.get("/api/members"), lambda r: render.render_members(parse_members(r)))
    if command == "routes":
        reply = client.get("/api/routes", _filter(args.filter, "filter"))
        return _show(args, reply, lambda r: render.render_routes(parse_routes(r)))
    if command == "sessions":
        reply = client.get("/api/sessions", _filter(args.client, "client"))
        return _show(args, reply, lambda r: render.render_sessions(parse_sessions(r)))
    if command == "retained":
        reply = client.get("/api/retained", _filter(args.filter, "filter"))
        return _show(args, reply, lambda r: render.render_retained(parse_retained(r)))
    if command == "stats":
        return _show(args, client.get("/api/stats"), lambda r: render.render_stats(parse_stats(r)))
    if command == "ping":
        reply = client.post("/api/ping", {"node": args.target})
        return _show(args, reply, lambda r: render.render_ping(parse_ping(r)))
    if command == "drain":
        reply = client.post("/api/drain", {"node": args.target}, accept=(200, 202))
        if args.json:
            _print_json(reply.body if reply.body is not None else {"draining": args.target})
        else:
            print(f"draining {args.target}")
        return 0
    if command == "user":
        return _run_user(args, client)
    if command == "acl":
        return _run_acl(args, client)
    raise AssertionError(f"no handler for {command}")


class _InputError(Exception):
    """The operator's input cannot be used (a password prompt went wrong): exit 1, no URL."""


def _new_password(args: argparse.Namespace) -> str:
    """The new password: --password, else a prompt twice (a terminal), else one line of stdin."""
    password: str | None = args.new_password
    if password is None:
        if sys.stdin.isatty():
            password = getpass.getpass(f"New password for {args.name}: ")
            if getpass.getpass("Again: ") != password:
                raise _InputError("the two passwords differ; nothing changed")
        else:
            password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise _InputError("the password is empty; nothing changed")
    return password


def _require_user(client: NodeClient, name: str) -> None:
    """`user passwd` and `user admin` change a user; POST /api/users would create a missing one."""
    reply = client.get("/api/users")
    if not any(user.username == name for user in parse_users(reply)):
        raise MeshctlError(f"no user {name!r} (see meshctl user list)", reply.url)


def _done(args: argparse.Namespace, reply: Reply, text: str) -> int:
    if args.json:
        _print_json(reply.body)
    else:
        print(text)
    return 0


def _run_user(args: argparse.Namespace, client: NodeClient) -> int:
    action = args.action
    if action == "list":
        return _show(args, client.get("/api/users"), lambda r: render.render_users(parse_users(r)))
    name: str = args.name
    if action == "add":
        body: Json = {"username": name, "password": _new_password(args), "admin": bool(args.admin)}
        reply = client.post("/api/users", accept=(200, 201), body=body)
        change = parse_user_change(reply)
        kind = "admin user" if args.admin else "user"
        if change.created:
            return _done(args, reply, f"{kind} {name} added")
        return _done(args, reply, f"{name} existed: its password was changed, and it is now a {kind}")
    if action == "passwd":
        _require_user(client, name)
        reply = client.post(
            "/api/users", accept=(200,), body={"username": name, "password": _new_password(args)}
        )
        parse_user_change(reply)
        return _done(args, reply, f"password of {name} changed")
    if action == "admin":
        _require_user(client, name)
        on = args.flag == "on"
        reply = client.post("/api/users", accept=(200,), body={"username": name, "admin": on})
        parse_user_change(reply)
        return _done(args, reply, f"{name} is {'now' if on else 'no longer'} an admin user")
    if action == "del":
        reply = client.delete(f"/api/users/{quote(name, safe='')}")
        return _done(args, reply, f"user {name} deleted (and its ACL rules)")
    raise AssertionError(f"no handler for user {action}")


def _run_acl(args: argparse.Namespace, client: NodeClient) -> int:
    action = args.action
    if action == "list":
        return _show(args, client.get("/api/acl"), lambda r: render.render_acl(parse_acl(r)))
    if action == "add":
        body: Json = {"user": args.rule_user, "topic": args.topic, "access": args.access}
        reply = client.post("/api/acl", accept=(200, 201), body=body)
        added = parse_acl_added(reply)
        return _done(args, reply, f"rule {added.rule_id} added: {args.rule_user} {args.topic} {args.access}")
    if action == "del":
        reply = client.delete(f"/api/acl/{args.rule_id}")
        return _done(args, reply, f"rule {args.rule_id} deleted")
    raise AssertionError(f"no handler for acl {action}")


def _tap_line(message: TapMessage) -> str:
    return f"{message.topic} {message.qos} {len(message.payload)} {render.preview(message.payload)}"


def _tap_json(message: TapMessage) -> str:
    try:
        payload, encoding = message.payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(message.payload).decode("ascii"), "base64"
    record = {
        "topic": message.topic,
        "qos": message.qos,
        "retain": message.retain,
        "bytes": len(message.payload),
        "payload": payload,
        "encoding": encoding,
    }
    return json.dumps(record, separators=(",", ":"))


def _run_tap(args: argparse.Namespace, node_host: str, user: str | None, password: str | None) -> int:
    try:
        host, port = parse_address(args.mqtt or node_host, DEFAULT_MQTT_PORT)
    except ValueError as e:
        print(f"meshctl: --mqtt: {e}", file=sys.stderr)
        return EXIT_USAGE
    line = _tap_json if args.json else _tap_line

    def show(message: TapMessage) -> None:
        print(line(message), flush=True)

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a tap without --count/--seconds ends
        tap(
            host,
            port,
            args.topic,
            show,
            timeout_s=args.timeout,
            count=args.count,
            seconds=args.seconds,
            username=user,
            password=password,
        )
    return 0


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


def _admin_password(args: argparse.Namespace, user: str | None) -> str | None:
    """The --user's password: --password (before the command), $MESHMQ_PASSWORD, or a prompt."""
    if user is None:
        return None
    password: str | None = getattr(args, "password", None) or os.environ.get("MESHMQ_PASSWORD")
    if password:
        return password
    if not sys.stdin.isatty():
        raise _InputError(f"no password for user {user!r}: pass --password or set MESHMQ_PASSWORD")
    return getpass.getpass(f"Password of {user}: ")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --version, --help or a usage error, already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("meshctl: a command is required (see meshctl --help)", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "keygen":
        return _keygen(args.dir, args.name)
    node_text = args.node or os.environ.get("MESHMQ_NODE") or DEFAULT_NODE
    try:
        host, port = parse_address(node_text, DEFAULT_HTTP_PORT)
    except ValueError as e:
        print(f"meshctl: --node: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.token and args.user:
        print("meshctl: give --token or --user, not both", file=sys.stderr)
        return EXIT_USAGE
    token = args.token or (None if args.user else os.environ.get("MESHMQ_TOKEN")) or None
    user = None if token else args.user or os.environ.get("MESHMQ_USER") or None
    try:
        if args.command == "tap":
            # an MQTT client: a store user's name and password when the node has Auth.Enabled
            mqtt_user = args.user or os.environ.get("MESHMQ_USER") or None
            return _run_tap(args, host, mqtt_user, _admin_password(args, mqtt_user))
        password = _admin_password(args, user)
        client = NodeClient(host, port, token=token, user=user, password=password, timeout_s=args.timeout)
        return _run_http(args, client)
    except _InputError as e:
        print(f"meshctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    except MeshctlError as e:
        print(f"meshctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("meshctl: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # `meshctl tap | head`: the reader left; nothing more to say
        with contextlib.suppress(OSError, ValueError):  # nor at exit, when Python flushes stdout
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
