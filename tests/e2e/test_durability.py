"""Nothing acknowledged is ever lost: a durable node killed with SIGKILL and restarted (issue 4).

The durability promise (DESIGN.md): a QoS 1/2 message that the broker acknowledged (PUBACK /
PUBREC) is not lost for a subscriber with a persistent session, online or offline, even if the
node is killed at once afterwards; retained messages and the wills of clients that were connected
at the crash survive too; a database outage delays or refuses (v5: reason code 0x80) what cannot
be made durable and loses nothing that was acknowledged.

Each test starts its own node (`tests.e2e.durability_helpers`) with an SQLite file or a fresh
PostgreSQL database (`tests.pg`), kills the whole process group, restarts it with the same store
and checks what clients see. The outage test runs its own PostgreSQL server, since it stops it.

Must not: wait on sleeps except where time passing is the subject (session expiry) or silence is
the assertion; kill anything but the test's own node and server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.protocol.packets import Publish, Subscription
from tests.e2e.clients import ClientFactory, TestClient
from tests.e2e.durability_helpers import (
    DurableNode,
    check_stream,
    postgres_store,
    publish_windowed,
    read_publishes,
    receive_numbered,
    sqlite_store,
    start_durable_node,
)
from tests.e2e.rawclient import RawClient, connected
from tests.e2e.workers_helpers import numbered
from tests.pg import (  # noqa: F401  (fixtures)
    PgDatabase,
    PgServer,
    PgUnavailable,
    pause_server,
    pg_db,
    pg_server,
    resume_server,
    start_server,
    stop_server,
)

pytestmark = [pytest.mark.meshmq_only, pytest.mark.timeout(180)]

MESSAGES = 10_000
UNSPECIFIED_ERROR = 0x80
NO_MATCHING_SUBSCRIBERS = 0x10
NodeFactory = Callable[..., DurableNode]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """The `SessionStore` section: an SQLite file in the test's directory, or a fresh database
    on the session's throwaway PostgreSQL server."""
    if request.param == "sqlite":
        return sqlite_store(tmp_path / "store.db")
    db: PgDatabase = request.getfixturevalue("pg_db")
    return postgres_store(db.url)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    """Start durable nodes for one test; stop them (and print their log) at teardown."""
    nodes: list[DurableNode] = []

    def make(store: dict[str, Any], config: dict[str, Any] | None = None) -> DurableNode:
        workdir = tmp_path / f"node{len(nodes)}"
        workdir.mkdir()
        cfg = {"MQTT": {"MaxQueuedMessages": 20_000}}
        cfg.update(config or {})
        node = start_durable_node(workdir, store, cfg)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        print(f"--- log of {node.broker.workdir} (last lines) ---\n{node.log_tail(40)}")
        node.close()


@pytest.fixture
def node(store: dict[str, Any], node_factory: NodeFactory) -> DurableNode:
    # `store` first: its database then outlives the node at teardown.
    return node_factory(store)


@pytest.fixture
def make(node: DurableNode) -> Iterator[ClientFactory]:
    with ClientFactory(node.broker) as factory:
        yield factory


def publisher(make: ClientFactory, client_id: str, version: int = 4, inflight: int = 100) -> TestClient:
    """A connected publisher with `inflight` QoS 1/2 messages in flight (paho's default is 20)."""
    client = make(client_id, version=version, connect=False)
    client._client.max_inflight_messages_set(inflight)
    assert client.connect().reason_code == 0
    return client


def persistent_v311(make: ClientFactory, client_id: str) -> TestClient:
    """A 3.1.1 client with Clean Session 0: its session outlives the connection [MQTT-3.1.2-4]."""
    return make(client_id, version=4, clean_start=False)


# -- 1. offline persistent subscriber ----------------------------------------------------------


def test_offline_subscriber_gets_every_acknowledged_message_after_sigkill(
    node: DurableNode, make: ClientFactory
) -> None:
    """10,000 QoS 1 messages acknowledged while a persistent (Clean Session 0) subscriber is
    offline, SIGKILL right after the last PUBACK, restart: the subscriber gets all of them, in
    order [MQTT-3.1.2-5] [MQTT-4.6.0-5]; duplicates would be allowed (counted), losses are not."""
    sub = persistent_v311(make, "d-offline")
    assert sub.subscribe("dur/offline", 1) == [1]
    sub.disconnect()
    pub = publisher(make, "d-offline-pub")
    codes = publish_windowed(pub, "dur/offline", numbered(MESSAGES))
    assert codes == [0] * MESSAGES
    node.crash()  # at once after the last PUBACK: nothing can have been flushed afterwards
    pub.close_abruptly()
    node.restart()

    again = persistent_v311(make, "d-offline")
    assert again.connack.session_present is True
    got = receive_numbered(again, range(MESSAGES))
    check = check_stream(got, range(MESSAGES))
    print("offline subscriber after SIGKILL:", check.summary())
    assert not check.missing, check.summary()
    assert not check.out_of_order, check.summary()
    assert not check.unexpected, check.summary()


