"""Users and ACL rules in every store backend (`store/backend.py`): memory, SQLite, PostgreSQL.

What is pinned: an empty store is version 0 with no users and rules; `put_user` creates (a hash
is needed) and changes (None keeps a field); users come back by name in code-point order, rules
by id, ids never reused; `delete_user` takes the rules of that user name with it and nothing
else; every change bumps the version by exactly one and returns it, a delete that found
nothing does not; bad input is refused with `StoreRecordError` and changes nothing; two backend
objects over the same storage (two nodes) see each other's changes through `auth_version` and
`load_auth`; on PostgreSQL, two nodes writing at once get distinct, gapless versions.
"""

from __future__ import annotations

import threading

import pytest

from store.backend import Backend, open_backend
from store.errors import StoreRecordError
from store.passwords import hash_password
from store.records import AclRecord, UserRecord
from tests.pg import PgDatabase
from tests.unit.store.backends import BackendFactory

H1 = hash_password("one", log2_n=10)  # the cheapest cost `is_hash` accepts: fast tests
H2 = hash_password("two", log2_n=10)


def test_an_empty_store(backend: Backend) -> None:
    assert backend.auth_version() == 0
    assert backend.load_auth() == (0, [], [])


def test_put_user_creates_then_changes_one_field_at_a_time(backend: Backend) -> None:
    assert backend.put_user("alice", H1, None) == (1, True)
    assert backend.load_auth() == (1, [UserRecord("alice", H1, False)], [])
    assert backend.put_user("alice", None, True) == (2, False)  # admin only: the hash stays
    assert backend.load_auth()[1] == [UserRecord("alice", H1, True)]
    assert backend.put_user("alice", H2, None) == (3, False)  # hash only: the flag stays
    assert backend.load_auth()[1] == [UserRecord("alice", H2, True)]
    assert backend.put_user("alice", H1, False) == (4, False)
    assert backend.put_user("alice", None, None) == (5, False)  # a write all the same
    assert backend.load_auth() == (5, [UserRecord("alice", H1, False)], [])
    assert backend.put_user("bob", H2, True) == (6, True)
    assert backend.auth_version() == 6


def test_creating_a_user_needs_a_hash(backend: Backend) -> None:
    with pytest.raises(StoreRecordError, match="needs a password hash"):
        backend.put_user("carol", None, True)
    assert backend.load_auth() == (0, [], [])


def test_users_by_name_in_code_point_order(backend: Backend) -> None:
    for name in ("zed", "ü", "Bob", "alice", "Ábel", "bob"):
        backend.put_user(name, H1, None)
    assert [u.username for u in backend.load_auth()[1]] == ["Bob", "alice", "bob", "zed", "Ábel", "ü"]


def test_rules_by_id_and_ids_never_reused(backend: Backend) -> None:
    v1, a = backend.add_acl("alice", "a/#", "PUB")
    v2, b = backend.add_acl("$anonymous", "public/+", "SUB")
    v3, c = backend.add_acl("*", "%u/#", "BOTH")
    assert (v1, v2, v3) == (1, 2, 3)
    assert a < b < c
    assert backend.delete_acl(c) == (4, True)
    v5, d = backend.add_acl("*", "#", "DENY")
    assert v5 == 5 and d > c  # the deleted last id does not come back
    assert backend.load_auth() == (
        5,
        [],
        [
            AclRecord(a, "alice", "a/#", "PUB"),
            AclRecord(b, "$anonymous", "public/+", "SUB"),
            AclRecord(d, "*", "#", "DENY"),
        ],
    )


def test_deleting_a_missing_rule_changes_nothing(backend: Backend) -> None:
    _, rule_id = backend.add_acl("alice", "t", "PUB")
    assert backend.delete_acl(rule_id + 1000) == (1, False)
    assert backend.delete_acl(rule_id) == (2, True)
    assert backend.delete_acl(rule_id) == (2, False)
    assert backend.auth_version() == 2


