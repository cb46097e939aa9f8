"""DNS discovery (`mesh/discovery/dns.py`): every address of a name is a candidate, lookups run
in a background thread (poll never blocks), a failed lookup keeps the last good answer and is
logged once per failure streak; with an injected resolver and with `localhost` for real."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from mesh.discovery import Candidate
from mesh.discovery.dns import BackgroundResolver, DnsDiscovery, resolve_addresses, split_host_port

REFRESH_S = 0.01


def _dns(host: str, port: int = 7946) -> Candidate:
    return Candidate(host=host, port=port, source="dns")


def _wait_rounds(rounds: Callable[[], int], at_least: int) -> None:
    deadline = time.monotonic() + 5.0
    while rounds() < at_least:
        assert time.monotonic() < deadline, f"resolver did not finish {at_least} rounds in 5 s"
        time.sleep(0.005)


class Script:
    """A resolver that answers from a script: one entry per call and name, the last repeated.

    With `gated`, each lookup waits until the test allows it (`allow`), so the test knows
    exactly which answers the resolver has given when it polls.
    """

    def __init__(self, script: dict[str, list[list[str] | Exception]], gated: bool = False) -> None:
        self.script = script
        self.calls: dict[str, int] = {}
        self.gate = threading.Semaphore(0) if gated else None

    def allow(self, lookups: int) -> None:
        assert self.gate is not None
        self.gate.release(lookups)

    def __call__(self, name: str) -> list[str]:
        if self.gate is not None:
            self.gate.acquire(timeout=10.0)
        count = self.calls.get(name, 0)
        self.calls[name] = count + 1
        steps = self.script[name]
        step = steps[min(count, len(steps) - 1)]
        if isinstance(step, Exception):
            raise step
        return step


def test_every_address_is_a_candidate_with_the_names_port() -> None:
    resolve = Script(
        {
            "meshmq-headless": [["192.0.2.1", "192.0.2.2", "192.0.2.1"]],
            "other": [["2001:db8::5", "192.0.2.2"]],
        }
    )
    dns = DnsDiscovery(["meshmq-headless", "other:7000"], 7946, REFRESH_S, resolve=resolve)
    try:
        _wait_rounds(lambda: dns.rounds, 1)
        assert dns.poll(0.0) == [
            _dns("192.0.2.1"),
            _dns("192.0.2.2"),
            _dns("2001:db8::5", 7000),
            _dns("192.0.2.2", 7000),
        ]
    finally:
        dns.close()


def test_lookups_repeat_every_refresh() -> None:
    resolve = Script({"svc": [["192.0.2.1"], ["192.0.2.1"], ["192.0.2.9"]]})
    dns = DnsDiscovery(["svc"], 7946, REFRESH_S, resolve=resolve)
    try:
        _wait_rounds(lambda: dns.rounds, 4)
        assert dns.poll(0.0) == [_dns("192.0.2.9")]  # a new answer replaces the old one
    finally:
        dns.close()


def test_failure_keeps_the_last_answer_and_logs_once_per_streak(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mesh.discovery.dns")
    resolve = Script(
        {
            "svc": [
                ["192.0.2.1", "192.0.2.2"],
                OSError("Temporary failure in name resolution"),
                [],  # no address at all is a failure too
                OSError("Temporary failure in name resolution"),
                ["192.0.2.3"],
                RuntimeError("resolver bug"),
            ]
        },
        gated=True,
    )
    dns = DnsDiscovery(["svc"], 7946, REFRESH_S, resolve=resolve)
    try:
        resolve.allow(1)
        _wait_rounds(lambda: dns.rounds, 1)
        assert dns.poll(0.0) == [_dns("192.0.2.1"), _dns("192.0.2.2")]
        resolve.allow(3)
        _wait_rounds(lambda: dns.rounds, 4)  # three failed rounds in a row
        assert dns.poll(0.0) == [_dns("192.0.2.1"), _dns("192.0.2.2")]
        resolve.allow(3)
        _wait_rounds(lambda: dns.rounds, 7)  # recovered, then failing (a bug) again, twice
        assert dns.poll(0.0) == [_dns("192.0.2.3")]
    finally:
        dns.close()
        resolve.allow(1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one per failure streak, not one per failed lookup
    assert "'svc': lookup failed (OSError: Temporary failure" in warnings[0]
    assert "keeping the last answer (2 addresses)" in warnings[0]
    assert "RuntimeError: resolver bug" in warnings[1]
    assert "keeping the last answer (1 address)" in warnings[1]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["DNS name 'svc' resolves again: 192.0.2.3"]


def test_a_name_that_never_resolved_has_no_candidates() -> None:
    dns = DnsDiscovery(["nowhere"], 7946, REFRESH_S, resolve=Script({"nowhere": [OSError("NXDOMAIN")]}))
    try:
        _wait_rounds(lambda: dns.rounds, 2)
        assert dns.poll(0.0) == []
    finally:
        dns.close()


def test_poll_never_blocks_on_a_slow_resolver() -> None:
    release = threading.Event()

    def stuck(name: str) -> list[str]:
        release.wait(10.0)
        return ["192.0.2.1"]

    started = time.monotonic()
    dns = DnsDiscovery(["slow"], 7946, REFRESH_S, resolve=stuck)
    try:
        assert dns.poll(0.0) == []
        assert time.monotonic() - started < 0.5
    finally:
        closing = time.monotonic()
        dns.close()  # abandons the lookup in progress instead of waiting for it
        assert time.monotonic() - closing < 1.0
        release.set()


def test_close_stops_the_thread_and_is_idempotent() -> None:
    resolve = Script({"svc": [["192.0.2.1"]]})
    resolver = BackgroundResolver(["svc"], REFRESH_S, resolve)
    _wait_rounds(lambda: resolver.rounds, 2)
    resolver.close()
    resolver.close()
    rounds = resolver.rounds
    time.sleep(0.05)
    assert resolver.rounds == rounds
    assert resolver.addresses("svc") == ("192.0.2.1",)  # the answer stays readable


def test_localhost_resolves_for_real() -> None:
    assert "127.0.0.1" in resolve_addresses("localhost")
    dns = DnsDiscovery(["localhost"], 7946, 60.0)
    try:
        _wait_rounds(lambda: dns.rounds, 1)
        found = dns.poll(0.0)
        assert _dns("127.0.0.1") in found
        assert len(found) == len(set(found))
    finally:
        dns.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("svc", ("svc", 7946)),
        ("svc:80", ("svc", 80)),
        ("[::1]:80", ("::1", 80)),
        ("[::1]", ("::1", 7946)),
        ("::1", ("::1", 7946)),
    ],
)
def test_split_host_port(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text, 7946) == expected


@pytest.mark.parametrize("text", ["svc:", "svc:x", ":80", "svc:70000", "[::1", "[nope]:1"])
def test_bad_names_are_errors(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text).replace("[", r"\[")):
        DnsDiscovery([text], 7946, REFRESH_S, resolve=Script({}))


def test_refresh_must_be_positive() -> None:
    with pytest.raises(ValueError, match="refresh_s must be positive"):
        DnsDiscovery(["svc"], 7946, 0.0, resolve=Script({}))
