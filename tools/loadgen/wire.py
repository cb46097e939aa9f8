"""The few raw MQTT encoders and buffer scanners the load generator needs.

Why: the generator must cost far less CPU per message than the broker it measures, so it does
not decode packets into objects. It writes pre-encoded bytes and, on the receiving side, walks
fixed headers (type byte + Remaining Length) through the received buffer, looking inside a
packet only where the scenario needs it (a packet id to acknowledge, a timestamp to subtract).
It is deliberately independent of `broker.protocol.codec`: a bug in the broker's codec must
not hide behind the same bug in the tool that measures it.

Must not: do IO, read the clock, or validate what the broker sends beyond what a measurement
needs. It is not a conformant client library; the broker's own tests are where conformance
lives.

Invariants:
- Every scanner returns the index of the first byte it did not consume; bytes from there on
  are an incomplete packet that the caller keeps and prepends to the next chunk.
- Payloads built here start with two big-endian u64 fields (`stamp`, `seq`) and are padded to
  the requested size; scanners read those two fields back.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MQTT_311 = 4
MQTT_5 = 5

PUBLISH = 3
PUBACK = 4
CONNACK = 2
SUBACK = 9
PINGRESP = 13
DISCONNECT = 14

PAYLOAD_HEAD_BYTES = 16  # stamp (u64) + seq (u64)
_HEAD = struct.Struct(">QQ")

DISCONNECT_PACKET = b"\xe0\x00"
PINGREQ_PACKET = b"\xc0\x00"


class WireError(Exception):
    """The broker sent bytes this generator cannot walk (malformed Remaining Length)."""


def varint(value: int) -> bytes:
    """Remaining Length / property length encoding (MQTT 1.5.5 Variable Byte Integer)."""
    if not 0 <= value <= 268_435_455:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + varint(len(body)) + body


def connect_packet(client_id: str, keepalive_s: int, version: int = MQTT_311) -> bytes:
    """CONNECT with Clean Session / Clean Start set and no will, user name or password."""
    variable = _utf8("MQTT") + bytes((version, 0x02)) + keepalive_s.to_bytes(2, "big")
    if version == MQTT_5:
        variable += b"\x00"  # no properties: Session Expiry Interval 0, broker defaults
    return _packet(0x10, variable + _utf8(client_id))


def subscribe_packet(packet_id: int, filters: tuple[str, ...], qos: int, version: int = MQTT_311) -> bytes:
    body = packet_id.to_bytes(2, "big")
    if version == MQTT_5:
        body += b"\x00"
    for topic_filter in filters:
        body += _utf8(topic_filter) + bytes((qos,))
    return _packet(0x82, body)  # SUBSCRIBE's fixed-header flags are 0b0010 [MQTT-3.8.1-1]


def make_payload(size_bytes: int, stamp: int = 0, seq: int = 0) -> bytes:
    """A payload of `size_bytes` (at least 16) starting with `stamp` and `seq`."""
    if size_bytes < PAYLOAD_HEAD_BYTES:
        raise ValueError(f"payload must be at least {PAYLOAD_HEAD_BYTES} bytes, got {size_bytes}")
    return _HEAD.pack(stamp, seq) + b"x" * (size_bytes - PAYLOAD_HEAD_BYTES)


def publish_packet(
    topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, version: int = MQTT_311
) -> bytes:
    body = _utf8(topic)
    if qos:
        body += packet_id.to_bytes(2, "big")
    if version == MQTT_5:
        body += b"\x00"
    return _packet(0x30 | (qos << 1), body + payload)


@dataclass(frozen=True, slots=True)
class PublishTemplate:
    """A PUBLISH split around its packet id and payload head, for cheap per-message encoding.

    `prefix + packet_id(2, only for QoS > 0) + props(v5) + head(16) + tail` is one packet.
    """

    prefix: bytes
    props: bytes
    tail: bytes
    qos: int

    @property
    def packet_bytes(self) -> int:
        return (
            len(self.prefix) + (2 if self.qos else 0) + len(self.props) + PAYLOAD_HEAD_BYTES + len(self.tail)
        )

    def encode(self, packet_id: int, stamp: int, seq: int) -> bytes:
        pid = packet_id.to_bytes(2, "big") if self.qos else b""
        return self.prefix + pid + self.props + _HEAD.pack(stamp, seq) + self.tail


def publish_template(topic: str, payload_bytes: int, qos: int, version: int = MQTT_311) -> PublishTemplate:
    whole = publish_packet(topic, make_payload(payload_bytes), qos, 1, version)
    props = b"\x00" if version == MQTT_5 else b""
    head_at = len(whole) - payload_bytes
    pid_bytes = 2 if qos else 0
    prefix = whole[: head_at - len(props) - pid_bytes]
    return PublishTemplate(prefix, props, whole[head_at + PAYLOAD_HEAD_BYTES :], qos)


def publish_batch(topic: str, payload_bytes: int, count: int, version: int = MQTT_311) -> bytes:
    """`count` identical QoS 0 PUBLISH packets in one bytes object, written as one unit."""
    return publish_packet(topic, make_payload(payload_bytes), 0, 0, version) * count


def puback_packet(packet_id: int) -> bytes:
    # Remaining Length 2 (no reason code, no properties) is valid in 3.1.1 and, for Success,
    # in 5.0 too (MQTT 5.0 section 3.4.2.1).
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def _long_length(buf: bytes, at: int, end: int) -> tuple[int, int] | None:
    """Decode a Remaining Length at `at`: (value, bytes used), or None if incomplete."""
    value = 0
    for used in range(4):
        if at + used >= end:
            return None
        byte = buf[at + used]
        value |= (byte & 0x7F) << (7 * used)
        if byte < 0x80:
            return value, used + 1
    raise WireError(f"Remaining Length longer than 4 bytes at offset {at}")


@dataclass(frozen=True, slots=True)
class Control:
    """A packet other than PUBLISH (or PUBACK where counted): type and its body."""

    packet_type: int
    flags: int
    body: bytes


def count_publishes(buf: bytes, start: int, others: list[Control]) -> tuple[int, int]:
    """Count PUBLISH packets from `start`: (count, index of first unconsumed byte).

    The hot path of QoS 0 subscribers: one small loop iteration per packet, no slicing. Any
    other packet is appended to `others` for the caller's slow path.
    """
    end = len(buf)
    i = start
    count = 0
    while i + 1 < end:
        length = buf[i + 1]
        if length < 0x80:
            nxt = i + 2 + length
            body_at = i + 2
        else:
            decoded = _long_length(buf, i + 1, end)
            if decoded is None:
                break
            nxt = i + 1 + decoded[1] + decoded[0]
            body_at = i + 1 + decoded[1]
        if nxt > end:
            break
        first = buf[i]
        if first >> 4 == PUBLISH:
            count += 1
        else:
            others.append(Control(first >> 4, first & 0x0F, bytes(buf[body_at:nxt])))
        i = nxt
    return count, i


def count_uniform(buf: bytes, packet_bytes: int) -> int:
    """How many whole packets at the start of `buf` are QoS 0 PUBLISHes of exactly `packet_bytes`.

    The fast path of counting subscribers whose messages all have one size (one topic length,
    one payload size): two strided slices check every fixed header at C speed, which is
    exactly what `count_publishes` would visit one by one. Returns 0 when any header differs
    (the caller then walks), so the answer is never a guess.
    """
    whole = len(buf) // packet_bytes
    if whole == 0 or not 2 < packet_bytes < 130:  # one-byte Remaining Length only
        return 0
    span = whole * packet_bytes
    if buf[0:span:packet_bytes].count(0x30) != whole:
        return 0
    if buf[1:span:packet_bytes].count(packet_bytes - 2) != whole:
        return 0
    return whole


def count_pubacks(buf: bytes, start: int, others: list[Control]) -> tuple[int, int]:
    """Count PUBACK packets (any reason code): the publisher side of a QoS 1 window."""
    end = len(buf)
    i = start
    count = 0
    while i + 1 < end:
        decoded = _long_length(buf, i + 1, end)
        if decoded is None:
            break
        nxt = i + 1 + decoded[1] + decoded[0]
        if nxt > end:
            break
        first = buf[i]
        if first >> 4 == PUBACK:
            count += 1
        else:
            others.append(Control(first >> 4, first & 0x0F, bytes(buf[i + 1 + decoded[1] : nxt])))
        i = nxt
    return count, i


def scan_publishes(
    buf: bytes, start: int, version: int, heads: list[tuple[int, int, int]], others: list[Control]
) -> int:
    """Walk PUBLISH packets reading (packet id or 0, stamp, seq) of each into `heads`.

    Used where each message matters (QoS 1 acknowledgement, latency, sequence checks); returns
    the index of the first unconsumed byte.
    """
    end = len(buf)
    i = start
    unpack = _HEAD.unpack_from
    while i + 1 < end:
        length = buf[i + 1]
        if length < 0x80:
            body_at = i + 2
        else:
            decoded = _long_length(buf, i + 1, end)
            if decoded is None:
                break
            length = decoded[0]
            body_at = i + 1 + decoded[1]
        nxt = body_at + length
        if nxt > end:
            break
        first = buf[i]
        if first >> 4 != PUBLISH:
            others.append(Control(first >> 4, first & 0x0F, bytes(buf[body_at:nxt])))
            i = nxt
            continue
        at = body_at + 2 + (buf[body_at] << 8 | buf[body_at + 1])
        packet_id = 0
        if first & 0x06:
            packet_id = buf[at] << 8 | buf[at + 1]
            at += 2
        if version == MQTT_5:
            props = buf[at]
            if props < 0x80:
                at += 1 + props
            else:
                decoded = _long_length(buf, at, nxt)
                if decoded is None:
                    raise WireError(f"bad property length in PUBLISH at offset {i}")
                at += decoded[1] + decoded[0]
        if nxt - at >= PAYLOAD_HEAD_BYTES:
            stamp, seq = unpack(buf, at)
        else:
            stamp, seq = 0, 0
        heads.append((packet_id, stamp, seq))
        i = nxt
    return i


def connack_code(control: Control) -> int:
    """The CONNACK return code (3.1.1) or reason code (5.0); 0 means accepted."""
    return control.body[1] if len(control.body) >= 2 else 0x80
