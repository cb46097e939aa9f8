"""Start a cluster of real MeshMQ nodes on one machine (tier 1: 127.0.0.x addresses, no root).

Why: the cluster tests (issue 5) need several real nodes that find each other, and need to kill,
stop and restart them as a user would. `Cluster` writes one YAML configuration per node and
starts `python -m broker.cli -cluster -config FILE` (or the `meshmq` script) in its own process
group, logging to a file per start. Node i (1..n) is `n<i>` on 127.0.0.<i+1> (127.0.0.2, .3,
...), with an MQTT port and a mesh port of its own; all nodes share one PostgreSQL database and
list every node (themselves included) in `Mesh.TcpIp.Members`, or find each other with mDNS on
loopback (`mdns=True`). Heartbeat timeouts are short (200 / 600 / 1500 ms) so deaths show fast.

`wait_members` waits on the relay's log line `cluster view: alive=[n1, n2, n3]` (sorted node
names, itself included, logged whenever its view changes): it reads every running node's current
log incrementally and returns when each one's LATEST view is the set of running nodes.

Must not: signal any process but a node's own process group; send traffic anywhere but loopback
(mDNS only on 127.0.0.1); leave a wait unbounded; share an IPC directory, a cluster name or a port
with another test (ports come from a random block below the kernel's ephemeral range, checked
free on the node's own address, so that `bind(0)` users never take them while a node is down).

Invariants:
- A node keeps its name, ports, IPC directory and configuration across restarts; each start logs
  to a new file (`log_path` is the current one).
- `kill` returns only when no process of the node's group is alive (zombies count as gone), so a
  restart can bind the same ports.
- `start` returns when the node's MQTT port accepts connections; a node whose process exits
  before that raises with its log tail.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from tests.e2e.broker_proc import REPO, _meshmq_command, wait_listening
from tests.e2e.workers_helpers import free_port_block

__all__ = [
    "CLUSTER_READY",
    "Cluster",
    "LogFollower",
    "Node",
    "NodeExtra",
    "deep_merge",
    "parse_view",
]

CLUSTER_READY: Final = (REPO / "mesh" / "cluster.py").exists()

VIEW_LINE: Final = re.compile(r"cluster view: alive=\[([^\]]*)\]")
PEER_HEARTBEAT_MS: Final = 200
SUSPECT_AFTER_MS: Final = 600
DEAD_AFTER_MS: Final = 1500
_START_TIMEOUT_S: Final = 20.0
_STOP_TIMEOUT_S: Final = 15.0
_GONE_TIMEOUT_S: Final = 10.0
_POLL_S: Final = 0.05
_PORT_ATTEMPTS: Final = 50
_START_ATTEMPTS: Final = 3
_MAX_NODES: Final = 50

# Per-node extra configuration: one mapping for every node, or a function of the node index.
NodeExtra = Mapping[str, Any] | Callable[[int], Mapping[str, Any]]

_cluster_numbers = itertools.count(1)


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in: mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


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


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_ports(hosts: Sequence[str]) -> list[int]:
    """Two ports per host (MQTT, mesh), all distinct, each free now on its host and on 127.0.0.1."""
    count = 2 * len(hosts)
    for _ in range(_PORT_ATTEMPTS):
        base = free_port_block(count)  # checked on 127.0.0.1, below the ephemeral range
        ports = [base + k for k in range(1, count + 1)]
        if all(_port_free(hosts[k // 2], port) for k, port in enumerate(ports)):
            return ports
    raise RuntimeError(f"no block of {count} free ports for {list(hosts)} in {_PORT_ATTEMPTS} attempts")


def _group_alive(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes of process group `pgid`."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # comm may hold spaces: split after it
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


class Node:
    """One MeshMQ node of a `Cluster`. `host`/`port` make it a broker address for the test clients."""

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
        self.ipc_dir = tempfile.mkdtemp(prefix=f"mqc{index}.", dir="/tmp")

    def __repr__(self) -> str:
        return f"Node({self.name} {self.host}:{self.port} mesh {self.mesh_port} pid {self.pid})"

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
            self.proc = subprocess.Popen(
                [*self.command, "-cluster", "-config", str(self.config_path)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() takes every child with it
            )
        self.wanted = True

    def wait_ready(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Wait until the MQTT port accepts; RuntimeError with the log tail if the node exited."""
        assert self.proc is not None
        try:
            wait_listening(self.host, self.port, self.proc, timeout_s)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{self.name}: {e}\n{self.log_tail()}") from e

    def start(self, timeout_s: float = _START_TIMEOUT_S) -> Node:
        self.launch()
        self.wait_ready(timeout_s)
        return self

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the node's whole process group (if it was started)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (a graceful drain) and wait; SIGKILL if it takes longer than `timeout_s`."""
        self.wanted = False
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode
        self._wait_group_gone()
        return code

    def kill(self) -> None:
        """SIGKILL the node's process group (a crash: nothing flushed) and wait until it is gone."""
        self.wanted = False
        if self.proc is None:
            return
        self.send_signal(signal.SIGKILL)
        self.proc.wait(_GONE_TIMEOUT_S)
        self._wait_group_gone()

    def _wait_group_gone(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + _GONE_TIMEOUT_S
        while alive := _group_alive(self.proc.pid):
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name}: processes {alive} still alive after {_GONE_TIMEOUT_S}s")
            self.send_signal(signal.SIGKILL)  # a worker that outlived its supervisor
            time.sleep(0.01)

    def pause(self) -> None:
        """SIGSTOP the node's group: a hung node (the kernel still accepts TCP for it)."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.send_signal(signal.SIGCONT)

    def restart(self, timeout_s: float = _START_TIMEOUT_S) -> Node:
        """Stop (gracefully) if running, then start with the same name, ports and configuration."""
        if self.running():
            self.stop()
        return self.start(timeout_s)

    def log(self) -> str:
        """The current start's log."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        text = "\n".join(self.log().splitlines()[-lines:])
        return f"--- {self.name} ({self.log_path.name}) ---\n{text}"

    def close(self) -> None:
        """Stop if running and remove the IPC directory."""
        if self.running():
            self.stop()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


