"""MQTT and HTTP clients for the split-brain lab tests: programs run in the lab's client host.

Why: the split-brain tests (`test_split_brain_netns.py`, issue 6) must ask every node of a
partitioned lab cluster what it answers to a CONNECT, which retained messages it holds and
where it thinks a client id lives. The nodes live on lab addresses that only lab namespaces
may reach, so each question is a short program (`client_main`, a mode per question, built on
the e2e `TestClient`) run with `ip netns exec <prefix>-c` in the client host; the functions
below (`connacks`, `publish_retained`, `retained_sets`, `wait_retained`, `http_get`,
`SessionClient`) run those programs from the test process and parse their one JSON line.
The client host reaches every node during the tests' cuts (only node-to-node frames are cut),
so a node's answer is its own view of the cluster.

Must not: address a lab IP from the root namespace (everything that talks to a node runs in
the client host); import anything heavy at module level (this module is imported again by every
client program, so it imports only the standard library and the e2e client); wait unbounded
(every program has a deadline of its own and `Lab.exec` another one above it); leave a
program running (`SessionClient.close` kills its process group; `Lab.teardown` does anyway).

Invariants:
- A retained set is what a fresh subscriber to `<prefix>/#` receives with the RETAIN flag
  ([MQTT-3.3.1-6]: retained messages arrive on subscribe), as a mapping topic -> payload; a
  cleared topic is absent from it.
- A retained step with payload None publishes an empty retained message: the clear of
  [MQTT-3.3.1-10].
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from tests.cluster.netns import Lab

__all__ = [
    "Address",
    "Connack",
    "ConnackProbe",
    "HttpAnswer",
    "RetainedStep",
    "SessionClient",
    "client_main",
    "connacks",
    "http_get",
    "publish_retained",
    "retained_sets",
    "wait_retained",
]

REPO: Final = Path(__file__).resolve().parents[2]
CONNECT_TIMEOUT_S: Final = 3.0
EXEC_SLACK_S: Final = 15.0  # above a program's own deadline: python start-up on a loaded machine
RETAINED_QUIET_S: Final = 0.3  # a subscriber that has every expected topic waits this much for more
RETAINED_IDLE_S: Final = 1.0  # ... and one that has not stops after this much silence
SESSION_EXPIRY_S: Final = 300
POLL_S: Final = 0.05
_BOOT: Final = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from tests.cluster.split_helpers import client_main; client_main(sys.argv[2:])"
)


@dataclass(frozen=True, slots=True)
class Address:
    """A node as an MQTT client sees it (`tests.e2e.clients.BrokerAddress`)."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ConnackProbe:
    """CONNECT to `address` with MQTT `version` until the CONNACK code is `expect` (bounded)."""

    address: Address
    version: int
    expect: int


@dataclass(frozen=True, slots=True)
class Connack:
    code: int | None  # None: no CONNACK at all (connection refused or closed)
    reference: str | None  # MQTT 5 Server Reference of the CONNACK
    waited_s: float


@dataclass(frozen=True, slots=True)
class RetainedStep:
    """Publish a retained message (QoS 1, PUBACK awaited) on a node; None clears the topic."""

    address: Address
    topic: str
    payload: str | None
    pause_after_s: float = 0.0


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    body: Any


# --- the programs (run in the client host) -------------------------------------------------------


class _Broker:
    """`Address` as the e2e client's `BrokerAddress` protocol wants it (plain attributes)."""

    def __init__(self, address: Address) -> None:
        self.host = address.host
        self.port = address.port


def _client(address: Address, client_id: str, **kwargs: Any) -> Any:
    from tests.e2e.clients import TestClient

    return TestClient(_Broker(address), client_id, **kwargs)


def _connack_until(probe: ConnackProbe, deadline: float) -> dict[str, Any]:
    from tests.e2e.clients import prop

    started = time.monotonic()
    while True:
        client = _client(probe.address, f"sb-probe-{time.time_ns()}", version=probe.version)
        code: int | None = None
        reference: str | None = None
        try:
            result = client.connect(timeout_s=CONNECT_TIMEOUT_S)
            code, reference = result.reason_code, prop(result, "ServerReference")
        except (OSError, ConnectionError, AssertionError):
            pass
        finally:
            client.close()
        if code == probe.expect or time.monotonic() >= deadline:
            return {"code": code, "reference": reference, "waited_s": time.monotonic() - started}
        time.sleep(0.1)


