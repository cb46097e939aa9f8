"""DISCONNECT, PINGREQ and AUTH from a client.

Why: the end of a connection as the client means it — normal (the will is discarded
[MQTT-3.14.4-3]) or with will (0x04) — and a session expiry change at the last moment.

Must not: do IO or read the clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.protocol.connection import ServerConnection
from broker.protocol.errors import ProtocolError
from broker.protocol.packets import Auth, Disconnect, Packet, Pingreq, Pingresp
from broker.protocol.reasons import Reason

if TYPE_CHECKING:
    from broker.core import BrokerCore

PINGRESP = Pingresp()


def handle_disconnect(core: BrokerCore, conn: ServerConnection, packet: Disconnect, now: float) -> None:
    session = conn.session
    assert session is not None
    expiry = packet.properties.session_expiry_interval_s
    if expiry is not None:
        if session.expiry_interval_s == 0 and expiry != 0:
            # [MQTT-3.14.2-2]
            raise ProtocolError("DISCONNECT sets a session expiry after CONNECT said 0")
        session.expiry_interval_s = min(expiry, core.config.max_session_expiry_s)
    if packet.reason_code != Reason.DISCONNECT_WITH_WILL:
        conn.will_cleared = True  # [MQTT-3.14.4-3]
    conn.close(f"client disconnected (0x{packet.reason_code:02X})")


def handle_pingreq(core: BrokerCore, conn: ServerConnection, packet: Pingreq, now: float) -> None:
    conn.send(PINGRESP)  # [MQTT-3.12.4-1]


def handle_auth(core: BrokerCore, conn: ServerConnection, packet: Auth, now: float) -> None:
    # No authentication method was agreed in CONNECT, so AUTH is out of place [MQTT-4.12.0-1].
    raise ProtocolError("AUTH without an authentication method")


def handle_server_only(core: BrokerCore, conn: ServerConnection, packet: Packet, now: float) -> None:
    raise ProtocolError(f"{type(packet).__name__} is sent only by a server")
