"""What only the SQLite backend has (`store/sqlite.py`): the file, its journal mode, and errors.

WAL with synchronous=NORMAL on the file, the parent directory created, a path that cannot be a
database file or a file that is not a database giving `StoreConfigError`, a failing migration
rolled back, and a committed batch surviving a SIGKILL of the process that wrote it.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from store.errors import StoreConfigError, StoreError
from store.migrate import Migration, load_migrations
from store.records import Ack, Enqueue, QueuedRecord
from store.sqlite import SqliteBackend


def test_file_in_a_new_directory_with_wal(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "meshmq.db"
    backend = SqliteBackend(str(path))
    backend.open()
    backend.open()  # twice is fine
    assert path.exists()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        versions = conn.execute("SELECT version, name FROM schema_version").fetchall()
    assert versions == [(m.version, m.name) for m in load_migrations("sqlite")]
    backend.close()


def test_a_path_under_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with pytest.raises(StoreConfigError, match="cannot create its directory"):
        SqliteBackend(str(tmp_path / "plain" / "meshmq.db")).open()


def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "meshmq.db"
    path.write_bytes(b"this is not a SQLite database, just text " * 100)
    with pytest.raises(StoreConfigError, match="not a database"):
        SqliteBackend(str(path)).open()


def test_a_failing_migration_is_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "meshmq.db"
    shipped = load_migrations("sqlite")
    broken = (
        *shipped,
        Migration(len(shipped) + 1, "broken", "CREATE TABLE half (x INTEGER);\nNOT SQL AT ALL;\n"),
    )
    monkeypatch.setattr("store.sqlite.load_migrations", lambda dialect: broken)
    with pytest.raises(StoreError, match="broken"):
        SqliteBackend(str(path)).open()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone() == (len(shipped),)
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchall() == []


def test_a_committed_batch_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "meshmq.db"
    script = textwrap.dedent(
        f"""
        import os, signal
        from store.records import Ack, Enqueue, QueuedRecord
        from store.sqlite import SqliteBackend
        b = SqliteBackend({str(path)!r})
        b.open()
        b.apply([Enqueue(tuple(QueuedRecord("a", i, 1, False, (), "t", b"p", None, "n", None) for i in range(100)))])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    cwd = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, timeout=30, check=False)
    assert done.returncode == -signal.SIGKILL
    backend = SqliteBackend(str(path))
    backend.open()
    assert backend.queue_depth("a") == 100
    assert [r.msg_id for r in backend.fetch_queue("a", 3, 30.0, 1.0)] == [0, 1, 2]
    backend.close()
    assert os.path.exists(path)


def test_seq_is_never_reused(tmp_path: Path) -> None:
    backend = SqliteBackend(str(tmp_path / "meshmq.db"))
    backend.open()
    record = QueuedRecord("a", 1, 1, False, (), "t", b"p", None, "n", None)
    backend.apply([Enqueue((record,))])
    first = backend.fetch_queue("a", 1, 30.0, 1.0)[0].seq
    backend.apply([Enqueue(()), Ack("a", (1,))])
    backend.apply([Enqueue((record,))])
    assert backend.fetch_queue("a", 1, 30.0, 1.0)[0].seq > first
    backend.close()
