"""The one error family of the MQTT core.

Every error the sans-IO code raises carries the MQTT 5 reason code that the connection is closed
with, so the single place that catches it (the connection's IO loop) can send DISCONNECT (5.0) or
just close (3.1.1) and log one line.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.protocol.reasons import Reason


class MQTTError(Exception):
    """A protocol violation by the peer; `reason_code` is what a 5.0 DISCONNECT carries."""

    reason_code: int = Reason.UNSPECIFIED_ERROR
    # Set by the decoder: the good packets that came before the bad one in the same read.
    packets_before: Sequence[object] = ()

    def __init__(self, message: str, reason_code: int | None = None) -> None:
        super().__init__(message)
        if reason_code is not None:
            self.reason_code = reason_code


class MalformedPacket(MQTTError):
    reason_code = Reason.MALFORMED_PACKET


class ProtocolError(MQTTError):
    reason_code = Reason.PROTOCOL_ERROR


class PacketTooLarge(MQTTError):
    reason_code = Reason.PACKET_TOO_LARGE


class TopicAliasInvalid(MQTTError):
    reason_code = Reason.TOPIC_ALIAS_INVALID


class ReceiveMaximumExceeded(MQTTError):
    reason_code = Reason.RECEIVE_MAXIMUM_EXCEEDED


class UnsupportedProtocolVersion(MQTTError):
    """CONNECT named a protocol level we do not speak; answered with CONNACK, not DISCONNECT."""

    reason_code = Reason.UNSUPPORTED_PROTOCOL_VERSION
