"""mesh.relay_users: the checks of users and rules, and the store requests behind the HTTP API.

Covers the pure checks (user names, passwords, rule users, MQTT filters [MQTT-4.7.1-2]
[MQTT-4.7.1-3] [MQTT-4.7.3-1] [MQTT-4.7.3-2], access names), and `RelayUsers` against a fake
store (a ROUTER on ipc:// in the test's directory, in a thread): the requests it sends
(`auth`, `uput` with a scrypt hash and never the password, `udel`, `aadd` with the store's
access spelling, `adel`), the answers it builds (no hash in `users()`, rules in the store's
order), `failed` as 400 or 503, no store / no answer / a wrong answer as 503.

Must not: open anything but ipc:// sockets under the test's tmp_path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq

import mesh.relay_users
from mesh import envelope as env
from mesh.http import ApiError
from mesh.relay_users import (
    RelayUsers,
    check_filter,
    check_password,
    check_rule_user,
    check_username,
    parse_access,
)
from store.passwords import hash_password, is_hash, verify_password

# -- checks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "a/#", "x" * 256, "Zoë", "with space", "a$"])
def test_good_user_names(name: str) -> None:
    check_username(name)
    check_rule_user(name)


@pytest.mark.parametrize(
    "name", ["", "x" * 257, "a\x00b", "tab\t", "del\x7f", "c1\x85", "*", "$anonymous", "$x"]
)
def test_bad_user_names_are_400(name: str) -> None:
    with pytest.raises(ApiError) as caught:
        check_username(name)
    assert caught.value.status == 400


def test_rule_users_may_also_be_anonymous_or_everyone() -> None:
    check_rule_user("$anonymous")
    check_rule_user("*")
    with pytest.raises(ApiError):
        check_rule_user("$other")


def test_passwords() -> None:
    check_password("x")
    check_password("é" * 32767)  # 65534 bytes
    for bad in ("", "é" * 32768):
        with pytest.raises(ApiError) as caught:
            check_password(bad)
        assert caught.value.status == 400


@pytest.mark.parametrize(
    "topic", ["#", "+", "a/b", "a/+/c", "a/#", "+/+/#", "/", "$SYS/#", "users/%u/#", "%c/in", "a//b"]
)
def test_valid_filters(topic: str) -> None:
    check_filter(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "",  # [MQTT-4.7.3-1]
        "a\x00b",  # [MQTT-4.7.3-2]
        "a/#/b",  # [MQTT-4.7.1-2] '#' last
        "a#",  # [MQTT-4.7.1-2] '#' a whole level
        "a/b#",
        "a+/b",  # [MQTT-4.7.1-3]
        "a/+b",
        "x" * 65536,
    ],
)
def test_invalid_filters_are_400(topic: str) -> None:
    with pytest.raises(ApiError) as caught:
        check_filter(topic)
    assert caught.value.status == 400


def test_access_names() -> None:
    assert [parse_access(a) for a in ("pub", "SUB", "Both", "deny")] == ["PUB", "SUB", "BOTH", "DENY"]
    with pytest.raises(ApiError, match="one of pub, sub, both, deny"):
        parse_access("read")


# -- against a fake store -----------------------------------------------------------------------------

Answer = Callable[[env.Control], bytes | None]  # a request -> the reply frame (None: no reply)


@dataclass(frozen=True)
class Settings:
    ipc_dir: str
    store: bool = True


@dataclass
class FakeStore:
    """A ROUTER on store.ctl answering with `answer`; records the requests."""

    router: zmq.Socket[bytes]
    answer: Answer
    seen: list[env.Control] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def serve(self) -> None:
        while not self.stop.is_set():
            if not self.router.poll(20):
                continue
            identity, frame = self.router.recv_multipart()
            control = env.unpack_control(frame)
            self.seen.append(control)
            reply = self.answer(control)
            if reply is not None:
                self.router.send_multipart((identity, reply))


class Users(RelayUsers):
    def __init__(self, ipc_dir: str, ctx: zmq.Context[zmq.Socket[bytes]], store: bool = True) -> None:
        self.settings = Settings(ipc_dir, store)  # type: ignore[assignment]
        self.ctx = ctx


HASH = hash_password("secret", log2_n=10)
TABLE = (
    7,
    (("zed", HASH, False), ("ann", HASH, True)),
    ((3, "*", "public/#", "SUB"), (1, "zed", "zed/#", "BOTH")),
)


def table_then_ok(control: env.Control) -> bytes:
    if control.kind == "auth":
        return env.pack_control("authtable", control.req_id, *TABLE)
    if control.kind == "uput":
        return env.pack_control("done", control.req_id, 8, True)
    if control.kind == "aadd":
        return env.pack_control("done", control.req_id, 9, 4)
    return env.pack_control("done", control.req_id, 10, control.body[0] != "ghost" and control.body[0] != 99)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def store(tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> Iterator[Callable[[Answer], FakeStore]]:
    made: list[tuple[FakeStore, threading.Thread]] = []

    def start(answer: Answer) -> FakeStore:
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(f"ipc://{tmp_path}/store.ctl")
        fake = FakeStore(router, answer)
        thread = threading.Thread(target=fake.serve, daemon=True)
        thread.start()
        made.append((fake, thread))
        return fake

    yield start
    for fake, thread in made:
        fake.stop.set()
        thread.join(5)
        fake.router.close(0)


def test_users_and_rules_come_from_the_auth_table(
    tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]], store: Callable[[Answer], FakeStore]
) -> None:
    fake = store(table_then_ok)
    users = Users(str(tmp_path), ctx)
    assert users.users() == [{"username": "ann", "admin": True}, {"username": "zed", "admin": False}]
    assert users.acl() == [
        {"id": 3, "user": "*", "topic": "public/#", "access": "sub"},
        {"id": 1, "user": "zed", "topic": "zed/#", "access": "both"},
    ]
    assert users.admin_hash("ann") == HASH
    assert users.admin_hash("zed") is None  # not an admin
    assert users.admin_hash("nobody") is None
    assert users.has_admin() is True
    assert {c.kind for c in fake.seen} == {"auth"}
    assert all(c.body == () for c in fake.seen)


def test_put_user_sends_a_hash_never_the_password(
    tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]], store: Callable[[Answer], FakeStore]
) -> None:
    fake = store(table_then_ok)
    users = Users(str(tmp_path), ctx)
    assert users.put_user("bob", "bobs pw", True) == (8, True)
    (request,) = fake.seen
    name, stored, admin = request.body
    assert (request.kind, name, admin) == ("uput", "bob", True)
    assert isinstance(stored, str) and is_hash(stored) and verify_password("bobs pw", stored)
    assert users.put_user("bob", None, False) == (8, True)
    assert fake.seen[-1].body == ("bob", None, False)


def test_deletes_and_rules(
    tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]], store: Callable[[Answer], FakeStore]
) -> None:
    fake = store(table_then_ok)
    users = Users(str(tmp_path), ctx)
    assert users.delete_user("bob") is True
    assert users.delete_user("ghost") is False
    assert users.add_acl("$anonymous", "status/+", "Pub") == (9, 4)
    assert users.delete_acl(1) is True
    assert users.delete_acl(99) is False
    assert [(c.kind, c.body) for c in fake.seen] == [
        ("udel", ("bob",)),
        ("udel", ("ghost",)),
        ("aadd", ("$anonymous", "status/+", "PUB")),
        ("adel", (1,)),
        ("adel", (99,)),
    ]


def test_bad_values_are_refused_before_the_store_is_asked(
    tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]], store: Callable[[Answer], FakeStore]
) -> None:
    fake = store(table_then_ok)
    users = Users(str(tmp_path), ctx)
    calls: tuple[Callable[[], object], ...] = (
        lambda: users.put_user("$bad", "pw", None),
        lambda: users.put_user("ok", "", None),
        lambda: users.add_acl("bob", "a/#/b", "pub"),
        lambda: users.add_acl("bob", "a/b", "write"),
        lambda: users.add_acl("", "a", "pub"),
    )
    for call in calls:
        with pytest.raises(ApiError) as caught:
            call()
        assert caught.value.status == 400
    assert fake.seen == []


@pytest.mark.parametrize(
    ("reason", "status"),
    [("creating user 'x' needs a password hash", 400), ("store unavailable", 503)],
)
def test_failed_is_400_or_503(
    tmp_path: Path,
    ctx: zmq.Context[zmq.Socket[bytes]],
    store: Callable[[Answer], FakeStore],
    reason: str,
    status: int,
) -> None:
    store(lambda c: env.pack_control("failed", c.req_id, reason))
    with pytest.raises(ApiError) as caught:
        Users(str(tmp_path), ctx).put_user("x", None, True)
    assert caught.value.status == status
    assert reason in caught.value.message


def test_no_answer_is_503_within_the_timeout(
    tmp_path: Path,
    ctx: zmq.Context[zmq.Socket[bytes]],
    store: Callable[[Answer], FakeStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mesh.relay_users, "STORE_TIMEOUT_S", 0.2)
    store(lambda _c: None)
    with pytest.raises(ApiError, match=r"did not answer within 0\.2 s") as caught:
        Users(str(tmp_path), ctx).users()
    assert caught.value.status == 503


def test_a_wrong_answer_is_503(
    tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]], store: Callable[[Answer], FakeStore]
) -> None:
    store(lambda c: env.pack_control("durable", c.req_id))
    users = Users(str(tmp_path), ctx)
    with pytest.raises(ApiError, match="not 'authtable'") as caught:
        users.acl()
    assert caught.value.status == 503


def test_without_a_store_users_are_503_and_basic_is_just_wrong(
    tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    users = Users(str(tmp_path), ctx, store=False)
    for call in (
        users.users,
        users.acl,
        lambda: users.put_user("x", "pw", None),
        lambda: users.delete_acl(1),
    ):
        with pytest.raises(ApiError, match=r"SessionStore\.Type MEMORY") as caught:
            call()
        assert caught.value.status == 503
    assert users.admin_hash("ann") is None
    assert users.has_admin() is False