# -- 2. online subscriber that stops acknowledging ---------------------------------------------


def test_online_subscriber_gets_every_unacknowledged_message_after_sigkill(
    node: DurableNode, make: ClientFactory
) -> None:
    """A persistent subscriber online during the publishing acknowledges the first half only;
    SIGKILL, restart, reconnect: every message it did not acknowledge arrives
    [MQTT-4.4.0-1] (resend of unacknowledged PUBLISH) and the queue follows, in order."""
    half = MESSAGES // 2
    sub = connected(node.broker, "d-online", version=4, clean_start=False)
    assert sub.subscribe(Subscription("dur/online", 1)).reason_codes == (1,)
    pub = publisher(make, "d-online-pub")

    # First half: read and acknowledge each message as it comes (the broker keeps at most
    # MaxInflight unacknowledged, the rest waits in the session's queue meanwhile).
    assert publish_windowed(pub, "dur/online", numbered(half)) == [0] * half
    before: list[int] = []
    deadline = time.monotonic() + 60
    while len(before) < half:
        (p,) = read_publishes(sub, 1, timeout_s=max(0.001, deadline - time.monotonic()))
        before.append(int(p.payload))
        sub.ack(p)
    assert before == list(range(half))
    # Second half: received up to the in-flight window, never acknowledged.
    assert publish_windowed(pub, "dur/online", numbered(MESSAGES - half, half)) == [0] * (MESSAGES - half)
    unacked = [int(p.payload) for p in read_publishes(sub, 10, timeout_s=10)]
    assert unacked[0] == half
    node.crash()
    sub.close()
    pub.close_abruptly()
    node.restart()

    again = RawClient(node.broker, version=4)
    connack = again.connect("d-online", clean_start=False)
    assert connack.reason_code == 0 and connack.session_present is True
    after: list[int] = []
    deadline = time.monotonic() + 60
    want = set(range(half, MESSAGES))
    while want and time.monotonic() < deadline:
        try:
            packet = again.recv_packet(max(0.001, deadline - time.monotonic()))
        except TimeoutError:
            break
        assert isinstance(packet, Publish), f"expected PUBLISH, got {packet!r}"
        n = int(packet.payload)
        after.append(n)
        want.discard(n)
        again.ack(packet)
    extra = again.drain(0.5, accept=lambda q: isinstance(q, Publish))
    after += [int(q.payload) for q in extra if isinstance(q, Publish)]
    again.close()
    check = check_stream(after, range(half, MESSAGES))
    print("online subscriber after SIGKILL:", check.summary())
    assert not check.missing, check.summary()
    assert not check.out_of_order, check.summary()
    # Acknowledged messages may come again (their acks may not have reached the database
    # before the kill), but nothing that was never published.
    assert all(n < half for n in check.unexpected), check.summary()


def test_publisher_with_a_wide_window_is_never_stalled(node: DurableNode, make: ClientFactory) -> None:
    """A 3.1.1 publisher keeps 1,000 QoS 1 messages in flight (3.1.1 has no Receive Maximum)
    to a persistent subscriber: every PUBLISH is acknowledged [MQTT-4.3.2-2] and delivered in
    order, without the publisher having to send anything else to move the broker on."""
    sub = persistent_v311(make, "d-wide-sub")
    assert sub.subscribe("dur/wide", 1) == [1]
    pub = publisher(make, "d-wide-pub", inflight=1000)
    total = 20_000
    assert publish_windowed(pub, "dur/wide", numbered(total), window=total, timeout_s=30) == [0] * total
    got = receive_numbered(sub, range(total), timeout_s=30)
    check = check_stream(got, range(total))
    assert not check.missing and not check.out_of_order, check.summary()


# -- 3. retained messages ----------------------------------------------------------------------


