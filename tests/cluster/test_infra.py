"""Tests of the cluster test infrastructure itself: the fault proxy, the network lab, the node launcher.

Why: a cluster test that fails must be failing because of the cluster, not because the proxy
leaked bytes through a cut, the lab routed a packet to the real network, or the launcher reused
a port. These tests pin each tool's promise with the simplest real counterpart: an echo server
behind the proxy, Python probes inside the lab's namespaces, and a tiny fake node (a script that
speaks the launcher's contract: listen on its ports, log `cluster view: alive=[...]`) for the
launcher, since the real cluster is exercised by `test_cluster_smoke` and the cluster suites.

Must not: send traffic anywhere but loopback or the lab's own namespaces; leave a thread, a
process, a namespace or the guard route behind; wait without a bound.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import netns
from tests.cluster.conftest import ClusterFactory, LabFactory
from tests.cluster.netns import CLIENT, Lab
from tests.cluster.nodes import CLUSTER_READY, Cluster, LogFollower, deep_merge, parse_view
from tests.cluster.proxy import FaultProxy

FAKE_PG_URL = "postgresql://postgres@127.0.0.1:1/unused"

# --- the fault proxy --------------------------------------------------------------------------


class EchoServer:
    """A loopback TCP echo server (one thread per connection, all daemon, bounded by close)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.received = 0
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return (host, port)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(65536):
                self.received += len(data)
                conn.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (close alone does not)
        self.sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(2)


@pytest.fixture
def echo_proxy() -> Iterator[tuple[EchoServer, FaultProxy]]:
    echo = EchoServer()
    proxy = FaultProxy(target=echo.address)
    proxy.start()
    try:
        yield echo, proxy
    finally:
        proxy.stop()
        echo.close()


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=2)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    """Send `data` and read as many bytes back (from another thread: no deadlock on big data)."""
    got = bytearray()

    def read() -> None:
        with contextlib.suppress(OSError):
            while len(got) < len(data):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return
                got.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sock.sendall(data)
    reader.join(10)
    return bytes(got)


def assert_silent(sock: socket.socket, wait_s: float = 0.3) -> None:
    """Nothing arrives: no data, no FIN, no RST, within `wait_s`."""
    sock.settimeout(wait_s)
    with pytest.raises(TimeoutError):
        data = sock.recv(100)
        raise AssertionError(f"expected silence, got {data!r}")


def test_proxy_passes_an_echo_stream(echo_proxy: tuple[EchoServer, FaultProxy]) -> None:
    _echo, proxy = echo_proxy
    payload = os.urandom(1_500_000)  # more than the proxy buffers per direction
    with connect(proxy) as c:
        assert roundtrip(c, payload) == payload
        assert roundtrip(c, b"hello") == b"hello"
    # (the proxy thread counts a chunk after sending it: the client may read it first)
    deadline = time.monotonic() + 5.0
    stats = proxy.stats()
    while stats.bytes_down < len(payload) + 5 and time.monotonic() < deadline:
        time.sleep(0.01)
        stats = proxy.stats()
    assert stats.bytes_up == stats.bytes_down == len(payload) + 5
    assert stats.dropped_up == stats.dropped_down == 0
    assert stats.accepted == 1


def test_proxy_blackhole_is_a_silent_cut(echo_proxy: tuple[EchoServer, FaultProxy]) -> None:
    echo, proxy = echo_proxy
    with connect(proxy) as c:
        assert roundtrip(c, b"before") == b"before"
        proxy.mode("blackhole")
        c.sendall(b"into the void")
        assert_silent(c)
        with connect(proxy) as late:  # accepted (the kernel would), but goes nowhere
            late.sendall(b"late")
            assert_silent(late)
    stats = proxy.stats()
    assert stats.dropped_up == len(b"into the void") + len(b"late")
    assert stats.bytes_up == len(b"before")
    assert echo.received == len(b"before")
    assert echo.accepted == 1  # the late connection was never connected upstream


