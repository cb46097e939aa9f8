"""MQTT 5 message properties and subscription options, end to end.

Why: properties are where a broker most easily loses information (a re-encoded PUBLISH that
drops a user property, reorders them, or forgets to decrement the message expiry). These tests
publish with one client and look at the exact PUBLISH another client gets, through the raw
client (`tests.e2e.rawclient`) where the wire form matters and paho where interop does.

Must not: depend on timing beyond the message-expiry waits (1-2 s, the property's unit is the
second); each test starts its own broker.
"""

from __future__ import annotations

import time

import pytest

from broker.protocol.packets import (
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    Subscription,
    Unsuback,
)
from tests.e2e.broker_proc import BrokerProcess
from tests.e2e.clients import TestClient, prop
from tests.e2e.rawclient import RawClient, connected, expect_disconnect

pytestmark = pytest.mark.timeout(30)

ALL_PROPS = Properties(
    payload_format_indicator=1,
    content_type="application/json; charset=utf-8",
    response_topic="reply/to/me",
    correlation_data=b"\x00\x01corr\xff",
    # order and duplicates must survive [MQTT-3.3.2-17] [MQTT-3.3.2-18]
    user_properties=(("k", "1"), ("z", "2"), ("k", "1"), ("a", "3"), ("k", "0")),
)


def _publishes(c: RawClient, n: int, timeout_s: float = 5.0) -> list[Publish]:
    return [c.expect(Publish, timeout_s) for _ in range(n)]


# -- forwarded properties -------------------------------------------------------------------


def test_properties_forwarded_unchanged(broker: BrokerProcess) -> None:
    """Payload format, content type, response topic, correlation data and user properties reach
    the subscriber unchanged; user properties in order with duplicates [MQTT-3.3.2-17]
    [MQTT-3.3.2-18] (and the content type / response topic as sent [MQTT-3.3.2-20])."""
    with connected(broker, "props-sub") as sub, connected(broker, "props-pub") as pub:
        sub.subscribe(Subscription("props/#", 1))
        pub.publish("props/a", b'{"x": 1}', qos=1, properties=ALL_PROPS)
        pub.publish("props/b", b'{"x": 2}', qos=0, properties=ALL_PROPS)
        got = _publishes(sub, 2)
        for m in got:
            assert m.properties.payload_format_indicator == 1
            assert m.properties.content_type == ALL_PROPS.content_type
            assert m.properties.response_topic == ALL_PROPS.response_topic
            assert m.properties.correlation_data == ALL_PROPS.correlation_data
            assert m.properties.user_properties == ALL_PROPS.user_properties
            assert m.properties.topic_alias is None  # the subscriber announced no alias maximum
        assert [m.payload for m in got] == [b'{"x": 1}', b'{"x": 2}']


def test_properties_forwarded_to_paho(broker: BrokerProcess) -> None:
    """The same properties as seen by paho-mqtt (interop of the broker's encoding)."""
    with TestClient(broker, "paho-sub") as sub, connected(broker, "raw-pub") as pub:
        sub.connect()
        sub.subscribe("props/#", qos=1)
        pub.publish("props/p", b"payload", qos=1, properties=ALL_PROPS)
        m = sub.expect_one()
        assert prop(m, "PayloadFormatIndicator") == 1
        assert prop(m, "ContentType") == ALL_PROPS.content_type
        assert prop(m, "ResponseTopic") == ALL_PROPS.response_topic
        assert prop(m, "CorrelationData") == ALL_PROPS.correlation_data
        assert [tuple(p) for p in prop(m, "UserProperty")] == list(ALL_PROPS.user_properties)


def test_message_expiry_decremented_and_expired_dropped(broker: BrokerProcess) -> None:
    """A queued message is delivered with its expiry reduced by the time it waited
    [MQTT-3.3.2-6]; one whose expiry passed while queued is not delivered [MQTT-3.3.2-5]."""
    session = Properties(session_expiry_interval_s=60)
    sub = connected(broker, "exp-sub", properties=session)
    sub.subscribe(Subscription("exp/#", 1))
    sub.disconnect()
    with connected(broker, "exp-pub") as pub:
        pub.publish("exp/short", b"gone", qos=1, properties=Properties(message_expiry_interval_s=1))
        pub.publish("exp/long", b"kept", qos=1, properties=Properties(message_expiry_interval_s=10))
        pub.publish("exp/none", b"forever", qos=1)
    time.sleep(2.2)  # the expiry interval is in seconds: waiting is the point of the test
    with RawClient(broker) as sub2:
        ack = sub2.connect("exp-sub", clean_start=False, properties=session)
        assert ack.session_present
        got = sub2.drain(1.0)
        pubs = [p for p in got if isinstance(p, Publish)]
        assert [p.payload for p in pubs] == [b"kept", b"forever"]
        remaining = pubs[0].properties.message_expiry_interval_s
        assert remaining is not None and 1 <= remaining <= 8, remaining
        assert pubs[1].properties.message_expiry_interval_s is None
        for p in pubs:
            sub2.ack(p)


