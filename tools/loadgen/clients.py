"""asyncio protocols for the load generator's MQTT connections.

Why: one class per traffic shape (flooding QoS 0 publisher, windowed QoS 1 publisher, paced
publisher, counting / acknowledging / timing subscribers), each doing the least Python work per
message that its measurement allows. They run on plain asyncio or uvloop transports; paho would
cost more CPU per message than the broker under test.

Must not: block, sleep, or decide when a measurement window starts or ends (the worker does
that, by calling `start`, `stop` and `open_window`/`close_window`). Every publishing loop is
bounded by a deadline and by a message count, whichever comes first.

Invariants:
- A publisher never writes while its transport has paused writing: the broker, not the
  generator, sets the pace, and a slow broker is not buried under buffered data.
- `sent` counts messages handed to the transport; `unflushed_messages()` says how many of them
  were still in the transport's buffer when asked.
- Counters only grow; the worker takes window counts as differences of two readings.
"""

from __future__ import annotations

import asyncio
import socket
import time
from array import array
from typing import cast

from tools.loadgen import wire

WRITE_HIGH_WATER_BYTES = 64 * 1024
BATCHES_PER_TURN = 4  # QoS 0 pump: batches written before yielding to the event loop


class ClientError(Exception):
    """A connection failed, was refused, or was closed by the broker."""


class Client(asyncio.Protocol):
    """CONNECT/CONNACK and SUBSCRIBE/SUBACK handling and the control-packet slow path."""

    # A flooding publisher sets this: with the kernel's auto-tuned send buffer (megabytes on
    # loopback) a publisher could count as "sent" seconds of traffic the broker has not read.
    SEND_BUFFER_BYTES = 0

    def __init__(self, version: int) -> None:
        self.version = version
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.lost = False
        self.closing = False
        self.error: str | None = None
        # The counters every role reports; each subclass moves only those that apply to it.
        self.sent = 0
        self.acked = 0
        self.received = 0
        self.duplicates = 0
        self.gaps = 0
        self.bytes_received = 0
        self._rest = b""
        loop = asyncio.get_running_loop()
        self._connack: asyncio.Future[int] = loop.create_future()
        self._suback: asyncio.Future[bytes] = loop.create_future()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        if self.SEND_BUFFER_BYTES:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.SEND_BUFFER_BYTES)

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        buf = self._rest + data if self._rest else data
        others: list[wire.Control] = []
        try:
            used = self._scan(buf, others)
        except wire.WireError as exc:
            self._fail(str(exc))
            return
        self._rest = buf[used:] if used < len(buf) else b""
        for control in others:
            self._control(control)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.closing and self.error is None:
            self.error = f"connection lost: {exc or 'closed by broker'}"
        for future in (self._connack, self._suback):
            if not future.done():
                future.set_exception(ClientError(self.error or "connection closed"))
                future.exception()  # mark retrieved: nobody may be waiting (a publisher's SUBACK)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def writing_paused(self) -> bool:
        return self.paused

    # for subclasses
    def _scan(self, buf: bytes, others: list[wire.Control]) -> int:
        count, used = wire.count_publishes(buf, 0, others)
        self.received += count
        return used

    def _control(self, control: wire.Control) -> None:
        if control.packet_type == wire.CONNACK and not self._connack.done():
            self._connack.set_result(wire.connack_code(control))
        elif control.packet_type == wire.SUBACK and not self._suback.done():
            self._suback.set_result(control.body)
        elif control.packet_type == wire.DISCONNECT:
            reason = control.body[0] if control.body else 0
            self.error = f"broker sent DISCONNECT (reason 0x{reason:02x})"
        elif control.packet_type != wire.PINGRESP:
            self.error = f"unexpected packet type {control.packet_type}"

    def _fail(self, message: str) -> None:
        self.error = message
        if self.transport is not None:
            self.transport.abort()

    # called by the worker
    async def handshake(self, client_id: str, keepalive_s: int, timeout_s: float) -> None:
        assert self.transport is not None
        self.transport.write(wire.connect_packet(client_id, keepalive_s, self.version))
        code = await asyncio.wait_for(self._connack, timeout_s)
        if code != 0:
            raise ClientError(f"CONNACK refused {client_id}: code 0x{code:02x}")

    async def subscribe(self, filters: tuple[str, ...], qos: int, timeout_s: float) -> None:
        assert self.transport is not None
        self.transport.write(wire.subscribe_packet(1, filters, qos, self.version))
        body = await asyncio.wait_for(self._suback, timeout_s)
        # packet id, then (5.0) the properties, then one code per filter; our SUBACKs carry
        # no long properties, so a one-byte property length suffices here.
        granted = body[3 + body[2] :] if self.version == wire.MQTT_5 else body[2:]
        if any(code >= 0x80 for code in granted):
            raise ClientError(f"SUBSCRIBE {filters} refused: {granted.hex()}")

    def start(self, deadline_s: float, max_messages: int) -> None:
        """Begin publishing (publishers only); a subscriber ignores it."""

    def stop(self) -> None:
        """Stop publishing new messages; in-flight ones still complete."""

    def unflushed_messages(self) -> int:
        return 0

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.lost:
            self.transport.write(wire.DISCONNECT_PACKET)
            self.transport.close()


