"""The broker's configured limits (`MQTT.*` keys) as a client sees them.

Why: a limit that is configured but not enforced, or enforced without telling the client (the
CONNACK properties of MQTT 5), is worse than none. Each test configures one small limit, goes
past it, and checks both the refusal and that the broker goes on serving.

Where mosquitto has an equivalent option the same test also runs against it (the `limited`
fixture maps our keys onto mosquitto.conf lines), which checks the test itself; tests of
behaviour mosquitto lacks or does differently are `meshmq_only`.

Must not: wait on sleeps except where the limit is a time (connect timeout, keep alive).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.protocol.packets import Properties, Publish, Subscription, Will
from tests.e2e.broker_proc import BROKER_KIND, BrokerProcess, free_port, wait_listening
from tests.e2e.conftest import BrokerFactory
from tests.e2e.rawclient import RawClient, connected, expect_disconnect

pytestmark = pytest.mark.timeout(30)

_MOSQUITTO_OPTIONS = {
    "MaxConnections": "max_connections",
    "MaxQueuedMessages": "max_queued_messages",
    "MaxKeepAlive": "max_keepalive",
    "MaximumQoS": "max_qos",
    "RetainAvailable": "retain_available",
    "MaxPacketSize": "max_packet_size",
    "MaxInflight": "max_inflight_messages",
}


class _MosquittoWithLimits(BrokerProcess):
    """mosquitto with our `MQTT.*` limits translated to its own options."""

    def start(self) -> BrokerProcess:
        if not self.port:
            self.port = free_port(self.host)
        self.starts += 1
        lines = [f"listener {self.port} {self.host}", "allow_anonymous true"]
        for key, value in self.config.get("MQTT", {}).items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            lines.append(f"{_MOSQUITTO_OPTIONS[key]} {text}")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                ["/usr/sbin/mosquitto", "-c", str(conf)],
                cwd=self.workdir,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_listening(self.host, self.port, self.proc)
        return self


@pytest.fixture
def limited(broker_factory: BrokerFactory, tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """`limited(MaxQueuedMessages=3)`: a broker with those `MQTT.*` settings."""
    started: list[BrokerProcess] = []

    def make(**mqtt: Any) -> BrokerProcess:
        if BROKER_KIND != "mosquitto":
            return broker_factory({"MQTT": mqtt})
        workdir = tmp_path / f"lim{len(started)}"
        workdir.mkdir()
        b = _MosquittoWithLimits(workdir=workdir, config={"MQTT": mqtt})
        started.append(b)
        return b.start()

    yield make
    for b in started:
        b.stop()


# -- MaxConnections -------------------------------------------------------------------------


# mosquitto closes the extra socket at accept time without a CONNACK
@pytest.mark.meshmq_only
@pytest.mark.parametrize(("version", "code"), [(5, 0x97), (4, 0x03)])
def test_max_connections(limited: Callable[..., BrokerProcess], version: int, code: int) -> None:
    """With MaxConnections 2 the third CONNECT gets CONNACK 0x97 Quota exceeded (3.1.1: 0x03
    Server unavailable) and is closed [MQTT-3.2.2-7]; a freed slot is reused."""
    broker = limited(MaxConnections=2)
    first = connected(broker, "mc-1", version=version)
    second = connected(broker, "mc-2", version=version)
    try:
        with RawClient(broker, version) as extra:
            ack = extra.connect("mc-3")
            assert ack.reason_code == code
            assert not ack.session_present
            extra.wait_closed()
        first.disconnect()
        deadline = time.monotonic() + 3
        while True:  # the broker notices the freed slot asynchronously
            with RawClient(broker, version) as again:
                if again.connect("mc-4").reason_code == 0:
                    break
            assert time.monotonic() < deadline, "slot not freed after a DISCONNECT"
            time.sleep(0.05)
        refusals = [
            ln
            for ln in broker.log().lower().splitlines()
            if any(w in ln for w in ("maxconnections", "max connections", "quota", "too many", "limit"))
        ]
        assert refusals, "the refused connection is not logged with its reason"
    finally:
        second.close()


# -- MaxQueuedMessages ---------------------------------------------------------------------


@pytest.mark.parametrize("version", [5, 4])
def test_max_queued_messages_offline(limited: Callable[..., BrokerProcess], version: int) -> None:
    """An offline persistent session keeps at most MaxQueuedMessages QoS 1 messages: it gets
    the first N on reconnect and the drop is logged."""
    broker = limited(MaxQueuedMessages=3)
    session = Properties(session_expiry_interval_s=300) if version == 5 else Properties()
    sub = connected(broker, "mq-sub", version=version, clean_start=False, properties=session)
    sub.subscribe(Subscription("mq/t", 1))
    sub.disconnect()
    with connected(broker, "mq-pub", version=version) as pub:
        for i in range(6):
            pub.publish("mq/t", str(i).encode(), qos=1)
    with RawClient(broker, version) as sub2:
        assert sub2.connect("mq-sub", clean_start=False, properties=session).session_present
        got = [p for p in sub2.drain(1.0) if isinstance(p, Publish)]
        assert [p.payload for p in got] == [b"0", b"1", b"2"]
        for p in got:
            sub2.ack(p)
    assert "drop" in broker.log().lower(), "the dropped messages are not logged"


# -- ConnectTimeout -------------------------------------------------------------------------


@pytest.mark.meshmq_only  # mosquitto has no such option
def test_connect_timeout(limited: Callable[..., BrokerProcess]) -> None:
    """A connection that sends no (or only part of a) CONNECT within ConnectTimeout is closed
    (spec 4.8 / the server "SHOULD close the connection if CONNECT does not arrive")."""
    broker = limited(ConnectTimeout=0.5)
    silent = RawClient(broker)
    partial = RawClient(broker)
    partial.send_bytes(b"\x10\x10\x00\x04MQ")
    started = time.monotonic()
    try:
        assert silent.wait_closed(4) == []
        assert partial.wait_closed(4) == []
        assert time.monotonic() - started < 3.5
        with connected(broker, "after-timeout"):
            pass
    finally:
        silent.close()
        partial.close()


# -- MaxKeepAlive ---------------------------------------------------------------------------


def test_max_keepalive_announced(limited: Callable[..., BrokerProcess]) -> None:
    """A v5 client asking for more than MaxKeepAlive is told the server's value in CONNACK
    (Server Keep Alive; [MQTT-3.2.2-21] the client must use it); one asking for less keeps
    its own value (no Server Keep Alive, or the same value)."""
    broker = limited(MaxKeepAlive=10)  # mosquitto's smallest allowed value
    with RawClient(broker) as c:
        ack = c.connect("ka-long", keepalive_s=60)
        assert ack.reason_code == 0
        assert ack.properties.server_keep_alive_s == 10
    with RawClient(broker) as c:
        ack = c.connect("ka-short", keepalive_s=5)
        assert ack.properties.server_keep_alive_s in (None, 5)


@pytest.mark.meshmq_only  # mosquitto's max_keepalive must be >= 10: too slow to wait out here
def test_max_keepalive_enforced(limited: Callable[..., BrokerProcess]) -> None:
    """The Server Keep Alive is enforced: a silent client that asked for 60 s is closed after
    1.5 times the server's 1 s [MQTT-3.1.2-24] (v5: DISCONNECT 0x8D if one is sent)."""
    broker = limited(MaxKeepAlive=1)
    with RawClient(broker) as c:
        ack = c.connect("ka", keepalive_s=60)
        assert ack.properties.server_keep_alive_s == 1
        started = time.monotonic()
        got = c.wait_closed(4)
        assert time.monotonic() - started >= 1.0
        assert [p.reason_code for p in got if hasattr(p, "reason_code")] in ([], [0x8D]), got


