"""Checking a CONNECT's credentials against the store's users, without blocking the worker.

Why: a scrypt verification takes tens of milliseconds (`store/passwords.py`); done on the event
loop it would stall every client of the worker. The core asks a `PasswordVerifier` and waits
like it waits for a session (the CONNECT is held); the worker's verifier runs the hash in a small
thread pool. (Verified passwords are remembered by `store.passwords.CredentialCache`, which the
core holds, so a reconnect storm after a failover costs one HMAC per client, not one scrypt.)

Must not: keep a password; run a hash on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Protocol

from store.passwords import verify_password

VerifyDone = Callable[[bool, float], None]


class PasswordVerifier(Protocol):
    """Runs `verify_password(password, stored)` somewhere and calls `done(ok, now)` on the loop."""

    def verify(self, password: bytes, stored: str, now: float, done: VerifyDone) -> None: ...


class InlineVerifier:
    """Verifies at once, on the caller's thread: for tests of the core (no event loop there)."""

    def verify(self, password: bytes, stored: str, now: float, done: VerifyDone) -> None:
        done(verify_password(password, stored), now)


class ThreadVerifier:
    """Verifies in a small thread pool (hashlib releases the GIL) and answers on the loop."""

    THREADS: Final = 2

    def __init__(self, loop: asyncio.AbstractEventLoop, after: Callable[[], None]) -> None:
        self.loop = loop
        self.after = after  # the core's flush: the answer's CONNACK goes out at once
        self.pool = ThreadPoolExecutor(self.THREADS, thread_name_prefix="verify")

    def verify(self, password: bytes, stored: str, now: float, done: VerifyDone) -> None:
        future = self.pool.submit(verify_password, password, stored)

        def answered(_: object) -> None:
            self.loop.call_soon_threadsafe(self._answer, future.result(), done)

        future.add_done_callback(answered)

    def _answer(self, ok: bool, done: VerifyDone) -> None:
        done(ok, self.loop.time())
        self.after()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
