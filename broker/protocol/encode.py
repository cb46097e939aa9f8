"""Packet values to wire bytes, for MQTT 3.1 / 3.1.1 and 5.0.

Why: the one place that writes the MQTT wire format; the broker's delivery loop, the tests and the
load generator all send through it.

Must not: validate what the caller decided (topic rules, reason code sets, which side may send
which packet); do IO; read the clock. Values that cannot be written at all (a string past 65,535
bytes, a packet past the Variable Byte Integer range, AUTH in 3.1.1) raise ValueError or
OverflowError: those are bugs in the caller, not peer errors, so they are not `MQTTError`s.

Invariants:
- `encode(p, v)` decodes back to `p` under version `v`, after dropping what `v` cannot carry:
  3.1.1 has no properties, no reason codes on PUBACK/PUBREC/PUBREL/PUBCOMP/UNSUBACK/DISCONNECT,
  and only the QoS in subscription options.
- MQTT 5 acks, DISCONNECT and AUTH use the short forms the spec allows (reason code and property
  length omitted when they are 0 / empty), so a plain PUBACK is 4 bytes in both versions.
- CONNECT's protocol name and level come from the `version` argument ("MQIsdp"/3 for V31), not
  from the packet's own fields, so what we write always matches how we encode the rest.
- CONNACK's `reason_code` is written as is; mapping a 5.0 reason to a 3.1.1 return code
  (`reasons.connack_code_v311`) is the caller's decision.
"""

from __future__ import annotations

from collections.abc import Callable

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
    Unsuback,
    Unsubscribe,
)
from broker.protocol.properties import (
    encode_binary,
    encode_properties,
    encode_utf8,
    encode_varint,
)

_V5 = ProtocolVersion.V5


def _frame(first_byte: int, body: bytes) -> bytes:
    n = len(body)
    if n < 128:
        return bytes((first_byte, n)) + body
    return bytes((first_byte,)) + encode_varint(n) + body


def _props(props: Properties) -> bytes:
    return b"\x00" if props is NO_PROPERTIES else encode_properties(props)


def encode_publish_split(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    properties_block: bytes | None,
) -> tuple[bytes, bytes]:
    """PUBLISH as (head, tail); the packet is head + [packet id if qos] + tail.

    `head` is the fixed header and topic; `tail` is the property block (5.0) and the payload. The
    remaining length in `head` already counts the two packet-id bytes when qos > 0, so the
    broker builds head and tail once per message and only splices in each subscriber's id.
    """
    raw_topic = topic.encode("utf-8")
    topic_len = len(raw_topic)
    tail = payload if properties_block is None else properties_block + payload
    remaining = 2 + topic_len + len(tail)
    if qos:
        remaining += 2
    first = 0x30 | (qos << 1)
    if retain:
        first |= 0x01
    if dup:
        first |= 0x08
    if remaining < 128:
        head = bytes((first, remaining, topic_len >> 8, topic_len & 0xFF)) + raw_topic
    else:
        head = bytes((first,)) + encode_varint(remaining) + topic_len.to_bytes(2, "big") + raw_topic
    return head, tail


def _publish(p: Publish, v5: bool) -> bytes:
    head, tail = encode_publish_split(
        p.topic, p.payload, p.qos, p.retain, p.dup, _props(p.properties) if v5 else None
    )
    if p.qos:
        return head + p.packet_id.to_bytes(2, "big") + tail
    return head + tail


def _connect(p: Connect, version: ProtocolVersion) -> bytes:
    v5 = version == _V5
    flags = 0x02 if p.clean_start else 0
    will = p.will
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if p.password is not None:
        if not v5 and p.username is None:
            raise ValueError("3.1.1 CONNECT cannot carry a password without a user name")
        flags |= 0x40
    if p.username is not None:
        flags |= 0x80
    name = "MQIsdp" if version == ProtocolVersion.V31 else "MQTT"
    parts = [encode_utf8(name), bytes((int(version), flags)), p.keepalive_s.to_bytes(2, "big")]
    if v5:
        parts.append(_props(p.properties))
    parts.append(encode_utf8(p.client_id))
    if will is not None:
        if v5:
            parts.append(_props(will.properties))
        parts.append(encode_utf8(will.topic))
        parts.append(encode_binary(will.payload))
    if p.username is not None:
        parts.append(encode_utf8(p.username))
    if p.password is not None:
        parts.append(encode_binary(p.password))
    return _frame(0x10, b"".join(parts))


