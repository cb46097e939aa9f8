"""meshctl's HTTP client: one call to a node's HTTP API, and its JSON read into typed records.

Why: every meshctl command but `keygen` and `tap` is one request (or two) to a node's HTTP port
(`mesh/PROTOCOL.md`, "The HTTP API of a node"). This module owns the request (address, admin
credentials: the token as Bearer or an admin user's name and password as Basic, timeout, JSON
body), turns every way it can fail into one `MeshctlError` whose text an operator can act on,
and reads the answers into frozen records, so that rendering never guesses at JSON shapes.

Must not: print (the command layer does); follow redirects or retry (an operator's command runs
once, against the node named); send the token or the password anywhere but in the
`Authorization` header of a request to the node named, or put either into an error text; let an
`OSError`, `http.client` or JSON error escape as anything but `MeshctlError`.

Invariants:
- `MeshctlError` renders as `<what> (<url>)`, the url always being the one asked.
- A `Reply` holds the decoded JSON of a status the caller accepted; any other status is a
  `MeshctlError` (401/403 say which credentials were missing, wrong or refused).
- The parse functions accept extra keys (the node may say more than the spec) and refuse a
  missing or mistyped key the spec names, with a `MeshctlError` that names it.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias, cast
from urllib.parse import quote, urlencode

__all__ = [
    "DEFAULT_HTTP_PORT",
    "HEALTH_ORDER",
    "Counters",
    "Health",
    "Json",
    "Member",
    "MeshctlError",
    "NodeClient",
    "Ping",
    "Reply",
    "Retained",
    "RetainedTopic",
    "Route",
    "Scalar",
    "SessionEntry",
    "Stats",
    "parse_address",
    "parse_health",
    "parse_members",
    "parse_ping",
    "parse_retained",
    "parse_routes",
    "parse_sessions",
    "parse_stats",
]

DEFAULT_HTTP_PORT: Final = 8080
_MAX_BODY_BYTES: Final = 64 * 1024 * 1024  # a node's answer is at most a few MB (1,000 topics)
_DETAIL_CHARS: Final = 200

Json: TypeAlias = "bool | int | float | str | list[Json] | dict[str, Json] | None"
Scalar: TypeAlias = "bool | int | float | str | None"
Counters: TypeAlias = tuple[tuple[str, Scalar], ...]


class MeshctlError(Exception):
    """A command failed; `what` is one line for the operator, `where` the URL (or address) asked."""

    def __init__(self, what: str, where: str) -> None:
        super().__init__(f"{what} ({where})")
        self.what = what
        self.where = where


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """`HOST:PORT`, `HOST`, `[IPv6]:PORT` or `[IPv6]` → (host, port); ValueError if malformed."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not HOST:PORT")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        host, port_text = text, ""  # a bare IPv6 address
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"{text!r} has no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: the port must be a number in 1..65535")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class Reply:
    """A node's answer with an accepted status: the decoded JSON body (None if it had none)."""

    status: int
    body: Json
    url: str


