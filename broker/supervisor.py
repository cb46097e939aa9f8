"""The node's parent process.

Why: it starts the node's processes and stops them on SIGTERM/SIGINT with a graceful drain.

Today it runs a single worker in its own process (issue 2). The multi-process node — per-core
workers, the relay and the store as spawned children with restart on crash — replaces
`run_node`'s body in the next issue; the CLI and the drain contract stay.

Must not: move messages.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from broker.config import Config
from broker.worker import Worker

log = logging.getLogger("broker.supervisor")


def run_node(config: Config) -> int:
    if config.worker_count > 1:
        log.warning(
            "Workers: %d requested; this version runs one worker (multi-worker nodes come next)",
            config.worker_count,
        )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        uvloop = None  # type: ignore[assignment]
    runner = uvloop.run if uvloop is not None else asyncio.run
    try:
        runner(_main(config))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


async def _main(config: Config) -> None:
    worker = Worker(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, worker, sig)
    log.info("MeshMQ node %r starting (pid %d)", config.node_name, __import__("os").getpid())
    await worker.run_until_stopped()
    log.info("MeshMQ node %r stopped", config.node_name)


def _on_signal(worker: Worker, sig: signal.Signals) -> None:
    log.info("%s received: draining", sig.name)
    worker.stop()
