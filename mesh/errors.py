"""The errors of the `mesh` package.

Why: one error base per package (STYLE.md rule 5), so that the one place per task that catches
mesh failures (the worker's mesh reader, the relay's control loop) catches `MeshError` and nothing
wider, and a bug elsewhere is never mistaken for bad traffic.

Must not: import anything from the rest of the package (every mesh module imports this one).

Invariants: every error raised on purpose by a mesh module is a `MeshError`; its message says
what was wrong in words an operator can act on (the field, the value, the expected shape).
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error the mesh package raises on purpose."""


class EnvelopeError(MeshError):
    """An envelope or control frame that is not protocol version 1 as `mesh/PROTOCOL.md` defines it.

    Raised for bytes that are not msgpack, another version, an unknown kind, a wrong number of
    fields or a field of the wrong type or range, and by the pack functions for values that cannot
    be put on the wire. Receivers drop the envelope, count it and carry on.
    """
