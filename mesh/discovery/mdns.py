"""mDNS discovery: announce this node and browse for the others with python-zeroconf.

Why: on a LAN, nodes of one cluster find each other with no list and no DNS server. Each node
registers a `_meshmq._tcp.local.` service whose TXT record carries the cluster name, node name,
incarnation and CURVE public key, and browses for the services of the others.

Decisions (measured on loopback, see tests/unit/mesh/discovery/test_mdns.py):
- Only the interfaces given are used (`Zeroconf(interfaces=[...], ip_version=V4Only)`), never
  zeroconf's default of every interface: an operator must not find the broker announcing
  itself on a network it was not configured for. An empty interface list is an error.
- Zeroconf runs its own thread (`use_asyncio=False`), also when the caller has an event loop:
  `start()` then returns at once, and registration (probing, ~1.5 s) runs on zeroconf's loop.
- Periodic re-announce: browsers send their startup queries in the first ~15 s and then only
  refresh what they know, so a node that registered during a partition would not be found for
  a long time after the heal (TESTBED.md: not within 75 s). Every `announce_interval_s` (±10 %
  jitter so nodes do not synchronise) the node multicasts ONE unsolicited response with its
  PTR, SRV, TXT and A records — the same packet zeroconf sends when registering, sent once,
  without unregistering (which would make peers drop and re-add it). Measured on lo: exactly
  one packet per interval per node (8 in 4 s at 0.5 s), i.e. 0.2 packets/s per node at the 5 s
  default; a node that registered during a 16 s simulated partition was found 0.9 s after the
  heal with a 1 s interval, and not at all within 5 s without re-announcing. Peers first find a
  new node about 1.3 s after its start().
- Instance name: f"{node}@{cluster}" with '.' replaced by '-', cut to 63 bytes. zeroconf does
  not escape dots, so a dot would split the instance into several DNS labels (RFC 6763 §4.3);
  the name is only a label for humans and conflicts: the TXT record is the truth. A conflict
  (two nodes with one name) is resolved by zeroconf renaming the later one (`-2`).
- The A record's host name is unique per MdnsDiscovery (random suffix): several nodes on one
  host (127.0.0.x tests), or two nodes given one name by mistake, must not merge or flush each
  other's address records.

Must not: decide liveness (a SIGKILLed node stays a candidate until its records' TTL runs out;
the relay's heartbeats notice it), block in `poll`, join another cluster's nodes (services
whose TXT `cluster` differs are ignored), list this node itself (services with our node name),
or resolve in zeroconf's event-loop thread with blocking calls.

Invariants:
- Candidates are IPv4 only, port from the SRV record, node/key from TXT `node`/`pk`.
- A service removed (goodbye or TTL expiry) disappears from `poll` at once; a resolution that
  finishes after its removal is dropped (generation counter per service name).
- `close()` cancels the re-announce, stops browsing, sends goodbye packets and closes zeroconf;
  it is idempotent and safe before `start()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import random
import re
import secrets
import threading
from collections.abc import Sequence
from typing import Final

from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf
from zeroconf.asyncio import AsyncServiceInfo

from mesh.discovery import Candidate, DiscoveryError

log = logging.getLogger("mesh.discovery.mdns")

SERVICE_TYPE: Final = "_meshmq._tcp.local."
TXT_VERSION: Final = "1"
RESOLVE_TIMEOUT_MS: Final = 3000
# A resolution that timed out is tried again after max(announce interval, this), until the
# service is removed (its records expire) or resolves.
MIN_RETRY_S: Final = 1.0
JITTER: Final = 0.1
_MAX_LABEL_BYTES: Final = 63


def instance_label(node_name: str, cluster_name: str) -> str:
    """The DNS-SD instance label: f"{node}@{cluster}", dots replaced, at most 63 UTF-8 bytes."""
    label = f"{node_name}@{cluster_name}".replace(".", "-")
    return label.encode()[:_MAX_LABEL_BYTES].decode(errors="ignore")


def host_label(node_name: str, nonce: str) -> str:
    """A host name label for the A record: readable, unique per MdnsDiscovery (random `nonce`).

    Two nodes must never share it, even two that share a node name by mistake: address records
    of one host name merge in every cache, and each node would advertise the other's address.
    """
    readable = re.sub(r"[^A-Za-z0-9-]+", "-", node_name).strip("-")[:40] or "node"
    return f"meshmq-{readable}-{nonce}"


class MdnsDiscovery:
    """Announce this node and browse for others with python-zeroconf on the given interfaces only.

    TXT: v=1, cluster=<name>, node=<node name>, inc=<incarnation>, pk=<curve public z85 or empty>.
    Re-announces every announce_interval_s (one unsolicited response with the same records);
    ignores services of another cluster name and its own node name. `start()` returns at once
    (registration probing runs on zeroconf's own thread). poll() returns the current candidates
    (addresses from the ServiceInfo, IPv4 only, port from the SRV record)."""

    def __init__(
        self,
        cluster_name: str,
        node_name: str,
        incarnation: int,
        port: int,
        address: str,
        interfaces: Sequence[str],
        announce_interval_s: float,
        public_key: str = "",
    ) -> None:
        if not cluster_name:
            raise ValueError("mDNS discovery needs a cluster name")
        if not node_name:
            raise ValueError("mDNS discovery needs a node name")
        if not 1 <= port <= 65535:
            raise ValueError(f"mDNS discovery: port {port} is out of range (1..65535)")
        if not interfaces:
            raise ValueError(
                "mDNS discovery needs the IPv4 addresses of the interfaces to use; "
                "MeshMQ never announces on every interface by surprise"
            )
        for interface in (*interfaces, address):
            try:
                ipaddress.IPv4Address(interface)
            except ValueError:
                raise ValueError(f"mDNS discovery: {interface!r} is not an IPv4 address") from None
        if not announce_interval_s > 0:
            raise ValueError(
                f"mDNS discovery: announce_interval_s must be positive, got {announce_interval_s!r}"
            )
        self._cluster = cluster_name
        self._node = node_name
        self._incarnation = incarnation
        self._port = port
        self._address = address
        self._interfaces = tuple(interfaces)
        self._announce_s = announce_interval_s
        self._retry_s = max(announce_interval_s, MIN_RETRY_S)
        self._public_key = public_key
        self._nonce = secrets.token_hex(5)

        self._lock = threading.Lock()
        self._found: dict[str, tuple[Candidate, ...]] = {}  # service name -> its candidates
        self._generation: dict[str, int] = {}  # service name -> bumped on add/update/remove
        self._known: set[str] = set()  # service names the browser currently lists
        self._resolving: set[str] = set()
        self._ignored: dict[str, str] = {}  # service name -> why (another cluster, ourselves, ...)
        self._announcements = 0
        self._started = False
        self._closed = False
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._announcer: concurrent.futures.Future[None] | None = None

    def __repr__(self) -> str:
        return f"MdnsDiscovery({self._node}@{self._cluster} on {', '.join(self._interfaces)})"

    # --- the public surface ---------------------------------------------------------------------

    @property
    def service_name(self) -> str:
        """The registered instance name (zeroconf may have renamed it after a conflict)."""
        return self._info.name if self._info is not None else ""

    @property
    def announcements(self) -> int:
        """Re-announcements sent so far (not counting registration's own packets)."""
        with self._lock:
            return self._announcements

    def start(self) -> None:
        """Open zeroconf on the interfaces, browse, and register in the background."""
        with self._lock:
            if self._closed:
                raise DiscoveryError(f"{self!r} is closed")
            if self._started:
                return
            self._started = True
        try:
            zc = Zeroconf(interfaces=list(self._interfaces), ip_version=IPVersion.V4Only, use_asyncio=False)
        except OSError as exc:
            raise DiscoveryError(
                f"mDNS: cannot open multicast sockets on {', '.join(self._interfaces)}: {exc}"
            ) from exc
        try:
            self._begin(zc)
        except BaseException:
            zc.close()
            raise

    def _begin(self, zc: Zeroconf) -> None:
        loop = zc.loop
        assert loop is not None  # set by Zeroconf() when its thread starts
        self._zc = zc
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{instance_label(self._node, self._cluster)}.{SERVICE_TYPE}",
            port=self._port,
            properties={
                "v": TXT_VERSION,
                "cluster": self._cluster,
                "node": self._node,
                "inc": str(self._incarnation),
                "pk": self._public_key,
            },
            server=f"{host_label(self._node, self._nonce)}.local.",
            addresses=[ipaddress.IPv4Address(self._address).packed],
        )
        self._browser = ServiceBrowser(zc, SERVICE_TYPE, listener=_Listener(self))
        self._announcer = asyncio.run_coroutine_threadsafe(self._register_and_announce(zc, self._info), loop)
        self._announcer.add_done_callback(self._announcer_done)

    def poll(self, now: float) -> list[Candidate]:
        with self._lock:
            return [candidate for name in sorted(self._found) for candidate in self._found[name]]

    def close(self) -> None:
        """Unregister (goodbye packets) and close zeroconf; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._found.clear()
        if self._announcer is not None:
            self._announcer.cancel()
        if self._browser is not None:
            self._browser.cancel()
        if self._zc is not None:
            try:
                self._zc.unregister_all_services()  # goodbyes: about 0.25 s
            except Exception as exc:  # e.g. EventLoopBlocked: closing must still happen
                log.warning("mDNS: goodbye packets not sent: %s", exc)
            self._zc.close()

    # --- registration and re-announcement (zeroconf's event loop) -----------------------------

    async def _register_and_announce(self, zc: Zeroconf, info: ServiceInfo) -> None:
        broadcasts = await zc.async_register_service(info, allow_name_change=True)
        log.info("mDNS: registered %s (%s:%d)", info.name, self._address, self._port)
        await broadcasts
        while True:
            await asyncio.sleep(self._announce_s * random.uniform(1 - JITTER, 1 + JITTER))
            zc.async_send(zc.generate_service_broadcast(info, None))
            with self._lock:
                self._announcements += 1

    def _announcer_done(self, future: concurrent.futures.Future[None]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None and not self._closed:
            log.error("mDNS: registration or re-announce of %s stopped: %r", self.service_name, exc)

    # --- browsing (browser thread) and resolution (zeroconf's event loop) ---------------------

    def _service_seen(self, name: str) -> None:
        """A service appeared or changed: (re)resolve it."""
        zc = self._zc
        with self._lock:
            if self._closed or zc is None or zc.loop is None:
                return
            self._known.add(name)
            self._generation[name] = self._generation.get(name, 0) + 1
            generation = self._generation[name]
        asyncio.run_coroutine_threadsafe(self._resolve(zc, name, generation), zc.loop)

    def _service_gone(self, name: str) -> None:
        with self._lock:
            self._known.discard(name)
            self._generation[name] = self._generation.get(name, 0) + 1
            self._found.pop(name, None)
            self._ignored.pop(name, None)

    async def _resolve(self, zc: Zeroconf, name: str, generation: int) -> None:
        with self._lock:
            if name in self._resolving:  # the running resolution re-checks the generation
                return
            self._resolving.add(name)
        try:
            while True:
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                resolved = await info.async_request(zc, RESOLVE_TIMEOUT_MS)
                with self._lock:
                    if self._closed or name not in self._known:
                        return
                    current = self._generation[name]
                if resolved and current == generation:
                    self._apply(name, generation, info)
                    return
                if resolved:  # updated while we resolved: resolve the newest records
                    generation = current
                    continue
                log.debug("mDNS: %s did not resolve within %d ms; retrying", name, RESOLVE_TIMEOUT_MS)
                await asyncio.sleep(self._retry_s)
                with self._lock:
                    if self._closed or name not in self._known:
                        return
                    generation = self._generation[name]
        finally:
            with self._lock:
                self._resolving.discard(name)

    def _apply(self, name: str, generation: int, info: ServiceInfo) -> None:
        txt = {
            key.decode(errors="replace"): (value or b"").decode(errors="replace")
            for key, value in info.properties.items()
        }
        why = ""
        if txt.get("cluster") != self._cluster:
            why = f"cluster {txt.get('cluster', '')!r}"
        elif txt.get("v") != TXT_VERSION:
            why = f"TXT version {txt.get('v', '')!r}"
        elif txt.get("node") == self._node:
            why = "this node's name"
        elif not txt.get("node"):
            why = "no node name"
        port = info.port
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not why and (port is None or not addresses):
            why = "no IPv4 address or port"
        candidates = tuple(
            Candidate(host=address, port=port or 0, node=txt["node"], source="mdns", key=txt.get("pk", ""))
            for address in ([] if why else addresses)
        )
        news = False
        with self._lock:
            if self._closed or self._generation.get(name) != generation or name not in self._known:
                return
            if why:
                self._found.pop(name, None)
                news = self._ignored.get(name) != why
                self._ignored[name] = why
            else:
                news = self._found.get(name) != candidates
                self._found[name] = candidates
        if why and news:
            log.debug("mDNS: ignoring %s (%s)", name, why)
        elif not why and news:
            log.info("mDNS: found %s at %s", txt["node"], ", ".join(f"{c.host}:{c.port}" for c in candidates))


class _Listener(ServiceListener):
    """Forwards the browser thread's events; resolution happens on zeroconf's loop, not here."""

    def __init__(self, owner: MdnsDiscovery) -> None:
        self._owner = owner

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._owner._service_seen(name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._owner._service_seen(name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._owner._service_gone(name)