# -- MaximumQoS -----------------------------------------------------------------------------


def test_maximum_qos(limited: Callable[..., BrokerProcess]) -> None:
    """With MaximumQoS 1: CONNACK says so [MQTT-3.2.2-9], SUBACK grants at most 1, QoS 1 works,
    and a QoS 2 PUBLISH gets DISCONNECT 0x9B [MQTT-3.2.2-11] (spec 3.2.2.3.4)."""
    broker = limited(MaximumQoS=1)
    with RawClient(broker) as c, connected(broker, "mqos-311", version=4) as old:
        ack = c.connect("mqos")
        assert ack.properties.maximum_qos == 1
        assert c.subscribe(Subscription("mq/#", 2)).reason_codes == (1,)
        assert old.subscribe(Subscription("mq/#", 2)).reason_codes == (1,)
        c.publish("mq/t", b"one", qos=1)
        for client in (c, old):
            m = client.expect(Publish)
            assert (m.payload, m.qos) == (b"one", 1)
            client.ack(m)
        c.send(Publish("mq/t", b"two", qos=2, packet_id=9))
        expect_disconnect(c, {0x9B})


def test_maximum_qos_will(limited: Callable[..., BrokerProcess]) -> None:
    """A CONNECT whose Will QoS exceeds MaximumQoS is refused with CONNACK 0x9B [MQTT-3.2.2-12]."""
    broker = limited(MaximumQoS=1)
    with RawClient(broker) as c:
        ack = c.connect("mqos-will", will=Will("w/t", b"bye", qos=2))
        assert ack.reason_code == 0x9B
        c.wait_closed()


