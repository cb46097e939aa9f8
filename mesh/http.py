"""The node's HTTP port: health for load balancers, Prometheus metrics, and the admin API.

Why: a load balancer must know whether to send a node traffic (`GET /health`, 200 or 503),
Prometheus scrapes `/metrics`, and `meshctl` reads members, routes, sessions and retained
messages and asks for pings and drains (`mesh/PROTOCOL.md`, "The HTTP API of a node"). The relay
knows all of it, so it serves the port, from a thread beside its loop; this module is that
thread and the HTTP handling, the answers come from a `NodeView` (the relay).

Must not: touch relay state without the view's lock (the view takes it); block the relay (the
server runs in its own daemon thread); accept a write without the admin token; print a request's
token.

Invariants: every answer has a Content-Type and a Content-Length; a handler error is a 500 with
a JSON body and a log line, never a dropped connection.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("mesh.http")

JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class NodeView(Protocol):
    """What the HTTP port shows and can do (implemented by the relay, under its lock)."""

    def health(self) -> tuple[bool, dict[str, object]]: ...

    def metrics(self) -> str: ...

    def members(self) -> list[dict[str, object]]: ...

    def routes(self, topic_filter: str | None) -> list[dict[str, object]]: ...

    def sessions(self, client_id: str | None) -> list[dict[str, object]]: ...

    def retained(self, topic_filter: str | None) -> dict[str, object]: ...

    def stats(self) -> dict[str, object]: ...

    def ping(self, node: str, timeout_s: float) -> float | None: ...

    def drain(self, node: str | None) -> bool: ...


class HttpApi:
    def __init__(self, view: NodeView, host: str, port: int, admin_token: str) -> None:
        self.view = view
        self.admin_token = admin_token
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

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        view = self.owner.view
        routes: dict[str, tuple[str, Callable[[], None]]] = {
            "/health": ("GET", self._health),
            "/metrics": ("GET", lambda: self._send(200, view.metrics().encode(), PROMETHEUS)),
            "/api/members": ("GET", lambda: self._json(200, view.members())),
            "/api/routes": ("GET", lambda: self._json(200, view.routes(query.get("filter")))),
            "/api/sessions": ("GET", lambda: self._json(200, view.sessions(query.get("client")))),
            "/api/retained": ("GET", lambda: self._json(200, view.retained(query.get("filter")))),
            "/api/stats": ("GET", lambda: self._json(200, view.stats())),
            "/api/ping": ("POST", lambda: self._ping(query.get("node", ""))),
            "/api/drain": ("POST", lambda: self._drain(query.get("node"))),
            "/admin/shutdown": ("POST", lambda: self._drain(None)),
        }
        if not self._drain_body():  # first: a body left unread would be parsed as the next request
            return
        entry = routes.get(url.path)
        if entry is None:
            self._json(404, {"error": f"no such path {url.path}"})
            return
        allowed, handler = entry
        if method != allowed:
            self._json(405, {"error": f"{url.path} takes {allowed}"}, allow=allowed)
            return
        if method == "POST" and not self._authorised():
            return
        try:
            handler()
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

    # -- plumbing ---------------------------------------------------------------------------------

    def _authorised(self) -> bool:
        token = self.owner.admin_token
        if not token:
            self._json(403, {"error": "write endpoints are off: set Http.AdminToken"})
            return False
        given = self.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
            self._json(401, {"error": "missing or wrong admin token"}, authenticate=True)
            return False
        return True

    def _drain_body(self) -> bool:
        """Read (and ignore) the request's body; False (answered, closing) when it is not sane."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            self._json(400, {"error": "Content-Length is not a number"})
            return False
        if length > 65536:
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
            return False
        if length > 0:
            self.rfile.read(length)
        return True

    def _json(self, status: int, body: object, allow: str = "", authenticate: bool = False) -> None:
        data = json.dumps(body, separators=(",", ":"), default=str).encode()
        extra = {"Allow": allow} if allow else {}
        if authenticate:
            extra["WWW-Authenticate"] = 'Bearer realm="meshmq"'
        self._send(status, data, JSON, extra)

    def _send(self, status: int, data: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        """Status line, headers and body in one write; a client that is gone is not an error."""
        reason = self.responses.get(status, ("",))[0]
        headers = {
            "Server": self.version_string(),
            "Date": self.date_time_string(),
            "Content-Type": content_type,
            "Content-Length": str(len(data)),
            "Cache-Control": "no-store",
            **(extra or {}),
        }
        if self.close_connection:
            headers["Connection"] = "close"
        head = f"{self.protocol_version} {status} {reason}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        self.log_request(status)
        try:
            self.wfile.write(head.encode("latin-1") + b"\r\n" + data)
            self.wfile.flush()
        except ConnectionError:
            self.close_connection = True