def test_proxy_back_to_pass_heals_new_traffic(echo_proxy: tuple[EchoServer, FaultProxy]) -> None:
    _echo, proxy = echo_proxy
    with connect(proxy) as hit, connect(proxy) as idle:
        assert roundtrip(hit, b"a") == b"a"
        assert roundtrip(idle, b"b") == b"b"
        proxy.mode("blackhole")
        hit.sendall(b"lost")  # this stream now has a hole
        assert_silent(hit)
        proxy.mode("pass")
        with connect(proxy) as fresh:
            assert roundtrip(fresh, b"fresh") == b"fresh"
        # A connection that lost nothing resumes; one that lost bytes never forwards again.
        idle.settimeout(2)
        assert roundtrip(idle, b"still here") == b"still here"
        hit.sendall(b"after")
        assert_silent(hit)


def test_proxy_reset_breaks_connections_and_refuses_new_ones(
    echo_proxy: tuple[EchoServer, FaultProxy],
) -> None:
    _echo, proxy = echo_proxy
    with connect(proxy) as c:
        assert roundtrip(c, b"x") == b"x"
        proxy.mode("reset")
        c.settimeout(2)
        with pytest.raises(ConnectionResetError):
            c.recv(10)
    # Accepted by the kernel, then reset by the proxy: the reset may already beat connect().
    with pytest.raises(ConnectionResetError), connect(proxy) as refused:
        refused.settimeout(2)
        refused.recv(10)
    assert proxy.stats().resets == 2
    proxy.mode("pass")
    with connect(proxy) as c:
        assert roundtrip(c, b"back") == b"back"


def test_proxy_relays_a_close_and_stops_cleanly(echo_proxy: tuple[EchoServer, FaultProxy]) -> None:
    _echo, proxy = echo_proxy
    c = connect(proxy)
    assert roundtrip(c, b"x") == b"x"
    c.shutdown(socket.SHUT_WR)  # the echo server sees EOF, closes, and the proxy passes it back
    c.settimeout(2)
    assert c.recv(10) == b""
    c.close()
    deadline = time.monotonic() + 2
    while proxy.stats().open and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.stats().open == 0
    other = connect(proxy)
    proxy.stop()
    other.settimeout(2)
    with pytest.raises(ConnectionResetError):
        other.recv(10)
    other.close()
    proxy.stop()  # twice is fine


# --- the network-namespace lab ----------------------------------------------------------------

LISTENER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5555))
s.listen()
s.settimeout(1)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        c, _ = s.accept()
    except OSError:
        continue
    c.sendall(b"pong")
    c.close()
"""

PROBE = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], 5555), timeout=float(sys.argv[2]))
    print(c.recv(4).decode())
except OSError as e:
    print(type(e).__name__)
"""


def start_listeners(lab: Lab) -> None:
    for i in lab.indexes():
        lab.run(i, [sys.executable, "-c", LISTENER, lab.addr(i)])
    for i in lab.indexes():  # each listener is up: probe it from inside its own namespace
        deadline = time.monotonic() + 10
        while probe(lab, i, i, 0.5) != "pong":
            assert time.monotonic() < deadline, f"listener in {lab.ns(i)} did not start"
            time.sleep(0.05)


def probe(lab: Lab, i: int, j: int, timeout_s: float = 1.0) -> str:
    """From host i, connect to host j's listener: "pong", or the error's name."""
    done = lab.exec(i, [sys.executable, "-c", PROBE, lab.addr(j), str(timeout_s)], timeout_s=timeout_s + 10)
    return done.stdout.strip() or done.stderr.strip()


