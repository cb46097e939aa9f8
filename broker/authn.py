"""Checking a CONNECT's credentials against the store's users, without blocking the worker.

Why: a scrypt verification takes tens of milliseconds (`store/passwords.py`); done on the event
loop it would stall every client of the worker. The core asks a `PasswordVerifier` and waits
like it waits for a session (the CONNECT is held); the worker's verifier runs the hash in a small
thread pool. A verified password is remembered as an HMAC under a random per-process key, tied
to the stored hash, so that a reconnect storm (a failover moves thousands of clients at once)
costs one HMAC per client instead of one scrypt; the password itself is never kept.

Must not: keep a password or a digest that would verify without the key; answer differently for
"unknown user" and "wrong password" (the same code, and a hash is computed for both, so the time
taken does not tell them apart either).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Protocol

from store.passwords import hash_password, verify_password

CACHE_MAX: Final = 100_000
# Verified against when the user does not exist, so that an unknown name costs the same time
# (made on first use: a hash costs tens of milliseconds, every process would pay it at import).
_dummy: list[str] = []

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


class CredentialCache:
    """(username, stored hash) -> HMAC of the password that verified against it."""

    __slots__ = ("_key", "_known")

    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._known: dict[tuple[str, str], bytes] = {}

    def _mac(self, password: bytes) -> bytes:
        return hmac.new(self._key, password, hashlib.sha256).digest()

    def knows(self, username: str, stored: str, password: bytes) -> bool:
        known = self._known.get((username, stored))
        return known is not None and hmac.compare_digest(known, self._mac(password))

    def remember(self, username: str, stored: str, password: bytes) -> None:
        if len(self._known) >= CACHE_MAX:
            self._known.clear()
        self._known[(username, stored)] = self._mac(password)

    def forget_others(self, current: dict[str, str]) -> None:
        """The users changed: keep only entries whose user still has the same hash."""
        self._known = {key: mac for key, mac in self._known.items() if current.get(key[0]) == key[1]}

    def __len__(self) -> int:
        return len(self._known)


def dummy_hash() -> str:
    if not _dummy:
        _dummy.append(hash_password(os.urandom(16)))
    return _dummy[0]
