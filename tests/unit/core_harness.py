"""A broker core driven by bytes, with no event loop: the test harness of the sans-IO core."""

from __future__ import annotations

import dataclasses
from typing import Any

from broker.config import MqttConfig
from broker.core import BrokerCore
from broker.protocol.codec import Decoder, encode
from broker.protocol.connection import ServerConnection
from broker.protocol.packets import Connect, Packet, Properties, ProtocolVersion


class FakeLink:
    """Collects what the core writes; `closed` once the core asked to close."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class Harness:
    def __init__(self, **mqtt: Any) -> None:
        self.clock = FakeClock()
        ids = iter(range(1, 1_000_000))
        self.core = BrokerCore(
            dataclasses.replace(MqttConfig(), **mqtt), new_client_id=lambda: f"auto-{next(ids)}"
        )

    def client(self, version: ProtocolVersion = ProtocolVersion.V5) -> HarnessClient:
        return HarnessClient(self, version)

    def tick(self, seconds: float = 0.0) -> None:
        self.core.tick(self.clock.advance(seconds))
        self.core.flush()


class HarnessClient:
    def __init__(self, harness: Harness, version: ProtocolVersion) -> None:
        self.h = harness
        self.version = version
        self.link = FakeLink()
        self.conn: ServerConnection = harness.core.open_connection("test:1", self.link, harness.clock.now)
        self.decoder = Decoder(version=version)
        self._read = 0
        self._pending: list[Packet] = []

    def send(self, *packets: Packet) -> None:
        data = b"".join(encode(p, self.version) for p in packets)
        self.send_bytes(data)

    def send_bytes(self, data: bytes) -> None:
        core = self.h.core
        core.data_received(self.conn, data, self.h.clock.now)
        core.flush()

    def received(self) -> list[Packet]:
        data = bytes(self.link.written[self._read :])
        self._read = len(self.link.written)
        packets = self._pending + self.decoder.feed(data)
        self._pending = []
        return packets

    def connect(self, client_id: str = "c1", clean_start: bool = True, **kwargs: Any) -> Packet:
        props = kwargs.pop("properties", Properties())
        self.send(Connect(client_id, self.version, clean_start, properties=props, **kwargs))
        packets = self.received()
        assert len(packets) >= 1, "no CONNACK"
        self._pending = packets[1:]  # what followed CONNACK (a resumed session's messages)
        return packets[0]

    def lose(self) -> None:
        """The network connection drops without DISCONNECT."""
        core = self.h.core
        self.link.closed = True
        core.connection_lost(self.conn, self.h.clock.now)
        core.flush()
