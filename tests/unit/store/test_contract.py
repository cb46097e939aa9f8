"""One contract for every store backend (`store/backend.py`): memory, SQLite and PostgreSQL.

Each test runs against the three backends; the memory backend is the reference, and the SQL
backends must behave the same: session round trips (subscriptions in order, will, every field),
UpsertSession replacing subscriptions, DeleteSession cascading to subscriptions and queued rows,
SetOnline (and its no-op on a missing session), FIFO per subscriber across batches, Ack, the
visibility timeout, message expiry in the queue, retained set / replace / clear / expiry,
all-or-nothing batches, reopening (SQL backends), and the schema version after migrations.
PostgreSQL runs on a throwaway server (`tests/pg.py`), one fresh database per test; the
fixtures are in `tests/unit/store/backends.py`. Users and ACL rules: `test_contract_auth.py`.
"""

from __future__ import annotations

import pytest

from store.backend import Backend
from store.errors import StoreError, StoreRecordError
from store.migrate import load_migrations
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
    SubscriptionRecord,
    UpsertSession,
    WillRecord,
    WriteOp,
)
from tests.unit.store.backends import BackendFactory


def sub(key: str, qos: int = 1, *, sub_id: int | None = None, group: str | None = None) -> SubscriptionRecord:
    topic_filter = key.split("/", 2)[2] if group else key
    return SubscriptionRecord(key, topic_filter, qos, False, True, 1, sub_id, group)


def session(
    client_id: str = "c1", *, subs: tuple[SubscriptionRecord, ...] = (), will: bool = True
) -> SessionRecord:
    return SessionRecord(
        client_id=client_id,
        expiry_s=3600,
        subscriptions=subs,
        will=WillRecord("wills/" + client_id, b"\x00gone\xff", 1, True, b"\x81\xa1k\x01", 30)
        if will
        else None,
        online=True,
        node="node-a",
        epoch=7,
        updated_at=1_700_000_000.25,
    )


def queued(
    client_id: str, msg_id: int, *, expires_at: float | None = None, topic: str = "t/1"
) -> QueuedRecord:
    return QueuedRecord(
        client_id=client_id,
        msg_id=msg_id,
        qos=1 + msg_id % 2,
        retain=msg_id % 3 == 0,
        sub_ids=(msg_id % 5 + 1, 268_435_455) if msg_id % 2 else (),
        topic=topic,
        payload=bytes([msg_id % 256]) * (msg_id % 7) + b"\x00",
        props=None if msg_id % 4 == 0 else b"\x82\xa2ct\xa4text\xa1u\x90",
        origin="node-a",
        expires_at=expires_at,
    )


def retained(topic: str, payload: bytes = b"v", *, expires_at: float | None = None) -> RetainedRecord:
    return RetainedRecord(topic, payload, 1, b"\x80", "node-b", expires_at, 1_700_000_000.5)


def without_seq(records: list[QueuedRecord]) -> list[QueuedRecord]:
    return [
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
        )
        for r in records
    ]


def msg_ids(records: list[QueuedRecord]) -> list[int]:
    return [r.msg_id for r in records]


# --- sessions -------------------------------------------------------------------------------------


def test_session_round_trip(backend: Backend) -> None:
    subs = (sub("a/+/c", 2, sub_id=5), sub("$share/g1/x/#", 0, group="g1"), sub("d", 1, sub_id=268_435_455))
    record = session(subs=subs)
    backend.apply([UpsertSession(record)])
    assert backend.load_session("c1") == record
    assert backend.sessions() == [record]
    assert backend.load_session("missing") is None


def test_upsert_replaces_subscriptions_and_will_but_keeps_the_queue(backend: Backend) -> None:
    backend.apply([UpsertSession(session(subs=(sub("a"), sub("b"), sub("c")))), Enqueue((queued("c1", 1),))])
    replacement = session(subs=(sub("z"),), will=False)
    backend.apply([UpsertSession(replacement)])
    assert backend.load_session("c1") == replacement
    assert backend.queue_depth("c1") == 1