class NodeClient:
    """Requests to one node's HTTP API; see the module docstring.

    Credentials: `token` (Bearer) or `user` and `password` (Basic of an admin user); the token
    wins when both are given (the command layer makes sure they are not)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: str | None,
        timeout_s: float,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token or None
        self.user = user or None
        self.password = password or ""
        self.timeout_s = timeout_s

    def url(self, path: str, query: Mapping[str, str] | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self._target(path, query)}"

    @staticmethod
    def _target(path: str, query: Mapping[str, str] | None) -> str:
        if not query:
            return path
        return f"{path}?{urlencode(dict(query), quote_via=quote, safe='/')}"

    def get(
        self, path: str, query: Mapping[str, str] | None = None, accept: Collection[int] = (200,)
    ) -> Reply:
        return self.call("GET", path, query, accept)

    def post(
        self,
        path: str,
        query: Mapping[str, str] | None = None,
        accept: Collection[int] = (200,),
        body: Json = None,
    ) -> Reply:
        return self.call("POST", path, query, accept, body)

    def delete(self, path: str, accept: Collection[int] = (200,)) -> Reply:
        return self.call("DELETE", path, None, accept)

    def _authorization(self) -> str | None:
        if self.token is not None:
            return f"Bearer {self.token}"
        if self.user is not None:
            pair = f"{self.user}:{self.password}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        return None

    def call(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        accept: Collection[int],
        body: Json = None,
    ) -> Reply:
        url = self.url(path, query)
        headers = {"Accept": "application/json", "User-Agent": "meshctl"}
        authorization = self._authorization()
        if authorization is not None:
            headers["Authorization"] = authorization
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            conn.request(method, self._target(path, query), body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read(_MAX_BODY_BYTES + 1)
            status, reason = response.status, response.reason
        except ConnectionRefusedError:
            raise MeshctlError("connection refused: is the node's Http.Port right?", url) from None
        except TimeoutError:
            raise MeshctlError(f"no answer within {self.timeout_s:g} s", url) from None
        except socket.gaierror as e:
            raise MeshctlError(f"cannot resolve {self.host!r}: {e.strerror}", url) from None
        except http.client.HTTPException as e:
            raise MeshctlError(f"not an HTTP answer: {type(e).__name__} {e}".rstrip(), url) from None
        except OSError as e:
            raise MeshctlError(f"cannot reach the node: {e.strerror or e}", url) from None
        finally:
            conn.close()
        if len(raw) > _MAX_BODY_BYTES:
            raise MeshctlError(f"the answer is larger than {_MAX_BODY_BYTES} bytes", url)
        if status not in accept:
            raise MeshctlError(self._refusal(status, reason, raw), url)
        return Reply(status, _decode(raw, url), url)

    def _refusal(self, status: int, reason: str, data: bytes) -> str:
        detail = _detail(data)
        said = f" (the node says: {detail})" if detail else ""
        if status in (401, 403) and self.token is None and self.user is None:
            return (
                "admin credentials are missing: pass --token or set MESHMQ_TOKEN, "
                f"or --user/--password of an admin user{said}"
            )
        if status == 401 and self.token is not None:
            return f"the admin token is wrong{said}"
        if status == 401:
            return f"user {self.user!r} is not an admin user, or the password is wrong{said}"
        if status == 403:
            return f"the node refuses admin requests{said}"
        return f"HTTP {status} {reason}" + (f": {detail}" if detail else "")


def _decode(data: bytes, url: str) -> Json:
    if not data.strip():
        return None
    try:
        return cast(Json, json.loads(data))
    except (ValueError, UnicodeDecodeError):
        raise MeshctlError("the node's answer is not valid JSON", url) from None


def _detail(data: bytes) -> str:
    """The reason a node gave with an error status: its JSON `error`, or the start of its text."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        for key in ("error", "message"):
            if isinstance(body.get(key), str):
                return str(body[key])[:_DETAIL_CHARS]
    text = data.decode("utf-8", errors="replace").strip()
    line = text.splitlines()[0] if text else ""
    return "".join(c if c.isprintable() else "?" for c in line)[:_DETAIL_CHARS]


# --- records and their parsing ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    """`GET /health`: its fields in the spec's order (then any others), and whether HTTP said 200."""

    healthy: bool
    status: int
    fields: tuple[tuple[str, Json], ...]


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    address: str
    state: str
    incarnation: int | None
    rtt_ms: float | None
    clients: int | None
    is_self: bool


@dataclass(frozen=True, slots=True)
class Route:
    topic_filter: str
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SessionEntry:
    client_id: str
    node: str | None
    worker: int | None
    epoch: int | None
    online: bool
    queued: int | None


@dataclass(frozen=True, slots=True)
class RetainedTopic:
    topic: str
    qos: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Retained:
    count: int
    topics: tuple[RetainedTopic, ...]


@dataclass(frozen=True, slots=True)
class Stats:
    """`GET /api/stats`: the node's counters, each worker's, and each link's (by peer name)."""

    node: Counters
    workers: tuple[tuple[str, Counters], ...]
    links: tuple[tuple[str, Counters], ...]


@dataclass(frozen=True, slots=True)
class Ping:
    node: str
    rtt_ms: float


HEALTH_ORDER: Final = (
    "node",
    "version",
    "nodeState",
    "clusterState",
    "clusterSafe",
    "nodeCount",
    "clusterSize",
    "store",
    "workers",
)


class _Shape(Exception):
    """The answer's JSON has not the spec's shape (turned into a MeshctlError with the URL)."""


def _object(value: Json, what: str) -> dict[str, Json]:
    if not isinstance(value, dict):
        raise _Shape(f"{what} is not a JSON object")
    return value


def _list(value: Json, what: str) -> list[Json]:
    if not isinstance(value, list):
        raise _Shape(f"{what} is not a JSON list")
    return value


