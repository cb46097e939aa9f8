"""The backend fixtures of the store's contract suites: each test runs on memory, SQLite and
PostgreSQL (a fresh database of the throwaway server of `tests/pg.py` per test).

`make_backend` builds unopened backends over one and the same storage (a second node, a reopen);
`backend` is one of them, opened. `tests/unit/store/conftest.py` makes both visible to every
test module of this directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from store.backend import Backend, open_backend
from tests.pg import PgDatabase

__all__ = ["KINDS", "BackendFactory", "backend", "make_backend"]

BackendFactory = Callable[[], Backend]

KINDS = [
    pytest.param("memory"),
    pytest.param("sqlite"),
    pytest.param("postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=KINDS)
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendFactory]:
    """Builds unopened backends over one and the same storage (a second node, a reopen)."""
    kind: str = request.param
    made: list[Backend] = []
    memory = open_backend("MEMORY")

    def make() -> Backend:
        if kind == "memory":
            backend = memory
        elif kind == "sqlite":
            backend = open_backend("SQLITE", sqlite_path=str(tmp_path / "data" / "store.db"))
        else:
            db: PgDatabase = request.getfixturevalue("pg_db")
            backend = open_backend("POSTGRES", postgres_url=db.url, pool_size=2)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make_backend: BackendFactory) -> Backend:
    b = make_backend()
    b.open()
    return b
