"""Where a node's ipc:// endpoints live.

Why: every process of a node must agree on the path of every endpoint of `mesh/PROTOCOL.md`;
this is the one function that says it. Must not: create sockets (each process owns its own).
"""

from __future__ import annotations

import os
import signal
from collections import deque
from pathlib import Path

import zmq


def default_ipc_dir(node_name: str, pid: int) -> str:
    """`$XDG_RUNTIME_DIR/meshmq-<node>-<pid>`, else `/tmp/meshmq-<uid>-<node>-<pid>`.

    The supervisor's pid keeps two nodes of one host (tests, a node and its replacement) apart;
    unix socket paths are short (108 bytes), so the directory stays near the root.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, f"meshmq-{node_name}-{pid}")
    return f"/tmp/meshmq-{os.getuid()}-{node_name}-{pid}"


def prepare_ipc_dir(path: str) -> str:
    """Create the directory (mode 0700) and clear endpoints a dead node left behind."""
    directory = Path(path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    for stale in directory.glob("*.pub"):
        stale.unlink(missing_ok=True)
    for stale in directory.glob("*.ctl"):
        stale.unlink(missing_ok=True)
    return str(directory)


def endpoint(ipc_dir: str, name: str) -> str:
    """The ZeroMQ address of endpoint `name` (`w3.pub`, `relay.pub`, `relay.ctl`)."""
    return f"ipc://{ipc_dir}/{name}"


# The relay and the store stop on this signal, from the supervisor, after the workers drained.
# They ignore SIGTERM: a service manager that signals the whole process group (systemd's
# KillMode=control-group, `kill -- -PGID`) must not take them away while workers still write
# sessions to the store and talk to the other nodes.
STOP_SIGNAL = signal.SIGUSR1
DRAIN_SIGNAL = signal.SIGUSR2  # to the relay when the node starts to drain: /health turns 503


def send_queued(sock: zmq.Socket[bytes], outbox: deque[list[bytes]]) -> int:
    """Send queued multipart messages in order until the socket would block; how many went."""
    sent = 0
    while outbox:
        try:
            sock.send_multipart(outbox[0], zmq.NOBLOCK)
        except zmq.Again:
            break
        outbox.popleft()
        sent += 1
    return sent
