"""Users and ACL rules through the store process (`store/auth_service.py`, `store/service.py`).

What is pinned: the `AuthService` logic with a fake clock (the table is broadcast at start and
after every change; a failed broadcast is retried; in cluster mode the version is polled every
250 ms and a change made elsewhere is broadcast, outside cluster mode nothing is polled; a
failing database gives `failed ["store unavailable"]` and is logged at most once a minute);
and the real `StoreService` over ipc sockets on every backend: the `auth` snapshot, the replies
to `uput`, `udel`, `aadd`, `adel` (and `failed` for bad input), the `\\x00A` broadcast after each
change and at start, and, on PostgreSQL in cluster mode, a change written by a second backend
object (another node) reaching the SUB socket within a second.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from mesh import envelope as env
from mesh.sockets import endpoint
from store import wire
from store.auth_service import CH_AUTH, POLL_S, RETRY_S, AuthService
from store.backend import Backend, open_backend
from store.errors import StoreUnavailable
from store.memory import MemoryBackend
from store.passwords import hash_password
from store.records import AclRecord, UserRecord
from store.service import StoreService, StoreSettings
from tests.pg import PgDatabase

pytestmark = pytest.mark.timeout(30)

H1 = hash_password("one", log2_n=10)


# --- AuthService with a fake clock ------------------------------------------------------------------


class FlakyBackend(MemoryBackend):
    """The memory backend, unavailable while `down`; counts version polls."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.polls = 0

    def _fail(self) -> None:
        if self.down:
            raise StoreUnavailable("fake database: connection refused")

    def auth_version(self) -> int:
        self.polls += 1
        self._fail()
        return super().auth_version()

    def load_auth(self) -> tuple[int, list[UserRecord], list[AclRecord]]:
        self._fail()
        return super().load_auth()

    def put_user(self, username: str, password_hash: str | None, admin: bool | None) -> tuple[int, bool]:
        self._fail()
        return super().put_user(username, password_hash, admin)


Sent = list[tuple[int, tuple[UserRecord, ...], tuple[AclRecord, ...]]]


def make_service(*, cluster: bool) -> tuple[FlakyBackend, AuthService, Sent]:
    backend = FlakyBackend()
    backend.open()
    sent: Sent = []

    def publish(channel: bytes, frame: bytes) -> None:
        assert channel == CH_AUTH
        control = env.unpack_control(frame)
        assert (control.kind, control.req_id) == ("authtable", 0)
        sent.append(wire.authtable_from_wire(control.body))

    return backend, AuthService(backend, publish, cluster=cluster), sent


def test_broadcast_at_start_and_after_every_change() -> None:
    _, auth, sent = make_service(cluster=False)
    assert auth.broadcast(0.0)
    assert sent == [(0, (), ())]
    alice = UserRecord("alice", H1, False)
    assert auth.handle("uput", ("alice", H1, None), 0.1) == ("done", (1, True))
    assert sent[1:] == [(1, (alice,), ())]
    assert auth.handle("aadd", ("alice", "a/#", "PUB"), 0.2) == ("done", (2, 1))
    assert sent[2:] == [(2, (alice,), (AclRecord(1, "alice", "a/#", "PUB"),))]
    assert auth.handle("adel", (1,), 0.3) == ("done", (3, True))
    assert auth.handle("adel", (1,), 0.3) == ("done", (3, False))  # nothing changed: no broadcast
    assert auth.handle("udel", ("alice",), 0.4) == ("done", (4, True))
    assert auth.handle("udel", ("alice",), 0.4) == ("done", (4, False))
    assert [s[0] for s in sent] == [0, 1, 2, 3, 4]
    assert auth.handle("auth", (), 0.5) == ("authtable", (4, (), ()))
    assert len(sent) == 5  # a read is no change


def test_refused_input_is_failed_with_the_reason() -> None:
    _, auth, sent = make_service(cluster=False)
    kind, body = auth.handle("uput", ("bob", None, None), 0.0)
    assert kind == "failed" and "needs a password hash" in str(body[0])
    kind, body = auth.handle("aadd", ("alice", "a/#/b", "PUB"), 0.0)
    assert kind == "failed" and "'#' must be the whole last level" in str(body[0])
    kind, body = auth.handle("uput", (5, None, None), 0.0)
    assert kind == "failed" and "expected a string" in str(body[0])
    kind, body = auth.handle("adel", ("1",), 0.0)
    assert kind == "failed" and "expected an integer" in str(body[0])
    assert all(s[0] == 0 for s in sent)  # nothing changed


