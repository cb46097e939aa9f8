"""The per-connection IO loop over an asyncio byte stream: plain TCP, or TLS (TCPS).

Why: the only code that touches a client's socket. It hands bytes to the core with the loop's
monotonic time, and after each batch of work asks the core to flush, so that every connection
touched by that batch gets one write. It is the `Link` the core writes to.

Over TLS the same protocol runs above the loop's SSLProtocol (`broker/net/tls.py`): it sees
plaintext, and `connection_made` runs once the handshake has succeeded, so the verified client
certificate's identity is handed to the connection right after `open_connection`.

Must not: interpret MQTT. Invariants: `data_received` never raises; backpressure from the kernel
(pause_writing) is passed on to the core, which then holds QoS 1/2 in the session queue and
drops (and counts) QoS 0 for this client instead of buffering without bound.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from broker.core import BrokerCore
from broker.net.tls import transport_identity
from broker.protocol.connection import ServerConnection

log = logging.getLogger("broker.net")

# Above this many bytes waiting in a client's transport the client counts as slow.
WRITE_HIGH_WATER_BYTES = 1 << 20
WRITE_LOW_WATER_BYTES = 1 << 18


class MqttStreamProtocol(asyncio.Protocol):
    __slots__ = ("conn", "core", "loop", "subject_as_username", "transport")

    def __init__(
        self, core: BrokerCore, loop: asyncio.AbstractEventLoop, subject_as_username: str = "NONE"
    ) -> None:
        self.core = core
        self.loop = loop
        self.subject_as_username = subject_as_username  # TLS.UseSubjectAsUsername: NONE | CN | DN
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only compatible with it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER_BYTES, WRITE_LOW_WATER_BYTES)
        peer = transport.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.conn = conn = self.core.open_connection(peer_text, self, self.loop.time())
        if self.subject_as_username != "NONE":
            conn.tls_identity = transport_identity(transport, self.subject_as_username)

    def data_received(self, data: bytes) -> None:
        core = self.core
        conn = self.conn
        assert conn is not None
        try:
            core.data_received(conn, data, self.loop.time())
        except Exception:
            # A bug of ours must cost one connection, never the worker.
            log.exception("client %r from %s: internal error, closing", conn.client_id, conn.peer)
            conn.close("internal error", 0x83)
        core.flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            self.core.connection_lost(conn, self.loop.time())
        except Exception:
            log.exception("client %r: internal error while closing", conn.client_id)
        self.core.flush()

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.core.write_paused(self.conn)

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.core.writable_again(self.conn, self.loop.time())
            self.core.flush()

    # Link

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
