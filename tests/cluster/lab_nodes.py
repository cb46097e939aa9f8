"""MeshMQ nodes and a PostgreSQL server INSIDE the hosts of a network lab (tier 2).

Why: `tests/cluster/nodes.py` runs nodes on loopback; the tier-2 tests (issue 5) need the same
nodes on hosts of their own (`tests/cluster/netns.py`), so that mDNS crosses a real L2 bridge and
a nftables cut is a real silent partition. Here node i runs in `<prefix>-n<i>` on
10.77.0.<i+1> (MQTT port 1883, mesh port 7946: every host has its own port space, so fixed ports
never collide), discovers the others by mDNS only (`Mesh.TcpIp.Enabled: false`, mDNS on its own
address, re-announced every second), and stores sessions in a throwaway PostgreSQL server that
listens on the client host (`<prefix>-c`, 10.77.0.100:5432). The test clients run in the client
host too (see `tests/cluster/test_cluster_netns.py`).

Must not: address a lab IP from the root namespace (the guard route makes it unreachable, and
after teardown it would leave the machine): the root namespace reaches the database only through
its Unix socket and the nodes only through their log files and signals. Must not signal a
process it did not start (nodes by their own process group, the database through its pid file
and its own process group), leave a wait unbounded, or outlive the lab: everything here runs inside lab namespaces and must be stopped before `Lab.teardown`
(which SIGKILLs whatever is left of the processes started with `Lab.run`). PostgreSQL's backends
leave the postmaster's process group (they call setsid), so the database is stopped with
`pg_ctl stop -m immediate` first; killing its group is only the fallback (backends exit by
themselves when their postmaster dies).

Invariants:
- Every process is started with `Lab.run` (its own process group, killed by the lab's teardown
  too); `LabNode.stop`/`kill` return only when no process of the node's group is alive.
- Node i is named n<i>; its log holds the relay's `cluster view: alive=[...]` lines, read
  incrementally with `nodes.LogFollower`; each start logs to a new file.
- `LabPostgres.stop` does an immediate shutdown (so shared memory is released) and deletes the
  server's files; it is safe to call twice and after a failed start.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import psycopg
import yaml
from psycopg import sql

from tests.cluster.netns import CLIENT, Lab
from tests.cluster.nodes import (
    DEAD_AFTER_MS,
    PEER_HEARTBEAT_MS,
    SUSPECT_AFTER_MS,
    LogFollower,
    deep_merge,
    parse_view,
)
from tests.e2e.broker_proc import _meshmq_command
from tests.pg import SUPERUSER, find_bin_dir

__all__ = [
    "ANNOUNCE_INTERVAL_MS",
    "LAB_MESH_PORT",
    "LAB_MQTT_PORT",
    "LAB_PG_PORT",
    "LabCluster",
    "LabNode",
    "LabPostgres",
    "kill_group",
]

LAB_MQTT_PORT: Final = 1883
LAB_MESH_PORT: Final = 7946
LAB_PG_PORT: Final = 5432
ANNOUNCE_INTERVAL_MS: Final = 1000
_START_TIMEOUT_S: Final = 20.0
_STOP_TIMEOUT_S: Final = 10.0
_GONE_TIMEOUT_S: Final = 10.0
_PG_START_TIMEOUT_S: Final = 30.0
_PG_COMMAND_TIMEOUT_S: Final = 60.0
_POLL_S: Final = 0.05
_MQTT_READY: Final = re.compile(r"worker \d+: MQTT on ")


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


def kill_group(pgid: int) -> None:
    """SIGKILL process group `pgid` (one this test started) until none of it is alive (bounded)."""
    deadline = time.monotonic() + _GONE_TIMEOUT_S
    while alive := _group_alive(pgid):
        if time.monotonic() >= deadline:
            raise AssertionError(f"processes {alive} of group {pgid} still alive after {_GONE_TIMEOUT_S}s")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.01)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- PostgreSQL on a lab host ------------------------------------------------------------------


class LabPostgres:
    """A throwaway PostgreSQL server on lab host `host` (default the client host), port 5432.

    It listens on the host's lab address (for the nodes) and on a Unix socket in its own
    directory (for this process, which must not address lab IPs). Trust auth for 10.77.0.0/24."""

    def __init__(self, lab: Lab, host: int = CLIENT) -> None:
        self.lab = lab
        self.host_index = host
        self.host = lab.addr(host)
        self.port = LAB_PG_PORT
        self.base_dir = ""
        self.bin_dir = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> str:
        return os.path.join(self.base_dir, "data")

    @property
    def log_path(self) -> Path:
        return Path(self.base_dir, "log")

    def url(self, dbname: str) -> str:
        """The URL the nodes use (the lab address: only valid inside the lab)."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
        """A connection from this (root-namespace) process, over the Unix socket."""
        return psycopg.connect(
            host=self.base_dir,
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            autocommit=True,
            connect_timeout=5,
        )

    def start(self, timeout_s: float = _PG_START_TIMEOUT_S) -> LabPostgres:
        """initdb (in the root namespace: no network), then run `postgres` in the lab host."""
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin")
        if os.geteuid() != 0 or shutil.which("runuser") is None:
            raise RuntimeError("a lab PostgreSQL needs root and `runuser` (the server refuses root)")
        self.bin_dir = bin_dir
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self.base_dir = tempfile.mkdtemp(prefix="pglab.", dir=shm)
        shutil.chown(self.base_dir, SUPERUSER, SUPERUSER)
        os.chmod(self.base_dir, 0o700)
        initdb = [
            f"{bin_dir}/initdb",
            *("-D", self.data_dir, "-U", SUPERUSER, "-A", "trust", "-E", "UTF8"),
            *("--locale=C.UTF-8", "--no-sync", "--no-instructions"),
        ]
        done = subprocess.run(
            ["runuser", "-u", SUPERUSER, "--", *initdb],
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_PG_COMMAND_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        subnet = self.host.rsplit(".", 1)[0]
        with open(os.path.join(self.data_dir, "pg_hba.conf"), "a", encoding="utf-8") as hba:
            hba.write(f"host all all {subnet}.0/24 trust\n")
        server = [
            f"{bin_dir}/postgres",
            *("-D", self.data_dir, "-p", str(self.port), "-k", self.base_dir),
            *("-c", f"listen_addresses={self.host}", "-c", "fsync=off", "-c", "full_page_writes=off"),
            *("-c", "max_connections=100"),
        ]
        with open(self.log_path, "wb") as log:
            # Foreground server in its own process group: the lab's teardown kills it if we cannot.
            self.proc = self.lab.run(
                self.host_index,
                ["runuser", "-u", SUPERUSER, "--", *server],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
            )
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"lab PostgreSQL exited ({self.proc.returncode}):\n{_tail(self.log_path, 20)}"
                )
            try:
                with self.connect() as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"lab PostgreSQL not ready within {timeout_s}s:\n{_tail(self.log_path, 20)}"
                    ) from None
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name`; its URL for the nodes."""
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def log_tail(self, lines: int = 20) -> str:
        return f"--- postgres ({self.log_path}) ---\n{_tail(self.log_path, lines)}"

    def stop(self) -> None:
        """Immediate shutdown (shared memory released), then its group killed and files removed."""
        if self.proc is not None:
            if self.proc.poll() is None and os.path.exists(os.path.join(self.data_dir, "postmaster.pid")):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    subprocess.run(
                        [
                            *("runuser", "-u", SUPERUSER, "--", f"{self.bin_dir}/pg_ctl"),
                            *("-D", self.data_dir, "-m", "immediate", "-w", "-t", "10", "stop"),
                        ],
                        env=_clean_env(),
                        stdin=subprocess.DEVNULL,
                        capture_output=True,
                        timeout=_PG_COMMAND_TIMEOUT_S,
                        check=False,
                    )
            kill_group(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(_GONE_TIMEOUT_S)
        if self.base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _clean_env() -> dict[str, str]:
    """This process's environment without inherited `PG*` variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


# --- MeshMQ nodes on lab hosts ---------------------------------------------------------------


class LabNode:
    """MeshMQ node n<index> in lab host `index`: MQTT on <addr>:1883, mesh on <addr>:7946."""

    def __init__(self, lab: Lab, index: int, workdir: Path, command: Sequence[str]) -> None:
        self.lab = lab
        self.index = index
        self.name = f"n{index}"
        self.host = lab.addr(index)
        self.port = LAB_MQTT_PORT
        self.mesh_port = LAB_MESH_PORT
        self.workdir = workdir
        self.command = list(command)
        self.config: dict[str, Any] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.wanted = False  # started by the test and not stopped or killed by it since
        # Unix socket paths are short (108 bytes): the IPC directory lives under /tmp.
        self.ipc_dir = tempfile.mkdtemp(prefix=f"mql{index}.", dir="/tmp")

    def __repr__(self) -> str:
        return f"LabNode({self.name} {self.host} in {self.lab.ns(self.index)} pid {self.pid})"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.yaml"

    @property
    def log_path(self) -> Path:
        """The log of the current (latest) start."""
        return self.workdir / f"{self.name}-{max(self.starts, 1)}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        """Start the node in its lab host (config rewritten from `self.config`), without waiting."""
        if self.running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = self.lab.run(
                self.index,
                [*self.command, "-cluster", "-config", str(self.config_path)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wanted = True

    def wait_ready(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Wait for the worker's `MQTT on` log line (this process must not connect to lab IPs)."""
        follower = LogFollower(self.log_path)
        deadline = time.monotonic() + timeout_s
        while True:
            if any(_MQTT_READY.search(line) for line in follower.new_lines()):
                return
            if not self.running():
                raise RuntimeError(f"{self.name} exited before listening\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{self.name} not listening after {timeout_s}s\n{self.log_tail()}")
            time.sleep(_POLL_S)

    def send_signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """SIGTERM (a graceful drain) and wait; SIGKILL past `timeout_s`; wait until all are gone."""
        self.wanted = False
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout_s)
        kill_group(self.proc.pid)
        self.proc.wait(_GONE_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL the node's process group and wait until it is gone."""
        self.wanted = False
        if self.proc is not None:
            kill_group(self.proc.pid)
            self.proc.wait(_GONE_TIMEOUT_S)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> int:
        """How many complete lines the current log holds now (a mark for `LabCluster.wait_log`)."""
        return self.log().count("\n")

    def log_tail(self, lines: int = 40) -> str:
        return f"--- {self.name} ({self.log_path.name}) ---\n{_tail(self.log_path, lines)}"

    def close(self) -> None:
        if self.running():
            self.stop()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


class LabCluster:
    """One MeshMQ node per lab host 1..lab.n, found by mDNS only, sharing one database.

    Configurations are built at construction (nothing starts); `extra` is merged into each."""

    def __init__(
        self,
        lab: Lab,
        workdir: Path,
        pg_url: str,
        *,
        workers: int = 1,
        extra: Mapping[str, Any] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.lab = lab
        self.workdir = workdir
        self.pg_url = pg_url
        self.workers = workers
        self.extra = extra or {}
        self.name = f"mqlab-{uuid.uuid4().hex[:12]}"
        cmd = list(command) if command is not None else _meshmq_command()
        self.nodes = [LabNode(lab, i, workdir / f"n{i}", cmd) for i in range(1, lab.n + 1)]
        for nd in self.nodes:
            nd.config = self.config_for(nd)
        self._followers: dict[Path, LogFollower] = {}
        self._views: dict[Path, frozenset[str]] = {}

    def node(self, i: int) -> LabNode:
        if not 1 <= i <= len(self.nodes):
            raise IndexError(f"node index {i} not in 1..{len(self.nodes)}")
        return self.nodes[i - 1]

    def config_for(self, nd: LabNode) -> dict[str, Any]:
        config: dict[str, Any] = {
            "NodeName": nd.name,
            "ListenAddress": nd.host,
            "TCP": nd.port,
            "Workers": self.workers,
            "SessionStore": {"Type": "POSTGRES", "Postgres": {"Url": self.pg_url}},
            "Mesh": {
                "IpcDir": nd.ipc_dir,
                "ClusterName": self.name,
                "Port": nd.mesh_port,
                "BindAddress": nd.host,
                "PeerHeartbeatMs": PEER_HEARTBEAT_MS,
                "SuspectAfterMs": SUSPECT_AFTER_MS,
                "DeadAfterMs": DEAD_AFTER_MS,
                "Plaintext": True,
                "TcpIp": {"Enabled": False},
                "Mdns": {
                    "Enabled": True,
                    "Interfaces": [nd.host],
                    "AnnounceIntervalMs": ANNOUNCE_INTERVAL_MS,
                },
            },
        }
        return deep_merge(config, self.extra)

    def start(self, indexes: Iterable[int] | None = None, timeout_s: float = _START_TIMEOUT_S) -> LabCluster:
        """Launch the nodes (all, or `indexes`) together; wait until each one's worker listens."""
        chosen = [self.node(i) for i in (indexes if indexes is not None else range(1, len(self.nodes) + 1))]
        for nd in chosen:
            nd.launch()
        deadline = time.monotonic() + timeout_s
        for nd in chosen:
            nd.wait_ready(max(0.1, deadline - time.monotonic()))
        return self

    def running(self) -> list[LabNode]:
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
                with contextlib.suppress(subprocess.TimeoutExpired):
                    nd.proc.wait(max(0.1, deadline - time.monotonic()))
                nd.kill()
            nd.close()

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(nd.log_tail(lines) for nd in self.nodes if nd.starts)

    # --- waiting on the logs

    def _follow(self, nd: LabNode) -> frozenset[str] | None:
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

    def wait_views(self, expected: Mapping[int, Iterable[str]], timeout_s: float = 20.0) -> float:
        """Wait until node i's latest view is `expected[i]` for every i given; the seconds waited.

        A node the test started that exited on its own is an error at once (with its log)."""
        want = {self.node(i).name: frozenset(names) for i, names in expected.items()}
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            crashed = [nd for nd in self.nodes if nd.wanted and not nd.running()]
            if crashed:
                tails = "\n".join(nd.log_tail() for nd in crashed)
                raise AssertionError(f"nodes exited on their own: {[nd.name for nd in crashed]}\n{tails}")
            views = {nd.name: self._follow(nd) for nd in self.nodes if nd.name in want}
            if all(views[name] == names for name, names in want.items()):
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                shown = {name: sorted(v) if v is not None else None for name, v in views.items()}
                wanted = {name: sorted(v) for name, v in want.items()}
                raise AssertionError(
                    f"lab cluster {self.name}: views {shown} are not {wanted} after {timeout_s}s\n"
                    f"{self.log_tails()}"
                )
            time.sleep(_POLL_S)

    def wait_members(self, timeout_s: float = 20.0) -> float:
        """Wait until every running node sees exactly the running nodes; the seconds waited."""
        names = [nd.name for nd in self.running()]
        return self.wait_views({nd.index: names for nd in self.running()}, timeout_s)

    def wait_log(self, i: int, regex: str, timeout_s: float = 10.0, after: int = 0) -> re.Match[str]:
        """The first line of node i's current log, from line `after` on, that matches `regex`."""
        nd = self.node(i)
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
