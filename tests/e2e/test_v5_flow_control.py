"""MQTT 5 flow control end to end: topic aliases, receive maximum, maximum packet size.

Why: these three limits are negotiated in CONNECT / CONNACK and then bind both sides for the
whole connection; getting one wrong either breaks a conforming peer (an alias it never agreed
to, more in-flight messages than it can hold) or lets a peer overrun the broker. The raw client
is used throughout because paho resolves aliases and acknowledges on its own.

Must not: rely on sleeps except where silence is the assertion (`expect_none`, `drain`).
"""

from __future__ import annotations

import pytest

from broker.protocol.packets import (
    Disconnect,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscription,
)
from tests.e2e.broker_proc import BrokerProcess
from tests.e2e.clients import TestClient
from tests.e2e.conftest import BrokerFactory
from tests.e2e.rawclient import RawClient, connected, expect_disconnect

pytestmark = pytest.mark.timeout(30)


def _alias(n: int) -> Properties:
    return Properties(topic_alias=n)


# -- topic aliases, client -> broker --------------------------------------------------------


def test_inbound_topic_alias_set_and_reused(broker: BrokerProcess) -> None:
    """A PUBLISH with topic and alias sets the mapping; a PUBLISH with an empty topic and the
    alias uses it; a new topic for the same alias replaces it (spec 3.3.2.3.4). Aliases up to
    the CONNACK maximum are accepted [MQTT-3.3.2-12]."""
    with TestClient(broker, "alias-sub") as sub, RawClient(broker) as pub:
        sub.connect()
        sub.subscribe("ta/#", qos=1)
        ack = pub.connect("alias-pub")
        maximum = ack.properties.topic_alias_maximum or 0
        if maximum < 1:
            pytest.skip("broker announced no topic aliases")
        pub.publish("ta/1", b"a", qos=1, properties=_alias(1))
        pub.publish("", b"b", qos=1, properties=_alias(1))
        pub.publish("ta/2", b"c", qos=1, properties=_alias(1))
        pub.publish("", b"d", qos=0, properties=_alias(1))
        pub.publish("ta/max", b"e", qos=1, properties=_alias(maximum))
        pub.publish("", b"f", qos=1, properties=_alias(maximum))
        got = [(m.topic, m.payload) for m in sub.expect(6)]
        assert got == [
            ("ta/1", b"a"),
            ("ta/1", b"b"),
            ("ta/2", b"c"),
            ("ta/2", b"d"),
            ("ta/max", b"e"),
            ("ta/max", b"f"),
        ]


@pytest.mark.meshmq_only  # mosquitto 2.0.11 answers alias 0 with 0x81 (malformed) instead
def test_inbound_topic_alias_zero_is_invalid(broker: BrokerProcess) -> None:
    """Topic Alias 0 is not allowed [MQTT-3.3.2-8]: DISCONNECT 0x94 (Topic Alias invalid)."""
    with connected(broker, "alias0") as c:
        c.send(Publish("ta/x", b"x", properties=_alias(0)))
        expect_disconnect(c, {0x94})


def test_inbound_topic_alias_above_maximum_is_invalid(broker_factory: BrokerFactory) -> None:
    """A Topic Alias above the maximum the server announced in CONNACK [MQTT-3.3.2-9] gets
    DISCONNECT 0x94 (Topic Alias invalid)."""
    broker = broker_factory({"MQTT": {"MaxTopicAlias": 10}})
    with RawClient(broker) as c:
        ack = c.connect("alias-big")
        maximum = ack.properties.topic_alias_maximum or 0
        assert maximum < 65535
        c.send(Publish("ta/x", b"x", properties=_alias(maximum + 1)))
        expect_disconnect(c, {0x94})


@pytest.mark.parametrize("case", ["unknown-alias", "no-topic-no-alias"])
def test_inbound_empty_topic_without_mapping_is_protocol_error(broker: BrokerProcess, case: str) -> None:
    """An empty topic needs an alias that is mapped on this connection; otherwise it is a
    Protocol Error (spec 3.3.2.3.4). Without any alias, 0x90 Topic Name invalid is as right,
    since a topic name is at least one character long [MQTT-4.7.3-1]."""
    with connected(broker, "alias-unknown") as c:
        if case == "unknown-alias":
            c.send(Publish("", b"x", properties=_alias(1)))
            expect_disconnect(c, {0x82, 0x94})
        else:
            c.send(Publish("", b"x"))
            expect_disconnect(c, {0x82, 0x90})


