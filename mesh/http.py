"""The node's HTTP port: health for load balancers, Prometheus metrics, and the admin API.

Why: a load balancer must know whether to send a node traffic (`GET /health`, 200 or 503),
Prometheus scrapes `/metrics`, and `meshctl` reads members, routes, sessions and retained
messages, asks for pings and drains, and manages the store's users and ACL rules
(`mesh/PROTOCOL.md`, "The HTTP API of a node"). The relay knows all of it, so it serves the port,
from a thread beside its loop; this module is that thread and the HTTP handling (routes, bodies,
admin credentials), the answers come from a `NodeView` (the relay).

Admin credentials: `Authorization: Bearer <Http.AdminToken>`, or HTTP Basic of a store user with
the admin flag (`broker/ACCESS.md`). A Basic check asks the view for the user's stored hash (so a
demoted or deleted admin loses access at once) and verifies the password with scrypt (~50 ms, in
this request's thread); a success is remembered as an HMAC of the password under a random
per-process key, tied to (user name, stored hash), so a script's next call costs one HMAC and a
changed password forgets it. An unknown user costs the same scrypt as a wrong password (no user
probing by timing).

Must not: touch relay state without the view's lock (the view takes it); block the relay (the
server runs in its own daemon threads); accept an admin request without a token or an admin
user's password; log or answer a token, a password or a password hash.

Invariants: every answer has a Content-Type and a Content-Length; a request body is read whole
before the answer (or the connection is closed), so it never spills into the next request; a
handler error is a 500 with a JSON body and a log line, never a dropped connection; an `ApiError`
from the view is its status with `{"error": message}`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from mesh.errors import MeshError
from store.passwords import CredentialCache, dummy_hash, verify_password

log = logging.getLogger("mesh.http")

JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
MAX_BODY_BYTES: Final = 65536
CHALLENGES: Final = ('Bearer realm="meshmq"', 'Basic realm="meshmq", charset="UTF-8"')
# A well-formed hash of no password anyone knows: an unknown user name costs one scrypt too.


class ApiError(MeshError):
    """The view refuses a request: an HTTP status (400, 404, 503) and one line for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class NodeView(Protocol):
    """What the HTTP port shows and can do (implemented by the relay, under its lock).

    The users and ACL methods ask the store and raise `ApiError` (400 for a value the spec
    refuses, 503 when the store is off, down or does not answer)."""

    def health(self) -> tuple[bool, dict[str, object]]: ...

    def metrics(self) -> str: ...

    def members(self) -> list[dict[str, object]]: ...

    def routes(self, topic_filter: str | None) -> list[dict[str, object]]: ...

    def sessions(self, client_id: str | None) -> list[dict[str, object]]: ...

    def retained(self, topic_filter: str | None) -> dict[str, object]: ...

    def stats(self) -> dict[str, object]: ...

    def ping(self, node: str, timeout_s: float) -> float | None: ...

    def drain(self, node: str | None) -> bool: ...

    def users(self) -> list[dict[str, object]]:
        """`[{"username", "admin"}]` by name (never a hash)."""
        ...

    def put_user(self, username: str, password: str | None, admin: bool | None) -> tuple[int, bool]:
        """Create or change a user (the view hashes the password); (auth version, created)."""
        ...

    def delete_user(self, username: str) -> bool:
        """Delete a user and its own rules; whether it existed."""
        ...

    def acl(self) -> list[dict[str, object]]:
        """`[{"id", "user", "topic", "access"}]` in the order they are checked."""
        ...

    def add_acl(self, user: str, topic: str, access: str) -> tuple[int, int]:
        """Append a rule; (auth version, rule id)."""
        ...

    def delete_acl(self, rule_id: int) -> bool:
        """Delete a rule; whether it existed."""
        ...

    def admin_hash(self, username: str) -> str | None:
        """The stored password hash of `username` if it is an admin user, else None."""
        ...

    def has_admin(self) -> bool:
        """Whether the store has at least one admin user."""
        ...


