"""One worker process: an event loop, the MQTT listeners and a broker core.

Why: the unit that terminates MQTT connections. It owns the asyncio loop (uvloop when present),
binds its listeners with SO_REUSEPORT so several workers can share a port, drives the core's
timers, and drains on request.

Must not: contain MQTT rules (the core and handlers do) or talk to a database.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from broker.config import Config
from broker.core import BrokerCore
from broker.net.tcp import MqttStreamProtocol

log = logging.getLogger("broker.worker")

TICK_S = 0.25
DRAIN_GRACE_S = 2.0


class Worker:
    def __init__(self, config: Config, worker_id: int = 1) -> None:
        self.config = config
        self.worker_id = worker_id
        self.core = BrokerCore(config.mqtt)
        self.servers: list[asyncio.Server] = []
        self._stop = asyncio.Event()
        self._ticker_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        if cfg.tcp_port:
            server = await loop.create_server(
                lambda: MqttStreamProtocol(self.core, loop),
                host=cfg.listen_address,
                port=cfg.tcp_port,
                reuse_port=True,
                backlog=4096,
                family=socket.AF_INET6 if ":" in cfg.listen_address else socket.AF_INET,
            )
            self.servers.append(server)
            log.info("worker %d: MQTT on %s:%d", self.worker_id, cfg.listen_address, cfg.tcp_port)
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
        """Close listeners first, then tell clients and close them; bounded by a grace time."""
        for server in self.servers:
            server.close()
        self.core.shutdown()
        self.core.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_GRACE_S
        while self.core.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        log.info("worker %d: drained (%d connection(s) left)", self.worker_id, len(self.core.connections))
