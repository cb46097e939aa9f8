"""The static member list (`mesh/discovery/static.py`): every entry syntax, ranges, errors, and
host names resolved in the background (an injected resolver, and `localhost` for real)."""

from __future__ import annotations

import time

import pytest

from mesh.discovery import Candidate
from mesh.discovery.static import StaticDiscovery, parse_member


def _static(host: str, port: int = 7946, node: str = "") -> Candidate:
    return Candidate(host=host, port=port, node=node, source="static")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.5", [_static("10.0.0.5")]),
        ("  10.0.0.5  ", [_static("10.0.0.5")]),
        ("10.0.0.5:1883", [_static("10.0.0.5", 1883)]),
        ("broker-2.example", [_static("broker-2.example")]),
        ("broker-2.example:17946", [_static("broker-2.example", 17946)]),
        ("compose_service", [_static("compose_service")]),
        ("localhost.", [_static("localhost.")]),
        ("::1", [_static("::1")]),
        ("fe80:0:0::1", [_static("fe80::1")]),  # normalised
        ("[::1]", [_static("::1")]),
        ("[2001:db8::7]:9000", [_static("2001:db8::7", 9000)]),
        ("node2@10.0.0.5", [_static("10.0.0.5", node="node2")]),
        ("node2@10.0.0.5:9", [_static("10.0.0.5", 9, node="node2")]),
        ("n.o_d-e@[::1]:9", [_static("::1", 9, node="n.o_d-e")]),
        ("b@broker-b:7000", [_static("broker-b", 7000, node="b")]),
        ("10.1.2.3-3", [_static("10.1.2.3")]),
    ],
)
def test_entry_syntax(text: str, expected: list[Candidate]) -> None:
    assert parse_member(text, 7946) == expected


def test_range_expands_in_order_with_port() -> None:
    found = parse_member("192.168.1.100-110:7000", 7946)
    assert [c.host for c in found] == [f"192.168.1.{i}" for i in range(100, 111)]
    assert {c.port for c in found} == {7000}
    assert {c.source for c in found} == {"static"}


def test_largest_range_is_256_addresses() -> None:
    found = parse_member("10.9.8.0-255", 7946)
    assert len(found) == 256
    assert found[0].host == "10.9.8.0"
    assert found[-1].host == "10.9.8.255"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty member"),
        ("   ", "empty member"),
        ("10.0.0.5:", "port '' is not a number"),
        ("10.0.0.5:abc", "port 'abc' is not a number"),
        ("10.0.0.5:0", "out of range"),
        ("10.0.0.5:65536", "out of range"),
        ("[::1", "without a closing"),
        ("[::1]x", "expected ':port'"),
        ("[host]:1", "not an IPv6 address"),
        ("fe80::zz", "not an IPv6 address"),
        ("10.0.0.300", "not a valid IPv4 address"),
        ("10.0.0", "not a valid IPv4 address"),
        ("10.0.0.10-5", "starts after it ends"),
        ("10.0.0.0-256", "at most 255"),
        ("10.0.0.1-300", "at most 255"),
        ("10.0.300.1-3", "not an address octet"),
        ("10.0.0.1-", "not a valid range"),
        ("10.0.0.1-2-3", "not a valid range"),
        ("192.168.1.100-192.168.1.110", "not a valid range"),
        ("n@10.0.0.1-5", "node name cannot be given for a range"),
        ("@10.0.0.1", "node name ''"),
        ("-bad@10.0.0.1", "node name '-bad'"),
        ("node@", "nothing after '@'"),
        ("bad host", "neither an IP address"),
        ("host!:80", "neither an IP address"),
        ("-leading.example", "neither an IP address"),
        ("a" * 64 + ".example", "neither an IP address"),
        ("a@b@c", "neither an IP address"),
    ],
)
def test_bad_entries_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_member(text, 7946)


def test_static_discovery_names_the_bad_member() -> None:
    with pytest.raises(ValueError, match=r"members\[1\]: '10.0.0.9-1'"):
        StaticDiscovery(["10.0.0.1", "10.0.0.9-1"], 7946)


def test_poll_returns_addresses_deduplicated_in_list_order() -> None:
    static = StaticDiscovery(["10.0.0.2", "n1@10.0.0.1", "10.0.0.1-3", "10.0.0.2:8000"], 7946)
    try:
        assert static.poll(0.0) == [
            _static("10.0.0.2"),
            _static("10.0.0.1", node="n1"),
            _static("10.0.0.3"),
            _static("10.0.0.2", 8000),
        ]
    finally:
        static.close()


def _wait_for(static: StaticDiscovery, count: int) -> list[Candidate]:
    deadline = time.monotonic() + 5.0
    found = static.poll(0.0)
    while len(found) < count and time.monotonic() < deadline:
        time.sleep(0.01)
        found = static.poll(0.0)
    return found


def test_host_names_are_resolved_in_the_background() -> None:
    answers = {"b.example": ["192.0.2.7", "192.0.2.8"], "c.example": ["2001:db8::c"]}
    asked: list[str] = []

    def resolve(name: str) -> list[str]:
        asked.append(name)
        return answers[name]

    started = time.monotonic()
    static = StaticDiscovery(
        ["192.0.2.1", "nb@b.example:7000", "c.example", "b.example:7000"], 7946, resolve=resolve
    )
    try:
        assert time.monotonic() - started < 0.5
        found = _wait_for(static, 4)
        assert found == [
            _static("192.0.2.1"),
            _static("192.0.2.7", 7000, node="nb"),
            _static("192.0.2.8", 7000, node="nb"),
            _static("2001:db8::c"),
        ]
        assert sorted(asked[:2]) == ["b.example", "c.example"]  # each name once per round
    finally:
        static.close()


def test_unresolved_name_contributes_nothing_yet() -> None:
    def resolve(name: str) -> list[str]:
        raise OSError("no such host")

    static = StaticDiscovery(["192.0.2.1", "nowhere.invalid"], 7946, resolve=resolve)
    try:
        time.sleep(0.05)
        assert static.poll(0.0) == [_static("192.0.2.1")]
    finally:
        static.close()


def test_localhost_resolves_for_real() -> None:
    static = StaticDiscovery(["me@localhost:7000"], 7946)
    try:
        found = _wait_for(static, 1)
        assert _static("127.0.0.1", 7000, node="me") in found
    finally:
        static.close()
        static.close()  # idempotent
