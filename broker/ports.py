"""The seams between the broker core and what lies outside one worker.

Why: the core (sessions, routing, handlers) must not know whether sessions are kept in memory,
in the node's store process, or whether other workers and nodes exist. It talks to these
`typing.Protocol` ports; a single worker uses the in-memory implementations below, the mesh and
store issues plug in their own without touching the handlers.

Must not: hold behaviour beyond the trivial in-memory defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from broker.messages import Message
from broker.protocol.packets import Will
from broker.session import Outgoing, Session, SubEntry
from mesh.envelope import SessionWire
from store.records import QueuedRecord, SessionRecord
from store.wire import QueuedTuple

CLAIM_LOST = -1  # the epoch a claim's `done` gets when a newer claim on another node won


class SessionStore(Protocol):
    """Where session state and durable messages go to outlive the worker (the store process).

    `enabled` is False for the in-memory store: then nothing is durable and nothing waits.
    """

    enabled: bool

    def session_saved(self, session: Session, done: Callable[[float], None] | None = None) -> None:
        """A session's durable part changed: subscriptions, expiry, will, online; done(now)
        once the store holds it."""

    def session_removed(self, client_id: str, done: Callable[[float], None] | None = None) -> None:
        """A session ended (clean start, expiry) and its state can go; done(now) once it is gone."""

    def recover(self, node: str, done: Callable[[list[tuple[str, Will]], float], None]) -> None:
        """Another node died: mark its sessions offline; done(their wills, now)."""

    def oldest_wait_ms(self, now: float) -> int:
        """How long the oldest request still waits for the store (0: none): health's store status."""

    def session_online(self, session: Session, online: bool) -> None:
        """The session's client connected or went away."""

    def retained_changed(self, topic: str, message: Message | None) -> None:
        """A retained message was set (message) or cleared (None), without waiting."""

    def durable_targets(self, message: Message) -> list[QueuedTuple]:
        """The queue rows a QoS 1/2 message needs (one per matching persistent session)."""

    def persist(
        self,
        message: Message,
        rows: list[QueuedTuple],
        retained: bool,
        may_refuse: bool,
        done: Callable[[bool, float], None],
    ) -> None:
        """Make rows and the retained change durable; done(ok, now) once committed (or refused)."""

    def ack(self, client_id: str, msg_id: int) -> None:
        """A persistent session got message `msg_id` acknowledged: its row can go."""

    def load(
        self, client_id: str, done: Callable[[SessionRecord | None, list[QueuedRecord], bool, float], None]
    ) -> None:
        """The stored session and its queued messages; done(record, rows, ok, now)."""

    def queued_to_outgoing(self, row: QueuedRecord, now: float) -> Outgoing:
        """A queued row as a delivery of the session."""

    def flush(self) -> None:
        """Send what was batched (acknowledgements)."""


class MeshPort(Protocol):
    """The other processes of the node (and later of the cluster), as one worker sees them.

    Callbacks (`done`) may run synchronously, inside the call, or later from the worker's event
    loop; the core is written for both.
    """

    def forward(self, message: Message) -> bool:
        """Offer a message this worker has routed locally to every other process that may
        want it; True if any may (so "no matching subscribers" would be a lie)."""

    def direct(
        self, worker: int, client_id: str, message: Message, qos: int, retain: bool, sub_ids: tuple[int, ...]
    ) -> None:
        """Deliver to one session held by another worker (a shared-subscription pick)."""

    def claim(
        self,
        client_id: str,
        clean_start: bool,
        now: float,
        done: Callable[[int, SessionWire | None, float], None],
    ) -> None:
        """Make this worker the owner of `client_id`: done(epoch, state, now), where state is
        the session handed over by its previous owner on another worker, if any."""

    def handoff(self, worker: int, client_id: str, epoch: int, state: SessionWire | None) -> None:
        """Send a released session to the worker that claimed it."""

    def session_ended(self, client_id: str, epoch: int) -> None:
        """The session of `client_id` ended here for good: forget who holds it."""

    def interest(self, topic_filter: str, delta: int) -> bool:
        """A local (non-shared) subscription to `topic_filter` was added (+1) or removed (-1);
        True if other processes must learn of it before the SUBACK (see `barrier`)."""

    def shared_changed(self, entry: SubEntry, joined: bool) -> None:
        """A local shared-subscription member joined (or changed options) or left."""

    def barrier(self, now: float, done: Callable[[float], None]) -> None:
        """Call done(now) once every other process has seen what this one sent and subscribed so far."""

    def flush(self) -> None:
        """Send what was batched since the last flush."""


class ClientIdSource(Protocol):
    def __call__(self) -> str: ...


class MemorySessionStore:
    """No store process: the core's own dictionaries are the sessions' only copy."""

    enabled = False

    def session_saved(self, session: Session, done: Callable[[float], None] | None = None) -> None:
        if done is not None:
            raise AssertionError("nothing is durable without a store")

    def session_removed(self, client_id: str, done: Callable[[float], None] | None = None) -> None:
        if done is not None:
            raise AssertionError("nothing is durable without a store")

    def recover(self, node: str, done: Callable[[list[tuple[str, Will]], float], None]) -> None:
        raise AssertionError("a cluster needs a store")

    def oldest_wait_ms(self, now: float) -> int:
        return 0

    def session_online(self, session: Session, online: bool) -> None:
        pass

    def retained_changed(self, topic: str, message: Message | None) -> None:
        pass

    def durable_targets(self, message: Message) -> list[QueuedTuple]:
        return []

    def persist(
        self,
        message: Message,
        rows: list[QueuedTuple],
        retained: bool,
        may_refuse: bool,
        done: Callable[[bool, float], None],
    ) -> None:
        raise AssertionError("nothing is durable without a store")

    def ack(self, client_id: str, msg_id: int) -> None:
        pass

    def load(
        self, client_id: str, done: Callable[[SessionRecord | None, list[QueuedRecord], bool, float], None]
    ) -> None:
        raise AssertionError("nothing is stored without a store")

    def queued_to_outgoing(self, row: QueuedRecord, now: float) -> Outgoing:
        raise AssertionError("nothing is stored without a store")

    def flush(self) -> None:
        pass


class NoMesh:
    """Nothing outside this worker (unit tests, and the harness of the sans-IO core)."""

    def forward(self, message: Message) -> bool:
        return False

    def direct(
        self, worker: int, client_id: str, message: Message, qos: int, retain: bool, sub_ids: tuple[int, ...]
    ) -> None:
        raise AssertionError("no other worker exists")

    def claim(
        self,
        client_id: str,
        clean_start: bool,
        now: float,
        done: Callable[[int, SessionWire | None, float], None],
    ) -> None:
        done(0, None, now)

    def handoff(self, worker: int, client_id: str, epoch: int, state: SessionWire | None) -> None:
        raise AssertionError("no other worker exists")

    def session_ended(self, client_id: str, epoch: int) -> None:
        pass

    def interest(self, topic_filter: str, delta: int) -> bool:
        return False

    def shared_changed(self, entry: SubEntry, joined: bool) -> None:
        pass

    def barrier(self, now: float, done: Callable[[float], None]) -> None:
        done(now)

    def flush(self) -> None:
        pass


def random_client_id() -> str:
    """A server-assigned client identifier [MQTT-3.2.2-16]: unique, 1-23 safe characters."""
    return "meshmq-" + os.urandom(8).hex()
