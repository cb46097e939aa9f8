"""Which handler answers which packet: the one transition table of a connected client.

A packet before CONNECT never reaches this table (the decoder refuses it [MQTT-3.1.0-1]); a
packet other than CONNECT before CONNACK cannot arrive either, because the connection handles
CONNECT synchronously.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker.handlers.connect import handle_connect
from broker.handlers.disconnect import handle_auth, handle_disconnect, handle_pingreq, handle_server_only
from broker.handlers.publish import (
    handle_puback,
    handle_pubcomp,
    handle_publish,
    handle_pubrec,
    handle_pubrel,
)
from broker.handlers.subscribe import handle_subscribe, handle_unsubscribe
from broker.protocol import packets as p

if TYPE_CHECKING:
    from broker.core import BrokerCore
    from broker.protocol.connection import ServerConnection

# Each handler takes its own packet class; the table is indexed by that class, so the loose
# `Any` here is checked by construction.
Handler = Callable[["BrokerCore", "ServerConnection", Any, float], None]

TABLE: dict[type, Handler] = {
    p.Connect: handle_connect,
    p.Publish: handle_publish,
    p.Puback: handle_puback,
    p.Pubrec: handle_pubrec,
    p.Pubrel: handle_pubrel,
    p.Pubcomp: handle_pubcomp,
    p.Subscribe: handle_subscribe,
    p.Unsubscribe: handle_unsubscribe,
    p.Pingreq: handle_pingreq,
    p.Disconnect: handle_disconnect,
    p.Auth: handle_auth,
    p.Connack: handle_server_only,
    p.Suback: handle_server_only,
    p.Unsuback: handle_server_only,
    p.Pingresp: handle_server_only,
}
