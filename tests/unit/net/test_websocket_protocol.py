"""broker/net/websocket.py without a socket: a fake transport under our protocol, the real core
above it, and the `websockets` package's sans-IO client on the other side of the wire."""

from __future__ import annotations

import asyncio
from typing import cast

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from broker.config import MqttConfig
from broker.core import BrokerCore
from broker.net.websocket import MqttWebSocketProtocol

CONNECT_311 = bytes([0x10, 0x0E]) + b"\x00\x04MQTT\x04\x02\x00\x3c" + b"\x00\x02ws"
CONNACK_OK = b"\x20\x02\x00\x00"


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class FakeLoop:
    def time(self) -> float:
        return 1000.0


class Wire:
    """Our protocol on a fake transport, and a sans-IO WebSocket client talking to it."""

    def __init__(self, path: str = "/mqtt", subprotocols: tuple[str, ...] = ("mqtt",)) -> None:
        self.core = BrokerCore(MqttConfig())
        self.transport = FakeTransport()
        self.server = MqttWebSocketProtocol(
            self.core, cast(asyncio.AbstractEventLoop, FakeLoop()), "/mqtt", 1024
        )
        self.server.connection_made(cast(asyncio.Transport, self.transport))
        self.client = ClientProtocol(
            parse_uri(f"ws://127.0.0.1{path}"), subprotocols=[Subprotocol(s) for s in subprotocols]
        )
        self.client.send_request(self.client.connect())
        self.send()

    def send(self) -> None:
        for chunk in self.client.data_to_send():
            if chunk:
                self.server.data_received(chunk)

    def receive(self) -> list[object]:
        data = bytes(self.transport.out)
        self.transport.out.clear()
        self.client.receive_data(data)
        return list(self.client.events_received())


def test_upgrade_then_a_packet_across_two_frames() -> None:
    w = Wire()
    (response,) = w.receive()
    assert isinstance(response, Response) and response.status_code == 101
    assert w.client.subprotocol == "mqtt"
    w.client.send_binary(CONNECT_311[:3], fin=False)
    w.client.send_continuation(CONNECT_311[3:], fin=True)
    w.send()
    (frame,) = w.receive()
    assert isinstance(frame, Frame) and frame.opcode is Opcode.BINARY and frame.data == CONNACK_OK
    w.server.connection_lost(None)
    assert not w.core.connections


def test_wrong_path_is_404_and_no_subprotocol_is_400() -> None:
    for wire, status in ((Wire(path="/other"), 404), (Wire(subprotocols=()), 400)):
        (response,) = wire.receive()
        assert isinstance(response, Response) and response.status_code == status
        assert wire.transport.closed
        wire.server.write(b"\x20\x02\x00\x00")  # the core has nothing to say before an upgrade
        assert not wire.transport.out
        wire.server.connection_lost(None)
        assert not wire.core.connections


def test_text_frame_fails_the_connection_with_1003() -> None:
    w = Wire()
    w.receive()
    w.client.send_text(b"hello")
    w.send()
    (frame,) = w.receive()
    assert isinstance(frame, Frame) and frame.opcode is Opcode.CLOSE
    assert int.from_bytes(frame.data[:2], "big") == 1003
    assert w.transport.closed


def test_frame_above_the_limit_fails_with_1009() -> None:
    w = Wire()
    w.receive()
    w.client.send_binary(b"\x30" + b"\x00" * 2000)  # the protocol was built with 1024
    w.send()
    (frame,) = w.receive()
    assert isinstance(frame, Frame) and frame.opcode is Opcode.CLOSE
    assert int.from_bytes(frame.data[:2], "big") == 1009
    assert w.transport.closed


def test_close_sends_a_close_frame() -> None:
    w = Wire()
    w.receive()
    w.server.close()
    (frame,) = w.receive()
    assert isinstance(frame, Frame) and frame.opcode is Opcode.CLOSE
    assert int.from_bytes(frame.data[:2], "big") == 1000
    assert w.transport.closed
