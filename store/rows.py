"""Rows of the SQL backends' session tables as store records, for PostgreSQL and SQLite alike.

Why: both backends read sessions, their subscriptions and wills with the same column order; one
mapping keeps them from drifting. SQLite stores booleans as integers, so booleans are coerced
(a no-op for PostgreSQL's).

Must not: touch a database; know a dialect.
"""

from __future__ import annotations

from typing import Any

from store.records import SessionRecord, SubscriptionRecord, WillRecord

Row = tuple[Any, ...]  # a database row: its column types are the schema's, checked by the contract tests


def subscription_from_row(s: Row) -> SubscriptionRecord:
    """`(client_id, position, key_filter, topic_filter, qos, no_local, rap, rh, sub_id, group)`."""
    _client_id, _position, key_filter, topic_filter, qos, no_local, rap, rh, sub_id, group = s
    return SubscriptionRecord(
        key_filter,
        topic_filter,
        qos,
        bool(no_local),
        bool(rap),
        rh,
        sub_id,
        group,
    )


def session_from_row(row: Row, subs: list[SubscriptionRecord]) -> SessionRecord:
    """`(client_id, expiry_s, online, node, epoch, updated_at, will topic, payload, qos, retain,
    props, delay)`; a will is present when its payload is."""
    (
        client_id,
        expiry_s,
        online,
        node,
        epoch,
        updated_at,
        w_topic,
        w_payload,
        w_qos,
        w_retain,
        w_props,
        w_delay,
    ) = row
    will = (
        None if w_payload is None else WillRecord(w_topic, w_payload, w_qos, bool(w_retain), w_props, w_delay)
    )
    return SessionRecord(
        client_id,
        expiry_s,
        tuple(subs),
        will,
        bool(online),
        node,
        epoch,
        updated_at,
    )
