"""CPU time and resident memory of a process tree, read from /proc.

Why: the benchmark charges a broker for all of its processes (MeshMQ's supervisor, workers,
relay and store; mosquitto's one), and checks that the load generator's own processes are not
the bottleneck. Both need "CPU seconds used by this tree between two instants" and "RSS of this
tree now", which Linux exposes in /proc/<pid>/stat and /proc/<pid>/statm.

Must not: signal, wait for or otherwise touch the processes it reads; it only reads /proc.
Linux only.

Invariants:
- A process is identified by (pid, start time), so a pid reused between two samples is not
  mistaken for the process that had it before; a process that appears between two samples is
  charged from zero.
- CPU time is utime + stime of every live process of the tree (all threads included); time of
  a process that exited between two samples is lost, except where its parent reaped it (then it
  is in the parent's cutime/cstime, which is added too).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """One process as /proc/<pid>/stat shows it."""

    pid: int
    ppid: int
    start_ticks: int
    cpu_ticks: int  # utime + stime + cutime + cstime
    rss_bytes: int


@dataclass(frozen=True, slots=True)
class TreeSample:
    """The processes of one or more trees at one instant."""

    procs: tuple[ProcStat, ...]

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.procs)

    @property
    def cpu_s(self) -> float:
        return sum(p.cpu_ticks for p in self.procs) / CLOCK_TICKS_PER_S

    @property
    def rss_bytes(self) -> int:
        return sum(p.rss_bytes for p in self.procs)


def read_proc(pid: int) -> ProcStat | None:
    """The process's stat, or None if it is gone (or a zombie with nothing left to read)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_bytes()
        statm = (_PROC / str(pid) / "statm").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); field N is fields[N - 3].
    utime, stime, cutime, cstime = (int(fields[n - 3]) for n in (14, 15, 16, 17))
    statm_fields = statm.split()
    rss_pages = int(statm_fields[1]) if len(statm_fields) > 1 else 0
    return ProcStat(
        pid=pid,
        ppid=int(fields[4 - 3]),
        start_ticks=int(fields[22 - 3]),
        cpu_ticks=utime + stime + cutime + cstime,
        rss_bytes=rss_pages * PAGE_BYTES,
    )


def _all_procs() -> list[ProcStat]:
    procs = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            stat = read_proc(int(entry.name))
            if stat is not None:
                procs.append(stat)
    return procs


def sample_forest(roots: Iterable[int]) -> dict[int, TreeSample]:
    """Each root's tree, from one pass over /proc; a gone root maps to an empty sample."""
    procs = _all_procs()
    by_pid = {p.pid: p for p in procs}
    children: dict[int, list[ProcStat]] = {}
    for proc in procs:
        children.setdefault(proc.ppid, []).append(proc)
    forest: dict[int, TreeSample] = {}
    for root in roots:
        found: dict[int, ProcStat] = {root: by_pid[root]} if root in by_pid else {}
        stack = list(found.values())
        while stack:
            for child in children.get(stack.pop().pid, ()):
                if child.pid not in found:
                    found[child.pid] = child
                    stack.append(child)
        forest[root] = TreeSample(tuple(sorted(found.values(), key=lambda p: p.pid)))
    return forest


def sample_trees(roots: Iterable[int]) -> TreeSample:
    """Every live process under (and including) each root pid, as one sample."""
    merged: dict[int, ProcStat] = {}
    for tree in sample_forest(roots).values():
        merged.update((p.pid, p) for p in tree.procs)
    return TreeSample(tuple(sorted(merged.values(), key=lambda p: p.pid)))


def sample_tree(root: int) -> TreeSample:
    return sample_trees((root,))


def cpu_s_between(before: TreeSample, after: TreeSample) -> float:
    """CPU seconds the tree used between two samples, per process identity."""
    earlier = {(p.pid, p.start_ticks): p.cpu_ticks for p in before.procs}
    ticks = 0
    for proc in after.procs:
        ticks += max(0, proc.cpu_ticks - earlier.get((proc.pid, proc.start_ticks), 0))
    return ticks / CLOCK_TICKS_PER_S
