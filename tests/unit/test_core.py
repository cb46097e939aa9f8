"""The broker core end to end in memory: packets in, packets out, a fake clock."""

from __future__ import annotations

from broker.protocol.packets import (
    NO_PROPERTIES,
    Connack,
    Disconnect,
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
    Unsuback,
    Unsubscribe,
    Will,
)
from broker.protocol.reasons import Reason
from tests.unit.core_harness import Harness, HarnessClient

V5 = ProtocolVersion.V5
V311 = ProtocolVersion.V311


def subscribe(
    client: HarnessClient, *subs: Subscription, pid: int = 1, props: Properties = NO_PROPERTIES
) -> Suback:
    client.send(Subscribe(pid, subs, props))
    packets = client.received()
    assert isinstance(packets[0], Suback)
    client._pending = packets[1:]  # retained messages follow the SUBACK
    return packets[0]


def test_connect_publish_subscribe_qos0() -> None:
    h = Harness()
    sub, pub = h.client(), h.client()
    ack = sub.connect("sub")
    assert isinstance(ack, Connack) and ack.reason_code == 0 and not ack.session_present
    pub.connect("pub")
    assert subscribe(sub, Subscription("a/+", 0)).reason_codes == (0,)
    pub.send(Publish("a/b", b"hello"))
    got = sub.received()
    assert got == [Publish("a/b", b"hello")]


def test_qos1_and_qos2_flows_and_downgrade() -> None:
    """[MQTT-3.8.4-8] delivery QoS is the minimum of published and granted QoS."""
    h = Harness()
    sub, pub = h.client(), h.client()
    sub.connect("sub")
    pub.connect("pub")
    subscribe(sub, Subscription("t/1", 1), Subscription("t/2", 2))
    pub.send(Publish("t/1", b"x", qos=2, packet_id=7))
    assert pub.received() == [Pubrec(7)]
    got = sub.received()
    assert len(got) == 1 and isinstance(got[0], Publish) and got[0].qos == 1
    sub.send(Puback(got[0].packet_id))
    pub.send(Pubrel(7))
    assert pub.received() == [Pubcomp(7)]
    pub.send(Publish("t/2", b"y", qos=2, packet_id=8))
    assert pub.received() == [Pubrec(8)]
    got = sub.received()
    assert got[0].qos == 2
    sub.send(Pubrec(got[0].packet_id))
    assert sub.received() == [Pubrel(got[0].packet_id)]
    sub.send(Pubcomp(got[0].packet_id))
    assert h.core.sessions["sub"].inflight == {}


def test_qos2_resend_before_pubrel_is_routed_once() -> None:
    h = Harness()
    sub, pub = h.client(), h.client()
    sub.connect("sub")
    pub.connect("pub")
    subscribe(sub, Subscription("t", 0))
    pub.send(Publish("t", b"x", qos=2, packet_id=3))
    pub.send(Publish("t", b"x", qos=2, packet_id=3, dup=True))
    assert pub.received() == [Pubrec(3), Pubrec(3)]
    assert len(sub.received()) == 1


def test_persistent_session_queues_and_resends_with_dup() -> None:
    """[MQTT-4.4.0-1] unacknowledged PUBLISH is resent with DUP on resume."""
    h = Harness()
    sub = h.client(V311)
    sub.connect("s", clean_start=False)
    subscribe(sub, Subscription("q", 1))
    pub = h.client(V311)
    pub.connect("p")
    pub.send(Publish("q", b"1", qos=1, packet_id=1))
    first = sub.received()[0]
    assert isinstance(first, Publish) and not first.dup
    sub.lose()
    pub.send(Publish("q", b"2", qos=1, packet_id=2))
    sub2 = h.client(V311)
    ack = sub2.connect("s", clean_start=False)
    assert isinstance(ack, Connack) and ack.session_present
    got = sub2.received()
    assert [(p.payload, p.dup) for p in got] == [(b"1", True), (b"2", False)]
    assert got[0].packet_id == first.packet_id


def test_clean_start_discards_session() -> None:
    h = Harness()
    c = h.client(V311)
    c.connect("s", clean_start=False)
    subscribe(c, Subscription("q", 1))
    c.lose()
    c2 = h.client(V311)
    ack = c2.connect("s", clean_start=True)
    assert isinstance(ack, Connack) and not ack.session_present
    assert h.core.sessions["s"].subscriptions == {}


def test_session_expiry_v5() -> None:
    h = Harness()
    c = h.client()
    c.connect("s", clean_start=False, properties=Properties(session_expiry_interval_s=5))
    subscribe(c, Subscription("q", 1))
    c.lose()
    h.tick(4)
    assert "s" in h.core.sessions
    h.tick(2)
    assert "s" not in h.core.sessions
    assert len(h.core.subscriptions) == 0


