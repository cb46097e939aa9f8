"""The seam between the store process and a database: the `Backend` protocol and its factory.

Why: the store process (group commit, the ZeroMQ service) is written once against this protocol;
PostgreSQL, SQLite and memory are interchangeable behind it, and one contract test suite
(`tests/unit/store/test_contract.py`) holds every backend to the same behaviour, with the memory
backend as the reference.

Must not: import a database driver at module level (the factory imports the chosen backend
only), or `broker` (imports run broker -> store).

Contract every backend keeps:
- `apply` runs its ops in order inside ONE transaction: all land or none do. It first checks the
  whole batch (`records.check_ops`, `StoreRecordError`), then writes; a lost connection raises
  `StoreUnavailable` and the transaction is rolled back.
- The queue is FIFO by `seq` per client. `fetch_queue` skips rows still inside their visibility
  timeout, hides what it returns until `now + visibility_s`, and deletes (never returns) rows
  whose `expires_at <= now` among those it looks at; rows it hides come back by themselves once
  the timeout passes, and go only on `Ack` (or `DeleteSession`). Two fetches that run at the
  same time (two nodes on one PostgreSQL) never return the same row.
- `retained(now)` returns the retained messages that have not expired, in topic order;
  `sessions()` returns every session, in client id order.
- Users and ACL rules (`broker/ACCESS.md`): every change (`put_user`, `delete_user`, `add_acl`,
  `delete_acl`) checks its input first (`records.check_user` / `check_acl`, `StoreRecordError`)
  and bumps `auth_version` by one in the same transaction, and returns the version after it; a
  delete that found nothing changes nothing and returns the current version. `load_auth` is
  one consistent snapshot: users by name, rules by id. Rule ids only grow and are never reused.
  In PostgreSQL every change first locks the version row, so writers on several nodes are
  serialised and each sees the version it produced.
- Errors: `StoreConfigError` (will never work as configured), `StoreUnavailable` (retry later),
  `StoreRecordError` (bad input), all `StoreError`. Messages never contain a password.
- The store process is single threaded per backend object, except that a PostgreSQL backend may
  be called from several threads (its pool hands each call its own connection).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from store.errors import StoreConfigError
from store.records import AclRecord, QueuedRecord, RetainedRecord, SessionRecord, UserRecord, WriteOp

__all__ = ["KINDS", "Backend", "open_backend"]

KINDS = ("MEMORY", "SQLITE", "POSTGRES")


class Backend(Protocol):
    name: str  # "postgres" | "sqlite" | "memory"

    def open(self) -> None:
        """Connect and apply pending migrations; StoreConfigError or StoreUnavailable."""

    def close(self) -> None:
        """Release connections; safe to call twice and after a failed open."""

    def apply(self, ops: Sequence[WriteOp]) -> None:
        """Apply `ops` in order in one transaction, all or nothing."""

    def load_session(self, client_id: str) -> SessionRecord | None: ...

    def sessions(self) -> list[SessionRecord]: ...

    def fetch_queue(self, client_id: str, limit: int, visibility_s: float, now: float) -> list[QueuedRecord]:
        """Up to `limit` visible, unexpired rows of `client_id` in seq order, hidden until
        `now + visibility_s`; expired rows met on the way are deleted."""

    def queue_depth(self, client_id: str) -> int:
        """Rows stored for `client_id`, handed-out ones included (expired ones until a fetch meets them)."""

    def retained(self, now: float) -> list[RetainedRecord]: ...

    def schema_version(self) -> int:
        """The newest applied migration (0 for the memory backend, which has none)."""

    # --- users and ACL rules --------------------------------------------------------------------

    def auth_version(self) -> int:
        """The version of users and rules: 0 at first, +1 with every change."""

    def load_auth(self) -> tuple[int, list[UserRecord], list[AclRecord]]:
        """`(version, users by name, rules by id)`, all from one snapshot."""

    def put_user(self, username: str, password_hash: str | None, admin: bool | None) -> tuple[int, bool]:
        """Create or change a user; None leaves that field unchanged (a new user needs a hash,
        its admin flag defaults to False). Returns `(version, created)`."""

    def delete_user(self, username: str) -> tuple[int, bool]:
        """Delete the user and every rule whose `user` is `username`. `(version, the user existed)`."""

    def add_acl(self, user: str, topic: str, access: str) -> tuple[int, int]:
        """Append a rule; `(version, its id)`."""

    def delete_acl(self, rule_id: int) -> tuple[int, bool]:
        """Delete a rule; `(version, it existed)`."""


def open_backend(
    kind: str,
    *,
    sqlite_path: str = "",
    postgres_url: str = "",
    postgres_user: str = "",
    postgres_password: str = "",
    postgres_schema: str = "meshmq",
    pool_size: int = 4,
) -> Backend:
    """Build (but do not open) the backend of `kind` ("MEMORY" | "SQLITE" | "POSTGRES")."""
    chosen = kind.upper()
    if chosen == "MEMORY":
        from store.memory import MemoryBackend

        return MemoryBackend()
    if chosen == "SQLITE":
        from store.sqlite import SqliteBackend

        if not sqlite_path:
            raise StoreConfigError("the SQLite store needs a database file path")
        return SqliteBackend(sqlite_path)
    if chosen == "POSTGRES":
        from store.postgres import PostgresBackend

        if not postgres_url:
            raise StoreConfigError("the PostgreSQL store needs a URL (postgresql://host:port/database)")
        return PostgresBackend(
            postgres_url,
            user=postgres_user,
            password=postgres_password,
            schema=postgres_schema,
            pool_size=pool_size,
        )
    raise StoreConfigError(f"unknown session store type {kind!r} (expected one of {', '.join(KINDS)})")
