"""Small pieces the packet handlers share."""

from __future__ import annotations

import logging

from broker.protocol.connection import ServerConnection
from broker.protocol.packets import Connack, ProtocolVersion
from broker.protocol.reasons import Reason, connack_code_v311

log = logging.getLogger("broker.handlers")

# CONNACK for a CONNECT whose protocol level we do not speak, in the 3.1.1 form every client
# version can read: return code 0x01 [MQTT-3.1.2-2].
CONNACK_UNSUPPORTED_VERSION = b"\x20\x02\x00\x01"


def refuse_connect(conn: ServerConnection, reason: Reason, text: str, *, logged: bool = True) -> None:
    """Answer CONNECT with a failure CONNACK and close [MQTT-3.2.2-6, -7]; `logged=False` for a
    caller that rate-limits its own log lines (broker/limits.py)."""
    code = int(reason) if conn.version is ProtocolVersion.V5 else connack_code_v311(reason)
    if logged:
        log.warning(
            "client %r from %s: connection refused, 0x%02X %s: %s",
            conn.client_id or "-",
            conn.peer,
            int(reason),
            reason.name,
            text,
        )
    conn.send(Connack(False, code))
    conn.close(f"connect refused: {text} (0x{int(reason):02X})")


def is_utf8(data: bytes) -> bool:
    """Payload Format Indicator 1 promises UTF-8 [MQTT-3.3.2-4]."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
