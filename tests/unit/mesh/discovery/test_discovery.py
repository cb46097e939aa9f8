"""All sources together (`mesh/discovery/__init__.py`): the union deduplicated by (host, port),
a failing source skipped and logged once per streak, close of every source, and
`build_discovery` from a MeshConfig-shaped object (duck-typed: mesh never imports broker)."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import pytest

from mesh.discovery import Candidate, Discovery, build_discovery
from mesh.discovery.dns import DnsDiscovery
from mesh.discovery.static import StaticDiscovery


class FakeSource:
    def __init__(self, *answers: list[Candidate] | Exception) -> None:
        self.answers = list(answers)
        self.polls = 0
        self.closed = 0

    def poll(self, now: float) -> list[Candidate]:
        answer = self.answers[min(self.polls, len(self.answers) - 1)]
        self.polls += 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> None:
        self.closed += 1
        if self.closed == 1 and self.answers and isinstance(self.answers[-1], Exception):
            raise RuntimeError("close failed")

    def __repr__(self) -> str:
        return "FakeSource"


def test_union_is_deduplicated_by_host_and_port_first_source_wins() -> None:
    a = FakeSource([Candidate("10.0.0.1", 1, source="static"), Candidate("10.0.0.2", 1, source="static")])
    b = FakeSource(
        [
            Candidate("10.0.0.2", 1, node="n2", source="mdns", key="K2"),
            Candidate("10.0.0.2", 2, node="n2b", source="mdns"),
            Candidate("10.0.0.3", 1, source="mdns"),
            Candidate("10.0.0.1", 1, node="", source="mdns"),
        ]
    )
    assert Discovery([a, b]).poll(0.0) == [
        Candidate("10.0.0.1", 1, source="static"),
        Candidate("10.0.0.2", 1, node="n2", source="static", key="K2"),  # name and key filled in
        Candidate("10.0.0.2", 2, node="n2b", source="mdns"),
        Candidate("10.0.0.3", 1, source="mdns"),
    ]


def test_a_failing_source_is_skipped_and_logged_once_per_streak(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mesh.discovery")
    good = FakeSource([Candidate("10.0.0.1", 1)])
    bad = FakeSource(ValueError("boom"), ValueError("boom"), [Candidate("10.0.0.9", 1)], ValueError("again"))
    discovery = Discovery([bad, good])
    assert discovery.poll(0.0) == [Candidate("10.0.0.1", 1)]
    assert discovery.poll(1.0) == [Candidate("10.0.0.1", 1)]
    assert discovery.poll(2.0) == [Candidate("10.0.0.9", 1), Candidate("10.0.0.1", 1)]
    assert discovery.poll(3.0) == [Candidate("10.0.0.1", 1)]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert errors[0].exc_info is not None
    assert "FakeSource failed" in errors[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_close_closes_every_source_once_even_when_one_fails() -> None:
    failing = FakeSource([], RuntimeError("x"))
    other = FakeSource([])
    discovery = Discovery([failing, other])
    discovery.close()
    discovery.close()
    assert (failing.closed, other.closed) == (1, 1)


# --- build_discovery ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcpIp:
    enabled: bool = True
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mdns:
    enabled: bool = False
    interfaces: tuple[str, ...] = ()
    announce_interval_ms: int = 5000


@dataclass(frozen=True)
class Dns:
    enabled: bool = False
    names: tuple[str, ...] = ()
    refresh_ms: int = 5000


@dataclass(frozen=True)
class Mesh:
    cluster_name: str = "meshmq"
    port: int = 7946
    tcp_ip: TcpIp = field(default_factory=TcpIp)
    mdns: Mdns = field(default_factory=Mdns)
    dns: Dns = field(default_factory=Dns)


def test_build_nothing_enabled_is_an_empty_discovery() -> None:
    discovery = build_discovery(Mesh(), "n1", 1, "127.0.0.1")
    assert discovery.sources == ()
    assert discovery.poll(0.0) == []
    discovery.close()


def test_build_static_and_dns_with_the_mesh_port() -> None:
    mesh = Mesh(
        port=7000,
        tcp_ip=TcpIp(members=("127.0.0.2", "b@127.0.0.3:7100")),
        dns=Dns(enabled=True, names=("localhost",), refresh_ms=60_000),
    )
    discovery = build_discovery(mesh, "n1", 1, "127.0.0.1")
    try:
        assert [type(s) for s in discovery.sources] == [StaticDiscovery, DnsDiscovery]
        deadline = time.monotonic() + 5.0
        found = discovery.poll(0.0)
        while len(found) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
            found = discovery.poll(0.0)
        assert found[:2] == [
            Candidate("127.0.0.2", 7000, source="static"),
            Candidate("127.0.0.3", 7100, node="b", source="static"),
        ]
        assert Candidate("127.0.0.1", 7000, source="dns") in found
    finally:
        discovery.close()


def test_build_disabled_sources_are_left_out() -> None:
    mesh = Mesh(tcp_ip=TcpIp(enabled=False, members=("127.0.0.2",)), dns=Dns(enabled=False, names=("x",)))
    discovery = build_discovery(mesh, "n1", 1, "127.0.0.1")
    assert discovery.sources == ()


def test_build_bad_member_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"members\[0\]: '10.0.0.9-1'"):
        build_discovery(Mesh(tcp_ip=TcpIp(members=("10.0.0.9-1",))), "n1", 1, "127.0.0.1")


def test_build_mdns_without_interfaces_is_refused_and_closes_the_others() -> None:
    mesh = Mesh(
        tcp_ip=TcpIp(members=("localhost",)),
        mdns=Mdns(enabled=True, interfaces=()),
    )
    with pytest.raises(ValueError, match="never announces on every interface"):
        build_discovery(mesh, "n1", 1, "127.0.0.1")


@pytest.mark.usefixtures("mdns_on_loopback")
def test_build_mdns_starts_it() -> None:
    cluster = f"t-{uuid.uuid4().hex[:12]}"
    mesh = Mesh(
        cluster_name=cluster, mdns=Mdns(enabled=True, interfaces=("127.0.0.1",), announce_interval_ms=500)
    )
    started = time.monotonic()
    one = build_discovery(mesh, "one", 1, "127.0.0.2", public_key="PK1")
    two = build_discovery(mesh, "two", 1, "127.0.0.3", public_key="PK2")
    try:
        assert time.monotonic() - started < 2.0
        deadline = time.monotonic() + 10.0
        while not one.poll(0.0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert one.poll(0.0) == [Candidate("127.0.0.3", 7946, node="two", source="mdns", key="PK2")]
    finally:
        one.close()
        two.close()