def test_outside_cluster_mode_nothing_is_polled() -> None:
    backend, auth, sent = make_service(cluster=False)
    auth.broadcast(0.0)
    assert auth.wait_s(0.0) is None
    backend.put_user("alice", H1, None)  # behind the service's back: never done in single-node mode
    for step in range(20):
        auth.tick(step * POLL_S)
    assert backend.polls == 0 and len(sent) == 1


def test_cluster_mode_polls_every_250ms_and_broadcasts_a_change_made_elsewhere() -> None:
    backend, auth, sent = make_service(cluster=True)
    auth.broadcast(0.0)
    auth.tick(0.0)
    assert backend.polls == 1
    auth.tick(POLL_S / 2)  # too early
    assert backend.polls == 1
    assert auth.wait_s(POLL_S / 2) == pytest.approx(POLL_S / 2)
    backend.put_user("alice", H1, None)  # another node's store process
    auth.tick(POLL_S)
    assert backend.polls == 2
    assert sent[-1][0] == 1
    auth.tick(2 * POLL_S)  # the same version: no second broadcast
    assert backend.polls == 3 and len(sent) == 2


def test_a_failing_database_is_failed_and_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    backend, auth, sent = make_service(cluster=True)
    backend.down = True
    with caplog.at_level(logging.WARNING, logger="store.auth"):
        assert not auth.broadcast(0.0)
        assert auth.handle("uput", ("alice", H1, None), 0.0) == ("failed", ("store unavailable",))
        now = 0.0
        for _ in range(100):  # 50 s of polling a dead database
            now += 0.5
            auth.tick(now)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert backend.polls == 0  # stale: it tries to send the table, at most once a second
        wait_s = auth.wait_s(now)
        assert wait_s is not None and wait_s <= RETRY_S
        now += 20.0
        auth.tick(now)
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert sent == []
    backend.down = False
    auth.tick(now + RETRY_S)  # recovered: the stale table goes out
    assert sent == [(0, (), ())]


