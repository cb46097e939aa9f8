"""The node's parent process: starts the relay and the workers, restarts the ones that die,
and drains the node on SIGTERM or SIGINT.

Why: a crashed worker must cost its own clients a reconnect and nothing else, and an operator's
SIGTERM must end in an orderly drain with exit code 0. Both need one process that owns the
others and does nothing else.

Must not: move messages or open client sockets (it only checks, once, that the MQTT port can be
bound, so that a port in use is one clear error instead of workers failing in a loop).

Invariants:
- Children are started with `spawn` (no state forked from the parent), the relay first.
- A child that exits while the node runs is restarted after a backoff that doubles up to 30 s and
  resets once the child has lived 60 s; the log says which child, its pid and how it ended.
- SIGHUP is forwarded to every live worker, which reloads its TLS files; children are started
  with SIGHUP ignored (inherited across exec) until a worker installs its handler, so a SIGHUP
  during a start never kills one.
- On SIGTERM/SIGINT workers get SIGTERM (they close listeners, send 5.0 clients DISCONNECT 0x8B
  and keep sessions), then the relay; whatever still runs after the grace time gets SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from broker.config import Config, StoreType
from broker.logs import configure_logging
from broker.worker import die_with_parent, worker_process
from mesh.cluster import LinkSettings
from mesh.relay import ClusterSettings, RelaySettings
from mesh.relay import run as run_relay_loop
from mesh.sockets import DRAIN_SIGNAL, STOP_SIGNAL, default_ipc_dir, prepare_ipc_dir
from store.service import StoreSettings
from store.service import run as run_store

log = logging.getLogger("broker.supervisor")

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0
EXIT_CONFIG = 3  # a child's exit status for "this configuration cannot work" (no restart)


@dataclass(slots=True)
class _Child:
    name: str
    target: Callable[..., None]
    args: tuple[object, ...]
    process: BaseProcess | None = None
    started_at: float = 0.0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None


def relay_process(config: Config, ipc_dir: str) -> None:
    die_with_parent()
    configure_logging(config.logging, "relay")
    run_relay_loop(
        RelaySettings(
            ipc_dir=ipc_dir,
            worker_count=config.worker_count,
            heartbeat_ms=config.mesh.heartbeat_ms,
            recv_hwm=config.mesh.recv_hwm,
            send_hwm=config.mesh.send_hwm,
            store=config.session_store.type is not StoreType.MEMORY,
            node=config.node_name,
            cluster=cluster_settings(config) if config.cluster else None,
            http_host=config.http.bind_address or config.listen_address,
            http_port=config.http.port,
            http_token=config.http.admin_token,
            version=_version(),
            sys_interval_s=config.mqtt.sys_interval_s,
        )
    )


def _version() -> str:
    from broker.cli import package_version

    return package_version()


def cluster_settings(config: Config) -> ClusterSettings:
    """The relay's cluster settings from `Mesh` (addresses resolved here, once)."""
    mesh = config.mesh
    bind = mesh.bind_address or config.listen_address
    advertise = mesh.advertise_address
    if not advertise:
        unspecified = bind in ("0.0.0.0", "::", "")
        advertise = bind if not unspecified else _host_address()
    return ClusterSettings(
        links=LinkSettings(
            node=config.node_name,
            cluster_name=mesh.cluster_name,
            bind_host=bind,
            port=mesh.port,
            advertise_host=advertise,
            heartbeat_s=mesh.peer_heartbeat_ms / 1000,
            suspect_after_s=mesh.suspect_after_ms / 1000,
            dead_after_s=mesh.dead_after_ms / 1000,
        ),
        handoff_timeout_ms=mesh.handoff_timeout_ms,
        mesh_config=mesh,
        curve_key_file=mesh.curve.key_file,
        curve_allowed_dir=mesh.curve.allowed_keys_dir,
        plaintext=mesh.plaintext,
        minimum_cluster_size=config.cluster_config.split_brain.minimum_cluster_size,
        allow_connect=config.cluster_config.split_brain.allow_connect,
        allow_publish=config.cluster_config.split_brain.allow_publish,
        allow_subscribe=config.cluster_config.split_brain.allow_subscribe,
        server_reference=config.cluster_config.server_reference,
        merge_policy=config.cluster_config.merge_policy.type,
    )


