"""What `meshctl user` and `meshctl acl` read from a node: users and ACL rules (`/api/users`,
`/api/acl`, mesh/PROTOCOL.md "The HTTP API of a node").

Why: the records and parsers of the access-control answers, apart from the cluster views of
`tools/meshctl_client.py` whose shape checks they share.

Must not: show a password or hash (the node never sends one); accept an answer of another shape
(a clear MeshctlError names the field).
"""

from __future__ import annotations

from dataclasses import dataclass

from tools.meshctl_client import (
    Json,
    Reply,
    _int,
    _list,
    _object,
    _opt_int,
    _Shape,
    _shape_error,
    _str,
)


@dataclass(frozen=True, slots=True)
class User:
    username: str
    admin: bool


@dataclass(frozen=True, slots=True)
class UserChange:
    """`POST /api/users`: the user, whether it was created (else changed), the auth version."""

    username: str
    created: bool
    version: int | None


@dataclass(frozen=True, slots=True)
class AclRule:
    rule_id: int
    user: str
    topic: str
    access: str


@dataclass(frozen=True, slots=True)
class AclAdded:
    rule_id: int
    version: int | None


def _bool(obj: dict[str, Json], key: str, what: str) -> bool:
    value = obj.get(key)
    if not isinstance(value, bool):
        raise _Shape(f"{what}: {key!r} is missing or not true/false")
    return value


def parse_users(reply: Reply) -> tuple[User, ...]:
    try:
        out = []
        for i, item in enumerate(_list(reply.body, "the users answer")):
            what = f"user {i + 1}"
            obj = _object(item, what)
            out.append(User(_str(obj, "username", what), _bool(obj, "admin", what)))
        return tuple(out)
    except _Shape as e:
        raise _shape_error(reply, e) from None


def parse_user_change(reply: Reply) -> UserChange:
    try:
        obj = _object(reply.body, "the user answer")
        what = "the user answer"
        return UserChange(
            _str(obj, "username", what), _bool(obj, "created", what), _opt_int(obj, "version", what)
        )
    except _Shape as e:
        raise _shape_error(reply, e) from None


def parse_acl(reply: Reply) -> tuple[AclRule, ...]:
    try:
        out = []
        for i, item in enumerate(_list(reply.body, "the ACL answer")):
            what = f"rule {i + 1}"
            obj = _object(item, what)
            out.append(
                AclRule(
                    _int(obj, "id", what),
                    _str(obj, "user", what),
                    _str(obj, "topic", what),
                    _str(obj, "access", what),
                )
            )
        return tuple(out)
    except _Shape as e:
        raise _shape_error(reply, e) from None


def parse_acl_added(reply: Reply) -> AclAdded:
    try:
        obj = _object(reply.body, "the rule answer")
        return AclAdded(_int(obj, "id", "the rule answer"), _opt_int(obj, "version", "the rule answer"))
    except _Shape as e:
        raise _shape_error(reply, e) from None