@pytest.mark.netns
def test_lab_hosts_reach_each_other_cut_and_heal(lab_factory: LabFactory) -> None:
    lab = lab_factory(2)
    assert sorted(lab.namespaces()) == sorted([lab.bridge_ns, lab.ns(1), lab.ns(2), lab.ns(CLIENT)])
    lab.check_routes()
    start_listeners(lab)
    assert probe(lab, 1, 2) == "pong"
    assert probe(lab, 2, 1) == "pong"
    assert probe(lab, CLIENT, 1) == "pong"

    lab.cut(1, 2)
    assert probe(lab, 1, 2, 0.5) == "TimeoutError"  # silent: no refusal, no reset
    assert probe(lab, 2, 1, 0.5) == "TimeoutError"
    assert probe(lab, CLIENT, 2) == "pong"  # only the pair is cut

    lab.heal()
    assert probe(lab, 1, 2) == "pong"
    assert probe(lab, 2, 1) == "pong"


@pytest.mark.netns
def test_lab_routes_never_name_a_gateway(lab_factory: LabFactory) -> None:
    lab = lab_factory(3)
    for i in lab.indexes():
        routes = lab.exec(i, ["ip", "route", "show"]).stdout
        assert "default" not in routes
        assert "224.0.0.0/4 dev eth0" in routes
        for j in lab.indexes():
            out = lab.exec(i, ["ip", "route", "get", lab.addr(j)]).stdout
            assert " via " not in out, out
    assert netns.guard_present()
    root = netns._cmd(["ip", "route", "get", lab.addr(1)], check=False)
    assert root.returncode != 0 or " via " not in root.stdout  # unreachable from the root namespace


@pytest.mark.netns
def test_lab_teardown_leaves_nothing() -> None:
    if not netns.available():
        pytest.skip("needs root and `ip netns add`")
    lab = Lab(netns.unique_prefix(), 2)
    try:
        lab.up()
        proc = lab.run(1, [sys.executable, "-c", "import time; time.sleep(60)"])
        assert lab.namespaces()
    finally:
        lab.teardown()
    assert proc.poll() is not None
    assert lab.namespaces() == []
    if not netns.guard_holders():  # labs of parallel test processes may still hold the guard
        assert not netns.guard_present()
    lab.teardown()  # twice is fine


# --- the node launcher: configuration ---------------------------------------------------------


def load(cluster: Cluster, i: int) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(cluster.node(i).config_path.read_text())
    return data


def test_cluster_writes_one_config_per_node(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, FAKE_PG_URL, n=3, workers=2)
    try:
        members = [f"127.0.0.{i + 1}:{cluster.node(i).mesh_port}" for i in (1, 2, 3)]
        for i in (1, 2, 3):
            cfg = load(cluster, i)
            nd = cluster.node(i)
            assert cfg["NodeName"] == f"n{i}" == nd.name
            assert cfg["ListenAddress"] == f"127.0.0.{i + 1}" == nd.host
            assert cfg["TCP"] == nd.port
            assert cfg["Workers"] == 2
            assert cfg["SessionStore"] == {"Type": "POSTGRES", "Postgres": {"Url": FAKE_PG_URL}}
            mesh = cfg["Mesh"]
            assert mesh["ClusterName"] == cluster.name
            assert mesh["Port"] == nd.mesh_port
            assert mesh["BindAddress"] == nd.host
            assert mesh["Plaintext"] is True
            assert "Curve" not in mesh
            assert (mesh["PeerHeartbeatMs"], mesh["SuspectAfterMs"], mesh["DeadAfterMs"]) == (200, 600, 1500)
            assert mesh["TcpIp"] == {"Members": members}
            assert "Mdns" not in mesh
            assert Path(mesh["IpcDir"]).is_dir() and len(mesh["IpcDir"]) < 40
        ports = [p for nd in cluster.nodes for p in (nd.port, nd.mesh_port)]
        assert len(set(ports)) == 6
        assert len({nd.ipc_dir for nd in cluster.nodes}) == 3
    finally:
        cluster.stop_all()
    assert not any(Path(nd.ipc_dir).exists() for nd in cluster.nodes)