def _str(obj: dict[str, Json], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _Shape(f"{what}: {key!r} is missing or not a string")
    return value


def _opt_str(obj: dict[str, Json], key: str, what: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _Shape(f"{what}: {key!r} is not a string")
    return value


def _opt_int(obj: dict[str, Json], key: str, what: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise _Shape(f"{what}: {key!r} is not an integer")
    return int(value)


def _int(obj: dict[str, Json], key: str, what: str) -> int:
    value = _opt_int(obj, key, what)
    if value is None:
        raise _Shape(f"{what}: {key!r} is missing")
    return value


def _opt_float(obj: dict[str, Json], key: str, what: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Shape(f"{what}: {key!r} is not a number")
    return float(value)


def _counters(value: Json, what: str) -> Counters:
    """A JSON object of counters; a nested value becomes its compact JSON text."""
    obj = _object(value, what)
    return tuple(
        (key, v if not isinstance(v, dict | list) else json.dumps(v, separators=(",", ":")))
        for key, v in obj.items()
    )


def _shape_error(reply: Reply, e: _Shape) -> MeshctlError:
    return MeshctlError(f"unexpected answer: {e}", reply.url)


def parse_health(reply: Reply) -> Health:
    try:
        obj = _object(reply.body, "the health answer")
    except _Shape as e:
        raise _shape_error(reply, e) from None
    known = [(key, obj[key]) for key in HEALTH_ORDER if key in obj]
    others = [(key, value) for key, value in obj.items() if key not in HEALTH_ORDER]
    return Health(reply.status == 200, reply.status, tuple(known + others))


def parse_members(reply: Reply) -> tuple[Member, ...]:
    try:
        out = []
        for i, item in enumerate(_list(reply.body, "the members answer")):
            what = f"member {i + 1}"
            obj = _object(item, what)
            out.append(
                Member(
                    name=_str(obj, "name", what),
                    address=_opt_str(obj, "address", what) or "",
                    state=_str(obj, "state", what),
                    incarnation=_opt_int(obj, "incarnation", what),
                    rtt_ms=_opt_float(obj, "rttMs", what),
                    clients=_opt_int(obj, "clients", what),
                    is_self=obj.get("self") is True,
                )
            )
        return tuple(out)
    except _Shape as e:
        raise _shape_error(reply, e) from None


def parse_routes(reply: Reply) -> tuple[Route, ...]:
    try:
        out = []
        for i, item in enumerate(_list(reply.body, "the routes answer")):
            what = f"route {i + 1}"
            obj = _object(item, what)
            nodes = _list(obj.get("nodes"), f"{what}: 'nodes'")
            if not all(isinstance(n, str) for n in nodes):
                raise _Shape(f"{what}: 'nodes' holds a non-string")
            out.append(Route(_str(obj, "filter", what), tuple(cast(list[str], nodes))))
        return tuple(out)
    except _Shape as e:
        raise _shape_error(reply, e) from None


def parse_sessions(reply: Reply) -> tuple[SessionEntry, ...]:
    try:
        out = []
        for i, item in enumerate(_list(reply.body, "the sessions answer")):
            what = f"session {i + 1}"
            obj = _object(item, what)
            online = obj.get("online")
            if not isinstance(online, bool):
                raise _Shape(f"{what}: 'online' is missing or not true/false")
            out.append(
                SessionEntry(
                    client_id=_str(obj, "clientId", what),
                    node=_opt_str(obj, "node", what),
                    worker=_opt_int(obj, "worker", what),
                    epoch=_opt_int(obj, "epoch", what),
                    online=online,
                    queued=_opt_int(obj, "queued", what),
                )
            )
        return tuple(out)
    except _Shape as e:
        raise _shape_error(reply, e) from None


def parse_retained(reply: Reply) -> Retained:
    try:
        obj = _object(reply.body, "the retained answer")
        topics = []
        for i, item in enumerate(_list(obj.get("topics"), "'topics'")):
            what = f"retained topic {i + 1}"
            entry = _object(item, what)
            topics.append(
                RetainedTopic(
                    _str(entry, "topic", what), _int(entry, "qos", what), _int(entry, "bytes", what)
                )
            )
        return Retained(_int(obj, "count", "the retained answer"), tuple(topics))
    except _Shape as e:
        raise _shape_error(reply, e) from None


def parse_stats(reply: Reply) -> Stats:
    try:
        obj = _object(reply.body, "the stats answer")
        node = _counters(obj.get("node", {}), "'node'")
        workers = _object(obj.get("workers", {}), "'workers'")
        links = _object(obj.get("links", {}), "'links'")
        return Stats(
            node,
            tuple((key, _counters(value, f"worker {key}")) for key, value in workers.items()),
            tuple((key, _counters(value, f"link {key}")) for key, value in links.items()),
        )
    except _Shape as e:
        raise _shape_error(reply, e) from None


def parse_ping(reply: Reply) -> Ping:
    try:
        obj = _object(reply.body, "the ping answer")
        rtt_ms = _opt_float(obj, "rttMs", "the ping answer")
        if rtt_ms is None:
            raise _Shape("the ping answer: 'rttMs' is missing")
        return Ping(_str(obj, "node", "the ping answer"), rtt_ms)
    except _Shape as e:
        raise _shape_error(reply, e) from None
