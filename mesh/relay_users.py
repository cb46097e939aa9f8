"""The relay's side of users and ACL rules on the HTTP port: checks, hashing, and the store.

Why: users and ACL rules live in the store, shared by every node (`broker/ACCESS.md`); an
operator manages them through any node's HTTP API (`mesh/PROTOCOL.md`, "The HTTP API of a
node"), and the relay turns each request into one store-plane request (`auth`, `uput`, `udel`,
`aadd`, `adel`). It checks what the spec refuses before asking (so the operator gets a 400 that
names the problem) and hashes a new password here, in the HTTP thread, so that the password
never leaves it and only the hash travels to the store.

Must not: use the relay's own store socket (ZeroMQ sockets are not shared between threads: every
request opens a DEALER of its own, like `RelayView._stored_sessions`); import the broker (the
filter check is a local one, not the broker's topic module); answer a password hash (only
`admin_hash`, for the HTTP layer's credential check, returns one); wait for the store unbounded.

Invariants: every failure is an `ApiError`: 400 for a value the spec refuses (here, or the store's
`failed [reason]`), 503 when there is no store, it is unavailable or does not answer within
`STORE_TIMEOUT_S`, or answers something that is not the protocol's reply.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Final

import zmq

from mesh import envelope as env
from mesh.errors import EnvelopeError
from mesh.http import ApiError
from mesh.sockets import endpoint
from store.passwords import MAX_PASSWORD_BYTES, hash_password

if TYPE_CHECKING:
    from mesh.relay import RelaySettings

STORE_TIMEOUT_S: Final = 2.0
MAX_USERNAME_CHARS: Final = 256
MAX_TOPIC_BYTES: Final = 65535
ACCESS: Final = ("pub", "sub", "both", "deny")  # the HTTP spelling; the store's is upper case
RULE_USERS: Final = ("$anonymous", "*")  # rule users that are not user names
NO_STORE: Final = "users and ACL rules live in the store: this node has none (SessionStore.Type MEMORY)"

_req_ids = itertools.count(1)


# -- checks (pure) -------------------------------------------------------------------------------


def check_username(username: str) -> None:
    """400 unless `username` may name a user (PROTOCOL.md: the POST /api/users row)."""
    if not username:
        raise ApiError(400, "the user name is empty")
    if len(username) > MAX_USERNAME_CHARS:
        raise ApiError(400, f"the user name is over {MAX_USERNAME_CHARS} characters")
    if any(_is_control(c) for c in username):
        raise ApiError(400, "the user name holds a control character")
    if username == "*" or username.startswith("$"):
        raise ApiError(
            400, f"{username!r} cannot name a user ('*' and names starting with '$' are for rules)"
        )


def check_password(password: str) -> None:
    if not password:
        raise ApiError(400, "the password is empty")
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise ApiError(400, f"the password is over {MAX_PASSWORD_BYTES} bytes (more than MQTT can carry)")


def check_rule_user(user: str) -> None:
    """A rule's user: a user name, `$anonymous` or `*`."""
    if user not in RULE_USERS:
        check_username(user)


def check_filter(topic: str) -> None:
    """400 unless `topic` is a valid MQTT topic filter [MQTT-4.7.1], as a rule pattern.

    `%u` and `%c` (substituted per client) are plain text here."""
    if not topic:
        raise ApiError(400, "the topic filter is empty")  # [MQTT-4.7.3-1]
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        raise ApiError(400, f"the topic filter is over {MAX_TOPIC_BYTES} bytes")
    if "\x00" in topic:
        raise ApiError(400, "the topic filter holds a NUL character")  # [MQTT-4.7.3-2]
    levels = topic.split("/")
    for depth, level in enumerate(levels):
        if "#" in level and (level != "#" or depth != len(levels) - 1):
            # [MQTT-4.7.1-2]: '#' alone in its level, and the last level
            raise ApiError(400, f"{topic!r}: '#' must be a whole level, and the last one")
        if "+" in level and level != "+":
            raise ApiError(400, f"{topic!r}: '+' must be a whole level")  # [MQTT-4.7.1-3]


def parse_access(access: str) -> str:
    """The store's spelling (`PUB`, ...) of an access name (any case); 400 if unknown."""
    lowered = access.lower()
    if lowered not in ACCESS:
        raise ApiError(400, f"access must be one of {', '.join(ACCESS)}, not {access!r}")
    return lowered.upper()


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F


# -- the store ------------------------------------------------------------------------------------


