"""Process groups a test started: which of their processes still live, and killing them for good.

Why: a MeshMQ node is a supervisor and its children (store, relay, workers) in one process group
of their own (`start_new_session`). A test that kills or stops a node must wait until EVERY
process of that group is gone, or a restart finds its ports and IPC sockets still taken (the
kernel may even hand a connection to a dying worker's `SO_REUSEPORT` socket). The loopback and
lab cluster nodes (`tests/cluster/`), the lab's helper processes and the durable node of
`tests/e2e/durability_helpers.py` all wait the same way, with these two functions.

Must not: signal any group but one the caller started (named by its leader's pid); wait unbounded.

Invariants: zombies count as gone (their parent reaps them later); `kill_group` returns only when
no live process of the group is left, and raises AssertionError naming the survivors otherwise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Final

__all__ = ["GONE_TIMEOUT_S", "group_alive", "kill_group"]

GONE_TIMEOUT_S: Final = 10.0


def group_alive(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes of process group `pgid`."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after it.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


def kill_group(pgid: int, timeout_s: float = GONE_TIMEOUT_S, *, label: str = "") -> None:
    """SIGKILL process group `pgid` (one this test started) until none of it is alive (bounded).

    `label` starts the error message (e.g. the node's name)."""
    deadline = time.monotonic() + timeout_s
    while alive := group_alive(pgid):
        if time.monotonic() >= deadline:
            raise AssertionError(f"{label}processes {alive} of group {pgid} still alive after {timeout_s}s")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # again: a child that outlived its parent
        time.sleep(0.01)
