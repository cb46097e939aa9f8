"""Group commit (`store/writer.py`) against a fake backend that records its transactions.

What is pinned: one transaction per `commit` holding every pending op in submission order;
`done(True)` only after that transaction's `apply` returned; during an outage nothing is lost,
the retry backs off (doubling up to `max_backoff_s`) and the writer says it is degraded;
refusable submissions are refused once they waited `refuse_after_s` (and their ops never reach
the database), the others are applied after recovery; the statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import pytest

from store.errors import StoreRecordError, StoreUnavailable
from store.records import (
    Ack,
    AclRecord,
    ClearRetained,
    DeleteSession,
    QueuedRecord,
    RetainedRecord,
    SessionRecord,
    UserRecord,
    WriteOp,
)
from store.writer import GroupCommit

pytestmark = pytest.mark.timeout(10)


class FakeBackend:
    """Records each transaction (a list of ops); raises StoreUnavailable while `down`."""

    name = "fake"

    def __init__(self) -> None:
        self.batches: list[list[WriteOp]] = []
        self.down = False
        self.attempts = 0
        self.on_apply: Callable[[], None] | None = None
        self.poison: WriteOp | None = None  # a batch holding this op is rejected (like check_ops)

    def apply(self, ops: Sequence[WriteOp]) -> None:
        self.attempts += 1
        if self.on_apply is not None:
            self.on_apply()
        if self.down:
            raise StoreUnavailable("fake database: connection refused")
        if self.poison is not None and self.poison in ops:
            raise StoreRecordError("write op #1 (Ack): bad; batch rejected")
        self.batches.append(list(ops))

    # The reads of the Backend protocol: the writer never calls them.
    def open(self) -> None:
        raise AssertionError("not used by the writer")

    def close(self) -> None:
        raise AssertionError("not used by the writer")

    def load_session(self, client_id: str) -> SessionRecord | None:
        raise AssertionError("not used by the writer")

    def sessions(self) -> list[SessionRecord]:
        raise AssertionError("not used by the writer")

    def fetch_queue(self, client_id: str, limit: int, visibility_s: float, now: float) -> list[QueuedRecord]:
        raise AssertionError("not used by the writer")

    def queue_depth(self, client_id: str) -> int:
        raise AssertionError("not used by the writer")

    def retained(self, now: float) -> list[RetainedRecord]:
        raise AssertionError("not used by the writer")

    def schema_version(self) -> int:
        raise AssertionError("not used by the writer")

    def auth_version(self) -> int:
        raise AssertionError("not used by the writer")

    def load_auth(self) -> tuple[int, list[UserRecord], list[AclRecord]]:
        raise AssertionError("not used by the writer")

    def put_user(self, username: str, password_hash: str | None, admin: bool | None) -> tuple[int, bool]:
        raise AssertionError("not used by the writer")

    def delete_user(self, username: str) -> tuple[int, bool]:
        raise AssertionError("not used by the writer")

    def add_acl(self, user: str, topic: str, access: str) -> tuple[int, int]:
        raise AssertionError("not used by the writer")

    def delete_acl(self, rule_id: int) -> tuple[int, bool]:
        raise AssertionError("not used by the writer")

    @property
    def applied(self) -> list[WriteOp]:
        return [op for batch in self.batches for op in batch]


class Done:
    """A `done` callback that remembers its calls."""

    def __init__(self, log: list[tuple[str, bool]] | None = None, name: str = "") -> None:
        self.calls: list[bool] = []
        self.log = log
        self.name = name

    def __call__(self, ok: bool) -> None:
        self.calls.append(ok)
        if self.log is not None:
            self.log.append((self.name, ok))


class Clock:
    def __init__(self, now: float = 100.0, step_s: float = 0.0) -> None:
        self.now = now
        self.step_s = step_s

    def __call__(self) -> float:
        value = self.now
        self.now += self.step_s
        return value


def op(n: int) -> WriteOp:
    return Ack(f"c{n}", (n,))


def test_one_transaction_per_commit_in_submission_order() -> None:
    backend = FakeBackend()
    writer = GroupCommit(backend)
    d1, d2, d3 = Done(), Done(), Done()
    writer.submit([op(1), op(2)], d1, 0.0)
    writer.submit([op(3)], d2, 0.0)
    writer.submit([op(4), op(5), op(6)], d3, 0.0)
    writer.submit([op(7)], None, 0.0)  # fire and forget
    assert writer.due(0.0)
    writer.commit(0.0, Clock())
    assert backend.batches == [[op(1), op(2), op(3), op(4), op(5), op(6), op(7)]]
    assert d1.calls == d2.calls == d3.calls == [True]
    assert writer.pending == [] and writer.pending_ops == 0
    assert not writer.due(0.0)


def test_commit_with_nothing_pending_opens_no_transaction() -> None:
    backend = FakeBackend()
    writer = GroupCommit(backend)
    writer.commit(0.0, Clock())
    assert backend.attempts == 0
    assert writer.stats.transactions == 0


def test_what_arrives_after_a_commit_goes_in_the_next_transaction() -> None:
    backend = FakeBackend()
    writer = GroupCommit(backend)
    writer.submit([op(1)], None, 0.0)
    writer.commit(0.0, Clock())
    writer.submit([op(2)], None, 0.1)
    writer.submit([op(3)], None, 0.1)
    writer.commit(0.1, Clock())
    assert backend.batches == [[op(1)], [op(2), op(3)]]


def test_done_runs_only_after_apply_returned() -> None:
    backend = FakeBackend()
    writer = GroupCommit(backend)
    events: list[tuple[str, bool]] = []
    backend.on_apply = lambda: events.append(("apply", True))
    writer.submit([op(1)], Done(events, "a"), 0.0)
    writer.submit([op(2)], Done(events, "b"), 0.0)
    writer.commit(0.0, Clock())
    assert events == [("apply", True), ("a", True), ("b", True)]


def test_a_failed_transaction_calls_no_done() -> None:
    backend = FakeBackend()
    backend.down = True
    writer = GroupCommit(backend)
    done = Done()
    writer.submit([op(1)], done, 0.0, may_refuse=True)
    writer.commit(0.0, Clock())
    assert done.calls == []
    assert backend.batches == []


def test_outage_loses_nothing_and_recovery_applies_everything_in_order() -> None:
    backend = FakeBackend()
    writer = GroupCommit(backend, refuse_after_s=100.0)
    backend.down = True
    writer.submit([op(1)], Done(), 0.0)
    writer.commit(0.0, Clock())
    assert writer.degraded
    writer.submit([op(2)], Done(), 0.05)
    writer.submit([op(3)], Done(), 0.05)
    now = 0.0
    for _ in range(5):
        now = writer.retry_at
        writer.commit(now, Clock())
    assert writer.degraded and backend.batches == []
    assert writer.pending_ops == 3
    backend.down = False
    now = writer.retry_at
    writer.commit(now, Clock())
    assert backend.batches == [[op(1), op(2), op(3)]]
    assert not writer.degraded
    assert writer.pending == [] and writer.pending_ops == 0


def test_retry_backs_off_doubling_up_to_the_maximum() -> None:
    backend = FakeBackend()
    backend.down = True
    writer = GroupCommit(backend, max_backoff_s=1.0, refuse_after_s=1000.0)
    writer.submit([op(1)], None, 0.0)
    now = 0.0
    waits = []
    for _ in range(7):
        writer.commit(now, Clock())
        waits.append(round(writer.retry_at - now, 6))
        now = writer.retry_at
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert backend.attempts == 7
    assert writer.stats.failures == 7


def test_no_retry_before_the_backoff_is_over() -> None:
    backend = FakeBackend()
    backend.down = True
    writer = GroupCommit(backend, refuse_after_s=1000.0)
    writer.submit([op(1)], None, 0.0)
    writer.commit(0.0, Clock())
    assert backend.attempts == 1
    retry_at = writer.retry_at
    assert not writer.due(retry_at - 0.01)
    writer.commit(retry_at - 0.01, Clock())
    assert backend.attempts == 1  # not yet
    assert writer.due(retry_at)
    writer.commit(retry_at, Clock())
    assert backend.attempts == 2


def test_recovery_resets_the_backoff() -> None:
    backend = FakeBackend()
    backend.down = True
    writer = GroupCommit(backend, refuse_after_s=1000.0)
    writer.submit([op(1)], None, 0.0)
    for _ in range(4):
        writer.commit(writer.retry_at, Clock())
    assert writer.backoff_s > 0.1
    backend.down = False
    writer.commit(writer.retry_at, Clock())
    assert not writer.degraded and writer.backoff_s == pytest.approx(0.1)
    # the next outage starts again from the shortest wait
    backend.down = True
    writer.submit([op(2)], None, 50.0)
    writer.commit(50.0, Clock())
    assert writer.retry_at == pytest.approx(50.1)


def test_refusable_submissions_are_refused_after_refuse_after_s_and_never_applied() -> None:
    backend = FakeBackend()
    backend.down = True
    writer = GroupCommit(backend, refuse_after_s=1.0, max_backoff_s=0.25)
    refusable, patient = Done(), Done()
    writer.submit([op(1)], refusable, 0.0, may_refuse=True)
    writer.submit([op(2)], patient, 0.0)
    writer.commit(0.0, Clock())
    # still within refuse_after_s: both wait
    writer.commit(0.5, Clock())
    assert refusable.calls == [] and patient.calls == []
    writer.commit(1.0, Clock())
    assert refusable.calls == [False]
    assert patient.calls == []
    assert writer.pending_ops == 1
    assert writer.stats.refused == 1
    backend.down = False
    writer.commit(writer.retry_at, Clock())
    assert backend.applied == [op(2)]  # the refused op never reaches the database
    assert patient.calls == [True]
    assert refusable.calls == [False]  # exactly once


def test_refusal_counts_from_each_submissions_own_time() -> None:
    backend = FakeBackend()
    backend.down = True
    writer = GroupCommit(backend, refuse_after_s=1.0, max_backoff_s=0.1)
    early, late = Done(), Done()
    writer.submit([op(1)], early, 0.0, may_refuse=True)
    writer.commit(0.0, Clock())
    writer.submit([op(2)], late, 0.8, may_refuse=True)
    writer.commit(1.2, Clock())
    assert early.calls == [False] and late.calls == []
    backend.down = False
    writer.commit(1.5, Clock())
    assert late.calls == [True]
    assert backend.applied == [op(2)]


def test_no_refusal_while_the_database_is_up() -> None:
    """A refusable submission older than refuse_after_s is still committed when the database works."""
    backend = FakeBackend()
    writer = GroupCommit(backend, refuse_after_s=1.0)
    done = Done()
    writer.submit([op(1)], done, 0.0, may_refuse=True)
    writer.commit(10.0, Clock())
    assert done.calls == [True]
    assert backend.applied == [op(1)]


def test_past_max_pending_ops_refusable_submissions_are_refused_at_once_while_degraded() -> None:
    backend = FakeBackend()
    backend.down = True
    writer = GroupCommit(backend, max_pending_ops=3, refuse_after_s=1000.0)
    writer.submit([op(1), op(2)], None, 0.0)
    writer.commit(0.0, Clock())
    assert writer.degraded
    refused, fits, patient = Done(), Done(), Done()
    writer.submit([op(3), op(4)], refused, 0.01, may_refuse=True)  # 2 + 2 > 3
    assert refused.calls == [False]
    writer.submit([op(3)], fits, 0.01, may_refuse=True)  # 2 + 1 = 3: waits
    assert fits.calls == []
    writer.submit([op(5), op(6)], patient, 0.01)  # not refusable: waits past the bound
    assert patient.calls == []
    assert writer.pending_ops == 5
    assert writer.stats.refused == 1
    backend.down = False
    writer.commit(writer.retry_at, Clock())
    assert backend.applied == [op(1), op(2), op(3), op(5), op(6)]
    assert fits.calls == [True] and patient.calls == [True] and refused.calls == [False]


def test_max_pending_ops_does_not_refuse_while_healthy() -> None:
    backend = FakeBackend()
    writer = GroupCommit(backend, max_pending_ops=1)
    done = Done()
    writer.submit([op(1), op(2), op(3)], done, 0.0, may_refuse=True)
    assert done.calls == []
    writer.commit(0.0, Clock())
    assert done.calls == [True]


def test_stats() -> None:
    backend = FakeBackend()
    writer = GroupCommit(backend, refuse_after_s=0.5, max_backoff_s=0.1)
    writer.submit([op(1), op(2), op(3)], None, 0.0)
    writer.commit(0.0, Clock(now=10.0, step_s=0.25))
    stats = writer.stats
    assert (stats.transactions, stats.ops, stats.last_batch_ops, stats.max_batch_ops) == (1, 3, 3, 3)
    assert stats.last_commit_s == pytest.approx(0.25)
    writer.submit([op(4)], None, 1.0)
    writer.commit(1.0, Clock(now=20.0, step_s=0.5))
    assert (stats.transactions, stats.ops, stats.last_batch_ops, stats.max_batch_ops) == (2, 4, 1, 3)
    assert stats.last_commit_s == pytest.approx(0.5)
    backend.down = True
    writer.submit([op(5)], Done(), 2.0, may_refuse=True)
    writer.submit([op(6)], None, 2.0)
    writer.commit(2.0, Clock())
    writer.commit(2.1, Clock())
    assert stats.failures == 2 and stats.transactions == 2
    writer.commit(2.6, Clock())  # op 5 waited 0.6 s > refuse_after_s
    assert stats.refused == 1
    backend.down = False
    writer.commit(writer.retry_at, Clock())
    assert (stats.transactions, stats.ops, stats.last_batch_ops) == (3, 5, 1)


def test_all_refused_while_degraded_leaves_nothing_to_commit() -> None:
    backend = FakeBackend()
    backend.down = True
    writer = GroupCommit(backend, refuse_after_s=0.5)
    done = Done()
    writer.submit([op(1)], done, 0.0, may_refuse=True)
    writer.commit(0.0, Clock())
    attempts = backend.attempts
    writer.commit(5.0, Clock())
    assert done.calls == [False]
    assert writer.pending == [] and writer.pending_ops == 0
    assert backend.attempts == attempts  # nothing left: no transaction tried
    assert not writer.due(10.0)


def test_mixed_ops_keep_their_order_across_submissions() -> None:
    backend = FakeBackend()
    writer = GroupCommit(backend)
    ops: list[WriteOp] = [DeleteSession("a"), ClearRetained("t"), Ack("a", (1, 2))]
    for one in ops:
        writer.submit([one], None, 0.0)
    writer.commit(0.0, Clock())
    assert backend.batches == [ops]


def test_a_bad_submission_does_not_block_the_others() -> None:
    backend = FakeBackend()
    writer = GroupCommit(backend)
    bad = Ack("bad", (2,))
    backend.poison = bad
    good1, refused, good2 = Done(), Done(), Done()
    writer.submit([op(1)], good1, 0.0)
    writer.submit([bad], refused, 0.0)
    writer.submit([op(3)], good2, 0.0)
    for now in (0.0, 1.0, 2.0):
        # the store service may see the error once; what matters is what follows
        with contextlib.suppress(StoreRecordError):
            writer.commit(now, Clock())
    assert backend.applied == [op(1), op(3)]
    assert good1.calls == [True] and good2.calls == [True]
    assert True not in refused.calls