def test_sessions_lists_every_session(backend: Backend) -> None:
    records = [session(f"c{i}", subs=(sub(f"t/{i}"),), will=i % 2 == 0) for i in range(5)]
    backend.apply([UpsertSession(r) for r in reversed(records)])
    assert sorted(backend.sessions(), key=lambda r: r.client_id) == records


def test_delete_session_cascades(backend: Backend) -> None:
    backend.apply(
        [
            UpsertSession(session("c1", subs=(sub("a"),))),
            UpsertSession(session("c2", subs=(sub("b"),))),
            Enqueue((queued("c1", 1), queued("c2", 1), queued("c1", 2))),
        ]
    )
    backend.apply([DeleteSession("c1"), DeleteSession("never-existed")])
    assert backend.load_session("c1") is None
    assert backend.queue_depth("c1") == 0
    assert backend.fetch_queue("c1", 10, 30.0, 100.0) == []
    assert [s.client_id for s in backend.sessions()] == ["c2"]
    assert backend.queue_depth("c2") == 1


def test_set_online(backend: Backend) -> None:
    backend.apply([UpsertSession(session("c1", subs=(sub("a"),)))])
    backend.apply(
        [SetOnline("c1", False, "node-b", 8, 1_700_000_100.5), SetOnline("ghost", True, "n", 1, 1.0)]
    )
    loaded = backend.load_session("c1")
    assert loaded is not None
    assert (loaded.online, loaded.node, loaded.epoch, loaded.updated_at) == (
        False,
        "node-b",
        8,
        1_700_000_100.5,
    )
    assert loaded.subscriptions == (sub("a"),) and loaded.will == session().will
    assert backend.load_session("ghost") is None  # no-op: SetOnline never creates a session


# --- the queue ------------------------------------------------------------------------------------


