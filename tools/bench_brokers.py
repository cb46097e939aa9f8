"""The broker processes of a bench run: start on free loopback ports, watch, stop.

Why: `tools/bench.py` decides what to run and how to report it; owning a broker process from
start to stop (its ports, its command line and configuration file, its process group, its log,
the guard that kills it when it bloats) is a concern of its own, and the part that must be
right for the machine's sake whatever the scenarios do.

Must not: send traffic anywhere but 127.0.0.1 (`HOST`); leave a broker running; stop a process
it did not start (a broker is stopped, or killed, through the process group of the PID it
spawned, never by name); import the broker package (MeshMQ runs as a user runs it, through its
CLI and a configuration file).

Invariants:
- Every broker runs in a new session (`start_new_session=True`), so its whole tree (MeshMQ's
  supervisor, relay and workers) is one process group: SIGTERM to the group, a wait of
  `STOP_TIMEOUT_S`, then SIGKILL; `Broker.stop` is safe to call twice and on a dead broker.
- `Broker.start` returns True only once every port it was given accepts a TCP connection
  (the main port and each worker's own port), else it stops what it started and says why in
  `start_error` with the tail of the broker's log.
- The files of a broker (log, configuration, MeshMQ's ipc:// directory) live in its `workdir`,
  which the caller owns and removes: nothing outlives the run, even a killed node's sockets.
- `RssGuard` samples the tree every `RSS_POLL_S` and sends SIGKILL to the group at most once,
  the first time the RSS passes its limit.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools import procstat
from tools.loadgen.scenarios import ScenarioResult

__all__ = [
    "HOST",
    "LISTEN_TIMEOUT_S",
    "MAX_WORKER_PORT",
    "MOSQUITTO",
    "RSS_POLL_S",
    "STOP_TIMEOUT_S",
    "Broker",
    "BrokerSpec",
    "RssGuard",
    "free_port",
    "free_port_base",
    "port_free",
    "wait_listening",
]

MOSQUITTO = "/usr/sbin/mosquitto"
HOST = "127.0.0.1"
LISTEN_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
MAX_WORKER_PORT = 65_535
RSS_POLL_S = 0.25


@dataclass(frozen=True, slots=True)
class BrokerSpec:
    label: str  # the table's column name
    kind: str  # "meshmq" or "mosquitto"
    args: tuple[str, ...] = ()  # extra command-line arguments (MeshMQ variants)
    worker_ports: int = 0  # MeshMQ: > 0 sets WorkerPortBase; workers 1..worker_ports get a port each


@dataclass(slots=True)
class Broker:
    """One broker process of this run, owned by this module from start to stop."""

    spec: BrokerSpec
    workdir: Path
    port: int = 0
    worker_port_base: int = 0  # worker i listens on worker_port_base + i too (spec.worker_ports > 0)
    proc: subprocess.Popen[bytes] | None = None
    command: tuple[str, ...] = ()
    start_error: str | None = None
    starts: int = 0
    results: dict[str, ScenarioResult] = field(default_factory=dict)
    roles: dict[int, str] = field(default_factory=dict)  # pid -> supervisor, relay, worker N

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def worker_port(self, index: int) -> int:
        if not 1 <= index <= self.spec.worker_ports:
            raise ValueError(f"{self.spec.label} has no port of its own for worker {index}")
        return self.worker_port_base + index

    def process_names(self) -> dict[int, str]:
        """PID -> role in MeshMQ's tree, from the supervisor's 'worker 1 started (pid N)' lines.

        Remembered, so that the names outlive the log (the run's temporary directory).
        """
        if self.pid is not None:
            self.roles[self.pid] = "supervisor" if self.spec.kind == "meshmq" else self.spec.kind
        path = self.workdir / "broker.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        for match in re.finditer(r"\b(relay|worker \d+|store) started \(pid (\d+)\)", text):
            self.roles[int(match.group(2))] = match.group(1)
        return dict(self.roles)

    def log_tail(self, lines: int = 5) -> str:
        path = self.workdir / "broker.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def start(self) -> bool:
        self.starts += 1
        self.port = free_port()
        if self.spec.worker_ports:
            self.worker_port_base = free_port_base(self.spec.worker_ports, avoid=self.port)
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
        ports = [self.port, *(self.worker_port_base + i for i in range(1, self.spec.worker_ports + 1))]
        error = None
        for port in ports:  # every worker's own port: the node is up, not only its first worker
            error = error or wait_listening(port, self.proc, LISTEN_TIMEOUT_S)
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
        # The ipc:// directory inside the workdir: removed with it even if the node is killed.
        config.write_text(
            f"ListenAddress: {HOST}\nTCP: {self.port}\nWorkerPortBase: {self.worker_port_base}\n"
            f"SessionStore:\n  Type: MEMORY\nMesh:\n  IpcDir: {self.workdir / 'ipc'}\n"
        )
        exe = Path(sys.executable).with_name("meshmq")
        base = (str(exe),) if exe.exists() else (sys.executable, "-m", "broker.cli")
        return (*base, "-config", str(config), "-port", str(self.port), *self.spec.args)

    def stop(self) -> None:
        """SIGTERM the process group we created, wait, then SIGKILL it if it lingers."""
        if self.proc is None:
            return
        self.process_names()
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


def port_free(port: int) -> bool:
    """Can we bind it? (Without SO_REUSEPORT, so another broker's reuse-port listener counts.)"""
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port_base(count: int, avoid: int = 0, attempts: int = 100) -> int:
    """A base such that base + 1 .. base + count are free ports (and none is `avoid`)."""
    for _ in range(attempts):
        base = free_port() - 1
        ports = range(base + 1, base + count + 1)
        if base + count <= MAX_WORKER_PORT and avoid not in ports and all(map(port_free, ports[1:])):
            return base
    raise OSError(f"no {count} consecutive free ports found on {HOST}")


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


class RssGuard:
    """A thread that samples the broker tree's RSS and kills the tree past a limit."""

    def __init__(self, pid: int, limit_bytes: int) -> None:
        self.pid = pid
        self.limit_bytes = limit_bytes
        self.peak_bytes = 0
        self.killed_at_bytes: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rss-guard", daemon=True)

    def __enter__(self) -> RssGuard:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _watch(self) -> None:
        while not self._stop.wait(RSS_POLL_S):
            rss_bytes = procstat.sample_tree(self.pid).rss_bytes
            self.peak_bytes = max(self.peak_bytes, rss_bytes)
            if rss_bytes > self.limit_bytes:
                self.killed_at_bytes = rss_bytes
                _signal_group(self.pid, signal.SIGKILL)
                return
