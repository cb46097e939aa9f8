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
  incrementally with `node_process.LogFollower`; each start logs to a new file. What a node and
  a cluster do beyond spawning in a lab host and seeing readiness in the log is shared with the
  loopback nodes (`node_process.NodeProcess`, `NodeSet`).
- `LabPostgres.stop` does an immediate shutdown (so shared memory is released) and deletes the
  server's files; it is safe to call twice and after a failed start.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar, Final

import psycopg
from psycopg import sql

from tests.cluster.netns import CLIENT, Lab
from tests.cluster.node_process import LogFollower, NodeProcess, NodeSet
from tests.cluster.nodes import deep_merge, node_config
from tests.e2e.broker_proc import _meshmq_command
from tests.pg import SUPERUSER, find_bin_dir
from tests.process_group import GONE_TIMEOUT_S, kill_group

__all__ = [
    "ANNOUNCE_INTERVAL_MS",
    "LAB_MESH_PORT",
    "LAB_MQTT_PORT",
    "LAB_PG_PORT",
    "LabCluster",
    "LabNode",
    "LabPostgres",
]

LAB_MQTT_PORT: Final = 1883
LAB_MESH_PORT: Final = 7946
LAB_PG_PORT: Final = 5432
ANNOUNCE_INTERVAL_MS: Final = 1000
_START_TIMEOUT_S: Final = 20.0
_STOP_TIMEOUT_S: Final = 10.0
_PG_START_TIMEOUT_S: Final = 30.0
_PG_COMMAND_TIMEOUT_S: Final = 60.0
_POLL_S: Final = 0.05
_MQTT_READY: Final = re.compile(r"worker \d+: MQTT on ")


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
                self.proc.wait(GONE_TIMEOUT_S)
        if self.base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _clean_env() -> dict[str, str]:
    """This process's environment without inherited `PG*` variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


# --- MeshMQ nodes on lab hosts ---------------------------------------------------------------


class LabNode(NodeProcess):
    """MeshMQ node n<index> in lab host `index`: MQTT on <addr>:1883, mesh on <addr>:7946."""

    STOP_TIMEOUT_S: ClassVar[float] = _STOP_TIMEOUT_S
    IPC_PREFIX: ClassVar[str] = "mql"

    def __init__(self, lab: Lab, index: int, workdir: Path, command: Sequence[str]) -> None:
        super().__init__(index, workdir, lab.addr(index), LAB_MQTT_PORT, LAB_MESH_PORT, command)
        self.lab = lab

    def __repr__(self) -> str:
        return f"LabNode({self.name} {self.host} in {self.lab.ns(self.index)} pid {self.pid})"

    def _spawn(self, argv: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        return self.lab.run(self.index, argv, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)

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


class LabCluster(NodeSet[LabNode]):
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
        cmd = list(command) if command is not None else _meshmq_command()
        super().__init__(
            f"mqlab-{uuid.uuid4().hex[:12]}",
            [LabNode(lab, i, workdir / f"n{i}", cmd) for i in range(1, lab.n + 1)],
        )
        for nd in self.nodes:
            nd.config = self.config_for(nd)

    def config_for(self, nd: LabNode) -> dict[str, Any]:
        mesh = {
            "Plaintext": True,
            "TcpIp": {"Enabled": False},
            "Mdns": {"Enabled": True, "Interfaces": [nd.host], "AnnounceIntervalMs": ANNOUNCE_INTERVAL_MS},
        }
        config = node_config(nd, self.name, workers=self.workers, pg_url=self.pg_url, mesh=mesh)
        return deep_merge(config, self.extra)

    def start(self, indexes: Iterable[int] | None = None, timeout_s: float = _START_TIMEOUT_S) -> LabCluster:
        """Launch the nodes (all, or `indexes`) together; wait until each one's worker listens."""
        chosen = self._chosen(indexes)
        for nd in chosen:
            nd.launch()
        self._wait_ready(chosen, timeout_s)
        return self

    def wait_views(self, expected: Mapping[int, Iterable[str]], timeout_s: float = 20.0) -> float:
        """Wait until node i's latest view is `expected[i]` for every i given; the seconds waited.

        A node the test started that exited on its own is an error at once (with its log)."""
        want = {self.node(i).name: frozenset(names) for i, names in expected.items()}
        return self._wait_views(lambda: want, timeout_s)
