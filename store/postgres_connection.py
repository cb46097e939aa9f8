"""Reaching PostgreSQL for the store: the first connection, the pool, and what driver errors mean.

Why: `store/postgres.py` is the backend's SQL; how it gets a connection, and how a failure of the
driver becomes a store error the writer and the health check can act on, is a concern of its
own: telling a configuration mistake (stop and say so) from an outage (retry) at start, setting
up every pooled connection the same way, and keeping every message one readable line that
names the server.

Must not: be imported by anything but `store.postgres` (psycopg loads only when a PostgreSQL store
is configured); touch the store's tables or the schema (that and the migrations are
`store.postgres`'s); put a password into a message or a log line (`describe` names host, port,
database and user only); set a per-connection sequence cache (see the migration: it would break
FIFO across pool connections).

Invariants:
- `connect_once` raises `StoreConfigError` for what retrying cannot fix (bad credentials, a
  missing database or role, a malformed option) and `StoreUnavailable` for the rest (refused,
  unreachable, timed out). libpq reports no SQLSTATE for connection failures, so the first is
  recognised by the substrings in `_CONFIG_ERRORS`.
- Every pooled connection has `search_path` set to the configured schema and the store's index
  plans pinned (`configure`), and is checked on checkout (one round trip), so a connection that
  died while idle (a database restart) is replaced instead of failing a batch.
- `store_error`: pool timeouts and `psycopg.OperationalError` (connection loss, deadlocks and
  the like) are `StoreUnavailable`; data the server rejects is `StoreRecordError`; anything else
  from the driver is `StoreError`.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from store.errors import StoreConfigError, StoreError, StoreRecordError, StoreUnavailable

__all__ = [
    "Conn",
    "configure",
    "connect_kwargs",
    "connect_once",
    "describe",
    "one_line",
    "open_pool",
    "store_error",
]

Conn = psycopg.Connection[tuple[Any, ...]]

_APPLICATION_NAME: Final = "meshmq-store"
# Substrings of libpq's connection errors that retrying cannot fix (it reports no SQLSTATE there).
_CONFIG_ERRORS: Final = (
    "password authentication failed",
    "no password supplied",
    "no pg_hba.conf entry",
    "does not exist",  # database or role
    "permission denied",
    "authentication method",
    "invalid connection option",
    "invalid port number",
    "invalid integer value",
    "invalid sslmode",
    "server does not support ssl",
)
_PREFIX: Final = re.compile(
    r'^(connection failed: )?(connection to server at "[^"]*"(?: \([^)]*\))?, port \d+ failed: )?'
)


def connect_kwargs(user: str, password: str, connect_timeout_s: float) -> dict[str, Any]:
    """The keyword arguments of every connection, the first one and the pool's alike."""
    kwargs: dict[str, Any] = {
        "application_name": _APPLICATION_NAME,
        "connect_timeout": max(1, round(connect_timeout_s)),
    }
    if user:
        kwargs["user"] = user
    if password:
        kwargs["password"] = password
    return kwargs


def describe(url: str, user: object) -> str:
    """'PostgreSQL at host:port (database d, user u)', the prefix of every message; no password.

    Raises `StoreConfigError` when the URL does not parse.
    """
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        raise StoreConfigError(f"the PostgreSQL URL is not valid: {one_line(str(e))}") from None
    host = info.get("host") or "the local socket"
    port = info.get("port") or "5432"
    dbname = info.get("dbname") or "(default)"
    who = user or info.get("user") or "(default)"
    return f"PostgreSQL at {host}:{port} (database {dbname}, user {who})"


def connect_once(url: str, kwargs: dict[str, Any], where: str) -> Conn:
    """One autocommit connection outside the pool: the check at start, and the migrations' own."""
    try:
        return psycopg.connect(url, autocommit=True, **kwargs)
    except psycopg.OperationalError as e:
        detail = one_line(_PREFIX.sub("", str(e)))
        if any(marker in detail for marker in _CONFIG_ERRORS):
            raise StoreConfigError(
                f"{where}: cannot log in or no such database ({detail}); "
                "check the store URL, user and password"
            ) from None
        raise StoreUnavailable(f"{where}: unreachable ({detail}); will retry") from None
    except psycopg.Error as e:
        raise StoreConfigError(f"{where}: cannot connect ({one_line(str(e))})") from None


def configure(conn: Conn, schema: str) -> None:
    """Set up one pooled connection: the schema on the search path, the index plans pinned."""
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    # The queue's statistics are always stale (it fills and drains in seconds). With a low row
    # estimate the planner picks a bitmap or sequential scan plus a sort of ALL of a client's
    # rows for every fetch (and a hash join over the whole queue for an Ack), which makes
    # draining a backlog quadratic. Every store query is served best by a btree index (the
    # fetch by (client_id, seq) in order, Ack by (client_id, msg_id)), so the plans are pinned.
    conn.execute("SET enable_bitmapscan = off")
    conn.execute("SET enable_seqscan = off")
    conn.commit()


def open_pool(
    url: str, kwargs: dict[str, Any], *, schema: str, size: int, timeout_s: float, where: str
) -> ConnectionPool[Conn]:
    """An open pool with at least one connection, or `StoreUnavailable` after `timeout_s`."""
    pool: ConnectionPool[Conn] = ConnectionPool(
        url,
        kwargs=kwargs,
        min_size=1,
        max_size=size,
        open=False,
        configure=partial(configure, schema=schema),
        check=ConnectionPool.check_connection,
        timeout=timeout_s,
        name="meshmq-store",
    )
    try:
        pool.open(wait=True, timeout=timeout_s)
    except PoolTimeout:
        pool.close()
        raise StoreUnavailable(f"{where}: the connection pool could not connect; will retry") from None
    return pool


def store_error(where: str, doing: str, e: psycopg.Error, timeout_s: float) -> StoreError:
    """The store error for driver error `e` raised while `doing` (see the invariants above)."""
    detail = one_line(str(e))
    if isinstance(e, PoolTimeout):
        return StoreUnavailable(
            f"{where}: no connection for {doing} within {timeout_s:g} s ({detail}); will retry"
        )
    if isinstance(e, psycopg.OperationalError):
        return StoreUnavailable(f"{where}: {doing} failed ({detail}); rolled back, will retry")
    if isinstance(e, psycopg.DataError | psycopg.IntegrityError):
        return StoreRecordError(f"{where}: {doing} failed, the server rejected the data ({detail})")
    return StoreError(f"{where}: {doing} failed ({type(e).__name__}: {detail})")


def one_line(text: str) -> str:
    return " ".join(text.split())
