"""Authentication of a CONNECT and the rules a connected client gets (`broker/ACCESS.md`).

Why: between the checks of the CONNECT packet and the claim of its client id comes one question,
"who is this?", whose answer may take a password hash in a thread (`broker/authn.py`); the
CONNECT is held meanwhile, as it is while its session is claimed. The answer becomes the
session's `Access`, which the publish, subscribe and delivery paths ask. A new table of users and
rules (from the store) gives every session of the worker a fresh `Access`.

Must not: do IO or read the clock; say which of user name and password was wrong; keep a
password past the verification.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from broker.handlers.common import refuse_connect
from broker.protocol.connection import ConnectionState, ServerConnection
from broker.protocol.packets import Connect
from broker.protocol.reasons import Reason
from store.passwords import dummy_hash

if TYPE_CHECKING:
    from broker.acl import AuthTable
    from broker.core import BrokerCore

log = logging.getLogger("broker.handlers.auth")

# Called once the client is known (username None: anonymous).
Admit = Callable[[str | None, float], None]


def authenticate(core: BrokerCore, conn: ServerConnection, packet: Connect, now: float, admit: Admit) -> None:
    """Decide who the client is, then `admit(username, now)`, or refuse the CONNECT."""
    auth = core.auth_config
    if not auth.enabled:
        admit(packet.username, now)
        return
    if conn.tls_identity is not None:
        # TLS.UseSubjectAsUsername: the verified certificate authenticated the client
        admit(conn.tls_identity, now)
        return
    username = packet.username
    if username is None:
        if auth.allow_anonymous:
            admit(None, now)
            return
        core.counters.connections_not_authorized += 1
        refuse_connect(conn, Reason.NOT_AUTHORIZED, "anonymous clients are not allowed (Auth.AllowAnonymous)")
        return
    password = packet.password
    user = core.auth_table.users.get(username)
    if password is None:
        _bad_credentials(core, conn, username, "no password")
        return
    if user is not None and core.credentials.knows(username, user.password_hash, password):
        admit(username, now)
        return
    stored = user.password_hash if user is not None else dummy_hash()
    conn.held = []  # what the client sends meanwhile waits, in order

    def verified(ok: bool, now: float) -> None:
        if conn.link_lost or conn.closing or conn.state is ConnectionState.CLOSED:
            return  # gone while the hash was computed
        current = core.auth_table.users.get(username)
        if not ok or user is None or current is None or current.password_hash != stored:
            _bad_credentials(core, conn, username, "unknown user or wrong password")
            return
        core.credentials.remember(username, stored, password)
        admit(username, now)  # the claim that follows releases what was held

    core.verifier.verify(password, stored, now, verified)


def _bad_credentials(core: BrokerCore, conn: ServerConnection, username: str, why: str) -> None:
    core.counters.auth_failures += 1
    log.warning(
        "client %r from %s: authentication of user %r failed (%s)", conn.client_id, conn.peer, username, why
    )
    refuse_connect(conn, Reason.BAD_USER_NAME_OR_PASSWORD, "bad user name or password")


def apply_auth_table(core: BrokerCore, table: AuthTable) -> None:
    """New users and rules: every session of this worker gets its rights again."""
    old = core.auth_table
    core.auth_table = table
    core.credentials.forget_others({name: user.password_hash for name, user in table.users.items()})
    if not core.auth_config.enabled:
        return
    for session in core.sessions.values():
        access = session.access
        if access is not None:
            session.access = table.access_for(access.username, access.client_id)
    if old.version != table.version:
        log.info(
            "users and rules: version %d (%d users, %d rules)",
            table.version,
            len(table.users),
            len(table.rules),
        )
