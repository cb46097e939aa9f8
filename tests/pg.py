"""A throwaway PostgreSQL server for tests and benchmarks, and the pytest fixtures over it.

Why: the store's contract suite and the end-to-end durability tests need a real PostgreSQL, and
the machine's own cluster must be left alone. One server per test session (about 1 s to start,
under /dev/shm, fsync off) and one fresh database per test (`CREATE DATABASE ... TEMPLATE`)
keeps them isolated and fast (`shared/TESTBED.md`).

Must not: touch the machine's own clusters, listen anywhere but 127.0.0.1 (and its own Unix
socket directory), use a fixed port, or leave a server running: the fixture stops it at the end
of the session and `atexit` does if a caller forgets.

Invariants:
- The server runs as the `postgres` user when the tests run as root (PostgreSQL refuses root),
  as the current user otherwise; the port is chosen by the kernel (bind port 0, read it back).
- Local connections use trust auth for the superuser `postgres`, except the role `PASSWORD_ROLE`
  on 127.0.0.1, which must give `PASSWORD` (scram-sha-256): the wrong-password tests use it.
- Inherited `PG*` environment variables are removed from the server's environment and, once a
  server starts, from this process's, so that nothing but the URL decides where a test connects.
- Without the binaries, the fixtures skip with the reason; `make test` installs them first.

Use outside pytest (a benchmark): `with throwaway_server() as server: url = server.url("postgres")`.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
from psycopg import sql

__all__ = [
    "PASSWORD",
    "PASSWORD_ROLE",
    "PgDatabase",
    "PgServer",
    "PgUnavailable",
    "create_database",
    "drop_database",
    "find_bin_dir",
    "pause_server",
    "pg_db",
    "pg_server",
    "resume_server",
    "start_server",
    "stop_server",
    "throwaway_server",
]

PASSWORD_ROLE: Final = "meshmq_pw"
PASSWORD: Final = "right-password"
SUPERUSER: Final = "postgres"
_START_ATTEMPTS: Final = 3
_COMMAND_TIMEOUT_S: Final = 60


class PgUnavailable(RuntimeError):
    """No throwaway server can be started here (the message says why)."""


@dataclass(frozen=True, slots=True)
class PgServer:
    bin_dir: str
    base_dir: str  # holds data/, the log and the Unix socket
    host: str
    port: int

    @property
    def data_dir(self) -> str:
        return os.path.join(self.base_dir, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base_dir, "log")

    def url(self, dbname: str, user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{dbname}"

    def connect(
        self, dbname: str = "postgres", *, autocommit: bool = True
    ) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.url(dbname), autocommit=autocommit, connect_timeout=10)


@dataclass(frozen=True, slots=True)
class PgDatabase:
    server: PgServer
    name: str

    @property
    def url(self) -> str:
        """Superuser URL of this database (trust auth)."""
        return self.server.url(self.name)

    def connect(self, *, autocommit: bool = True) -> psycopg.Connection[tuple[Any, ...]]:
        return self.server.connect(self.name, autocommit=autocommit)


def find_bin_dir() -> str | None:
    """The newest installed PostgreSQL's bin directory (Debian layout), or None."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None
    return os.path.dirname(max(found, key=lambda p: int(Path(p).parent.parent.name)))


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", SUPERUSER, "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str]) -> None:
    done = subprocess.run(
        _as_server_user(argv),
        env=_clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise PgUnavailable(f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stderr.strip()[-800:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server() -> PgServer:
    """initdb + start a private server on a kernel-chosen port of 127.0.0.1; PgUnavailable if not here."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PgUnavailable(
            "PostgreSQL binaries not found under /usr/lib/postgresql/*/bin "
            "(install Debian's postgresql package; `make test` does)"
        )
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        raise PgUnavailable("running as root but `runuser` is missing (PostgreSQL refuses to run as root)")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    base = tempfile.mkdtemp(prefix="pgtest.", dir=shm)
    try:
        if os.geteuid() == 0:
            shutil.chown(base, SUPERUSER, SUPERUSER)
        os.chmod(base, 0o700)
        data = os.path.join(base, "data")
        _run(
            [
                f"{bin_dir}/initdb",
                "-D",
                data,
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                "--no-instructions",
            ]
        )
        hba = os.path.join(data, "pg_hba.conf")
        with open(hba, encoding="utf-8") as f:
            rules = f.read()
        # First matching line wins: the password role must authenticate, everyone else is trusted.
        with open(hba, "w", encoding="utf-8") as f:
            f.write(f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n{rules}")
        server = _start_on_some_port(bin_dir, base)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    atexit.register(stop_server, server)
    for key in [k for k in os.environ if k.startswith("PG")]:
        del os.environ[key]
    with server.connect() as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(PASSWORD_ROLE), sql.Literal(PASSWORD)
            )
        )
    return server


def _start_on_some_port(bin_dir: str, base: str) -> PgServer:
    error: PgUnavailable | None = None
    for _ in range(_START_ATTEMPTS):  # the port may be taken between our probe and the bind
        server = PgServer(bin_dir=bin_dir, base_dir=base, host="127.0.0.1", port=_free_port())
        try:
            _pg_ctl_start(server)
            return server
        except PgUnavailable as e:
            error = e
    assert error is not None
    with contextlib.suppress(OSError):
        error = PgUnavailable(f"{error}; server log: {Path(base, 'log').read_text()[-800:]}")
    raise error


def _pg_ctl_start(server: PgServer) -> None:
    options = (
        f"-p {server.port} -k {server.base_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c full_page_writes=off -c max_connections=60"
    )
    _run(
        [
            f"{server.bin_dir}/pg_ctl",
            "-D",
            server.data_dir,
            "-l",
            server.log_path,
            "-w",
            "-t",
            "30",
            "-o",
            options,
            "start",
        ]
    )


def pause_server(server: PgServer) -> None:
    """Stop the server (fast shutdown: connections are cut) but keep its data: an outage."""
    _run([f"{server.bin_dir}/pg_ctl", "-D", server.data_dir, "-m", "fast", "-w", "stop"])


def resume_server(server: PgServer) -> None:
    """Start a paused server again on the same port with the same data."""
    _pg_ctl_start(server)


def stop_server(server: PgServer) -> None:
    """Stop (immediate) and delete the server's files; safe to call twice."""
    if os.path.isdir(server.data_dir):
        with contextlib.suppress(PgUnavailable, subprocess.TimeoutExpired):
            _run([f"{server.bin_dir}/pg_ctl", "-D", server.data_dir, "-m", "immediate", "-w", "stop"])
    shutil.rmtree(server.base_dir, ignore_errors=True)


@contextlib.contextmanager
def throwaway_server() -> Iterator[PgServer]:
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)


_db_numbers = itertools.count(1)


def create_database(server: PgServer, template: str = "template1") -> PgDatabase:
    name = f"t{os.getpid()}_{next(_db_numbers)}"
    with server.connect() as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
        )
    return PgDatabase(server=server, name=name)


def drop_database(db: PgDatabase) -> None:
    with db.server.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db.name)))


# --- pytest fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One throwaway server for the whole session (skips with the reason if none can start)."""
    try:
        server = start_server()
    except PgUnavailable as e:
        pytest.skip(f"no throwaway PostgreSQL: {e}")
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def pg_db(pg_server: PgServer) -> Iterator[PgDatabase]:
    """A fresh, empty database for one test, dropped afterwards."""
    db = create_database(pg_server)
    try:
        yield db
    finally:
        drop_database(db)
