"""What the cluster tests' nodes share, on loopback (`nodes.py`) and in lab hosts (`lab_nodes.py`).

Why: both run a MeshMQ node as `COMMAND -cluster -config FILE` in a process group of its own,
log each start to a new file, stop it with SIGTERM (a drain) or kill it with SIGKILL, and learn
the cluster's state from the relay's `cluster view: alive=[n1, n2]` log lines (sorted node names,
itself included, logged whenever its view changes). Only two things differ: where the process is
spawned (`NodeProcess._spawn`: here, or inside a lab host) and how readiness is seen
(`NodeProcess.wait_ready`: a TCP connect, or a log line when this process must not reach the
node's address). `NodeSet` is the half of a cluster that does not depend on either.

Must not: signal any process but a node's own process group; leave a wait unbounded.

Invariants:
- A node keeps its name, ports, IPC directory and configuration across restarts; each start logs
  to a new file (`log_path` is the current one).
- `stop` and `kill` return only when no process of the node's group is alive (zombies count as
  gone), so that a restart can bind the same ports.
- `wanted` holds from `launch` until the test stops or kills the node: a node that is wanted and
  not running exited on its own, which every wait of `NodeSet` reports at once, with its log.
- The waits read the logs incrementally (`LogFollower`), by complete lines only.
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar, Final, Generic, Self, TypeVar

import yaml

from tests.process_group import GONE_TIMEOUT_S, kill_group

__all__ = ["VIEW_LINE", "LogFollower", "NodeProcess", "NodeSet", "parse_view"]

VIEW_LINE: Final = re.compile(r"cluster view: alive=\[([^\]]*)\]")
_POLL_S: Final = 0.05


def parse_view(line: str) -> frozenset[str] | None:
    """The node names of a `cluster view: alive=[a, b]` line, or None if it is no such line."""
    found = VIEW_LINE.search(line)
    if found is None:
        return None
    return frozenset(name.strip().strip("'\"") for name in found.group(1).split(",") if name.strip())


class LogFollower:
    """Reads a growing log file by complete lines, from where the last call stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        return [line.decode(errors="replace") for line in lines]