def test_retained_messages_survive_sigkill(node: DurableNode, make: ClientFactory) -> None:
    """50 retained messages set with QoS 1 (one overwritten) and one cleared, SIGKILL, restart:
    a new subscriber gets exactly the 50 latest values [MQTT-3.3.1-5], the cleared topic
    stays cleared [MQTT-3.3.1-6, -7]."""
    pub = publisher(make, "d-retain-pub")
    assert pub.publish("ret/0", b"old", qos=1, retain=True) in (0, NO_MATCHING_SUBSCRIBERS)
    for i in range(50):
        assert pub.publish(f"ret/{i}", f"v{i}".encode(), qos=1, retain=True) in (0, NO_MATCHING_SUBSCRIBERS)
    assert pub.publish("ret/gone", b"soon cleared", qos=1, retain=True) in (0, NO_MATCHING_SUBSCRIBERS)
    assert pub.publish("ret/gone", b"", qos=1, retain=True) in (0, NO_MATCHING_SUBSCRIBERS)
    node.crash()
    pub.close_abruptly()
    node.restart()

    sub = make("d-retain-sub", version=4)
    sub.subscribe("ret/#", 1)
    got = sub.drain(quiet_s=1.0)
    assert all(m.retain for m in got), [m.topic for m in got if not m.retain]
    values = {m.topic: m.payload for m in got}
    assert len(got) == 50, f"{len(got)} retained messages: {sorted(values)}"
    assert values == {f"ret/{i}": f"v{i}".encode() for i in range(50)}
    assert "ret/gone" not in values


# -- 4. wills of clients connected at the crash ------------------------------------------------


def _will(topic: str, payload: bytes) -> dict[str, Any]:
    return {"topic": topic, "payload": payload, "qos": 1, "retain": False}


def test_wills_of_connected_clients_published_after_sigkill(node: DurableNode, make: ClientFactory) -> None:
    """Clients with persistent sessions and QoS 1 wills are connected when the node is killed:
    once it is back, their wills are published [MQTT-3.1.2-8] (the connection ended without
    DISCONNECT) and reach a persistent subscriber that was subscribed before the crash — and
    only once: a second crash does not publish them again."""
    watcher = persistent_v311(make, "d-will-watch")
    assert watcher.subscribe("will/#", 1) == [1]
    watcher.disconnect()
    make("d-will-v4", version=4, clean_start=False, will=_will("will/v4", b"v4 gone"))
    make("d-will-v5", version=5, clean_start=False, session_expiry_s=300, will=_will("will/v5", b"v5 gone"))
    # CONNACK does not wait for the session (and its will) to be committed. A QoS 1 message to the
    # persistent watcher is acknowledged only after a commit that holds every earlier write of
    # this worker (the store applies a worker's writes in order), so once it is acknowledged the
    # two wills are in the database: the kill below is deterministic.
    barrier = publisher(make, "d-will-barrier")
    assert barrier.publish("will/barrier", b"b", qos=1) == 0
    node.crash()
    node.restart()

    again = persistent_v311(make, "d-will-watch")
    assert again.connack.session_present is True
    got = again.expect(3, timeout_s=10)
    assert sorted((m.topic, m.payload, m.qos) for m in got) == [
        ("will/barrier", b"b", 1),
        ("will/v4", b"v4 gone", 1),
        ("will/v5", b"v5 gone", 1),
    ]
    again.disconnect()
    # Its acknowledgements are committed once a later QoS 1 message to it is (same argument):
    # what it gets after the next crash can then only be a will published a second time.
    assert publisher(make, "d-will-barrier-2").publish("will/barrier", b"b2", qos=1) == 0

    node.crash()
    node.restart()
    third = persistent_v311(make, "d-will-watch")
    assert [(m.topic, m.payload) for m in third.drain(quiet_s=1.0)] == [("will/barrier", b"b2")]


def test_will_of_clean_session_client_after_sigkill(node: DurableNode, make: ClientFactory) -> None:
    """A client without a persistent session (Clean Session 1) but with a will is connected when
    the node is killed: its will is published after the restart all the same [MQTT-3.1.2-8]
    (the store keeps a session with a will for that reason alone), and its session is not
    resumed (Session Present 0) [MQTT-3.1.2-6]."""
    watcher = persistent_v311(make, "d-will-watch2")
    assert watcher.subscribe("will2/#", 1) == [1]
    watcher.disconnect()
    make("d-will-clean", version=4, clean_start=True, will=_will("will2/clean", b"clean gone"))
    barrier = publisher(make, "d-will-barrier2")
    assert barrier.publish("will2/barrier", b"b", qos=1) == 0  # see the test above
    node.crash()
    node.restart()
    again = persistent_v311(make, "d-will-watch2")
    got = [(m.topic, m.payload, m.qos) for m in again.drain(quiet_s=1.0)]
    assert sorted(got) == [("will2/barrier", b"b", 1), ("will2/clean", b"clean gone", 1)]
    back = make("d-will-clean", version=4, clean_start=True)
    assert back.connack.session_present is False