def test_inbound_topic_alias_not_carried_to_next_connection(broker: BrokerProcess) -> None:
    """Alias mappings end with the network connection [MQTT-3.3.2-7]."""
    with connected(broker, "alias-carry") as c:
        c.publish("ta/carry", b"x", qos=1, properties=_alias(1))
        c.disconnect()
    with connected(broker, "alias-carry") as c2:
        c2.send(Publish("", b"y", properties=_alias(1)))
        expect_disconnect(c2, {0x82, 0x94})


# -- topic aliases, broker -> client ------------------------------------------------------


@pytest.mark.meshmq_only  # mosquitto 2.0.11 never assigns outbound topic aliases
def test_outbound_topic_aliases_within_client_maximum(broker: BrokerProcess) -> None:
    """With Topic Alias Maximum 2 in CONNECT the broker may use aliases 1..2 and no higher
    [MQTT-3.1.2-26] [MQTT-3.3.2-11]; a topic it sent with an alias is sent again with an empty
    topic and that alias. Every PUBLISH resolves to the topic that was published."""
    topics = ["oa/1", "oa/1", "oa/2", "oa/2", "oa/3", "oa/1", "oa/3", "oa/4", "oa/2", "oa/1"]
    with (
        connected(broker, "oa-sub", properties=Properties(topic_alias_maximum=2)) as sub,
        connected(broker, "oa-pub") as pub,
    ):
        sub.subscribe(Subscription("oa/#", 1))
        for i, t in enumerate(topics):
            pub.publish(t, str(i).encode(), qos=1)
        mapping: dict[int, str] = {}
        resolved: list[str] = []
        raw: list[Publish] = []
        for _ in topics:
            p = sub.expect(Publish)
            sub.ack(p)
            raw.append(p)
            alias = p.properties.topic_alias
            if alias is not None:
                assert 1 <= alias <= 2, f"alias {alias} above the client's maximum 2"
                if p.topic:
                    mapping[alias] = p.topic
                else:
                    assert alias in mapping, f"alias {alias} used before it was set"
            else:
                assert p.topic, "empty topic without alias"
            resolved.append(p.topic or mapping[alias])  # type: ignore[index]
        assert resolved == topics
        assert [p.payload for p in raw] == [str(i).encode() for i in range(len(topics))]
        first, second = raw[0], raw[1]
        assert first.topic == "oa/1" and first.properties.topic_alias is not None
        assert second.topic == "" and second.properties.topic_alias == first.properties.topic_alias


@pytest.mark.parametrize("announce", [None, 0])
def test_no_outbound_topic_alias_without_client_maximum(broker: BrokerProcess, announce: int | None) -> None:
    """A client that announced no Topic Alias Maximum (or 0) never gets an alias
    [MQTT-3.1.2-27]."""
    props = Properties(topic_alias_maximum=announce)
    with connected(broker, "na-sub", properties=props) as sub, connected(broker, "na-pub") as pub:
        sub.subscribe(Subscription("na/#", 0))
        for _ in range(3):
            pub.publish("na/t", b"x", qos=1)
        for _ in range(3):
            p = sub.expect(Publish)
            assert p.topic == "na/t" and p.properties.topic_alias is None


# -- receive maximum ------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [1, 2])
def test_broker_respects_client_receive_maximum(broker: BrokerProcess, qos: int) -> None:
    """The server never has more unacknowledged QoS 1/2 PUBLISHes to a client than the
    client's Receive Maximum [MQTT-3.3.4-9]: with 2 and no acknowledgements, exactly 2 come."""
    with (
        connected(broker, "rm-sub", properties=Properties(receive_maximum=2)) as sub,
        connected(broker, "rm-pub") as pub,
    ):
        sub.subscribe(Subscription("rm/t", qos))
        for i in range(5):
            pub.publish("rm/t", str(i).encode(), qos=qos)
        first = [p for p in sub.drain(0.6) if isinstance(p, Publish)]
        assert [p.payload for p in first] == [b"0", b"1"], "more in flight than Receive Maximum 2"