def test_cluster_configs_parse_with_the_broker_config(tmp_path: Path) -> None:
    from broker.config import parse_config

    cluster = Cluster(tmp_path, FAKE_PG_URL, n=2)
    try:
        for nd in cluster.nodes:
            cfg = parse_config(yaml.safe_load(nd.config_path.read_text()), str(nd.config_path))
            assert cfg.node_name == nd.name
            assert cfg.mesh.port == nd.mesh_port
            assert cfg.mesh.bind_address == nd.host
            assert cfg.mesh.cluster_name == cluster.name
            assert cfg.mesh.plaintext
            assert len(cfg.mesh.tcp_ip.members) == 2
    finally:
        cluster.stop_all()


def test_cluster_mdns_config(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, FAKE_PG_URL, n=2, mdns=True)
    try:
        for i in (1, 2):
            mesh = load(cluster, i)["Mesh"]
            assert mesh["TcpIp"] == {"Enabled": False}
            assert mesh["Mdns"] == {"Enabled": True, "Interfaces": ["127.0.0.1"]}
    finally:
        cluster.stop_all()


def test_cluster_curve_config(tmp_path: Path) -> None:
    curve = pytest.importorskip("mesh.curve")
    cluster = Cluster(tmp_path, FAKE_PG_URL, n=2, curve=True)
    try:
        for i in (1, 2):
            mesh = load(cluster, i)["Mesh"]
            assert "Plaintext" not in mesh
            assert mesh["Curve"] == {"KeyFile": cluster.key_file}
        keys = curve.load_keys(cluster.key_file)
        assert keys.shared
    finally:
        cluster.stop_all()


def test_cluster_extra_is_deep_merged(tmp_path: Path) -> None:
    cluster = Cluster(
        tmp_path,
        FAKE_PG_URL,
        n=2,
        extra=lambda i: {"Mesh": {"SendHwm": 10 * i}, "Cluster": {"ServerReference": f"ref{i}"}},
    )
    try:
        for i in (1, 2):
            cfg = load(cluster, i)
            assert cfg["Mesh"]["SendHwm"] == 10 * i
            assert cfg["Mesh"]["ClusterName"] == cluster.name  # the rest of Mesh is kept
            assert cfg["Cluster"] == {"ServerReference": f"ref{i}"}
    finally:
        cluster.stop_all()
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": [1]}) == {"a": {"b": 1, "c": 3}, "d": [1]}


def test_ports_and_names_differ_across_clusters(tmp_path: Path) -> None:
    one = Cluster(tmp_path / "one", FAKE_PG_URL, n=3)
    two = Cluster(tmp_path / "two", FAKE_PG_URL, n=3)
    try:
        ports = [p for c in (one, two) for nd in c.nodes for p in (nd.port, nd.mesh_port)]
        assert len(set(ports)) == 12
        assert one.name != two.name
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        assert all(p < ephemeral_low for p in ports)
    finally:
        one.stop_all()
        two.stop_all()


# --- the node launcher: logs ------------------------------------------------------------------


def test_parse_view() -> None:
    assert parse_view("12:00 relay: cluster view: alive=[n1, n2, n3]") == frozenset({"n1", "n2", "n3"})
    assert parse_view("cluster view: alive=[n1]") == frozenset({"n1"})
    assert parse_view("cluster view: alive=[]") == frozenset()
    assert parse_view("cluster view: alive=['n1', 'n2']") == frozenset({"n1", "n2"})
    assert parse_view("something else") is None


