"""Run one scenario's worker processes through their phases and sample the broker meanwhile.

Why: the scenario code should say *what* runs (which workers, in which order) and *what* the
numbers mean; this module owns *how*: spawning processes, the Ready/Go/result/Stop handshake,
the one shared time line, and reading CPU and RSS of the broker and of the generator at the
window's edges, so that "broker CPU per delivered message" and "was the generator saturated"
come from the same instants as the message counts.

Must not: interpret counts (that is `scenarios`), print, or leave a process behind: every
worker it spawns is joined, and terminated (SIGTERM, then SIGKILL) by its own PID if it does
not exit. The broker is only read from /proc, never signalled.

Invariants:
- Stages start in order; stage N+1 is spawned only when every worker of stage N is Ready
  (subscribers are subscribed before any publisher exists).
- All waits are bounded by the `Timing` values.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from tools import procstat
from tools.loadgen.worker import Failed, Go, Ready, Stop, WorkerResult, WorkerSpec, worker_main

JOIN_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Timing:
    seconds: float = 5.0  # measured window
    warmup_s: float = 1.0  # traffic before the window opens
    drain_s: float = 5.0  # longest wait for in-flight messages after the window
    quiet_s: float = 1.0  # subscribers finish after this long without a delivery
    lead_s: float = 0.3  # from sending Go to the start of traffic
    settle_s: float = 1.0  # before the closing RSS sample of a run without a window (idle)
    ready_timeout_s: float = 60.0
    result_timeout_s: float = 120.0  # beyond end + drain + quiet (idle connects take this long at most)


@dataclass(frozen=True, slots=True)
class RunOutcome:
    results: tuple[tuple[WorkerSpec, WorkerResult], ...]
    errors: tuple[str, ...]  # workers that failed or did not answer; the run is then not valid
    window_s: float  # between the parent's two CPU samples: the window, or Go to results if none
    broker_cpu_s: float | None  # over the window; None without a broker pid
    broker_rss_before_bytes: int | None  # before traffic starts
    broker_rss_after_bytes: int | None  # after results and settle_s, connections still open
    generator_cpu_s: float  # all worker processes, over the window
    generator_max_proc_cpu_s: float  # the busiest worker process, over the window
    worker_cpu_s: tuple[tuple[str, float], ...] = ()  # (worker name, CPU s over the window)
    broker_proc_cpu_s: tuple[tuple[int, float], ...] = ()  # (pid, CPU s over the window), broker tree

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(slots=True)
class _Worker:
    spec: WorkerSpec
    process: BaseProcess
    conn: Connection


def _spawn(ctx: multiprocessing.context.SpawnContext, spec: WorkerSpec) -> _Worker:
    parent_end, child_end = ctx.Pipe()
    process = ctx.Process(
        target=worker_main, args=(spec, child_end), name=f"loadgen-{spec.name}", daemon=True
    )
    process.start()
    child_end.close()
    return _Worker(spec, process, parent_end)


def _receive(worker: _Worker, timeout_s: float) -> object:
    try:
        if worker.conn.poll(max(0.0, timeout_s)):
            return worker.conn.recv()
    except (EOFError, OSError):
        return None
    return None


def _describe(worker: _Worker, message: object, waiting_for: str) -> str:
    if isinstance(message, Failed):
        return f"{worker.spec.name}: {message.error}"
    if message is None:
        state = "exited" if not worker.process.is_alive() else "no answer"
        return f"{worker.spec.name}: {state} while waiting for {waiting_for}"
    return f"{worker.spec.name}: unexpected {type(message).__name__} while waiting for {waiting_for}"


def _sleep_until(when_s: float) -> None:
    time.sleep(max(0.0, when_s - time.monotonic()))


def _finish(workers: list[_Worker]) -> None:
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.conn.send(Stop())
    for worker in workers:
        worker.process.join(JOIN_TIMEOUT_S)
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(2.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(2.0)
        worker.conn.close()


def run(stages: Sequence[Sequence[WorkerSpec]], timing: Timing, broker_pid: int | None = None) -> RunOutcome:
    """Spawn the stages in order, run one Go, collect one result per worker."""
    ctx = multiprocessing.get_context("spawn")
    workers: list[_Worker] = []
    errors: list[str] = []

    def failed() -> RunOutcome:
        return RunOutcome((), tuple(errors), 0.0, None, None, None, 0.0, 0.0)

    try:
        for stage in stages:
            started = [_spawn(ctx, spec) for spec in stage]
            workers.extend(started)
            deadline_s = time.monotonic() + timing.ready_timeout_s
            for worker in started:
                message = _receive(worker, deadline_s - time.monotonic())
                if not isinstance(message, Ready):
                    errors.append(_describe(worker, message, "Ready"))
            if errors:
                return failed()
        broker_roots = (broker_pid,) if broker_pid is not None else ()
        rss_before = procstat.sample_trees(broker_roots).rss_bytes if broker_pid is not None else None
        start_s = time.monotonic() + timing.lead_s
        go = Go(
            start_s=start_s,
            warm_s=start_s + timing.warmup_s,
            end_s=start_s + timing.warmup_s + timing.seconds,
            drain_s=timing.drain_s,
            quiet_s=timing.quiet_s,
        )
        for worker in workers:
            worker.conn.send(go)
        roots = [*broker_roots, *(w.process.pid for w in workers if w.process.pid is not None)]
        _sleep_until(go.warm_s)
        first, first_s = procstat.sample_forest(roots), time.monotonic()
        if timing.seconds > 0:
            _sleep_until(go.end_s)
            last, last_s = procstat.sample_forest(roots), time.monotonic()

        results: list[tuple[WorkerSpec, WorkerResult]] = []
        deadline_s = go.end_s + timing.drain_s + timing.quiet_s + timing.result_timeout_s
        for worker in workers:
            message = _receive(worker, deadline_s - time.monotonic())
            if isinstance(message, WorkerResult):
                results.append((worker.spec, message))
            else:
                errors.append(_describe(worker, message, "its result"))
        if timing.seconds <= 0:  # no window: the workers' own phase (connecting) is what we measure
            last, last_s = procstat.sample_forest(roots), time.monotonic()
        rss_after = None
        if broker_pid is not None:
            if timing.seconds <= 0:
                time.sleep(timing.settle_s)  # let the broker finish allocating for the last CONNECTs
            rss_after = procstat.sample_trees(broker_roots).rss_bytes

        def cpu(root: int) -> float:
            return procstat.cpu_s_between(first[root], last[root])

        def per_proc(root: int) -> tuple[tuple[int, float], ...]:
            return tuple(
                (proc.pid, procstat.cpu_s_between(first[root], procstat.TreeSample((proc,))))
                for proc in last[root].procs
            )

        per_worker = tuple((w.spec.name, cpu(w.process.pid)) for w in workers if w.process.pid is not None)
        generator = [cpu_s for _name, cpu_s in per_worker]
        return RunOutcome(
            results=tuple(results),
            errors=tuple(errors),
            window_s=last_s - first_s,
            broker_cpu_s=cpu(broker_pid) if broker_pid is not None else None,
            broker_rss_before_bytes=rss_before,
            broker_rss_after_bytes=rss_after,
            generator_cpu_s=sum(generator),
            generator_max_proc_cpu_s=max(generator, default=0.0),
            worker_cpu_s=per_worker,
            broker_proc_cpu_s=per_proc(broker_pid) if broker_pid is not None else (),
        )
    finally:
        _finish(workers)