def test_will_on_abrupt_close_not_on_disconnect() -> None:
    """[MQTT-3.1.2-8] and [MQTT-3.1.2-10]."""
    h = Harness()
    watcher = h.client()
    watcher.connect("w")
    subscribe(watcher, Subscription("will/#", 0))
    a = h.client()
    a.connect("a", will=Will("will/a", b"gone"))
    a.lose()
    assert watcher.received() == [Publish("will/a", b"gone")]
    b = h.client()
    b.connect("b", will=Will("will/b", b"gone"))
    b.send(Disconnect())
    b.lose()
    c = h.client()
    c.connect("c", will=Will("will/c", b"bye"))
    c.send(Disconnect(Reason.DISCONNECT_WITH_WILL))
    c.lose()
    assert watcher.received() == [Publish("will/c", b"bye")]


def test_will_delay_cancelled_by_reconnect() -> None:
    """[MQTT-3.1.3-9]"""
    h = Harness()
    watcher = h.client()
    watcher.connect("w")
    subscribe(watcher, Subscription("will", 0))
    props = Properties(session_expiry_interval_s=100)
    will = Will("will", b"x", properties=Properties(will_delay_interval_s=5))
    a = h.client()
    a.connect("a", clean_start=False, will=will, properties=props)
    a.lose()
    h.tick(3)
    a2 = h.client()
    a2.connect("a", clean_start=False, properties=props)
    h.tick(10)
    assert watcher.received() == []
    a2.lose()
    h.tick(10)
    assert watcher.received() == []  # the new connection had no will
    a3 = h.client()
    a3.connect("a", clean_start=False, will=will, properties=props)
    a3.lose()
    h.tick(6)
    assert watcher.received() == [Publish("will", b"x")]


def test_retained_set_replace_clear() -> None:
    """[MQTT-3.3.1-5] [MQTT-3.3.1-8] [MQTT-3.3.1-10]"""
    h = Harness()
    pub = h.client()
    pub.connect("p")
    pub.send(
        Publish("r/1", b"a", retain=True),
        Publish("r/1", b"b", retain=True),
        Publish("r/2", b"c", retain=True),
    )
    s = h.client()
    s.connect("s")
    subscribe(s, Subscription("r/#", 0))
    got = sorted((p.topic, p.payload, p.retain) for p in s.received())
    assert got == [("r/1", b"b", True), ("r/2", b"c", True)]
    pub.send(Publish("r/1", b"", retain=True))
    assert [p.retain for p in s.received()] == [False]  # live delivery without retain-as-published
    s2 = h.client()
    s2.connect("s2")
    subscribe(s2, Subscription("r/#", 0))
    assert [p.topic for p in s2.received()] == ["r/2"]


def test_retain_handling_and_retain_as_published() -> None:
    h = Harness()
    pub = h.client()
    pub.connect("p")
    pub.send(Publish("r", b"a", retain=True))
    s = h.client()
    s.connect("s")
    subscribe(s, Subscription("r", 0, retain_handling=2))
    assert s.received() == []
    subscribe(s, Subscription("r", 0, retain_handling=1, retain_as_published=True), pid=2)
    assert s.received() == []  # not a new subscription
    subscribe(s, Subscription("r", 0, retain_handling=0, retain_as_published=True), pid=3)
    assert [p.retain for p in s.received()] == [True]
    pub.send(Publish("r", b"b", retain=True))
    assert [p.retain for p in s.received()] == [True]


def test_no_local_and_subscription_ids_overlap() -> None:
    h = Harness()
    c = h.client()
    c.connect("c")
    subscribe(c, Subscription("a/#", 1), props=Properties(subscription_identifiers=(5,)))
    subscribe(c, Subscription("a/b", 0), pid=2, props=Properties(subscription_identifiers=(9,)))
    other = h.client()
    other.connect("o")
    other.send(Publish("a/b", b"x", qos=1, packet_id=1))
    got = c.received()
    assert len(got) == 1 and got[0].qos == 1
    assert sorted(got[0].properties.subscription_identifiers) == [5, 9]
    n = h.client()
    n.connect("n")
    subscribe(n, Subscription("x", 0, no_local=True))
    n.send(Publish("x", b"self"))
    assert n.received() == []


def test_receive_maximum_window() -> None:
    """[MQTT-3.3.4-9] no more unacknowledged QoS 1 PUBLISHes than the client's receive maximum."""
    h = Harness()
    s = h.client()
    s.connect("s", properties=Properties(receive_maximum=2))
    subscribe(s, Subscription("t", 1))
    p = h.client()
    p.connect("p")
    for i in range(5):
        p.send(Publish("t", str(i).encode(), qos=1, packet_id=i + 1))
    got = s.received()
    assert [x.payload for x in got] == [b"0", b"1"]
    s.send(Puback(got[0].packet_id))
    got2 = s.received()
    assert [x.payload for x in got2] == [b"2"]


def test_client_exceeding_receive_maximum_is_disconnected() -> None:
    """[MQTT-3.3.4-8]"""
    h = Harness(max_inflight=2)
    p = h.client()
    p.connect("p")
    for i in range(3):
        p.send(Publish("t", b"x", qos=2, packet_id=i + 1))
    got = p.received()
    assert got[-1] == Disconnect(Reason.RECEIVE_MAXIMUM_EXCEEDED)
    assert p.link.closed


