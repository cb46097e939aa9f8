"""Limits against abuse (broker/limits.py; the table of broker/ACCESS.md, "Limits against abuse").

The pure parts with a given `now` (token bucket, connection rate per address, log throttle,
topic limits), then the core driven by packets with a fake clock: every refusal with its reason
code in 5.0 and 3.1.1, what is (not) delivered, the counters, the log, and that other clients
are unharmed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.config import LimitsConfig, MqttConfig
from broker.core import BrokerCore
from broker.limits import (
    ConnectRate,
    LogThrottle,
    TokenBucket,
    WorkerLimits,
    source_address,
    topic_over_limits,
)
from broker.protocol.packets import (
    Connack,
    Properties,
    ProtocolVersion,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsubscribe,
    Will,
)
from broker.protocol.reasons import Reason
from tests.unit.core_harness import Harness, HarnessClient

V5 = ProtocolVersion.V5
V311 = ProtocolVersion.V311

# -- token bucket ----------------------------------------------------------------------------------


def test_bucket_gives_its_burst_then_one_token_per_interval() -> None:
    bucket = TokenBucket(4, 4)
    assert [bucket.take(10.0) for _ in range(5)] == [True] * 4 + [False]
    assert not bucket.take(10.2)  # 0.8 of a token
    assert bucket.take(10.25)  # one token after 1/rate
    assert not bucket.take(10.25)
    assert bucket.take(10.5)


def test_bucket_saves_at_most_its_burst() -> None:
    bucket = TokenBucket(2, 3)
    assert bucket.take(0.0)
    assert [bucket.take(1000.0) for _ in range(4)] == [True] * 3 + [False]


def test_bucket_refills_nothing_when_the_clock_steps_back() -> None:
    bucket = TokenBucket(1, 1)
    assert bucket.take(100.0)
    assert not bucket.take(50.0)
    assert not bucket.take(100.5)
    assert bucket.take(101.0)


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, 0)


@given(
    rate=st.integers(1, 50),
    steps=st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=200),
)
def test_bucket_never_gives_more_than_burst_plus_rate_times_time(rate: int, steps: list[float]) -> None:
    bucket = TokenBucket(rate, rate)
    now = start = 1000.0
    taken = 0
    for step in steps:
        now += step
        taken += bucket.take(now)
        assert taken <= rate + rate * (now - start) + 1e-6
    # and a client that waits long enough always gets a token again
    assert bucket.take(now + 1.0 / rate)


# -- connection rate ---------------------------------------------------------------------------------


def test_connect_rate_counts_per_address_per_second() -> None:
    rate = ConnectRate(2)
    assert [rate.allow("10.0.0.1", 5.0) for _ in range(3)] == [True, True, False]
    assert rate.allow("10.0.0.2", 5.1)  # another address has its own window
    assert not rate.allow("10.0.0.1", 5.99)  # refused attempts count too
    assert rate.allow("10.0.0.1", 6.0)  # a new window
    assert rate.allow("10.0.0.1", 6.5)
    assert not rate.allow("10.0.0.1", 6.9)


def test_connect_rate_drops_expired_windows_and_stays_bounded() -> None:
    rate = ConnectRate(1, max_addresses=3)
    for i in range(3):
        assert rate.allow(f"a{i}", 0.0)
    assert rate.allow("b", 2.0)  # the three old windows ended: dropped
    assert list(rate.windows) == ["b"]
    for i in range(10):
        assert rate.allow(f"c{i}", 2.5)
        assert len(rate) <= 3
    assert list(rate.windows) == ["c7", "c8", "c9"]  # the oldest live ones forgotten first
    assert not rate.allow("c9", 2.6)


@given(st.lists(st.tuples(st.integers(0, 30), st.floats(0, 0.3, allow_nan=False)), max_size=300))
def test_connect_rate_is_bounded_and_never_exceeds_its_limit(events: list[tuple[int, float]]) -> None:
    rate = ConnectRate(2, max_addresses=8)
    now = 0.0
    allowed: dict[int, list[float]] = {}
    for address, step in events:
        now += step
        if rate.allow(str(address), now):
            allowed.setdefault(address, []).append(now)
        assert len(rate) <= 8
    # An address that was never forgotten: windows are fixed (each opens at the first connection
    # after the previous one ended) and hold at most 2; a sliding second that straddles two
    # windows can therefore see at most 2 x 2.
    if len({a for a, _ in events}) <= 8:
        for times in allowed.values():
            start = None
            in_window = 0
            for t in times:
                if start is None or t - start >= 1.0:
                    start, in_window = t, 0
                in_window += 1
                assert in_window <= 2
            for i, t in enumerate(times):
                assert sum(1 for u in times[i:] if u - t < 1.0) <= 4


def test_source_address_of_peer_texts() -> None:
    assert source_address("127.0.0.1:5000") == "127.0.0.1"
    assert source_address("[::1]:5000") == "::1"
    assert source_address("::1:5000") == "::1"  # as asyncio's peername renders IPv6
    assert source_address("/run/meshmq.sock") == "/run/meshmq.sock"


# -- log throttle, topic limits ------------------------------------------------------------------------


def test_log_throttle_once_per_interval_per_key_and_bounded() -> None:
    throttle = LogThrottle(interval_s=60.0, max_keys=2)
    assert throttle.due(("c", "publish_rate"), 0.0)
    assert not throttle.due(("c", "publish_rate"), 59.0)
    assert throttle.due(("c", "subscribe_rate"), 59.0)
    assert throttle.due(("c", "publish_rate"), 60.0)
    assert throttle.due(("d", "publish_rate"), 61.0)
    assert len(throttle.last) <= 2


def test_topic_over_limits() -> None:
    assert topic_over_limits("a/b/c", 3, 5) is None
    assert topic_over_limits("a/b/c/d", 3, 0) == "topic_levels"
    assert topic_over_limits("/", 1, 0) == "topic_levels"  # two (empty) levels
    assert topic_over_limits("abcdef", 0, 5) == "topic_length"
    assert topic_over_limits("ééé", 0, 5) == "topic_length"  # 6 bytes in UTF-8
    assert topic_over_limits("éé", 0, 4) is None
    assert topic_over_limits("a/" * 1000, 0, 0) is None  # 0 = no limit
    assert topic_over_limits("a/b/c/d", 2, 3) == "topic_levels"  # levels are checked first


@given(st.text(max_size=40), st.integers(0, 10), st.integers(0, 60))
def test_topic_over_limits_matches_its_definition(topic: str, levels: int, length: int) -> None:
    want = None
    if levels and len(topic.split("/")) > levels:
        want = "topic_levels"
    elif length and len(topic.encode()) > length:
        want = "topic_length"
    assert topic_over_limits(topic, levels, length) == want


def test_worker_limits_need_no_state_without_limits() -> None:
    assert not WorkerLimits(LimitsConfig()).active
    assert WorkerLimits(LimitsConfig()).open("1.2.3.4:5", 0.0) is None
    only_rate = WorkerLimits(LimitsConfig(max_connect_rate=1))
    assert only_rate.active and not only_rate.per_client
    assert only_rate.open("1.2.3.4:5", 0.0) is None  # within the rate: nothing to remember
    refused = only_rate.open("1.2.3.4:6", 0.1)
    assert refused is not None and refused.connect_refused


# -- the core ------------------------------------------------------------------------------------------


def limited(**limits: Any) -> Harness:
    """A core harness whose core has these Limits."""
    h = Harness()
    ids = iter(range(1, 1_000_000))
    h.core = BrokerCore(
        MqttConfig(), limits=LimitsConfig(**limits), new_client_id=lambda: f"auto-{next(ids)}"
    )
    return h


def client_from(h: Harness, peer: str, version: ProtocolVersion = V5) -> HarnessClient:
    """A harness client whose connection comes from `peer` (the harness's own is "test:1")."""
    core = h.core
    real: Callable[..., Any] = core.open_connection
    core.open_connection = lambda _peer, link, now: real(peer, link, now)  # type: ignore[method-assign, assignment]
    try:
        return h.client(version)
    finally:
        del core.open_connection


def connected(h: Harness, client_id: str, version: ProtocolVersion = V5, **kw: Any) -> HarnessClient:
    c = h.client(version)
    ack = c.connect(client_id, **kw)
    assert isinstance(ack, Connack) and ack.reason_code == 0
    return c


def subscribe(c: HarnessClient, *subs: Subscription | str, pid: int = 1) -> tuple[int, ...]:
    items = tuple(Subscription(s) if isinstance(s, str) else s for s in subs)
    c.send(Subscribe(pid, items))
    packets = c.received()
    assert isinstance(packets[0], Suback), packets
    return packets[0].reason_codes


def test_no_limits_no_state() -> None:
    h = Harness()
    c = connected(h, "c")
    assert c.conn.limits is None


def test_publish_rate_v5_refuses_qos1_and_qos2_with_0x97_and_does_not_deliver() -> None:
    h = limited(max_publish_rate=2)
    sub = connected(h, "sub")
    assert subscribe(sub, Subscription("t/#", 2)) == (2,)
    pub = connected(h, "pub")
    pub.send(Publish("t/1", b"1", qos=1, packet_id=1), Publish("t/2", b"2", qos=1, packet_id=2))
    pub.send(Publish("t/3", b"3", qos=1, packet_id=3), Publish("t/4", b"4", qos=2, packet_id=4))
    pub.send(Publish("t/5", b"5", qos=0))
    acks = pub.received()
    assert acks == [
        Puback(1),
        Puback(2),
        Puback(3, Reason.QUOTA_EXCEEDED),
        Pubrec(4, Reason.QUOTA_EXCEEDED),
    ]
    # a refused PUBREC ends the QoS 2 flow: the id is not kept [MQTT-4.3.3]
    assert 4 not in h.core.sessions["pub"].inbound_qos2
    pub.send(Pubrel(4))
    assert pub.received() == [Pubcomp(4, Reason.PACKET_IDENTIFIER_NOT_FOUND)]
    got = sub.received()
    assert [p.payload for p in got if isinstance(p, Publish)] == [b"1", b"2"]
    assert h.core.counters.limit_publish_rate == 3
    # the bucket refills at the rate: one token after 1/2 s
    h.clock.advance(0.5)
    pub.send(Publish("t/6", b"6", qos=1, packet_id=6))
    assert pub.received() == [Puback(6)]
    assert [p.payload for p in sub.received() if isinstance(p, Publish)] == [b"6"]


def test_publish_rate_v311_acknowledges_as_usual_and_drops() -> None:
    """[MQTT-3.3.5-2] 3.1.1 cannot refuse: positive ack, no delivery."""
    h = limited(max_publish_rate=1)
    sub = connected(h, "sub")
    subscribe(sub, Subscription("t/#", 2))
    pub = connected(h, "pub", V311)
    pub.send(Publish("t/1", b"1", qos=1, packet_id=1), Publish("t/2", b"2", qos=1, packet_id=2))
    pub.send(Publish("t/3", b"3", qos=2, packet_id=3), Publish("t/4", b"4", qos=0))
    assert pub.received() == [Puback(1), Puback(2), Pubrec(3)]
    pub.send(Pubrel(3))
    assert pub.received() == [Pubcomp(3)]
    assert [p.payload for p in sub.received() if isinstance(p, Publish)] == [b"1"]
    assert h.core.counters.limit_publish_rate == 3
    assert not pub.link.closed


def test_publish_rate_is_per_client() -> None:
    h = limited(max_publish_rate=1)
    a, b = connected(h, "a"), connected(h, "b")
    a.send(Publish("x", b"", qos=1, packet_id=1), Publish("x", b"", qos=1, packet_id=2))
    b.send(Publish("x", b"", qos=1, packet_id=1))
    assert a.received() == [Puback(1, Reason.NO_MATCHING_SUBSCRIBERS), Puback(2, Reason.QUOTA_EXCEEDED)]
    assert b.received() == [Puback(1, Reason.NO_MATCHING_SUBSCRIBERS)]


def test_publish_topic_limits_v5_and_v311_not_routed_nor_retained() -> None:
    h = limited(max_topic_levels=2, max_topic_length=10)
    sub = connected(h, "sub")
    subscribe(sub, Subscription("#", 1))
    pub = connected(h, "pub")
    pub.send(Publish("a/b/c", b"deep", qos=1, packet_id=1, retain=True))
    pub.send(Publish("abcdefghijk", b"long", qos=2, packet_id=2))
    pub.send(Publish("a/b/c", b"deep0", qos=0))
    pub.send(Publish("a/b", b"ok", qos=1, packet_id=3))
    assert pub.received() == [
        Puback(1, Reason.TOPIC_NAME_INVALID),
        Pubrec(2, Reason.TOPIC_NAME_INVALID),
        Puback(3),
    ]
    assert [p.payload for p in sub.received() if isinstance(p, Publish)] == [b"ok"]
    assert len(h.core.retained) == 0
    old = connected(h, "old", V311)
    old.send(Publish("a/b/c", b"deep", qos=1, packet_id=1))
    assert old.received() == [Puback(1)]
    assert sub.received() == []
    counters = h.core.counters
    assert (counters.limit_topic_levels, counters.limit_topic_length) == (3, 1)


def test_topic_limits_apply_to_the_topic_an_alias_stands_for() -> None:
    h = limited(max_topic_levels=2)
    h.core.config = MqttConfig(max_topic_alias=5)
    pub = connected(h, "pub")
    pub.send(Publish("a/b/c", b"", qos=1, packet_id=1, properties=Properties(topic_alias=1)))
    pub.send(Publish("", b"", qos=1, packet_id=2, properties=Properties(topic_alias=1)))
    assert pub.received() == [Puback(1, Reason.TOPIC_NAME_INVALID), Puback(2, Reason.TOPIC_NAME_INVALID)]


def test_subscribe_rate_refuses_every_filter_of_the_packet() -> None:
    h = limited(max_subscribe_rate=1)
    c = connected(h, "c")
    assert subscribe(c, "a", pid=1) == (0,)
    assert subscribe(c, "b", "c", pid=2) == (Reason.QUOTA_EXCEEDED, Reason.QUOTA_EXCEEDED)
    assert set(h.core.sessions["c"].subscriptions) == {"a"}
    old = connected(h, "old", V311)
    assert subscribe(old, "a", pid=1) == (0,)
    assert subscribe(old, "b", "c", pid=2) == (0x80, 0x80)
    assert h.core.counters.limit_subscribe_rate == 2
    h.clock.advance(1.0)
    assert subscribe(c, "b", pid=3) == (0,)


def test_max_subscriptions_per_session_replacing_is_not_new() -> None:
    h = limited(max_subscriptions=2)
    c = connected(h, "c")
    assert subscribe(c, "a", Subscription("$share/g/b", 1), pid=1) == (0, 1)
    assert subscribe(c, Subscription("a", 1), "c", pid=2) == (1, Reason.QUOTA_EXCEEDED)
    assert h.core.sessions["c"].subscriptions["a"].qos == 1
    assert set(h.core.sessions["c"].subscriptions) == {"a", "$share/g/b"}
    old = connected(h, "old", V311)
    assert subscribe(old, "a", "b", "c", pid=1) == (0, 0, 0x80)
    assert h.core.counters.limit_subscriptions == 2
    # an unsubscribed filter frees its place
    c.send(Unsubscribe(3, ("a",)))
    c.received()
    assert subscribe(c, "c", pid=4) == (0,)


def test_filter_topic_limits_and_shared_filters_are_checked_without_their_prefix() -> None:
    h = limited(max_topic_levels=2, max_topic_length=6)
    c = connected(h, "c")
    assert subscribe(c, "a/b/#", "a/+", "$share/group/a/b", "abcdefg", pid=1) == (
        Reason.TOPIC_FILTER_INVALID,
        0,
        0,
        Reason.TOPIC_FILTER_INVALID,
    )
    old = connected(h, "old", V311)
    assert subscribe(old, "a/b/c", "x", pid=1) == (0x80, 0)
    assert (h.core.counters.limit_topic_levels, h.core.counters.limit_topic_length) == (2, 1)


def test_connect_rate_per_source_address_v5_and_v311() -> None:
    h = limited(max_connect_rate=2)
    a1, a2 = client_from(h, "10.0.0.1:1001"), client_from(h, "10.0.0.1:1002")
    refused = client_from(h, "10.0.0.1:1003")
    refused_old = client_from(h, "10.0.0.1:1004", V311)
    other = client_from(h, "[fd00::2]:1001")
    for i, c in enumerate((a1, a2, other)):
        ack = c.connect(f"ok{i}")
        assert isinstance(ack, Connack) and ack.reason_code == 0
    ack = refused.connect("r5")
    assert isinstance(ack, Connack) and ack.reason_code == Reason.CONNECTION_RATE_EXCEEDED
    assert refused.link.closed
    ack = refused_old.connect("r3")
    assert isinstance(ack, Connack) and ack.reason_code == 3  # Server unavailable
    assert refused_old.link.closed
    assert "r5" not in h.core.sessions and "r3" not in h.core.sessions
    assert h.core.counters.limit_connect_rate == 2
    assert h.core.counters.connections_refused == 2
    # the next second, the address may connect again
    h.clock.advance(1.0)
    later = client_from(h, "10.0.0.1:1005")
    ack = later.connect("later")
    assert isinstance(ack, Connack) and ack.reason_code == 0
    # the connected clients were not harmed
    a1.send(Publish("t", b"", qos=1, packet_id=1))
    assert a1.received() == [Puback(1, Reason.NO_MATCHING_SUBSCRIBERS)]


def test_will_topic_over_the_topic_limits_refuses_the_connect() -> None:
    h = limited(max_topic_levels=2)
    c = h.client()
    ack = c.connect("w5", will=Will("a/b/c", b"bye"))
    assert isinstance(ack, Connack) and ack.reason_code == Reason.TOPIC_NAME_INVALID
    assert c.link.closed
    old = h.client(V311)
    ack = old.connect("w3", will=Will("a/b/c", b"bye"))
    assert isinstance(ack, Connack) and ack.reason_code == 3  # 0x02 would mislead (ACCESS.md)
    ok = h.client()
    ack = ok.connect("w", will=Will("a/b", b"bye"))
    assert isinstance(ack, Connack) and ack.reason_code == 0
    assert h.core.counters.limit_topic_levels == 2


def test_refusals_are_logged_once_per_client_and_limit_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="broker.limits")
    h = limited(max_publish_rate=1, max_topic_levels=1)
    c = connected(h, "flood")
    for pid in range(1, 6):
        c.send(Publish("t", b"", qos=1, packet_id=pid))
    c.send(Publish("t/u", b"", qos=0))
    h.clock.advance(1.0)
    c.send(Publish("t/u", b"", qos=0))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert (
        "'flood'" in lines[0] and "test:1" in lines[0] and "MaxPublishRate" in lines[0] and "1/s" in lines[0]
    )
    assert "MaxTopicLevels" in lines[1]
    assert h.core.counters.limit_publish_rate == 5
    h.clock.advance(60.0)
    for pid in range(10, 13):
        c.send(Publish("t", b"", qos=1, packet_id=pid))
    assert len(caplog.records) == 3
