"""Interop with the reference command-line clients mosquitto_pub / mosquitto_sub.

Why: paho and our raw kit are our own choice of client; mosquitto's clients are an independent
implementation that users run against brokers all the time. Messages go both ways (paho ->
mosquitto_sub, mosquitto_pub -> paho), in 3.1.1 and 5.0, at each QoS, retained, through a
persistent session (-c -i), and as a will (--will-*).

Must not: wait on sleeps. mosquitto_sub runs with -d so its debug output says when the SUBACK
arrived; every subprocess has a count (-C) and a timeout (-W / subprocess timeout) and is
stopped by its own PID.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.e2e.broker_proc import BrokerProcess
from tests.e2e.clients import ClientFactory

MOSQUITTO_PUB = "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = "/usr/bin/mosquitto_sub"  # run under stdbuf -oL: its -d output is stdio
FORMAT = "MSG %t %q %r %p"  # topic, qos, retain, payload


@pytest.fixture(params=["mqttv311", "mqttv5"])
def cli_version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(broker: BrokerProcess) -> Iterator[ClientFactory]:
    with ClientFactory(broker) as factory:
        yield factory


def paho_version(cli_version: str) -> int:
    return 5 if cli_version == "mqttv5" else 4


class SubProcess:
    """A running mosquitto_sub whose stdout lines are read by a thread into a queue."""

    def __init__(self, broker: BrokerProcess, cli_version: str, *args: str) -> None:
        cmd = [
            "stdbuf",
            "-oL",
            MOSQUITTO_SUB,
            "-h",
            broker.host,
            "-p",
            str(broker.port),
            "-V",
            cli_version,
            "-d",
            "-F",
            FORMAT,
            "-W",
            "8",
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, needle: str, timeout_s: float = 5) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"mosquitto_sub: no {needle!r} within {timeout_s}s; output: {self.seen}"
                ) from None
            if line is None:
                raise AssertionError(f"mosquitto_sub exited without {needle!r}: {self.seen}")
            self.seen.append(line)
            if needle in line:
                return line

    def wait_subscribed(self) -> None:
        self.wait_for("received SUBACK")

    def messages(self, n: int, timeout_s: float = 5) -> list[tuple[str, int, bool, str]]:
        """The next n messages as (topic, qos, retain, payload)."""
        got = []
        for _ in range(n):
            _, topic, qos, retain, payload = self.wait_for("MSG ", timeout_s).split(" ", 4)
            got.append((topic, int(qos), retain == "1", payload))
        return got

    def wait_exit(self, timeout_s: float = 5) -> int:
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child, by its PID
        self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def subs() -> Iterator[list[SubProcess]]:
    started: list[SubProcess] = []
    yield started
    for s in started:
        s.stop()


def mosquitto_pub(broker: BrokerProcess, cli_version: str, *args: str, stdin: str | None = None) -> None:
    cmd = [MOSQUITTO_PUB, "-h", broker.host, "-p", str(broker.port), "-V", cli_version, *args]
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0, f"{cmd}: {done.returncode} {done.stdout} {done.stderr}"


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_to_mosquitto_sub(
    broker: BrokerProcess, make: ClientFactory, subs: list[SubProcess], cli_version: str, qos: int
) -> None:
    """paho publishes at QoS 2; mosquitto_sub (-q qos) receives it at its subscription QoS."""
    sub = SubProcess(broker, cli_version, "-q", str(qos), "-t", "t/ms", "-C", "1")
    subs.append(sub)
    sub.wait_subscribed()
    make("pub", version=paho_version(cli_version)).publish("t/ms", b"hello", qos=2)
    assert sub.messages(1) == [("t/ms", qos, False, "hello")]
    assert sub.wait_exit() == 0


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_pub_to_paho(
    broker: BrokerProcess, make: ClientFactory, cli_version: str, qos: int
) -> None:
    """mosquitto_pub -q qos; a paho subscriber at QoS 2 receives it at that QoS."""
    sub = make("sub", version=paho_version(cli_version))
    sub.subscribe("t/mp", 2)
    mosquitto_pub(broker, cli_version, "-q", str(qos), "-t", "t/mp", "-m", "from cli")
    m = sub.expect_one()
    assert (m.topic, m.payload, m.qos, m.retain) == ("t/mp", b"from cli", qos, False)


def test_mosquitto_pub_lines_arrive_in_order(
    broker: BrokerProcess, make: ClientFactory, cli_version: str
) -> None:
    """mosquitto_pub -l sends one QoS 1 message per stdin line; order is kept [MQTT-4.6.0-5]."""
    sub = make("sub", version=paho_version(cli_version))
    sub.subscribe("t/lines", 1)
    lines = [f"line {i:02d}" for i in range(20)]
    mosquitto_pub(broker, cli_version, "-q", "1", "-t", "t/lines", "-l", stdin="\n".join(lines) + "\n")
    assert [m.payload.decode() for m in sub.expect(len(lines))] == lines


def test_retained_both_ways(
    broker: BrokerProcess, make: ClientFactory, subs: list[SubProcess], cli_version: str
) -> None:
    """mosquitto_pub -r is retained for paho; paho's retained message reaches mosquitto_sub
    with the retain flag [MQTT-3.3.1-6]."""
    version = paho_version(cli_version)
    mosquitto_pub(broker, cli_version, "-q", "1", "-r", "-t", "t/r/cli", "-m", "cli state")
    make("pub", version=version).publish("t/r/paho", b"paho state", qos=1, retain=True)
    late = make("late", version=version)
    late.subscribe("t/r/cli", 1)
    m = late.expect_one()
    assert (m.payload, m.retain) == (b"cli state", True)
    sub = SubProcess(broker, cli_version, "-q", "1", "-t", "t/r/paho", "-C", "1")
    subs.append(sub)
    assert sub.messages(1) == [("t/r/paho", 1, True, "paho state")]


def test_persistent_mosquitto_sub_session(
    broker: BrokerProcess, make: ClientFactory, subs: list[SubProcess], cli_version: str
) -> None:
    """mosquitto_sub -c -i: subscribe and leave (-E); QoS 1 messages published meanwhile are
    delivered in order when it comes back [MQTT-3.1.2-5] (3.1.1) / [MQTT-3.1.2-23] (5.0)."""
    session = ["-c", "-i", "cli-persistent", "-q", "1", "-t", "t/cp"]
    if cli_version == "mqttv5":
        session += ["-x", "60"]
    first = SubProcess(broker, cli_version, *session, "-E")
    subs.append(first)
    first.wait_subscribed()
    assert first.wait_exit() == 0
    make("pub", version=paho_version(cli_version)).publish_many("t/cp", [b"q1", b"q2", b"q3"], qos=1)
    back = SubProcess(broker, cli_version, *session, "-C", "3")
    subs.append(back)
    assert [m[3] for m in back.messages(3)] == ["q1", "q2", "q3"]


def test_mosquitto_sub_will(
    broker: BrokerProcess, make: ClientFactory, subs: list[SubProcess], cli_version: str
) -> None:
    """--will-*: killing mosquitto_sub (no DISCONNECT) publishes its will [MQTT-3.1.2-8],
    retained because of --will-retain [MQTT-3.1.2-17]."""
    version = paho_version(cli_version)
    watcher = make("watch", version=version)
    watcher.subscribe("t/cw", 2)
    sub = SubProcess(
        broker,
        cli_version,
        "-t",
        "t/nothing",
        "--will-topic",
        "t/cw",
        "--will-payload",
        "cli died",
        "--will-qos",
        "2",
        "--will-retain",
    )
    subs.append(sub)
    sub.wait_subscribed()
    sub.stop()
    m = watcher.expect_one()
    assert (m.topic, m.payload, m.qos) == ("t/cw", b"cli died", 2)
    late = make("late", version=version)
    late.subscribe("t/cw", 2)
    m = late.expect_one()
    assert (m.payload, m.retain) == (b"cli died", True)