class Qos0Publisher(Client):
    """Floods pre-encoded batches of identical QoS 0 PUBLISH packets, paced by write pauses."""

    SEND_BUFFER_BYTES = 64 * 1024

    def __init__(self, version: int, topic: str, payload_bytes: int, batch_msgs: int) -> None:
        super().__init__(version)
        self._batch = wire.publish_batch(topic, payload_bytes, batch_msgs, version)
        self._batch_msgs = batch_msgs
        self._packet_bytes = len(self._batch) // batch_msgs
        self._running = False
        self._deadline_s = 0.0
        self._max = 0

    def start(self, deadline_s: float, max_messages: int) -> None:
        self._running = True
        self._deadline_s = deadline_s
        self._max = max_messages
        self._pump()

    def stop(self) -> None:
        self._running = False

    def resume_writing(self) -> None:
        super().resume_writing()
        self._pump()

    def _pump(self) -> None:
        if not self._running or self.paused or self.lost or self.transport is None:
            return
        if self.sent >= self._max or time.monotonic() >= self._deadline_s:
            self._running = False
            return
        write = self.transport.write
        for _ in range(BATCHES_PER_TURN):
            write(self._batch)
            self.sent += self._batch_msgs
            if self.writing_paused():  # set by write() itself: mypy cannot see that
                return  # resume_writing calls _pump again
        asyncio.get_running_loop().call_soon(self._pump)

    def unflushed_messages(self) -> int:
        if self.transport is None or self.lost:
            return 0
        return self.transport.get_write_buffer_size() // self._packet_bytes


class Qos1Publisher(Client):
    """Keeps `window` QoS 1 PUBLISHes in flight; each PUBACK releases one more."""

    def __init__(self, version: int, topic: str, payload_bytes: int, window: int) -> None:
        super().__init__(version)
        self._template = wire.publish_template(topic, payload_bytes, 1, version)
        self._window = window
        self._next_id = 0
        self._running = False
        self._max = 0

    def start(self, deadline_s: float, max_messages: int) -> None:
        self._running = True
        self._max = max_messages
        self._send(self._window)

    def stop(self) -> None:
        self._running = False

    def in_flight(self) -> int:
        return self.sent - self.acked

    def _scan(self, buf: bytes, others: list[wire.Control]) -> int:
        count, used = wire.count_pubacks(buf, 0, others)
        if count:
            self.acked += count
            self._send(count)
        return used

    def _send(self, count: int) -> None:
        if not self._running or self.lost or self.transport is None:
            return
        count = min(count, self._max - self.sent, self._window - self.in_flight())
        if count <= 0:
            return
        encode = self._template.encode
        parts = []
        for _ in range(count):
            self._next_id = self._next_id % 65535 + 1  # packet ids are non-zero [MQTT-2.3.1-1]
            parts.append(encode(self._next_id, 0, self.sent))
            self.sent += 1
        self.transport.write(b"".join(parts))


class PacedPublisher(Client):
    """Publishes QoS 0 at a fixed rate, each payload stamped with time.perf_counter_ns()."""

    TICK_S = 0.001  # retry interval while the transport is paused

    def __init__(self, version: int, topic: str, payload_bytes: int, rate_per_s: float) -> None:
        super().__init__(version)
        self._template = wire.publish_template(topic, payload_bytes, 0, version)
        self._rate_per_s = rate_per_s
        self._running = False
        self._started_s = 0.0
        self._deadline_s = 0.0
        self._max = 0
        self._timer: asyncio.TimerHandle | None = None

    def start(self, deadline_s: float, max_messages: int) -> None:
        self._running = True
        self._started_s = time.monotonic()
        self._deadline_s = deadline_s
        self._max = max_messages
        self._tick()

    def stop(self) -> None:
        self._running = False
        if self._timer is not None:
            self._timer.cancel()

    def _tick(self) -> None:
        now = time.monotonic()
        if not self._running or self.lost or self.transport is None or now >= self._deadline_s:
            self._running = False
            return
        if self.paused:  # the broker is not reading: skip ahead instead of spinning
            self._timer = asyncio.get_running_loop().call_later(self.TICK_S, self._tick)
            return
        due = min(int((now - self._started_s) * self._rate_per_s) + 1, self._max) - self.sent
        if due > 0:
            encode = self._template.encode
            parts = []
            for _ in range(due):
                parts.append(encode(0, time.perf_counter_ns(), self.sent))
                self.sent += 1
            self.transport.write(b"".join(parts))
        if self.sent >= self._max:
            self._running = False
            return
        next_due_s = self._started_s + self.sent / self._rate_per_s
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, next_due_s - time.monotonic()), self._tick
        )


