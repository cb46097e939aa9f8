"""Known bytes and one test per decoding rule of `broker.protocol.codec`.

Each rule test asserts the exact exception class and the reason code the connection closes
with, and names the spec statement it enforces.
"""

from __future__ import annotations

import pytest

from broker.protocol.codec import (
    MAX_PACKET_BYTES,
    Decoder,
    encode,
    encode_properties,
    encode_publish_split,
    encode_varint,
)
from broker.protocol.errors import (
    MalformedPacket,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    UnsupportedProtocolVersion,
)
from broker.protocol.packets import (
    NO_PROPERTIES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
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

V31, V311, V5 = ProtocolVersion.V31, ProtocolVersion.V311, ProtocolVersion.V5


def s(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def connect_v5(props: bytes = b"\x00", flags: int = 0x02, payload: bytes | None = None) -> bytes:
    return frame(0x10, s("MQTT") + bytes((5, flags)) + b"\x00\x3c" + props + (payload or s("c")))


def decode(data: bytes, version: ProtocolVersion | None = V5, **kw: int) -> list[object]:
    return list(Decoder(version=version, **kw).feed(data))


def rejects(
    data: bytes,
    error: type[MQTTError],
    reason: int,
    version: ProtocolVersion | None = V5,
    match: str = "",
) -> None:
    """`data` fails with exactly `error` and `reason`, for the rule whose message has `match`."""
    with pytest.raises(MQTTError) as info:
        Decoder(version=version).feed(data)
    assert type(info.value) is error, info.value
    assert info.value.reason_code == reason
    assert match in str(info.value), info.value


MALFORMED, PROTOCOL = Reason.MALFORMED_PACKET, Reason.PROTOCOL_ERROR

# --------------------------------------------------------------------------- primitives


@pytest.mark.parametrize(
    ("value", "wire"),
    [  # spec table 1-1 (5.0) / 2.4 (3.1.1)
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_encode_varint_spec_table(value: int, wire: bytes) -> None:
    assert encode_varint(value) == wire


def test_encode_varint_out_of_range() -> None:
    assert MAX_PACKET_BYTES == 268_435_455
    with pytest.raises(ValueError):
        encode_varint(268_435_456)
    with pytest.raises(ValueError):
        encode_varint(-1)


def test_encode_properties_empty_is_one_zero_byte() -> None:
    assert encode_properties(NO_PROPERTIES) == b"\x00"
    assert encode_properties(Properties()) == b"\x00"


def test_encode_properties_known_bytes() -> None:
    props = Properties(session_expiry_interval_s=10, user_properties=(("k", "v"), ("k", "w")))
    body = b"\x11\x00\x00\x00\x0a" + b"\x26" + s("k") + s("v") + b"\x26" + s("k") + s("w")
    assert encode_properties(props) == bytes((len(body),)) + body


# --------------------------------------------------------------------------- known packets


def test_connect_v311_minimal_known_bytes() -> None:
    wire = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
    packet = Connect(client_id="", keepalive_s=60)
    assert encode(packet, V311) == wire
    decoder = Decoder()
    assert decoder.feed(wire) == [packet]
    assert decoder.version == V311


def test_connect_v5_spec_example_variable_header() -> None:
    # Spec 5.0 figure 3-6: flags 0xC2 (user name, password, clean start), keep alive 10,
    # properties: Session Expiry Interval 10.
    head = s("MQTT") + b"\x05\xc2\x00\x0a" + b"\x05\x11\x00\x00\x00\x0a"
    wire = frame(0x10, head + s("cid") + s("user") + s("pw"))
    packet = Connect(
        client_id="cid",
        protocol_version=V5,
        keepalive_s=10,
        username="user",
        password=b"pw",
        properties=Properties(session_expiry_interval_s=10),
    )
    assert encode(packet, V5) == wire
    decoder = Decoder()
    assert decoder.feed(wire) == [packet]
    assert decoder.version == V5


def test_connect_mqisdp_v31_with_will() -> None:
    body = s("MQIsdp") + b"\x03\x2e\x00\x0a" + s("c") + s("w/t") + s("bye")  # will qos 1, retain
    wire = frame(0x10, body)
    packet = Connect("c", V31, True, 10, Will("w/t", b"bye", 1, True), protocol_name="MQIsdp")
    decoder = Decoder()
    assert decoder.feed(wire) == [packet]
    assert decoder.version == V31
    assert encode(packet, V31) == wire


def test_subscribe_v311_spec_example() -> None:
    # Spec 3.1.1 figure 3.23: packet id 10, "a/b" QoS 1, "c/d" QoS 2.
    wire = b"\x82\x0e\x00\x0a\x00\x03a/b\x01\x00\x03c/d\x02"
    packet = Subscribe(10, (Subscription("a/b", 1), Subscription("c/d", 2)))
    assert decode(wire, V311) == [packet]
    assert encode(packet, V311) == wire


def test_subscribe_v5_options_bits() -> None:
    wire = frame(0x82, b"\x00\x01\x00" + s("a/#") + b"\x2e")  # rh 2, rap, nl, qos 2
    assert decode(wire) == [Subscribe(1, (Subscription("a/#", 2, True, True, 2),))]


def test_publish_known_bytes_both_versions() -> None:
    assert encode(Publish("a/b", b"hi", 1, packet_id=10), V311) == b"\x32\x09\x00\x03a/b\x00\x0ahi"
    assert encode(Publish("a/b", b"hi", 1, packet_id=10), V5) == b"\x32\x0a\x00\x03a/b\x00\x0a\x00hi"
    assert decode(b"\x31\x05\x00\x03a/b", V311) == [Publish("a/b", b"", 0, retain=True)]


def test_publish_split_qos0_and_qos1() -> None:
    head, tail = encode_publish_split("t", b"pay", 0, False, False, None)
    assert head + tail == b"\x30\x06\x00\x01tpay"
    head, tail = encode_publish_split("t", b"pay", 1, True, True, b"\x00")
    assert head == b"\x3b\x09\x00\x01t"  # remaining length counts the packet id
    assert tail == b"\x00pay"
    assert decode(head + b"\x00\x07" + tail) == [Publish("t", b"pay", 1, True, True, 7)]


def test_publish_v5_with_properties() -> None:
    props = Properties(payload_format_indicator=1, topic_alias=3, subscription_identifiers=(1, 300))
    packet = Publish("", b"x", 0, properties=props)
    assert decode(encode(packet, V5)) == [packet]


def test_v311_drops_what_it_cannot_carry() -> None:
    props = Properties(reason_string="r")
    assert encode(Puback(1, 0x10, props), V311) == b"\x40\x02\x00\x01"
    assert encode(Pubrel(1, 0x92), V311) == b"\x62\x02\x00\x01"
    assert encode(Unsuback(1, (0, 0x11)), V311) == b"\xb0\x02\x00\x01"
    assert encode(Disconnect(0x8E, props), V311) == b"\xe0\x00"
    assert encode(Connack(True, 0, props), V311) == b"\x20\x02\x01\x00"
    sub = Subscribe(1, (Subscription("a", 1, True, True, 2),))
    assert encode(sub, V311) == b"\x82\x06\x00\x01\x00\x01a\x01"
    with pytest.raises(ValueError):
        encode(Auth(), V311)
    with pytest.raises(ValueError):  # [MQTT-3.1.2-22]
        encode(Connect("c", password=b"p"), V311)


def test_v5_short_forms() -> None:
    assert encode(Puback(1), V5) == b"\x40\x02\x00\x01"
    assert encode(Pubrec(1, 0x10), V5) == b"\x50\x03\x00\x01\x10"
    assert encode(Disconnect(), V5) == b"\xe0\x00"
    assert encode(Disconnect(0x8E), V5) == b"\xe0\x01\x8e"
    assert encode(Auth(), V5) == b"\xf0\x00"
    assert encode(Pingreq(), V5) == b"\xc0\x00"
    assert encode(Pingresp(), V311) == b"\xd0\x00"


def test_v5_acks_short_remaining_lengths() -> None:
    # Remaining length 2: reason 0, no properties; 3: no properties (spec 3.4.2.1, 3.4.2.2.1).
    assert decode(b"\x40\x02\x00\x05") == [Puback(5, 0, NO_PROPERTIES)]
    assert decode(b"\x50\x03\x00\x05\x10") == [Pubrec(5, 0x10)]
    assert decode(b"\x62\x03\x00\x05\x92") == [Pubrel(5, 0x92)]
    assert decode(b"\x70\x04\x00\x05\x00\x00") == [Pubcomp(5)]


def test_v5_disconnect_and_auth_empty_mean_reason_zero() -> None:
    assert decode(b"\xe0\x00") == [Disconnect(0)]
    assert decode(b"\xe0\x01\x04") == [Disconnect(4)]
    assert decode(b"\xf0\x00") == [Auth(0)]
    props = Properties(authentication_method="m")
    assert decode(frame(0xF0, b"\x18" + encode_properties(props))) == [Auth(0x18, props)]


def test_server_to_client_packets_decode() -> None:
    assert decode(b"\x20\x02\x01\x00", V311) == [Connack(True, 0)]
    assert decode(b"\x20\x03\x00\x84\x00") == [Connack(False, 0x84)]
    assert decode(b"\x90\x04\x00\x01\x00\x80", V311) == [Suback(1, (0, 0x80))]
    assert decode(b"\xb0\x02\x00\x01", V311) == [Unsuback(1)]
    assert decode(b"\xb0\x04\x00\x01\x00\x11") == [Unsuback(1, (0x11,))]
    assert decode(b"\xd0\x00", V311) == [Pingresp()]


def test_many_packets_in_one_feed_and_partial_tail() -> None:
    one = encode(Publish("t", b"p"), V311)
    decoder = Decoder(version=V311)
    assert decoder.feed(one * 3 + one[:2]) == [Publish("t", b"p")] * 3
    assert decoder.buffered_bytes == 2
    assert decoder.feed(one[2:]) == [Publish("t", b"p")]
    assert decoder.buffered_bytes == 0


def test_unsubscribe_roundtrip_known_bytes() -> None:
    wire = b"\xa2\x07\x00\x02\x00\x03a/b"
    assert decode(wire, V311) == [Unsubscribe(2, ("a/b",))]


# --------------------------------------------------------------------------- fixed header


def test_packet_type_0_is_malformed() -> None:
    rejects(b"\x00\x00", MalformedPacket, MALFORMED)
    rejects(b"\x00\x00", MalformedPacket, MALFORMED, version=None)


@pytest.mark.parametrize(
    "wire",
    [
        b"\x60\x02\x00\x01",  # PUBREL must have flags 0b0010 [MQTT-3.6.1-1]
        b"\x80\x06\x00\x01\x00\x01a\x00",  # SUBSCRIBE flags 0b0010 [MQTT-3.8.1-1]
        b"\xa0\x05\x00\x01\x00\x01a",  # UNSUBSCRIBE flags 0b0010 [MQTT-3.10.1-1]
        b"\x42\x02\x00\x01",  # PUBACK flags 0
        b"\xc1\x00",  # PINGREQ flags 0
        b"\xe8\x00",  # DISCONNECT flags 0
    ],
)
def test_reserved_fixed_header_flags_are_malformed(wire: bytes) -> None:
    """[MQTT-2.1.3-1]"""
    rejects(wire, MalformedPacket, MALFORMED, V311, "[MQTT-2.1.3-1]")
    rejects(wire, MalformedPacket, MALFORMED, V5, "[MQTT-2.1.3-1]")


def test_connect_fixed_header_flags_are_malformed() -> None:
    """[MQTT-2.1.3-1]"""
    good = connect_v5()
    rejects(bytes((0x11,)) + good[1:], MalformedPacket, MALFORMED, None, "[MQTT-2.1.3-1]")


def test_remaining_length_longer_than_four_bytes_is_malformed() -> None:
    """[MQTT-1.5.5-1]"""
    rejects(b"\x30\xff\xff\xff\xff\x01", MalformedPacket, MALFORMED, V5, "four bytes")


def test_remaining_length_not_minimal_is_malformed() -> None:
    """[MQTT-1.5.5-1]: the minimum number of bytes."""
    rejects(b"\xc0\x80\x00", MalformedPacket, MALFORMED, V5, "minimally")


def test_packet_too_large_raised_from_the_header_alone() -> None:
    decoder = Decoder(max_packet_bytes=100, version=V5)
    with pytest.raises(PacketTooLarge) as info:
        decoder.feed(b"\x30\xe8\x07")  # remaining length 1000, no body sent
    assert info.value.reason_code == Reason.PACKET_TOO_LARGE
    assert decoder.buffered_bytes == 0


def test_packet_too_large_counts_the_fixed_header() -> None:
    fits = encode(Publish("t", b"x" * 95), V311)  # 2 + 98 = 100 bytes
    assert len(fits) == 100
    assert Decoder(100, V311).feed(fits) == [Publish("t", b"x" * 95)]
    with pytest.raises(PacketTooLarge):
        Decoder(99, V311).feed(fits[:2])


def test_buffer_holds_at_most_one_partial_packet() -> None:
    wire = encode(Publish("t", b"x" * 50_000), V311)
    decoder = Decoder(max_packet_bytes=60_000, version=V311)
    for start in range(0, len(wire) - 1000, 1000):
        assert decoder.feed(wire[start : start + 1000]) == []
        assert decoder.buffered_bytes <= len(wire)
    assert decoder.feed(wire[len(wire) // 1000 * 1000 :]) == [Publish("t", b"x" * 50_000)]
    assert decoder.buffered_bytes == 0


def test_decoder_refuses_use_after_an_error() -> None:
    decoder = Decoder(version=V5)
    with pytest.raises(MalformedPacket):
        decoder.feed(b"\x00\x00")
    with pytest.raises(MQTTError):
        decoder.feed(b"\xc0\x00")


# --------------------------------------------------------------------------- version handling


def test_packet_before_connect_is_protocol_error() -> None:
    """[MQTT-3.1.0-1]: the first packet from the client MUST be CONNECT."""
    rejects(b"\xc0\x00", ProtocolError, PROTOCOL, None, "[MQTT-3.1.0-1]")
    rejects(encode(Publish("t"), V311), ProtocolError, PROTOCOL, None, "[MQTT-3.1.0-1]")


def test_connect_and_following_v5_packets_in_one_feed() -> None:
    publish = Publish("t", b"p", properties=Properties(content_type="c"))
    wire = connect_v5() + encode(publish, V5) + b"\xe0\x00"
    decoder = Decoder()
    packets = decoder.feed(wire)
    assert packets[1:] == [publish, Disconnect()]
    assert decoder.version == V5


def test_second_connect_does_not_change_version() -> None:
    decoder = Decoder()
    decoder.feed(connect_v5())
    [second] = decoder.feed(encode(Connect("x"), V311))
    assert isinstance(second, Connect)
    assert decoder.version == V5


# --------------------------------------------------------------------------- PUBLISH


def test_publish_qos3_is_malformed() -> None:
    """[MQTT-3.3.1-4]"""
    rejects(b"\x36\x07\x00\x01t\x00\x01hi", MalformedPacket, MALFORMED, V311, "[MQTT-3.3.1-4]")
    rejects(b"\x36\x07\x00\x01t\x00\x01\x00h", MalformedPacket, MALFORMED, V5, "[MQTT-3.3.1-4]")


def test_publish_dup_with_qos0_is_malformed() -> None:
    """[MQTT-3.3.1-2]"""
    rejects(b"\x38\x05\x00\x01thi", MalformedPacket, MALFORMED, V311, "[MQTT-3.3.1-2]")
    rejects(b"\x38\x04\x00\x01t\x00", MalformedPacket, MALFORMED, V5, "[MQTT-3.3.1-2]")


def test_publish_packet_id_zero_is_protocol_error() -> None:
    """[MQTT-2.2.1-3] (3.1.1: [MQTT-2.3.1-1])"""
    rejects(b"\x32\x05\x00\x01t\x00\x00", ProtocolError, PROTOCOL, V311, "[MQTT-2.2.1-3]")
    rejects(b"\x34\x06\x00\x01t\x00\x00\x00", ProtocolError, PROTOCOL, V5, "[MQTT-2.2.1-3]")


def test_publish_truncated_fields_are_malformed() -> None:
    rejects(b"\x30\x01\x00", MalformedPacket, MALFORMED, V311)  # topic length cut
    rejects(b"\x30\x03\x00\x05a", MalformedPacket, MALFORMED, V311)  # topic past the packet
    rejects(b"\x32\x04\x00\x01t\x00", MalformedPacket, MALFORMED, V311)  # packet id cut
    rejects(b"\x30\x03\x00\x01t", MalformedPacket, MALFORMED, V5)  # no property length


def test_publish_empty_payload() -> None:
    assert decode(b"\x30\x03\x00\x01t", V311) == [Publish("t", b"")]
    assert decode(b"\x30\x04\x00\x01t\x00") == [Publish("t", b"")]


@pytest.mark.parametrize(
    "bad",
    [
        b"\xc0\x80",  # overlong encoding of U+0000
        b"\xed\xa0\x80",  # a UTF-16 surrogate, U+D800
        b"\xff",
        b"\xf4\x90\x80\x80",  # past U+10FFFF
    ],
)
def test_ill_formed_utf8_is_malformed(bad: bytes) -> None:
    """[MQTT-1.5.4-1] (3.1.1: [MQTT-1.5.3-1])"""
    topic = len(bad).to_bytes(2, "big") + bad
    rejects(frame(0x30, topic + b"\x00"), MalformedPacket, MALFORMED, V5, "[MQTT-1.5.4-1]")
    rejects(frame(0xA2, b"\x00\x01" + topic), MalformedPacket, MALFORMED, V311, "[MQTT-1.5.4-1]")


def test_null_character_is_malformed() -> None:
    """[MQTT-1.5.4-2] (3.1.1: [MQTT-1.5.3-2])"""
    rejects(frame(0x30, s("a\x00b")), MalformedPacket, MALFORMED, V311, "[MQTT-1.5.4-2]")
    rejects(connect_v5(payload=s("c\x00")), MalformedPacket, MALFORMED, None, "[MQTT-1.5.4-2]")


# --------------------------------------------------------------------------- CONNECT


def test_connect_unknown_protocol_name_is_protocol_error() -> None:
    rejects(frame(0x10, s("MQTX") + b"\x04\x02\x00\x3c" + s("c")), ProtocolError, PROTOCOL, None)


@pytest.mark.parametrize(("name", "level"), [("MQTT", 6), ("MQTT", 3), ("MQTT", 0), ("MQIsdp", 4)])
def test_connect_unknown_level_is_unsupported_version(name: str, level: int) -> None:
    """[MQTT-3.1.2-2]"""
    # Only the name and level are sent: the level alone is enough to answer with CONNACK.
    wire = frame(0x10, s(name) + bytes((level,)))
    rejects(wire, UnsupportedProtocolVersion, Reason.UNSUPPORTED_PROTOCOL_VERSION, None, "[MQTT-3.1.2-2]")


def test_connect_reserved_flag_is_malformed() -> None:
    """[MQTT-3.1.2-3]"""
    rejects(connect_v5(flags=0x03), MalformedPacket, MALFORMED, None, "[MQTT-3.1.2-3]")


def test_connect_will_qos3_is_malformed() -> None:
    """[MQTT-3.1.2-12] (3.1.1: [MQTT-3.1.2-14])"""
    rejects(connect_v5(flags=0x1E), MalformedPacket, MALFORMED, None, "will QoS 3")


@pytest.mark.parametrize("flags", [0x0A, 0x12, 0x22])
def test_connect_will_qos_or_retain_without_will_flag_is_malformed(flags: int) -> None:
    """[MQTT-3.1.2-11], [MQTT-3.1.2-13] (3.1.1: [MQTT-3.1.2-13], [MQTT-3.1.2-15])"""
    rejects(connect_v5(flags=flags), MalformedPacket, MALFORMED, None, "without will flag")
    wire = frame(0x10, s("MQTT") + bytes((4, flags)) + b"\x00\x3c" + s("c"))
    rejects(wire, MalformedPacket, MALFORMED, None, "without will flag")


def test_connect_v311_password_without_username_is_malformed() -> None:
    """[MQTT-3.1.2-22]"""
    wire = frame(0x10, s("MQTT") + b"\x04\x42\x00\x3c" + s("c") + s("pw"))
    rejects(wire, MalformedPacket, MALFORMED, None, "[MQTT-3.1.2-22]")


def test_connect_v5_password_without_username_is_allowed() -> None:
    [packet] = decode(connect_v5(flags=0x42, payload=s("c") + s("pw")), None)
    assert isinstance(packet, Connect)
    assert packet.password == b"pw"
    assert packet.username is None


def test_connect_trailing_bytes_are_malformed() -> None:
    rejects(connect_v5(payload=s("c") + b"\x00"), MalformedPacket, MALFORMED, None, "trailing")


def test_connect_missing_payload_fields_are_malformed() -> None:
    rejects(connect_v5(flags=0x82, payload=s("c")), MalformedPacket, MALFORMED, None)  # no user name
    rejects(connect_v5(flags=0x06, payload=s("c") + b"\x00" + s("t")), MalformedPacket, MALFORMED, None)


def test_connect_will_properties_are_checked_against_the_will_set() -> None:
    will_ok = b"\x05\x18\x00\x00\x00\x05"  # Will Delay Interval 5
    payload = s("c") + will_ok + s("w") + s("x")
    [packet] = decode(connect_v5(flags=0x06, payload=payload), None)
    assert isinstance(packet, Connect) and packet.will is not None
    assert packet.will.properties == Properties(will_delay_interval_s=5)
    session_expiry_in_will = b"\x05\x11\x00\x00\x00\x05"
    payload = s("c") + session_expiry_in_will + s("w") + s("x")
    rejects(connect_v5(flags=0x06, payload=payload), MalformedPacket, MALFORMED, None)
    rejects(connect_v5(props=will_ok), MalformedPacket, MALFORMED, None)  # will delay in CONNECT


def test_connack_reserved_flags_are_malformed() -> None:
    """[MQTT-3.2.2-1]"""
    rejects(b"\x20\x02\x02\x00", MalformedPacket, MALFORMED, V311, "[MQTT-3.2.2-1]")


def test_auth_is_reserved_in_v311() -> None:
    rejects(b"\xf0\x00", MalformedPacket, MALFORMED, V311)


# --------------------------------------------------------------------------- SUBSCRIBE / UNSUBSCRIBE


def test_subscribe_without_filters_is_protocol_error() -> None:
    """[MQTT-3.8.3-2] (3.1.1: [MQTT-3.8.3-3])"""
    rejects(b"\x82\x02\x00\x01", ProtocolError, PROTOCOL, V311, "[MQTT-3.8.3-2]")
    rejects(b"\x82\x03\x00\x01\x00", ProtocolError, PROTOCOL, V5, "[MQTT-3.8.3-2]")


def test_subscribe_reserved_option_bits_are_malformed() -> None:
    """[MQTT-3.8.3-5] (3.1.1: [MQTT-3.8.3-4], where bits 2-7 are reserved)"""
    rejects(frame(0x82, b"\x00\x01\x00" + s("a") + b"\x40"), MalformedPacket, MALFORMED, V5)
    rejects(frame(0x82, b"\x00\x01\x00" + s("a") + b"\x80"), MalformedPacket, MALFORMED, V5)
    rejects(frame(0x82, b"\x00\x01" + s("a") + b"\x04"), MalformedPacket, MALFORMED, V311)


def test_subscribe_qos3() -> None:
    """3.1.1 [MQTT-3.8.3-4]: Malformed; 5.0 spec 3.8.3.1: 'It is a Protocol Error'."""
    rejects(frame(0x82, b"\x00\x01" + s("a") + b"\x03"), MalformedPacket, MALFORMED, V311)
    rejects(frame(0x82, b"\x00\x01\x00" + s("a") + b"\x03"), ProtocolError, PROTOCOL, V5)


def test_subscribe_retain_handling_3_is_protocol_error() -> None:
    rejects(frame(0x82, b"\x00\x01\x00" + s("a") + b"\x30"), ProtocolError, PROTOCOL, V5)


def test_subscribe_packet_id_zero_is_protocol_error() -> None:
    """[MQTT-2.2.1-3]"""
    rejects(frame(0x82, b"\x00\x00" + s("a") + b"\x00"), ProtocolError, PROTOCOL, V311)


def test_subscribe_filter_without_options_is_malformed() -> None:
    rejects(frame(0x82, b"\x00\x01" + s("a")), MalformedPacket, MALFORMED, V311)


def test_unsubscribe_without_filters_is_protocol_error() -> None:
    """[MQTT-3.10.3-2]"""
    rejects(b"\xa2\x02\x00\x01", ProtocolError, PROTOCOL, V311, "[MQTT-3.10.3-2]")
    rejects(b"\xa2\x03\x00\x01\x00", ProtocolError, PROTOCOL, V5, "[MQTT-3.10.3-2]")


# --------------------------------------------------------------------------- properties


def publish_with(props_body: bytes) -> bytes:
    return frame(0x30, s("t") + encode_varint(len(props_body)) + props_body)


def test_unknown_property_is_malformed() -> None:
    rejects(publish_with(b"\x04\x00"), MalformedPacket, MALFORMED, V5, "unknown property")
    rejects(publish_with(b"\x80\x01\x00"), MalformedPacket, MALFORMED, V5, "unknown property")


def test_property_not_valid_for_packet_is_malformed() -> None:
    """Spec 2.2.2.2: an identifier not valid for its packet type is a Malformed Packet."""
    rejects(frame(0x40, b"\x00\x01\x00\x03\x23\x00\x01"), MalformedPacket, MALFORMED)  # alias in PUBACK
    rejects(publish_with(b"\x11\x00\x00\x00\x01"), MalformedPacket, MALFORMED)  # session expiry


def test_repeated_property_is_protocol_error() -> None:
    rejects(publish_with(b"\x03" + s("a") + b"\x03" + s("b")), ProtocolError, PROTOCOL, V5, "more than once")


def test_user_properties_and_publish_subscription_ids_repeat() -> None:
    body = b"\x26" + s("k") + s("1") + b"\x26" + s("k") + s("2") + b"\x0b\x01\x0b\x02"
    [packet] = decode(publish_with(body))
    assert isinstance(packet, Publish)
    assert packet.properties.user_properties == (("k", "1"), ("k", "2"))
    assert packet.properties.subscription_identifiers == (1, 2)


def test_subscription_identifier_twice_in_subscribe_is_protocol_error() -> None:
    wire = frame(0x82, b"\x00\x01\x04\x0b\x01\x0b\x02" + s("a") + b"\x00")
    rejects(wire, ProtocolError, PROTOCOL)


def test_subscription_identifier_zero_is_protocol_error() -> None:
    rejects(publish_with(b"\x0b\x00"), ProtocolError, PROTOCOL)
    rejects(frame(0x82, b"\x00\x01\x02\x0b\x00" + s("a") + b"\x00"), ProtocolError, PROTOCOL)


@pytest.mark.parametrize(
    "props",
    [
        b"\x21\x00\x00",  # Receive Maximum 0
        b"\x27\x00\x00\x00\x00",  # Maximum Packet Size 0
        b"\x17\x02",  # Request Problem Information 2
        b"\x19\x02",  # Request Response Information 2
    ],
)
def test_connect_property_values_out_of_range_are_protocol_errors(props: bytes) -> None:
    rejects(connect_v5(props=bytes((len(props),)) + props), ProtocolError, PROTOCOL, None)


def test_payload_format_indicator_other_than_0_or_1_is_protocol_error() -> None:
    rejects(publish_with(b"\x01\x02"), ProtocolError, PROTOCOL)


def test_property_length_past_the_packet_is_malformed() -> None:
    rejects(frame(0x30, s("t") + b"\x09\x01\x01"), MalformedPacket, MALFORMED)


def test_property_value_past_the_property_block_is_malformed() -> None:
    # The property block claims 2 bytes but Message Expiry Interval needs 4 after its id.
    rejects(frame(0x30, s("t") + b"\x02\x02\x00\x00\x00\x00"), MalformedPacket, MALFORMED)
    rejects(frame(0x30, s("t") + b"\x02\x03\x00"), MalformedPacket, MALFORMED)  # string cut


# --------------------------------------------------------------------------- small packets


def test_pingreq_pingresp_with_body_are_malformed() -> None:
    rejects(b"\xc0\x01\x00", MalformedPacket, MALFORMED, V311)
    rejects(b"\xd0\x01\x00", MalformedPacket, MALFORMED, V5)


def test_v311_acks_must_be_two_bytes() -> None:
    rejects(b"\x40\x03\x00\x01\x00", MalformedPacket, MALFORMED, V311)
    rejects(b"\xe0\x01\x00", MalformedPacket, MALFORMED, V311)


def test_v5_ack_trailing_bytes_are_malformed() -> None:
    rejects(b"\x40\x05\x00\x01\x00\x00\x00", MalformedPacket, MALFORMED, V5)