class RelayUsers:
    """Mixed into `RelayView`: the users and ACL part of `mesh/http.py`'s NodeView."""

    settings: RelaySettings
    ctx: zmq.Context[zmq.Socket[bytes]]

    def users(self) -> list[dict[str, object]]:
        users, _rules = self._auth_table()
        return [{"username": name, "admin": admin} for name, _hash, admin in sorted(users)]

    def acl(self) -> list[dict[str, object]]:
        _users, rules = self._auth_table()
        return [
            {"id": rule_id, "user": user, "topic": topic, "access": access.lower()}
            for rule_id, user, topic, access in rules
        ]

    def admin_hash(self, username: str) -> str | None:
        if not self.settings.store:
            return None  # no store, no users: a Basic login is just wrong (401 or 403)
        users, _rules = self._auth_table()
        for name, password_hash, admin in users:
            if name == username and admin:
                return password_hash
        return None

    def has_admin(self) -> bool:
        if not self.settings.store:
            return False  # no store, no users: only the token can open the admin endpoints
        users, _rules = self._auth_table()
        return any(admin for _name, _hash, admin in users)

    def put_user(self, username: str, password: str | None, admin: bool | None) -> tuple[int, bool]:
        check_username(username)
        if password is not None:
            check_password(password)
        if not self.settings.store:
            raise ApiError(503, NO_STORE)
        password_hash = None if password is None else hash_password(password)
        version, created = self._ask_ok("uput", username, password_hash, admin)
        return version, bool(created)

    def delete_user(self, username: str) -> bool:
        check_username(username)
        _version, existed = self._ask_ok("udel", username)
        return bool(existed)

    def add_acl(self, user: str, topic: str, access: str) -> tuple[int, int]:
        check_rule_user(user)
        check_filter(topic)
        stored_access = parse_access(access)
        version, rule_id = self._ask_ok("aadd", user, topic, stored_access)
        if isinstance(rule_id, bool) or not isinstance(rule_id, int):
            raise ApiError(503, "the store answered a rule id that is not a number")
        return version, rule_id

    def delete_acl(self, rule_id: int) -> bool:
        _version, existed = self._ask_ok("adel", rule_id)
        return bool(existed)

    # -- plumbing ---------------------------------------------------------------------------------

    def _auth_table(self) -> tuple[list[tuple[str, str, bool]], list[tuple[int, str, str, str]]]:
        """The store's users (name, hash, admin) and rules (id, user, topic, ACCESS)."""
        control = self._ask("auth", expect="authtable")
        _version, users, rules = control.body
        try:
            assert isinstance(users, tuple | list) and isinstance(rules, tuple | list)
            user_rows = [(str(n), str(h), bool(a)) for n, h, a in users]
            rule_rows = [(int(i), str(u), str(t), str(a)) for i, u, t, a in rules]
        except (AssertionError, TypeError, ValueError):
            raise ApiError(503, "the store's auth table is malformed") from None
        return user_rows, rule_rows

    def _ask_ok(self, kind: str, *body: object) -> tuple[int, object]:
        """Send a change; the body of its `ok [version, value]` reply."""
        control = self._ask(kind, *body, expect="done")
        if (
            len(control.body) != 2
            or isinstance(control.body[0], bool)
            or not isinstance(control.body[0], int)
        ):
            raise ApiError(503, f"the store's answer to {kind!r} is not ok [version, value]")
        return control.body[0], control.body[1]

    def _ask(self, kind: str, *body: object, expect: str) -> env.Control:
        """One request to the store on a DEALER of this thread's own; `failed` becomes an ApiError."""
        if not self.settings.store:
            raise ApiError(503, NO_STORE)
        try:
            request = env.pack_control(kind, next(_req_ids), *body)
        except EnvelopeError as e:  # a relay older than the spec it is asked for
            raise ApiError(503, f"this node cannot ask the store for {kind!r}: {e}") from None
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(endpoint(self.settings.ipc_dir, "store.ctl"))
            dealer.send(request)
            if not dealer.poll(int(STORE_TIMEOUT_S * 1000)):
                raise ApiError(503, f"the store did not answer within {STORE_TIMEOUT_S:g} s")
            control = env.unpack_control(dealer.recv())
        except zmq.ZMQError as e:
            raise ApiError(503, f"cannot reach the store: {e}") from None
        except EnvelopeError as e:
            raise ApiError(503, f"the store's answer to {kind!r} is not the protocol's: {e}") from None
        finally:
            dealer.close(0)
        if control.kind == "failed":
            reason = str(control.body[0])
            if "unavailable" in reason:
                raise ApiError(503, f"the store is unavailable ({reason})")
            raise ApiError(400, reason)
        if control.kind != expect:
            raise ApiError(503, f"the store answered {kind!r} with {control.kind!r}, not {expect!r}")
        return control
