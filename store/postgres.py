"""The PostgreSQL backend: the store of production nodes and the shared store of a cluster.

Why: persistent sessions, queued messages and retained messages must outlive any node, and in a
cluster every node must see the same queue, handed out to one node at a time. psycopg 3 with a
`psycopg_pool.ConnectionPool` (sync: the store process is not asyncio).

Must not: be imported by anything but `store.backend` and tests (psycopg loads only when a
PostgreSQL store is configured); put a password into a message or a log line; set a
per-connection sequence cache (see the migration: it would break FIFO across pool connections).
Connecting (the first connection, the pool, each connection's settings) and turning driver
errors into store errors live in `store/postgres_connection.py`; the SQL of users and ACL
rules in `store/postgres_auth.py`; this module is the schema and the rest of the SQL.

Invariants and decisions:
- `open` first connects once without the pool, so that a wrong URL, bad credentials or a missing
  database are reported at start as `StoreConfigError` (and an unreachable server as
  `StoreUnavailable`) with a message naming host, port, database and user, instead of a pool
  retrying in the background. That connection creates the schema if missing and applies the
  pending migrations under an advisory lock (two nodes starting together migrate once).
- Every pooled connection has `search_path` set to the configured schema, and is checked on
  checkout (one round trip), so a connection that died while idle (a database restart) is
  replaced instead of failing a batch.
- `apply`: one transaction. Consecutive `Enqueue` ops become one binary COPY (the hot path:
  durable QoS 1/2 traffic); consecutive `Ack` ops one DELETE joined against unnest()ed arrays;
  the other ops run in pipeline mode (one network round trip for the run).
- `fetch_queue`: SELECT ... ORDER BY seq LIMIT n FOR UPDATE SKIP LOCKED, hiding those rows
  until now + visibility_s in the same statement, then deleting the expired ones among them,
  in one transaction: two nodes fetching at once never get the same row.
- Every store connection pins index plans (`postgres_connection.configure`): the queue's
  statistics are always stale, and a plan that scans all of a client's rows per fetch makes a
  drain quadratic.
- Arrays sent as parameters are cast (`%s::int8[]`): psycopg types a list of small ints as
  int2[], which no index on a bigint column serves.
- Errors: connection loss, a refused connection, pool timeouts, deadlocks and the like
  (`psycopg.OperationalError`) are `StoreUnavailable`; data that the server rejects is
  `StoreRecordError`; anything else from the driver is `StoreError`. The transaction is rolled
  back in every case (the pool discards a broken connection).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from operator import attrgetter
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from store import postgres_auth
from store.errors import StoreConfigError, StoreError, StoreRecordError
from store.migrate import load_migrations, pending_migrations
from store.postgres_connection import (
    Conn,
    connect_kwargs,
    connect_once,
    describe,
    one_line,
    open_pool,
    store_error,
)
from store.records import (
    Ack,
    AclRecord,
    ClearRetained,
    DeleteSession,
    Enqueue,
    QueuedRecord,
    RetainedRecord,
    SessionRecord,
    SetOnline,
    SetRetained,
    SubscriptionRecord,
    UpsertSession,
    UserRecord,
    WriteOp,
    check_acl,
    check_acl_id,
    check_ops,
    check_user,
    check_username,
)
from store.rows import session_from_row, subscription_from_row

WRITE_WAIT_S = 0.5  # how long a batch (or an auth read: polled) waits for a pooled connection

__all__ = ["PostgresBackend"]

# Rows come back from the driver as tuples of Any; the private converters below give them types.
_Row = tuple[Any, ...]

_QUEUE_COPY: Final = (
    "COPY queue (client_id, msg_id, qos, retain, sub_ids, topic, payload, props, origin, expires_at) "
    "FROM STDIN (FORMAT BINARY)"
)
_QUEUE_COPY_TYPES: Final = [
    "text",
    "int8",
    "int2",
    "bool",
    "int4[]",
    "text",
    "bytea",
    "bytea",
    "text",
    "float8",
]
_ACK: Final = (
    "DELETE FROM queue q USING unnest(%s::text[], %s::int8[]) AS a(client_id, msg_id) "
    "WHERE q.client_id = a.client_id AND q.msg_id = a.msg_id"
)
_SESSION_COLUMNS: Final = (
    "client_id, expiry_s, online, node, epoch, updated_at, "
    "will_topic, will_payload, will_qos, will_retain, will_props, will_delay_s"
)
_SUB_COLUMNS: Final = (
    "client_id, position, key_filter, topic_filter, qos, no_local, retain_as_published, "
    "retain_handling, subscription_id, share_group"
)
_UPSERT_SESSION: Final = (
    f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
    "ON CONFLICT (client_id) DO UPDATE SET expiry_s = excluded.expiry_s, online = excluded.online, "
    "node = excluded.node, epoch = excluded.epoch, updated_at = excluded.updated_at, "
    "will_topic = excluded.will_topic, will_payload = excluded.will_payload, will_qos = excluded.will_qos, "
    "will_retain = excluded.will_retain, will_props = excluded.will_props, will_delay_s = excluded.will_delay_s"
)
_SUB_FIELDS: Final = attrgetter(
    "key_filter",
    "topic_filter",
    "qos",
    "no_local",
    "retain_as_published",
    "retain_handling",
    "subscription_id",
    "share_group",
)  # the columns of _INSERT_SUB after client_id and position
_INSERT_SUB: Final = f"INSERT INTO subscriptions ({_SUB_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
_UPSERT_RETAINED: Final = (
    "INSERT INTO retained (topic, payload, qos, props, origin, expires_at, updated_at) "
    "VALUES (%s,%s,%s,%s,%s,%s,%s) "
    "ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload, qos = excluded.qos, props = excluded.props, "
    "origin = excluded.origin, expires_at = excluded.expires_at, updated_at = excluded.updated_at"
)
# Lock, hide and return in one statement: the CTE picks the client's next visible rows in seq
# order, skipping rows another transaction holds; the UPDATE hides them and returns them (in no
# particular order: the caller sorts by seq).
_FETCH: Final = (
    "WITH picked AS (SELECT seq FROM queue WHERE client_id = %(client)s AND seq > %(after)s::int8 "
    "AND invisible_until <= %(now)s ORDER BY seq LIMIT %(want)s FOR UPDATE SKIP LOCKED) "
    "UPDATE queue q SET invisible_until = %(hidden_until)s FROM picked "
    "WHERE q.client_id = %(client)s AND q.seq = picked.seq "
    "RETURNING q.seq, q.msg_id, q.qos, q.retain, q.sub_ids, q.topic, q.payload, q.props, q.origin, q.expires_at"
)


class PostgresBackend:
    name = "postgres"

    def __init__(
        self,
        url: str,
        *,
        user: str = "",
        password: str = "",
        schema: str = "meshmq",
        pool_size: int = 4,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if not schema:
            raise StoreConfigError("the PostgreSQL schema name is empty")
        if pool_size < 1:
            raise StoreConfigError(f"the PostgreSQL pool size must be at least 1, not {pool_size}")
        self._url = url
        self._schema = schema
        self._pool_size = pool_size
        self._timeout_s = connect_timeout_s
        self._kwargs = connect_kwargs(user, password, connect_timeout_s)
        self._where = "PostgreSQL (URL not parsed yet)"
        self._pool: ConnectionPool[Conn] | None = None

    # --- lifecycle ----------------------------------------------------------------------------------

    def open(self) -> None:
        if self._pool is not None:
            return
        self._where = describe(self._url, self._kwargs.get("user"))
        conn = connect_once(self._url, self._kwargs, self._where)
        try:
            self._prepare_schema(conn)
        except psycopg.Error as e:
            raise store_error(self._where, "preparing the schema", e, self._timeout_s) from None
        finally:
            conn.close()
        self._pool = open_pool(
            self._url,
            self._kwargs,
            schema=self._schema,
            size=self._pool_size,
            timeout_s=self._timeout_s,
            where=self._where,
        )

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _prepare_schema(self, conn: Conn) -> None:
        schema = sql.Identifier(self._schema)
        lock_key = f"meshmq.migrate.{self._schema}"
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (lock_key,))
        try:
            with conn.transaction():
                exists = conn.execute(
                    "SELECT 1 FROM pg_namespace WHERE nspname = %s", (self._schema,)
                ).fetchone()
                if exists is None:
                    conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
                conn.execute(sql.SQL("SET search_path TO {}").format(schema))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
                    "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                )
            for migration in pending_migrations(load_migrations("postgres"), _version(conn)):
                try:
                    with conn.transaction():
                        conn.execute(migration.sql.encode())  # bytes: several statements, no parameters
                        conn.execute(
                            "INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                            (migration.version, migration.name),
                        )
                except psycopg.Error as e:
                    if isinstance(e, psycopg.OperationalError):
                        raise  # connection lost: StoreUnavailable from open()
                    raise StoreError(
                        f"{self._where}: migration {migration.version:03d}_{migration.name} failed and was "
                        f"rolled back ({type(e).__name__}: {one_line(str(e))})"
                    ) from None
        finally:
            with suppress(psycopg.Error):  # a lost connection has released the lock already
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (lock_key,))

    def schema_version(self) -> int:
        with self._connection("reading the schema version") as conn:
            return _version(conn)

    # --- writes -------------------------------------------------------------------------------------

    def apply(self, ops: Sequence[WriteOp]) -> None:
        check_ops(ops)
        if not ops:
            return
        try:
            with (
                self._connection("writing a batch", WRITE_WAIT_S) as conn,
                conn.transaction(),
                conn.cursor() as cur,
            ):
                _write(conn, cur, ops)
        except (TypeError, ValueError) as e:  # a value the driver cannot send (check_ops lets none through)
            raise StoreRecordError(f"{self._where}: writing a batch failed ({e}); rolled back") from None

    # --- reads --------------------------------------------------------------------------------------

    def load_session(self, client_id: str) -> SessionRecord | None:
        with self._connection("loading a session") as conn:
            row = conn.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE client_id = %s", (client_id,)
            ).fetchone()
            if row is None:
                return None
            subs = conn.execute(
                f"SELECT {_SUB_COLUMNS} FROM subscriptions WHERE client_id = %s ORDER BY position",
                (client_id,),
            ).fetchall()
            return session_from_row(row, [subscription_from_row(s) for s in subs])

    def sessions(self) -> list[SessionRecord]:
        with self._connection("loading the sessions") as conn, conn.transaction():
            subs: dict[str, list[SubscriptionRecord]] = {}
            for s in conn.execute(f"SELECT {_SUB_COLUMNS} FROM subscriptions ORDER BY client_id, position"):
                subs.setdefault(s[0], []).append(subscription_from_row(s))
            rows = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions ORDER BY client_id").fetchall()
            return [session_from_row(row, subs.get(row[0], [])) for row in rows]

    def fetch_queue(self, client_id: str, limit: int, visibility_s: float, now: float) -> list[QueuedRecord]:
        if limit <= 0:
            return []
        with self._connection("fetching queued messages") as conn, conn.transaction():
            out: list[QueuedRecord] = []
            expired: list[int] = []
            after_seq = 0
            hidden_until = now + visibility_s
            while len(out) < limit:
                want = limit - len(out)
                params = {
                    "client": client_id,
                    "after": after_seq,
                    "now": now,
                    "want": want,
                    "hidden_until": hidden_until,
                }
                rows = sorted(conn.execute(_FETCH, params).fetchall(), key=lambda row: int(row[0]))
                for row in rows:
                    expires_at = row[9]
                    if expires_at is not None and expires_at <= now:
                        expired.append(row[0])
                    else:
                        out.append(_queued(client_id, row))
                if len(rows) < want:
                    break
                after_seq = rows[-1][0]
            if expired:
                conn.execute(
                    "DELETE FROM queue WHERE client_id = %s AND seq = ANY(%s::int8[])", (client_id, expired)
                )
            return out

    def queue_depth(self, client_id: str) -> int:
        with self._connection("counting queued messages") as conn:
            row = conn.execute("SELECT count(*) FROM queue WHERE client_id = %s", (client_id,)).fetchone()
            return 0 if row is None else int(row[0])

    def retained(self, now: float) -> list[RetainedRecord]:
        with self._connection("loading retained messages") as conn:
            rows = conn.execute(
                "SELECT topic, payload, qos, props, origin, expires_at, updated_at FROM retained "
                "WHERE expires_at IS NULL OR expires_at > %s ORDER BY topic",
                (now,),
            ).fetchall()
            return [RetainedRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    # --- users and ACL rules (SQL in store/postgres_auth.py) -----------------------------------------

    def auth_version(self) -> int:
        with self._connection("reading the auth version", WRITE_WAIT_S) as conn:
            return postgres_auth.auth_version(conn)

    def load_auth(self) -> tuple[int, list[UserRecord], list[AclRecord]]:
        with self._connection("loading users and ACL rules", WRITE_WAIT_S) as conn, conn.transaction():
            return postgres_auth.load_auth(conn)

    def put_user(self, username: str, password_hash: str | None, admin: bool | None) -> tuple[int, bool]:
        check_user(username, password_hash, admin)
        with self._connection("writing a user", WRITE_WAIT_S) as conn, conn.transaction():
            return postgres_auth.put_user(conn, username, password_hash, admin)

    def delete_user(self, username: str) -> tuple[int, bool]:
        check_username(username)
        with self._connection("deleting a user", WRITE_WAIT_S) as conn, conn.transaction():
            return postgres_auth.delete_user(conn, username)

    def add_acl(self, user: str, topic: str, access: str) -> tuple[int, int]:
        check_acl(user, topic, access)
        with self._connection("adding an ACL rule", WRITE_WAIT_S) as conn, conn.transaction():
            return postgres_auth.add_acl(conn, user, topic, access)

    def delete_acl(self, rule_id: int) -> tuple[int, bool]:
        check_acl_id(rule_id)
        with self._connection("deleting an ACL rule", WRITE_WAIT_S) as conn, conn.transaction():
            return postgres_auth.delete_acl(conn, rule_id)

    # --- plumbing -----------------------------------------------------------------------------------

    @contextmanager
    def _connection(self, doing: str, wait_s: float | None = None) -> Iterator[Conn]:
        """A pooled connection; `wait_s` bounds the wait for one (the pool's timeout otherwise).

        Writes wait briefly: while the server is down the store process must keep its loop
        turning (refusing what waited too long, answering reads), and the writer retries anyway.
        """
        pool = self._pool
        if pool is None:
            raise StoreError(f"{self._where}: the store is not open")
        try:
            with pool.connection(timeout=wait_s) as conn:
                yield conn
        except psycopg.Error as e:
            raise store_error(self._where, doing, e, self._timeout_s) from None


def _write(conn: Conn, cur: psycopg.Cursor[_Row], ops: Sequence[WriteOp]) -> None:
    """The ops in order: runs of Enqueue as one COPY, runs of Ack as one DELETE, the rest pipelined."""
    i, n = 0, len(ops)
    while i < n:
        if type(ops[i]) is Enqueue:
            with cur.copy(_QUEUE_COPY) as copy:
                copy.set_types(_QUEUE_COPY_TYPES)
                while i < n and type(op := ops[i]) is Enqueue:
                    for r in op.records:
                        copy.write_row(
                            (
                                r.client_id,
                                r.msg_id,
                                r.qos,
                                r.retain,
                                list(r.sub_ids),  # the array dumper takes lists only
                                r.topic,
                                r.payload,
                                r.props,
                                r.origin,
                                r.expires_at,
                            )
                        )
                    i += 1
            continue
        with conn.pipeline():
            while i < n and type(op := ops[i]) is not Enqueue:
                if type(op) is Ack:
                    client_ids: list[str] = []
                    msg_ids: list[int] = []
                    while i < n and type(ack := ops[i]) is Ack:
                        client_ids.extend([ack.client_id] * len(ack.msg_ids))
                        msg_ids.extend(ack.msg_ids)
                        i += 1
                    if msg_ids:
                        cur.execute(_ACK, (client_ids, msg_ids))
                    continue
                _execute_other(cur, op)
                i += 1


def _execute_other(cur: psycopg.Cursor[_Row], op: WriteOp) -> None:
    if type(op) is UpsertSession:
        r = op.record
        w = r.will
        cur.execute(
            _UPSERT_SESSION,
            (r.client_id, r.expiry_s, r.online, r.node, r.epoch, r.updated_at)
            + (
                (None, None, None, None, None, None)
                if w is None
                else (w.topic, w.payload, w.qos, w.retain, w.props, w.delay_s)
            ),
        )
        cur.execute("DELETE FROM subscriptions WHERE client_id = %s", (r.client_id,))
        for position, s in enumerate(r.subscriptions):
            cur.execute(_INSERT_SUB, (r.client_id, position, *_SUB_FIELDS(s)))
    elif type(op) is DeleteSession:
        cur.execute("DELETE FROM queue WHERE client_id = %s", (op.client_id,))
        cur.execute("DELETE FROM sessions WHERE client_id = %s", (op.client_id,))  # subscriptions cascade
    elif type(op) is SetOnline:
        cur.execute(
            "UPDATE sessions SET online = %s, node = %s, epoch = %s, updated_at = %s WHERE client_id = %s",
            (op.online, op.node, op.epoch, op.at, op.client_id),
        )
    elif type(op) is SetRetained:
        k = op.record
        cur.execute(
            _UPSERT_RETAINED, (k.topic, k.payload, k.qos, k.props, k.origin, k.expires_at, k.updated_at)
        )
    elif type(op) is ClearRetained:
        cur.execute("DELETE FROM retained WHERE topic = %s", (op.topic,))
    else:  # Enqueue and Ack are batched by the caller
        raise StoreError(f"unexpected write op {type(op).__name__}")


def _version(conn: Conn) -> int:
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def _queued(client_id: str, row: _Row) -> QueuedRecord:
    seq, msg_id, qos, retain, sub_ids, topic, payload, props, origin, expires_at = row
    return QueuedRecord(
        client_id, msg_id, qos, retain, tuple(sub_ids), topic, payload, props, origin, expires_at, seq
    )
