"""Limits against abuse: the `Limits` section of `meshmq.yaml` (broker/ACCESS.md, the table there
is the spec).

Why: one client must not be able to flood a worker with PUBLISHes or SUBSCRIBEs, grow a session's
subscriptions without bound, send topics so deep or long that matching and storing them costs
the broker, or open connections faster than the broker can accept them. The state those limits
need, the checks, and what a refusal looks like on the wire live here, so that each handler pays
one `if conn.limits is not None` (or `if limits.active`) when no limit is configured.

Must not: read the clock (every check takes `now`); do IO; close a connection for exceeding a
rate (a refusal answers the one packet; only the connection rate refuses the connection);
log every refusal (at most once per client, or source address, and limit per minute: a flood
must not become a log flood).

Invariants:
- `conn.limits` is a `ClientLimits` when any per-client limit is set or the connection was
  refused by the connection rate, else None.
- A refused PUBLISH is never routed or retained; a 5.0 QoS 2 PUBLISH refused with PUBREC >= 0x80
  never enters `inbound_qos2` (the refusal ends its flow [MQTT-4.3.3]); a 3.1.1 QoS 1/2 one is
  acknowledged as usual, since 3.1.1 has no way to say no [MQTT-3.3.5-2].
- Every refusal is counted in `Counters.limit_<name>` (metrics: `meshmq_limit_refusals_total`).
- Memory is bounded: at most `max_addresses` source addresses and `max_keys` log throttle keys.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Final

from broker.config_access import LimitsConfig
from broker.handlers.common import refuse_connect
from broker.protocol.packets import ProtocolVersion, Publish, Suback, Subscribe
from broker.protocol.reasons import Reason

if TYPE_CHECKING:
    from broker.core import BrokerCore
    from broker.protocol.connection import ServerConnection
    from broker.session import Session

log = logging.getLogger("broker.limits")

V5 = ProtocolVersion.V5

# The counter suffix of each limit (Counters.limit_<name>, label `limit` in /metrics) and the
# configuration key an operator changes.
LIMIT_KEYS: Final = {
    "publish_rate": "MaxPublishRate",
    "subscribe_rate": "MaxSubscribeRate",
    "subscriptions": "MaxSubscriptions",
    "topic_levels": "MaxTopicLevels",
    "topic_length": "MaxTopicLength",
    "connect_rate": "MaxConnectRate",
}

LOG_INTERVAL_S: Final = 60.0
CONNECT_WINDOW_S: Final = 1.0
MAX_ADDRESSES: Final = 100_000
MAX_LOG_KEYS: Final = 10_000
# A bucket refilled for exactly one token's time holds 1.0 up to a rounding error.
_EPSILON: Final = 1e-9


# -- the pure parts ------------------------------------------------------------------------------


class TokenBucket:
    """`rate_per_s` tokens a second, at most `burst` saved up; starts full."""

    __slots__ = ("burst", "rate_per_s", "tokens", "updated_at")

    def __init__(self, rate_per_s: float, burst: float) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate_per_s > 0 and burst >= 1, got {rate_per_s}, {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = float(burst)
        self.updated_at: float | None = None

    def take(self, now: float) -> bool:
        """Take one token if there is one; a clock that steps back refills nothing."""
        updated_at = self.updated_at
        tokens = self.tokens
        if updated_at is not None and now > updated_at:
            tokens = min(self.burst, tokens + (now - updated_at) * self.rate_per_s)
        if updated_at is None or now > updated_at:
            self.updated_at = now
        if tokens >= 1.0 - _EPSILON:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False


class ConnectRate:
    """New connections per source address in one-second windows, at most `limit_per_s` each.

    A window starts with the first connection of an address after the last window ended; every
    attempt counts, refused or not. Windows are kept oldest first: expired ones are dropped as
    new addresses come, and beyond `max_addresses` the oldest live one is forgotten (that address
    gets a fresh window: bounded memory wins over exactness under an address flood).
    """

    __slots__ = ("limit_per_s", "max_addresses", "window_s", "windows")

    def __init__(
        self, limit_per_s: int, max_addresses: int = MAX_ADDRESSES, window_s: float = CONNECT_WINDOW_S
    ) -> None:
        if limit_per_s < 1 or max_addresses < 1:
            raise ValueError("ConnectRate needs limit_per_s >= 1 and max_addresses >= 1")
        self.limit_per_s = limit_per_s
        self.max_addresses = max_addresses
        self.window_s = window_s
        # address -> (window start, attempts in it), by window start
        self.windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def allow(self, address: str, now: float) -> bool:
        windows = self.windows
        entry = windows.get(address)
        if entry is not None and now - entry[0] < self.window_s:
            count = entry[1] + 1
            windows[address] = (entry[0], count)
            return count <= self.limit_per_s
        if entry is not None:
            windows.move_to_end(address)
        else:
            self._evict(now)
        windows[address] = (now, 1)
        return True

    def _evict(self, now: float) -> None:
        windows = self.windows
        while windows:
            first = next(iter(windows.values()))
            if now - first[0] < self.window_s and len(windows) < self.max_addresses:
                return
            windows.popitem(last=False)

    def __len__(self) -> int:
        return len(self.windows)


class LogThrottle:
    """Whether a key (client or address, limit) may be logged: once per `interval_s`."""

    __slots__ = ("interval_s", "last", "max_keys")

    def __init__(self, interval_s: float = LOG_INTERVAL_S, max_keys: int = MAX_LOG_KEYS) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self.last: OrderedDict[tuple[str, str], float] = OrderedDict()  # by time of the last log

    def due(self, key: tuple[str, str], now: float) -> bool:
        last = self.last
        at = last.get(key)
        if at is not None and now - at < self.interval_s:
            return False
        last[key] = now
        last.move_to_end(key)
        while last and (len(last) > self.max_keys or now - next(iter(last.values())) >= self.interval_s):
            last.popitem(last=False)
        return True


def topic_over_limits(topic: str, max_levels: int, max_length: int) -> str | None:
    """Which limit a topic name or filter exceeds ("topic_levels", "topic_length"), or None.
    0 = no limit; the length is in UTF-8 bytes."""
    if max_levels and topic.count("/") >= max_levels:
        return "topic_levels"
    if max_length and len(topic) * 4 > max_length and len(topic.encode()) > max_length:
        return "topic_length"
    return None


def source_address(peer: str) -> str:
    """The address part of a peer text: "1.2.3.4:5" -> "1.2.3.4", "[::1]:5" and "::1:5" -> "::1"."""
    if peer.startswith("["):
        end = peer.find("]")
        return peer[1:end] if end > 0 else peer
    address, colon, _port = peer.rpartition(":")
    return address if colon else peer


class ClientLimits:
    """The limit state of one connection (`ServerConnection.limits`)."""

    __slots__ = ("connect_refused", "publish", "subscribe")

    def __init__(self, config: LimitsConfig, connect_refused: bool = False) -> None:
        self.connect_refused = connect_refused  # by the connection rate: its CONNECT is refused
        # burst = one second's worth (broker/ACCESS.md)
        rate = config.max_publish_rate
        self.publish = TokenBucket(rate, rate) if rate else None
        rate = config.max_subscribe_rate
        self.subscribe = TokenBucket(rate, rate) if rate else None


class WorkerLimits:
    """The limit state of one worker: its share of the connection rate, the log throttle."""

    __slots__ = ("active", "config", "connect_rate", "log_throttle", "per_client", "topics")

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self.connect_rate = ConnectRate(config.max_connect_rate) if config.max_connect_rate else None
        self.topics = bool(config.max_topic_levels or config.max_topic_length)
        self.per_client = bool(
            config.max_publish_rate or config.max_subscribe_rate or config.max_subscriptions or self.topics
        )
        self.active = self.per_client or self.connect_rate is not None
        self.log_throttle = LogThrottle()

    def open(self, peer: str, now: float) -> ClientLimits | None:
        """A new connection from `peer` ("ip:port"): its limit state, None if it needs none."""
        rate = self.connect_rate
        refused = rate is not None and not rate.allow(source_address(peer), now)
        if not refused and not self.per_client:
            return None
        return ClientLimits(self.config, refused)


# -- refusals, as the handlers call them ---------------------------------------------------------


def _refused(core: BrokerCore, conn: ServerConnection, limit: str, detail: str, now: float) -> None:
    """Count a refusal, and log it unless this client (address) was logged for it lately."""
    counters = core.counters
    name = f"limit_{limit}"
    setattr(counters, name, getattr(counters, name) + 1)
    who = source_address(conn.peer) if limit == "connect_rate" or not conn.client_id else conn.client_id
    if core.limits.log_throttle.due((who, limit), now):
        log.warning(
            "client %r from %s: refused by Limits.%s (%s); more of these refusals of this %s are "
            "not logged for %d s",
            conn.client_id or "-",
            conn.peer,
            LIMIT_KEYS[limit],
            detail,
            "address" if limit == "connect_rate" else "client",
            int(LOG_INTERVAL_S),
        )


def _topic_detail(limit: str, topic: str, config: LimitsConfig) -> str:
    if limit == "topic_levels":
        return f"{topic.count('/') + 1} levels, at most {config.max_topic_levels}"
    return f"{len(topic.encode())} bytes, at most {config.max_topic_length}"


def publish_refused(
    limits: ClientLimits, core: BrokerCore, conn: ServerConnection, packet: Publish, topic: str, now: float
) -> bool:
    """Refuse a PUBLISH over the publish rate or the topic limits (True: the handler stops).

    5.0 QoS 1/2: PUBACK / PUBREC 0x97 (rate) or 0x90 (topic), in the order of the acks; QoS 0 and
    3.1.1: dropped, 3.1.1 QoS 1/2 acknowledged as usual [MQTT-3.3.5-2].
    """
    bucket = limits.publish
    config = core.limits_config
    if bucket is not None and not bucket.take(now):
        _refused(core, conn, "publish_rate", f"{config.max_publish_rate}/s", now)
        _refuse_publish(conn, packet, Reason.QUOTA_EXCEEDED)
        return True
    if core.limits.topics:
        over = topic_over_limits(topic, config.max_topic_levels, config.max_topic_length)
        if over is not None:
            _refused(core, conn, over, f"topic {topic[:80]!r}: {_topic_detail(over, topic, config)}", now)
            _refuse_publish(conn, packet, Reason.TOPIC_NAME_INVALID)
            return True
    return False


def _refuse_publish(conn: ServerConnection, packet: Publish, reason: Reason) -> None:
    # publish.py imports this module: its refusal (which keeps the ack order) comes late
    from broker.handlers.publish import refuse_publish

    session = conn.session
    assert session is not None
    refuse_publish(conn, session, packet, reason)


def subscribe_refused(
    limits: ClientLimits, core: BrokerCore, conn: ServerConnection, packet: Subscribe, now: float
) -> bool:
    """Refuse a whole SUBSCRIBE over the subscribe rate: every filter 0x97 (3.1.1: 0x80)."""
    bucket = limits.subscribe
    if bucket is None or bucket.take(now):
        return False
    _refused(core, conn, "subscribe_rate", f"{core.limits_config.max_subscribe_rate}/s", now)
    code = Reason.QUOTA_EXCEEDED if conn.version is V5 else Reason.UNSPECIFIED_ERROR
    conn.send(Suback(packet.packet_id, (int(code),) * len(packet.subscriptions)))
    return True


def filter_refusal(
    limits: ClientLimits,
    core: BrokerCore,
    conn: ServerConnection,
    session: Session,
    key_filter: str,
    topic_filter: str,
    now: float,
) -> int:
    """The SUBACK code refusing one filter of a SUBSCRIBE, or 0 to accept it.

    `key_filter` is the filter as the client wrote it (the session's key), `topic_filter` the
    filter without `$share/group/` (the one the topic limits apply to). Topic limits: 0x8F;
    MaxSubscriptions: 0x97 for a new filter beyond it (a replaced one is not new); 3.1.1: 0x80.
    """
    config = core.limits_config
    v5 = conn.version is V5
    if core.limits.topics:
        over = topic_over_limits(topic_filter, config.max_topic_levels, config.max_topic_length)
        if over is not None:
            detail = f"filter {key_filter[:80]!r}: {_topic_detail(over, topic_filter, config)}"
            _refused(core, conn, over, detail, now)
            return int(Reason.TOPIC_FILTER_INVALID if v5 else Reason.UNSPECIFIED_ERROR)
    limit = config.max_subscriptions
    if limit and key_filter not in session.subscriptions and len(session.subscriptions) >= limit:
        _refused(core, conn, "subscriptions", f"filter {key_filter[:80]!r}: {limit} held already", now)
        return int(Reason.QUOTA_EXCEEDED if v5 else Reason.UNSPECIFIED_ERROR)
    return 0


def connect_refused(limits: ClientLimits, core: BrokerCore, conn: ServerConnection, now: float) -> bool:
    """Refuse the CONNECT of a connection opened over the connection rate of its address:
    CONNACK 0x9F (3.1.1: 0x03) and close."""
    if not limits.connect_refused:
        return False
    core.counters.connections_refused += 1
    _refused(core, conn, "connect_rate", f"{core.limits_config.max_connect_rate}/s from this address", now)
    refuse_connect(conn, Reason.CONNECTION_RATE_EXCEEDED, "connection rate exceeded", logged=False)
    return True


def will_refused(
    limits: ClientLimits, core: BrokerCore, conn: ServerConnection, topic: str, now: float
) -> bool:
    """Refuse a CONNECT whose will topic is over the topic limits: CONNACK 0x90 (3.1.1: 0x03,
    since 0x02 "identifier rejected" would mislead)."""
    if not core.limits.topics:
        return False
    config = core.limits_config
    over = topic_over_limits(topic, config.max_topic_levels, config.max_topic_length)
    if over is None:
        return False
    _refused(core, conn, over, f"will topic {topic[:80]!r}: {_topic_detail(over, topic, config)}", now)
    refuse_connect(conn, Reason.TOPIC_NAME_INVALID, "will topic over the topic limits", logged=False)
    return True