def _publish(steps: list[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    clients: dict[tuple[str, int], Any] = {}
    try:
        for step in steps:
            address = Address(step["host"], int(step["port"]))
            key = (address.host, address.port)
            if key not in clients:
                client = _client(address, f"sb-pub-{address.host}-{time.time_ns()}")
                clients[key] = client
                code = client.connect(timeout_s=CONNECT_TIMEOUT_S).reason_code
                if code != 0:
                    raise SystemExit(f"CONNECT to {key} refused: 0x{code:02x}")
            payload = b"" if step["payload"] is None else str(step["payload"]).encode()
            code = clients[key].publish(step["topic"], payload, qos=1, retain=True, timeout_s=timeout_s)
            if code >= 0x80:
                raise SystemExit(f"PUBLISH {step['topic']} on {key} refused: 0x{code:02x}")
            if step["pause_after_s"]:
                time.sleep(float(step["pause_after_s"]))
    finally:
        for client in clients.values():
            client.close()
    return {"published": len(steps)}


def _retained(address: Address, prefix: str, expect_count: int, max_s: float) -> dict[str, str]:
    deadline = time.monotonic() + max_s
    got: dict[str, str] = {}
    client = _client(address, f"sb-read-{time.time_ns()}")
    try:
        code = client.connect(timeout_s=CONNECT_TIMEOUT_S).reason_code
        if code != 0:
            raise SystemExit(f"CONNECT to {address} refused: 0x{code:02x}")
        codes = client.subscribe(f"{prefix}/#", qos=1, timeout_s=CONNECT_TIMEOUT_S)
        if any(c >= 0x80 for c in codes):
            raise SystemExit(f"SUBSCRIBE on {address} refused: {codes}")
        last = time.monotonic()
        while time.monotonic() < deadline:
            quiet = RETAINED_QUIET_S if len(got) >= expect_count else RETAINED_IDLE_S
            if time.monotonic() - last >= quiet:
                break
            try:
                message = client.messages.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if message.retain:
                got[message.topic] = message.payload.decode("utf-8", "replace")
            last = time.monotonic()
    finally:
        client.close()
    return got


def _session(address: Address, client_id: str, max_s: float) -> None:
    """Connect (persistent session), then report when the server ends the connection."""
    deadline = time.monotonic() + max_s
    client = _client(address, client_id, clean_start=False, session_expiry_s=SESSION_EXPIRY_S, keepalive_s=30)
    try:
        result = client.connect(timeout_s=CONNECT_TIMEOUT_S)
        _emit({"event": "connack", "code": result.reason_code, "present": result.session_present})
        while time.monotonic() < deadline:
            try:
                reason = client.wait_disconnected(timeout_s=0.1)
            except AssertionError:  # still connected
                continue
            _emit({"event": "disconnected", "reason": reason})
            return
        _emit({"event": "timeout"})
    finally:
        client.close()


def _http(host: str, port: int, path: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as answer:
            return {"status": answer.status, "body": json.loads(answer.read())}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": json.loads(e.read() or b"null")}


def _emit(value: object) -> None:
    print(json.dumps(value), flush=True)


def client_main(argv: list[str]) -> None:
    """`MODE JSON-ARGS`: one question to the nodes, answered with one JSON line on stdout.

    connack   {"probes": [[host, port, version, expect]], "timeout_s"} -> [Connack fields]
    publish   {"steps": [{host, port, topic, payload, pause_after_s}], "timeout_s"}
    retained  {"nodes": {name: [host, port]}, "prefix", "expect_count", "max_s"} -> {name: {topic: payload}}
    session   {"host", "port", "client_id", "max_s"} -> one line per event (connack, disconnected, timeout)
    http      {"host", "port", "path"} -> {"status", "body"}
    """
    mode, args = argv[0], json.loads(argv[1])
    if mode == "connack":
        deadline = time.monotonic() + float(args["timeout_s"])
        probes = [ConnackProbe(Address(h, p), v, e) for h, p, v, e in args["probes"]]
        _emit([_connack_until(probe, deadline) for probe in probes])
    elif mode == "publish":
        _emit(_publish(args["steps"], float(args["timeout_s"])))
    elif mode == "retained":
        nodes = {name: Address(h, p) for name, (h, p) in args["nodes"].items()}
        count, max_s = int(args["expect_count"]), float(args["max_s"])
        _emit({name: _retained(a, args["prefix"], count, max_s) for name, a in nodes.items()})
    elif mode == "session":
        _session(Address(args["host"], int(args["port"])), args["client_id"], float(args["max_s"]))
    elif mode == "http":
        _emit(_http(args["host"], int(args["port"]), args["path"]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


# --- the callers (test process, root namespace) -----------------------------------------------------


def _argv(mode: str, args: Mapping[str, object]) -> list[str]:
    return [sys.executable, "-c", _BOOT, str(REPO), mode, json.dumps(args)]


def _run(lab: Lab, mode: str, args: Mapping[str, object], timeout_s: float) -> Any:
    from tests.cluster.netns import CLIENT

    done = lab.exec(CLIENT, _argv(mode, args), timeout_s=timeout_s + EXEC_SLACK_S)
    if done.returncode != 0:
        raise AssertionError(
            f"client program {mode} {dict(args)} failed ({done.returncode}):\n"
            f"{done.stdout[-1500:]}{done.stderr[-1500:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def connacks(lab: Lab, probes: Sequence[ConnackProbe], timeout_s: float = 10.0) -> list[Connack]:
    """From the client host: each probe's CONNACK, retried until it is the expected code (one
    deadline for all); the caller asserts on the codes."""
    rows = [[p.address.host, p.address.port, p.version, p.expect] for p in probes]
    answers = _run(lab, "connack", {"probes": rows, "timeout_s": timeout_s}, timeout_s)
    return [Connack(a["code"], a["reference"], float(a["waited_s"])) for a in answers]


def publish_retained(lab: Lab, steps: Sequence[RetainedStep], timeout_s: float = 10.0) -> None:
    """From the client host: each step in order (one connection per node), PUBACK awaited."""
    rows = [
        {
            "host": s.address.host,
            "port": s.address.port,
            "topic": s.topic,
            "payload": s.payload,
            "pause_after_s": s.pause_after_s,
        }
        for s in steps
    ]
    _run(lab, "publish", {"steps": rows, "timeout_s": timeout_s}, timeout_s * max(1, len(steps)))


def retained_sets(
    lab: Lab, nodes: Mapping[str, Address], prefix: str, expect_count: int, max_s: float = 5.0
) -> dict[str, dict[str, str]]:
    """From the client host: node name -> the retained set under `prefix/` a new subscriber gets."""
    args = {
        "nodes": {name: [a.host, a.port] for name, a in nodes.items()},
        "prefix": prefix,
        "expect_count": expect_count,
        "max_s": max_s,
    }
    answer: dict[str, dict[str, str]] = _run(lab, "retained", args, max_s * max(1, len(nodes)))
    return answer


def wait_retained(
    lab: Lab,
    nodes: Mapping[str, Address],
    prefix: str,
    expected: Mapping[str, str],
    timeout_s: float,
) -> float:
    """Poll until every node's retained set under `prefix/` is `expected`; the seconds waited."""
    started = time.monotonic()
    want = dict(expected)
    while True:
        sets = retained_sets(lab, nodes, prefix, len(want))
        if all(got == want for got in sets.values()):
            return time.monotonic() - started
        if time.monotonic() - started >= timeout_s:
            wrong = {name: got for name, got in sets.items() if got != want}
            raise AssertionError(
                f"retained sets under {prefix}/ are not {want} after {timeout_s}s; differing: {wrong}"
            )
        time.sleep(0.2)


def http_get(lab: Lab, host: str, port: int, path: str) -> HttpAnswer:
    """From the client host: GET `path` on a node's HTTP port."""
    answer = _run(lab, "http", {"host": host, "port": port, "path": path}, 10.0)
    return HttpAnswer(int(answer["status"]), answer["body"])


class SessionClient:
    """A persistent-session client (client host) that stays connected until the server ends the
    connection or `max_s` passes; its events are JSON lines in `out_path`."""

    def __init__(self, lab: Lab, address: Address, client_id: str, out_path: Path, max_s: float) -> None:
        from tests.cluster.netns import CLIENT

        self.address = address
        self.out_path = out_path
        self._out: IO[bytes] = open(out_path, "wb")  # noqa: SIM115  (closed in close())
        args = {"host": address.host, "port": address.port, "client_id": client_id, "max_s": max_s}
        self.proc = lab.run(CLIENT, _argv("session", args), stdout=self._out, stderr=subprocess.STDOUT)

    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.out_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict) and "event" in value:
                    events.append(value)
        return events

    def event(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in self.events() if e["event"] == kind), None)

    def wait_event(self, kind: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.event(kind)
            if found is not None:
                return found
            if self.proc.poll() is not None or time.monotonic() >= deadline:
                raise AssertionError(
                    f"session client on {self.address}: no {kind!r} within {timeout_s}s; output: "
                    f"{self.out_path.read_text(errors='replace')[-1500:]} (exit {self.proc.poll()})"
                )
            time.sleep(POLL_S)

    def close(self) -> None:
        from tests.process_group import GONE_TIMEOUT_S, kill_group

        if self.proc.poll() is None:
            kill_group(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(GONE_TIMEOUT_S)
        self._out.close()
