"""Run Debian's `haproxy` with `etc/haproxy.cfg` in front of a loopback cluster, and read its state.

Why: the deployment promise "clients behind HAProxy fail over to another node and resume their
sessions" (issue 6, "Deployment files") is only worth something if it is checked with the very
configuration we ship. `etc/haproxy.cfg` takes its addresses from the environment ("${NAME}",
expanded by HAProxy itself), so a test runs that file unchanged: `LbEnv` says where the
frontend listens and where the nodes are, `HAProxy` runs `haproxy -f etc/haproxy.cfg -db` in
the foreground in a process group of its own, and reads HAProxy's CSV status page to see which
node is UP or DOWN and how many connections each one took (`ServerStat.sessions_total`).

Must not: send traffic anywhere but loopback (every address in `LbEnv` is a 127.x address
literal, and the environment HAProxy gets is built here: no `MESHMQ_LB_RESOLVER`, so HAProxy
resolves no name and asks no DNS server); start or touch the system's haproxy service (no
systemctl: a process of our own, stopped by its pid); install anything but Debian's `haproxy`
package, and only as root, once per machine (a file lock serialises parallel test processes);
leave a wait unbounded.

Invariants:
- `HAProxy.start` returns only when its listeners are bound (the status page answers);
  `HAProxy.stop` returns only when no process of its group is alive.
- `LbEnv.environ()` names every variable of `etc/haproxy.cfg` that carries an address, so no
  example default (192.168.1.x) is ever used by a test.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import ipaddress
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tests.e2e.broker_proc import REPO
from tests.e2e.workers_helpers import free_port_block, port_free
from tests.process_group import kill_group

__all__ = [
    "BACKEND",
    "HAPROXY_CFG",
    "HAProxy",
    "LbEnv",
    "ServerStat",
    "check_config",
    "ensure_haproxy",
    "find_haproxy",
    "free_lb_ports",
    "free_port_on",
]

HAPROXY_CFG: Final = REPO / "etc" / "haproxy.cfg"
BACKEND: Final = "meshmq"  # the backend's name in etc/haproxy.cfg
_APT_LOCK: Final = Path("/tmp/meshmq-test-apt.lock")
_INSTALL_TIMEOUT_S: Final = 300.0
_START_TIMEOUT_S: Final = 10.0
_STOP_TIMEOUT_S: Final = 5.0
_POLL_S: Final = 0.05
_PORT_ATTEMPTS: Final = 50
# Variables of etc/haproxy.cfg; each one the test does not set is removed from HAProxy's
# environment so that nothing inherited changes what runs.
_CFG_VARS: Final = (
    "MESHMQ_LB_BIND",
    "MESHMQ_NODE1",
    "MESHMQ_NODE2",
    "MESHMQ_NODE3",
    "MESHMQ_HTTP_PORT",
    "MESHMQ_LB_STATS_BIND",
    "MESHMQ_LB_RESOLVER",
)


# --- the binary -----------------------------------------------------------------------------------


def find_haproxy() -> str | None:
    """The haproxy binary (PATH, or /usr/sbin for users whose PATH lacks it), or None."""
    found = shutil.which("haproxy")
    if found is not None:
        return found
    return "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None


def ensure_haproxy() -> tuple[str | None, str]:
    """(binary, "") if haproxy is there or could be installed; (None, why not) otherwise.

    Installs Debian's `haproxy` with apt-get when root; one test process at a time (file lock),
    each apt-get bounded in time. The package's own service is not started here."""
    found = find_haproxy()
    if found is not None:
        return found, ""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "haproxy is not installed (apt-get install haproxy needs root on Debian)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "haproxy"]
    with open(_APT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be installing it right now
        try:
            for argv in (install, ["apt-get", "update"], install):
                if find_haproxy() is not None:
                    break
                subprocess.run(argv, env=env, capture_output=True, timeout=_INSTALL_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return None, f"apt-get did not finish within {_INSTALL_TIMEOUT_S:.0f}s"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    found = find_haproxy()
    return (found, "") if found is not None else (None, "apt-get install haproxy failed")


# --- the configuration's environment --------------------------------------------------------------


def _loopback(address: str) -> str:
    """`address` (host:port) if its host is a 127.x literal; ValueError otherwise."""
    host, _, port = address.rpartition(":")
    if not ipaddress.ip_address(host).is_loopback or not port.isdigit():
        raise ValueError(f"not a loopback host:port: {address!r}")
    return address


@dataclass(frozen=True, slots=True)
class LbEnv:
    """Where etc/haproxy.cfg listens (`bind`, `stats_bind`) and sends clients (`nodes`, the MQTT
    addresses of node1..node3, and the nodes' common `http_port` for /health): all host:port on
    loopback, host as an address literal."""

    bind: str
    stats_bind: str
    nodes: tuple[str, str, str]
    http_port: int

    def __post_init__(self) -> None:
        for address in (self.bind, self.stats_bind, *self.nodes):
            _loopback(address)

    def environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) without any variable of the file, plus ours."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _CFG_VARS}
        env.update(
            MESHMQ_LB_BIND=self.bind,
            MESHMQ_LB_STATS_BIND=self.stats_bind,
            MESHMQ_NODE1=self.nodes[0],
            MESHMQ_NODE2=self.nodes[1],
            MESHMQ_NODE3=self.nodes[2],
            MESHMQ_HTTP_PORT=str(self.http_port),
        )
        return env


def free_port_on(hosts: Sequence[str]) -> int:
    """One port number free now on every host of `hosts` (and on 127.0.0.1)."""
    for _ in range(_PORT_ATTEMPTS):
        port = free_port_block(1) + 1
        if all(port_free(host, port) for host in hosts):
            return port
    raise RuntimeError(f"no port free on all of {list(hosts)} in {_PORT_ATTEMPTS} attempts")


def free_lb_ports() -> tuple[int, int]:
    """Two ports free now on 127.0.0.1: the frontend's and the status page's."""
    base = free_port_block(2)
    return base + 1, base + 2


def check_config(
    binary: str, env: Mapping[str, str], cfg: Path = HAPROXY_CFG
) -> subprocess.CompletedProcess[str]:
    """`haproxy -c -f cfg` with `env`: exit status 0 when the file is valid."""
    return subprocess.run(
        [binary, "-c", "-f", str(cfg)], env=dict(env), capture_output=True, text=True, timeout=30, check=False
    )


# --- the status page ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerStat:
    """One server line of HAProxy's CSV status page."""

    name: str  # node1..node3
    status: str  # UP, DOWN, "UP 1/2" (going down), "DOWN 1/2" (going up), MAINT, no check
    check_status: str  # L7OK, L7STS (not 200), L7TOUT, L4CON (refused), ...
    sessions_current: int
    sessions_total: int  # connections this server was given since HAProxy started

    @property
    def up(self) -> bool:
        return self.status == "UP"

    @property
    def down(self) -> bool:
        return self.status == "DOWN"


def _int(text: str | None) -> int:
    return int(text) if text else 0


def parse_stats(text: str, backend: str = BACKEND) -> dict[str, ServerStat]:
    """The servers of `backend` in HAProxy's CSV status page (`/stats;csv`), by name."""
    reader = csv.DictReader(io.StringIO(text.removeprefix("# ")))
    servers: dict[str, ServerStat] = {}
    for row in reader:
        if row.get("pxname") != backend or row.get("svname") in ("FRONTEND", "BACKEND"):
            continue
        name = row["svname"]
        servers[name] = ServerStat(
            name, row["status"], row.get("check_status") or "", _int(row["scur"]), _int(row["stot"])
        )
    return servers


# --- the process ----------------------------------------------------------------------------------


class HAProxy:
    """`haproxy -f etc/haproxy.cfg -db` with `LbEnv`, logging to `log_path`; see the module docstring.

    `host` and `port` are the frontend's: pass the object wherever a broker address is wanted."""

    def __init__(self, binary: str, env: LbEnv, log_path: Path, cfg: Path = HAPROXY_CFG) -> None:
        self.binary = binary
        self.env = env
        self.cfg = cfg
        self.log_path = log_path
        self.host, port = env.bind.rsplit(":", 1)
        self.port = int(port)
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"HAProxy({self.env.bind} -> {list(self.env.nodes)} pid {self.pid})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def start(self, timeout_s: float = _START_TIMEOUT_S) -> HAProxy:
        """Start and wait until the listeners are bound (the status page answers); RuntimeError
        with HAProxy's output if it exits or is late (e.g. a port was taken meanwhile)."""
        if self.running():
            raise RuntimeError(f"{self!r} is already running")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-f", str(self.cfg), "-db"],
                env=self.env.environ(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped by its pid only
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log_tail()}")
            # HAProxy binds every listener before it serves any: the status page answering means
            # the frontend accepts too (a probe connection would count as a client of a node).
            with contextlib.suppress(OSError):
                self.stats_text(timeout_s=0.5)
                return self
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"haproxy not serving after {timeout_s}s:\n{self.log_tail()}")
            time.sleep(_POLL_S)

    def stop(self) -> None:
        """SIGTERM (HAProxy's hard stop), SIGKILL past a bound; returns when the group is gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(_STOP_TIMEOUT_S)
        kill_group(self.proc.pid, label="haproxy: ")
        self.proc.wait(_STOP_TIMEOUT_S)

    # --- state

    def stats_text(self, timeout_s: float = 2.0) -> str:
        url = f"http://{self.env.stats_bind}/stats;csv"
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            text: str = answer.read().decode()
        return text

    def servers(self) -> dict[str, ServerStat]:
        """node1..node3 as HAProxy sees them now."""
        return parse_stats(self.stats_text())

    def wait_status(self, wanted: Mapping[str, str], timeout_s: float = 10.0) -> dict[str, ServerStat]:
        """Wait until each server named in `wanted` has that status ("UP", "DOWN"); the stats then."""
        deadline = time.monotonic() + timeout_s
        while True:
            servers = self.servers()
            if all(name in servers and servers[name].status == status for name, status in wanted.items()):
                return servers
            if time.monotonic() >= deadline:
                shown = {name: (s.status, s.check_status) for name, s in servers.items()}
                raise AssertionError(
                    f"haproxy servers {shown}, wanted {dict(wanted)} within {timeout_s}s\n{self.log_tail()}"
                )
            time.sleep(_POLL_S)
