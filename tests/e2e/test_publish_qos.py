"""PUBLISH at QoS 0/1/2 in both directions, MQTT 3.1.1 and 5.0, against a real broker.

Covers the acknowledgement flows on the wire (raw sockets), the QoS downgrade to the
subscription's QoS, overlapping subscriptions, per-topic ordering, QoS 2 duplicate suppression
and unsubscribe.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from tests.e2e.broker_proc import BrokerProcess
from tests.e2e.clients import (
    CONNACK,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    ClientFactory,
    Message,
    TestClient,
    ack_packet,
    connect_packet,
    prop,
    publish_fields,
    publish_packet,
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


def pid_of(body: bytes) -> int:
    return int(struct.unpack("!H", body[:2])[0])


def test_qos_is_min_of_publish_and_subscription(make: ClientFactory, version: int) -> None:
    """[MQTT-3.8.4-8] (5.0) / [MQTT-3.8.4-6] (3.1.1): delivered QoS = min(published, granted).

    Order is compared per published QoS only: [MQTT-4.6.0-5] orders messages of the same QoS.
    """
    subs = {q: make(f"sub{q}", version=version) for q in (0, 1, 2)}
    for q, s in subs.items():
        assert s.subscribe("t/qos", q) == [q]
    pub = make("pub", version=version)
    for pub_qos in (0, 1, 2):
        pub.publish("t/qos", f"p{pub_qos}".encode(), qos=pub_qos)
    for sub_qos, s in subs.items():
        got = sorted((m.payload, m.qos) for m in s.expect(3))
        assert got == [(f"p{q}".encode(), min(q, sub_qos)) for q in (0, 1, 2)], sub_qos
        s.expect_none(0.2)


def test_raw_publisher_qos1_gets_puback(broker: BrokerProcess, version: int) -> None:
    """[MQTT-4.3.2-2] (3.1.1 numbering) QoS 1: the receiver answers PUBLISH with PUBACK
    carrying its packet id."""
    with raw_connect(broker, connect_packet("rp1", version=version)) as sock:
        assert read_packet(sock).type == CONNACK
        sock.sendall(publish_packet("t/raw", b"one", qos=1, packet_id=0x1234, version=version))
        ack = read_packet(sock)
        assert (ack.type, pid_of(ack.body)) == (PUBACK, 0x1234)


def test_raw_publisher_qos2_flow(broker: BrokerProcess, version: int) -> None:
    """[MQTT-4.3.3-2] (3.1.1 numbering) QoS 2: PUBLISH -> PUBREC, PUBREL -> PUBCOMP, same
    packet id throughout."""
    with raw_connect(broker, connect_packet("rp2", version=version)) as sock:
        assert read_packet(sock).type == CONNACK
        sock.sendall(publish_packet("t/raw", b"two", qos=2, packet_id=77, version=version))
        rec = read_packet(sock)
        assert (rec.type, pid_of(rec.body)) == (PUBREC, 77)
        sock.sendall(ack_packet(PUBREL, 77))
        comp = read_packet(sock)
        assert (comp.type, pid_of(comp.body)) == (PUBCOMP, 77)


def raw_subscriber(
    broker: BrokerProcess, client_id: str, topic: str, qos: int, version: int
) -> socket.socket:
    sock = raw_connect(broker, connect_packet(client_id, version=version))
    assert read_packet(sock).type == CONNACK
    sock.sendall(subscribe_packet(topic, qos, packet_id=1, version=version))
    suback = read_packet(sock)
    assert suback.type == SUBACK and suback.body[-1] == qos
    return sock


def test_raw_subscriber_qos1_flow(broker: BrokerProcess, make: ClientFactory, version: int) -> None:
    """[MQTT-4.3.2-1] (3.1.1 numbering) Outgoing QoS 1 PUBLISH has a packet id, DUP 0; PUBACK completes it."""
    with raw_subscriber(broker, "rs1", "t/rs1", 1, version) as sock:
        pub = make("pub", version=version)
        pub.publish("t/rs1", b"m1", qos=1)
        p = read_packet(sock)
        topic, pid, payload = publish_fields(p, version)
        assert (p.type, topic, payload) == (PUBLISH, "t/rs1", b"m1")
        assert (p.flags >> 1) & 3 == 1 and not p.flags & 0x08 and pid
        sock.sendall(ack_packet(PUBACK, pid))
        pub.publish("t/rs1", b"m2", qos=1)
        assert publish_fields(read_packet(sock), version)[2] == b"m2"


def test_raw_subscriber_qos2_flow(broker: BrokerProcess, make: ClientFactory, version: int) -> None:
    """[MQTT-4.3.3-1] (3.1.1 numbering) Outgoing QoS 2: PUBLISH, PUBREC -> PUBREL (flags 0010 [MQTT-3.6.1-1]),
    PUBCOMP; all with the same packet id."""
    with raw_subscriber(broker, "rs2", "t/rs2", 2, version) as sock:
        pub = make("pub", version=version)
        pub.publish("t/rs2", b"m1", qos=2)
        p = read_packet(sock)
        topic, pid, payload = publish_fields(p, version)
        assert (p.type, topic, payload, (p.flags >> 1) & 3) == (PUBLISH, "t/rs2", b"m1", 2)
        assert pid
        sock.sendall(ack_packet(PUBREC, pid))
        rel = read_packet(sock)
        assert (rel.type, rel.flags, pid_of(rel.body)) == (PUBREL, 0x02, pid)
        sock.sendall(ack_packet(PUBCOMP, pid))
        pub.publish("t/rs2", b"m2", qos=2)
        assert publish_fields(read_packet(sock), version)[2] == b"m2"


def test_qos2_resent_publish_before_pubrel_is_delivered_once(
    broker: BrokerProcess, make: ClientFactory, version: int
) -> None:
    """[MQTT-4.3.3-2] (3.1.1) / [MQTT-4.3.3-10] (5.0): a PUBLISH resent with DUP and the same
    packet id before PUBREL is acknowledged with PUBREC again but not delivered again. After
    PUBCOMP the packet id is free: the same id starts a new message."""
    sub = make("sub", version=version)
    sub.subscribe("t/dup", 2)
    with raw_connect(broker, connect_packet("rawpub", version=version)) as sock:
        assert read_packet(sock).type == CONNACK
        sock.sendall(publish_packet("t/dup", b"once", qos=2, packet_id=9, version=version))
        assert read_packet(sock).type == PUBREC
        sock.sendall(publish_packet("t/dup", b"once", qos=2, packet_id=9, dup=True, version=version))
        rec = read_packet(sock)
        assert (rec.type, pid_of(rec.body)) == (PUBREC, 9)
        sock.sendall(ack_packet(PUBREL, 9))
        assert read_packet(sock).type == PUBCOMP
        assert sub.expect_one().payload == b"once"
        sub.expect_none(0.3)
        sock.sendall(publish_packet("t/dup", b"new", qos=2, packet_id=9, version=version))
        assert read_packet(sock).type == PUBREC
        sock.sendall(ack_packet(PUBREL, 9))
        assert read_packet(sock).type == PUBCOMP
        assert sub.expect_one().payload == b"new"


def expect_overlapping(sub: TestClient, copies_max: int, qos_max: int) -> list[Message]:
    """Collect the copies of one message until the max-QoS copy arrives; check the bounds."""
    got = [sub.expect_one()]
    while got[-1].qos != qos_max and len(got) < copies_max:
        got.append(sub.expect_one())
    assert got[-1].qos == qos_max, [(m.qos, m.payload) for m in got]
    sub.expect_none(0.3)
    return got


def test_overlapping_subscriptions_deliver_at_max_qos(make: ClientFactory, version: int) -> None:
    """[MQTT-3.3.4-2] Overlapping subscriptions: a copy at the max QoS of the matching ones.

    The server MAY send further copies (one per subscription); MeshMQ sends exactly one, which
    the meshmq-only test checks. v5 subscription ids: one copy carries all of them
    [MQTT-3.3.4-4], several copies carry one each [MQTT-3.3.4-5].
    """
    sub = make("sub", version=version)
    props1 = {"SubscriptionIdentifier": 1} if version == 5 else None
    props2 = {"SubscriptionIdentifier": 2} if version == 5 else None
    assert sub.subscribe("t/ov/#", 1, properties=props1) == [1]
    assert sub.subscribe("t/ov/x", 2, properties=props2) == [2]
    make("pub", version=version).publish("t/ov/x", b"both", qos=2)
    got = expect_overlapping(sub, copies_max=2, qos_max=2)
    assert all(m.payload == b"both" for m in got)
    if version == 5:
        ids = sorted(i for m in got for i in prop(m, "SubscriptionIdentifier"))
        assert ids == [1, 2]


@pytest.mark.meshmq_only  # mosquitto 2.0.11 sends one copy per subscription to v5 clients
def test_overlapping_subscriptions_deliver_once(make: ClientFactory, version: int) -> None:
    """MeshMQ: one copy at max QoS; v5: with every matching subscription id [MQTT-3.3.4-4]."""
    sub = make("sub", version=version)
    sub.subscribe("t/ov/#", 1, properties={"SubscriptionIdentifier": 1} if version == 5 else None)
    sub.subscribe("t/ov/+", 2, properties={"SubscriptionIdentifier": 2} if version == 5 else None)
    sub.subscribe("t/ov/x", 0)
    make("pub", version=version).publish("t/ov/x", b"once", qos=2)
    m = sub.expect_one()
    assert (m.payload, m.qos) == (b"once", 2)
    if version == 5:
        assert sorted(prop(m, "SubscriptionIdentifier")) == [1, 2]
    sub.expect_none(0.3)


def test_resubscribe_replaces_the_subscription(make: ClientFactory, version: int) -> None:
    """[MQTT-3.8.4-3] SUBSCRIBE with an existing filter replaces it: one copy, the new QoS."""
    sub = make("sub", version=version)
    assert sub.subscribe("t/re", 2) == [2]
    assert sub.subscribe("t/re", 1) == [1]
    make("pub", version=version).publish("t/re", b"x", qos=2)
    assert sub.expect_one().qos == 1
    sub.expect_none(0.3)


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_messages_per_topic_arrive_in_order(make: ClientFactory, version: int, qos: int) -> None:
    """[MQTT-4.6.0-5] Messages on one topic from one client arrive in publish order."""
    sub = make("sub", version=version)
    sub.subscribe("t/order", qos)
    payloads = [f"{i:03d}".encode() for i in range(40)]
    make("pub", version=version).publish_many("t/order", payloads, qos=qos)
    got = sub.expect(len(payloads))
    assert [m.payload for m in got] == payloads
    assert {m.qos for m in got} == {qos}


def test_unsubscribe_stops_delivery(make: ClientFactory, version: int) -> None:
    """[MQTT-3.10.4-2] After UNSUBACK no new messages for that filter are delivered.

    v5 UNSUBACK reason codes: 0x00 Success, 0x11 No subscription existed.
    """
    sub = make("sub", version=version)
    sub.subscribe("t/un/#", 1)
    sub.subscribe("t/un/keep", 1)
    pub = make("pub", version=version)
    pub.publish("t/un/a", b"before", qos=1)
    assert sub.expect_one().payload == b"before"
    codes = sub.unsubscribe("t/un/#")
    assert codes == ([0x00] if version == 5 else [])
    if version == 5:
        assert sub.unsubscribe("t/un/never") == [0x11]
    pub.publish("t/un/a", b"after", qos=1)
    pub.publish("t/un/keep", b"kept", qos=1)
    assert sub.expect_one().payload == b"kept"
    sub.expect_none(0.3)


def test_wildcards_match_per_spec(make: ClientFactory, version: int) -> None:
    """[MQTT-4.7.1-2] '#' also matches the parent level; '+' matches exactly one level."""
    sub = make("sub", version=version)
    sub.subscribe([("t/w/#", 1), ("t/+/one", 1)])
    pub = make("pub", version=version)
    for topic in ("t/w", "t/w/a/b", "t/x/one", "t/x/one/more", "t/y"):
        pub.publish(topic, topic.encode(), qos=1)
    got = sorted(m.topic for m in sub.expect(3))
    assert got == ["t/w", "t/w/a/b", "t/x/one"]
    sub.expect_none(0.3)


def test_publisher_receives_its_own_message_by_default(make: ClientFactory, version: int) -> None:
    """A publisher that subscribes receives its own message (no_local is off by default)."""
    c = make("self", version=version)
    c.subscribe("t/self", 1)
    c.publish("t/self", b"mine", qos=1)
    assert c.expect_one().payload == b"mine"
