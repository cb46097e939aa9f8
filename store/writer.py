"""Group commit: many writers' operations, one transaction.

Why: the durability promise is paid per transaction, not per message. The store process hands
every write it receives to `GroupCommit.submit` and calls `commit` once it has drained its
socket, so one transaction carries everything that arrived meanwhile — batches grow by themselves
when the database is slow, and stay small (low latency) when it is fast.

Must not: do socket IO or read anything but the backend; reorder operations (they are applied in
submission order, which is each worker's order).

Invariants:
- A submission's `done(True)` runs only after the transaction holding its operations committed;
  `done(False)` only for a refusable submission that waited longer than `refuse_after_s` while the
  database was unavailable, and then its operations are taken out and never applied.
- While the database is unavailable nothing is lost: submissions wait (bounded by
  `max_pending_ops`; past it, refusable ones are refused at once and the rest still wait), and the
  commit is retried with a backoff that doubles up to `max_backoff_s`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from store.backend import Backend
from store.errors import StoreRecordError, StoreUnavailable
from store.records import WriteOp

log = logging.getLogger("store.writer")


@dataclass(slots=True)
class _Submission:
    ops: list[WriteOp]
    done: Callable[[bool], None] | None
    submitted_at: float
    may_refuse: bool


@dataclass(slots=True)
class CommitStats:
    transactions: int = 0
    ops: int = 0
    last_batch_ops: int = 0
    max_batch_ops: int = 0
    failures: int = 0
    refused: int = 0
    last_commit_s: float = 0.0


@dataclass(slots=True)
class GroupCommit:
    backend: Backend
    refuse_after_s: float = 1.0
    max_pending_ops: int = 1_000_000
    max_backoff_s: float = 5.0
    pending: list[_Submission] = field(default_factory=list)
    pending_ops: int = 0
    degraded: bool = False
    retry_at: float = 0.0
    backoff_s: float = 0.1
    stats: CommitStats = field(default_factory=CommitStats)

    def submit(
        self, ops: list[WriteOp], done: Callable[[bool], None] | None, now: float, may_refuse: bool = False
    ) -> None:
        if may_refuse and self.degraded and self.pending_ops + len(ops) > self.max_pending_ops:
            self.stats.refused += 1
            if done is not None:
                done(False)
            return
        self.pending.append(_Submission(ops, done, now, may_refuse))
        self.pending_ops += len(ops)

    def due(self, now: float) -> bool:
        return bool(self.pending) and (not self.degraded or now >= self.retry_at)

    def commit(self, now: float, clock: Callable[[], float]) -> None:
        """Apply everything pending in one transaction; on failure keep it and back off."""
        if not self.pending:
            return
        if self.degraded:
            self._refuse_overdue(now)
            if now < self.retry_at or not self.pending:
                return
        batch = self.pending
        ops: list[WriteOp] = []
        for submission in batch:
            ops.extend(submission.ops)
        started = clock()
        try:
            self.backend.apply(ops)
        except StoreRecordError:
            # A record the database cannot take: find the submission(s) it came with, refuse
            # them, and commit the others (one bad request must not stop every writer).
            self._isolate(now)
            return
        except StoreUnavailable as exc:
            self.stats.failures += 1
            if not self.degraded:
                log.error("degraded: database unavailable, %d operation(s) waiting: %s", len(ops), exc)
            self.degraded = True
            self.retry_at = now + self.backoff_s
            self.backoff_s = min(self.backoff_s * 2, self.max_backoff_s)
            return
        if self.degraded:
            log.warning("recovered: database back, %d waiting operation(s) committed", len(ops))
        self.degraded = False
        self.backoff_s = 0.1
        self.pending = []
        self.pending_ops = 0
        stats = self.stats
        stats.transactions += 1
        stats.ops += len(ops)
        stats.last_batch_ops = len(ops)
        stats.max_batch_ops = max(stats.max_batch_ops, len(ops))
        stats.last_commit_s = clock() - started
        for submission in batch:
            if submission.done is not None:
                submission.done(True)

    def _isolate(self, now: float) -> None:
        batch, self.pending, self.pending_ops = self.pending, [], 0
        for submission in batch:
            try:
                self.backend.apply(submission.ops)
            except StoreRecordError as exc:
                log.error("store: a write was refused as invalid and dropped: %s", exc)
                self.stats.refused += 1
                if submission.done is not None:
                    submission.done(False)
                continue
            except StoreUnavailable:
                self.pending.append(submission)
                self.pending_ops += len(submission.ops)
                continue
            self.stats.transactions += 1
            self.stats.ops += len(submission.ops)
            if submission.done is not None:
                submission.done(True)

    def _refuse_overdue(self, now: float) -> None:
        keep: list[_Submission] = []
        for submission in self.pending:
            if submission.may_refuse and now - submission.submitted_at >= self.refuse_after_s:
                self.pending_ops -= len(submission.ops)
                self.stats.refused += 1
                if submission.done is not None:
                    submission.done(False)
            else:
                keep.append(submission)
        self.pending = keep
