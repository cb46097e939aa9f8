"""Static discovery: the operator's list of members (`Mesh.TcpIp.Members`).

Why: the simplest deployment names its nodes; a range (`192.168.1.100-110`) covers a rack of
machines with one line, as in the seed's `TcpIp.Members`. Entries:

    host                    10.0.0.5, broker-2.example, ::1 (a bare IPv6 address takes no port)
    host:port               10.0.0.5:7946, broker-2:7946, [fe80::1]:7946
    name@host[:port]        node2@10.0.0.5:7946 (the node's name, when the operator knows it)
    a.b.c.d-e[:port]        192.168.1.100-110: every address from .100 to .110, in order

Must not: resolve host names while parsing or in `poll` (the system resolver can stall; the
relay's heartbeat must not): names are resolved by a `BackgroundResolver` thread and become
candidates once resolved. Must not accept anything ambiguous: a bad entry is a ValueError whose
message names the entry and what is wrong, at start.

Invariants:
- `parse_member` is pure: text in, candidates out (host names unresolved, `host` = the name).
- A range spans the last octet only, start <= end <= 255, so at most 256 addresses, ascending.
- `poll` returns each (host, port) once, in the order of the list (a name's addresses in the
  resolver's order); a name that has never resolved contributes nothing yet.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Sequence
from typing import Final

from mesh.discovery import Candidate
from mesh.discovery.dns import BackgroundResolver, Resolve, split_host_port

# How often the host names of the static list are resolved again: a replaced container or VM
# with a new address is found within this time.
STATIC_REFRESH_S: Final = 10.0
MAX_RANGE_ADDRESSES: Final = 256

# The configuration's NodeName pattern (broker/config_values.py), repeated here because mesh must not
# import broker.
_NODE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RANGE: Final = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})-(\d+)")
_LABEL: Final = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def parse_member(text: str, default_port: int) -> list[Candidate]:
    """The candidates one member entry names (host names unresolved). Raises ValueError."""
    entry = text.strip()
    if not entry:
        raise ValueError("empty member entry")
    node = ""
    target = entry
    if "@" in entry:
        node, _, target = entry.partition("@")
        if not _NODE_NAME.fullmatch(node):
            raise ValueError(
                f"{entry!r}: node name {node!r} must be 1 to 64 letters, digits, '.', '_' or '-' "
                "starting with a letter or digit"
            )
        if not target:
            raise ValueError(f"{entry!r}: nothing after '@' (expected name@host[:port])")
    try:
        host, port = split_host_port(target, default_port)
    except ValueError as exc:
        raise ValueError(f"{entry!r}: {_strip_prefix(exc, target)}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{entry!r}: port {port} is out of range (1..65535)")

    if (span := _RANGE.fullmatch(host)) is not None:
        if node:
            raise ValueError(f"{entry!r}: a node name cannot be given for a range of addresses")
        return [Candidate(host=address, port=port, source="static") for address in _expand(entry, span)]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        _check_host_name(entry, host)
        return [Candidate(host=host, port=port, node=node, source="static")]
    return [Candidate(host=str(address), port=port, node=node, source="static")]


def _expand(entry: str, span: re.Match[str]) -> list[str]:
    a, b, c, first, last = (int(group) for group in span.groups())
    for octet in (a, b, c, first):
        if octet > 255:
            raise ValueError(f"{entry!r}: {octet} is not an address octet (0..255)")
    if last > 255:
        raise ValueError(
            f"{entry!r}: a range spans the last octet only, so its end must be at most 255, got {last}"
        )
    if first > last:
        raise ValueError(f"{entry!r}: the range starts after it ends ({first} > {last})")
    count = last - first + 1
    if count > MAX_RANGE_ADDRESSES:  # cannot happen with octets; kept as the stated limit
        raise ValueError(f"{entry!r}: a range holds at most {MAX_RANGE_ADDRESSES} addresses, got {count}")
    return [f"{a}.{b}.{c}.{octet}" for octet in range(first, last + 1)]


def _check_host_name(entry: str, host: str) -> None:
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        raise ValueError(f"{entry!r}: {host!r} is not a valid IPv4 address")
    if "-" in host and all(part.replace("-", "").isdigit() for part in labels):
        raise ValueError(f"{entry!r}: {host!r} is not a valid range (write a.b.c.d-e: the last octet varies)")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"{entry!r}: {host!r} is neither an IP address, nor a range a.b.c.d-e, nor a host name "
            "(labels of letters, digits, '-' or '_', at most 63 characters each)"
        )


def _strip_prefix(exc: ValueError, target: str) -> str:
    """split_host_port's message without its own `'target': ` prefix (the entry is named instead)."""
    message = str(exc)
    prefix = f"{target!r}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


class StaticDiscovery:
    """The members of a static list; host names are resolved in the background."""

    def __init__(
        self,
        members: Sequence[str],
        default_port: int,
        *,
        refresh_s: float = STATIC_REFRESH_S,
        resolve: Resolve | None = None,
    ) -> None:
        parsed: list[Candidate] = []
        for index, member in enumerate(members):
            try:
                parsed.extend(parse_member(member, default_port))
            except ValueError as exc:
                raise ValueError(f"members[{index}]: {exc}") from None
        self._members = tuple(parsed)
        names = [c.host for c in parsed if not _is_address(c.host)]
        self._resolver = (
            BackgroundResolver(names, refresh_s, resolve, what="static member host name") if names else None
        )

    def __repr__(self) -> str:
        return f"StaticDiscovery({len(self._members)} members)"

    def poll(self, now: float) -> list[Candidate]:
        found: dict[tuple[str, int], Candidate] = {}
        for member in self._members:
            if self._resolver is None or _is_address(member.host):
                found.setdefault((member.host, member.port), member)
                continue
            for address in self._resolver.addresses(member.host):
                found.setdefault((address, member.port), dataclasses.replace(member, host=address))
        return list(found.values())

    def close(self) -> None:
        if self._resolver is not None:
            self._resolver.close()


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