def _host_address() -> str:
    """The address the host name resolves to (what other nodes most likely reach us at)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def store_process(config: Config, ipc_dir: str) -> None:
    die_with_parent()
    configure_logging(config.logging, "store")
    cfg = config.session_store
    run_store(
        StoreSettings(
            ipc_dir=ipc_dir,
            node=config.node_name,
            kind=cfg.type.value,
            sqlite_path=cfg.sqlite.path,
            postgres_url=cfg.postgres.url,
            postgres_user=cfg.postgres.user,
            postgres_password=cfg.postgres.password,
            postgres_schema=cfg.postgres.schema,
            pool_size=cfg.postgres.pool_size,
            cluster=config.cluster,
        )
    )


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.ctx = multiprocessing.get_context("spawn")
        self.ipc_dir = prepare_ipc_dir(config.mesh.ipc_dir or default_ipc_dir(config.node_name, os.getpid()))
        self.children: list[_Child] = []
        if config.session_store.type is not StoreType.MEMORY:
            self.children.append(_Child("store", store_process, (config, self.ipc_dir)))
        self.children.append(_Child("relay", relay_process, (config, self.ipc_dir)))
        for index in range(1, config.worker_count + 1):
            self.children.append(_Child(f"worker {index}", worker_process, (config, index, self.ipc_dir)))
        self.stopping = False
        self.exit_status = 0

    def _start(self, child: _Child) -> None:
        process = self.ctx.Process(
            target=child.target, args=child.args, name=f"meshmq {child.name}", daemon=False
        )
        previous = _ignore_sighup()
        try:
            process.start()
        finally:
            _restore_sighup(previous)
        child.process = process
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("%s started (pid %s)", child.name, process.pid)

    def run(self) -> int:
        for child in self.children:
            self._start(child)
        while not self.stopping:
            sentinels = [c.process.sentinel for c in self.children if c.process is not None]
            wait(sentinels, timeout=0.25)
            now = time.monotonic()
            for child in self.children:
                process = child.process
                if process is not None and not process.is_alive():
                    self._exited(child, process, now)
                restart_due = child.restart_at is not None and now >= child.restart_at
                if child.process is None and restart_due and not self.stopping:
                    self._start(child)
        return self._drain()

    def _exited(self, child: _Child, process: BaseProcess, now: float) -> None:
        process.join(0)
        code = process.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"code {code}"
        child.process = None
        if self.stopping:
            return
        if code == EXIT_CONFIG:
            # A wrong database URL or credentials: restarting cannot help. Stop the node.
            log.error("%s cannot start with this configuration (see above); stopping the node", child.name)
            self.exit_status = EXIT_CONFIG
            self.stopping = True
            return
        if now - child.started_at > HEALTHY_AFTER_S:
            child.backoff_s = BACKOFF_START_S
        log.error(
            "%s exited (pid %s, %s); restarting in %.1fs", child.name, process.pid, how, child.backoff_s
        )
        child.restart_at = now + child.backoff_s
        child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)

    def stop(self) -> None:
        self.stopping = True

    def reload_tls(self) -> None:
        """SIGHUP: each live worker re-reads its TLS files (broker/ACCESS.md, "Transports")."""
        pids = [
            c.process.pid
            for c in self.children
            if c.name.startswith("worker") and c.process is not None and c.process.is_alive()
        ]
        log.info("SIGHUP received: reloading TLS in %d worker(s) (pids %s)", len(pids), pids)
        for pid in pids:
            if pid is not None:
                # A worker that died just now is restarted, and reads the files anyway.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)

    def _drain(self) -> int:
        grace_s = self.config.shutdown_grace_s
        deadline = time.monotonic() + grace_s
        workers = [c for c in self.children if c.name.startswith("worker")]
        relay = [c for c in self.children if c.name == "relay"]
        store = [c for c in self.children if c.name == "store"]
        for child in relay:  # /health says DRAINING at once (load balancers stop sending clients)
            if child.process is not None and child.process.is_alive():
                os.kill(child.process.pid or 0, DRAIN_SIGNAL)
        for group in (workers, relay, store):
            for child in group:
                if child.process is not None and child.process.is_alive():
                    os.kill(child.process.pid or 0, signal.SIGTERM if group is workers else STOP_SIGNAL)
            for child in group:
                if child.process is not None:
                    child.process.join(max(deadline - time.monotonic(), 0.1))
                    if child.process.is_alive():
                        log.error("%s did not stop within %.1fs; killing it", child.name, grace_s)
                        child.process.kill()
                        child.process.join(1)
        shutil.rmtree(self.ipc_dir, ignore_errors=True)
        log.info("node %r stopped", self.config.node_name)
        return self.exit_status


_SignalHandler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


def _ignore_sighup() -> _SignalHandler:
    """SIG_IGN for SIGHUP while a child is spawned (the child inherits it); None off the main thread."""
    try:
        return signal.signal(signal.SIGHUP, signal.SIG_IGN)
    except ValueError:
        return None


def _restore_sighup(previous: _SignalHandler) -> None:
    if previous is not None:
        signal.signal(signal.SIGHUP, previous)


def check_port(config: Config) -> str | None:
    """Can the MQTT ports be bound (with SO_REUSEPORT, as the workers will)? An error text if not."""
    ports = [p for p in (config.tcp_port, config.tls_port, config.ws_port, config.wss_port) if p]
    if len(set(ports)) != len(ports):
        return f"two listeners on one port: TCP {config.tcp_port}, TCPS {config.tls_port}, WS {config.ws_port}, WSS {config.wss_port}"
    if config.worker_port_base:
        ports += [config.worker_port_base + i for i in range(1, config.worker_count + 1)]
    family = socket.AF_INET6 if ":" in config.listen_address else socket.AF_INET
    for port in ports:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind((config.listen_address, port))
            except OSError as exc:
                return f"cannot listen on {config.listen_address}:{port}: {exc.strerror}"
    return None


def run_node(config: Config) -> int:
    problem = check_port(config)
    if problem is not None:
        log.error("%s", problem)
        return 1
    supervisor = Supervisor(config)

    def on_signal(signum: int, frame: object) -> None:
        log.info("%s received: draining", signal.Signals(signum).name)
        supervisor.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        supervisor.reload_tls()

    signal.signal(signal.SIGHUP, on_hangup)
    log.info(
        "MeshMQ node %r starting (pid %d, %d worker(s), ipc %s)",
        config.node_name,
        os.getpid(),
        config.worker_count,
        supervisor.ipc_dir,
    )
    return supervisor.run()
