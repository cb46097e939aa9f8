"""Persistent sessions against a real broker, MQTT 3.1.1 and 5.0.

Covers subscriptions kept across reconnects, QoS 1/2 messages queued while offline, resending
of in-flight PUBLISH / PUBREL on resume (raw sockets, to control the acknowledgements), clean
start, and v5 session expiry. Session expiry is observed through a will whose delay outlasts
the session, so the test waits on an event rather than on a guessed sleep.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.broker_proc import BrokerProcess
from tests.e2e.clients import (
    CONNACK,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    ClientFactory,
    ack_packet,
    connect_packet,
    publish_fields,
    raw_connect,
    read_packet,
    subscribe_packet,
)


@pytest.fixture(params=[4, 5], ids=["v311", "v5"])
def version(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def make(broker: BrokerProcess) -> Iterator[ClientFactory]:
    with ClientFactory(broker) as factory:
        yield factory


def persistent(version: int, expiry_s: int = 60) -> dict[str, Any]:
    """Connect options for a session that outlives the connection, in either version."""
    return {"clean_start": False, "session_expiry_s": expiry_s if version == 5 else None}


def test_persistent_session_keeps_subscriptions(make: ClientFactory, version: int) -> None:
    """[MQTT-3.1.2-4] (3.1.1) / [MQTT-3.1.2-5] (5.0): clean start 0 resumes the stored session,
    subscriptions included."""
    sub = make("ps", version=version, **persistent(version))
    sub.subscribe("t/ps", 1)
    sub.disconnect()
    again = make("ps", version=version, **persistent(version))
    assert again.connack.session_present is True
    make("pub", version=version).publish("t/ps", b"kept", qos=1)
    m = again.expect_one()
    assert (m.topic, m.payload, m.qos) == ("t/ps", b"kept", 1)


@pytest.mark.parametrize("qos", [1, 2])
def test_offline_messages_delivered_in_order_on_reconnect(
    make: ClientFactory, version: int, qos: int
) -> None:
    """[MQTT-3.1.2-5] (3.1.1): QoS 1/2 messages matching a disconnected persistent session are
    stored and delivered on reconnect, in order [MQTT-4.6.0-5]."""
    sub = make("off", version=version, **persistent(version))
    sub.subscribe("t/off", 2)
    sub.disconnect()
    payloads = [f"m{i:02d}".encode() for i in range(10)]
    make("pub", version=version).publish_many("t/off", payloads, qos=qos)
    again = make("off", version=version, **persistent(version))
    assert again.connack.session_present is True
    got = again.expect(len(payloads))
    assert [(m.payload, m.qos) for m in got] == [(p, qos) for p in payloads]
    again.expect_none(0.3)


def test_offline_messages_survive_an_abrupt_close(make: ClientFactory, version: int) -> None:
    """A persistent session stays when the connection is lost rather than closed cleanly."""
    sub = make("abr", version=version, **persistent(version))
    sub.subscribe("t/abr", 1)
    sub.close_abruptly()
    pub = make("pub", version=version)
    pub.publish("t/abr", b"queued", qos=1)
    again = make("abr", version=version, **persistent(version))
    assert again.connack.session_present is True
    assert again.expect_one().payload == b"queued"


def raw_persistent(
    broker: BrokerProcess, client_id: str, version: int, session_present: bool
) -> socket.socket:
    sock = raw_connect(
        broker,
        connect_packet(
            client_id, version=version, clean_start=False, session_expiry_s=60 if version == 5 else None
        ),
    )
    connack = read_packet(sock)
    assert connack.type == CONNACK and connack.body[1] == 0, connack
    assert bool(connack.body[0] & 0x01) is session_present
    return sock


def test_unacked_qos1_publish_resent_with_dup_on_resume(
    broker: BrokerProcess, make: ClientFactory, version: int
) -> None:
    """[MQTT-4.4.0-1] On resume the server resends unacknowledged PUBLISH packets with their
    original packet ids, with DUP set [MQTT-3.3.1-1]."""
    with raw_persistent(broker, "inflight1", version, session_present=False) as sock:
        sock.sendall(subscribe_packet("t/if1", 1, version=version))
        assert read_packet(sock).type == SUBACK
        make("pub", version=version).publish("t/if1", b"unacked", qos=1)
        first = read_packet(sock)
        _, pid, payload = publish_fields(first, version)
        assert payload == b"unacked" and not first.flags & 0x08
    with raw_persistent(broker, "inflight1", version, session_present=True) as sock:
        again = read_packet(sock)
        assert again.type == PUBLISH
        assert publish_fields(again, version) == ("t/if1", pid, b"unacked")
        assert again.flags & 0x08, "DUP flag not set on redelivery"
        assert (again.flags >> 1) & 3 == 1


def test_unacked_qos2_publish_resent_with_dup_on_resume(
    broker: BrokerProcess, make: ClientFactory, version: int
) -> None:
    """[MQTT-4.4.0-1] A QoS 2 PUBLISH that got no PUBREC is resent with DUP and its packet id;
    the flow then completes normally."""
    with raw_persistent(broker, "inflight2", version, session_present=False) as sock:
        sock.sendall(subscribe_packet("t/if2", 2, version=version))
        assert read_packet(sock).type == SUBACK
        make("pub", version=version).publish("t/if2", b"no pubrec", qos=2)
        _, pid, _ = publish_fields(read_packet(sock), version)
    with raw_persistent(broker, "inflight2", version, session_present=True) as sock:
        again = read_packet(sock)
        assert publish_fields(again, version) == ("t/if2", pid, b"no pubrec")
        assert again.flags & 0x08 and (again.flags >> 1) & 3 == 2
        assert pid is not None
        sock.sendall(ack_packet(PUBREC, pid))
        rel = read_packet(sock)
        assert (rel.type, struct.unpack("!H", rel.body[:2])[0]) == (PUBREL, pid)


def test_unacked_pubrel_resent_on_resume(broker: BrokerProcess, make: ClientFactory, version: int) -> None:
    """[MQTT-4.4.0-1] A PUBREL that got no PUBCOMP is resent on resume (not the PUBLISH)."""
    with raw_persistent(broker, "inflight3", version, session_present=False) as sock:
        sock.sendall(subscribe_packet("t/if3", 2, version=version))
        assert read_packet(sock).type == SUBACK
        make("pub", version=version).publish("t/if3", b"no pubcomp", qos=2)
        _, pid, _ = publish_fields(read_packet(sock), version)
        assert pid is not None
        sock.sendall(ack_packet(PUBREC, pid))
        assert read_packet(sock).type == PUBREL
    with raw_persistent(broker, "inflight3", version, session_present=True) as sock:
        rel = read_packet(sock)
        assert (rel.type, rel.flags, struct.unpack("!H", rel.body[:2])[0]) == (PUBREL, 0x02, pid)


def test_clean_start_discards_subscriptions_and_queue(make: ClientFactory, version: int) -> None:
    """[MQTT-3.1.2-6] (3.1.1) / [MQTT-3.1.2-4] (5.0): clean start discards the stored session:
    its subscriptions and its queued messages."""
    sub = make("cl", version=version, **persistent(version))
    sub.subscribe("t/cl", 1)
    sub.disconnect()
    pub = make("pub", version=version)
    pub.publish("t/cl", b"queued", qos=1)
    clean = make("cl", version=version, clean_start=True)
    assert clean.connack.session_present is False
    pub.publish("t/cl", b"after", qos=1)
    clean.expect_none(0.4)


def test_v5_session_without_expiry_ends_at_disconnect(make: ClientFactory) -> None:
    """v5: Session Expiry Interval absent (0) -> the session ends when the connection closes,
    even with Clean Start 0 (spec 3.1.2.11.2; [MQTT-3.1.2-23] is the non-zero case)."""
    sub = make("se0", version=5, clean_start=False)
    sub.subscribe("t/se0", 1)
    sub.disconnect()
    again = make("se0", version=5, clean_start=False)
    assert again.connack.session_present is False
    make("pub", version=5).publish("t/se0", b"x", qos=1)
    again.expect_none(0.3)


def test_v5_disconnect_can_end_the_session(make: ClientFactory) -> None:
    """v5: DISCONNECT with Session Expiry Interval 0 ends a session that had a longer one."""
    sub = make("sed", version=5, **persistent(5))
    sub.subscribe("t/sed", 1)
    sub.disconnect(properties={"SessionExpiryInterval": 0})
    again = make("sed", version=5, clean_start=False)
    assert again.connack.session_present is False


def test_v5_session_kept_within_expiry(make: ClientFactory) -> None:
    """[MQTT-3.1.2-23] v5: with a non-zero expiry the session is stored after the connection
    closes; reconnecting within the interval resumes it with its queued messages."""
    sub = make("sek", version=5, **persistent(5, expiry_s=2))
    sub.subscribe("t/sek", 1)
    sub.disconnect()
    make("pub", version=5).publish("t/sek", b"within", qos=1)
    again = make("sek", version=5, **persistent(5, expiry_s=2))
    assert again.connack.session_present is True
    assert again.expect_one().payload == b"within"


def test_v5_session_gone_after_expiry(make: ClientFactory) -> None:
    """v5: the session is discarded when the Session Expiry Interval has passed.

    Observed via the will: its delay (60 s) outlasts the session (1 s), so the server publishes
    it when the session ends [MQTT-3.1.3-9]; then a reconnect finds no session.
    """
    watcher = make("watch", version=5)
    watcher.subscribe("t/sge/will", 1)
    gone = make(
        "sge",
        version=5,
        **persistent(5, expiry_s=1),
        will={
            "topic": "t/sge/will",
            "payload": b"session ended",
            "qos": 1,
            "properties": {"WillDelayInterval": 60},
        },
    )
    gone.subscribe("t/sge", 1)
    closed_at = time.monotonic()
    gone.close_abruptly()
    assert watcher.expect_one(timeout_s=4).payload == b"session ended"
    assert time.monotonic() - closed_at >= 0.9, "session ended before its expiry interval"
    again = make("sge", version=5, clean_start=False)
    assert again.connack.session_present is False
