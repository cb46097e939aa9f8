"""DNS discovery: names that resolve to several addresses, every address a candidate.

Why: in Kubernetes a headless service name resolves to the address of every ready pod, and in
compose a service name to every replica; resolving such a name every few seconds finds the
cluster's nodes with no list to maintain. `BackgroundResolver` is also how the static list
resolves the host names it holds.

Must not: resolve in `poll` (the system resolver can stall for many seconds; the relay's
heartbeat must not), forget a good answer because one lookup failed (a DNS hiccup must not make
the cluster forget its peers), or log a failing name on every refresh.

Invariants:
- Lookups run in one daemon thread per resolver: the first round at once, then one round every
  `refresh_s` until `close()`; `close()` stops the thread within one lookup.
- A name's answer is replaced only by a successful, non-empty lookup; a failure (an exception
  or no address at all) keeps the previous answer, is logged once when the failure streak
  starts and once when it ends.
- Answers are IP addresses in text form, deduplicated, in the resolver's order.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Sequence

from mesh.discovery import Candidate

log = logging.getLogger("mesh.discovery.dns")

Resolve = Callable[[str], list[str]]

# A thread blocked in getaddrinfo cannot be interrupted; close() waits this long for it and then
# leaves it (it is a daemon thread and exits after the lookup).
_JOIN_TIMEOUT_S = 0.2


def resolve_addresses(name: str) -> list[str]:
    """`name`'s IPv4 and IPv6 addresses from the system resolver, deduplicated, in its order."""
    seen: dict[str, None] = {}
    for _family, _type, _proto, _canon, sockaddr in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM):
        seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port` or `[v6]:port` -> (host without brackets, port). Raises ValueError.

    A bare IPv6 address (`fe80::1`) is taken whole, without a port: use brackets to add one.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"{text!r}: '[' without a closing ']'")
        host, rest = text[1:close], text[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':port' after ']', got {rest!r}")
        return host, parse_port(text, rest[1:])
    if text.count(":") > 1:
        try:
            return str(ipaddress.IPv6Address(text)), default_port
        except ValueError:
            raise ValueError(
                f"{text!r}: not an IPv6 address (write an IPv6 address with a port as [address]:port)"
            ) from None
    host, colon, port = text.partition(":")
    if not host:
        raise ValueError(f"{text!r}: empty host")
    return host, (parse_port(text, port) if colon else default_port)


def parse_port(text: str, port: str) -> int:
    """A port number 1..65535 from its decimal digits; ValueError naming `text` otherwise."""
    if not port.isascii() or not port.isdigit():
        raise ValueError(f"{text!r}: port {port!r} is not a number")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"{text!r}: port {number} is out of range (1..65535)")
    return number


class BackgroundResolver:
    """Resolves a fixed set of names in a daemon thread, every `refresh_s`; never blocks readers."""

    def __init__(
        self, names: Sequence[str], refresh_s: float, resolve: Resolve | None = None, what: str = "DNS name"
    ) -> None:
        if not refresh_s > 0:
            raise ValueError(f"refresh_s must be positive, got {refresh_s!r}")
        self._names = tuple(dict.fromkeys(names))
        self._refresh_s = refresh_s
        self._resolve = resolve if resolve is not None else resolve_addresses
        self._what = what
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[str, ...]] = {}
        self._failing: set[str] = set()
        self._rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meshmq-dns-resolver", daemon=True)
        self._thread.start()

    def addresses(self, name: str) -> tuple[str, ...]:
        """The last good answer for `name` (empty before its first successful lookup)."""
        with self._lock:
            return self._answers.get(name, ())

    @property
    def rounds(self) -> int:
        """How many rounds of lookups have finished (for tests and metrics)."""
        with self._lock:
            return self._rounds

    def close(self) -> None:
        """Stop the thread (idempotent); a lookup in progress is abandoned, not waited for."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(_JOIN_TIMEOUT_S)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name in self._names:
                if self._stop.is_set():
                    return
                self._lookup(name)
            with self._lock:
                self._rounds += 1
            if self._stop.wait(self._refresh_s):
                return

    def _lookup(self, name: str) -> None:
        try:
            found = tuple(dict.fromkeys(self._resolve(name)))
            problem = "" if found else "no addresses"
        except Exception as exc:
            # The resolver thread's one catch: any failure of a lookup (socket.gaierror, or a bug
            # in an injected resolver) is a failed lookup, logged below; the thread goes on.
            found, problem = (), f"{type(exc).__name__}: {exc}"
        with self._lock:
            was_failing = name in self._failing
            if found:
                self._answers[name] = found
                self._failing.discard(name)
            else:
                self._failing.add(name)
            kept = len(self._answers.get(name, ()))
        if found and was_failing:
            log.info("%s %r resolves again: %s", self._what, name, ", ".join(found))
        elif not found and not was_failing:
            log.warning(
                "%s %r: lookup failed (%s); keeping the last answer (%d address%s) until it resolves again",
                self._what,
                name,
                problem,
                kept,
                "" if kept == 1 else "es",
            )


class DnsDiscovery:
    """Names that resolve to several addresses (Kubernetes headless services, compose service
    names): every address is a candidate. Resolves in a daemon thread every refresh_s, so poll()
    never blocks; keeps the last good answer when a lookup fails (logs once per failure streak)."""

    def __init__(
        self,
        names: Sequence[str],
        default_port: int,
        refresh_s: float,
        resolve: Callable[[str], list[str]] | None = None,
    ) -> None:
        # Each entry is "name" or "name:port" (the configuration's Mesh.Dns.Names).
        self._entries = tuple(split_host_port(name.strip(), default_port) for name in names)
        self._resolver = BackgroundResolver([host for host, _port in self._entries], refresh_s, resolve)

    def __repr__(self) -> str:
        return f"DnsDiscovery({', '.join(f'{host}:{port}' for host, port in self._entries)})"

    @property
    def rounds(self) -> int:
        """How many rounds of lookups have finished (tests wait on it)."""
        return self._resolver.rounds

    def poll(self, now: float) -> list[Candidate]:
        found: dict[tuple[str, int], Candidate] = {}
        for host, port in self._entries:
            for address in self._resolver.addresses(host):
                found.setdefault((address, port), Candidate(host=address, port=port, source="dns"))
        return list(found.values())

    def close(self) -> None:
        self._resolver.close()
