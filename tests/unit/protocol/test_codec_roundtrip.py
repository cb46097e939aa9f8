"""Round trip of every packet type through `encode` and `Decoder.feed`, in 3.1.1 and 5.0.

The strategies here build only packets that are valid for the side of the codec they exercise
(properties limited to what each packet may carry, DUP only with QoS > 0, non-zero packet ids
where the spec demands them). For 3.1.1 the expected value is the packet after dropping what
3.1.1 cannot carry (`as_v311`). The strategies are also used by `test_decoder_fuzz`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.protocol.codec import Decoder, encode, encode_properties, encode_publish_split
from broker.protocol.packets import (
    NO_PROPERTIES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
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
from broker.protocol.properties import (
    AUTH_PROPS,
    CONNACK_PROPS,
    CONNECT_PROPS,
    DISCONNECT_PROPS,
    PUBACK_PROPS,
    PUBCOMP_PROPS,
    PUBLISH_PROPS,
    PUBREC_PROPS,
    PUBREL_PROPS,
    SUBACK_PROPS,
    SUBSCRIBE_PROPS,
    UNSUBACK_PROPS,
    UNSUBSCRIBE_PROPS,
    VARINT_MAX,
    WILL_PROPS,
    PropertySet,
)

V31, V311, V5 = ProtocolVersion.V31, ProtocolVersion.V311, ProtocolVersion.V5
RUN = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- strategies

texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
blobs = st.binary(max_size=24)
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
flag = st.integers(0, 1)
packet_ids = st.integers(1, 0xFFFF)
reason_codes = u8

# field -> (property id, value strategy); subscription ids and user properties are handled apart
_SCALARS: dict[str, tuple[int, st.SearchStrategy[Any]]] = {
    "payload_format_indicator": (0x01, flag),
    "message_expiry_interval_s": (0x02, u32),
    "content_type": (0x03, texts),
    "response_topic": (0x08, texts),
    "correlation_data": (0x09, blobs),
    "session_expiry_interval_s": (0x11, u32),
    "assigned_client_identifier": (0x12, texts),
    "server_keep_alive_s": (0x13, u16),
    "authentication_method": (0x15, texts),
    "authentication_data": (0x16, blobs),
    "request_problem_information": (0x17, flag),
    "will_delay_interval_s": (0x18, u32),
    "request_response_information": (0x19, flag),
    "response_information": (0x1A, texts),
    "server_reference": (0x1C, texts),
    "reason_string": (0x1F, texts),
    "receive_maximum": (0x21, st.integers(1, 0xFFFF)),
    "topic_alias_maximum": (0x22, u16),
    "topic_alias": (0x23, st.integers(1, 0xFFFF)),
    "maximum_qos": (0x24, flag),
    "retain_available": (0x25, flag),
    "maximum_packet_bytes": (0x27, st.integers(1, 0xFFFF_FFFF)),
    "wildcard_subscription_available": (0x28, flag),
    "subscription_identifier_available": (0x29, flag),
    "shared_subscription_available": (0x2A, flag),
}


def properties_for(allowed: PropertySet) -> st.SearchStrategy[Properties]:
    """Properties that `allowed`'s packet may carry, each present or absent."""
    fields: dict[str, st.SearchStrategy[Any]] = {
        name: st.none() | strategy for name, (pid, strategy) in _SCALARS.items() if allowed.allows(pid)
    }
    if allowed.allows(0x26):
        fields["user_properties"] = st.lists(st.tuples(texts, texts), max_size=3).map(tuple)
    if allowed.allows(0x0B):
        most = 3 if allowed.subscription_id_repeats else 1
        fields["subscription_identifiers"] = st.lists(st.integers(1, VARINT_MAX), max_size=most).map(tuple)

    def build(values: dict[str, Any]) -> Properties:
        return Properties(**{k: v for k, v in values.items() if v is not None})

    return st.fixed_dictionaries(fields).map(build)


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    qos = draw(st.integers(0, 2))
    return Publish(
        topic=draw(texts),
        payload=draw(st.binary(max_size=300)),
        qos=qos,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()) if qos else False,
        packet_id=draw(packet_ids) if qos else 0,
        properties=draw(properties_for(PUBLISH_PROPS)),
    )


@st.composite
def connects(draw: st.DrawFn, version: ProtocolVersion) -> Connect:
    will = None
    if draw(st.booleans()):
        will = Will(
            draw(texts),
            draw(blobs),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
            draw(properties_for(WILL_PROPS)),
        )
    username = draw(st.none() | texts)
    password = draw(st.none() | blobs)
    if version != V5 and username is None:
        password = None  # 3.1.1 forbids a password without a user name [MQTT-3.1.2-22]
    return Connect(
        client_id=draw(texts),
        protocol_version=version,
        clean_start=draw(st.booleans()),
        keepalive_s=draw(u16),
        will=will,
        username=username,
        password=password,
        properties=draw(properties_for(CONNECT_PROPS)),
        protocol_name="MQIsdp" if version == V31 else "MQTT",
    )


subscriptions = st.builds(
    Subscription,
    topic_filter=texts,
    qos=st.integers(0, 2),
    no_local=st.booleans(),
    retain_as_published=st.booleans(),
    retain_handling=st.integers(0, 2),
)


def _acks(cls: type[Puback | Pubrec | Pubrel | Pubcomp], allowed: PropertySet) -> st.SearchStrategy[Packet]:
    return st.builds(cls, packet_ids, reason_codes, properties_for(allowed))