class Cluster:
    """n MeshMQ nodes sharing one PostgreSQL database; see the module docstring.

    Configurations are written at construction (nothing starts): `start` starts every node, or
    only the ones named (`start([1, 2])`, then `node(3).start()` for a node that joins late).
    `extra` is merged into every node's configuration (a mapping, or a function of the index)."""

    def __init__(
        self,
        tmp_path: Path,
        pg_url: str,
        n: int = 3,
        workers: int = 1,
        mdns: bool = False,
        curve: bool = False,
        extra: NodeExtra | None = None,
        *,
        command: Sequence[str] | None = None,
    ) -> None:
        if not 1 <= n <= _MAX_NODES:
            raise ValueError(f"a cluster has 1..{_MAX_NODES} nodes, not {n}")
        self.workdir = tmp_path
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pg_url = pg_url
        self.workers = workers
        self.mdns = mdns
        self.curve = curve
        self.extra = extra
        # mDNS on lo is shared by every test of the machine: a name no other test uses.
        self.name = f"mq-{next(_cluster_numbers)}-{uuid.uuid4().hex[:12]}"
        self.key_file = self._make_keys() if curve else ""
        hosts = [f"127.0.0.{i + 1}" for i in range(1, n + 1)]
        ports = _free_ports(hosts)
        cmd = list(command) if command is not None else _meshmq_command()
        self.nodes = [
            Node(i, self.workdir / f"n{i}", hosts[i - 1], ports[2 * i - 2], ports[2 * i - 1], cmd)
            for i in range(1, n + 1)
        ]
        self._followers: dict[Path, LogFollower] = {}
        self._views: dict[Path, frozenset[str]] = {}
        self.write_configs()

    def _make_keys(self) -> str:
        from mesh.curve import generate  # being written in parallel: imported only when used

        keys = self.workdir / "keys"
        keys.mkdir(exist_ok=True)
        _public, secret = generate(str(keys), "cluster")
        return secret

    def node(self, i: int) -> Node:
        """Node i, 1..n (named n<i>)."""
        if not 1 <= i <= len(self.nodes):
            raise IndexError(f"node index {i} not in 1..{len(self.nodes)}")
        return self.nodes[i - 1]

    def __len__(self) -> int:
        return len(self.nodes)

    def members(self) -> list[str]:
        """`Mesh.TcpIp.Members` of every node: every node's `host:mesh_port`."""
        return [f"{nd.host}:{nd.mesh_port}" for nd in self.nodes]

    def config_for(self, nd: Node) -> dict[str, Any]:
        mesh: dict[str, Any] = {
            "IpcDir": nd.ipc_dir,
            "ClusterName": self.name,
            "Port": nd.mesh_port,
            "BindAddress": nd.host,
            "PeerHeartbeatMs": PEER_HEARTBEAT_MS,
            "SuspectAfterMs": SUSPECT_AFTER_MS,
            "DeadAfterMs": DEAD_AFTER_MS,
        }
        if self.curve:
            mesh["Curve"] = {"KeyFile": self.key_file}
        else:
            mesh["Plaintext"] = True
        if self.mdns:
            mesh["TcpIp"] = {"Enabled": False}
            mesh["Mdns"] = {"Enabled": True, "Interfaces": ["127.0.0.1"]}
        else:
            mesh["TcpIp"] = {"Members": self.members()}
        config: dict[str, Any] = {
            "NodeName": nd.name,
            "ListenAddress": nd.host,
            "TCP": nd.port,
            "Workers": self.workers,
            "SessionStore": {"Type": "POSTGRES", "Postgres": {"Url": self.pg_url}},
            "Mesh": mesh,
        }
        extra = self.extra(nd.index) if callable(self.extra) else self.extra
        return deep_merge(config, extra or {})

    def write_configs(self) -> None:
        """(Re)write every node's configuration file from `config_for`."""
        for nd in self.nodes:
            nd.config = self.config_for(nd)
            nd.write_config()

    # --- life cycle

    def start(self, indexes: Iterable[int] | None = None, timeout_s: float = _START_TIMEOUT_S) -> Cluster:
        """Start the nodes (all, or `indexes`) together and wait until each accepts MQTT.

        If a node exits before listening because a port was taken meanwhile (another test),
        every node gets new ports and the start is tried again (up to 3 times)."""
        chosen = [self.node(i) for i in (indexes if indexes is not None else range(1, len(self) + 1))]
        for attempt in range(1, _START_ATTEMPTS + 1):
            for nd in chosen:
                nd.launch()
            deadline = time.monotonic() + timeout_s
            try:
                for nd in chosen:
                    nd.wait_ready(max(0.1, deadline - time.monotonic()))
                return self
            except RuntimeError:
                taken = any("Address already in use" in nd.log() for nd in chosen)
                for nd in chosen:
                    if nd.running():
                        nd.kill()
                if not taken or attempt == _START_ATTEMPTS or any(other.running() for other in self.nodes):
                    raise
                self._new_ports()
        raise AssertionError("unreachable")

    def _new_ports(self) -> None:
        ports = _free_ports([nd.host for nd in self.nodes])
        for k, nd in enumerate(self.nodes):
            nd.port, nd.mesh_port = ports[2 * k], ports[2 * k + 1]
        self.write_configs()

    def running(self) -> list[Node]:
        return [nd for nd in self.nodes if nd.running()]

    def stop_all(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """SIGTERM every running node at once, wait (SIGKILL past `timeout_s`), remove IPC dirs."""
        for nd in self.nodes:
            nd.wanted = False
            if nd.running():
                nd.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for nd in self.nodes:
            if nd.proc is not None:
                try:
                    nd.proc.wait(max(0.1, deadline - time.monotonic()))
                    nd._wait_group_gone()
                except subprocess.TimeoutExpired:
                    nd.kill()
            nd.close()

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(nd.log_tail(lines) for nd in self.nodes if nd.starts)

    # --- waiting on the logs

    def _follow(self, nd: Node) -> frozenset[str] | None:
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

    def wait_members(self, timeout_s: float = 20.0, expected: Iterable[str] | None = None) -> None:
        """Wait until every running node's latest view is `expected` (default: the running nodes).

        A node the test started that exited on its own is an error at once (with its log)."""
        deadline = time.monotonic() + timeout_s
        while True:
            crashed = [nd for nd in self.nodes if nd.wanted and not nd.running()]
            if crashed:
                tails = "\n".join(nd.log_tail() for nd in crashed)
                raise AssertionError(f"nodes exited on their own: {[nd.name for nd in crashed]}\n{tails}")
            running = self.running()
            want = frozenset(expected) if expected is not None else frozenset(nd.name for nd in running)
            views = {nd.name: self._follow(nd) for nd in running}
            if running and all(view == want for view in views.values()):
                return
            if time.monotonic() >= deadline:
                shown = {name: sorted(v) if v is not None else None for name, v in views.items()}
                raise AssertionError(
                    f"cluster {self.name}: views {shown} are not all {sorted(want)} after {timeout_s}s\n"
                    f"{self.log_tails()}"
                )
            time.sleep(_POLL_S)

    def wait_log(
        self, node: Node | int, regex: str | re.Pattern[str], timeout_s: float = 10.0, after: int = 0
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