def test_delete_user_takes_its_rules_and_nothing_else(backend: Backend) -> None:
    backend.put_user("alice", H1, False)
    backend.put_user("bob", H2, False)
    _, a1 = backend.add_acl("alice", "a/#", "PUB")
    _, b1 = backend.add_acl("bob", "b/#", "SUB")
    _, a2 = backend.add_acl("alice", "x", "DENY")
    _, s1 = backend.add_acl("*", "%u/#", "BOTH")
    _, n1 = backend.add_acl("$anonymous", "alice", "SUB")  # a topic named alice is no user of it
    assert backend.auth_version() == 7
    assert backend.delete_user("alice") == (8, True)
    version, users, rules = backend.load_auth()
    assert version == 8
    assert users == [UserRecord("bob", H2, False)]
    assert [r.id for r in rules] == [b1, s1, n1]
    assert a1 not in [r.id for r in rules] and a2 not in [r.id for r in rules]
    assert backend.delete_user("alice") == (8, False)  # nothing left: no bump


def test_deleting_an_unknown_user_still_takes_rules_of_that_name(backend: Backend) -> None:
    backend.add_acl("ghost", "g/#", "PUB")  # rules may name users that do not exist (yet)
    assert backend.delete_user("ghost") == (2, False)
    assert backend.load_auth() == (2, [], [])


@pytest.mark.parametrize(
    ("username", "password_hash", "admin", "match"),
    [
        ("", H1, None, "empty"),
        ("*", H1, None, "reserved"),
        ("$anonymous", H1, None, "reserved"),
        ("$SYS", H1, None, "reserved"),
        ("x" * 257, H1, None, "longer than 256"),
        ("a\x00b", H1, None, "control character"),
        ("a\nb", H1, None, "control character"),
        ("a\x7fb", H1, None, "control character"),
        ("a\x85b", H1, None, "control character"),
        (7, H1, None, "must be str"),
        ("alice", "secret", None, "not a stored password hash"),
        ("alice", "$scrypt$ln=9,r=8,p=1$c2FsdA$aGFzaA", None, "not a stored password hash"),
        ("alice", b"bytes", None, "must be str or None"),
        ("alice", H1, 1, "admin must be bool"),
        ("alice", H1, "yes", "admin must be bool"),
    ],
    ids=lambda value: (
        value if isinstance(value, str) and not value.startswith("$scrypt") and len(value) < 40 else "-"
    ),
)
def test_bad_users_are_refused(
    backend: Backend, username: object, password_hash: object, admin: object, match: str
) -> None:
    with pytest.raises(StoreRecordError, match=match):
        backend.put_user(username, password_hash, admin)  # type: ignore[arg-type]
    assert backend.load_auth() == (0, [], [])


@pytest.mark.parametrize("username", ["", "*", "$anonymous", "a\x01", 3])
def test_delete_user_refuses_what_cannot_be_a_user(backend: Backend, username: object) -> None:
    backend.add_acl("*", "t", "PUB")
    with pytest.raises(StoreRecordError):
        backend.delete_user(username)  # type: ignore[arg-type]
    assert backend.load_auth()[0] == 1 and len(backend.load_auth()[2]) == 1


@pytest.mark.parametrize(
    ("user", "topic", "access", "match"),
    [
        ("", "t", "PUB", "empty"),
        ("$sys", "t", "PUB", "reserved"),
        ("**", "t", "PUB", None),  # a valid username, not the wildcard: accepted below
        ("alice", "", "PUB", "topic is empty"),
        ("alice", "a/#/b", "PUB", "'#' must be the whole last level"),
        ("alice", "a#", "PUB", "'#' must be the whole last level"),
        ("alice", "a/b#", "PUB", "'#' must be the whole last level"),
        ("alice", "a+/b", "PUB", r"'\+' must be a whole level"),
        ("alice", "a/+b", "PUB", r"'\+' must be a whole level"),
        ("alice", "a\x00b", "PUB", "NUL"),
        ("alice", "x" * 65536, "PUB", "longer than 65535 bytes"),
        ("alice", "é" * 32768, "PUB", "longer than 65535 bytes"),
        ("alice", "t", "pub", "access must be one of"),
        ("alice", "t", "READ", "access must be one of"),
        ("alice", "t", None, "access must be one of"),
        (None, "t", "PUB", "must be str"),
        ("alice", 5, "PUB", "must be str"),
    ],
)
def test_bad_rules_are_refused(
    backend: Backend, user: object, topic: object, access: object, match: str | None
) -> None:
    if match is None:
        assert backend.add_acl(user, topic, access)[0] == 1  # type: ignore[arg-type]
        return
    with pytest.raises(StoreRecordError, match=match):
        backend.add_acl(user, topic, access)  # type: ignore[arg-type]
    assert backend.load_auth() == (0, [], [])


