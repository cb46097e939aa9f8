"""Retained messages against a real broker, MQTT 3.1.1 and 5.0.

Covers storing, replacing and clearing a retained message, the RETAIN flag on delivery to new
and to existing subscribers, wildcard subscriptions over many retained topics, '$' topics, and
v5 message expiry of retained messages.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.e2e.broker_proc import BrokerProcess
from tests.e2e.clients import ClientFactory, prop


@pytest.fixture(params=[4, 5], ids=["v311", "v5"])
def version(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def make(broker: BrokerProcess) -> Iterator[ClientFactory]:
    with ClientFactory(broker) as factory:
        yield factory


def test_retained_delivered_on_subscribe_with_retain_flag(make: ClientFactory, version: int) -> None:
    """[MQTT-3.3.1-5] the server stores a retained message; [MQTT-3.3.1-6] a new subscription
    receives it with RETAIN 1, at min(published, granted) QoS."""
    pub = make("pub", version=version)
    pub.publish("t/ret", b"state", qos=1, retain=True)
    pub.disconnect()  # retained messages outlive their publisher's connection
    sub = make("sub", version=version)
    sub.subscribe("t/ret", 2)
    m = sub.expect_one()
    assert (m.topic, m.payload, m.qos, m.retain) == ("t/ret", b"state", 1, True)
    low = make("low", version=version)
    low.subscribe("t/ret", 0)
    assert low.expect_one().qos == 0


def test_retained_message_is_replaced(make: ClientFactory, version: int) -> None:
    """[MQTT-3.3.1-5] A new retained message on a topic replaces the stored one."""
    pub = make("pub", version=version)
    pub.publish("t/rep", b"old", qos=1, retain=True)
    pub.publish("t/rep", b"new", qos=1, retain=True)
    pub.publish("t/rep", b"not retained", qos=1, retain=False)
    sub = make("sub", version=version)
    sub.subscribe("t/rep", 1)
    m = sub.expect_one()
    assert (m.payload, m.retain) == (b"new", True)
    sub.expect_none(0.3)


def test_empty_retained_payload_clears(make: ClientFactory, version: int) -> None:
    """[MQTT-3.3.1-10] A retained PUBLISH with an empty payload removes the retained message;
    [MQTT-3.3.1-11] (3.1.1) it is not stored itself, but current subscribers get it."""
    pub = make("pub", version=version)
    pub.publish("t/clr", b"soon gone", qos=1, retain=True)
    live = make("live", version=version)
    live.subscribe("t/clr", 1)
    assert live.expect_one().payload == b"soon gone"
    pub.publish("t/clr", b"", qos=1, retain=True)
    cleared = live.expect_one()
    assert cleared.payload == b""
    late = make("late", version=version)
    late.subscribe("t/clr", 1)
    late.expect_none(0.3)


def test_live_delivery_to_existing_subscriber(make: ClientFactory, version: int) -> None:
    """[MQTT-3.3.1-9] (3.1.1) / [MQTT-3.3.1-12] (5.0, Retain As Published 0): a retained message
    forwarded to an existing subscription carries RETAIN 0."""
    sub = make("sub", version=version)
    sub.subscribe("t/live", 1)
    make("pub", version=version).publish("t/live", b"now", qos=1, retain=True)
    m = sub.expect_one()
    assert (m.payload, m.retain) == (b"now", False)


def test_v5_retain_as_published(make: ClientFactory) -> None:
    """[MQTT-3.3.1-13] v5: with Retain As Published the forwarded message keeps RETAIN 1."""
    sub = make("sub", version=5)
    sub.subscribe("t/rap", 1, options={"retain_as_published": True})
    pub = make("pub", version=5)
    pub.publish("t/rap", b"kept flag", qos=1, retain=True)
    pub.publish("t/rap", b"plain", qos=1, retain=False)
    got = sub.expect(2)
    assert [(m.payload, m.retain) for m in got] == [(b"kept flag", True), (b"plain", False)]


def test_wildcard_subscription_gets_every_matching_retained(make: ClientFactory, version: int) -> None:
    """[MQTT-3.3.1-6] A wildcard subscription receives every matching retained message."""
    pub = make("pub", version=version)
    topics = ["t/wc/a", "t/wc/b", "t/wc/b/c", "t/wc"]
    for topic in topics:
        pub.publish(topic, topic.encode(), qos=1, retain=True)
    pub.publish("t/other", b"no", qos=1, retain=True)
    sub = make("sub", version=version)
    sub.subscribe("t/wc/#", 1)
    got = sub.expect(len(topics))
    assert sorted((m.topic, m.payload) for m in got) == sorted((t, t.encode()) for t in topics)
    assert all(m.retain for m in got)
    sub.expect_none(0.3)
    plus = make("plus", version=version)
    plus.subscribe("t/wc/+", 1)
    assert sorted(m.topic for m in plus.expect(2)) == ["t/wc/a", "t/wc/b"]
    plus.expect_none(0.3)


def test_dollar_topics_not_matched_by_leading_wildcards(make: ClientFactory, version: int) -> None:
    """[MQTT-4.7.2-1] Filters starting with '#' or '+' do not match topics starting with '$'.

    Checked with retained messages and live ones; '$meshtest/...' is matched by its own filter.
    """
    pub = make("pub", version=version)
    pub.publish("$meshtest/r", b"dollar", qos=1, retain=True)
    pub.publish("meshtest/r", b"plain", qos=1, retain=True)
    everything = make("all", version=version)
    everything.subscribe([("#", 1), ("+/r", 1)])
    seen = everything.expect_one()
    assert seen.topic == "meshtest/r"
    pub.publish("$meshtest/live", b"x", qos=1)
    own = make("own", version=version)
    own.subscribe("$meshtest/#", 1)
    assert own.expect_one().payload == b"dollar"
    drained = everything.drain()
    assert all(not m.topic.startswith("$") for m in drained), [m.topic for m in drained]


def test_v5_retained_message_expires(make: ClientFactory) -> None:
    """[MQTT-3.3.2-5] v5: once its Message Expiry Interval has passed a retained message is no
    longer delivered; before that, it is delivered with the remaining interval
    [MQTT-3.3.2-6]."""
    pub = make("pub", version=5)
    pub.publish("t/exp/short", b"brief", qos=1, retain=True, properties={"MessageExpiryInterval": 2})
    published_at = time.monotonic()
    pub.publish("t/exp/long", b"lasting", qos=1, retain=True)
    early = make("early", version=5)
    early.subscribe("t/exp/#", 1)
    got = {m.topic: m for m in early.expect(2)}
    assert got["t/exp/short"].payload == b"brief"
    assert prop(got["t/exp/short"], "MessageExpiryInterval") in (1, 2)
    assert prop(got["t/exp/long"], "MessageExpiryInterval") is None
    # Poll with fresh subscriptions until the short one is gone: the observable event.
    deadline = published_at + 4.5
    while True:
        assert time.monotonic() < deadline, "retained message did not expire"
        probe = make("", version=5)
        probe.subscribe("t/exp/#", 1)
        first = probe.expect_one()
        topics = sorted([first.topic, *(m.topic for m in probe.drain(0.2))])
        probe.disconnect()
        if topics == ["t/exp/long"]:
            break
        assert topics == ["t/exp/long", "t/exp/short"]
        time.sleep(0.2)
    # >= 1 s rather than 2 s: a server may keep time in whole seconds (mosquitto does).
    assert time.monotonic() - published_at >= 1.0, "expired well before its interval"