def _connack(p: Connack, v5: bool) -> bytes:
    body = bytes((0x01 if p.session_present else 0x00, p.reason_code))
    if v5:
        body += _props(p.properties)
    return _frame(0x20, body)


def _ack(first_byte: int, p: Puback | Pubrec | Pubrel | Pubcomp, v5: bool) -> bytes:
    packet_id = p.packet_id.to_bytes(2, "big")
    if not v5:
        return bytes((first_byte, 2)) + packet_id
    block = _props(p.properties)
    if block == b"\x00":
        if p.reason_code == 0:
            return bytes((first_byte, 2)) + packet_id
        return bytes((first_byte, 3)) + packet_id + bytes((p.reason_code,))
    return _frame(first_byte, packet_id + bytes((p.reason_code,)) + block)


def _subscribe(p: Subscribe, v5: bool) -> bytes:
    parts = [p.packet_id.to_bytes(2, "big")]
    if v5:
        parts.append(_props(p.properties))
    for sub in p.subscriptions:
        options = sub.qos
        if v5:
            options |= (
                (0x04 if sub.no_local else 0)
                | (0x08 if sub.retain_as_published else 0)
                | (sub.retain_handling << 4)
            )
        parts.append(encode_utf8(sub.topic_filter))
        parts.append(bytes((options,)))
    return _frame(0x82, b"".join(parts))


def _suback(p: Suback, v5: bool) -> bytes:
    head = p.packet_id.to_bytes(2, "big")
    if v5:
        head += _props(p.properties)
    return _frame(0x90, head + bytes(p.reason_codes))


def _unsubscribe(p: Unsubscribe, v5: bool) -> bytes:
    parts = [p.packet_id.to_bytes(2, "big")]
    if v5:
        parts.append(_props(p.properties))
    parts.extend(encode_utf8(f) for f in p.topic_filters)
    return _frame(0xA2, b"".join(parts))


def _unsuback(p: Unsuback, v5: bool) -> bytes:
    head = p.packet_id.to_bytes(2, "big")
    if not v5:
        return b"\xb0\x02" + head
    return _frame(0xB0, head + _props(p.properties) + bytes(p.reason_codes))


def _disconnect(p: Disconnect, v5: bool) -> bytes:
    if not v5:
        return b"\xe0\x00"
    block = _props(p.properties)
    if block == b"\x00":
        if p.reason_code == 0:
            return b"\xe0\x00"
        return bytes((0xE0, 1, p.reason_code))
    return _frame(0xE0, bytes((p.reason_code,)) + block)


def _auth(p: Auth, v5: bool) -> bytes:
    if not v5:
        raise ValueError("AUTH does not exist in MQTT 3.1.1")
    block = _props(p.properties)
    if block == b"\x00" and p.reason_code == 0:
        return b"\xf0\x00"
    return _frame(0xF0, bytes((p.reason_code,)) + block)


_ENCODERS: dict[type, Callable[..., bytes]] = {
    Publish: _publish,
    Puback: lambda p, v5: _ack(0x40, p, v5),
    Pubrec: lambda p, v5: _ack(0x50, p, v5),
    Pubrel: lambda p, v5: _ack(0x62, p, v5),  # fixed flags 0b0010 [MQTT-3.6.1-1]
    Pubcomp: lambda p, v5: _ack(0x70, p, v5),
    Connack: _connack,
    Subscribe: _subscribe,
    Suback: _suback,
    Unsubscribe: _unsubscribe,
    Unsuback: _unsuback,
    Pingreq: lambda p, v5: b"\xc0\x00",
    Pingresp: lambda p, v5: b"\xd0\x00",
    Disconnect: _disconnect,
    Auth: _auth,
}


def encode(packet: Packet, version: ProtocolVersion) -> bytes:
    """Any packet to wire bytes for `version` (V31 and V311 share the 3.1.1 layout)."""
    if isinstance(packet, Connect):
        return _connect(packet, version)
    return _ENCODERS[type(packet)](packet, version == _V5)