@pytest.mark.parametrize("rule_id", ["1", 1.0, True, None, 2**63])
def test_delete_acl_refuses_what_is_no_id(backend: Backend, rule_id: object) -> None:
    with pytest.raises(StoreRecordError):
        backend.delete_acl(rule_id)  # type: ignore[arg-type]


def test_edges_that_are_accepted(backend: Backend) -> None:
    longest = "ñ" * 256
    assert backend.put_user(longest, H1, True) == (1, True)
    assert backend.put_user("a b/c+#", H1, None) == (2, True)  # the broker keeps such names out of rules
    backend.add_acl("*", "#", "SUB")
    backend.add_acl("$anonymous", "+/+/#", "DENY")
    backend.add_acl(longest, "%u/%c/+", "BOTH")
    backend.add_acl("alice", "$SYS/#", "SUB")
    backend.add_acl("alice", "/", "PUB")
    backend.add_acl("alice", "x" * 65535, "PUB")
    version, users, rules = backend.load_auth()
    assert version == 8
    assert users[1] == UserRecord(longest, H1, True)
    assert [r.topic for r in rules][:5] == ["#", "+/+/#", "%u/%c/+", "$SYS/#", "/"]
    assert rules[5].topic == "x" * 65535


def test_two_nodes_see_each_others_changes(make_backend: BackendFactory) -> None:
    a = make_backend()
    a.open()
    b = make_backend()
    b.open()
    assert a.put_user("alice", H1, False) == (1, True)
    assert b.auth_version() == 1
    assert b.load_auth() == (1, [UserRecord("alice", H1, False)], [])
    version, rule_id = b.add_acl("alice", "a/#", "PUB")
    assert version == 2
    assert a.auth_version() == 2
    assert a.load_auth() == (2, [UserRecord("alice", H1, False)], [AclRecord(rule_id, "alice", "a/#", "PUB")])
    assert a.delete_user("alice") == (3, True)
    assert b.load_auth() == (3, [], [])


def test_reopen_keeps_users_and_rules(make_backend: BackendFactory) -> None:
    first = make_backend()
    first.open()
    first.put_user("alice", H1, True)
    _, rule_id = first.add_acl("alice", "a/#", "BOTH")
    first.close()
    again = make_backend()
    again.open()
    if again.name == "memory":
        pytest.skip("nothing in memory outlives the process")
    assert again.load_auth() == (
        2,
        [UserRecord("alice", H1, True)],
        [AclRecord(rule_id, "alice", "a/#", "BOTH")],
    )


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_postgres_two_nodes_writing_at_once_get_distinct_gapless_versions(pg_db: PgDatabase) -> None:
    nodes = [open_backend("POSTGRES", postgres_url=pg_db.url, pool_size=2) for _ in range(2)]
    for node in nodes:
        node.open()
    got: list[list[tuple[int, int]]] = [[], []]
    errors: list[BaseException] = []

    def write(index: int) -> None:
        node = nodes[index]
        try:
            for n in range(15):
                got[index].append(node.add_acl("*", f"n{index}/{n}", "PUB"))
                node.put_user(f"u{index}", H1, n % 2 == 0)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=50)
        assert not errors
        assert not any(t.is_alive() for t in threads)
        versions = [v for per_node in got for v, _ in per_node]
        assert len(set(versions)) == 30  # each rule's version is its own
        for per_node in got:  # one node's versions and ids grow
            assert [v for v, _ in per_node] == sorted(v for v, _ in per_node)
            assert [i for _, i in per_node] == sorted(i for _, i in per_node)
        for node in nodes:
            version, users, rules = node.load_auth()
            assert version == 60 == node.auth_version()
            assert [u.username for u in users] == ["u0", "u1"]
            assert len(rules) == 30
            assert [r.id for r in rules] == sorted(r.id for r in rules)
    finally:
        for node in nodes:
            node.close()