def test_enqueue_is_fifo_per_subscriber_across_batches(backend: Backend) -> None:
    backend.apply([Enqueue((queued("a", 1), queued("b", 1), queued("a", 2)))])
    backend.apply([Enqueue((queued("a", 3),)), Enqueue((queued("b", 2), queued("a", 4)))])
    backend.apply([Enqueue((queued("a", 5),))])
    got = backend.fetch_queue("a", 100, 30.0, 100.0)
    assert without_seq(got) == [queued("a", i) for i in range(1, 6)]  # every field survives
    seqs = [r.seq for r in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5 and seqs[0] > 0
    assert msg_ids(backend.fetch_queue("b", 100, 30.0, 100.0)) == [1, 2]
    assert backend.queue_depth("a") == 5 and backend.queue_depth("nobody") == 0


def test_enqueue_order_within_one_batch_with_other_ops_between(backend: Backend) -> None:
    backend.apply(
        [
            Enqueue((queued("a", 1),)),
            SetRetained(retained("r")),
            Enqueue((queued("a", 2),)),
            Ack("a", (1,)),
            Enqueue((queued("a", 3), queued("a", 4))),
        ]
    )
    assert msg_ids(backend.fetch_queue("a", 10, 30.0, 100.0)) == [2, 3, 4]


def test_ack_deletes_rows_and_ignores_missing_ones(backend: Backend) -> None:
    backend.apply([Enqueue((*(queued("a", i) for i in range(1, 7)), queued("b", 2)))])
    backend.apply([Ack("a", (2, 4, 99)), Ack("a", ()), Ack("nobody", (1,)), Ack("a", (6,))])
    assert backend.queue_depth("a") == 3
    assert msg_ids(backend.fetch_queue("a", 10, 30.0, 100.0)) == [1, 3, 5]
    assert backend.queue_depth("b") == 1  # the same message id of another subscriber stays


def test_ack_of_handed_out_rows(backend: Backend) -> None:
    backend.apply([Enqueue(tuple(queued("a", i) for i in range(1, 4)))])
    assert msg_ids(backend.fetch_queue("a", 2, 30.0, 100.0)) == [1, 2]
    backend.apply([Ack("a", (1, 2))])
    assert msg_ids(backend.fetch_queue("a", 10, 30.0, 200.0)) == [3]


def test_visibility_timeout(backend: Backend) -> None:
    backend.apply([Enqueue(tuple(queued("a", i) for i in range(1, 6)))])
    assert msg_ids(backend.fetch_queue("a", 2, 30.0, 100.0)) == [1, 2]  # hidden until 130
    assert msg_ids(backend.fetch_queue("a", 2, 30.0, 110.0)) == [3, 4]  # hidden until 140
    assert msg_ids(backend.fetch_queue("a", 10, 30.0, 129.9)) == [5]
    assert backend.fetch_queue("a", 10, 30.0, 129.95) == []
    assert msg_ids(backend.fetch_queue("a", 10, 30.0, 130.0)) == [1, 2]  # the timeout passed
    assert msg_ids(backend.fetch_queue("a", 10, 30.0, 200.0)) == [1, 2, 3, 4, 5]
    assert backend.queue_depth("a") == 5  # handing out never deletes


def test_fetch_limit(backend: Backend) -> None:
    backend.apply([Enqueue(tuple(queued("a", i) for i in range(1, 4)))])
    assert backend.fetch_queue("a", 0, 30.0, 100.0) == []
    assert msg_ids(backend.fetch_queue("a", 1, 30.0, 100.0)) == [1]


def test_expired_rows_are_deleted_not_returned(backend: Backend) -> None:
    backend.apply(
        [
            Enqueue(
                (
                    queued("a", 1, expires_at=50.0),
                    queued("a", 2),
                    queued("a", 3, expires_at=100.0),  # expires_at <= now: expired
                    queued("a", 4, expires_at=100.5),
                    queued("a", 5, expires_at=60.0),
                )
            )
        ]
    )
    got = backend.fetch_queue("a", 10, 30.0, 100.0)
    assert msg_ids(got) == [2, 4]
    assert got[1].expires_at == 100.5
    assert backend.queue_depth("a") == 2


def test_fetch_skips_past_expired_rows_to_fill_the_limit(backend: Backend) -> None:
    records = (*(queued("a", i, expires_at=10.0) for i in range(1, 8)), queued("a", 8), queued("a", 9))
    backend.apply([Enqueue(records)])
    assert msg_ids(backend.fetch_queue("a", 2, 30.0, 100.0)) == [8, 9]
    assert backend.queue_depth("a") == 2


# --- retained -------------------------------------------------------------------------------------


def test_retained_set_replace_clear_and_expiry(backend: Backend) -> None:
    backend.apply(
        [
            SetRetained(retained("b/1", b"one")),
            SetRetained(retained("a/1", b"first")),
            SetRetained(retained("c/1", b"soon", expires_at=150.0)),
            SetRetained(retained("d/1", b"gone")),
        ]
    )
    backend.apply([SetRetained(retained("a/1", b"second")), ClearRetained("d/1"), ClearRetained("never")])
    assert backend.retained(100.0) == [
        retained("a/1", b"second"),
        retained("b/1", b"one"),
        retained("c/1", b"soon", expires_at=150.0),
    ]
    assert [r.topic for r in backend.retained(150.0)] == ["a/1", "b/1"]  # expires_at <= now: expired


# --- batches --------------------------------------------------------------------------------------


def bad_batches() -> list[list[WriteOp]]:
    good: list[WriteOp] = [
        UpsertSession(session("c1")),
        Enqueue((queued("a", 1),)),
        SetRetained(retained("r")),
    ]
    wrong_payload = QueuedRecord("a", 2, 1, False, (), "t", "text, not bytes", None, "n", None)  # type: ignore[arg-type]
    wrong_qos = QueuedRecord("a", 3, True, False, (), "t", b"", None, "n", None)  # True is not QoS 1
    nul_topic = RetainedRecord("a\x00b", b"", 0, None, "n", None, 1.0)  # [MQTT-1.5.4-2]
    return [
        [*good, Enqueue((queued("a", 2), wrong_payload))],
        [*good, Enqueue((wrong_qos,))],
        [*good, Enqueue(([queued("a", 2)],))],  # type: ignore[arg-type]
        [*good, SetRetained(nul_topic)],
        [*good, "not an op"],  # type: ignore[list-item]
        [*good, UpsertSession(session("c2", subs=(sub("x", sub_id=0),)))],
    ]


@pytest.mark.parametrize("batch", bad_batches())
def test_a_bad_record_rejects_the_whole_batch(backend: Backend, batch: list[WriteOp]) -> None:
    with pytest.raises(StoreRecordError):
        backend.apply(batch)
    assert backend.sessions() == []
    assert backend.queue_depth("a") == 0
    assert backend.retained(0.0) == []


def test_a_batch_the_database_rejects_is_rolled_back(
    make_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the pre-check switched off, the database itself must roll the transaction back."""
    backend = make_backend()
    backend.open()
    if backend.name == "memory":
        pytest.skip("the memory backend relies on the pre-check alone")
    monkeypatch.setattr(f"store.{backend.name}.check_ops", lambda ops: None)
    unstorable = QueuedRecord("a", 2, 1, False, (), "t", object(), None, "n", None)  # type: ignore[arg-type]
    batch: list[WriteOp] = [
        UpsertSession(session("c1")),
        SetRetained(retained("r")),
        Enqueue((queued("a", 1),)),
        Enqueue((unstorable,)),
    ]
    with pytest.raises(StoreError):
        backend.apply(batch)
    assert backend.sessions() == []
    assert backend.queue_depth("a") == 0
    assert backend.retained(0.0) == []
    backend.apply(batch[:3])  # the backend is still usable
    assert backend.queue_depth("a") == 1


def test_empty_batch(backend: Backend) -> None:
    backend.apply([])
    assert backend.sessions() == []


# --- lifecycle ------------------------------------------------------------------------------------


def test_reopen_keeps_everything(make_backend: BackendFactory) -> None:
    first = make_backend()
    first.open()
    if first.name == "memory":
        pytest.skip("nothing in memory outlives the process")
    record = session("c1", subs=(sub("a", sub_id=3),))
    first.apply(
        [
            UpsertSession(record),
            Enqueue((queued("c1", 1), queued("c1", 2))),
            SetRetained(retained("r", b"kept")),
        ]
    )
    assert msg_ids(first.fetch_queue("c1", 1, 30.0, 100.0)) == [1]
    first.close()
    second = make_backend()
    second.open()
    assert second.load_session("c1") == record
    assert second.retained(0.0) == [retained("r", b"kept")]
    assert msg_ids(second.fetch_queue("c1", 10, 30.0, 110.0)) == [2]  # 1 is still handed out
    assert msg_ids(second.fetch_queue("c1", 10, 30.0, 130.0)) == [1]
    second.apply([Enqueue((queued("c1", 3),))])
    assert msg_ids(second.fetch_queue("c1", 10, 30.0, 1000.0)) == [1, 2, 3]


def test_schema_version_after_migrations(make_backend: BackendFactory) -> None:
    backend = make_backend()
    backend.open()
    expected = 0 if backend.name == "memory" else load_migrations(backend.name)[-1].version
    assert backend.schema_version() == expected
    backend.close()
    again = make_backend()
    again.open()  # migrations already applied: nothing to do, no error
    assert again.schema_version() == expected


def test_closed_backend_refuses_calls(make_backend: BackendFactory) -> None:
    backend = make_backend()
    backend.open()
    backend.close()
    backend.close()  # twice is fine
    with pytest.raises(StoreError):
        backend.load_session("c1")