def test_outbound_topic_alias() -> None:
    """[MQTT-3.3.2-10] aliases within the client's maximum."""
    h = Harness()
    s = h.client()
    s.connect("s", properties=Properties(topic_alias_maximum=1))
    subscribe(s, Subscription("#", 0))
    p = h.client()
    p.connect("p")
    p.send(Publish("a", b"1"), Publish("a", b"2"), Publish("b", b"3"))
    got = s.received()
    assert [(x.topic, x.properties.topic_alias) for x in got] == [("a", 1), ("", 1), ("b", None)]


def test_inbound_topic_alias() -> None:
    h = Harness()
    s = h.client()
    s.connect("s")
    subscribe(s, Subscription("long/topic", 0))
    p = h.client()
    p.connect("p")
    p.send(Publish("long/topic", b"1", properties=Properties(topic_alias=3)))
    p.send(Publish("", b"2", properties=Properties(topic_alias=3)))
    assert [(x.topic, x.payload) for x in s.received()] == [("long/topic", b"1"), ("long/topic", b"2")]
    p.send(Publish("", b"3", properties=Properties(topic_alias=0)))
    assert p.received()[-1] == Disconnect(Reason.TOPIC_ALIAS_INVALID)


def test_max_packet_size_of_client_drops_message_for_it_only() -> None:
    """[MQTT-3.1.2-25]"""
    h = Harness()
    small = h.client()
    small.connect("small", properties=Properties(maximum_packet_bytes=50))
    big = h.client()
    big.connect("big")
    subscribe(small, Subscription("t", 0))
    subscribe(big, Subscription("t", 0))
    p = h.client()
    p.connect("p")
    p.send(Publish("t", b"x" * 100))
    assert small.received() == []
    assert len(big.received()) == 1
    assert h.core.counters.messages_dropped_too_large == 1


def test_takeover_disconnects_old_with_0x8e() -> None:
    """[MQTT-3.1.4-3]"""
    h = Harness()
    a = h.client()
    a.connect("same")
    b = h.client()
    b.connect("same")
    assert a.received() == [Disconnect(Reason.SESSION_TAKEN_OVER)]
    assert a.link.closed
    a.lose()  # the IO layer reports the close; it must not end b's session
    assert h.core.sessions["same"].connection is b.conn


def test_keepalive_timeout() -> None:
    """[MQTT-3.1.2-24] closed after one and a half keep alive periods of silence."""
    h = Harness()
    c = h.client()
    c.connect("k", keepalive_s=2)
    h.tick(2.9)
    assert not c.link.closed
    h.tick(0.2)
    assert c.link.closed
    assert c.received() == [Disconnect(Reason.KEEP_ALIVE_TIMEOUT)]


def test_queue_limit_counts_drops() -> None:
    h = Harness(max_queued_messages=3)
    s = h.client(V311)
    s.connect("s", clean_start=False)
    subscribe(s, Subscription("t", 1))
    s.lose()
    p = h.client()
    p.connect("p")
    for i in range(5):
        p.send(Publish("t", b"x", qos=1, packet_id=i + 1))
    assert len(h.core.sessions["s"].queue) == 3
    assert h.core.counters.messages_dropped_queue_full == 2


def test_shared_subscription_round_robin() -> None:
    h = Harness()
    members = []
    for name in ("m1", "m2", "m3"):
        m = h.client()
        m.connect(name)
        subscribe(m, Subscription("$share/g/t", 0))
        members.append(m)
    p = h.client()
    p.connect("p")
    for i in range(9):
        p.send(Publish("t", str(i).encode()))
    counts = [len(m.received()) for m in members]
    assert counts == [3, 3, 3]


def test_unsubscribe_reason_codes() -> None:
    h = Harness()
    c = h.client()
    c.connect("c")
    subscribe(c, Subscription("a", 0))
    c.send(Unsubscribe(2, ("a", "b")))
    assert c.received() == [Unsuback(2, (Reason.SUCCESS, Reason.NO_SUBSCRIPTION_EXISTED))]


def test_first_packet_must_be_connect() -> None:
    """[MQTT-3.1.0-1]"""
    h = Harness()
    c = h.client()
    c.send_bytes(b"\xc0\x00")  # PINGREQ
    assert c.link.closed
    assert h.core.counters.protocol_errors == 1


def test_empty_client_id_assigned_v5_and_rejected_v311_persistent() -> None:
    """[MQTT-3.2.2-16] assigned identifier; [MQTT-3.1.3-8] 3.1.1 rejects it without clean session."""
    h = Harness()
    c = h.client()
    ack = c.connect("")
    assert isinstance(ack, Connack) and ack.properties.assigned_client_identifier == "auto-1"
    d = h.client(V311)
    ack = d.connect("", clean_start=False)
    assert isinstance(ack, Connack) and ack.reason_code == 2
    assert d.link.closed
