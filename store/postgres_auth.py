"""Users and ACL rules in PostgreSQL: the SQL behind `PostgresBackend`'s auth methods.

Why: `store/postgres.py` holds the session, queue and retained SQL and is near the size where a
module should split; users and rules are a separate concern (rare writes, whole-table reads, a
version that several nodes poll), so their SQL lives here, one function per backend method,
each given a pooled connection inside the transaction the backend opened.

Must not: open connections or transactions itself (the caller owns both, and turns driver errors
into store errors); check input (the backend runs `records.check_user` / `check_acl` first).

Invariants:
- Every change first locks the one row of `auth_version` (`SELECT ... FOR UPDATE`), so changes
  made at the same time by the store processes of several nodes are serialised in one order,
  always the same lock order (version row first, then users / acl_rules: no deadlock), and
  each change returns the version it produced (`UPDATE ... RETURNING version`).
- A delete that found nothing leaves the version alone and returns the current one.
- `load_auth` reads the three tables in one REPEATABLE READ transaction: one snapshot. Users are
  ordered by code point (`COLLATE "C"`, byte order of UTF-8), like SQLite and the memory
  backend, whatever the database's locale.
"""

from __future__ import annotations

from typing import Any

import psycopg

from store.errors import StoreError, StoreRecordError
from store.records import AclRecord, UserRecord

__all__ = ["add_acl", "auth_version", "delete_acl", "delete_user", "load_auth", "put_user"]

Conn = psycopg.Connection[tuple[Any, ...]]


def auth_version(conn: Conn) -> int:
    return _one_int(conn.execute("SELECT version FROM auth_version WHERE id = 1").fetchone())


def load_auth(conn: Conn) -> tuple[int, list[UserRecord], list[AclRecord]]:
    """Call as the first statements of a fresh transaction (it sets the isolation level)."""
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    version = auth_version(conn)
    users = [
        UserRecord(r[0], r[1], r[2])
        for r in conn.execute(
            'SELECT username, password_hash, admin FROM users ORDER BY username COLLATE "C"'
        )
    ]
    rules = [
        AclRecord(r[0], r[1], r[2], r[3])
        for r in conn.execute("SELECT id, username, topic, access FROM acl_rules ORDER BY id")
    ]
    return version, users, rules


def put_user(conn: Conn, username: str, password_hash: str | None, admin: bool | None) -> tuple[int, bool]:
    _lock_version(conn)
    found = conn.execute("SELECT 1 FROM users WHERE username = %s FOR UPDATE", (username,)).fetchone()
    if found is None:
        if password_hash is None:
            raise StoreRecordError(f"user {username!r} does not exist: creating it needs a password hash")
        conn.execute(
            "INSERT INTO users (username, password_hash, admin) VALUES (%s, %s, %s)",
            (username, password_hash, bool(admin)),
        )
    else:
        conn.execute(
            "UPDATE users SET password_hash = coalesce(%s, password_hash), admin = coalesce(%s, admin), "
            "updated_at = now() WHERE username = %s",
            (password_hash, admin, username),
        )
    return _bump(conn), found is None


def delete_user(conn: Conn, username: str) -> tuple[int, bool]:
    version = _lock_version(conn)
    existed = conn.execute("DELETE FROM users WHERE username = %s", (username,)).rowcount > 0
    rules = conn.execute("DELETE FROM acl_rules WHERE username = %s", (username,)).rowcount
    return (_bump(conn) if existed or rules else version), existed


def add_acl(conn: Conn, user: str, topic: str, access: str) -> tuple[int, int]:
    _lock_version(conn)
    rule_id = _one_int(
        conn.execute(
            "INSERT INTO acl_rules (username, topic, access) VALUES (%s, %s, %s) RETURNING id",
            (user, topic, access),
        ).fetchone()
    )
    return _bump(conn), rule_id


def delete_acl(conn: Conn, rule_id: int) -> tuple[int, bool]:
    version = _lock_version(conn)
    if conn.execute("DELETE FROM acl_rules WHERE id = %s", (rule_id,)).rowcount > 0:
        return _bump(conn), True
    return version, False


def _lock_version(conn: Conn) -> int:
    return _one_int(conn.execute("SELECT version FROM auth_version WHERE id = 1 FOR UPDATE").fetchone())


def _bump(conn: Conn) -> int:
    return _one_int(
        conn.execute(
            "UPDATE auth_version SET version = version + 1 WHERE id = 1 RETURNING version"
        ).fetchone()
    )


def _one_int(row: tuple[Any, ...] | None) -> int:
    if row is None:
        raise StoreError("the auth_version row is missing (schema migration 002 not applied?)")
    return int(row[0])
