"""The `durable` benchmark's MQTT connections: a timed QoS 1 publisher and a persistent subscriber.

Why: `tools.loadgen.durable` measures what the durability promise costs, which needs what the
other loadgen clients do not give: the time from each PUBLISH to its PUBACK (by packet id, with
the 5.0 reason code, so that a refusal is counted as such), and subscribers with Clean Session /
Clean Start 0 whose sequence checks carry over from one connection of the session to the next.

Must not: block, sleep, print, or send anything on its own but the acknowledgements MQTT asks
for; publish past the limit `run_until` sets (every publishing loop is bounded by count).

Invariants: at most `window` PUBLISHes are unacknowledged per publisher; latency samples are
taken only while `recording` is set; a subscriber's `expected_seq` only grows.
"""

from __future__ import annotations

import asyncio
import time

from tools.loadgen import clients, wire

NEVER_EXPIRES_S = 0xFFFFFFFF


def connect_persistent_packet(client_id: str, keepalive_s: int, version: int) -> bytes:
    """CONNECT with Clean Session / Clean Start 0; 5.0 also asks for a session that never expires."""
    variable = b"\x00\x04MQTT" + bytes((version, 0x00)) + keepalive_s.to_bytes(2, "big")
    if version == wire.MQTT_5:
        variable += b"\x05\x11" + NEVER_EXPIRES_S.to_bytes(4, "big")
    cid = client_id.encode()
    body = variable + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + wire.varint(len(body)) + body


def remaining_length(buf: bytes, at: int, end: int) -> tuple[int, int] | None:
    """The Remaining Length at `at`: (value, bytes it took), or None while incomplete."""
    value = 0
    for used in range(4):
        if at + used >= end:
            return None
        byte = buf[at + used]
        value |= (byte & 0x7F) << (7 * used)
        if byte < 0x80:
            return value, used + 1
    raise wire.WireError(f"Remaining Length longer than 4 bytes at offset {at}")


class DurablePublisher(clients.Client):
    """Keeps `window` QoS 1 PUBLISHes in flight and times each one until its PUBACK."""

    def __init__(self, version: int, topic: str, payload_bytes: int, window: int) -> None:
        super().__init__(version)
        self._template = wire.publish_template(topic, payload_bytes, 1, version)
        self._window = window
        self._next_id = 0
        self._sent_ns: dict[int, int] = {}
        self._limit = 0
        self.seq = 0  # next sequence number: messages sent so far, over all phases
        self.ok = 0  # PUBACK with a success code (0x00, or 0x10 "no matching subscribers")
        self.refused = 0
        self.recording = False
        self.latencies_ns: list[int] = []

    def run_until(self, limit: int) -> None:
        """Publish until `limit` messages were sent in all (0: stop sending now)."""
        self._limit = limit
        self._send()

    def in_flight(self) -> int:
        return len(self._sent_ns)

    @property
    def finished(self) -> bool:
        """Everything up to the limit was sent and acknowledged."""
        return self.seq >= self._limit and not self._sent_ns

    def _send(self) -> None:
        if self.lost or self.transport is None:
            return
        count = min(self._window - len(self._sent_ns), self._limit - self.seq)
        if count <= 0:
            return
        now_ns = time.perf_counter_ns()
        encode, parts = self._template.encode, []
        for _ in range(count):
            self._next_id = self._next_id % 65535 + 1  # non-zero [MQTT-2.3.1-1]
            self._sent_ns[self._next_id] = now_ns
            parts.append(encode(self._next_id, 0, self.seq))
            self.seq += 1
        self.transport.write(b"".join(parts))

    def _scan(self, buf: bytes, others: list[wire.Control]) -> int:
        end, i = len(buf), 0
        now_ns = time.perf_counter_ns()
        while i + 1 < end:
            header = remaining_length(buf, i + 1, end)
            if header is None:
                break
            length, used = header
            body_at = i + 1 + used
            nxt = body_at + length
            if nxt > end:
                break
            if buf[i] >> 4 == wire.PUBACK and length >= 2:
                sent_ns = self._sent_ns.pop(buf[body_at] << 8 | buf[body_at + 1], None)
                if length > 2 and buf[body_at + 2] >= 0x80:  # 5.0 reason code: refused
                    self.refused += 1
                else:
                    self.ok += 1
                if sent_ns is not None and self.recording:
                    self.latencies_ns.append(now_ns - sent_ns)
            else:
                others.append(wire.Control(buf[i] >> 4, buf[i] & 0x0F, bytes(buf[body_at:nxt])))
            i = nxt
        self._send()
        return i


class PersistentSubscriber(clients.Client):
    """A persistent session's connection: acknowledges every message, counts duplicates and gaps."""

    def __init__(self, version: int, expected_seq: int = 0) -> None:
        super().__init__(version)
        self.expected_seq = expected_seq

    @property
    def unique(self) -> int:
        return self.received - self.duplicates

    async def handshake(self, client_id: str, keepalive_s: int, timeout_s: float) -> None:
        assert self.transport is not None
        self.transport.write(connect_persistent_packet(client_id, keepalive_s, self.version))
        code = await asyncio.wait_for(self._connack, timeout_s)
        if code != 0:
            raise clients.ClientError(f"CONNACK refused {client_id}: code 0x{code:02x}")

    def _scan(self, buf: bytes, others: list[wire.Control]) -> int:
        heads: list[tuple[int, int, int]] = []
        used = wire.scan_publishes(buf, 0, self.version, heads, others)
        if not heads:
            return used
        self.received += len(heads)
        acks = bytearray()
        expected = self.expected_seq
        for packet_id, _stamp, seq in heads:
            if packet_id:
                acks += wire.puback_packet(packet_id)
            if seq >= expected:
                self.gaps += seq - expected
                expected = seq + 1
            else:
                self.duplicates += 1
        self.expected_seq = expected
        if self.transport is not None and not self.lost:
            self.transport.write(bytes(acks))
        return used
