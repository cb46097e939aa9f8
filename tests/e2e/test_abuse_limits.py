"""The `Limits` section against a real `meshmq` (broker/ACCESS.md, "Limits against abuse").

Why: the core tests (tests/unit/test_limits.py) drive the checks with a fake clock; here one real
broker with every limit set low is flooded by real clients (paho 5.0 and 3.1.1, and RawClient
where the exact reason code on the wire matters) and must refuse with the codes of the table,
not deliver what it refused, keep serving, and count each refusal in `/metrics`.

Each test connects from a source address of its own in 127.0.0.0/8 (the connection rate counts
per address), except the connection rate test, which uses 127.0.0.1 and then 127.0.0.2.

Must not: send traffic anywhere but the broker on loopback; sleep-and-hope. The only waits are
facts of the limits: a token bucket refills at its rate (1/rate seconds per token) and a
connection-rate window lasts one second; both are computed from the configuration.
"""

from __future__ import annotations

import functools
import socket
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from broker.protocol.codec import Decoder
from broker.protocol.packets import (
    ProtocolVersion,
    Puback,
    Publish,
    Pubrec,
    Suback,
    Subscribe,
    Subscription,
    Will,
)
from tests.e2e.broker_proc import BrokerProcess, free_port
from tests.e2e.clients import TestClient
from tests.e2e.rawclient import BrokerAddress, RawClient
from tests.e2e.test_http_single_node import http_call as _http_call
from tests.e2e.test_http_single_node import metric_sum, parse_prometheus, wait_for

pytestmark = [pytest.mark.meshmq_only, pytest.mark.timeout(60)]

PUBLISH_RATE = 5
SUBSCRIBE_RATE = 2
SUBSCRIPTIONS = 3
TOPIC_LEVELS = 3
TOPIC_BYTES = 32
CONNECT_RATE = 3
CONNECT_WINDOW_S = 1.0  # broker/limits.py CONNECT_WINDOW_S
REPORT_TIMEOUT_S = 5.0  # workers report their counters every second
QUOTA_EXCEEDED = 0x97
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
CONNECTION_RATE_EXCEEDED = 0x9F
V311_FAILURE = 0x80
V311_SERVER_UNAVAILABLE = 3


class LimitedBroker(BrokerProcess):
    http_port: int = 0
    listening_at: float = 0.0  # when wait_listening's own connections (from 127.0.0.1) ended


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitedBroker]:
    http_port = free_port()
    config: dict[str, Any] = {
        "NodeName": "limits",
        "Workers": 1,
        "Http": {"Port": http_port, "BindAddress": "127.0.0.1"},
        "Limits": {
            "MaxPublishRate": PUBLISH_RATE,
            "MaxSubscribeRate": SUBSCRIBE_RATE,
            "MaxSubscriptions": SUBSCRIPTIONS,
            "MaxTopicLevels": TOPIC_LEVELS,
            "MaxTopicLength": TOPIC_BYTES,
            "MaxConnectRate": CONNECT_RATE,
        },
    }
    b = LimitedBroker(workdir=tmp_path_factory.mktemp("limits"), config=config)
    b.http_port = http_port
    b.start()
    b.listening_at = time.monotonic()
    try:
        yield b
    finally:
        b.stop()


# -- clients bound to a source address ---------------------------------------------------------------


