"""A tier-2 lab: cluster nodes on their own network hosts (Linux network namespaces), root only.

Why: some faults and features need real separate hosts: a two-way silent cut (split brain) that
blocks mDNS too, and multicast discovery across a real L2 segment. `Lab` builds them as
`shared/TESTBED.md` measured: a bridge in its own namespace (`<prefix>-br`, `br0` with
`mcast_snooping 0 stp_state 0 forward_delay 0`), one namespace per node (`<prefix>-n<i>`,
i = 1..n, `eth0` = 10.77.0.<i+1>/24) and one for test clients (`<prefix>-c`, 10.77.0.100), each
joined to the bridge by a veth pair, `lo` up, a route `224.0.0.0/4 dev eth0` for mDNS and NO
default route. Cuts are nftables rules in the bridge namespace: a `bridge` table whose forward
chain drops frames whose `iifname . oifname` is in a set (`cut` adds both directions, `heal`
flushes the set).

Must not: send a packet out of the machine. Before anything else the lab adds the guard route
`unreachable 10.77.0.0/24 metric 4000` in the root namespace, and removes it only after the
namespaces are gone (and only when no other live lab of this machine still needs it: labs of
parallel test processes share it, counted by files under `_GUARD_DIR`). Nothing in the root
namespace ever addresses a lab address: clients run in `<prefix>-c` (`run(CLIENT, ...)`).
Never signal a process the lab did not start; never delete a namespace of another prefix.

Invariants:
- After `up`, `ip route get` of every lab address names `eth0` (or `lo`) in every lab namespace
  and never a gateway (`via`); in the root namespace it is unreachable (`check_routes`).
- `teardown` is safe to call twice and after a failed `up`: it kills the lab's processes (their
  process groups, SIGKILL, and waits), deletes the namespaces, then releases the guard.
- Node indexes are 1..n as in `tests/cluster/nodes.py` (node i is named n<i>); index 0 (`CLIENT`)
  is the client namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CLIENT",
    "GUARD_ROUTE",
    "SUBNET",
    "Lab",
    "LabError",
    "available",
    "ensure_nft",
    "guard_holders",
    "guard_present",
    "unique_prefix",
]

SUBNET: Final = "10.77.0"
GUARD_ROUTE: Final = ("unreachable", f"{SUBNET}.0/24", "metric", "4000")
CLIENT: Final = 0
_CLIENT_HOST: Final = 100
_MAX_NODES: Final = 90
_GUARD_DIR: Final = Path("/run/meshmq-lab-guard")
_CMD_TIMEOUT_S: Final = 20.0
_KILL_WAIT_S: Final = 10.0
_APT_TIMEOUT_S: Final = 300.0
# No IGMP snooping (mDNS must reach every port at once), no STP delay before a port forwards.
_BRIDGE_OPTIONS: Final = ("mcast_snooping", "0", "stp_state", "0", "forward_delay", "0")
_NFT_RULES: Final = """\
table bridge meshmq_cut {
    set pairs {
        type ifname . ifname
    }
    chain forward {
        type filter hook forward priority 0; policy accept;
        iifname . oifname @pairs drop
    }
}
"""

_prefixes = itertools.count(1)
_available: bool | None = None


class LabError(RuntimeError):
    """A lab command failed; the message holds the command and its stderr."""


def _cmd(
    argv: Sequence[str], *, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(argv),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_CMD_TIMEOUT_S,
        check=False,
    )
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def unique_prefix() -> str:
    """A namespace-name prefix no other lab of this machine uses now (pid + counter)."""
    return f"mq{os.getpid()}x{next(_prefixes)}"


def available() -> bool:
    """True when labs can run here: root, `ip` present, and `ip netns add` works (probed once)."""
    global _available
    if _available is None:
        _available = _probe()
    return _available


def _probe() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"mqprobe{os.getpid()}"
    try:
        if _cmd(["ip", "netns", "add", name], check=False).returncode != 0:
            return False
        return _cmd(["ip", "netns", "del", name], check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_nft() -> None:
    """Install Debian's `nftables` if `nft` is missing (waits for a concurrent apt/dpkg)."""
    if shutil.which("nft") is not None:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=120", "install", "-y", "-q", "nftables"]
    for attempt in range(2):
        done = subprocess.run(
            install, env=env, capture_output=True, text=True, timeout=_APT_TIMEOUT_S, check=False
        )
        if done.returncode == 0 and shutil.which("nft") is not None:
            return
        if attempt == 0:  # stale package lists: refresh once and try again
            subprocess.run(
                ["apt-get", "-o", "DPkg::Lock::Timeout=120", "update", "-q"],
                env=env,
                capture_output=True,
                timeout=_APT_TIMEOUT_S,
                check=False,
            )
    raise LabError(f"could not install nftables: {done.stderr.strip()[-600:]}")


