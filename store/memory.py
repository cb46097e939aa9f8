"""The in-memory backend: dicts with the exact semantics of the SQL backends.

Why: tests and a throwaway single node need a store with no files; and the contract suite uses
this one as the reference the SQL backends are compared against, so it is written for
plainness first.

Must not: share state between instances, or survive the process (nothing here is durable).

Invariants:
- `apply` checks the whole batch first (`check_ops`); after that nothing in it can fail, so the
  batch lands completely or (on a bad record) not at all, like a SQL transaction.
- `_Queue.rows` is ordered by seq because seqs are handed out increasing and appended; fetch
  walks it from the front. `by_msg` indexes the same rows by message id for `Ack`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from store.errors import StoreError
from store.records import (
    Ack,
    ClearRetained,
    DeleteSession,
    Enqueue,
    QueuedRecord,
    RetainedRecord,
    SessionRecord,
    SetOnline,
    SetRetained,
    UpsertSession,
    WriteOp,
    check_ops,
)

__all__ = ["MemoryBackend"]


@dataclass(slots=True)
class _Row:
    record: QueuedRecord  # its seq is the row's
    invisible_until: float = 0.0


@dataclass(slots=True)
class _Queue:
    rows: dict[int, _Row] = field(default_factory=dict)  # seq -> row, in seq order
    by_msg: dict[int, list[int]] = field(default_factory=dict)  # msg_id -> seqs

    def delete(self, seq: int) -> None:
        row = self.rows.pop(seq)
        seqs = self.by_msg[row.record.msg_id]
        seqs.remove(seq)
        if not seqs:
            del self.by_msg[row.record.msg_id]


class MemoryBackend:
    name = "memory"

    def __init__(self) -> None:
        self._open = False
        self._sessions: dict[str, SessionRecord] = {}
        self._queues: dict[str, _Queue] = {}
        self._retained: dict[str, RetainedRecord] = {}
        self._last_seq = 0

    def open(self) -> None:
        self._open = True

    def close(self) -> None:
        self._open = False

    def schema_version(self) -> int:
        self._check_open()
        return 0

    # --- writes -----------------------------------------------------------------------------------

    def apply(self, ops: Sequence[WriteOp]) -> None:
        self._check_open()
        check_ops(ops)
        for op in ops:
            if type(op) is Enqueue:
                self._enqueue(op.records)
            elif type(op) is Ack:
                self._ack(op.client_id, op.msg_ids)
            elif type(op) is UpsertSession:
                self._sessions[op.record.client_id] = op.record
            elif type(op) is DeleteSession:
                self._sessions.pop(op.client_id, None)
                self._queues.pop(op.client_id, None)
            elif type(op) is SetOnline:
                self._set_online(op)
            elif type(op) is SetRetained:
                self._retained[op.record.topic] = op.record
            elif type(op) is ClearRetained:
                self._retained.pop(op.topic, None)

    def _enqueue(self, records: tuple[QueuedRecord, ...]) -> None:
        for r in records:
            self._last_seq += 1
            seq = self._last_seq
            queue = self._queues.get(r.client_id)
            if queue is None:
                queue = self._queues[r.client_id] = _Queue()
            queue.rows[seq] = _Row(
                QueuedRecord(
                    r.client_id,
                    r.msg_id,
                    r.qos,
                    r.retain,
                    r.sub_ids,
                    r.topic,
                    r.payload,
                    r.props,
                    r.origin,
                    r.expires_at,
                    seq,
                )
            )
            queue.by_msg.setdefault(r.msg_id, []).append(seq)

    def _ack(self, client_id: str, msg_ids: tuple[int, ...]) -> None:
        queue = self._queues.get(client_id)
        if queue is None:
            return
        for msg_id in msg_ids:
            for seq in list(queue.by_msg.get(msg_id, ())):
                queue.delete(seq)
        if not queue.rows:
            del self._queues[client_id]

    def _set_online(self, op: SetOnline) -> None:
        old = self._sessions.get(op.client_id)
        if old is None:
            return
        self._sessions[op.client_id] = SessionRecord(
            old.client_id, old.expiry_s, old.subscriptions, old.will, op.online, op.node, op.epoch, op.at
        )

    # --- reads ------------------------------------------------------------------------------------

    def load_session(self, client_id: str) -> SessionRecord | None:
        self._check_open()
        return self._sessions.get(client_id)

    def sessions(self) -> list[SessionRecord]:
        self._check_open()
        return [self._sessions[c] for c in sorted(self._sessions)]

    def fetch_queue(self, client_id: str, limit: int, visibility_s: float, now: float) -> list[QueuedRecord]:
        self._check_open()
        queue = self._queues.get(client_id)
        if queue is None or limit <= 0:
            return []
        out: list[QueuedRecord] = []
        expired: list[int] = []
        hidden_until = now + visibility_s
        for seq, row in queue.rows.items():
            if len(out) >= limit:
                break
            if row.invisible_until > now:
                continue
            expires_at = row.record.expires_at
            if expires_at is not None and expires_at <= now:
                expired.append(seq)
                continue
            row.invisible_until = hidden_until
            out.append(row.record)
        for seq in expired:
            queue.delete(seq)
        if not queue.rows:
            del self._queues[client_id]
        return out

    def queue_depth(self, client_id: str) -> int:
        self._check_open()
        queue = self._queues.get(client_id)
        return 0 if queue is None else len(queue.rows)

    def retained(self, now: float) -> list[RetainedRecord]:
        self._check_open()
        return [
            r for topic, r in sorted(self._retained.items()) if r.expires_at is None or r.expires_at > now
        ]

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("the memory store is not open")