class RawFrom(RawClient):
    """A RawClient whose socket is bound to `source` (an address of 127.0.0.0/8)."""

    def __init__(self, broker: BrokerAddress, source: str, version: int = 5, timeout_s: float = 5.0) -> None:
        # RawClient's own fields, with a bound socket (RawClient connects from the default address)
        self.version = ProtocolVersion(version)
        self.sock = socket.create_connection(
            (broker.host, broker.port), timeout=timeout_s, source_address=(source, 0)
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = deque()
        self.closed = False
        self._decoder = Decoder(version=self.version)
        self._next_id = 0


def raw(broker: BrokerAddress, source: str, client_id: str, version: int = 5, **kw: Any) -> RawFrom:
    c = RawFrom(broker, source, version)
    ack = c.connect(client_id, **kw)
    assert ack.reason_code == 0, f"{client_id}: CONNACK {ack.reason_code:#x}"
    return c


def paho(broker: BrokerAddress, source: str, client_id: str, version: int = 5) -> TestClient:
    """A connected paho client whose socket is bound to `source`."""
    c = TestClient(broker, client_id, version)
    inner = c._client
    inner.connect = functools.partial(inner.connect, bind_address=source)  # type: ignore[method-assign]
    assert c.connect().reason_code == 0
    return c


def wait_refill(tokens: int, rate_per_s: int) -> None:
    """A token bucket of `rate_per_s` gains `tokens` in tokens/rate seconds: a fact, not a guess."""
    time.sleep(tokens / rate_per_s + 0.05)


# -- tests ----------------------------------------------------------------------------------------------


def test_publish_rate_v5_burst_accepted_then_0x97_and_not_delivered(broker: LimitedBroker) -> None:
    with paho(broker, "127.0.0.10", "rate-sub") as sub, RawFrom(broker, "127.0.0.11") as pub:
        assert sub.subscribe("rate/#", 1) == [1]
        assert pub.connect("rate-pub5").reason_code == 0
        # one write: the broker takes them at one `now`, so exactly the burst is accepted
        pids = list(range(1, PUBLISH_RATE + 3))
        pub.send_bytes(
            b"".join(pub.encode(Publish("rate/v5", str(i).encode(), 1, packet_id=i)) for i in pids)
        )
        codes = [pub.expect(Puback).reason_code for _ in pids]
        assert codes == [0] * PUBLISH_RATE + [QUOTA_EXCEEDED] * 2, codes
        # QoS 2 refused too: PUBREC 0x97 ends the flow
        pub.send(Publish("rate/v5", b"q2", 2, packet_id=50))
        assert pub.expect(Pubrec).reason_code == QUOTA_EXCEEDED
        wait_refill(1, PUBLISH_RATE)
        pub.send(Publish("rate/v5", b"after", 1, packet_id=60))
        assert pub.expect(Puback).reason_code == 0
        got = [m.payload for m in sub.expect(PUBLISH_RATE + 1)]
        # the refused ones would have come before "after": per-publisher order is kept
        assert got == [str(i).encode() for i in pids[:PUBLISH_RATE]] + [b"after"]


def test_publish_rate_v311_acknowledged_as_usual_and_not_delivered(broker: LimitedBroker) -> None:
    with paho(broker, "127.0.0.12", "rate-sub4") as sub, paho(broker, "127.0.0.13", "rate-pub4", 4) as pub:
        assert sub.subscribe("rate4/#", 1) == [1]
        payloads = [str(i).encode() for i in range(PUBLISH_RATE + 2)]
        started = time.monotonic()
        assert pub.publish_many("rate4/t", payloads, qos=1) == [0] * len(payloads)  # [MQTT-3.3.5-2]
        spent_s = time.monotonic() - started
        assert spent_s < 1 / PUBLISH_RATE, f"the burst took {spent_s:.3f}s: the bucket refilled meanwhile"
        wait_refill(1, PUBLISH_RATE)
        assert pub.publish("rate4/t", b"after", qos=1) == 0
        got = [m.payload for m in sub.expect(PUBLISH_RATE + 1)]
        assert got == [*payloads[:PUBLISH_RATE], b"after"]


def test_subscribe_rate_refuses_every_filter_of_the_packet(broker: LimitedBroker) -> None:
    with raw(broker, "127.0.0.14", "subrate5") as c:
        packets = [
            Subscribe(1, (Subscription("sr/a"),)),
            Subscribe(2, (Subscription("sr/b"),)),
            Subscribe(3, (Subscription("sr/c"), Subscription("sr/d"))),
        ]
        c.send_bytes(b"".join(c.encode(p) for p in packets))
        acks = [c.expect(Suback) for _ in packets]
        assert [a.reason_codes for a in acks] == [(0,), (0,), (QUOTA_EXCEEDED, QUOTA_EXCEEDED)]
    with paho(broker, "127.0.0.15", "subrate4", 4) as old:
        codes = [old.subscribe(f"sr4/{i}") for i in range(SUBSCRIBE_RATE + 1)]
        assert codes == [[0]] * SUBSCRIBE_RATE + [[V311_FAILURE]], codes


def test_max_subscriptions_per_session(broker: LimitedBroker) -> None:
    with raw(broker, "127.0.0.16", "maxsubs5") as c:
        filters = [Subscription(f"ms/{i}") for i in range(SUBSCRIPTIONS + 1)]
        assert c.subscribe(*filters).reason_codes == (0,) * SUBSCRIPTIONS + (QUOTA_EXCEEDED,)
        # replacing a filter the session holds is not a new subscription
        assert c.subscribe(Subscription("ms/0", 1)).reason_codes == (1,)
    with paho(broker, "127.0.0.17", "maxsubs4", 4) as old:
        codes = old.subscribe([(f"ms4/{i}", 0) for i in range(SUBSCRIPTIONS + 1)])
        assert codes == [0] * SUBSCRIPTIONS + [V311_FAILURE]


def test_topic_limits_on_publish_and_subscribe(broker: LimitedBroker) -> None:
    deep = "lim/" + "/".join("x" * TOPIC_LEVELS)  # TOPIC_LEVELS + 1 levels
    long = "lim/" + "y" * TOPIC_BYTES
    with paho(broker, "127.0.0.18", "topic-sub") as sub, raw(broker, "127.0.0.19", "topic5") as c:
        assert sub.subscribe("lim/#", 1) == [1]
        p1 = c.publish(deep, b"deep", qos=1)
        assert isinstance(p1, Puback) and p1.reason_code == TOPIC_NAME_INVALID
        p2 = c.publish(long, b"long", qos=2)
        assert isinstance(p2, Pubrec) and p2.reason_code == TOPIC_NAME_INVALID
        c.publish(deep, b"deep0", qos=0)
        suback = c.subscribe(deep, long, "$share/g/" + "/".join("z" * TOPIC_LEVELS))
        # a shared filter's limits apply to the filter after $share/{group}/
        assert suback.reason_codes == (TOPIC_FILTER_INVALID, TOPIC_FILTER_INVALID, 0)
        assert c.publish("lim/ok", b"ok", qos=1) is not None
        assert [m.payload for m in sub.expect(1)] == [b"ok"]  # none of the refused came first
    with paho(broker, "127.0.0.20", "topic4", 4) as old:
        assert old.publish(deep, b"deep4", qos=1) == 0  # acknowledged as usual [MQTT-3.3.5-2]
        assert old.subscribe(deep) == [V311_FAILURE]


def test_will_topic_over_the_topic_limits(broker: LimitedBroker) -> None:
    deep = "will/" + "/".join("w" * TOPIC_LEVELS)
    with RawFrom(broker, "127.0.0.21") as c:
        ack = c.connect("will5", will=Will(deep, b"bye"))
        assert ack.reason_code == TOPIC_NAME_INVALID
        c.wait_closed()
    with RawFrom(broker, "127.0.0.21", version=4) as c:
        ack = c.connect("will4", will=Will(deep, b"bye"))
        assert ack.reason_code == V311_SERVER_UNAVAILABLE
        c.wait_closed()


def test_connect_rate_per_source_address(broker: LimitedBroker) -> None:
    # wait_listening connected from 127.0.0.1: let that window end (one second, plus the
    # broker loop's coarse clock)
    wait_s = broker.listening_at + CONNECT_WINDOW_S + 0.1 - time.monotonic()
    if wait_s > 0:
        time.sleep(wait_s)
    kept: list[RawClient] = []
    try:
        started = time.monotonic()
        for i in range(CONNECT_RATE):
            kept.append(raw(broker, "127.0.0.1", f"cr{i}"))
        refused = RawFrom(broker, "127.0.0.1")
        kept.append(refused)
        assert refused.connect("cr-refused5").reason_code == CONNECTION_RATE_EXCEEDED
        refused.wait_closed()
        refused_old = RawFrom(broker, "127.0.0.1", version=4)
        kept.append(refused_old)
        assert refused_old.connect("cr-refused4").reason_code == V311_SERVER_UNAVAILABLE
        refused_old.wait_closed()
        spent_s = time.monotonic() - started
        assert spent_s < CONNECT_WINDOW_S, f"{spent_s:.2f}s: the connections spanned two windows"
        # another source address has a rate of its own
        with paho(broker, "127.0.0.2", "cr-other") as other:
            assert other.publish("cr/t", b"x", qos=1) in (0, 0x10)
        # the accepted ones were not harmed
        p = kept[0].publish("cr/t", b"y", qos=1)
        assert isinstance(p, Puback) and p.reason_code in (0, 0x10)
    finally:
        for c in kept:
            c.close()


def test_refusals_are_counted_in_metrics(broker: LimitedBroker) -> None:
    def limit_samples() -> dict[str, float]:
        answer = _http_call(broker.http_port, "GET", "/metrics")
        assert answer.status == 200
        families, samples = parse_prometheus(answer.body.decode())
        if "meshmq_limit_refusals_total" not in families:
            return {}
        assert families["meshmq_limit_refusals_total"] == "counter"
        assert not any(
            s.name.startswith("meshmq_limit_") and s.name != "meshmq_limit_refusals_total" for s in samples
        )
        found = [s for s in samples if s.name == "meshmq_limit_refusals_total"]
        return {s.labels["limit"]: s.value for s in found} | {
            "_sum": metric_sum(samples, "meshmq_limit_refusals_total")
        }

    before = wait_for("meshmq_limit_refusals_total in /metrics", limit_samples, REPORT_TIMEOUT_S)
    assert set(before) - {"_sum"} == {
        "publish_rate",
        "subscribe_rate",
        "subscriptions",
        "topic_levels",
        "topic_length",
        "connect_rate",
    }
    with raw(broker, "127.0.0.22", "metrics5") as c:
        p = c.publish("m/" + "/".join("m" * TOPIC_LEVELS), b"", qos=1)
        assert isinstance(p, Puback) and p.reason_code == TOPIC_NAME_INVALID
        wait_for(
            "the topic_levels refusal counted",
            lambda: limit_samples().get("topic_levels", 0) > before["topic_levels"],
            REPORT_TIMEOUT_S,
        )
