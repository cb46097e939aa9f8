"""The store process's side of users and ACL rules: the auth requests and the `authtable` broadcast.

Why: every worker of every node checks CONNECTs, publishes and subscriptions against the same
users and rules (`broker/ACCESS.md`), and a change made through any node must reach them all
within a second without a restart. The store process owns the database, so it answers the
requests `auth`, `uput`, `udel`, `aadd`, `adel` (`mesh/PROTOCOL.md`, "The store plane") and
sends the whole table on `store.pub` (channel `\\x00A`) whenever it may have changed: at start,
after each change it makes, and, in cluster mode, when the version it polls every 250 ms moved
(another node's store process changed it).

Must not: go through the group-commit writer (auth writes are rare and independent of the
session traffic: they run directly, in the service thread); block the service loop for long
(a poll that fails backs off to once a second, and logs at most once a minute); send a partial
table (the table is small and always sent whole, so a worker that missed one is repaired by the
next); put a password hash into a log line.

Invariants:
- `sent_version` is the version of the last table broadcast, None before the first. A change
  this process made is broadcast at once (a delete that found nothing changed nothing and is
  not); when a broadcast fails, `stale` is set and `tick` sends the table again (once a
  second), so a change is never left unannounced while the database is up.
- Replies: `authtable [version, users, rules]`, `done [version, created|existed]`, `done
  [version, id]`, or `failed [reason]` (`failed ["store unavailable"]` while the database is down).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from mesh import envelope as env
from mesh.errors import EnvelopeError
from store import wire
from store.backend import Backend
from store.errors import StoreError, StoreUnavailable

__all__ = ["AUTH_KINDS", "CH_AUTH", "POLL_S", "AuthService"]

log = logging.getLogger("store.auth")

CH_AUTH: Final = b"\x00A"
AUTH_KINDS: Final = frozenset({"auth", "uput", "udel", "aadd", "adel"})
POLL_S: Final = 0.25  # cluster mode: how often the version is read
RETRY_S: Final = 1.0  # after a failed poll or broadcast
WARN_EVERY_S: Final = 60.0
UNAVAILABLE: Final = "store unavailable"

Reply = tuple[str, tuple[object, ...]]  # (kind, body)
Publish = Callable[[bytes, bytes], None]  # (channel, control frame) onto store.pub


class AuthService:
    def __init__(self, backend: Backend, publish: Publish, *, cluster: bool) -> None:
        self.backend = backend
        self.publish = publish
        self.cluster = cluster
        self.sent_version: int | None = None
        self.stale = True  # the table must be (re)sent at the next tick
        self.next_check = 0.0  # monotonic time of the next poll / retry
        self._warned_at: float | None = None

    # -- requests -------------------------------------------------------------------------------------

    def handle(self, kind: str, body: tuple[object, ...], now: float) -> Reply:
        """The reply to one auth request; never raises a `StoreError`."""
        try:
            reply = self._handle(kind, body)
        except StoreUnavailable as exc:
            self._warn(now, f"auth request {kind!r} failed: {exc}")
            return "failed", (UNAVAILABLE,)
        except StoreError as exc:
            log.info("auth request %r refused: %s", kind, exc)
            return "failed", (str(exc),)
        if kind != "auth" and (self.stale or reply[1][0] != self.sent_version):
            self.broadcast(now)  # a change: announce it now, without waiting for a poll
        return reply

    def _handle(self, kind: str, body: tuple[object, ...]) -> Reply:
        if kind == "auth":
            version, users, rules = self.backend.load_auth()
            return "authtable", wire.authtable_to_wire(version, users, rules)
        if kind == "uput":
            username, password_hash, admin = wire.user_change_from_wire(body)
            version, created = self.backend.put_user(username, password_hash, admin)
            log.info("user %r %s (auth version %d)", username, "created" if created else "changed", version)
            return "done", (version, created)
        if kind == "udel":
            username = wire.username_from_wire(body)
            version, existed = self.backend.delete_user(username)
            log.info("user %r deleted (existed: %s, auth version %d)", username, existed, version)
            return "done", (version, existed)
        if kind == "aadd":
            user, topic, access = wire.acl_rule_from_wire(body)
            version, rule_id = self.backend.add_acl(user, topic, access)
            log.info("ACL rule %d added: %r %r %s (auth version %d)", rule_id, user, topic, access, version)
            return "done", (version, rule_id)
        if kind == "adel":
            rule_id = wire.rule_id_from_wire(body)
            version, existed = self.backend.delete_acl(rule_id)
            log.info("ACL rule %d deleted (existed: %s, auth version %d)", rule_id, existed, version)
            return "done", (version, existed)
        raise wire.WireError(f"not an auth request: {kind!r}")

    # -- broadcast ------------------------------------------------------------------------------------

    def broadcast(self, now: float) -> bool:
        """Send the whole table on `\\x00A`; False (and `stale` stays set) if it cannot be read."""
        try:
            version, users, rules = self.backend.load_auth()
        except StoreError as exc:
            self.stale = True
            self.next_check = now + RETRY_S
            self._warn(now, f"cannot read users and ACL rules to broadcast them: {exc}")
            return False
        try:
            frame = env.pack_control("authtable", 0, *wire.authtable_to_wire(version, users, rules))
        except EnvelopeError as exc:
            self.stale = True
            self.next_check = now + RETRY_S
            self._warn(now, f"cannot pack the auth table: {exc}")
            return False
        self.publish(CH_AUTH, frame)
        self.sent_version, self.stale = version, False
        return True

    def tick(self, now: float) -> None:
        """Call from the service loop: resend a stale table; in cluster mode, poll the version."""
        if now < self.next_check:
            return
        self.next_check = now + POLL_S
        if self.stale:
            self.broadcast(now)
            return
        if not self.cluster:
            return
        try:
            version = self.backend.auth_version()
        except StoreError as exc:
            self.next_check = now + RETRY_S
            self._warn(now, f"cannot poll the auth version: {exc}")
            return
        if version != self.sent_version:
            self.broadcast(now)

    def wait_s(self, now: float) -> float | None:
        """How long the loop may sleep before `tick` has something to do (None: no deadline)."""
        if not (self.stale or self.cluster):
            return None
        return max(self.next_check - now, 0.0)

    def _warn(self, now: float, message: str) -> None:
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("%s (logged at most once a minute)", message)