class HttpApi:
    def __init__(self, view: NodeView, host: str, port: int, admin_token: str) -> None:
        self.view = view
        self.admin_token = admin_token
        self._verified = CredentialCache()  # admins' Basic passwords that verified
        api = self

        class Handler(_Handler):
            owner = api

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self.thread.start()
        log.info("HTTP on %s:%d (health, metrics, admin)", self.server.server_address[0], self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def token_matches(self, given: str) -> bool:
        token = self.admin_token
        return bool(token) and hmac.compare_digest(given.encode(), token.encode())

    def admin_password_matches(self, username: str, password: str) -> bool:
        """Whether `username` is an admin user of the store and `password` is its password."""
        stored = self.view.admin_hash(username)
        secret = password.encode()
        if stored is None:
            verify_password(secret, dummy_hash())  # the time a wrong password takes
            return False
        if self._verified.knows(username, stored, secret):
            return True
        if not verify_password(secret, stored):
            return False
        self._verified.remember(username, stored, secret)
        return True


Handler = Callable[[bytes], None]
_Methods = dict[str, tuple[bool, Handler]]  # method -> (needs admin credentials, handler)


class _Handler(BaseHTTPRequestHandler):
    owner: HttpApi
    protocol_version = "HTTP/1.1"
    server_version = "MeshMQ"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- routing ----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _routes(self, path: str, query: dict[str, str]) -> _Methods | None:
        view = self.owner.view
        fixed: dict[str, _Methods] = {
            "/health": {"GET": (False, lambda _b: self._health())},
            "/metrics": {"GET": (False, lambda _b: self._send(200, view.metrics().encode(), PROMETHEUS))},
            "/api/members": {"GET": (False, lambda _b: self._json(200, view.members()))},
            "/api/routes": {"GET": (False, lambda _b: self._json(200, view.routes(query.get("filter"))))},
            "/api/sessions": {"GET": (False, lambda _b: self._json(200, view.sessions(query.get("client"))))},
            "/api/retained": {"GET": (False, lambda _b: self._json(200, view.retained(query.get("filter"))))},
            "/api/stats": {"GET": (False, lambda _b: self._json(200, view.stats()))},
            "/api/ping": {"POST": (True, lambda _b: self._ping(query.get("node", "")))},
            "/api/drain": {"POST": (True, lambda _b: self._drain(query.get("node")))},
            "/admin/shutdown": {"POST": (True, lambda _b: self._drain(None))},
            "/api/users": {
                "GET": (True, lambda _b: self._json(200, view.users())),
                "POST": (True, self._put_user),
            },
            "/api/acl": {
                "GET": (True, lambda _b: self._json(200, view.acl())),
                "POST": (True, self._add_acl),
            },
        }
        if path in fixed:
            return fixed[path]
        for prefix, handler in (("/api/users/", self._delete_user), ("/api/acl/", self._delete_acl)):
            if path.startswith(prefix) and len(path) > len(prefix):
                return {"DELETE": (True, functools.partial(handler, path[len(prefix) :]))}
        return None

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self._read_body()  # first: a body left unread would be parsed as the next request
        if body is None:
            return
        methods = self._routes(url.path, query)
        if methods is None:
            self._json(404, {"error": f"no such path {url.path}"})
            return
        entry = methods.get(method)
        if entry is None:
            allowed = ", ".join(methods)
            self._json(405, {"error": f"{url.path} takes {allowed}"}, allow=allowed)
            return
        admin, handler = entry
        try:
            if admin and not self._authorised():
                return
            handler(body)
        except ApiError as e:
            self._json(e.status, {"error": e.message})
        except ConnectionError:
            self.close_connection = True  # the client went away (a load balancer's check does)
        except Exception:
            log.exception("HTTP %s %s failed", method, url.path)
            self._json(500, {"error": "internal error (see the node's log)"})

    # -- endpoints --------------------------------------------------------------------------------

    def _health(self) -> None:
        healthy, body = self.owner.view.health()
        self._json(200 if healthy else 503, body)

    def _ping(self, node: str) -> None:
        if not node:
            self._json(400, {"error": "ping needs ?node=NAME"})
            return
        rtt_ms = self.owner.view.ping(node, 2.0)
        if rtt_ms is None:
            self._json(504, {"error": f"no answer from node {node!r} within 2 s"})
            return
        self._json(200, {"node": node, "rttMs": round(rtt_ms, 3)})

    def _drain(self, node: str | None) -> None:
        if not self.owner.view.drain(node):
            self._json(404, {"error": f"no live node {node!r}"})
            return
        self._json(202, {"draining": node or "self"})

    def _put_user(self, body: bytes) -> None:
        fields = _json_object(body, {"username": str, "password": str, "admin": bool}, ("username",))
        username = str(fields["username"])
        password = fields.get("password")
        admin = fields.get("admin")
        if password == "":
            raise ApiError(400, "the password is empty")
        version, created = self.owner.view.put_user(
            username, None if password is None else str(password), None if admin is None else bool(admin)
        )
        self._json(201 if created else 200, {"username": username, "created": created, "version": version})

    def _delete_user(self, param: str, _body: bytes) -> None:
        username = _path_param(param)
        if not self.owner.view.delete_user(username):
            raise ApiError(404, f"no user {username!r}")
        self._json(200, {"deleted": username})

    def _add_acl(self, body: bytes) -> None:
        fields = _json_object(body, {"user": str, "topic": str, "access": str}, ("user", "topic", "access"))
        version, rule_id = self.owner.view.add_acl(
            str(fields["user"]), str(fields["topic"]), str(fields["access"])
        )
        self._json(201, {"id": rule_id, "version": version})

    def _delete_acl(self, param: str, _body: bytes) -> None:
        text = _path_param(param)
        if not text.isascii() or not text.isdigit() or len(text) > 18:
            raise ApiError(400, f"a rule id is a whole number, not {text!r}")
        rule_id = int(text)
        if not self.owner.view.delete_acl(rule_id):
            raise ApiError(404, f"no ACL rule {rule_id}")
        self._json(200, {"deleted": rule_id})

    # -- plumbing ---------------------------------------------------------------------------------

    def _authorised(self) -> bool:
        """Bearer token or Basic of an admin user; else answered 401 (or 403: nothing would do)."""
        api = self.owner
        scheme, _, credentials = self.headers.get("Authorization", "").strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and api.token_matches(credentials.strip()):
            return True
        if scheme == "basic":
            pair = _basic_credentials(credentials.strip())
            if pair is not None:
                if api.admin_password_matches(*pair):
                    return True
                log.info("admin credentials of user %r refused (from %s)", pair[0], self.address_string())
        if not api.admin_token and not api.view.has_admin():
            self._json(
                403,
                {
                    "error": "admin endpoints are off: no Http.AdminToken is set and the store has no admin user"
                },
            )
            return False
        self._json(
            401,
            {"error": "missing or wrong admin credentials (the admin token, or an admin user's password)"},
            authenticate=True,
        )
        return False

    def _read_body(self) -> bytes | None:
        """The request's body (b"" if none); None when it is not sane (answered, closing)."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._json(411, {"error": "send the body with a Content-Length"})
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            self._json(400, {"error": "Content-Length is not a number"})
            return None
        if length < 0:
            self.close_connection = True
            self._json(400, {"error": "Content-Length is negative"})
            return None
        if length > MAX_BODY_BYTES:
            # read what a client may reasonably still be sending (so that it sees the answer
            # rather than a reset), then refuse and close
            left = min(length, 1 << 20)
            while left > 0:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
            self.close_connection = True
            self._json(413, {"error": "request body over 64 KiB"})
            return None
        if length == 0:
            return b""
        data = self.rfile.read(length)
        if len(data) < length:  # the client went away mid-body
            self.close_connection = True
            return None
        return data

    def _json(self, status: int, body: object, allow: str = "", authenticate: bool = False) -> None:
        data = json.dumps(body, separators=(",", ":"), default=str).encode()
        extra = [("Allow", allow)] if allow else []
        if authenticate:
            extra.extend(("WWW-Authenticate", challenge) for challenge in CHALLENGES)
        self._send(status, data, JSON, extra)

    def _send(
        self, status: int, data: bytes, content_type: str, extra: list[tuple[str, str]] | None = None
    ) -> None:
        """Status line, headers and body in one write; a client that is gone is not an error."""
        reason = self.responses.get(status, ("",))[0]
        headers = [
            ("Server", self.version_string()),
            ("Date", self.date_time_string()),
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            *(extra or []),
        ]
        if self.close_connection:
            headers.append(("Connection", "close"))
        head = f"{self.protocol_version} {status} {reason}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers
        )
        self.log_request(status)
        try:
            self.wfile.write(head.encode("latin-1") + b"\r\n" + data)
            self.wfile.flush()
        except ConnectionError:
            self.close_connection = True


def _json_object(body: bytes, types: dict[str, type], required: tuple[str, ...]) -> dict[str, object]:
    """The request body as a JSON object with only the keys of `types`, each of its type."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key, item in value.items():
        wanted = types.get(key)
        if wanted is None:
            raise ApiError(400, f"unknown field {key!r} (known: {', '.join(types)})")
        if item is None:  # null is absent (a required one is missing below)
            continue
        # bool is an int in Python, but not in JSON: an exact type check
        if type(item) is not wanted:
            raise ApiError(400, f"field {key!r} must be a {_JSON_NAMES[wanted]}")
    missing = [key for key in required if value.get(key) is None]
    if missing:
        raise ApiError(400, f"field {missing[0]!r} is missing")
    return {key: item for key, item in value.items() if item is not None}


_JSON_NAMES: Final[dict[type, str]] = {str: "string", bool: "true or false", int: "whole number"}


def _path_param(text: str) -> str:
    """A URL-decoded path segment (UTF-8); 400 if it does not decode."""
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, "the path is not URL-encoded UTF-8") from None


def _basic_credentials(encoded: str) -> tuple[str, str] | None:
    """(user, password) of an HTTP Basic `Authorization` value (RFC 7617, UTF-8), or None."""
    try:
        text = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    username, colon, password = text.partition(":")
    if not colon or not username:
        return None
    return username, password