# -- 5. PostgreSQL outage ------------------------------------------------------------------------


@pytest.fixture
def own_pg() -> Iterator[PgServer]:
    """A PostgreSQL server for this test alone: the test stops and starts it."""
    try:
        server = start_server()
    except PgUnavailable as exc:
        pytest.skip(f"no throwaway PostgreSQL: {exc}")
    try:
        yield server
    finally:
        stop_server(server)


class _Background:
    """Publish numbered QoS 1 messages from a paho client on a thread, a few at a time, and
    record each one's reason code as its slice completes."""

    def __init__(
        self, client: TestClient, topic: str, numbers: range, prefix: str, slice_msgs: int = 5
    ) -> None:
        self.client, self.topic, self.numbers, self.prefix = client, topic, numbers, prefix
        self.slice_msgs = slice_msgs
        self.codes: dict[int, int] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for start in range(self.numbers.start, self.numbers.stop, self.slice_msgs):
                chunk = range(start, min(start + self.slice_msgs, self.numbers.stop))
                payloads = [f"{self.prefix}{n}".encode() for n in chunk]
                codes = self.client.publish_many(self.topic, payloads, qos=1, timeout_s=OUTAGE_LIMIT_S + 30)
                self.codes.update(zip(chunk, codes, strict=True))
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def start(self) -> _Background:
        self.thread.start()
        return self

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"{self.prefix}: publishing still running after {timeout_s}s"
        assert self.error is None, f"{self.prefix}: {self.error}"


OUTAGE_LIMIT_S = 8.0  # the longest the database stays down waiting for a v5 refusal (refused after ~1 s)
MIN_OUTAGE_S = 3.0  # and the shortest: 3.1.1 acknowledgements must wait at least this long


@pytest.mark.postgres
def test_postgres_outage_refuses_or_delays_and_loses_nothing(
    own_pg: PgServer, node_factory: NodeFactory
) -> None:
    """PostgreSQL stops in the middle of a QoS 1 stream to a persistent subscriber: 5.0
    publishers get PUBACK 0x80 for what could not be made durable [MQTT-3.4.2 reason codes],
    3.1.1 publishers' acks wait (3.1.1 has no way to refuse) [DESIGN.md, Store]; the log says
    the database is unavailable, then back; once it is back the stream resumes by itself and
    every message acknowledged with 0x00 arrives, in order per publisher."""
    with own_pg.connect() as conn:
        conn.execute("CREATE DATABASE outage")
    node = node_factory(postgres_store(own_pg.url("outage")))
    with ClientFactory(node.broker) as make:
        sub = persistent_v311(make, "d-pg-sub")
        assert sub.subscribe("pg/#", 1) == [1]
        v5 = publisher(make, "d-pg-v5", version=5, inflight=20)
        v4 = publisher(make, "d-pg-v4", version=4, inflight=20)
        assert publish_windowed(v5, "pg/v5", [f"a{n}".encode() for n in range(500)]) == [0] * 500
        assert publish_windowed(v4, "pg/v4", [f"b{n}".encode() for n in range(500)]) == [0] * 500

        log_mark = len(node.log())
        pause_server(own_pg)
        outage_started = time.monotonic()
        try:
            refused = _Background(v5, "pg/v5", range(500, 540), "a").start()
            delayed = _Background(v4, "pg/v4", range(500, 520), "b").start()
            node.wait_log(r"database unavailable", after=log_mark)
            deadline = outage_started + OUTAGE_LIMIT_S
            while not refused.codes and refused.error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            first_refusal_s = time.monotonic() - outage_started
            time.sleep(max(0.0, outage_started + MIN_OUTAGE_S - time.monotonic()))  # time is the subject
            during = dict(refused.codes)
            acked_v4_during = dict(delayed.codes)
        finally:
            resume_server(own_pg)
        print(f"outage: first v5 acknowledgement {first_refusal_s:.1f}s after the database stopped: {during}")
        assert during, f"no v5 acknowledgement within {OUTAGE_LIMIT_S}s of the outage"
        assert set(during.values()) == {UNSPECIFIED_ERROR}, during  # nothing can be durable now
        assert acked_v4_during == {}, f"3.1.1 acks during the outage: {acked_v4_during}"

        refused.join(OUTAGE_LIMIT_S + 40)
        delayed.join(OUTAGE_LIMIT_S + 40)
        node.wait_log(r"database back|recovered", timeout_s=30, after=log_mark)
        assert set(delayed.codes.values()) == {0}, delayed.codes
        assert set(refused.codes.values()) <= {0, UNSPECIFIED_ERROR}, refused.codes

        # The stream resumes by itself.
        assert publish_windowed(v5, "pg/v5", [f"a{n}".encode() for n in range(540, 1040)]) == [0] * 500

        acked = {f"a{n}" for n in range(500)} | {f"a{n}" for n in range(540, 1040)}
        acked |= {f"a{n}" for n, c in refused.codes.items() if c == 0}
        acked |= {f"b{n}" for n in range(520)}
        got: list[str] = []
        deadline = time.monotonic() + 60
        while not acked <= set(got) and time.monotonic() < deadline:
            got += [m.payload.decode() for m in sub.drain(quiet_s=0.5)]
        missing = sorted(acked - set(got))
        refused_delivered = [n for n, c in refused.codes.items() if c == UNSPECIFIED_ERROR and f"a{n}" in got]
        print(
            f"outage: {len(got)} deliveries, {len(missing)} missing, {len(got) - len(set(got))} duplicates, "
            f"{sum(c == UNSPECIFIED_ERROR for c in refused.codes.values())} refused, "
            f"{len(refused_delivered)} refused but delivered"
        )
        assert not missing, f"{len(missing)} acknowledged messages lost: {missing[:20]}"
        assert not refused_delivered, f"refused with 0x80 yet delivered: {refused_delivered[:20]}"
        for prefix in ("a", "b"):
            firsts = [int(p[1:]) for p in dict.fromkeys(got) if p.startswith(prefix)]
            assert firsts == sorted(firsts), f"{prefix}: out of order"


