"""Calls to a node's HTTP admin API (users, ACL rules) from tests, with a token or Basic credentials."""

from __future__ import annotations

import base64
import http.client
import json
from typing import Any

TIMEOUT_S = 5.0


def admin_call(
    port: int,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    basic: tuple[str, str] | None = None,
    host: str = "127.0.0.1",
) -> tuple[int, Any]:
    """One request on a connection of its own: (HTTP status, decoded JSON body or None)."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    elif basic is not None:
        pair = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {pair}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw and resp.headers.get(
            "Content-Type"
        ) == "application/json" else None
    finally:
        conn.close()
