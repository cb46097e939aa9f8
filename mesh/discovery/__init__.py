"""Discovery: where the relay learns which addresses might be other nodes of its cluster.

Why: a node must find its peers without the operator listing every one of them, in the ways
clusters are deployed — a fixed list (`static`), names that resolve to every replica (`dns`,
Kubernetes headless services, compose service names) and zero-configuration LANs (`mdns`). Each
way is a `Source`; `Discovery` is all configured sources together, asked by the relay on every
heartbeat for the current *candidates*.

Must not: decide liveness, membership or trust. A candidate is only an address worth trying:
the relay's heartbeats decide whether a node is alive, and CURVE decides whether it may join.
A source keeps a candidate that has gone (a DNS answer after a failed lookup, an mDNS record
until its TTL runs out); that is harmless by design. Must not block in `poll` — the relay calls
it from its heartbeat loop — so every lookup runs in a background thread. Must not import the
broker (the configuration reaches `build_discovery` duck-typed).

Invariants:
- `Candidate.host` is an IP address in text form (IPv6 without brackets) once a source has
  resolved it; only `parse_member` returns host names, before resolution.
- `Discovery.poll` returns each (host, port) at most once, in a stable order: sources in the
  order given, then each source's own order. When two sources name the same (host, port), the
  first wins, and an empty `node` or `key` is filled in from a later one.
- A source that raises in `poll` is logged (once per failure streak) and skipped; the others
  still answer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from mesh.errors import MeshError

log = logging.getLogger("mesh.discovery")


class DiscoveryError(MeshError):
    """A discovery source that cannot start (mDNS sockets that cannot be opened, for example)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """An address where another node of the cluster may be listening for mesh links."""

    host: str  # an IP address (text); IPv6 without brackets
    port: int
    node: str = ""  # the node's name when the source knows it (mDNS TXT, "name@host")
    source: str = ""  # "static", "dns", "mdns"
    key: str = ""  # the node's CURVE public key (z85 text) when the source knows it (mDNS TXT "pk")


class Source(Protocol):
    """One way of finding candidates. `poll` must return at once; `close` is idempotent."""

    def poll(self, now: float) -> list[Candidate]: ...

    def close(self) -> None: ...


class Discovery:
    """All configured sources together."""

    def __init__(self, sources: Sequence[Source]) -> None:
        self._sources = tuple(sources)
        self._failing: set[int] = set()  # indexes of sources whose last poll raised
        self._closed = False

    @property
    def sources(self) -> tuple[Source, ...]:
        return self._sources

    def poll(self, now: float) -> list[Candidate]:
        """The union of every source's current candidates, deduplicated by (host, port)."""
        merged: dict[tuple[str, int], Candidate] = {}
        for index, source in enumerate(self._sources):
            try:
                found = source.poll(now)
            except Exception:
                # One place where a source's failure is caught: the relay's heartbeat must go on
                # with the other sources. Logged in full once per streak, not on every beat.
                if index not in self._failing:
                    self._failing.add(index)
                    log.exception("discovery source %s failed; skipping it until it recovers", source)
                continue
            if index in self._failing:
                self._failing.discard(index)
                log.info("discovery source %s answers again", source)
            for candidate in found:
                address = (candidate.host, candidate.port)
                known = merged.get(address)
                if known is None:
                    merged[address] = candidate
                elif (not known.node and candidate.node) or (not known.key and candidate.key):
                    merged[address] = dataclasses.replace(
                        known, node=known.node or candidate.node, key=known.key or candidate.key
                    )
        return list(merged.values())

    def close(self) -> None:
        """Close every source (each one even when another fails); idempotent."""
        if self._closed:
            return
        self._closed = True
        for source in self._sources:
            try:
                source.close()
            except Exception:
                log.exception("closing discovery source %s failed", source)


# --- building the sources from the configuration ------------------------------------------------
# The shapes `build_discovery` reads, so that mypy checks the attribute names while `mesh` still
# never imports `broker.config` (DESIGN.md: imports run broker -> mesh only).


class _TcpIpShape(Protocol):
    @property
    def enabled(self) -> bool: ...
    @property
    def members(self) -> Sequence[str]: ...


class _MdnsShape(Protocol):
    @property
    def enabled(self) -> bool: ...
    @property
    def interfaces(self) -> Sequence[str]: ...
    @property
    def announce_interval_ms(self) -> int: ...


class _DnsShape(Protocol):
    @property
    def enabled(self) -> bool: ...
    @property
    def names(self) -> Sequence[str]: ...
    @property
    def refresh_ms(self) -> int: ...


class _MeshConfigShape(Protocol):
    @property
    def cluster_name(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def tcp_ip(self) -> _TcpIpShape: ...
    @property
    def mdns(self) -> _MdnsShape: ...
    @property
    def dns(self) -> _DnsShape: ...


def build_discovery(
    mesh_config: object, node_name: str, incarnation: int, address: str, public_key: str = ""
) -> Discovery:
    """The sources `mesh_config` (a `MeshConfig`, duck-typed) enables, with mDNS started.

    `address` is the address this node advertises to the others (mDNS announces it; it must be
    IPv4 when mDNS is enabled). Raises ValueError for bad member syntax or mDNS settings and
    `DiscoveryError` when mDNS cannot start; the sources built so far are closed first.
    """
    # Imported here: the source modules import `Candidate` from this package, and a node
    # without mDNS never loads zeroconf.
    from mesh.discovery.dns import DnsDiscovery
    from mesh.discovery.static import StaticDiscovery

    config = cast(_MeshConfigShape, mesh_config)
    sources: list[Source] = []
    try:
        if config.tcp_ip.enabled and config.tcp_ip.members:
            sources.append(StaticDiscovery(tuple(config.tcp_ip.members), config.port))
        if config.dns.enabled and config.dns.names:
            sources.append(DnsDiscovery(tuple(config.dns.names), config.port, config.dns.refresh_ms / 1000))
        if config.mdns.enabled:
            from mesh.discovery.mdns import MdnsDiscovery

            mdns = MdnsDiscovery(
                cluster_name=config.cluster_name,
                node_name=node_name,
                incarnation=incarnation,
                port=config.port,
                address=address,
                interfaces=tuple(config.mdns.interfaces),
                announce_interval_s=config.mdns.announce_interval_ms / 1000,
                public_key=public_key,
            )
            sources.append(mdns)
            mdns.start()
    except BaseException:
        Discovery(sources).close()
        raise
    return Discovery(sources)


__all__ = ["Candidate", "Discovery", "DiscoveryError", "Source", "build_discovery"]