def test_a_change_whose_broadcast_failed_is_sent_later() -> None:
    backend, auth, sent = make_service(cluster=False)
    auth.broadcast(0.0)
    real_load = backend.load_auth
    calls = 0

    def load_once_down() -> tuple[int, list[UserRecord], list[AclRecord]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreUnavailable("lost right after the commit")
        return real_load()

    backend.load_auth = load_once_down  # type: ignore[method-assign]
    assert auth.handle("uput", ("alice", H1, None), 1.0) == ("done", (1, True))
    assert len(sent) == 1 and auth.stale
    auth.tick(1.0 + RETRY_S)
    assert sent[-1][0] == 1 and not auth.stale


# --- StoreService over ipc sockets ------------------------------------------------------------------


class Client:
    """A worker's view: a DEALER on store.ctl and a SUB on store.pub's `\\x00A`."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], ipc_dir: str) -> None:
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, CH_AUTH)
        self.sub.connect(endpoint(ipc_dir, "store.pub"))
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(endpoint(ipc_dir, "store.ctl"))
        self.req_id = 0

    def ask(self, kind: str, *body: object) -> tuple[str, tuple[object, ...]]:
        self.req_id += 1
        self.dealer.send(env.pack_control(kind, self.req_id, *body))
        assert self.dealer.poll(5000), f"no answer to {kind}"
        reply = env.unpack_control(self.dealer.recv())
        assert reply.req_id == self.req_id
        return reply.kind, reply.body

    def table(self, version: int, timeout_s: float = 5.0) -> wire.AuthTable:
        """The first broadcast table of at least `version`, awaited until a deadline."""
        deadline = time.monotonic() + timeout_s
        while (left_s := deadline - time.monotonic()) > 0:
            if not self.sub.poll(max(int(left_s * 1000), 1)):
                break
            channel, frame = self.sub.recv_multipart()
            assert channel == CH_AUTH
            control = env.unpack_control(frame)
            assert control.kind == "authtable"
            table = wire.authtable_from_wire(control.body)
            if table[0] >= version:
                return table
        raise AssertionError(f"no authtable of version {version} within {timeout_s} s")

    def close(self) -> None:
        self.sub.close(0)
        self.dealer.close(0)


class Running:
    def __init__(self, backend: Backend, *, cluster: bool) -> None:
        self.ipc_dir = tempfile.mkdtemp(prefix="st-auth.", dir="/tmp")  # short: ipc paths are bounded
        settings = StoreSettings(ipc_dir=self.ipc_dir, node="n1", kind=backend.name.upper(), cluster=cluster)
        self.service = StoreService(settings, backend)
        self.client = Client(self.service.ctx, self.ipc_dir)
        # the SUB's subscription has reached the XPUB before the first broadcast: none is missed
        assert self.service.pub.poll(5000)
        assert self.service.pub.recv() == b"\x01" + CH_AUTH
        self.service.load()
        self.thread = threading.Thread(target=self.service.serve, name="store-under-test")
        self.thread.start()

    def stop(self) -> None:
        self.service.running = False
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        self.client.close()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


@pytest.fixture
def running(backend: Backend) -> Iterator[Running]:
    store = Running(backend, cluster=False)
    try:
        yield store
    finally:
        store.stop()


def test_requests_replies_and_broadcasts(running: Running) -> None:
    c = running.client
    assert c.table(0) == (0, (), ())  # at start
    assert c.ask("auth") == ("authtable", (0, (), ()))
    assert c.ask("uput", "alice", H1, None) == ("done", (1, True))
    assert c.table(1) == (1, (UserRecord("alice", H1, False),), ())
    assert c.ask("uput", "alice", None, True) == ("done", (2, False))
    assert c.table(2)[1] == (UserRecord("alice", H1, True),)
    kind, body = c.ask("uput", "bob", None, None)
    assert kind == "failed" and "needs a password hash" in str(body[0])
    kind, rule = c.ask("aadd", "alice", "a/#", "PUB")
    assert kind == "done" and rule[0] == 3
    rule_id = rule[1]
    assert isinstance(rule_id, int)
    assert c.table(3)[2] == (AclRecord(rule_id, "alice", "a/#", "PUB"),)
    kind, body = c.ask("aadd", "alice", "a/#", "read")
    assert kind == "failed" and "access must be one of" in str(body[0])
    assert c.ask("aadd", "*", "%u/#", "BOTH")[1][0] == 4
    assert c.table(4)[2][1].user == "*"
    assert c.ask("adel", rule_id) == ("done", (5, True))
    assert c.ask("adel", rule_id) == ("done", (5, False))
    assert c.ask("udel", "alice") == ("done", (6, True))
    assert c.ask("udel", "alice") == ("done", (6, False))
    version, users, rules = c.table(6)
    assert version == 6 and users == () and [r.topic for r in rules] == ["%u/#"]
    assert not c.sub.poll(100)  # the deletes that found nothing were not broadcast
    kind, reply = c.ask("auth")
    assert kind == "authtable" and wire.authtable_from_wire(reply) == (version, users, rules)
    assert not c.sub.poll(100)  # nor is a read


def test_the_table_is_broadcast_at_start(backend: Backend) -> None:
    backend.put_user("alice", H1, True)
    backend.add_acl("alice", "#", "BOTH")
    store = Running(backend, cluster=False)
    try:
        version, users, rules = store.client.table(2, timeout_s=5.0)
        assert version == 2 and users[0].admin and rules[0].topic == "#"
    finally:
        store.stop()


@pytest.mark.postgres
def test_cluster_polling_broadcasts_a_change_made_by_another_node(pg_db: PgDatabase) -> None:
    ours = open_backend("POSTGRES", postgres_url=pg_db.url, pool_size=2)
    ours.open()
    other = open_backend("POSTGRES", postgres_url=pg_db.url, pool_size=2)
    other.open()
    store = Running(ours, cluster=True)
    try:
        assert store.client.table(0) == (0, (), ())
        version, _ = other.put_user("alice", H1, False)
        changed_at = time.monotonic()
        table = store.client.table(version, timeout_s=1.0)
        assert time.monotonic() - changed_at < 1.0
        assert table == (1, (UserRecord("alice", H1, False),), ())
        version, rule_id = other.add_acl("alice", "a/#", "SUB")
        assert store.client.table(version, timeout_s=1.0)[2] == (AclRecord(rule_id, "alice", "a/#", "SUB"),)
        # our own change is broadcast once, not again by the poll
        assert store.client.ask("udel", "alice") == ("done", (3, True))
        assert store.client.table(3, timeout_s=1.0)[0] == 3
        assert not store.client.sub.poll(600)
    finally:
        store.stop()
        other.close()