# -- 6. session expiry across a restart --------------------------------------------------------


def _v5_session(make: ClientFactory, client_id: str, expiry_s: int) -> TestClient:
    return make(client_id, version=5, clean_start=False, session_expiry_s=expiry_s)


def test_session_expires_across_restart(node: DurableNode, make: ClientFactory) -> None:
    """A v5 session with Session Expiry Interval 2 s ends 2 s after its disconnect even though
    the node was killed and restarted meanwhile [MQTT-3.1.2-23]: the reconnect gets Session
    Present 0 [MQTT-3.2.2-2]. A longer-lived session of the same kind is still there."""
    short = _v5_session(make, "d-exp-short", 2)
    short.subscribe("exp/short", 1)
    long = _v5_session(make, "d-exp-long", 300)
    long.subscribe("exp/long", 1)
    short.disconnect()
    long.disconnect()
    disconnected_at = time.monotonic()
    node.crash()
    mark = len(node.log())  # (before the restart: the store may expire it before a worker listens)
    node.restart()
    node.wait_log(r"offline session\(s\) expired", timeout_s=10, after=mark)
    assert time.monotonic() - disconnected_at >= 2.0

    again = _v5_session(make, "d-exp-short", 2)
    assert again.connack.session_present is False
    kept = _v5_session(make, "d-exp-long", 300)
    assert kept.connack.session_present is True


def test_session_that_expired_while_the_node_was_down_is_gone(node: DurableNode, make: ClientFactory) -> None:
    """The session's 2 s run out while the node is down; the first CONNECT after the restart,
    sent at once, already gets Session Present 0 [MQTT-3.1.2-23] and no queued message."""
    short = _v5_session(make, "d-exp-down", 2)
    short.subscribe("exp/down", 1)
    short.disconnect()
    pub = publisher(make, "d-exp-pub", version=5)
    pub.publish("exp/down", b"queued", qos=1)
    disconnected_at = time.monotonic()
    node.crash()
    pub.close_abruptly()
    time.sleep(max(0.0, disconnected_at + 2.5 - time.monotonic()))  # time passing is the subject
    node.restart()

    again = _v5_session(make, "d-exp-down", 2)
    assert again.connack.session_present is False
    again.expect_none(0.5)


def test_session_of_client_connected_at_crash_survives(node: DurableNode, make: ClientFactory) -> None:
    """A v5 session (expiry 300 s) whose client was connected when the node was killed is
    resumed after the restart: Session Present 1, its subscription still delivers."""
    c = _v5_session(make, "d-exp-online", 300)
    c.subscribe("exp/online", 1)
    node.crash()
    c.close_abruptly()
    node.restart()
    again = _v5_session(make, "d-exp-online", 300)
    assert again.connack.session_present is True
    pub = publisher(make, "d-exp-online-pub", version=5)
    assert pub.publish("exp/online", b"still here", qos=1) == 0
    m = again.expect_one()
    assert (m.topic, m.payload) == ("exp/online", b"still here")