# -- RetainAvailable ------------------------------------------------------------------------


def test_retain_not_available(limited: Callable[..., BrokerProcess]) -> None:
    """With RetainAvailable false CONNACK says Retain Available 0 and a retained PUBLISH gets
    DISCONNECT 0x9A [MQTT-3.2.2-14]; plain publishes still work."""
    broker = limited(RetainAvailable=False)
    with RawClient(broker) as c:
        ack = c.connect("noretain")
        assert ack.properties.retain_available == 0
        c.publish("nr/t", b"plain", qos=1)
        c.send(Publish("nr/t", b"kept?", retain=True))
        expect_disconnect(c, {0x9A})


def test_retain_not_available_will(limited: Callable[..., BrokerProcess]) -> None:
    """A CONNECT with Will Retain 1 when retain is not available gets CONNACK 0x9A
    [MQTT-3.2.2-13]."""
    broker = limited(RetainAvailable=False)
    with RawClient(broker) as c:
        ack = c.connect("noretain-will", will=Will("w/t", b"bye", retain=True))
        assert ack.reason_code == 0x9A
        c.wait_closed()


# -- MaxPacketSize --------------------------------------------------------------------------


def test_broker_maximum_packet_size(limited: Callable[..., BrokerProcess]) -> None:
    """CONNACK announces the server's Maximum Packet Size (spec 3.2.2.3.6); a client sending a
    larger PUBLISH [MQTT-3.2.2-15] gets DISCONNECT 0x95 and the connection closes, while
    other clients carry on."""
    broker = limited(MaxPacketSize=1024)
    with RawClient(broker) as c, connected(broker, "mps-ok") as ok:
        ack = c.connect("mps-over")
        assert ack.properties.maximum_packet_bytes == 1024
        ok.subscribe("mps/#")
        c.publish("mps/fits", b"x" * 900, qos=1)  # acked: processed before the bad packet comes
        c.send(Publish("mps/over", b"x" * 1100))
        expect_disconnect(c, {0x95})
        assert ok.expect(Publish).payload == b"x" * 900
        ok.publish("mps/after", b"y")
        assert ok.expect(Publish).payload == b"y"
        ok.expect_none(0.2)


def test_broker_maximum_packet_size_v311(limited: Callable[..., BrokerProcess]) -> None:
    """A 3.1.1 client over the limit is disconnected, with no DISCONNECT packet in 3.1.1."""
    broker = limited(MaxPacketSize=1024)
    with connected(broker, "mps-311", version=4) as c:
        c.send(Publish("mps/over", b"x" * 1100))
        assert c.wait_closed() == []


@pytest.mark.meshmq_only  # mosquitto reads (and buffers) the whole declared body first
def test_broker_maximum_packet_size_checked_on_header(limited: Callable[..., BrokerProcess]) -> None:
    """The size check happens on the fixed header: a PUBLISH that declares 100 MB is refused
    with 0x95 at once, without the broker waiting for (or buffering) the body."""
    broker = limited(MaxPacketSize=1024)
    with connected(broker, "mps-header") as c:
        c.send_bytes(b"\x30\x80\x80\x80\x30" + b"\x00\x03a/b")  # remaining length 100 663 296
        expect_disconnect(c, {0x95}, timeout_s=2)
