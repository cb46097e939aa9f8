"""MQTT data representations (spec 1.5) and the MQTT 5 property block (spec 2.2.2).

Why: the codec's packet encoders and decoders both need the same small set of field primitives
(Variable Byte Integer, UTF-8 string, binary data) and the same property table. They live here,
below `encode` and `decode`, so neither of those imports the other.

Must not: know about packet layouts beyond "which properties may this packet carry", do IO, or
read the clock.

Invariants:
- Readers take `(buf, pos, end)` and return `(value, new_pos)`; they never read at or past `end`
  and raise `MalformedPacket` when a field would run past it. `buf` is a `bytes` object that may
  hold many packets; `end` bounds the current packet (or property block).
- A property that is not valid for its packet type is a Malformed Packet, as spec 2.2.2.2 says
  ("contains an Identifier which is not valid for its packet type ... is a Malformed Packet").
  A property repeated where the spec allows it once is a Protocol Error, as are the out-of-range
  values the spec calls Protocol Errors (0 for Receive Maximum, Maximum Packet Size and
  Subscription Identifier; values other than 0/1 for the one-byte flags).
- An empty property block decodes to the shared `NO_PROPERTIES`, and `NO_PROPERTIES` encodes to
  b"\\x00", so the hot path never builds a `Properties` it does not need.
- Topic Alias 0 is *not* rejected here: alias bookkeeping (0 and > Topic Alias Maximum are both
  "Topic Alias invalid") belongs to the connection layer, which knows the negotiated maximum.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

from broker.protocol.errors import MalformedPacket, ProtocolError
from broker.protocol.packets import NO_PROPERTIES, Properties, PropertyId

VARINT_MAX: Final = 268_435_455
"""Largest value a four-byte Variable Byte Integer can carry."""

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_SMALL_VARINTS: Final = tuple(bytes((i,)) for i in range(128))


# --------------------------------------------------------------------------- primitives: encode


def encode_varint(n: int) -> bytes:
    """Variable Byte Integer, minimal length [MQTT-1.5.5-1]; ValueError outside 0..VARINT_MAX."""
    if 0 <= n < 128:
        return _SMALL_VARINTS[n]
    if n < 0 or n > VARINT_MAX:
        raise ValueError(f"{n} does not fit a Variable Byte Integer")
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_utf8(text: str) -> bytes:
    """UTF-8 Encoded String: two-byte length then the bytes (OverflowError past 65,535 bytes)."""
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def encode_binary(data: bytes) -> bytes:
    """Binary Data: two-byte length then the bytes (OverflowError past 65,535 bytes)."""
    return len(data).to_bytes(2, "big") + data


# --------------------------------------------------------------------------- primitives: decode


def read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Variable Byte Integer at `pos`: at most four bytes [MQTT-1.5.5-1], minimally encoded."""
    value = 0
    shift = 0
    for i in range(4):
        if pos >= end:
            raise MalformedPacket("Variable Byte Integer runs past the packet")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and i > 0:
                raise MalformedPacket("Variable Byte Integer not minimally encoded [MQTT-1.5.5-1]")
            return value, pos
        shift += 7
    raise MalformedPacket("Variable Byte Integer longer than four bytes [MQTT-1.5.5-1]")


def read_u16(buf: bytes, pos: int, end: int) -> int:
    """Two Byte Integer at `pos` (the caller advances by 2)."""
    if pos + 2 > end:
        raise MalformedPacket("Two Byte Integer runs past the packet")
    return (buf[pos] << 8) | buf[pos + 1]