def test_request_response_round_trip(broker: BrokerProcess) -> None:
    """A responder answers on the request's response topic with its correlation data; the
    requester matches the answer to its request (spec 4.10)."""
    with TestClient(broker, "requester") as req, TestClient(broker, "responder") as resp:
        req.connect()
        resp.connect()
        req.subscribe("rr/responses/requester", qos=1)
        resp.subscribe("rr/requests", qos=1)
        for i in range(3):
            req.publish(
                "rr/requests",
                f"q{i}",
                qos=1,
                properties={"ResponseTopic": "rr/responses/requester", "CorrelationData": f"id-{i}".encode()},
            )
        for _ in range(3):
            q = resp.expect_one()
            resp.publish(
                prop(q, "ResponseTopic"),
                b"answer-" + q.payload,
                qos=1,
                properties={"CorrelationData": prop(q, "CorrelationData")},
            )
        answers = req.expect(3)
        assert [(a.payload, prop(a, "CorrelationData")) for a in answers] == [
            (f"answer-q{i}".encode(), f"id-{i}".encode()) for i in range(3)
        ]


def test_request_problem_information_0_no_reason_strings(broker: BrokerProcess) -> None:
    """With Request Problem Information 0 the server sends no Reason String or User Property
    on anything but PUBLISH, CONNACK and DISCONNECT [MQTT-3.1.2-29]; provoke acks that
    commonly carry one (no subscribers, no such subscription, unknown packet id)."""
    with connected(broker, "rpi0", properties=Properties(request_problem_information=0)) as c:
        acks: list[object] = [c.publish("rpi/nobody", b"x", qos=1), c.publish("rpi/nobody", b"x", qos=2)]
        acks.append(c.unsubscribe("rpi/never/subscribed"))
        c.send(Pubrel(4242))  # no such QoS 2 flow: PUBCOMP 0x92 in v5
        acks.append(c.expect(Pubcomp))
        for ack in acks:
            assert isinstance(ack, Puback | Pubrec | Pubcomp | Unsuback), ack
            assert ack.properties.reason_string is None, ack
            assert ack.properties.user_properties == (), ack


# -- subscription identifiers ------------------------------------------------------------


def test_subscription_identifier_delivered(broker: BrokerProcess) -> None:
    """The subscription identifier comes with each matching message [MQTT-3.3.4-3]; a
    subscription without one gets none."""
    with connected(broker, "sid") as c:
        c.subscribe(Subscription("sid/a", 1), properties=Properties(subscription_identifiers=(7,)))
        c.subscribe(Subscription("sid/b", 1))
        c.publish("sid/a", b"1")
        c.publish("sid/b", b"2")
        a, b = _publishes(c, 2)
        assert (a.topic, a.properties.subscription_identifiers) == ("sid/a", (7,))
        assert (b.topic, b.properties.subscription_identifiers) == ("sid/b", ())


def test_subscription_identifiers_overlapping(broker: BrokerProcess) -> None:
    """Overlapping subscriptions: one copy carrying every matching identifier [MQTT-3.3.4-3],
    or one copy per subscription each with its own [MQTT-3.3.4-5]."""
    with connected(broker, "sid-over") as c:
        c.subscribe(Subscription("ov/#", 1), properties=Properties(subscription_identifiers=(1,)))
        c.subscribe(Subscription("ov/+", 1), properties=Properties(subscription_identifiers=(268435455,)))
        c.subscribe(Subscription("ov/x", 1))  # no identifier
        c.publish("ov/x", b"m")
        got = [p for p in c.drain(0.7) if isinstance(p, Publish)]
        assert got and all(p.payload == b"m" for p in got)
        ids = sorted(i for p in got for i in p.properties.subscription_identifiers)
        assert ids == [1, 268435455]
        if len(got) == 1:
            assert sorted(got[0].properties.subscription_identifiers) == [1, 268435455]


