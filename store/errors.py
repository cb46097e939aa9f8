"""The errors of the `store` package.

Why: one error base per package (STYLE.md rule 5). The store process catches `StoreError` at
one place per task and decides from the subclass what to do: `StoreUnavailable` means "the
database is down or the connection was lost: mark the node degraded, retry with backoff, ack
nothing that needs it"; `StoreConfigError` means "this can never work as configured: say so
and stop"; `StoreRecordError` means a caller handed the store a value that does not fit the
schema (a bug upstream, never retried).

Must not: import anything from the rest of the package (every store module imports this one),
or carry driver exception objects in its public shape: the message is the contract, and it
never contains a password.

Invariants: every error raised on purpose by a store module is a `StoreError`; its message says
which database, what went wrong and whether retrying can help.
"""

from __future__ import annotations

__all__ = ["StoreConfigError", "StoreError", "StoreRecordError", "StoreUnavailable"]


class StoreError(Exception):
    """Base of every error the store package raises on purpose."""


class StoreUnavailable(StoreError):
    """The database cannot be reached, or the connection was lost: retry later.

    A batch that raised this was rolled back (or, if the connection broke during COMMIT, its
    fate is unknown to the client: a retry may then write it twice).
    """


class StoreConfigError(StoreError):
    """Wrong URL, bad credentials, missing database, unusable path: retrying will not help."""


class StoreRecordError(StoreError):
    """A record or write op that does not fit the schema (wrong type, out of range, NUL in text).

    Raised before anything of the batch is written, so the batch is rejected as a whole.
    """