def read_utf8(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    """UTF-8 Encoded String: well-formed [MQTT-1.5.4-1] and without U+0000 [MQTT-1.5.4-2].

    (3.1.1 numbers the same rules [MQTT-1.5.3-1] and [MQTT-1.5.3-2].) Python's strict UTF-8
    decoder already rejects overlong forms, surrogates (U+D800..U+DFFF) and code points past
    U+10FFFF, which is what "well-formed" means in the spec.
    """
    stop = pos + 2
    if stop > end:
        raise MalformedPacket("string length runs past the packet")
    stop += (buf[pos] << 8) | buf[pos + 1]
    if stop > end:
        raise MalformedPacket("string runs past the packet")
    try:
        text = buf[pos + 2 : stop].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("string is not well-formed UTF-8 [MQTT-1.5.4-1]") from None
    if "\x00" in text:
        raise MalformedPacket("string contains U+0000 [MQTT-1.5.4-2]")
    return text, stop


def read_binary(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    """Binary Data: two-byte length then that many bytes."""
    stop = pos + 2
    if stop > end:
        raise MalformedPacket("binary length runs past the packet")
    stop += (buf[pos] << 8) | buf[pos + 1]
    if stop > end:
        raise MalformedPacket("binary data runs past the packet")
    return buf[pos + 2 : stop], stop


# --------------------------------------------------------------------------- the property table

_BYTE, _U16_KIND, _U32_KIND, _VARINT, _STR, _BIN, _PAIR = range(7)
_FLAG = 1  # a one-byte property whose only legal values are 0 and 1
_NONZERO = 2  # a numeric property for which 0 is a Protocol Error


@dataclass(frozen=True, slots=True)
class _Spec:
    pid: int
    field: str
    kind: int
    check: int = 0


_SPECS: Final = (
    _Spec(PropertyId.PAYLOAD_FORMAT_INDICATOR, "payload_format_indicator", _BYTE, _FLAG),
    _Spec(PropertyId.MESSAGE_EXPIRY_INTERVAL, "message_expiry_interval_s", _U32_KIND),
    _Spec(PropertyId.CONTENT_TYPE, "content_type", _STR),
    _Spec(PropertyId.RESPONSE_TOPIC, "response_topic", _STR),
    _Spec(PropertyId.CORRELATION_DATA, "correlation_data", _BIN),
    _Spec(PropertyId.SUBSCRIPTION_IDENTIFIER, "subscription_identifiers", _VARINT, _NONZERO),
    _Spec(PropertyId.SESSION_EXPIRY_INTERVAL, "session_expiry_interval_s", _U32_KIND),
    _Spec(PropertyId.ASSIGNED_CLIENT_IDENTIFIER, "assigned_client_identifier", _STR),
    _Spec(PropertyId.SERVER_KEEP_ALIVE, "server_keep_alive_s", _U16_KIND),
    _Spec(PropertyId.AUTHENTICATION_METHOD, "authentication_method", _STR),
    _Spec(PropertyId.AUTHENTICATION_DATA, "authentication_data", _BIN),
    _Spec(PropertyId.REQUEST_PROBLEM_INFORMATION, "request_problem_information", _BYTE, _FLAG),
    _Spec(PropertyId.WILL_DELAY_INTERVAL, "will_delay_interval_s", _U32_KIND),
    _Spec(PropertyId.REQUEST_RESPONSE_INFORMATION, "request_response_information", _BYTE, _FLAG),
    _Spec(PropertyId.RESPONSE_INFORMATION, "response_information", _STR),
    _Spec(PropertyId.SERVER_REFERENCE, "server_reference", _STR),
    _Spec(PropertyId.REASON_STRING, "reason_string", _STR),
    _Spec(PropertyId.RECEIVE_MAXIMUM, "receive_maximum", _U16_KIND, _NONZERO),
    _Spec(PropertyId.TOPIC_ALIAS_MAXIMUM, "topic_alias_maximum", _U16_KIND),
    _Spec(PropertyId.TOPIC_ALIAS, "topic_alias", _U16_KIND),
    _Spec(PropertyId.MAXIMUM_QOS, "maximum_qos", _BYTE, _FLAG),
    _Spec(PropertyId.RETAIN_AVAILABLE, "retain_available", _BYTE, _FLAG),
    _Spec(PropertyId.USER_PROPERTY, "user_properties", _PAIR),
    _Spec(PropertyId.MAXIMUM_PACKET_SIZE, "maximum_packet_bytes", _U32_KIND, _NONZERO),
    _Spec(PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE, "wildcard_subscription_available", _BYTE, _FLAG),
    _Spec(
        PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        "subscription_identifier_available",
        _BYTE,
        _FLAG,
    ),
    _Spec(PropertyId.SHARED_SUBSCRIPTION_AVAILABLE, "shared_subscription_available", _BYTE, _FLAG),
)

_BY_ID: Final[tuple[_Spec | None, ...]] = tuple(
    next((s for s in _SPECS if s.pid == i), None) for i in range(max(s.pid for s in _SPECS) + 1)
)


@dataclass(frozen=True, slots=True)
class PropertySet:
    """Which properties one packet type may carry (spec 2.2.2.2), as a bit mask of ids."""

    packet_name: str
    mask: int
    subscription_id_repeats: bool = False  # only PUBLISH carries several [MQTT-3.3.4-3]

    def allows(self, pid: int) -> bool:
        return bool(self.mask >> pid & 1)


def _set(name: str, *ids: PropertyId, repeats: bool = False) -> PropertySet:
    mask = 0
    for pid in ids:
        mask |= 1 << pid
    return PropertySet(name, mask, repeats)


P = PropertyId
CONNECT_PROPS: Final = _set(
    "CONNECT", P.SESSION_EXPIRY_INTERVAL, P.AUTHENTICATION_METHOD, P.AUTHENTICATION_DATA,
    P.REQUEST_PROBLEM_INFORMATION, P.REQUEST_RESPONSE_INFORMATION, P.RECEIVE_MAXIMUM,
    P.TOPIC_ALIAS_MAXIMUM, P.USER_PROPERTY, P.MAXIMUM_PACKET_SIZE,
)  # fmt: skip
WILL_PROPS: Final = _set(
    "Will", P.PAYLOAD_FORMAT_INDICATOR, P.MESSAGE_EXPIRY_INTERVAL, P.CONTENT_TYPE,
    P.RESPONSE_TOPIC, P.CORRELATION_DATA, P.WILL_DELAY_INTERVAL, P.USER_PROPERTY,
)  # fmt: skip
CONNACK_PROPS: Final = _set(
    "CONNACK", P.SESSION_EXPIRY_INTERVAL, P.ASSIGNED_CLIENT_IDENTIFIER, P.SERVER_KEEP_ALIVE,
    P.AUTHENTICATION_METHOD, P.AUTHENTICATION_DATA, P.RESPONSE_INFORMATION, P.SERVER_REFERENCE,
    P.REASON_STRING, P.RECEIVE_MAXIMUM, P.TOPIC_ALIAS_MAXIMUM, P.MAXIMUM_QOS,
    P.RETAIN_AVAILABLE, P.USER_PROPERTY, P.MAXIMUM_PACKET_SIZE,
    P.WILDCARD_SUBSCRIPTION_AVAILABLE, P.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    P.SHARED_SUBSCRIPTION_AVAILABLE,
)  # fmt: skip
PUBLISH_PROPS: Final = _set(
    "PUBLISH", P.PAYLOAD_FORMAT_INDICATOR, P.MESSAGE_EXPIRY_INTERVAL, P.CONTENT_TYPE,
    P.RESPONSE_TOPIC, P.CORRELATION_DATA, P.SUBSCRIPTION_IDENTIFIER, P.TOPIC_ALIAS,
    P.USER_PROPERTY, repeats=True,
)  # fmt: skip
PUBACK_PROPS: Final = _set("PUBACK", P.REASON_STRING, P.USER_PROPERTY)
PUBREC_PROPS: Final = _set("PUBREC", P.REASON_STRING, P.USER_PROPERTY)
PUBREL_PROPS: Final = _set("PUBREL", P.REASON_STRING, P.USER_PROPERTY)
PUBCOMP_PROPS: Final = _set("PUBCOMP", P.REASON_STRING, P.USER_PROPERTY)
SUBSCRIBE_PROPS: Final = _set("SUBSCRIBE", P.SUBSCRIPTION_IDENTIFIER, P.USER_PROPERTY)
SUBACK_PROPS: Final = _set("SUBACK", P.REASON_STRING, P.USER_PROPERTY)
UNSUBSCRIBE_PROPS: Final = _set("UNSUBSCRIBE", P.USER_PROPERTY)
UNSUBACK_PROPS: Final = _set("UNSUBACK", P.REASON_STRING, P.USER_PROPERTY)
DISCONNECT_PROPS: Final = _set(
    "DISCONNECT", P.SESSION_EXPIRY_INTERVAL, P.SERVER_REFERENCE, P.REASON_STRING, P.USER_PROPERTY
)
AUTH_PROPS: Final = _set(
    "AUTH", P.AUTHENTICATION_METHOD, P.AUTHENTICATION_DATA, P.REASON_STRING, P.USER_PROPERTY
)
del P


# --------------------------------------------------------------------------- property block


def encode_properties(props: Properties) -> bytes:
    """Property block incl. its Variable Byte Integer length (b"\\x00" for NO_PROPERTIES).

    Emits properties in identifier order, user properties in their given order. Does not check
    which packet may carry them: the caller builds `Properties` for a packet it knows.
    """
    if props is NO_PROPERTIES:
        return b"\x00"
    parts: list[bytes] = []
    for spec in _SPECS:
        value = getattr(props, spec.field)
        if value is None or value == ():
            continue
        head = _SMALL_VARINTS[spec.pid]
        kind = spec.kind
        if kind == _BYTE:
            parts.append(head + bytes((value,)))
        elif kind == _U16_KIND:
            parts.append(head + _U16.pack(value))
        elif kind == _U32_KIND:
            parts.append(head + _U32.pack(value))
        elif kind == _STR:
            parts.append(head + encode_utf8(value))
        elif kind == _BIN:
            parts.append(head + encode_binary(value))
        elif kind == _VARINT:
            parts.extend(head + encode_varint(v) for v in value)
        else:  # _PAIR
            parts.extend(head + encode_utf8(k) + encode_utf8(v) for k, v in value)
    body = b"".join(parts)
    return encode_varint(len(body)) + body


def decode_properties(buf: bytes, pos: int, end: int, allowed: PropertySet) -> tuple[Properties, int]:
    """Property block at `pos` (length prefix included), bounded by `end`."""
    length, pos = read_varint(buf, pos, end)
    if length == 0:
        return NO_PROPERTIES, pos
    stop = pos + length
    if stop > end:
        raise MalformedPacket("property length runs past the packet")
    values: dict[str, Any] = {}
    user: list[tuple[str, str]] = []
    sub_ids: list[int] = []
    by_id = _BY_ID
    while pos < stop:
        pid = buf[pos]
        pos += 1
        spec = by_id[pid] if pid < len(by_id) else None
        if spec is None:
            raise MalformedPacket(f"unknown property identifier 0x{pid:02X}")
        if not allowed.mask >> pid & 1:
            raise MalformedPacket(f"property {spec.field} not valid in {allowed.packet_name}")
        kind = spec.kind
        value: Any
        if kind == _BYTE:
            if pos >= stop:
                raise MalformedPacket("property value runs past the property block")
            value = buf[pos]
            pos += 1
        elif kind == _U16_KIND:
            value = read_u16(buf, pos, stop)
            pos += 2
        elif kind == _U32_KIND:
            if pos + 4 > stop:
                raise MalformedPacket("property value runs past the property block")
            value = _U32.unpack_from(buf, pos)[0]
            pos += 4
        elif kind == _STR:
            value, pos = read_utf8(buf, pos, stop)
        elif kind == _BIN:
            value, pos = read_binary(buf, pos, stop)
        elif kind == _VARINT:
            value, pos = read_varint(buf, pos, stop)
        else:  # _PAIR: User Property, may repeat [MQTT-3.3.2-18]
            key, pos = read_utf8(buf, pos, stop)
            val, pos = read_utf8(buf, pos, stop)
            user.append((key, val))
            continue
        check = spec.check
        if check == _FLAG and value > 1:
            raise ProtocolError(f"property {spec.field} must be 0 or 1, got {value}")
        if check == _NONZERO and value == 0:
            raise ProtocolError(f"property {spec.field} must not be 0")
        if kind == _VARINT:  # Subscription Identifier
            if sub_ids and not allowed.subscription_id_repeats:
                raise ProtocolError(f"subscription identifier repeated in {allowed.packet_name}")
            sub_ids.append(value)
            continue
        if spec.field in values:
            raise ProtocolError(f"property {spec.field} included more than once")
        values[spec.field] = value
    if user:
        values["user_properties"] = tuple(user)
    if sub_ids:
        values["subscription_identifiers"] = tuple(sub_ids)
    return Properties(**values), pos
