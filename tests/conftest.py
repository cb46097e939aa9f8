"""Fixtures every test directory can use: the throwaway PostgreSQL server (`tests/pg.py`)."""

from tests.pg import pg_db, pg_server

__all__ = ["pg_db", "pg_server"]
