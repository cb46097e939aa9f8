"""One worker process: an event loop, the MQTT listeners, a broker core and its end of the mesh.

Why: the unit that terminates MQTT connections, one per core. It owns the asyncio loop (uvloop
when present), binds its listeners with SO_REUSEPORT so that all workers share the node's port
and the kernel spreads connections, drives the core's timers, and drains on SIGTERM.

Must not: contain MQTT rules (the core and handlers do) or talk to a database.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import os
import signal
import socket
from dataclasses import replace

from broker.config import Config, StoreType
from broker.core import BrokerCore
from broker.logs import configure_logging
from broker.meshlink import WorkerMesh
from broker.net.tcp import MqttStreamProtocol
from broker.ports import MeshPort, SessionStore
from broker.storelink import StoreLink

log = logging.getLogger("broker.worker")

TICK_S = 0.25
PR_SET_PDEATHSIG = 1


class Worker:
    def __init__(
        self,
        config: Config,
        worker_index: int = 1,
        mesh: MeshPort | None = None,
        store: SessionStore | None = None,
    ) -> None:
        self.config = config
        self.worker_index = worker_index
        # MaxConnections is the node's: each worker takes its share.
        per_worker = math.ceil(config.mqtt.max_connections / config.worker_count)
        mqtt = replace(config.mqtt, max_connections=per_worker)
        limits = config.limits
        if limits.max_connect_rate:  # the node's, per source address: each worker takes its share
            limits = replace(limits, max_connect_rate=math.ceil(limits.max_connect_rate / config.worker_count))
        self.core = BrokerCore(
            mqtt, mesh=mesh, store=store, worker_index=worker_index, limits=limits, auth=config.auth
        )
        self.servers: list[asyncio.Server] = []
        self._stop = asyncio.Event()
        self._ticker_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        ports = [cfg.tcp_port] if cfg.tcp_port else []
        if cfg.worker_port_base:
            ports.append(cfg.worker_port_base + self.worker_index)
        family = socket.AF_INET6 if ":" in cfg.listen_address else socket.AF_INET
        for port in ports:
            server = await loop.create_server(
                lambda: MqttStreamProtocol(self.core, loop),
                host=cfg.listen_address,
                port=port,
                reuse_port=True,
                backlog=4096,
                family=family,
            )
            self.servers.append(server)
            log.info("worker %d: MQTT on %s:%d", self.worker_index, cfg.listen_address, port)
        self._ticker_task = loop.create_task(self._ticker(), name="tick")

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        core = self.core
        while not self._stop.is_set():
            await asyncio.sleep(TICK_S)
            try:
                core.tick(loop.time())
            except Exception:
                log.exception("timer tick failed")
            core.flush()

    def stop(self) -> None:
        self._stop.set()

    async def run_until_stopped(self) -> None:
        await self.start()
        await self._stop.wait()
        await self.drain()

    async def drain(self) -> None:
        """Close listeners first, then tell clients and close them; bounded by the grace time."""
        for server in self.servers:
            server.close()
        self.core.shutdown(self.config.cluster_config.server_reference if self.config.cluster else "")
        self.core.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self.config.shutdown_grace_s - 1.0, 0.5)
        while self.core.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        log.info("worker %d: drained (%d connection(s) left)", self.worker_index, len(self.core.connections))
        nonzero = {k: v for k, v in self.core.counters.snapshot().items() if v}
        log.info("worker %d: counters %s", self.worker_index, nonzero)


def worker_process(config: Config, index: int, ipc_dir: str) -> None:
    """The main of a worker child process (spawned by the supervisor)."""
    die_with_parent()
    configure_logging(config.logging, f"worker-{index}")
    try:
        import uvloop

        uvloop.run(_main(config, index, ipc_dir))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_main(config, index, ipc_dir))


async def _main(config: Config, index: int, ipc_dir: str) -> None:
    loop = asyncio.get_running_loop()
    mesh = WorkerMesh(config, index, ipc_dir, loop)
    store = None if config.session_store.type is StoreType.MEMORY else StoreLink(config, index, ipc_dir, loop)
    worker = Worker(config, index, mesh, store)
    mesh.attach(worker.core)
    loop.add_signal_handler(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns SIGINT into SIGTERM
    wills = []
    if store is not None:
        store.attach(worker.core)
        log.info("worker %d: loading persistent subscriptions from the store", index)
        wills = await store.join()
    log.info("worker %d: joining the node's mesh", index)
    await mesh.join()
    if wills:
        # The node was killed while these clients were connected: their wills are due.
        log.warning("worker %d: publishing %d will(s) left by a crash", index, len(wills))
        now = loop.time()
        for client_id, will in wills:
            worker.core.publish_server_message(worker.core.will_message(will, client_id, now), now)
        worker.core.flush()
    try:
        await worker.run_until_stopped()
    finally:
        mesh.close()
        if store is not None:
            store.close()


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us if the supervisor dies (no orphaned workers)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:
        os._exit(1)
