"""mDNS discovery on loopback (`mesh/discovery/mdns.py`).

Every test uses its own random cluster name: parallel tests see each other's services on lo.
Real zeroconf instances on `interfaces=["127.0.0.1"]` (never the defaults): nodes of one cluster
find each other, another cluster and the node itself are ignored, goodbyes remove a node, a
name conflict is renamed, re-announcement finds a node that registered during a (simulated)
partition and costs one packet per interval (measured with a socket in the mDNS group on lo).
The TXT filtering is also tested without a network, on crafted ServiceInfo records.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from zeroconf import ServiceInfo

from mesh.discovery import Candidate, DiscoveryError
from mesh.discovery.mdns import SERVICE_TYPE, MdnsDiscovery, host_label, instance_label

MakeNode = Callable[..., MdnsDiscovery]
FIND_TIMEOUT_S = 10.0


def _cluster() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _wait_for(predicate: Callable[[], bool], timeout_s: float = FIND_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _mdns(host: str, port: int, node: str, key: str = "") -> Candidate:
    return Candidate(host=host, port=port, node=node, source="mdns", key=key)


@pytest.fixture
def make_node() -> Iterator[MakeNode]:
    made: list[MdnsDiscovery] = []

    def make(
        cluster: str,
        node: str,
        address: str,
        port: int = 7946,
        interval_s: float = 5.0,
        key: str = "",
        incarnation: int = 1,
        start: bool = True,
    ) -> MdnsDiscovery:
        discovery = MdnsDiscovery(cluster, node, incarnation, port, address, ["127.0.0.1"], interval_s, key)
        made.append(discovery)
        if start:
            started = time.monotonic()
            discovery.start()
            assert time.monotonic() - started < 2.0, "start() must not wait for registration"
        return discovery

    yield make
    for discovery in made:
        discovery.close()


# --- on loopback -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("mdns_on_loopback")
def test_nodes_of_one_cluster_find_each_other_and_nothing_else(make_node: MakeNode) -> None:
    ours, theirs = _cluster(), _cluster()
    a = make_node(ours, "a", "127.0.0.2", 7001, key="KEY-A")
    b = make_node(ours, "b", "127.0.0.3", 7002, key="KEY-B")
    c = make_node(theirs, "c", "127.0.0.4", 7003)
    d = make_node(theirs, "d", "127.0.0.5", 7004)  # proves c was announced on lo, where a and b listen
    assert _wait_for(lambda: bool(a.poll(0.0) and b.poll(0.0) and c.poll(0.0) and d.poll(0.0)))
    time.sleep(0.3)  # let any late packet arrive before checking what was ignored
    assert a.poll(0.0) == [_mdns("127.0.0.3", 7002, "b", "KEY-B")]
    assert b.poll(0.0) == [_mdns("127.0.0.2", 7001, "a", "KEY-A")]
    assert c.poll(0.0) == [_mdns("127.0.0.5", 7004, "d")]
    assert d.poll(0.0) == [_mdns("127.0.0.4", 7003, "c")]


@pytest.mark.usefixtures("mdns_on_loopback")
def test_close_says_goodbye_is_idempotent_and_a_restart_is_found(make_node: MakeNode) -> None:
    cluster = _cluster()
    a = make_node(cluster, "a", "127.0.0.2", 7001)
    b = make_node(cluster, "b", "127.0.0.3", 7002)
    assert _wait_for(lambda: bool(a.poll(0.0)))
    started = time.monotonic()
    b.close()
    b.close()
    assert time.monotonic() - started < 2.0
    assert b.poll(0.0) == []
    assert _wait_for(lambda: a.poll(0.0) == [], 3.0), "the goodbye packets did not remove b"
    with pytest.raises(DiscoveryError, match="closed"):
        b.start()
    # b comes back with a new incarnation on another port: found with the new records.
    make_node(cluster, "b", "127.0.0.3", 7012, incarnation=2)
    assert _wait_for(lambda: a.poll(0.0) == [_mdns("127.0.0.3", 7012, "b")])


def test_close_before_start_is_fine() -> None:
    never = MdnsDiscovery("c", "n", 1, 7946, "127.0.0.1", ["127.0.0.1"], 5.0)
    never.close()
    never.close()
    assert never.poll(0.0) == []


@pytest.mark.usefixtures("mdns_on_loopback")
def test_found_when_registered_before_the_other_browsed(make_node: MakeNode) -> None:
    cluster = _cluster()
    early = make_node(cluster, "early", "127.0.0.2", 7001, interval_s=0.5)
    assert _wait_for(lambda: early.announcements >= 1), "registration did not finish"
    late = make_node(cluster, "late", "127.0.0.3", 7002)
    assert _wait_for(lambda: late.poll(0.0) == [_mdns("127.0.0.2", 7001, "early")])
    assert _wait_for(lambda: early.poll(0.0) == [_mdns("127.0.0.3", 7002, "late")])


@pytest.mark.usefixtures("mdns_on_loopback")
def test_a_second_node_with_the_same_name_is_renamed(make_node: MakeNode) -> None:
    cluster = _cluster()
    observer = make_node(cluster, "observer", "127.0.0.2", 7001)
    first = make_node(cluster, "twin", "127.0.0.3", 7002, interval_s=0.5)
    assert _wait_for(lambda: first.announcements >= 1)
    second = make_node(cluster, "twin", "127.0.0.4", 7003)
    expected = [_mdns("127.0.0.3", 7002, "twin"), _mdns("127.0.0.4", 7003, "twin")]
    assert _wait_for(lambda: sorted(observer.poll(0.0), key=lambda c: c.host) == expected)
    assert first.service_name == f"twin@{cluster}.{SERVICE_TYPE}"
    assert second.service_name == f"twin@{cluster}-2.{SERVICE_TYPE}"
    # Each twin ignores the other: it carries its own node name (the relay sees one node).
    assert [c.node for c in first.poll(0.0)] == ["observer"]
    assert [c.node for c in second.poll(0.0)] == ["observer"]


def _partition(node: MdnsDiscovery) -> Callable[[], int]:
    """Drop every packet `node` sends (as a cut link would); returns heal() -> packets dropped."""
    zc: Any = node._zc
    dropped = [0]

    def drop(*args: object, **kwargs: object) -> None:
        dropped[0] += 1

    zc.async_send = drop

    def heal() -> int:
        del zc.async_send  # the class's method again
        return dropped[0]

    return heal


@pytest.mark.slow
@pytest.mark.usefixtures("mdns_on_loopback")
def test_reannounce_finds_a_node_that_registered_during_a_partition(make_node: MakeNode) -> None:
    """TESTBED.md: without re-announcing, a node registered during a partition is not found long
    after the heal, because browsers only send startup queries (at about 0, 1, 5 and 14 s)."""
    cluster = _cluster()
    browser = make_node(cluster, "browser", "127.0.0.2", 7001, interval_s=1.0)
    periodic = make_node(cluster, "periodic", "127.0.0.3", 7002, interval_s=1.0)
    heal_periodic = _partition(periodic)  # before its registration probes (>= 150 ms after start)
    silent = make_node(cluster, "silent", "127.0.0.4", 7003, interval_s=600.0)
    heal_silent = _partition(silent)
    time.sleep(16.0)  # past the browser's last startup query
    assert browser.poll(0.0) == []
    assert heal_periodic() > 0
    assert heal_silent() > 0
    healed = time.monotonic()
    assert _wait_for(lambda: bool(browser.poll(0.0)), 5.0), "not found within 5 s of the heal"
    found_after_s = time.monotonic() - healed
    print(f"re-announcing node found {found_after_s:.2f} s after the heal")
    assert found_after_s < 2.5  # one interval (1 s) plus jitter and resolution
    time.sleep(max(0.0, 5.0 - found_after_s))
    assert browser.poll(0.0) == [_mdns("127.0.0.3", 7002, "periodic")]  # never "silent"


def _mdns_group_listener() -> socket.socket:
    """A socket in the mDNS group on lo only: it sees every mDNS packet sent on loopback."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("224.0.0.251", 5353))
    membership = socket.inet_aton("224.0.0.251") + socket.inet_aton("127.0.0.1")
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    sock.settimeout(0.05)
    return sock


