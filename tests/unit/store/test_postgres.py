"""What only the PostgreSQL backend has (`store/postgres.py`), on the throwaway server.

Clear errors at open (refused connection, wrong password, unknown database, bad URL), the
configured schema, SKIP LOCKED hand-out between two nodes, a connection lost in the middle of a
batch (rolled back, StoreUnavailable, the next batch works), and an outage of the whole server
with recovery by itself.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from psycopg import sql

from store.errors import StoreConfigError, StoreError, StoreUnavailable
from store.migrate import Migration, load_migrations, parse_migrations
from store.postgres import PostgresBackend
from store.records import Enqueue, QueuedRecord, SessionRecord, UpsertSession
from tests.pg import PASSWORD, PASSWORD_ROLE, PgDatabase, PgServer, pause_server, resume_server

pytestmark = pytest.mark.postgres


def queued(client_id: str, msg_id: int) -> QueuedRecord:
    return QueuedRecord(client_id, msg_id, 1, False, (1,), "t", b"p", None, "n", None)


def session(client_id: str) -> SessionRecord:
    return SessionRecord(client_id, 60, (), None, True, "n", 1, 1.0)


@pytest.fixture
def opened(pg_db: PgDatabase) -> Iterator[PostgresBackend]:
    backend = PostgresBackend(pg_db.url, pool_size=2)
    backend.open()
    yield backend
    backend.close()


def closed_port() -> int:
    with socket.socket() as s:  # the kernel picks a port; nothing listens there once closed
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- errors at open -------------------------------------------------------------------------------


def test_refused_connection_is_unavailable_with_a_clear_message() -> None:
    port = closed_port()
    backend = PostgresBackend(f"postgresql://127.0.0.1:{port}/meshmq", user="u", password="secret-pw")
    with pytest.raises(StoreUnavailable) as caught:
        backend.open()
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "database meshmq" in message and "unreachable" in message
    assert "Connection refused" in message and "secret-pw" not in message
    backend.close()


def test_wrong_password_is_a_config_error(pg_db: PgDatabase) -> None:
    url = f"postgresql://{pg_db.server.host}:{pg_db.server.port}/{pg_db.name}"
    backend = PostgresBackend(url, user=PASSWORD_ROLE, password="not-" + PASSWORD)
    with pytest.raises(StoreConfigError) as caught:
        backend.open()
    message = str(caught.value)
    assert "password authentication failed" in message and f"user {PASSWORD_ROLE}" in message
    assert PASSWORD not in message


def test_right_password_as_separate_user_and_password(pg_db: PgDatabase) -> None:
    with pg_db.connect() as conn:
        conn.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(pg_db.name), sql.Identifier(PASSWORD_ROLE)
            )
        )
    url = f"postgresql://{pg_db.server.host}:{pg_db.server.port}/{pg_db.name}"
    backend = PostgresBackend(url, user=PASSWORD_ROLE, password=PASSWORD)
    backend.open()
    backend.apply([UpsertSession(session("c1"))])
    assert backend.load_session("c1") == session("c1")
    backend.close()


def test_password_in_the_url(pg_db: PgDatabase) -> None:
    url = f"postgresql://{PASSWORD_ROLE}:wrong@{pg_db.server.host}:{pg_db.server.port}/{pg_db.name}"
    with pytest.raises(StoreConfigError) as caught:
        PostgresBackend(url).open()
    assert "wrong@" not in str(caught.value) and ":wrong" not in str(caught.value)


def test_unknown_database_is_a_config_error(pg_server: PgServer) -> None:
    backend = PostgresBackend(pg_server.url("no_such_db"))
    with pytest.raises(StoreConfigError, match='database "no_such_db" does not exist'):
        backend.open()


@pytest.mark.parametrize(
    "url", ["not a url", "postgresql://127.0.0.1:99999999/x", "postgresql://127.0.0.1/db?nonsense=1"]
)
def test_malformed_url_is_a_config_error(url: str) -> None:
    with pytest.raises(StoreConfigError):
        PostgresBackend(url).open()


def test_pool_size_and_schema_are_checked() -> None:
    with pytest.raises(StoreConfigError):
        PostgresBackend("postgresql://127.0.0.1/x", pool_size=0)
    with pytest.raises(StoreConfigError):
        PostgresBackend("postgresql://127.0.0.1/x", schema="")


# --- schema ---------------------------------------------------------------------------------------


def test_tables_live_in_the_configured_schema(pg_db: PgDatabase) -> None:
    a = PostgresBackend(pg_db.url, schema="tenant_a")
    b = PostgresBackend(pg_db.url, schema="Tenant B")  # any name: it is quoted
    a.open()
    b.open()
    a.apply([UpsertSession(session("only-in-a"))])
    assert b.sessions() == [] and [s.client_id for s in a.sessions()] == ["only-in-a"]
    with pg_db.connect() as conn:
        tables = conn.execute(
            "SELECT table_schema, count(*) FROM information_schema.tables "
            "WHERE table_schema IN ('tenant_a', 'Tenant B') GROUP BY 1 ORDER BY 1"
        ).fetchall()
        versions = conn.execute("SELECT version, name FROM tenant_a.schema_version").fetchall()
    assert tables == [("Tenant B", 8), ("tenant_a", 8)]  # 001: 4 + schema_version, 002: 3
    assert versions == [(m.version, m.name) for m in load_migrations("postgres")]
    a.close()
    b.close()


def test_a_failing_migration_is_rolled_back(pg_db: PgDatabase, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = load_migrations("postgres")
    broken = (*shipped, Migration(len(shipped) + 1, "broken", "CREATE TABLE half (x int); NOT SQL AT ALL;"))
    monkeypatch.setattr("store.postgres.load_migrations", lambda dialect: broken)
    with pytest.raises(StoreError, match="broken"):
        PostgresBackend(pg_db.url).open()
    monkeypatch.undo()
    with pg_db.connect() as conn:
        assert conn.execute("SELECT max(version) FROM meshmq.schema_version").fetchone() == (len(shipped),)
        assert conn.execute("SELECT to_regclass('meshmq.half')").fetchone() == (None,)
    backend = PostgresBackend(pg_db.url)
    backend.open()
    assert backend.schema_version() == len(shipped)
    backend.close()
    assert parse_migrations([]) == ()


# --- SKIP LOCKED ----------------------------------------------------------------------------------


def test_fetch_skips_rows_another_transaction_holds(opened: PostgresBackend, pg_db: PgDatabase) -> None:
    opened.apply([Enqueue(tuple(queued("a", i) for i in range(1, 7)))])
    with pg_db.connect(autocommit=False) as other:  # another node, in the middle of its fetch
        other.execute("SELECT seq FROM meshmq.queue WHERE msg_id <= 3 FOR UPDATE")
        assert [r.msg_id for r in opened.fetch_queue("a", 10, 30.0, 100.0)] == [4, 5, 6]
        other.rollback()
    assert [r.msg_id for r in opened.fetch_queue("a", 10, 30.0, 100.0)] == [1, 2, 3]


def test_two_nodes_fetching_at_once_never_get_the_same_row(
    opened: PostgresBackend, pg_db: PgDatabase
) -> None:
    total = 600
    opened.apply([Enqueue(tuple(queued("a", i) for i in range(total)))])
    second = PostgresBackend(pg_db.url, pool_size=2)
    second.open()
    got: dict[str, list[int]] = {"first": [], "second": []}

    def drain(name: str, backend: PostgresBackend) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = backend.fetch_queue("a", 7, 1000.0, 100.0)
            if not rows:
                return
            got[name].extend(r.msg_id for r in rows)

    threads = [
        threading.Thread(target=drain, args=(n, b)) for n, b in (("first", opened), ("second", second))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    second.close()
    assert sorted(got["first"] + got["second"]) == list(range(total))  # each row once, none lost
    assert got["first"] == sorted(got["first"]) and got["second"] == sorted(got["second"])


# --- connection loss and outage ---------------------------------------------------------------------


def test_connection_lost_mid_batch_rolls_back(opened: PostgresBackend, pg_db: PgDatabase) -> None:
    opened.apply([UpsertSession(session("locked"))])
    errors: list[BaseException] = []
    with pg_db.connect(autocommit=False) as holder:
        holder.execute("SELECT 1 FROM meshmq.sessions WHERE client_id = 'locked' FOR UPDATE")

        def write() -> None:
            try:  # the Enqueue lands in the transaction, then the upsert waits for the row lock
                opened.apply([Enqueue((queued("a", 1), queued("a", 2))), UpsertSession(session("locked"))])
            except BaseException as e:
                errors.append(e)

        writer = threading.Thread(target=write)
        writer.start()
        pid = wait_for_blocked_store_backend(pg_db)
        with pg_db.connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        writer.join(timeout=10)
        holder.rollback()
    assert len(errors) == 1 and isinstance(errors[0], StoreUnavailable), errors
    assert "rolled back" in str(errors[0])
    assert opened.queue_depth("a") == 0  # nothing of the batch landed
    opened.apply([Enqueue((queued("a", 3),))])  # the pool replaced the connection
    assert opened.queue_depth("a") == 1


def wait_for_blocked_store_backend(db: PgDatabase) -> int:
    deadline = time.monotonic() + 10
    with db.connect() as admin:
        while time.monotonic() < deadline:
            row = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = 'meshmq-store' "
                "AND wait_event_type = 'Lock'",
                (db.name,),
            ).fetchone()
            if row is not None:
                return int(row[0])
            time.sleep(0.02)
    raise AssertionError("the store's batch never blocked on the row lock")


def test_outage_gives_unavailable_and_recovers_by_itself(pg_db: PgDatabase) -> None:
    backend = PostgresBackend(pg_db.url, pool_size=2, connect_timeout_s=1.0)
    backend.open()
    backend.apply([Enqueue((queued("a", 1),))])
    pause_server(pg_db.server)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="will retry"):
            backend.apply([Enqueue((queued("a", 2),))])
        with pytest.raises(StoreUnavailable):
            backend.fetch_queue("a", 10, 30.0, 100.0)
        assert time.monotonic() - started < 10
    finally:
        resume_server(pg_db.server)
    deadline = time.monotonic() + 20
    while True:
        try:
            backend.apply([Enqueue((queued("a", 3),))])
            break
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert [r.msg_id for r in backend.fetch_queue("a", 10, 30.0, 100.0)] == [1, 3]
    backend.close()