def test_log_follower_reads_whole_lines_incrementally(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    follower = LogFollower(path)
    assert follower.new_lines() == []  # no file yet
    with open(path, "ab") as f:
        f.write(b"one\ntw")
    assert follower.new_lines() == ["one"]
    with open(path, "ab") as f:
        f.write(b"o\nthree\n")
    assert follower.new_lines() == ["two", "three"]
    assert follower.new_lines() == []


# --- the node launcher: processes (with a fake node) ------------------------------------------

# A stand-in for `meshmq -cluster`: listens on its MQTT and mesh ports, and every 100 ms probes the
# mesh port of every member; the ones that accept (itself included) are its view, logged on change
# in the relay's format. Bounded: it exits by itself after 120 s.
FAKE_NODE = r"""
import socket, sys, threading, time, yaml
cfg = yaml.safe_load(open(sys.argv[sys.argv.index("-config") + 1]))
assert "-cluster" in sys.argv

def serve(host, port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as every server: TIME_WAIT after a restart
    s.bind((host, port))
    s.listen()
    def loop():
        while True:
            c, _ = s.accept()
            c.close()
    threading.Thread(target=loop, daemon=True).start()

serve(cfg["ListenAddress"], cfg["TCP"])
mesh = cfg["Mesh"]
serve(mesh["BindAddress"], mesh["Port"])
print(f"worker 1: MQTT on {cfg['ListenAddress']}:{cfg['TCP']}", flush=True)
members = mesh["TcpIp"]["Members"]
view = None
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    alive = []
    for member in members:
        host, port = member.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=0.2).close()
            alive.append("n%d" % (int(host.rsplit(".", 1)[1]) - 1))
        except OSError:
            pass
    if alive != view:
        view = alive
        print(f"relay: cluster view: alive=[{', '.join(sorted(alive))}]", flush=True)
    time.sleep(0.1)
"""


@pytest.fixture
def fake_command(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_node.py"
    script.write_text(FAKE_NODE)
    return [sys.executable, str(script)]


def test_fake_cluster_members_kill_and_restart(
    cluster_factory: ClusterFactory, fake_command: list[str]
) -> None:
    cluster = cluster_factory(n=3, pg_url=FAKE_PG_URL, command=fake_command)
    cluster.wait_members(timeout_s=10)
    assert set(cluster.views().values()) == {frozenset({"n1", "n2", "n3"})}

    n2 = cluster.node(2)
    old_pid, old_ports = n2.pid, (n2.port, n2.mesh_port)
    n2.kill()
    assert not n2.running()
    cluster.wait_members(timeout_s=10)  # the survivors' latest view is {n1, n3}
    assert cluster.views() == {"n1": frozenset({"n1", "n3"}), "n3": frozenset({"n1", "n3"})}

    n2.restart()
    assert n2.pid != old_pid and (n2.port, n2.mesh_port) == old_ports
    assert n2.log_path.name == "n2-2.log"
    cluster.wait_members(timeout_s=10)
    found = cluster.wait_log(2, r"MQTT on (\S+)", timeout_s=5)
    assert found.group(1) == f"{n2.host}:{n2.port}"
    cluster.wait_log(cluster.node(1), r"alive=\[n1, n2, n3\]", timeout_s=5)

    code = cluster.node(3).stop()
    assert code == -signal.SIGTERM
    cluster.wait_members(timeout_s=10, expected={"n1", "n2"})


def test_fake_cluster_late_join(cluster_factory: ClusterFactory, fake_command: list[str]) -> None:
    cluster = cluster_factory(n=3, pg_url=FAKE_PG_URL, command=fake_command, start=False)
    cluster.start([1, 2])
    assert [nd.name for nd in cluster.running()] == ["n1", "n2"]
    cluster.wait_members(timeout_s=10)
    cluster.node(3).start()
    cluster.wait_members(timeout_s=10)
    assert cluster.views()["n3"] == frozenset({"n1", "n2", "n3"})


def test_wait_members_fails_fast_on_a_crash(cluster_factory: ClusterFactory, fake_command: list[str]) -> None:
    cluster = cluster_factory(n=2, pg_url=FAKE_PG_URL, command=fake_command)
    pid = cluster.node(2).pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)  # not through Node.kill: the launcher did not expect it
    cluster.node(2).proc.wait(5)  # type: ignore[union-attr]
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"exited on their own: \['n2'\]"):
        cluster.wait_members(timeout_s=10)
    assert time.monotonic() - started < 5


# --- the real cluster (the lead runs it once mesh/cluster.py exists) --------------------------


@pytest.mark.e2e
@pytest.mark.postgres
@pytest.mark.skipif(not CLUSTER_READY, reason="mesh/cluster.py does not exist yet")
def test_cluster_smoke(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(n=3)
    cluster.wait_members(timeout_s=20)
