"""The SQLite backend: the embedded default for a single node with no database to set up.

Why: a node without a configured PostgreSQL still keeps persistent sessions, queued messages and
retained messages across a SIGKILL. One file under the data directory, the stdlib driver, no
server.

Must not: be used by two nodes (it is one file on one host; cluster mode requires PostgreSQL),
open more than one connection, or leave a transaction open between calls.

Invariants:
- WAL journal with synchronous=NORMAL: a committed transaction survives the process being
  killed (SIGKILL), though not necessarily a power cut; that is the embedded default's promise.
- The connection is in autocommit mode (`isolation_level=None`) and every call that writes
  runs inside an explicit `BEGIN IMMEDIATE ... COMMIT` (rolled back on any error), so `apply`
  is all or nothing and `fetch_queue`'s hide-and-return is atomic.
- One lock serialises the calls, so a store process that calls from more than one thread
  gets whole transactions, never interleaved statements.
- `seq` is the AUTOINCREMENT rowid: never reused, so FIFO by seq holds across deletes; so is
  an ACL rule's id.
- A change of users or rules bumps `auth_version` inside its `BEGIN IMMEDIATE` transaction
  (which already excludes every other writer of the file).
- Errors: a path that cannot be created or opened, or a file that is not a database, is
  `StoreConfigError`; "database is locked", disk full or I/O errors are `StoreUnavailable`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from store.errors import StoreConfigError, StoreError, StoreRecordError, StoreUnavailable
from store.migrate import load_migrations, pending_migrations
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

__all__ = ["SqliteBackend"]

_BUSY_TIMEOUT_S: Final = 5.0
_SCHEMA_VERSION_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
)
_QUEUE_COLUMNS: Final = "seq, msg_id, qos, retain, sub_ids, topic, payload, props, origin, expires_at"
_SESSION_COLUMNS: Final = (
    "client_id, expiry_s, online, node, epoch, updated_at, "
    "will_topic, will_payload, will_qos, will_retain, will_props, will_delay_s"
)
_SUB_COLUMNS: Final = (
    "client_id, position, key_filter, topic_filter, qos, no_local, retain_as_published, "
    "retain_handling, subscription_id, share_group"
)
_UPSERT_SESSION: Final = (
    f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (client_id) DO UPDATE SET expiry_s = excluded.expiry_s, online = excluded.online, "
    "node = excluded.node, epoch = excluded.epoch, updated_at = excluded.updated_at, "
    "will_topic = excluded.will_topic, will_payload = excluded.will_payload, will_qos = excluded.will_qos, "
    "will_retain = excluded.will_retain, will_props = excluded.will_props, will_delay_s = excluded.will_delay_s"
)
_INSERT_SUB: Final = f"INSERT INTO subscriptions ({_SUB_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
_INSERT_QUEUED: Final = (
    "INSERT INTO queue (client_id, msg_id, qos, retain, sub_ids, topic, payload, props, origin, expires_at) "
    "VALUES (?,?,?,?,?,?,?,?,?,?)"
)
_UPSERT_RETAINED: Final = (
    "INSERT INTO retained (topic, payload, qos, props, origin, expires_at, updated_at) VALUES (?,?,?,?,?,?,?) "
    "ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload, qos = excluded.qos, props = excluded.props, "
    "origin = excluded.origin, expires_at = excluded.expires_at, updated_at = excluded.updated_at"
)

# Rows come back from the driver untyped; these private converters are where they get types.
_Row = Any


class SqliteBackend:
    name = "sqlite"

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    # --- lifecycle ----------------------------------------------------------------------------------

    def open(self) -> None:
        with self._lock:
            if self._conn is not None:
                return
            try:
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreConfigError(
                    f"SQLite store {self._path}: cannot create its directory: {e}"
                ) from None
            try:
                conn = sqlite3.connect(
                    self._path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
                )
            except sqlite3.Error as e:
                raise StoreConfigError(f"SQLite store {self._path}: cannot open: {e}") from None
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                self._migrate(conn)
            except sqlite3.OperationalError as e:
                conn.close()
                if _is_busy(e):
                    raise StoreUnavailable(f"SQLite store {self._path}: {e}; will retry") from None
                raise StoreConfigError(f"SQLite store {self._path}: cannot use the file: {e}") from None
            except sqlite3.DatabaseError as e:  # "file is not a database"
                conn.close()
                raise StoreConfigError(f"SQLite store {self._path}: {e}") from None
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute(_SCHEMA_VERSION_DDL)
        for migration in pending_migrations(load_migrations("sqlite"), _version(conn)):
            # Statement by statement inside BEGIN/COMMIT: one transaction per migration
            # (executescript would commit whatever transaction is open first).
            try:
                conn.execute("BEGIN IMMEDIATE")
                for statement in _statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, name) VALUES (?, ?)",
                    (migration.version, migration.name),
                )
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if _is_busy(e):
                    raise
                raise StoreError(
                    f"SQLite store {self._path}: migration {migration.version:03d}_{migration.name} "
                    f"failed and was rolled back: {e}"
                ) from None
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def schema_version(self) -> int:
        with self._lock, self._errors("reading the schema version"):
            return _version(self._connection())

    # --- writes -------------------------------------------------------------------------------------

    def apply(self, ops: Sequence[WriteOp]) -> None:
        check_ops(ops)
        with self._lock, self._transaction("writing a batch") as conn:
            for op in ops:
                if type(op) is Enqueue:
                    conn.executemany(_INSERT_QUEUED, [_queued_row(r) for r in op.records])
                elif type(op) is Ack:
                    conn.executemany(
                        "DELETE FROM queue WHERE client_id = ? AND msg_id = ?",
                        [(op.client_id, m) for m in op.msg_ids],
                    )
                elif type(op) is UpsertSession:
                    _upsert_session(conn, op.record)
                elif type(op) is DeleteSession:
                    conn.execute("DELETE FROM queue WHERE client_id = ?", (op.client_id,))
                    conn.execute("DELETE FROM subscriptions WHERE client_id = ?", (op.client_id,))
                    conn.execute("DELETE FROM sessions WHERE client_id = ?", (op.client_id,))
                elif type(op) is SetOnline:
                    conn.execute(
                        "UPDATE sessions SET online = ?, node = ?, epoch = ?, updated_at = ? WHERE client_id = ?",
                        (op.online, op.node, op.epoch, op.at, op.client_id),
                    )
                elif type(op) is SetRetained:
                    r = op.record
                    conn.execute(
                        _UPSERT_RETAINED,
                        (r.topic, r.payload, r.qos, r.props, r.origin, r.expires_at, r.updated_at),
                    )
                elif type(op) is ClearRetained:
                    conn.execute("DELETE FROM retained WHERE topic = ?", (op.topic,))

    # --- reads --------------------------------------------------------------------------------------

    def load_session(self, client_id: str) -> SessionRecord | None:
        with self._lock, self._errors("loading a session"):
            conn = self._connection()
            row = conn.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE client_id = ?", (client_id,)
            ).fetchone()
            if row is None:
                return None
            subs = conn.execute(
                f"SELECT {_SUB_COLUMNS} FROM subscriptions WHERE client_id = ? ORDER BY position",
                (client_id,),
            ).fetchall()
            return session_from_row(row, [subscription_from_row(s) for s in subs])

    def sessions(self) -> list[SessionRecord]:
        with self._lock, self._errors("loading the sessions"):
            conn = self._connection()
            subs: dict[str, list[SubscriptionRecord]] = {}
            for s in conn.execute(f"SELECT {_SUB_COLUMNS} FROM subscriptions ORDER BY client_id, position"):
                subs.setdefault(s[0], []).append(subscription_from_row(s))
            rows = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions ORDER BY client_id").fetchall()
            return [session_from_row(row, subs.get(row[0], [])) for row in rows]

    def fetch_queue(self, client_id: str, limit: int, visibility_s: float, now: float) -> list[QueuedRecord]:
        if limit <= 0:
            return []
        with self._lock, self._transaction("fetching queued messages") as conn:
            out: list[QueuedRecord] = []
            expired: list[tuple[int]] = []
            after_seq = 0
            while len(out) < limit:
                want = limit - len(out)
                rows = conn.execute(
                    f"SELECT {_QUEUE_COLUMNS} FROM queue WHERE client_id = ? AND seq > ? "
                    "AND invisible_until <= ? ORDER BY seq LIMIT ?",
                    (client_id, after_seq, now, want),
                ).fetchall()
                for row in rows:
                    expires_at = row[9]
                    if expires_at is not None and expires_at <= now:
                        expired.append((row[0],))
                    else:
                        out.append(_queued(client_id, row))
                if len(rows) < want:
                    break
                after_seq = rows[-1][0]
            if expired:
                conn.executemany("DELETE FROM queue WHERE seq = ?", expired)
            if out:
                hidden_until = now + visibility_s
                conn.executemany(
                    "UPDATE queue SET invisible_until = ? WHERE seq = ?", [(hidden_until, r.seq) for r in out]
                )
            return out

    def queue_depth(self, client_id: str) -> int:
        with self._lock, self._errors("counting queued messages"):
            row = (
                self._connection()
                .execute("SELECT count(*) FROM queue WHERE client_id = ?", (client_id,))
                .fetchone()
            )
            return int(row[0])

    def retained(self, now: float) -> list[RetainedRecord]:
        with self._lock, self._errors("loading retained messages"):
            rows = self._connection().execute(
                "SELECT topic, payload, qos, props, origin, expires_at, updated_at FROM retained "
                "WHERE expires_at IS NULL OR expires_at > ? ORDER BY topic",
                (now,),
            )
            return [RetainedRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    # --- users and ACL rules ------------------------------------------------------------------------

    def auth_version(self) -> int:
        with self._lock, self._errors("reading the auth version"):
            return _auth_version(self._connection())

    def load_auth(self) -> tuple[int, list[UserRecord], list[AclRecord]]:
        # a read transaction: one snapshot of the three tables
        with self._lock, self._transaction("loading users and ACL rules", "BEGIN DEFERRED") as conn:
            version = _auth_version(conn)
            users = [
                UserRecord(r[0], r[1], bool(r[2]))
                for r in conn.execute("SELECT username, password_hash, admin FROM users ORDER BY username")
            ]
            rules = [
                AclRecord(r[0], r[1], r[2], r[3])
                for r in conn.execute("SELECT id, username, topic, access FROM acl_rules ORDER BY id")
            ]
            return version, users, rules

    def put_user(self, username: str, password_hash: str | None, admin: bool | None) -> tuple[int, bool]:
        check_user(username, password_hash, admin)
        with self._lock, self._transaction("writing a user") as conn:
            found = conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone()
            if found is None:
                if password_hash is None:
                    raise StoreRecordError(
                        f"user {username!r} does not exist: creating it needs a password hash"
                    )
                conn.execute(
                    "INSERT INTO users (username, password_hash, admin) VALUES (?, ?, ?)",
                    (username, password_hash, bool(admin)),
                )
            else:
                conn.execute(
                    "UPDATE users SET password_hash = coalesce(?, password_hash), admin = coalesce(?, admin), "
                    "updated_at = CURRENT_TIMESTAMP WHERE username = ?",
                    (password_hash, admin, username),
                )
            return _bump_auth_version(conn), found is None

    def delete_user(self, username: str) -> tuple[int, bool]:
        check_username(username)
        with self._lock, self._transaction("deleting a user") as conn:
            existed = conn.execute("DELETE FROM users WHERE username = ?", (username,)).rowcount > 0
            rules = conn.execute("DELETE FROM acl_rules WHERE username = ?", (username,)).rowcount
            if existed or rules:
                return _bump_auth_version(conn), existed
            return _auth_version(conn), False

    def add_acl(self, user: str, topic: str, access: str) -> tuple[int, int]:
        check_acl(user, topic, access)
        with self._lock, self._transaction("adding an ACL rule") as conn:
            cursor = conn.execute(
                "INSERT INTO acl_rules (username, topic, access) VALUES (?, ?, ?)", (user, topic, access)
            )
            rule_id = cursor.lastrowid
            if rule_id is None:
                raise StoreError(f"SQLite store {self._path}: the new ACL rule has no id")
            return _bump_auth_version(conn), rule_id

    def delete_acl(self, rule_id: int) -> tuple[int, bool]:
        check_acl_id(rule_id)
        with self._lock, self._transaction("deleting an ACL rule") as conn:
            if conn.execute("DELETE FROM acl_rules WHERE id = ?", (rule_id,)).rowcount > 0:
                return _bump_auth_version(conn), True
            return _auth_version(conn), False

    # --- plumbing -----------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"SQLite store {self._path} is not open")
        return self._conn

    @contextmanager
    def _transaction(self, doing: str, begin: str = "BEGIN IMMEDIATE") -> Iterator[sqlite3.Connection]:
        with self._errors(doing):
            conn = self._connection()
            conn.execute(begin)
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:  # locked, busy, disk full, I/O error
            raise StoreUnavailable(f"SQLite store {self._path}: {doing} failed: {e}; will retry") from None
        except (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError) as e:
            raise StoreRecordError(f"SQLite store {self._path}: {doing} failed: {e}") from None
        except sqlite3.Error as e:
            raise StoreError(f"SQLite store {self._path}: {doing} failed: {e}") from None


def _statements(script: str) -> Iterator[str]:
    """Split a migration into statements (sqlite3 executes one at a time outside executescript,
    and executescript would COMMIT the surrounding transaction)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                yield pending
            pending = ""
    if pending.strip() and not all(
        not line.strip() or line.strip().startswith("--") for line in pending.splitlines()
    ):
        raise StoreError(f"migration ends in an incomplete statement: {pending.strip()[:80]!r}")