def test_subscription_identifier_replaced_by_resubscribe(broker: BrokerProcess) -> None:
    """A new SUBSCRIBE to the same filter replaces the subscription and its identifier
    [MQTT-3.8.4-3]; a resubscribe without an identifier removes it."""
    with connected(broker, "sid-re") as c:
        c.subscribe(Subscription("re/t", 1), properties=Properties(subscription_identifiers=(3,)))
        c.subscribe(Subscription("re/t", 1), properties=Properties(subscription_identifiers=(4,)))
        c.publish("re/t", b"1")
        assert c.expect(Publish).properties.subscription_identifiers == (4,)
        c.subscribe(Subscription("re/t", 1))
        c.publish("re/t", b"2")
        assert c.expect(Publish).properties.subscription_identifiers == ()
        c.expect_none(0.3)


# -- subscription options ------------------------------------------------------------------


def test_no_local(broker: BrokerProcess) -> None:
    """No Local: the server does not send a client its own messages on that subscription
    [MQTT-3.8.3-3]; other clients' messages still come, and without No Local one's own do."""
    with connected(broker, "nl") as c, connected(broker, "nl-other") as other:
        c.subscribe(Subscription("nl/on", 1, no_local=True), Subscription("nl/off", 1))
        c.publish("nl/on", b"mine", qos=1)
        other.publish("nl/on", b"theirs", qos=1)
        c.publish("nl/off", b"mine-off", qos=1)
        got = [p for p in c.drain(0.7) if isinstance(p, Publish)]
        assert sorted((p.topic, p.payload) for p in got) == [("nl/off", b"mine-off"), ("nl/on", b"theirs")]


@pytest.mark.meshmq_only  # mosquitto 2.0.11 grants it (SUBACK 0x00) instead
def test_no_local_on_shared_subscription_is_protocol_error(broker: BrokerProcess) -> None:
    """No Local on a shared subscription is a Protocol Error [MQTT-3.8.3-4]."""
    with connected(broker, "nl-shared") as c:
        c.send(Subscribe(c.packet_id(), (Subscription("$share/g/nl/t", 0, no_local=True),)))
        expect_disconnect(c, {0x82})


def test_retain_as_published(broker: BrokerProcess) -> None:
    """Retain As Published 1 keeps the RETAIN flag on forwarded messages; 0 clears it
    [MQTT-3.3.1-12] [MQTT-3.3.1-13]."""
    with (
        connected(broker, "rap1") as rap,
        connected(broker, "rap0") as plain,
        connected(broker, "rap-pub") as pub,
    ):
        rap.subscribe(Subscription("rap/t", 1, retain_as_published=True))
        plain.subscribe(Subscription("rap/t", 1))
        pub.publish("rap/t", b"r", qos=1, retain=True)
        pub.publish("rap/t", b"n", qos=1, retain=False)
        assert [(p.payload, p.retain) for p in _publishes(rap, 2)] == [(b"r", True), (b"n", False)]
        assert [(p.payload, p.retain) for p in _publishes(plain, 2)] == [(b"r", False), (b"n", False)]
        pub.publish("rap/t", b"", qos=1, retain=True)  # clean up the retained message


@pytest.mark.parametrize(
    ("handling", "first", "again"), [(0, True, True), (1, True, False), (2, False, False)]
)
def test_retain_handling(broker: BrokerProcess, handling: int, first: bool, again: bool) -> None:
    """Retain Handling 0 sends retained messages on every subscribe [MQTT-3.3.1-9], 1 only
    when the subscription did not exist [MQTT-3.3.1-10], 2 never [MQTT-3.3.1-11]."""
    with connected(broker, "rh-pub") as pub:
        pub.publish("rh/t", b"retained", qos=1, retain=True)
    with connected(broker, f"rh-{handling}") as c:
        for expected in (first, again):
            c.subscribe(Subscription("rh/+", 1, retain_handling=handling))
            if expected:
                m = c.expect(Publish)
                assert (m.topic, m.payload, m.retain) == ("rh/t", b"retained", True)
                c.ack(m)
            else:
                c.expect_none(0.4)
