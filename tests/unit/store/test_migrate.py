"""The migration files and their loader (`store/migrate.py`)."""

from __future__ import annotations

import pytest

from store.errors import StoreConfigError, StoreError
from store.migrate import DIALECTS, Migration, load_migrations, parse_migrations, pending_migrations


@pytest.mark.parametrize("dialect", DIALECTS)
def test_shipped_migrations_are_numbered_from_one(dialect: str) -> None:
    migrations = load_migrations(dialect)
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "initial"
    assert all("CREATE TABLE" in m.sql or m.version > 1 for m in migrations)


def test_every_schema_change_lands_in_both_dialects() -> None:
    postgres, sqlite = load_migrations("postgres"), load_migrations("sqlite")
    assert [(m.version, m.name) for m in postgres] == [(m.version, m.name) for m in sqlite]


def test_unknown_dialect() -> None:
    with pytest.raises(StoreError, match="mysql"):
        load_migrations("mysql")


def test_files_are_ordered_by_number() -> None:
    got = parse_migrations([("002_more.sql", "B"), ("001_initial.sql", "A")])
    assert got == (Migration(1, "initial", "A"), Migration(2, "more", "B"))


@pytest.mark.parametrize(
    ("files", "complaint"),
    [
        ([("1_initial.sql", "A")], "not named"),
        ([("001_Initial.sql", "A")], "not named"),
        ([("001_initial.txt", "A")], "not named"),
        ([("001_a.sql", "A"), ("001_b.sql", "B")], "two migrations have number 001"),
        ([("001_a.sql", "A"), ("003_c.sql", "C")], "migration 002 is missing"),
        ([("002_b.sql", "B")], "migration 001 is missing"),
        ([("001_a.sql", "  \n")], "empty"),
    ],
)
def test_packaging_mistakes_are_refused(files: list[tuple[str, str]], complaint: str) -> None:
    with pytest.raises(StoreError, match=complaint):
        parse_migrations(files)


def test_pending() -> None:
    migrations = parse_migrations([("001_a.sql", "A"), ("002_b.sql", "B"), ("003_c.sql", "C")])
    assert [m.version for m in pending_migrations(migrations, 0)] == [1, 2, 3]
    assert [m.version for m in pending_migrations(migrations, 2)] == [3]
    assert pending_migrations(migrations, 3) == ()
    with pytest.raises(StoreConfigError, match="newer than this MeshMQ knows"):
        pending_migrations(migrations, 4)