def packets_after_connect() -> st.SearchStrategy[Packet]:
    """Every packet type but CONNECT, with 5.0 content (3.1.1 tests project it down)."""
    codes = st.lists(reason_codes, min_size=1, max_size=5).map(tuple)
    return st.one_of(
        publishes(),
        st.builds(Connack, st.booleans(), reason_codes, properties_for(CONNACK_PROPS)),
        _acks(Puback, PUBACK_PROPS),
        _acks(Pubrec, PUBREC_PROPS),
        _acks(Pubrel, PUBREL_PROPS),
        _acks(Pubcomp, PUBCOMP_PROPS),
        st.builds(
            Subscribe,
            packet_ids,
            st.lists(subscriptions, min_size=1, max_size=4).map(tuple),
            properties_for(SUBSCRIBE_PROPS),
        ),
        st.builds(Suback, packet_ids, codes, properties_for(SUBACK_PROPS)),
        st.builds(
            Unsubscribe,
            packet_ids,
            st.lists(texts, min_size=1, max_size=4).map(tuple),
            properties_for(UNSUBSCRIBE_PROPS),
        ),
        st.builds(Unsuback, packet_ids, codes, properties_for(UNSUBACK_PROPS)),
        st.just(Pingreq()),
        st.just(Pingresp()),
        st.builds(Disconnect, reason_codes, properties_for(DISCONNECT_PROPS)),
        st.builds(Auth, reason_codes, properties_for(AUTH_PROPS)),
    )


def as_v311(packet: Packet) -> Packet:
    """What a 3.1.1 decoder returns for `packet` encoded as 3.1.1."""
    if isinstance(packet, Connect):
        will = packet.will and dataclasses.replace(packet.will, properties=NO_PROPERTIES)
        return dataclasses.replace(packet, will=will, properties=NO_PROPERTIES)
    if isinstance(packet, Puback | Pubrec | Pubrel | Pubcomp):
        return dataclasses.replace(packet, reason_code=0, properties=NO_PROPERTIES)
    if isinstance(packet, Subscribe):
        subs = tuple(Subscription(s.topic_filter, s.qos) for s in packet.subscriptions)
        return dataclasses.replace(packet, subscriptions=subs, properties=NO_PROPERTIES)
    if isinstance(packet, Unsuback):
        return Unsuback(packet.packet_id)
    if isinstance(packet, Disconnect):
        return Disconnect()
    if isinstance(packet, Publish | Connack | Suback | Unsubscribe):
        return dataclasses.replace(packet, properties=NO_PROPERTIES)
    return packet


def v311_packets() -> st.SearchStrategy[Packet]:
    return packets_after_connect().filter(lambda p: not isinstance(p, Auth))


def decode_all(data: bytes, version: ProtocolVersion | None, cuts: list[int] | None = None) -> list[Packet]:
    """Feed `data` to a fresh decoder in pieces cut at `cuts` (sorted offsets)."""
    decoder = Decoder(version=version)
    out: list[Packet] = []
    last = 0
    for cut in [*(cuts or []), len(data)]:
        out.extend(decoder.feed(data[last:cut]))
        last = cut
    assert decoder.buffered_bytes == 0
    return out


# --------------------------------------------------------------------------- tests


@RUN
@given(packets_after_connect())
def test_v5_roundtrip(packet: Packet) -> None:
    assert decode_all(encode(packet, V5), V5) == [packet]


@RUN
@given(v311_packets())
def test_v311_roundtrip_drops_what_311_cannot_carry(packet: Packet) -> None:
    assert decode_all(encode(packet, V311), V311) == [as_v311(packet)]


@RUN
@given(st.sampled_from([V31, V311, V5]).flatmap(lambda v: connects(v)))
def test_connect_roundtrip_sets_decoder_version(connect: Connect) -> None:
    version = connect.protocol_version
    expected = connect if version == V5 else as_v311(connect)
    decoder = Decoder()
    assert decoder.feed(encode(connect, version)) == [expected]
    assert decoder.version == version


@RUN
@given(st.data(), st.sampled_from([V311, V5]))
def test_session_split_at_random_boundaries(data: st.DataObject, version: ProtocolVersion) -> None:
    """A CONNECT and a run of packets, concatenated and cut anywhere, decode in order."""
    connect = data.draw(connects(version))
    strategy = packets_after_connect() if version == V5 else v311_packets()
    rest = data.draw(st.lists(strategy, max_size=8))
    wire = b"".join(encode(p, version) for p in [connect, *rest])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    expected = [connect, *rest] if version == V5 else [as_v311(p) for p in [connect, *rest]]
    assert decode_all(wire, None, cuts) == expected


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([V311, V5]).flatmap(lambda v: st.tuples(st.just(v), publishes())))
def test_publish_fed_one_byte_at_a_time(case: tuple[ProtocolVersion, Publish]) -> None:
    version, packet = case
    wire = encode(packet, version)
    expected = packet if version == V5 else as_v311(packet)
    assert decode_all(wire, version, list(range(1, len(wire)))) == [expected]


@RUN
@given(publishes(), st.sampled_from([V311, V5]))
def test_publish_split_matches_encode(packet: Publish, version: ProtocolVersion) -> None:
    block = encode_properties(packet.properties) if version == V5 else None
    head, tail = encode_publish_split(
        packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, block
    )
    pid = packet.packet_id.to_bytes(2, "big") if packet.qos else b""
    assert head + pid + tail == encode(packet, version)


def test_large_packet_roundtrip_with_four_byte_length() -> None:
    packet = Publish("big", b"\xab" * 2_100_000, 1, packet_id=9)
    wire = encode(packet, V5)
    assert all(b >= 0x80 for b in wire[1:4]) and wire[4] < 0x80  # a four-byte remaining length
    cuts = list(range(0, len(wire), 65_536))
    assert decode_all(wire, V5, cuts) == [packet]
