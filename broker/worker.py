"""One worker process: an event loop, the MQTT listeners, a broker core and its end of the mesh.

Why: the unit that terminates MQTT connections, one per core. It owns the asyncio loop (uvloop
when present), binds its listeners (TCP, TCPS, WS, WSS, and the TCP WorkerPortBase port) with
SO_REUSEPORT so that all workers share the node's ports and the kernel spreads connections of
every kind, drives the core's timers, reloads its TLS files on SIGHUP and drains on SIGTERM.

A TLS file that does not load is a configuration error: the worker logs it and exits with
EXIT_CONFIG, and the supervisor stops the node instead of restarting the worker in a loop.
The TCP listener is bound last, so its "MQTT on" line means that every listener is up.

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
import ssl
from collections.abc import Callable
from dataclasses import replace

from broker.authn import ThreadVerifier
from broker.config import Config, StoreType
from broker.config_values import ConfigError
from broker.core import BrokerCore
from broker.logs import configure_logging
from broker.meshlink import WorkerMesh
from broker.net import tls
from broker.net.tcp import MqttStreamProtocol
from broker.net.websocket import MqttWebSocketProtocol
from broker.ports import MeshPort, SessionStore
from broker.storelink import StoreLink

log = logging.getLogger("broker.worker")

TICK_S = 0.25
PR_SET_PDEATHSIG = 1
EXIT_CONFIG = 3  # the supervisor stops the node instead of restarting the worker (as for the store)


def load_tls(config: Config) -> ssl.SSLContext | None:
    """The TLS context of the TCPS / WSS listeners (None without them); ConfigError names the key."""
    return tls.make_context(config.tls) if config.tls_port or config.wss_port else None


class Worker:
    def __init__(
        self,
        config: Config,
        worker_index: int = 1,
        mesh: MeshPort | None = None,
        store: SessionStore | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.worker_index = worker_index
        # MaxConnections is the node's: each worker takes its share.
        per_worker = math.ceil(config.mqtt.max_connections / config.worker_count)
        mqtt = replace(config.mqtt, max_connections=per_worker)
        limits = config.limits
        if limits.max_connect_rate:  # the node's, per source address: each worker takes its share
            limits = replace(
                limits, max_connect_rate=math.ceil(limits.max_connect_rate / config.worker_count)
            )
        self.core = BrokerCore(
            mqtt, mesh=mesh, store=store, worker_index=worker_index, limits=limits, auth=config.auth
        )
        context = tls_context or load_tls(config)
        # the context of the next TLS handshake; SIGHUP puts a new one here
        self.tls_live = None if context is None else tls.LiveContext(context)
        self.servers: list[asyncio.Server] = []
        self._stop = asyncio.Event()
        self._ticker_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        core = self.core
        subject = cfg.tls.subject_as_username
        path, max_frame_bytes = cfg.websocket.path, cfg.mqtt.max_packet_bytes
        listeners: list[tuple[str, int, Callable[[], asyncio.BaseProtocol]]] = []
        ctx = self.tls_live
        if ctx is not None:
            tls.install_exception_handler(loop)
        if cfg.tls_port and ctx is not None:
            tcps = tls.tls_factory(
                loop, ctx, lambda: MqttStreamProtocol(core, loop, subject), core.counters, "TCPS"
            )
            listeners.append(("MQTT over TLS (TCPS)", cfg.tls_port, tcps))
        if cfg.ws_port:
            listeners.append(
                (
                    "MQTT over WebSocket (WS)",
                    cfg.ws_port,
                    lambda: MqttWebSocketProtocol(core, loop, path, max_frame_bytes),
                )
            )
        if cfg.wss_port and ctx is not None:
            wss = tls.tls_factory(
                loop,
                ctx,
                lambda: MqttWebSocketProtocol(core, loop, path, max_frame_bytes, subject),
                core.counters,
                "WSS",
            )
            listeners.append(("MQTT over WebSocket over TLS (WSS)", cfg.wss_port, wss))
        if cfg.tcp_port:
            listeners.append(("MQTT", cfg.tcp_port, lambda: MqttStreamProtocol(core, loop)))
        if cfg.worker_port_base:
            port = cfg.worker_port_base + self.worker_index
            listeners.append(("MQTT", port, lambda: MqttStreamProtocol(core, loop)))
        family = socket.AF_INET6 if ":" in cfg.listen_address else socket.AF_INET
        for what, port, factory in listeners:
            server = await loop.create_server(
                factory,
                host=cfg.listen_address,
                port=port,
                reuse_port=True,
                backlog=4096,
                family=family,
            )
            self.servers.append(server)
            where = f"{cfg.listen_address}:{port}"
            suffix = f" (path {path})" if "WebSocket" in what else ""
            log.info("worker %d: %s on %s%s", self.worker_index, what, where, suffix)
        self._ticker_task = loop.create_task(self._ticker(), name="tick")

    def reload_tls(self) -> None:
        """SIGHUP: a new TLS context from the files for the next handshakes (open connections
        keep theirs)."""
        if self.tls_live is None:
            log.info("worker %d: SIGHUP: no TLS listener, nothing to reload", self.worker_index)
            return
        tls.reload(self.tls_live, self.config.tls)

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
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop's handler reloads TLS
    die_with_parent()
    configure_logging(config.logging, f"worker-{index}")
    try:
        import uvloop

        uvloop.run(_main(config, index, ipc_dir))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_main(config, index, ipc_dir))


async def _main(config: Config, index: int, ipc_dir: str) -> None:
    loop = asyncio.get_running_loop()
    try:
        tls_context = load_tls(config)
    except ConfigError as exc:
        log.error("worker %d: %s", index, exc)
        raise SystemExit(EXIT_CONFIG) from None
    mesh = WorkerMesh(config, index, ipc_dir, loop)
    store = None if config.session_store.type is StoreType.MEMORY else StoreLink(config, index, ipc_dir, loop)
    worker = Worker(config, index, mesh, store, tls_context)
    mesh.attach(worker.core)
    if config.auth.enabled:  # password hashes are checked in threads, never on this loop
        worker.core.verifier = ThreadVerifier(loop, worker.core.flush)
    loop.add_signal_handler(signal.SIGTERM, worker.stop)
    loop.add_signal_handler(signal.SIGHUP, worker.reload_tls)
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
