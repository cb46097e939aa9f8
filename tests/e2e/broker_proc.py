"""Start a real broker process for end-to-end tests.

Why: every e2e test talks to a real `meshmq` (or, to check a test itself, Debian's mosquitto)
over real sockets. This module owns starting it on a free loopback port, waiting until it
accepts connections (an event, not a sleep), and stopping it by PID.

Set MESHMQ_TEST_BROKER=mosquitto to run the suite against mosquitto: tests marked
`meshmq_only` (our config keys, our limits) are then skipped. A test that fails on both brokers
is a wrong test; one that fails only on ours is a bug of ours.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
BROKER_KIND = os.environ.get("MESHMQ_TEST_BROKER", "meshmq")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"broker did not listen on {host}:{port} within {timeout_s}s")


def _meshmq_command() -> list[str]:
    exe = Path(sys.executable).with_name("meshmq")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "broker.cli"]


@dataclass
class BrokerProcess:
    workdir: Path
    config: dict[str, Any] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"broker-{self.starts}.log"

    def log(self) -> str:
        return "".join(
            (self.workdir / f"broker-{i}.log").read_text(errors="replace") for i in range(1, self.starts + 1)
        )

    def start(self) -> BrokerProcess:
        chosen = not self.port
        for attempt in range(3):
            if chosen and attempt:
                self.port = 0  # another test took the port between our check and the bind
            try:
                return self._start_once()
            except RuntimeError:
                if not chosen or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> BrokerProcess:
        if not self.port:
            self.port = free_port(self.host)
        self.starts += 1
        if BROKER_KIND == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\n")
            cmd = ["/usr/sbin/mosquitto", "-c", str(conf)]
        else:
            cfg = {"ListenAddress": self.host, "TCP": self.port, "Workers": 1}
            cfg.update(self.config)
            cfg.setdefault("SessionStore", {"Type": "MEMORY"})
            path = self.workdir / "meshmq.yaml"
            path.write_text(yaml.safe_dump(cfg))
            cmd = [*_meshmq_command(), "-config", str(path), *self.args]
        logf = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
        logf.close()
        wait_listening(self.host, self.port, self.proc)
        return self

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (graceful) and wait; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        self._signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            return self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL the broker's process group: a crash, nothing flushed."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(5)

    def wait_log(self, pattern: str, count: int = 1, timeout_s: float = 10.0) -> list[str]:
        """Wait until the log holds `count` matches of the regex `pattern`; all matches found."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = re.findall(pattern, self.log())
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"log: {len(found)} of {count} {pattern!r} within {timeout_s}s")
            time.sleep(0.05)

    def restart(self) -> BrokerProcess:
        self.stop()
        return self.start()