def _is_busy(e: sqlite3.Error) -> bool:
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


def _version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return int(row[0])


def _auth_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT version FROM auth_version WHERE id = 1").fetchone()
    return int(row[0])


def _bump_auth_version(conn: sqlite3.Connection) -> int:
    # fetchall: a RETURNING statement must run to its end before the COMMIT
    rows = conn.execute(
        "UPDATE auth_version SET version = version + 1 WHERE id = 1 RETURNING version"
    ).fetchall()
    return int(rows[0][0])


def _upsert_session(conn: sqlite3.Connection, r: SessionRecord) -> None:
    w = r.will
    conn.execute(
        _UPSERT_SESSION,
        (r.client_id, r.expiry_s, r.online, r.node, r.epoch, r.updated_at)
        + (
            (None, None, None, None, None, None)
            if w is None
            else (w.topic, w.payload, w.qos, w.retain, w.props, w.delay_s)
        ),
    )
    conn.execute("DELETE FROM subscriptions WHERE client_id = ?", (r.client_id,))
    conn.executemany(
        _INSERT_SUB,
        [
            (
                r.client_id,
                position,
                s.key_filter,
                s.topic_filter,
                s.qos,
                s.no_local,
                s.retain_as_published,
                s.retain_handling,
                s.subscription_id,
                s.share_group,
            )
            for position, s in enumerate(r.subscriptions)
        ],
    )


def _queued_row(r: QueuedRecord) -> tuple[object, ...]:
    return (
        r.client_id,
        r.msg_id,
        r.qos,
        r.retain,
        ",".join(map(str, r.sub_ids)),
        r.topic,
        r.payload,
        r.props,
        r.origin,
        r.expires_at,
    )


def _queued(client_id: str, row: _Row) -> QueuedRecord:
    seq, msg_id, qos, retain, sub_ids, topic, payload, props, origin, expires_at = row
    return QueuedRecord(
        client_id,
        msg_id,
        qos,
        bool(retain),
        tuple(int(s) for s in sub_ids.split(",")) if sub_ids else (),
        topic,
        payload,
        props,
        origin,
        expires_at,
        seq,
    )
