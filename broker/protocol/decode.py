"""Wire bytes of one complete packet to a packet value, for MQTT 3.1 / 3.1.1 and 5.0.

Why: the per-packet half of the decoder. `codec.Decoder` finds packet boundaries and calls
exactly one function from a table here per packet; this module checks everything the spec says a
receiver must check *inside* a packet and builds the value.

Must not: buffer bytes, know about the connection's state (except "has CONNECT been seen",
which selects the table), check topic-name / topic-filter rules (`broker.protocol.topics`
does that in the connection layer), or check reason codes against per-packet sets.

Invariants:
- Every function has the signature `(flags, buf, start, end) -> Packet`, where `flags` is the low
  nibble of the fixed header and `buf[start:end]` is exactly the packet's remaining bytes. It
  reads nothing outside that range and raises only `MQTTError` subclasses.
- Trailing bytes after the last field are a Malformed Packet: each packet must be consumed
  exactly.
- Fixed-header flags other than the spec's are Malformed [MQTT-2.1.3-1] (3.1.1:
  [MQTT-2.2.2-1], [MQTT-2.2.2-2]).
- Subscription options with Maximum QoS 3 are a Protocol Error in 5.0 (spec 3.8.3.1 says so in
  words) and Malformed in 3.1.1 [MQTT-3.8.3-4]; reserved option bits are Malformed in both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NoReturn

from broker.protocol.errors import (
    MalformedPacket,
    ProtocolError,
    UnsupportedProtocolVersion,
)
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
    WILL_PROPS,
    PropertySet,
    decode_properties,
    read_binary,
    read_u16,
    read_utf8,
)

PacketDecoder = Callable[[int, bytes, int, int], Packet]

_NAMES: Final = (
    "reserved", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
    "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT", "AUTH",
)  # fmt: skip


def _check_flags(flags: int, expected: int, name: str) -> None:
    if flags != expected:
        raise MalformedPacket(f"{name} fixed-header flags 0x{flags:X}, must be 0x{expected:X} [MQTT-2.1.3-1]")


def _props(buf: bytes, pos: int, end: int, allowed: PropertySet) -> tuple[Properties, int]:
    if pos < end and buf[pos] == 0:
        return NO_PROPERTIES, pos + 1
    return decode_properties(buf, pos, end, allowed)


def _done(pos: int, end: int, name: str) -> None:
    if pos != end:
        raise MalformedPacket(f"{end - pos} unexpected trailing bytes in {name}")


def _packet_id(buf: bytes, pos: int, end: int, name: str) -> int:
    """A packet id that must be non-zero [MQTT-2.2.1-3] (3.1.1: [MQTT-2.3.1-1])."""
    packet_id = read_u16(buf, pos, end)
    if packet_id == 0:
        raise ProtocolError(f"{name} with packet identifier 0 [MQTT-2.2.1-3]")
    return packet_id


# --------------------------------------------------------------------------- PUBLISH (hot path)


def _publish_error(flags: int, buf: bytes, start: int, end: int) -> NoReturn:
    """Work out which rule a PUBLISH broke; kept off the fast path."""
    qos = flags >> 1 & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3 [MQTT-3.3.1-4]")
    if qos == 0 and flags & 8:
        raise MalformedPacket("PUBLISH with DUP=1 and QoS 0 [MQTT-3.3.1-2]")
    _, pos = read_utf8(buf, start, end)
    if qos:
        _packet_id(buf, pos, end, "PUBLISH")
    raise MalformedPacket("PUBLISH variable header runs past the packet")


def decode_publish_v311(flags: int, buf: bytes, start: int, end: int) -> Publish:
    pos = start + 2
    if pos <= end:
        pos += (buf[start] << 8) | buf[start + 1]
    if pos > end or flags & 6 == 6 or flags & 14 == 8:
        _publish_error(flags, buf, start, end)
    try:
        topic = buf[start + 2 : pos].decode()
    except UnicodeDecodeError:
        raise MalformedPacket("topic is not well-formed UTF-8 [MQTT-1.5.4-1]") from None
    if "\x00" in topic:
        raise MalformedPacket("topic contains U+0000 [MQTT-1.5.4-2]")
    if flags & 6:
        if pos + 2 > end or not (buf[pos] | buf[pos + 1]):
            _publish_error(flags, buf, start, end)
        return Publish(
            topic, buf[pos + 2 : end], flags >> 1 & 3, flags & 1 == 1, flags & 8 == 8,
            (buf[pos] << 8) | buf[pos + 1], NO_PROPERTIES,
        )  # fmt: skip
    return Publish(topic, buf[pos:end], 0, flags & 1 == 1, False, 0, NO_PROPERTIES)


def decode_publish_v5(flags: int, buf: bytes, start: int, end: int) -> Publish:
    pos = start + 2
    if pos <= end:
        pos += (buf[start] << 8) | buf[start + 1]
    if pos > end or flags & 6 == 6 or flags & 14 == 8:
        _publish_error(flags, buf, start, end)
    try:
        topic = buf[start + 2 : pos].decode()
    except UnicodeDecodeError:
        raise MalformedPacket("topic is not well-formed UTF-8 [MQTT-1.5.4-1]") from None
    if "\x00" in topic:
        raise MalformedPacket("topic contains U+0000 [MQTT-1.5.4-2]")
    packet_id = 0
    if flags & 6:
        if pos + 2 > end or not (buf[pos] | buf[pos + 1]):
            _publish_error(flags, buf, start, end)
        packet_id = (buf[pos] << 8) | buf[pos + 1]
        pos += 2
    if pos < end and buf[pos] == 0:
        props = NO_PROPERTIES
        pos += 1
    else:
        props, pos = decode_properties(buf, pos, end, PUBLISH_PROPS)
    return Publish(topic, buf[pos:end], flags >> 1 & 3, flags & 1 == 1, flags & 8 == 8, packet_id, props)


# --------------------------------------------------------------------------- CONNECT / CONNACK

_LEVELS: Final = {"MQTT": (4, 5), "MQIsdp": (3,)}


def decode_connect(flags: int, buf: bytes, start: int, end: int) -> Connect:
    """CONNECT of any version; the protocol level on the wire decides the layout."""
    _check_flags(flags, 0, "CONNECT")
    name, pos = read_utf8(buf, start, end)
    levels = _LEVELS.get(name)
    if levels is None:
        raise ProtocolError(f"unknown protocol name {name!r} [MQTT-3.1.2-1]")
    if pos >= end:
        raise MalformedPacket("CONNECT ends before the protocol level")
    level = buf[pos]
    if level not in levels:
        raise UnsupportedProtocolVersion(f"protocol {name!r} level {level} not supported [MQTT-3.1.2-2]")
    version = ProtocolVersion(level)
    v5 = version == ProtocolVersion.V5
    if pos + 4 > end:
        raise MalformedPacket("CONNECT variable header runs past the packet")
    connect_flags = buf[pos + 1]
    keepalive_s = (buf[pos + 2] << 8) | buf[pos + 3]
    pos += 4
    if connect_flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag set [MQTT-3.1.2-3]")
    will_flag = connect_flags & 0x04
    will_qos = connect_flags >> 3 & 3
    will_retain = connect_flags & 0x20 == 0x20
    if will_flag:
        if will_qos == 3:
            # 5.0 [MQTT-3.1.2-12]; 3.1.1 [MQTT-3.1.2-14]
            raise MalformedPacket("CONNECT will QoS 3 [MQTT-3.1.2-12]")
    elif will_qos:
        # 5.0 [MQTT-3.1.2-11]; 3.1.1 [MQTT-3.1.2-13]
        raise MalformedPacket("CONNECT will QoS set without will flag [MQTT-3.1.2-11]")
    elif will_retain:
        # 5.0 [MQTT-3.1.2-13]; 3.1.1 [MQTT-3.1.2-15]
        raise MalformedPacket("CONNECT will retain set without will flag [MQTT-3.1.2-13]")
    has_username = connect_flags & 0x80
    has_password = connect_flags & 0x40
    if has_password and not has_username and not v5:
        raise MalformedPacket("3.1.1 CONNECT password flag without user name flag [MQTT-3.1.2-22]")
    properties = NO_PROPERTIES
    if v5:
        properties, pos = _props(buf, pos, end, CONNECT_PROPS)
    # Payload order: client id, will properties, will topic, will payload, user name, password.
    client_id, pos = read_utf8(buf, pos, end)
    will = None
    if will_flag:
        will_props = NO_PROPERTIES
        if v5:
            will_props, pos = _props(buf, pos, end, WILL_PROPS)
        will_topic, pos = read_utf8(buf, pos, end)
        will_payload, pos = read_binary(buf, pos, end)
        will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
    username = password = None
    if has_username:
        username, pos = read_utf8(buf, pos, end)
    if has_password:
        password, pos = read_binary(buf, pos, end)
    _done(pos, end, "CONNECT")
    return Connect(
        client_id, version, connect_flags & 0x02 == 0x02, keepalive_s, will, username, password,
        properties, name,
    )  # fmt: skip


def _connack(flags: int, buf: bytes, start: int, end: int, v5: bool) -> Connack:
    _check_flags(flags, 0, "CONNACK")
    if start + 2 > end:
        raise MalformedPacket("CONNACK shorter than 2 bytes")
    ack_flags = buf[start]
    if ack_flags & 0xFE:
        raise MalformedPacket("CONNACK reserved acknowledge flags set [MQTT-3.2.2-1]")
    pos = start + 2
    properties = NO_PROPERTIES
    if v5:
        properties, pos = _props(buf, pos, end, CONNACK_PROPS)
    _done(pos, end, "CONNACK")
    return Connack(ack_flags == 1, buf[start + 1], properties)


# --------------------------------------------------------------------------- acks

_AckClass = type[Puback] | type[Pubrec] | type[Pubrel] | type[Pubcomp]


def _ack_decoders(cls: _AckClass, expected_flags: int, allowed: PropertySet) -> tuple[
    PacketDecoder, PacketDecoder
]:  # fmt: skip
    name = allowed.packet_name

    def v311(flags: int, buf: bytes, start: int, end: int) -> Packet:
        _check_flags(flags, expected_flags, name)
        if end - start != 2:
            raise MalformedPacket(f"3.1.1 {name} remaining length {end - start}, must be 2")
        return cls((buf[start] << 8) | buf[start + 1], 0, NO_PROPERTIES)

    def v5(flags: int, buf: bytes, start: int, end: int) -> Packet:
        _check_flags(flags, expected_flags, name)
        packet_id = read_u16(buf, start, end)
        length = end - start
        if length == 2:  # reason code 0, no properties (spec 3.4.2.1)
            return cls(packet_id, 0, NO_PROPERTIES)
        if length == 3:  # no property length: no properties
            return cls(packet_id, buf[start + 2], NO_PROPERTIES)
        properties, pos = _props(buf, start + 3, end, allowed)
        _done(pos, end, name)
        return cls(packet_id, buf[start + 2], properties)

    return v311, v5


_PUBACK = _ack_decoders(Puback, 0, PUBACK_PROPS)
_PUBREC = _ack_decoders(Pubrec, 0, PUBREC_PROPS)
_PUBREL = _ack_decoders(Pubrel, 0b0010, PUBREL_PROPS)  # [MQTT-3.6.1-1]
_PUBCOMP = _ack_decoders(Pubcomp, 0, PUBCOMP_PROPS)


# --------------------------------------------------------------------------- (un)subscribe


def _subscribe(flags: int, buf: bytes, start: int, end: int, v5: bool) -> Subscribe:
    _check_flags(flags, 0b0010, "SUBSCRIBE")  # [MQTT-3.8.1-1]
    packet_id = _packet_id(buf, start, end, "SUBSCRIBE")
    pos = start + 2
    properties = NO_PROPERTIES
    if v5:
        properties, pos = _props(buf, pos, end, SUBSCRIBE_PROPS)
    subscriptions: list[Subscription] = []
    while pos < end:
        topic_filter, pos = read_utf8(buf, pos, end)
        if pos >= end:
            raise MalformedPacket("SUBSCRIBE topic filter without subscription options")
        options = buf[pos]
        pos += 1
        qos = options & 3
        if v5:
            if options & 0xC0:
                raise MalformedPacket("SUBSCRIBE reserved option bits set [MQTT-3.8.3-5]")
            if qos == 3:
                raise ProtocolError("SUBSCRIBE maximum QoS 3 (spec 3.8.3.1)")
            retain_handling = options >> 4 & 3
            if retain_handling == 3:
                raise ProtocolError("SUBSCRIBE retain handling 3 (spec 3.8.3.1)")
            subscriptions.append(
                Subscription(
                    topic_filter,
                    qos,
                    options & 0x04 == 0x04,
                    options & 0x08 == 0x08,
                    retain_handling,
                )
            )
        else:
            if options & 0xFC or qos == 3:
                raise MalformedPacket("SUBSCRIBE reserved option bits or QoS 3 [MQTT-3.8.3-4]")
            subscriptions.append(Subscription(topic_filter, qos))
    if not subscriptions:
        # 5.0 [MQTT-3.8.3-2]; 3.1.1 [MQTT-3.8.3-3]
        raise ProtocolError("SUBSCRIBE without any topic filter [MQTT-3.8.3-2]")
    return Subscribe(packet_id, tuple(subscriptions), properties)


def _suback(flags: int, buf: bytes, start: int, end: int, v5: bool) -> Suback:
    _check_flags(flags, 0, "SUBACK")
    packet_id = read_u16(buf, start, end)
    pos = start + 2
    properties = NO_PROPERTIES
    if v5:
        properties, pos = _props(buf, pos, end, SUBACK_PROPS)
    if pos >= end:
        raise MalformedPacket("SUBACK without reason codes")
    return Suback(packet_id, tuple(buf[pos:end]), properties)


def _unsubscribe(flags: int, buf: bytes, start: int, end: int, v5: bool) -> Unsubscribe:
    _check_flags(flags, 0b0010, "UNSUBSCRIBE")  # [MQTT-3.10.1-1]
    packet_id = _packet_id(buf, start, end, "UNSUBSCRIBE")
    pos = start + 2
    properties = NO_PROPERTIES
    if v5:
        properties, pos = _props(buf, pos, end, UNSUBSCRIBE_PROPS)
    topic_filters: list[str] = []
    while pos < end:
        topic_filter, pos = read_utf8(buf, pos, end)
        topic_filters.append(topic_filter)
    if not topic_filters:
        raise ProtocolError("UNSUBSCRIBE without any topic filter [MQTT-3.10.3-2]")
    return Unsubscribe(packet_id, tuple(topic_filters), properties)


def _unsuback(flags: int, buf: bytes, start: int, end: int, v5: bool) -> Unsuback:
    _check_flags(flags, 0, "UNSUBACK")
    packet_id = read_u16(buf, start, end)
    if not v5:
        _done(start + 2, end, "UNSUBACK")
        return Unsuback(packet_id)
    properties, pos = _props(buf, start + 2, end, UNSUBACK_PROPS)
    if pos >= end:
        raise MalformedPacket("UNSUBACK without reason codes")
    return Unsuback(packet_id, tuple(buf[pos:end]), properties)


# --------------------------------------------------------------------------- small packets


def _pingreq(flags: int, buf: bytes, start: int, end: int) -> Pingreq:
    _check_flags(flags, 0, "PINGREQ")
    _done(start, end, "PINGREQ")
    return Pingreq()


def _pingresp(flags: int, buf: bytes, start: int, end: int) -> Pingresp:
    _check_flags(flags, 0, "PINGRESP")
    _done(start, end, "PINGRESP")
    return Pingresp()


def _reason_and_props(buf: bytes, start: int, end: int, allowed: PropertySet) -> tuple[int, Properties]:
    """DISCONNECT / AUTH body: empty means reason 0; one byte means no properties."""
    if start == end:
        return 0, NO_PROPERTIES
    if start + 1 == end:
        return buf[start], NO_PROPERTIES
    properties, pos = _props(buf, start + 1, end, allowed)
    _done(pos, end, allowed.packet_name)
    return buf[start], properties


def _disconnect_v311(flags: int, buf: bytes, start: int, end: int) -> Disconnect:
    _check_flags(flags, 0, "DISCONNECT")
    _done(start, end, "DISCONNECT")
    return Disconnect()


def _disconnect_v5(flags: int, buf: bytes, start: int, end: int) -> Disconnect:
    _check_flags(flags, 0, "DISCONNECT")
    return Disconnect(*_reason_and_props(buf, start, end, DISCONNECT_PROPS))


def _auth_v5(flags: int, buf: bytes, start: int, end: int) -> Auth:
    _check_flags(flags, 0, "AUTH")
    return Auth(*_reason_and_props(buf, start, end, AUTH_PROPS))


def _reserved(flags: int, buf: bytes, start: int, end: int) -> NoReturn:
    raise MalformedPacket("reserved control packet type")


def _auth_v311(flags: int, buf: bytes, start: int, end: int) -> NoReturn:
    raise MalformedPacket("packet type 15 is reserved in MQTT 3.1.1")


def _not_connected(ptype: int) -> PacketDecoder:
    def reject(flags: int, buf: bytes, start: int, end: int) -> NoReturn:
        raise ProtocolError(f"{_NAMES[ptype]} before CONNECT [MQTT-3.1.0-1]")

    return reject


# --------------------------------------------------------------------------- tables


def _table(v5: bool) -> tuple[PacketDecoder, ...]:
    i = 1 if v5 else 0
    return (
        _reserved,
        decode_connect,
        lambda f, b, s, e: _connack(f, b, s, e, v5),
        decode_publish_v5 if v5 else decode_publish_v311,
        _PUBACK[i],
        _PUBREC[i],
        _PUBREL[i],
        _PUBCOMP[i],
        lambda f, b, s, e: _subscribe(f, b, s, e, v5),
        lambda f, b, s, e: _suback(f, b, s, e, v5),
        lambda f, b, s, e: _unsubscribe(f, b, s, e, v5),
        lambda f, b, s, e: _unsuback(f, b, s, e, v5),
        _pingreq,
        _pingresp,
        _disconnect_v5 if v5 else _disconnect_v311,
        _auth_v5 if v5 else _auth_v311,
    )


DECODERS_V311: Final = _table(v5=False)
"""Packet decoders by packet type for 3.1 and 3.1.1."""
DECODERS_V5: Final = _table(v5=True)
"""Packet decoders by packet type for 5.0."""
DECODERS_BEFORE_CONNECT: Final[tuple[PacketDecoder, ...]] = (
    _reserved,
    decode_connect,
    *(_not_connected(t) for t in range(2, 16)),
)
"""Before CONNECT only CONNECT decodes; anything else is a Protocol Error [MQTT-3.1.0-1]."""
