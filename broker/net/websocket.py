"""MQTT over WebSocket (WS, and WSS above the TLS wrapper of `broker/net/tls.py`).

Why: browsers and some gateways speak MQTT only inside WebSocket. The `websockets` package's
sans-IO `ServerProtocol` parses the HTTP upgrade and the frames; this asyncio protocol drives it
from the loop's callbacks, so a WebSocket connection costs no task of its own, and it is the
`Link` the core writes to, exactly like `broker/net/tcp.py`.

Must not: interpret MQTT (binary frame payloads go to `core.data_received` as a byte stream:
a packet may span frames and a frame may hold many packets), or buffer without bound.

Invariants (`broker/ACCESS.md`, "Transports"):
- The upgrade must ask for `WebSocket.Path` (else HTTP 404) and offer `mqtt` or `mqttv3.1` as
  subprotocol (else HTTP 400); the connection is opened in the core at accept, so the core's
  CONNECT timeout also bounds a client that never finishes the upgrade.
- A text frame fails the connection with close code 1003; ping, pong and close are answered by
  the library; a frame larger than `MQTT.MaxPacketSize` fails it with 1009.
- Each `write` from the core (one per connection per flush) is one binary frame.
- Backpressure as in tcp.py: the transport's pause_writing reaches the core.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from broker.core import BrokerCore
from broker.net.tcp import MqttStreamProtocol

log = logging.getLogger("broker.net.websocket")

SUBPROTOCOLS: Final = (Subprotocol("mqtt"), Subprotocol("mqttv3.1"))

# The library logs every opened connection at INFO: far too chatty for a broker. Its warnings and
# errors still reach the log.
_library_log = logging.getLogger("broker.net.websocket.library")
_library_log.setLevel(logging.WARNING)


class MqttWebSocketProtocol(MqttStreamProtocol):
    """The TCP protocol of `broker/net/tcp.py` with WebSocket framing on both directions."""

    __slots__ = ("path", "ws")

    def __init__(
        self,
        core: BrokerCore,
        loop: asyncio.AbstractEventLoop,
        path: str,
        max_frame_bytes: int,
        subject_as_username: str = "NONE",
    ) -> None:
        super().__init__(core, loop, subject_as_username)
        self.path = path  # WebSocket.Path
        # max_size = (message, frame): MQTT streams over frames, so only a frame is bounded.
        self.ws = ServerProtocol(
            subprotocols=list(SUBPROTOCOLS), max_size=(None, max_frame_bytes), logger=_library_log
        )

    # asyncio.Protocol (the rest as in tcp.py)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None
        ws = self.ws
        ws.receive_data(data)
        core = self.core
        try:
            for event in ws.events_received():
                if isinstance(event, Frame):
                    opcode = event.opcode
                    if opcode is Opcode.BINARY or opcode is Opcode.CONT:
                        payload = event.data
                        core.data_received(
                            conn, payload if type(payload) is bytes else bytes(payload), self.loop.time()
                        )
                    elif opcode is Opcode.TEXT:
                        log.info(
                            "client %r from %s: text frame over WebSocket, closing", conn.client_id, conn.peer
                        )
                        ws.fail(CloseCode.UNSUPPORTED_DATA, "MQTT travels in binary frames")
                        break
                elif isinstance(event, Request):
                    ws.send_response(self._handshake(event))
        except Exception:
            # A bug of ours must cost one connection, never the worker.
            log.exception("client %r from %s: internal error, closing", conn.client_id, conn.peer)
            conn.close("internal error", 0x83)
        self._send_pending()
        core.flush()

    def _handshake(self, request: Request) -> Response:
        ws = self.ws
        peer = self.conn.peer if self.conn is not None else "?"
        path = request.path.partition("?")[0]
        if path != self.path:
            log.info("WebSocket request from %s for %r: 404", peer, path[:200])
            return ws.reject(404, f"Not Found: MQTT over WebSocket is at {self.path}\n")
        response = ws.accept(request)
        if response.status_code == 101:
            return response
        if ws.handshake_exc is not None:
            # No subprotocol we speak (or a malformed upgrade): the library's 400 says why.
            log.info("WebSocket upgrade from %s refused: %s", peer, ws.handshake_exc)
        return response

    def _send_pending(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for chunk in self.ws.data_to_send():
            if not chunk:  # SEND_EOF: the library is done with this connection
                transport.close()
                return
            if not transport.is_closing():
                transport.write(chunk)

    # Link

    def write(self, data: bytes) -> None:
        transport = self.transport
        ws = self.ws
        if transport is None or transport.is_closing() or ws.state is not State.OPEN:
            return  # before the upgrade the core has nothing to say; after a close, nothing to add
        ws.send_binary(data)
        for chunk in ws.data_to_send():
            transport.write(chunk)

    def close(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.ws.state is State.OPEN and not transport.is_closing():
            self.ws.send_close(CloseCode.NORMAL_CLOSURE)
            for chunk in self.ws.data_to_send():
                if chunk:
                    transport.write(chunk)
        transport.close()


__all__ = ["SUBPROTOCOLS", "MqttWebSocketProtocol"]
