"""The numbered SQL migrations of each dialect: find them, check them, say which are pending.

Why: the schema of a database that outlives a MeshMQ release is created and upgraded by the
files in `store/migrations/<dialect>/NNN_name.sql`, applied in order at open, each in its own
transaction, with the version recorded in the `schema_version` table. The SQL backends apply
them with their own driver; this module holds what both need and can be tested without a
database.

Must not: open a database connection or edit a migration's text (what is in the file is what
runs). A released migration is never edited: a change is the next number.

Invariants: versions are 1, 2, ..., N without gaps or duplicates (a packaging mistake raises
`StoreError` before anything runs); a database whose recorded version is newer than the newest
file is refused with `StoreConfigError` (an older MeshMQ must not write into a newer schema).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Final

from store.errors import StoreConfigError, StoreError

__all__ = ["DIALECTS", "Migration", "load_migrations", "parse_migrations", "pending_migrations"]

DIALECTS: Final = ("postgres", "sqlite")
_FILE_NAME: Final = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # the file name without number and suffix, e.g. "initial"
    sql: str


def load_migrations(dialect: str) -> tuple[Migration, ...]:
    """The migrations shipped in `store/migrations/<dialect>/`, in version order."""
    if dialect not in DIALECTS:
        raise StoreError(f"no migrations for dialect {dialect!r} (known: {', '.join(DIALECTS)})")
    folder = resources.files("store").joinpath("migrations", dialect)
    files = ((entry.name, entry.read_text(encoding="utf-8")) for entry in folder.iterdir() if entry.is_file())
    return parse_migrations(f for f in files if f[0].endswith(".sql"))


def parse_migrations(files: Iterable[tuple[str, str]]) -> tuple[Migration, ...]:
    """Check (file name, SQL text) pairs and order them; StoreError names the bad file."""
    found: dict[int, Migration] = {}
    for file_name, text in files:
        match = _FILE_NAME.match(file_name)
        if match is None:
            raise StoreError(f"migration file {file_name!r} is not named NNN_lowercase_name.sql")
        version = int(match.group(1))
        if version in found:
            raise StoreError(
                f"two migrations have number {version:03d}: {found[version].name!r} and {file_name!r}"
            )
        if not text.strip():
            raise StoreError(f"migration file {file_name!r} is empty")
        found[version] = Migration(version=version, name=match.group(2), sql=text)
    ordered = tuple(found[v] for v in sorted(found))
    for expected, migration in enumerate(ordered, start=1):
        if migration.version != expected:
            raise StoreError(
                f"migration {expected:03d} is missing (found {migration.version:03d}_{migration.name})"
            )
    return ordered


def pending_migrations(migrations: tuple[Migration, ...], current_version: int) -> tuple[Migration, ...]:
    """The migrations to apply to a database at `current_version` (0: empty), in order."""
    newest = migrations[-1].version if migrations else 0
    if current_version > newest:
        raise StoreConfigError(
            f"the database schema is at version {current_version}, newer than this MeshMQ knows "
            f"({newest}); upgrade MeshMQ or point it at another database"
        )
    return tuple(m for m in migrations if m.version > current_version)
