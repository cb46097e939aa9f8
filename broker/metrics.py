"""Counters of one worker.

Why: every drop and every refusal must be counted somewhere an operator can see it (the metrics
endpoint and `$SYS` of a later issue read these). Plain integer attributes: incrementing one is
the cheapest thing Python can do on the hot path.

Must not: do IO, aggregate across processes, or read the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class Counters:
    connections_accepted: int = 0
    connections_refused: int = 0
    protocol_errors: int = 0
    messages_received: int = 0
    messages_received_qos0: int = 0
    messages_received_qos1: int = 0
    messages_received_qos2: int = 0
    messages_sent: int = 0
    messages_sent_qos0: int = 0
    messages_sent_qos1: int = 0
    messages_sent_qos2: int = 0
    messages_dropped_qos0_slow_client: int = 0
    messages_dropped_queue_full: int = 0
    messages_dropped_too_large: int = 0
    messages_dropped_expired: int = 0
    messages_no_subscribers: int = 0
    messages_dropped_no_session: int = 0
    mesh_dropped_qos0: int = 0
    mesh_envelopes_sent: int = 0
    mesh_envelopes_received: int = 0
    mesh_bad_envelopes: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    wills_published: int = 0
    sessions_expired: int = 0
    sessions_taken_over: int = 0
    keepalive_timeouts: int = 0
    messages_refused_minority: int = 0
    # access (broker/ACCESS.md)
    tls_handshake_failures: int = 0
    auth_failures: int = 0  # CONNACK 0x86 / 0x04: unknown user, wrong or missing password
    connections_not_authorized: int = 0  # CONNACK 0x87 / 0x05: anonymous refused, will denied
    publish_denied: int = 0
    subscribe_denied: int = 0
    deliveries_denied: int = 0
    wills_denied: int = 0
    # limits against abuse (broker/ACCESS.md, Limits; broker/limits.py): refusals per limit,
    # shown as meshmq_limit_refusals_total{limit="publish_rate", ...}
    limit_publish_rate: int = 0
    limit_subscribe_rate: int = 0
    limit_subscriptions: int = 0
    limit_topic_levels: int = 0
    limit_topic_length: int = 0
    limit_connect_rate: int = 0

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
