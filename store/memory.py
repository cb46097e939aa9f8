"""The in-memory backend: dicts with the exact semantics of the SQL backends.

Why: tests and a throwaway single node need a store with no files; and the contract suite uses
this one as the reference the SQL backends are compared against, so it is written for
plainness first.

Must not: share state between instances, or survive the process (nothing here is durable).

Invariants:
- `apply` checks the whole batch first (`check_ops`); after that nothing in it can fail, so the
  batch lands completely or (on a bad record) not at all, like a SQL transaction.
- Users and rules change only after their check passed, so a refused change leaves no trace;
  `_auth_version` grows by one per change, `_last_rule_id` only grows (ids are never reused).
- `_Queue.rows` is ordered by seq because seqs are handed out increasing and appended; fetch
  walks it from the front. `by_msg` indexes the same rows by message id for `Ack`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from store.errors import StoreError, StoreRecordError
from store.records import (
    Ack,
    AclRecord,
    ClearRetained,
    DeleteSession,
    Enqueue,
    QueuedRecord,
    RetainedRecord,
    SessionRecord,
    SetOnline,
    SetRetained,
    UpsertSession,
    UserRecord,
    WriteOp,
    check_acl,
    check_acl_id,
    check_ops,
    check_user,
    check_username,
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
        self._users: dict[str, UserRecord] = {}
        self._rules: dict[int, AclRecord] = {}  # in id order: ids are handed out increasing
        self._auth_version = 0
        self._last_rule_id = 0

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

    # --- users and ACL rules ----------------------------------------------------------------------

    def auth_version(self) -> int:
        self._check_open()
        return self._auth_version

    def load_auth(self) -> tuple[int, list[UserRecord], list[AclRecord]]:
        self._check_open()
        users = [self._users[name] for name in sorted(self._users)]
        return self._auth_version, users, list(self._rules.values())

    def put_user(self, username: str, password_hash: str | None, admin: bool | None) -> tuple[int, bool]:
        self._check_open()
        check_user(username, password_hash, admin)
        old = self._users.get(username)
        if old is None:
            if password_hash is None:
                raise StoreRecordError(f"user {username!r} does not exist: creating it needs a password hash")
            new = UserRecord(username, password_hash, bool(admin))
        else:
            new = UserRecord(
                username,
                old.password_hash if password_hash is None else password_hash,
                old.admin if admin is None else admin,
            )
        self._users[username] = new
        self._auth_version += 1
        return self._auth_version, old is None

    def delete_user(self, username: str) -> tuple[int, bool]:
        self._check_open()
        check_username(username)
        existed = self._users.pop(username, None) is not None
        doomed = [rule_id for rule_id, rule in self._rules.items() if rule.user == username]
        for rule_id in doomed:
            del self._rules[rule_id]
        if existed or doomed:
            self._auth_version += 1
        return self._auth_version, existed

    def add_acl(self, user: str, topic: str, access: str) -> tuple[int, int]:
        self._check_open()
        check_acl(user, topic, access)
        self._last_rule_id += 1
        self._rules[self._last_rule_id] = AclRecord(self._last_rule_id, user, topic, access)
        self._auth_version += 1
        return self._auth_version, self._last_rule_id

    def delete_acl(self, rule_id: int) -> tuple[int, bool]:
        self._check_open()
        check_acl_id(rule_id)
        existed = self._rules.pop(rule_id, None) is not None
        if existed:
            self._auth_version += 1
        return self._auth_version, existed

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("the memory store is not open")