# mosquitto 2.0.11 sends two more after the first acknowledgement (3 in flight against a
# Receive Maximum of 2), a deviation from [MQTT-3.3.4-9].
@pytest.mark.meshmq_only
@pytest.mark.parametrize("qos", [1, 2])
def test_receive_maximum_released_by_acks(broker: BrokerProcess, qos: int) -> None:
    """Each completed flow frees one slot: acknowledgements release the queued messages one
    at a time and in order, never more than Receive Maximum in flight [MQTT-3.3.4-9]."""
    n = 6
    with (
        connected(broker, "rm-sub", properties=Properties(receive_maximum=2)) as sub,
        connected(broker, "rm-pub") as pub,
    ):
        sub.subscribe(Subscription("rm/t", qos))
        for i in range(n):
            pub.publish("rm/t", str(i).encode(), qos=qos)
        in_flight = [p for p in sub.drain(0.6) if isinstance(p, Publish)]
        payloads = [p.payload for p in in_flight]
        assert len(in_flight) == 2
        while in_flight:
            _complete(sub, in_flight.pop(0))
            fresh = [p for p in sub.drain(0.3) if isinstance(p, Publish)]
            assert len(in_flight) + len(fresh) <= 2, "more in flight than Receive Maximum 2"
            in_flight += fresh
            payloads += [p.payload for p in fresh]
        assert payloads == [str(i).encode() for i in range(n)]


def _complete(sub: RawClient, p: Publish) -> None:
    """Finish the QoS 1 or 2 flow of a received PUBLISH."""
    if p.qos == 1:
        sub.send(Puback(p.packet_id))
        return
    sub.send(Pubrec(p.packet_id))
    rel = sub.take(lambda q: isinstance(q, Pubrel) and q.packet_id == p.packet_id)
    assert isinstance(rel, Pubrel)
    sub.send(Pubcomp(p.packet_id))


# mosquitto 2.0.11 answers the extra PUBLISH with PUBREC 0x97 (quota exceeded) and keeps the
# connection, where the spec says DISCONNECT 0x93.
@pytest.mark.meshmq_only
def test_client_exceeding_broker_receive_maximum(broker_factory: BrokerFactory) -> None:
    """A client that sends more unacknowledged QoS 2 PUBLISHes than the server's Receive
    Maximum [MQTT-3.3.4-7] gets DISCONNECT 0x93 (spec 3.3.4); the limit is read from CONNACK
    (MQTT.MaxInflight)."""
    broker = broker_factory({"MQTT": {"MaxInflight": 3}})
    with RawClient(broker) as c:
        ack = c.connect("rm-over")
        limit = ack.properties.receive_maximum
        assert limit == 3
        for i in range(limit + 1):
            c.send(Publish("rm/over", b"x", qos=2, packet_id=i + 1))  # never PUBREL: all stay in flight
        got = c.wait_closed()
        recs = [p for p in got if isinstance(p, Pubrec)]
        disconnects = [p for p in got if isinstance(p, Disconnect)]
        assert len(recs) == limit
        assert [d.reason_code for d in disconnects] == [0x93]


# -- maximum packet size (the broker's own: test_limits.py) ------------------------------


def test_client_maximum_packet_size_respected(broker: BrokerProcess) -> None:
    """The server does not send a client a packet larger than the client's Maximum Packet
    Size; it drops that message for that client only [MQTT-3.1.2-25]."""
    small_max = Properties(maximum_packet_bytes=256)
    with (
        connected(broker, "mps-small", properties=small_max) as small,
        connected(broker, "mps-big") as big,
        connected(broker, "mps-pub") as pub,
    ):
        small.subscribe(Subscription("mps/#", 1))
        big.subscribe(Subscription("mps/#", 1))
        pub.publish("mps/t", b"L" * 1000, qos=1)
        pub.publish("mps/t", b"small", qos=1)
        pub.publish("mps/t", b"L" * 300, qos=0)
        pub.publish("mps/t", b"end", qos=0)
        got_small = [p for p in small.drain(0.8) if isinstance(p, Publish)]
        assert [p.payload for p in got_small] == [b"small", b"end"]
        got_big = [big.expect(Publish) for _ in range(4)]
        assert [len(p.payload) for p in got_big] == [1000, 5, 300, 3]
