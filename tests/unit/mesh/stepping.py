"""Step hand-driven mesh objects until a condition holds: the bounded loop the mesh unit tests share.

Why: the link and relay unit tests (`test_cluster_links.py`, `test_relay_cluster.py`) run no
threads and no event loop; the test itself steps every object at one clock reading, asks its
condition, and sleeps a little, so that real sockets on 127.0.0.1 can move frames in between.
Only what one step does differs between them, so that is the caller's `step(now)`.

Must not: loop unbounded: at most `timeout_s` seconds and `_MAX_ROUNDS` rounds.

Invariants: `step` gets `time.monotonic()` of its round; `until` is asked after every round and
once more when the time or the rounds are up, so its last answer is what `step_until` returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

__all__ = ["step_until"]

_MAX_ROUNDS: Final = 20_000
_SLEEP_S: Final = 0.003


def step_until(step: Callable[[float], None], until: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Call `step(now)` until `until()` holds (True) or the time is up (`until()` once more)."""
    deadline = time.monotonic() + timeout_s
    for _ in range(_MAX_ROUNDS):
        now = time.monotonic()
        step(now)
        if until():
            return True
        if now > deadline:
            break
        time.sleep(_SLEEP_S)
    return until()
