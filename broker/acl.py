"""Who may publish, subscribe and read what: the users-and-rules table and one client's rights.

Why: authorisation is decided on the hot path (every PUBLISH of a client, every delivery to one),
so the rules that apply to a client are selected and substituted once, when it connects or when
the table changes, into an `Access` that answers from a per-topic cache. The semantics are those
of `broker/ACCESS.md` ("Authorisation"): first applicable rule in order decides, `deny` refuses,
subscriptions must be covered by an allowing rule, `$` topics never fall back to "allow".

Must not: do IO, read the clock, or verify passwords (`broker/authn.py`); let a username or client
id widen a rule (a substitution that would bring `/`, `+` or `#` into a pattern drops the rule
for that client).

Invariants:
- An `Access` never changes its answers while it lives; a new table gives every session a new
  `Access` (`AuthTable.access_for`), so caches never outlive the rules they were computed from.
- `may_subscribe(F)` allows only if some rule allows every topic F can match, or no rule decides
  and `AclNoMatch` is allow (not for `$` filters); delivery (`may_read`) is checked per message
  anyway, so a rule that denies part of F still holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

ANONYMOUS: Final = "$anonymous"
EVERYONE: Final = "*"
CACHE_MAX: Final = 4096  # topics remembered per client before the cache starts over

PUB: Final = "PUB"
SUB: Final = "SUB"
BOTH: Final = "BOTH"
DENY: Final = "DENY"

_WRITE: Final = frozenset({PUB, BOTH, DENY})
_READ: Final = frozenset({SUB, BOTH, DENY})
_UNSAFE: Final = ("/", "+", "#")


@dataclass(frozen=True, slots=True)
class Rule:
    user: str  # a username, $anonymous, or * (every client)
    topic: str  # an MQTT filter, with %u and %c
    access: str  # PUB | SUB | BOTH | DENY
    rule_id: int = 0  # the store's id (0: a rule of the config file)


@dataclass(frozen=True, slots=True)
class User:
    password_hash: str
    admin: bool


# A compiled rule: the pattern's levels and whether it denies.
_Compiled = tuple[tuple[str, ...], bool]


def _substitute(topic: str, username: str | None, client_id: str) -> str | None:
    """The rule's pattern for this client, or None when the rule cannot apply to it."""
    if "%" not in topic:
        return topic
    if "%u" in topic:
        if username is None or not username or any(c in username for c in _UNSAFE):
            return None
        topic = topic.replace("%u", username)
    if "%c" in topic:
        if not client_id or any(c in client_id for c in _UNSAFE):
            return None
        topic = topic.replace("%c", client_id)
    return topic


def matches(pattern: tuple[str, ...], topic: tuple[str, ...]) -> bool:
    """MQTT matching of a topic name's levels against a filter's [MQTT-4.7]."""
    if topic and topic[0].startswith("$") and pattern and pattern[0] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    n = len(topic)
    for i, level in enumerate(pattern):
        if level == "#":
            return True
        if i >= n:
            return False
        if level != "+" and level != topic[i]:
            return False
    return len(pattern) == n


def covers(pattern: tuple[str, ...], topic_filter: tuple[str, ...]) -> bool:
    """Whether every topic that `topic_filter` matches is matched by `pattern` too."""
    if topic_filter and topic_filter[0].startswith("$") and pattern and pattern[0] in ("+", "#"):
        return False
    n = len(topic_filter)
    for i, level in enumerate(pattern):
        if level == "#":
            return True
        if i >= n:
            return False
        wanted = topic_filter[i]
        if wanted == "#":
            return False
        if level != "+" and level != wanted:
            return False  # a literal covers only the same literal, never a wildcard
    return len(pattern) == n


class Access:
    """The rights of one connected client, from the rules that apply to it."""

    __slots__ = (
        "_read",
        "_read_cache",
        "_write",
        "_write_cache",
        "admin",
        "client_id",
        "denials",
        "no_match_allow",
        "username",
    )

    def __init__(
        self,
        username: str | None,
        client_id: str,
        admin: bool,
        rules: Iterable[Rule],
        no_match_allow: bool,
    ) -> None:
        self.username = username
        self.client_id = client_id
        self.admin = admin
        self.no_match_allow = no_match_allow
        self.denials = 0  # refusals so far (logs are rate limited by it)
        write: list[_Compiled] = []
        read: list[_Compiled] = []
        for rule in rules:
            if not _applies(rule.user, username):
                continue
            pattern = _substitute(rule.topic, username, client_id)
            if pattern is None:
                continue
            compiled = (tuple(pattern.split("/")), rule.access == DENY)
            if rule.access in _WRITE:
                write.append(compiled)
            if rule.access in _READ:
                read.append(compiled)
        self._write = tuple(write)
        self._read = tuple(read)
        self._write_cache: dict[str, bool] = {}
        self._read_cache: dict[str, bool] = {}

    def may_publish(self, topic: str) -> bool:
        if self.admin:
            return True
        cache = self._write_cache
        known = cache.get(topic)
        if known is None:
            known = self._decide(self._write, topic)
            if len(cache) >= CACHE_MAX:
                cache.clear()
            cache[topic] = known
        return known

    def may_read(self, topic: str) -> bool:
        """A delivery of a message on `topic` to this client."""
        if self.admin:
            return True
        cache = self._read_cache
        known = cache.get(topic)
        if known is None:
            known = self._decide(self._read, topic)
            if len(cache) >= CACHE_MAX:
                cache.clear()
            cache[topic] = known
        return known

    def may_subscribe(self, topic_filter: str) -> bool:
        """A subscription to `topic_filter` (without any `$share/group/` prefix)."""
        if self.admin:
            return True
        levels = tuple(topic_filter.split("/"))
        for pattern, deny in self._read:
            if covers(pattern, levels):
                return not deny
        return self.no_match_allow and not topic_filter.startswith("$")

    def _decide(self, rules: tuple[_Compiled, ...], topic: str) -> bool:
        levels = tuple(topic.split("/"))
        for pattern, deny in rules:
            if matches(pattern, levels):
                return not deny
        return self.no_match_allow and not topic.startswith("$")

    def __repr__(self) -> str:
        who = self.username if self.username is not None else ANONYMOUS
        return f"Access({who!r}, admin={self.admin}, write={len(self._write)}, read={len(self._read)})"


def _applies(rule_user: str, username: str | None) -> bool:
    if rule_user == EVERYONE:
        return True
    if username is None:
        return rule_user == ANONYMOUS
    return rule_user == username


@dataclass(frozen=True, slots=True)
class AuthTable:
    """Users and rules as the store last sent them, followed by the config file's rules."""

    version: int = -1  # -1: nothing from the store yet
    users: Mapping[str, User] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    no_match_allow: bool = False

    def access_for(self, username: str | None, client_id: str) -> Access:
        user = self.users.get(username) if username is not None else None
        return Access(username, client_id, user is not None and user.admin, self.rules, self.no_match_allow)


def table_from_wire(
    version: int,
    users: Iterable[tuple[str, str, bool]],
    rules: Iterable[tuple[int, str, str, str]],
    config_rules: Iterable[Rule],
    no_match_allow: bool,
) -> AuthTable:
    """The `authtable` of the store plane (mesh/PROTOCOL.md) plus the config's `Auth.Acl`."""
    return AuthTable(
        version,
        {str(name): User(str(password_hash), bool(admin)) for name, password_hash, admin in users},
        tuple(
            Rule(str(user), str(topic), str(access).upper(), int(rule_id))
            for rule_id, user, topic, access in rules
        )
        + tuple(config_rules),
        no_match_allow,
    )
