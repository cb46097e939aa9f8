"""The backend fixtures (`tests/unit/store/backends.py`) for every store test module."""

from tests.unit.store.backends import backend, make_backend

__all__ = ["backend", "make_backend"]
