"""Start a cluster of real MeshMQ nodes on one machine (tier 1: 127.0.0.x addresses, no root).

Why: the cluster tests (issue 5) need several real nodes that find each other, and need to kill,
stop and restart them as a user would. `Cluster` writes one YAML configuration per node and
starts `python -m broker.cli -cluster -config FILE` (or the `meshmq` script) in its own process
group, logging to a file per start. Node i (1..n) is `n<i>` on 127.0.0.<i+1> (127.0.0.2, .3,
...), with an MQTT port and a mesh port of its own; all nodes share one PostgreSQL database and
list every node (themselves included) in `Mesh.TcpIp.Members`, or find each other with mDNS on
loopback (`mdns=True`). Heartbeat timeouts are short (200 / 600 / 1500 ms) so deaths show fast.
The process, log and wait handling that the lab nodes share lives in `node_process.py`
(`NodeProcess`, `NodeSet`); `LogFollower` and `parse_view` are re-exported from there.

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
- `stop` and `kill` return only when no process of the node's group is alive (zombies count as
  gone), so a restart can bind the same ports.
- `start` returns when the node's MQTT port accepts connections; a node whose process exits
  before that raises with its log tail.
"""

from __future__ import annotations

import copy
import itertools
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar, Final

from tests.cluster.node_process import LogFollower, NodeProcess, NodeSet, parse_view
from tests.e2e.broker_proc import REPO, _meshmq_command, wait_listening
from tests.e2e.workers_helpers import free_port_block, port_free

__all__ = [
    "CLUSTER_READY",
    "Cluster",
    "LogFollower",
    "Node",
    "NodeExtra",
    "deep_merge",
    "node_config",
    "parse_view",
]

CLUSTER_READY: Final = (REPO / "mesh" / "cluster.py").exists()

PEER_HEARTBEAT_MS: Final = 200
SUSPECT_AFTER_MS: Final = 600
DEAD_AFTER_MS: Final = 1500
_START_TIMEOUT_S: Final = 20.0
_STOP_TIMEOUT_S: Final = 15.0
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


def node_config(
    nd: NodeProcess, cluster_name: str, *, workers: int, pg_url: str, mesh: Mapping[str, Any]
) -> dict[str, Any]:
    """Node `nd`'s configuration in cluster `cluster_name`: its name, address and ports, `workers`
    workers, the shared PostgreSQL database at `pg_url` and the short heartbeat timeouts; `mesh`
    adds the `Mesh` keys of the transport and the discovery (CURVE or plaintext, members or mDNS)."""
    return {
        "NodeName": nd.name,
        "ListenAddress": nd.host,
        "TCP": nd.port,
        "Workers": workers,
        "SessionStore": {"Type": "POSTGRES", "Postgres": {"Url": pg_url}},
        "Mesh": {
            "IpcDir": nd.ipc_dir,
            "ClusterName": cluster_name,
            "Port": nd.mesh_port,
            "BindAddress": nd.host,
            "PeerHeartbeatMs": PEER_HEARTBEAT_MS,
            "SuspectAfterMs": SUSPECT_AFTER_MS,
            "DeadAfterMs": DEAD_AFTER_MS,
            **mesh,
        },
    }


def _free_ports(hosts: Sequence[str]) -> list[int]:
    """Two ports per host (MQTT, mesh), all distinct, each free now on its host and on 127.0.0.1."""
    count = 2 * len(hosts)
    for _ in range(_PORT_ATTEMPTS):
        base = free_port_block(count)  # checked on 127.0.0.1, below the ephemeral range
        ports = [base + k for k in range(1, count + 1)]
        if all(port_free(hosts[k // 2], port) for k, port in enumerate(ports)):
            return ports
    raise RuntimeError(f"no block of {count} free ports for {list(hosts)} in {_PORT_ATTEMPTS} attempts")


class Node(NodeProcess):
    """One MeshMQ node of a `Cluster`, started here (loopback addresses need no namespace)."""

    STOP_TIMEOUT_S: ClassVar[float] = _STOP_TIMEOUT_S
    IPC_PREFIX: ClassVar[str] = "mqc"

    def __repr__(self) -> str:
        return f"Node({self.name} {self.host}:{self.port} mesh {self.mesh_port} pid {self.pid})"

    def _spawn(self, argv: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() takes every child with it
        )

    def wait_ready(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Wait until the MQTT port accepts; RuntimeError with the log tail if the node exited."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        try:
            wait_listening(self.host, self.port, self.proc, timeout_s)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{self.name}: {e}\n{self.log_tail()}") from e
        # Every worker listens (the first one to listen makes the port accept; tests that place
        # clients on several workers need them all): "worker N: MQTT on" for each.
        workers = int(self.config.get("Workers", 1) or 1)
        while len(set(re.findall(r"worker (\d+): MQTT on", self.log()))) < workers:
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: not every worker listens\n{self.log_tail()}")
            time.sleep(0.02)

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


class Cluster(NodeSet[Node]):
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
        hosts = [f"127.0.0.{i + 1}" for i in range(1, n + 1)]
        ports = _free_ports(hosts)
        cmd = list(command) if command is not None else _meshmq_command()
        # mDNS on lo is shared by every test of the machine: a name no other test uses.
        super().__init__(
            f"mq-{next(_cluster_numbers)}-{uuid.uuid4().hex[:12]}",
            [
                Node(i, self.workdir / f"n{i}", hosts[i - 1], ports[2 * i - 2], ports[2 * i - 1], cmd)
                for i in range(1, n + 1)
            ],
        )
        self.key_file = self._make_keys() if curve else ""
        self.write_configs()

    def _make_keys(self) -> str:
        from mesh.curve import generate  # being written in parallel: imported only when used

        keys = self.workdir / "keys"
        keys.mkdir(exist_ok=True)
        _public, secret = generate(str(keys), "cluster")
        return secret

    def members(self) -> list[str]:
        """`Mesh.TcpIp.Members` of every node: every node's `host:mesh_port`."""
        return [f"{nd.host}:{nd.mesh_port}" for nd in self.nodes]

    def config_for(self, nd: Node) -> dict[str, Any]:
        mesh: dict[str, Any] = {}
        if self.curve:
            mesh["Curve"] = {"KeyFile": self.key_file}
        else:
            mesh["Plaintext"] = True
        if self.mdns:
            mesh["TcpIp"] = {"Enabled": False}
            mesh["Mdns"] = {"Enabled": True, "Interfaces": ["127.0.0.1"]}
        else:
            mesh["TcpIp"] = {"Members": self.members()}
        config = node_config(nd, self.name, workers=self.workers, pg_url=self.pg_url, mesh=mesh)
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
        chosen = self._chosen(indexes)
        for attempt in range(1, _START_ATTEMPTS + 1):
            for nd in chosen:
                nd.launch()
            try:
                self._wait_ready(chosen, timeout_s)
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