class NodeProcess(abc.ABC):
    """One MeshMQ node n<index>; `host`/`port` make it a broker address for the test clients."""

    STOP_TIMEOUT_S: ClassVar[float] = 15.0  # how long `stop` lets a drain take before SIGKILL
    IPC_PREFIX: ClassVar[str] = "mqn"  # of the IPC directory's name, before the index

    def __init__(
        self,
        index: int,
        workdir: Path,
        host: str,
        port: int,
        mesh_port: int,
        command: Sequence[str],
    ) -> None:
        self.index = index
        self.name = f"n{index}"
        self.workdir = workdir
        self.host = host
        self.port = port
        self.mesh_port = mesh_port
        self.command = list(command)
        self.config: dict[str, Any] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.wanted = False  # started by the test and not stopped or killed by it since
        # Unix socket paths are short (108 bytes): the IPC directory lives under /tmp, not tmp_path.
        self.ipc_dir = tempfile.mkdtemp(prefix=f"{self.IPC_PREFIX}{index}.", dir="/tmp")

    @abc.abstractmethod
    def _spawn(self, argv: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        """Start `argv` in a process group of its own, stdout and stderr to `log`."""

    @abc.abstractmethod
    def wait_ready(self, timeout_s: float) -> None:
        """Wait until the node serves MQTT; RuntimeError with the log tail if it exited or is late."""

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.yaml"

    @property
    def log_path(self) -> Path:
        """The log of the current (latest) start."""
        return self.workdir / f"{self.name}-{max(self.starts, 1)}.log"

    @property
    def pid(self) -> int | None:
        """The supervisor's pid (it leads the node's process group), None before the first start."""
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return self.config_path

    def launch(self) -> None:
        """Start the process (config rewritten from `self.config`) without waiting for it."""
        if self.running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.write_config()
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = self._spawn([*self.command, "-cluster", "-config", str(self.config_path)], log)
        self.wanted = True

    def start(self, timeout_s: float = 20.0) -> Self:
        self.launch()
        self.wait_ready(timeout_s)
        return self

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the node's whole process group (if it was started)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM (a graceful drain) and wait; SIGKILL past `timeout_s` (default `STOP_TIMEOUT_S`);
        the supervisor's exit code once no process of the group is left."""
        self.wanted = False
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(self.STOP_TIMEOUT_S if timeout_s is None else timeout_s)
        self.kill()  # whatever outlived the drain (or all of it, if the drain was late)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the node's process group (a crash: nothing flushed) and wait until it is gone."""
        self.wanted = False
        if self.proc is not None:
            if self.proc.poll() is None:
                self.send_signal(signal.SIGKILL)  # at once, before the slower look at /proc
            kill_group(self.proc.pid, label=f"{self.name}: ")
            self.proc.wait(GONE_TIMEOUT_S)

    def log(self) -> str:
        """The current start's log."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> int:
        """How many complete lines the current log holds now (a mark for `NodeSet.wait_log`)."""
        return self.log().count("\n")

    def log_tail(self, lines: int = 40) -> str:
        text = "\n".join(self.log().splitlines()[-lines:])
        return f"--- {self.name} ({self.log_path.name}) ---\n{text}"

    def close(self) -> None:
        """Stop if running and remove the IPC directory."""
        if self.running():
            self.stop()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


N = TypeVar("N", bound=NodeProcess)


class NodeSet(Generic[N]):
    """Nodes 1..n named n<i>, with what a cluster does to all of them and its waits on their logs."""

    def __init__(self, name: str, nodes: list[N]) -> None:
        self.name = name
        self.nodes = nodes
        self._followers: dict[Path, LogFollower] = {}
        self._views: dict[Path, frozenset[str]] = {}

    def node(self, i: int) -> N:
        """Node i, 1..n (named n<i>)."""
        if not 1 <= i <= len(self.nodes):
            raise IndexError(f"node index {i} not in 1..{len(self.nodes)}")
        return self.nodes[i - 1]

    def __len__(self) -> int:
        return len(self.nodes)

    def _chosen(self, indexes: Iterable[int] | None) -> list[N]:
        return [self.node(i) for i in (indexes if indexes is not None else range(1, len(self) + 1))]

    def _wait_ready(self, chosen: Sequence[N], timeout_s: float) -> None:
        """Wait until each node of `chosen` (launched together) is ready, one deadline for all."""
        deadline = time.monotonic() + timeout_s
        for nd in chosen:
            nd.wait_ready(max(0.1, deadline - time.monotonic()))

    def running(self) -> list[N]:
        return [nd for nd in self.nodes if nd.running()]

    def stop_all(self, timeout_s: float | None = None) -> None:
        """SIGTERM every running node at once, wait (SIGKILL past `timeout_s`), remove IPC dirs."""
        if timeout_s is None:
            timeout_s = max((nd.STOP_TIMEOUT_S for nd in self.nodes), default=NodeProcess.STOP_TIMEOUT_S)
        for nd in self.nodes:
            nd.wanted = False
            if nd.running():
                nd.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for nd in self.nodes:
            if nd.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    nd.proc.wait(max(0.1, deadline - time.monotonic()))
                nd.kill()
            nd.close()

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(nd.log_tail(lines) for nd in self.nodes if nd.starts)

    # --- waiting on the logs

    def _follow(self, nd: N) -> frozenset[str] | None:
        """Read `nd`'s new log lines; its latest view in its current log (None: none yet)."""
        path = nd.log_path
        follower = self._followers.setdefault(path, LogFollower(path))
        for line in follower.new_lines():
            view = parse_view(line)
            if view is not None:
                self._views[path] = view
        return self._views.get(path)

    def views(self) -> dict[str, frozenset[str] | None]:
        """Each running node's latest `cluster view` (None if it logged none yet)."""
        return {nd.name: self._follow(nd) for nd in self.running()}

    def _wait_views(self, wanted: Callable[[], Mapping[str, frozenset[str]]], timeout_s: float) -> float:
        """Wait until the latest view of each node named in `wanted()` (asked again at every
        poll) is the set it maps to; the seconds waited. A node the test started that exited on
        its own is an error at once (with its log); so is nothing to wait for, at the deadline."""
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            crashed = [nd for nd in self.nodes if nd.wanted and not nd.running()]
            if crashed:
                tails = "\n".join(nd.log_tail() for nd in crashed)
                raise AssertionError(f"nodes exited on their own: {[nd.name for nd in crashed]}\n{tails}")
            want = wanted()
            views = {nd.name: self._follow(nd) for nd in self.nodes if nd.name in want}
            if want and all(views[name] == names for name, names in want.items()):
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                shown = {name: sorted(v) if v is not None else None for name, v in views.items()}
                expected = {name: sorted(v) for name, v in want.items()}
                raise AssertionError(
                    f"cluster {self.name}: views {shown} are not {expected} after {timeout_s}s\n"
                    f"{self.log_tails()}"
                )
            time.sleep(_POLL_S)

    def wait_members(self, timeout_s: float = 20.0, expected: Iterable[str] | None = None) -> float:
        """Wait until every running node's latest view is `expected` (default: the running nodes);
        the seconds waited."""
        fixed = frozenset(expected) if expected is not None else None

        def wanted() -> dict[str, frozenset[str]]:
            running = self.running()
            want = fixed if fixed is not None else frozenset(nd.name for nd in running)
            return {nd.name: want for nd in running}

        return self._wait_views(wanted, timeout_s)

    def wait_log(
        self, node: N | int, regex: str | re.Pattern[str], timeout_s: float = 10.0, after: int = 0
    ) -> re.Match[str]:
        """The first line of `node`'s current log (from line `after` on) matching `regex`."""
        nd = self.node(node) if isinstance(node, int) else node
        pattern = re.compile(regex)
        follower = LogFollower(nd.log_path)
        seen = 0
        deadline = time.monotonic() + timeout_s
        while True:
            for line in follower.new_lines():
                seen += 1
                if seen > after and (found := pattern.search(line)) is not None:
                    return found
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no line matching {pattern.pattern!r} in {nd.log_path} within {timeout_s}s\n{nd.log_tail()}"
                )
            time.sleep(_POLL_S)
