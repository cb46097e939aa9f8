"""Fuzzing `Decoder.feed` with hypothesis: arbitrary bytes and mutated valid packets.

Whatever comes in, only `MQTTError` subclasses come out (never IndexError, struct.error,
UnicodeDecodeError, ValueError, ...), every packet returned is a packet value, and the decoder
never holds more than one bounded partial packet. Bounded to a few seconds in the unit suite;
`tests/fuzz/fuzz_decoder.py` is the long-running loop.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.protocol.codec import Decoder, encode
from broker.protocol.errors import MQTTError
from broker.protocol.packets import Packet, ProtocolVersion
from tests.unit.protocol.test_codec_roundtrip import connects, packets_after_connect, v311_packets

pytestmark = pytest.mark.timeout(60)

VERSIONS = [None, ProtocolVersion.V311, ProtocolVersion.V5]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_BYTES = 4096


def feed_chunks(version: ProtocolVersion | None, chunks: list[bytes]) -> list[Packet]:
    decoder = Decoder(max_packet_bytes=MAX_BYTES, version=version)
    out: list[Packet] = []
    try:
        for chunk in chunks:
            out.extend(decoder.feed(chunk))
            assert decoder.buffered_bytes <= MAX_BYTES + len(chunk)
    except MQTTError:
        pass
    return out


@FUZZ
@given(st.sampled_from(VERSIONS), st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_raise_only_mqtt_errors(version: ProtocolVersion | None, chunks: list[bytes]) -> None:
    feed_chunks(version, chunks)


@st.composite
def mutated_sessions(draw: st.DrawFn) -> tuple[ProtocolVersion | None, list[bytes]]:
    """A valid CONNECT + packets, then a few byte flips, inserts, deletes and a truncation."""
    version = draw(st.sampled_from([ProtocolVersion.V311, ProtocolVersion.V5]))
    connect = draw(connects(version))
    strategy = packets_after_connect() if version == ProtocolVersion.V5 else v311_packets()
    packets = [connect, *draw(st.lists(strategy, max_size=4))]
    wire = bytearray(b"".join(encode(p, version) for p in packets))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        at = draw(st.integers(0, max(len(wire) - 1, 0)))
        if op == "flip" and wire:
            wire[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and wire:
            wire[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x03, 0x0B, 0x26]))
        elif op == "insert":
            wire[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif wire:
            del wire[at : at + draw(st.integers(1, 4))]
    if draw(st.booleans()):
        wire = wire[: draw(st.integers(0, len(wire)))]
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=4)))
    edges = [0, *cuts, len(wire)]
    chunks = [bytes(wire[a:b]) for a, b in pairwise(edges)]
    return draw(st.sampled_from([None, version])), chunks


@FUZZ
@given(mutated_sessions())
def test_mutated_valid_packets_raise_only_mqtt_errors(
    case: tuple[ProtocolVersion | None, list[bytes]],
) -> None:
    version, chunks = case
    for packet in feed_chunks(version, chunks):
        assert isinstance(packet, Packet)