@pytest.mark.usefixtures("mdns_on_loopback")
def test_reannounce_sends_one_packet_per_interval(make_node: MakeNode) -> None:
    cluster = _cluster()
    marker = f"cluster={cluster}".encode()  # only this node's responses carry its TXT record
    interval_s, window_s = 0.5, 4.0
    node = make_node(cluster, "alone", "127.0.0.2", 7001, interval_s=interval_s)
    assert _wait_for(lambda: node.announcements >= 1)
    listener = _mdns_group_listener()
    try:
        before = node.announcements
        packets = 0
        deadline = time.monotonic() + window_s
        while time.monotonic() < deadline:
            try:
                data = listener.recv(9000)
            except TimeoutError:
                continue
            packets += marker in data
        sent = node.announcements - before
    finally:
        listener.close()
    expected = window_s / interval_s  # 8
    print(f"{sent} re-announcements, {packets} packets with this node's records in {window_s} s")
    assert expected * 0.7 <= sent <= expected * 1.3
    # Nothing else this node sends carries its records in steady state: one packet per interval.
    assert sent - 1 <= packets <= sent + 1, (packets, sent)


# --- TXT filtering, without a network --------------------------------------------------------------


def _info(
    name: str, txt: dict[str, str], address: bytes = b"\x7f\x00\x00\x09", port: int = 7009
) -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        port=port,
        properties=dict(txt),
        server=f"{name}.local.",
        addresses=[address],
    )