class CountingSubscriber(Client):
    """Counts PUBLISH packets; the QoS 0 throughput subscriber.

    It learns the size of the messages it gets and counts runs of same-size packets with
    `wire.count_uniform`, walking headers one by one only where that does not apply.
    """

    # SO_RCVLOWAT tuning: a broker that writes one small packet per syscall (mosquitto does)
    # would otherwise wake this process for every few messages, and on a small machine the
    # generator's wake-ups take CPU from the broker it measures. The kernel is asked to wait
    # until about LOWAT_DELAY_S worth of traffic (at the current rate) is there; that shifts the
    # window's edges by at most that much. `untune` restores 1 byte before the drain.
    LOWAT_DELAY_S = 0.01
    LOWAT_MIN_BYTES = 512  # below this, batching buys little
    LOWAT_MAX_BYTES = 32 * 1024  # well under the receive buffer, so the window is not clamped

    def __init__(self, version: int) -> None:
        super().__init__(version)
        self._packet_bytes = 0
        self._lowat_bytes = 1
        self._tuned_at: tuple[float, int] | None = None

    def tune(self, now_s: float) -> None:
        """Set SO_RCVLOWAT from the rate seen since the previous call."""
        if self._tuned_at is not None:
            then_s, then_bytes = self._tuned_at
            rate = (self.bytes_received - then_bytes) / max(now_s - then_s, 1e-3)
            lowat = min(int(rate * self.LOWAT_DELAY_S), self.LOWAT_MAX_BYTES)
            self._set_lowat(lowat if lowat >= self.LOWAT_MIN_BYTES else 1)
        self._tuned_at = (now_s, self.bytes_received)

    def untune(self) -> None:
        self._tuned_at = None
        self._set_lowat(1)

    def _set_lowat(self, lowat_bytes: int) -> None:
        if lowat_bytes == self._lowat_bytes or self.transport is None or self.lost:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat_bytes)
            self._lowat_bytes = lowat_bytes

    def _scan(self, buf: bytes, others: list[wire.Control]) -> int:
        start = 0
        if self._packet_bytes:
            whole = wire.count_uniform(buf, self._packet_bytes)
            self.received += whole
            start = whole * self._packet_bytes
        if start < len(buf):
            if buf[start] == 0x30 and len(buf) > start + 1 and buf[start + 1] < 0x80:
                self._packet_bytes = buf[start + 1] + 2
            count, start = wire.count_publishes(buf, start, others)
            self.received += count
        return start


class Qos1Subscriber(Client):
    """Acknowledges every QoS 1 PUBLISH (one batched write per chunk) and checks sequence numbers.

    Messages of one topic from one publisher arrive in order (MQTT 4.6), so a sequence number
    below the expected one is a duplicate and one above it a gap.
    """

    def __init__(self, version: int) -> None:
        super().__init__(version)
        self._expected_seq = 0

    def _scan(self, buf: bytes, others: list[wire.Control]) -> int:
        heads: list[tuple[int, int, int]] = []
        used = wire.scan_publishes(buf, 0, self.version, heads, others)
        if not heads:
            return used
        self.received += len(heads)
        acks = bytearray()
        expected = self._expected_seq
        for packet_id, _stamp, seq in heads:
            if packet_id:
                acks += b"\x40\x02"
                acks += packet_id.to_bytes(2, "big")
            if seq == expected:
                expected += 1
            elif seq < expected:
                self.duplicates += 1
            else:
                self.gaps += seq - expected
                expected = seq + 1
        self._expected_seq = expected
        if acks and self.transport is not None and not self.lost:
            self.transport.write(bytes(acks))
        return used


class LatencySubscriber(Client):
    """Records send-to-receive latency of each message that arrives while the window is open."""

    def __init__(self, version: int) -> None:
        super().__init__(version)
        self.latencies_ns = array("q")
        self._window_open = False

    def open_window(self) -> None:
        self._window_open = True

    def close_window(self) -> None:
        self._window_open = False

    def _scan(self, buf: bytes, others: list[wire.Control]) -> int:
        now_ns = time.perf_counter_ns()
        heads: list[tuple[int, int, int]] = []
        used = wire.scan_publishes(buf, 0, self.version, heads, others)
        self.received += len(heads)
        if self._window_open:
            self.latencies_ns.extend(now_ns - stamp for _pid, stamp, _seq in heads)
        return used
