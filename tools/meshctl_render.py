"""meshctl's human output: aligned tables and field lists from the records of `meshctl_client`.

Why: an operator reads a cluster's state at a glance; every command prints the same kind of
table (upper-case headers, columns two spaces apart, numbers right-aligned, "-" for a value the
node did not give). Keeping the text here keeps the commands free of formatting and lets the
tests check the exact output without a node.

Must not: do IO (every function returns text, the command prints it); sort or filter what the
node returned beyond the stated order (rows keep the node's order unless said otherwise).

Invariants: every function returns complete lines, each ending in a newline; an empty table is
its header line and `(none)`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final

from tools.meshctl_client import (
    Counters,
    Health,
    Json,
    Member,
    Ping,
    Retained,
    Route,
    Scalar,
    SessionEntry,
    Stats,
)
from tools.meshctl_users import AclRule, User

__all__ = [
    "PREVIEW_CHARS",
    "format_value",
    "preview",
    "render_acl",
    "render_health",
    "render_members",
    "render_ping",
    "render_retained",
    "render_routes",
    "render_sessions",
    "render_stats",
    "render_users",
    "table",
]

PREVIEW_CHARS: Final = 60
_GAP: Final = "  "
# A link's columns in this order; counters the node adds come after them.
_LINK_ORDER: Final = ("sent", "received", "resends", "unacked", "rttMs")


def format_value(value: Json) -> str:
    """One value for a table cell: "-" for none, true/false, integral floats without ".0"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.3f}".rstrip("0")
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _rtt(rtt_ms: Scalar) -> str:
    if rtt_ms is None or isinstance(rtt_ms, bool | str):
        return format_value(rtt_ms)
    return f"{rtt_ms:.2f}ms"


def _is_number(cell: str) -> bool:
    return cell.replace(".", "", 1).replace("ms", "").isdigit()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An aligned table; a column whose cells are all numbers (or "-") is right-aligned."""
    if not rows:
        return _GAP.join(headers).rstrip() + "\n(none)\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    right = [all(_is_number(r[i]) or r[i] == "-" for r in rows) for i in range(len(headers))]
    lines = []
    for row in (headers, *rows):
        cells = [cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(row, widths, right, strict=True)]
        lines.append(_GAP.join(cells).rstrip())
    return "\n".join(lines) + "\n"


def render_health(health: Health) -> str:
    width = max((len(key) for key, _ in health.fields), default=0)
    lines = [f"{key.ljust(width)}{_GAP}{format_value(value)}" for key, value in health.fields]
    verdict = "healthy" if health.healthy else "unhealthy"
    lines.append(f"{'status'.ljust(width)}{_GAP}{verdict} (HTTP {health.status})")
    return "\n".join(lines) + "\n"


def render_members(members: Sequence[Member]) -> str:
    rows = [
        (
            f"{m.name}*" if m.is_self else m.name,
            m.address or "-",
            m.state,
            format_value(m.incarnation),
            _rtt(m.rtt_ms),
            format_value(m.clients),
        )
        for m in members
    ]
    text = table(("NAME", "ADDRESS", "STATE", "INCARNATION", "RTT", "CLIENTS"), rows)
    if any(m.is_self for m in members):
        text += "(* the node that answered)\n"
    return text


def render_routes(routes: Sequence[Route]) -> str:
    return table(("FILTER", "NODES"), [(r.topic_filter, ",".join(r.nodes) or "-") for r in routes])


def render_sessions(sessions: Sequence[SessionEntry]) -> str:
    rows = [
        (
            s.client_id,
            s.node or "-",
            format_value(s.worker),
            "yes" if s.online else "no",
            format_value(s.queued),
        )
        for s in sessions
    ]
    return table(("CLIENT", "NODE", "WORKER", "ONLINE", "QUEUED"), rows)


def render_retained(retained: Retained) -> str:
    shown = len(retained.topics)
    noun = "message" if retained.count == 1 else "messages"
    head = f"{retained.count} retained {noun}"
    if shown < retained.count:
        head += f" (showing {shown})"
    rows = [(t.topic, str(t.qos), str(t.size_bytes)) for t in retained.topics]
    return head + "\n" + table(("TOPIC", "QOS", "BYTES"), rows)


def _counter_table(first: str, columns: Sequence[tuple[str, Counters]]) -> str:
    """Rows = counter names (in first-seen order), one column per group (node, or each worker)."""
    names: dict[str, None] = {}
    for _, counters in columns:
        names.update((name, None) for name, _ in counters)
    values = [dict(counters) for _, counters in columns]
    rows = [(name, *(format_value(v.get(name)) for v in values)) for name in names]
    return table((first, *(title for title, _ in columns)), rows)


def render_stats(stats: Stats) -> str:
    parts = [_counter_table("NODE COUNTER", [("VALUE", stats.node)])]
    if stats.workers:
        parts.append(_counter_table("WORKER COUNTER", [(w, c) for w, c in stats.workers]))
    extra: dict[str, None] = {}
    for _, counters in stats.links:
        extra.update((name, None) for name, _ in counters if name not in _LINK_ORDER)
    keys = (*_LINK_ORDER, *extra)
    headers = ("PEER", "SENT", "RECEIVED", "RESENDS", "UNACKED", "RTT", *(k.upper() for k in extra))
    rows = []
    for peer, counters in stats.links:
        values = dict(counters)
        rows.append(
            (peer, *(_rtt(values.get(k)) if k == "rttMs" else format_value(values.get(k)) for k in keys))
        )
    parts.append(table(headers, rows))
    return "\n".join(parts)


def render_ping(ping: Ping) -> str:
    return f"{ping.node}: rtt {ping.rtt_ms:.3f} ms\n"


def render_users(users: Sequence[User]) -> str:
    return table(("USERNAME", "ADMIN"), [(u.username, "yes" if u.admin else "no") for u in users])


def render_acl(rules: Sequence[AclRule]) -> str:
    """Rules in the order the node gave (the order in which they are checked)."""
    return table(
        ("ID", "USER", "TOPIC", "ACCESS"), [(str(r.rule_id), r.user, r.topic, r.access) for r in rules]
    )


def preview(payload: bytes, limit: int = PREVIEW_CHARS) -> str:
    """The start of a payload as one printable line: UTF-8 where it decodes, "." for the rest."""
    text = payload[: limit * 4].decode("utf-8", errors="replace")
    shown = "".join(c if c.isprintable() and c != "\ufffd" else "." for c in text[:limit])
    return shown + ("..." if len(text) > limit or len(payload) > limit * 4 else "")