def _seen(discovery: MdnsDiscovery, name: str) -> int:
    full = f"{name}.{SERVICE_TYPE}"
    discovery._known.add(full)
    discovery._generation[full] = discovery._generation.get(full, 0) + 1
    return discovery._generation[full]


GOOD_TXT = {"v": "1", "cluster": "ours", "node": "peer", "inc": "3", "pk": "PEERKEY"}


@pytest.mark.parametrize(
    ("txt", "found"),
    [
        (GOOD_TXT, True),
        ({**GOOD_TXT, "pk": ""}, True),
        ({**GOOD_TXT, "cluster": "theirs"}, False),
        ({k: v for k, v in GOOD_TXT.items() if k != "cluster"}, False),
        ({**GOOD_TXT, "v": "2"}, False),
        ({**GOOD_TXT, "node": "me"}, False),
        ({**GOOD_TXT, "node": ""}, False),
    ],
)
def test_txt_decides_what_is_a_candidate(txt: dict[str, str], found: bool) -> None:
    discovery = MdnsDiscovery("ours", "me", 1, 7946, "127.0.0.1", ["127.0.0.1"], 5.0)
    generation = _seen(discovery, "x")
    discovery._apply(f"x.{SERVICE_TYPE}", generation, _info("x", txt))
    expected = [_mdns("127.0.0.9", 7009, "peer", txt.get("pk", ""))] if found else []
    assert discovery.poll(0.0) == expected


def test_ipv6_only_service_is_not_a_candidate() -> None:
    discovery = MdnsDiscovery("ours", "me", 1, 7946, "127.0.0.1", ["127.0.0.1"], 5.0)
    generation = _seen(discovery, "x")
    discovery._apply(f"x.{SERVICE_TYPE}", generation, _info("x", GOOD_TXT, address=bytes(15) + b"\x01"))
    assert discovery.poll(0.0) == []


def test_stale_resolution_and_removed_service_are_dropped() -> None:
    discovery = MdnsDiscovery("ours", "me", 1, 7946, "127.0.0.1", ["127.0.0.1"], 5.0)
    name = f"x.{SERVICE_TYPE}"
    old = _seen(discovery, "x")
    _seen(discovery, "x")  # updated while the first resolution ran
    discovery._apply(name, old, _info("x", GOOD_TXT))
    assert discovery.poll(0.0) == []
    current = _seen(discovery, "x")
    discovery._apply(name, current, _info("x", GOOD_TXT))
    assert len(discovery.poll(0.0)) == 1
    discovery._service_gone(name)
    assert discovery.poll(0.0) == []
    discovery._apply(name, current, _info("x", GOOD_TXT))  # resolution finishing after removal
    assert discovery.poll(0.0) == []


def test_names_fit_dns_labels() -> None:
    assert instance_label("node-1", "meshmq") == "node-1@meshmq"
    assert instance_label("n.example", "c.x") == "n-example@c-x"  # no dots: one DNS label
    long = instance_label("n" * 64, "c" * 64)
    assert len(long.encode()) == 63
    label = host_label("node_1.example" + "x" * 60, "0123456789")
    assert label.startswith("meshmq-node-1-example")
    assert label.endswith("-0123456789")
    assert len(label) <= 63
    one = MdnsDiscovery("c", "n", 1, 7946, "127.0.0.1", ["127.0.0.1"], 5.0)
    two = MdnsDiscovery("c", "n", 1, 7946, "127.0.0.1", ["127.0.0.1"], 5.0)
    assert one._nonce != two._nonce  # so two nodes never share an A record's name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cluster_name": ""}, "cluster name"),
        ({"node_name": ""}, "node name"),
        ({"port": 0}, "port 0"),
        ({"interfaces": ()}, "never announces on every interface"),
        ({"interfaces": ("eth0",)}, "'eth0' is not an IPv4 address"),
        ({"address": "::1"}, "'::1' is not an IPv4 address"),
        ({"announce_interval_s": 0.0}, "must be positive"),
    ],
)
def test_bad_settings_are_value_errors(kwargs: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {
        "cluster_name": "c",
        "node_name": "n",
        "incarnation": 1,
        "port": 7946,
        "address": "127.0.0.1",
        "interfaces": ("127.0.0.1",),
        "announce_interval_s": 5.0,
    }
    with pytest.raises(ValueError, match=message):
        MdnsDiscovery(**{**settings, **kwargs})