# --- the guard route, shared by the labs of parallel test processes ---------------------------


@contextlib.contextmanager
def _guard_lock() -> Iterator[None]:
    _GUARD_DIR.mkdir(parents=True, exist_ok=True)
    with open(_GUARD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_holders() -> list[str]:
    """Prefixes of the labs that hold the guard and whose process is alive (stale files removed)."""
    holders = []
    for path in _GUARD_DIR.iterdir():
        if path.name.startswith("."):
            continue
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid and _pid_alive(pid):
            holders.append(path.name)
        else:
            path.unlink(missing_ok=True)
    return holders


def _guard_acquire(prefix: str) -> None:
    with _guard_lock():
        _cmd(["ip", "route", "replace", *GUARD_ROUTE])
        (_GUARD_DIR / prefix).write_text(str(os.getpid()))


def _guard_release(prefix: str) -> None:
    with _guard_lock():
        (_GUARD_DIR / prefix).unlink(missing_ok=True)
        if not _live_holders():
            _cmd(["ip", "route", "del", *GUARD_ROUTE], check=False)


def guard_present() -> bool:
    """Whether the root namespace has the lab's guard route now."""
    out = _cmd(["ip", "route", "show", "type", "unreachable", f"{SUBNET}.0/24"], check=False).stdout
    return f"{SUBNET}.0/24" in out


def guard_holders() -> list[str]:
    """The prefixes of live labs holding the guard route now (this process's included)."""
    with _guard_lock():
        return _live_holders()


# --- the lab ----------------------------------------------------------------------------------


class Lab:
    """n node hosts and a client host on one bridge; see the module docstring."""

    def __init__(self, prefix: str, n: int) -> None:
        if not 1 <= n <= _MAX_NODES:
            raise ValueError(f"a lab has 1..{_MAX_NODES} nodes, not {n}")
        if not prefix or len(prefix) > 40 or "/" in prefix:
            raise ValueError(f"bad lab prefix {prefix!r}")
        self.prefix = prefix
        self.n = n
        self.procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []  # namespaces, in creation order
        self._guarded = False
        self._nft = False

    # --- names and addresses

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    def ns(self, i: int) -> str:
        """The namespace of node i (1..n) or of the clients (CLIENT)."""
        self._check_index(i)
        return f"{self.prefix}-c" if i == CLIENT else f"{self.prefix}-n{i}"

    def addr(self, i: int) -> str:
        """The IPv4 address of node i (1..n) or of the clients (CLIENT)."""
        self._check_index(i)
        return f"{SUBNET}.{_CLIENT_HOST if i == CLIENT else i + 1}"

    def indexes(self) -> list[int]:
        """Every host of the lab: the nodes 1..n, then CLIENT."""
        return [*range(1, self.n + 1), CLIENT]

    def _check_index(self, i: int) -> None:
        if not (i == CLIENT or 1 <= i <= self.n):
            raise ValueError(f"lab host index {i} not in 1..{self.n} or CLIENT (0)")

    @staticmethod
    def _port_name(i: int) -> str:
        """The bridge-side veth of host i (names are per namespace, so short ones do)."""
        return "vc" if i == CLIENT else f"v{i}"

    # --- life cycle

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def up(self) -> Lab:
        """Build the lab (guard route first); on any failure tear down what was built and raise."""
        try:
            _guard_acquire(self.prefix)
            self._guarded = True
            self._build()
            self.check_routes()
        except BaseException:
            self.teardown()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        _cmd(["ip", "netns", "add", name])
        self._created.append(name)
        _cmd(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build(self) -> None:
        br = self.bridge_ns
        self._add_ns(br)
        _cmd(["ip", "-n", br, "link", "add", "br0", "type", "bridge", *_BRIDGE_OPTIONS])
        _cmd(["ip", "-n", br, "link", "set", "br0", "up"])
        for i in self.indexes():
            ns, port = self.ns(i), self._port_name(i)
            self._add_ns(ns)
            _cmd(["ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _cmd(["ip", "-n", br, "link", "set", port, "master", "br0", "up"])
            _cmd(["ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0"])
            _cmd(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _cmd(["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])

    def check_routes(self) -> None:
        """Assert the routing invariant of the module docstring (raises LabError)."""
        for i in self.indexes():
            ns = self.ns(i)
            if "default" in _cmd(["ip", "-n", ns, "route", "show"]).stdout:
                raise LabError(f"namespace {ns} has a default route")
            for j in self.indexes():
                out = _cmd(["ip", "-n", ns, "route", "get", self.addr(j)]).stdout
                if " via " in out or not (" dev eth0" in out or " dev lo" in out):
                    raise LabError(f"in {ns}, `ip route get {self.addr(j)}` says {out.strip()!r}")
        for j in self.indexes():
            done = _cmd(["ip", "route", "get", self.addr(j)], check=False)
            if done.returncode == 0 and " via " in done.stdout:
                raise LabError(
                    f"the root namespace routes {self.addr(j)} to a gateway: {done.stdout.strip()!r}"
                    " (the guard route is missing)"
                )

    def run(self, i: int, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` in host i's namespace (`ip netns exec` execs in place: the pid is argv's).

        It gets its own process group (start_new_session) so that teardown kills it with its
        children; the lab keeps it and kills it at teardown."""
        ns = self.ns(i)
        if ns not in self._created:
            raise LabError(f"namespace {ns} does not exist (lab not up?)")
        popen_kwargs.setdefault("start_new_session", True)
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen_kwargs)
        self.procs.append(proc)
        return proc

    def exec(self, i: int, argv: Sequence[str], timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run `argv` in host i's namespace to completion (bounded by `timeout_s`)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(i), *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    # --- faults

    def _ensure_table(self) -> None:
        if self._nft:
            return
        if shutil.which("nft") is None:
            raise LabError("`nft` is missing: call netns.ensure_nft() in the test setup")
        _cmd(["ip", "netns", "exec", self.bridge_ns, "nft", "-f", "-"], stdin=_NFT_RULES)
        self._nft = True

    def cut(self, i: int, j: int) -> None:
        """Silently drop every frame between hosts i and j, both ways (mDNS included)."""
        if i == j:
            raise ValueError("cut needs two different hosts")
        self._ensure_table()
        a, b = self._port_name(i), self._port_name(j)
        elements = f"{{ {a} . {b}, {b} . {a} }}"
        _cmd(
            [
                "ip",
                "netns",
                "exec",
                self.bridge_ns,
                "nft",
                "add",
                "element",
                "bridge",
                "meshmq_cut",
                "pairs",
                elements,
            ]
        )

    def isolate(self, i: int) -> None:
        """Cut host i from every other host of the lab."""
        for j in self.indexes():
            if j != i:
                self.cut(i, j)

    def heal(self) -> None:
        """Remove every cut."""
        if self._nft:
            _cmd(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.bridge_ns,
                    "nft",
                    "flush",
                    "set",
                    "bridge",
                    "meshmq_cut",
                    "pairs",
                ]
            )

    # --- teardown

    def kill_all(self) -> None:
        """SIGKILL the process group of every process the lab started, and reap them."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + _KILL_WAIT_S
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:  # children of a killed group leader die with the group; reap ours
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()

    def teardown(self) -> None:
        """Kill the lab's processes, delete its namespaces, then release the guard; idempotent."""
        errors: list[str] = []
        self.kill_all()
        for name in reversed(self._created):
            done = _cmd(["ip", "netns", "del", name], check=False)
            if done.returncode != 0:
                errors.append(f"ip netns del {name}: {done.stderr.strip()}")
        self._created.clear()
        self._nft = False
        if self._guarded:
            _guard_release(self.prefix)
            self._guarded = False
        if errors:
            raise LabError("; ".join(errors))

    def namespaces(self) -> list[str]:
        """The namespaces of this lab that exist now (from `ip netns list`)."""
        names = (
            line.split()[0] for line in _cmd(["ip", "netns", "list"]).stdout.splitlines() if line.strip()
        )
        return [name for name in names if name.startswith(f"{self.prefix}-")]
