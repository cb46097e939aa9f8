"""The sans-IO MQTT codec: an incremental, bounded `Decoder` and the `encode` functions.

Why: the connection layer turns bytes into packets and packets into bytes through this module
only. It is the public face of `properties` (field primitives, property block), `decode`
(one packet's body) and `encode` (packet to bytes); import from here.

Must not: do IO, read the clock, hold connection state beyond the negotiated protocol version,
or check topic rules (`broker.protocol.topics` does, in the connection layer).

Invariants:
- `Decoder.feed` returns complete packets in wire order and raises only `MQTTError`
  subclasses. After it has raised once, the decoder refuses further input.
- A packet whose declared size (fixed header included) exceeds `max_packet_bytes` raises
  `PacketTooLarge` as soon as its fixed header is complete; its body is never buffered. So the
  decoder holds at most one incomplete packet of at most `max_packet_bytes` plus one read.
- Partial input is kept as a list of chunks and joined once the packet it belongs to is
  complete, so a large packet that arrives in many small reads costs O(size), not O(size²).
- Until a CONNECT has been decoded (`version is None`) only CONNECT decodes [MQTT-3.1.0-1];
  decoding a CONNECT while `version is None` sets `version` to its protocol level. A later
  CONNECT decodes without changing `version`; rejecting it [MQTT-3.1.0-2] is the connection
  layer's job.
"""

from __future__ import annotations

from typing import Final

from broker.protocol.decode import (
    DECODERS_BEFORE_CONNECT,
    DECODERS_V5,
    DECODERS_V311,
    PacketDecoder,
)
from broker.protocol.encode import encode, encode_publish_split
from broker.protocol.errors import MalformedPacket, MQTTError, PacketTooLarge
from broker.protocol.packets import Connect, Packet, ProtocolVersion
from broker.protocol.properties import VARINT_MAX, encode_properties, encode_varint

__all__ = [
    "MAX_PACKET_BYTES",
    "Decoder",
    "encode",
    "encode_properties",
    "encode_publish_split",
    "encode_varint",
]

MAX_PACKET_BYTES: Final = VARINT_MAX
"""Largest remaining length the Variable Byte Integer can express; the default bound."""


def _decoders_for(version: ProtocolVersion | None) -> tuple[PacketDecoder, ...]:
    if version is None:
        return DECODERS_BEFORE_CONNECT
    return DECODERS_V5 if version == ProtocolVersion.V5 else DECODERS_V311


class Decoder:
    """Incremental decoder, bounded by max_packet_bytes (whole packet incl. fixed header)."""

    __slots__ = ("_chunks", "_failed", "_have", "_need", "max_packet_bytes", "version")

    version: ProtocolVersion | None

    def __init__(
        self, max_packet_bytes: int = MAX_PACKET_BYTES, version: ProtocolVersion | None = None
    ) -> None:
        if max_packet_bytes < 2:
            raise ValueError("max_packet_bytes must be at least 2")
        self.max_packet_bytes = max_packet_bytes
        self.version = version
        self._chunks: list[bytes] = []  # an incomplete packet, as received
        self._have = 0  # bytes in _chunks
        self._need = 0  # bytes of the whole incomplete packet, 0 while its header is partial
        self._failed = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for an incomplete packet (for metrics and tests of the bound)."""
        return self._have

    def feed(self, data: bytes) -> list[Packet]:
        """Append data, return every complete packet in order.

        Raises an MQTTError subclass on the first bad packet; after that the decoder must not
        be used again (it raises MalformedPacket if it is). Packets decoded before the bad one in
        the same call travel on the exception as `packets_before`, so the caller can still act on
        them (a valid PUBLISH followed by garbage in one read is still delivered).
        """
        if self._failed:
            raise MalformedPacket("decoder used after a decoding error")
        if type(data) is not bytes:
            data = bytes(data)
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            buf = b"".join(self._chunks)
            self._chunks = []
            self._have = self._need = 0
        else:
            buf = data
        out: list[Packet] = []
        try:
            return self._decode(buf, out)
        except MQTTError as exc:
            exc.packets_before = out
            self._failed = True
            self._chunks = []
            self._have = self._need = 0
            raise

    def _decode(self, buf: bytes, out: list[Packet]) -> list[Packet]:
        append = out.append
        decoders = _decoders_for(self.version)
        max_bytes = self.max_packet_bytes
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            remaining = buf[pos + 1]
            if remaining < 0x80:
                start = pos + 2
                end = start + remaining
            else:
                remaining, start = _long_remaining_length(buf, pos + 1, n)
                if start < 0:
                    break  # the length itself is incomplete
                end = start + remaining
            if end - pos > max_bytes:
                raise PacketTooLarge(f"packet of {end - pos} bytes exceeds the maximum of {max_bytes}")
            if end > n:
                self._need = end - pos
                break
            first = buf[pos]
            ptype = first >> 4
            packet = decoders[ptype](first & 0x0F, buf, start, end)
            append(packet)
            if ptype == 1 and self.version is None and isinstance(packet, Connect):
                self.version = packet.protocol_version
                decoders = _decoders_for(self.version)
            pos = end
        if pos < n:
            rest = buf[pos:] if pos else buf
            self._chunks = [rest]
            self._have = len(rest)
        return out


def _long_remaining_length(buf: bytes, pos: int, n: int) -> tuple[int, int]:
    """Remaining length of 2..4 bytes at `pos`: (value, body start), or (0, -1) if incomplete."""
    value = 0
    shift = 0
    for i in range(4):
        if pos >= n:
            return 0, -1
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and i > 0:
                raise MalformedPacket("remaining length not minimally encoded [MQTT-1.5.5-1]")
            return value, pos
        shift += 7
    raise MalformedPacket("remaining length longer than four bytes [MQTT-1.5.5-1]")
