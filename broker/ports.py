"""The seams between the broker core and what lies outside one worker.

Why: the core (sessions, routing, handlers) must not know whether sessions are kept in memory,
in the node's store process, or whether other workers and nodes exist. It talks to these
`typing.Protocol` ports; a single worker uses the in-memory implementations below, the mesh and
store issues plug in their own without touching the handlers.

Must not: hold behaviour beyond the trivial in-memory defaults.
"""

from __future__ import annotations

import os
from typing import Protocol

from broker.messages import Message
from broker.session import Session


class SessionStore(Protocol):
    """Where session state goes to outlive the worker (the store process, later)."""

    def session_saved(self, session: Session) -> None:
        """A session's durable part changed: subscriptions, expiry, will."""

    def session_removed(self, client_id: str) -> None:
        """A session ended (clean start, expiry) and its state can go."""

    def retained_changed(self, topic: str, message: Message | None) -> None:
        """A retained message was set (message) or cleared (None)."""


class MeshPort(Protocol):
    """Where a message goes to reach subscribers outside this worker (the mesh, later)."""

    def forward(self, message: Message) -> None:
        """Hand a message to other workers and nodes with matching subscribers."""


class ClientIdSource(Protocol):
    def __call__(self) -> str: ...


class MemorySessionStore:
    """Single worker, no store process: the core's own dictionaries are the sessions' only copy."""

    def session_saved(self, session: Session) -> None:
        pass

    def session_removed(self, client_id: str) -> None:
        pass

    def retained_changed(self, topic: str, message: Message | None) -> None:
        pass


class NoMesh:
    """Single worker: nothing lies outside it."""

    def forward(self, message: Message) -> None:
        pass


def random_client_id() -> str:
    """A server-assigned client identifier [MQTT-3.2.2-16]: unique, 1-23 safe characters."""
    return "meshmq-" + os.urandom(8).hex()
