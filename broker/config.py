"""The node's configuration: YAML in, one validated, frozen `Config` out.

Why: an operator's mistake in `meshmq.yaml` must stop the broker at start with a message that
names the key (`MQTT.MaxInflight: must be an integer from 1 to 65535, got 'abc'`), never surface
later as a stack trace in a worker. Every key of the file is declared once, in a table per
section (YAML key -> dataclass field, converter); the generic `_Section` walks the table. A new
section is one frozen dataclass, one `_Section(...)` table and one row in its parent's table.

This module is the one the rest of the broker imports, and re-exports the whole public API. The
generic converters and `_Section` live in `broker/config_values.py`, the Mesh and Cluster
sections in `broker/config_mesh.py`; this module keeps `Config`, the MQTT, Logging and
SessionStore sections, the top-level table, loading and `with_overrides`.

Must not: read anything but the file and the environment; keep dicts past this module (values
leave as frozen dataclasses); accept a key it does not know (a typo would otherwise be ignored
silently); accept a section before the code that honours it exists.

Invariants (those of every key's value are stated in `broker/config_values.py`, those between
Mesh keys in `broker/config_mesh.py`):
- Duplicate keys in one YAML mapping are an error (PyYAML would keep the last one silently).
- `Config.cluster` is true when `-cluster` was given or `Cluster.Enabled: true`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

import yaml

from broker.config_access import (
    AUTH,
    LIMITS,
    TLS,
    WEBSOCKET,
    AclRule,
    AuthConfig,
    LimitsConfig,
    TlsConfig,
    WebSocketConfig,
    check_access,
)
from broker.config_mesh import (
    _CLUSTER,
    _HTTP,
    _MESH,
    ClusterConfig,
    CurveConfig,
    DnsConfig,
    HttpConfig,
    MdnsConfig,
    MeshConfig,
    SplitBrainConfig,
    TcpIpConfig,
    _check_mesh,
)
from broker.config_values import (
    _MAX_U16,
    _NODE_NAME,
    ConfigError,
    _boolean,
    _choice,
    _expand_env,
    _integer,
    _listen_address,
    _positive_seconds,
    _show,
    _text,
)
from broker.config_values import _Section as _Section  # re-exported: tests walk the key tables

__all__ = [
    "LOG_LEVELS",
    "AclRule",
    "AuthConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "CurveConfig",
    "DnsConfig",
    "HttpConfig",
    "LimitsConfig",
    "LoggingConfig",
    "MdnsConfig",
    "MeshConfig",
    "MqttConfig",
    "PostgresConfig",
    "SessionStoreConfig",
    "SplitBrainConfig",
    "SqliteConfig",
    "StoreType",
    "TcpIpConfig",
    "TlsConfig",
    "WebSocketConfig",
    "load_config",
    "parse_config",
    "with_overrides",
]

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_MAX_PACKET_BYTES: Final = 268_435_455  # the largest Remaining Length an MQTT packet can carry
_MAX_U32: Final = 4_294_967_295


class StoreType(Enum):
    SQLITE = "SQLITE"
    POSTGRES = "POSTGRES"
    MEMORY = "MEMORY"


@dataclass(frozen=True, slots=True)
class MqttConfig:
    max_connections: int = 100_000
    max_packet_bytes: int = _MAX_PACKET_BYTES
    max_inflight: int = 100  # Receive Maximum, both ways
    max_queued_messages: int = 1000  # per session
    connect_timeout_s: float = 10.0
    max_keepalive_s: int = _MAX_U16
    max_session_expiry_s: int = _MAX_U32
    max_topic_alias: int = _MAX_U16
    retain_available: bool = True
    maximum_qos: int = 2
    response_information: str = ""
    allow_empty_client_id: bool = True
    max_retained_messages: int = 1_000_000
    sys_interval_s: int = 10  # MQTT.SysInterval: seconds between $SYS updates; 0 = none


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "INFO"
    loggers: tuple[tuple[str, str], ...] = ()  # (logger name, level), in file order


@dataclass(frozen=True, slots=True)
class SqliteConfig:
    path: str = "data/meshmq.db"


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    url: str = "postgresql://127.0.0.1:5432/meshmq"
    user: str = ""
    password: str = field(default="", repr=False)  # never printed with the config
    schema: str = "meshmq"
    pool_size: int = 8


@dataclass(frozen=True, slots=True)
class SessionStoreConfig:
    type: StoreType = StoreType.SQLITE
    sqlite: SqliteConfig = field(default_factory=SqliteConfig)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)


@dataclass(frozen=True, slots=True)
class Config:
    node_name: str = field(default_factory=socket.gethostname)
    workers: int = 0  # 0: one per core
    listen_address: str = "0.0.0.0"
    tcp_port: int = 1883  # 0: no plain TCP listener
    tls_port: int = 0  # TCPS: MQTT over TLS; 0 = off
    ws_port: int = 0  # WS: MQTT over WebSocket; 0 = off
    wss_port: int = 0  # WSS: MQTT over WebSocket over TLS; 0 = off
    worker_port_base: int = 0  # >0: worker N also listens on this + N (tests, benchmarks, debugging)
    shutdown_grace_s: float = 10.0  # SIGTERM: time for clients to be told and workers to drain
    cluster: bool = False  # cluster mode: -cluster on the command line or Cluster.Enabled: true
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    session_store: SessionStoreConfig = field(default_factory=SessionStoreConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    cluster_config: ClusterConfig = field(default_factory=ClusterConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    @property
    def worker_count(self) -> int:
        """`workers`, or the number of cores this process may run on when it is 0."""
        if self.workers:
            return self.workers
        try:
            return len(os.sched_getaffinity(0)) or 1
        except AttributeError:  # platforms without sched_getaffinity
            return os.cpu_count() or 1


# --- converters of these sections ----------------------------------------------------------------

_level: Final = _choice(LOG_LEVELS, str)
_store_type: Final = _choice(tuple(t.value for t in StoreType), StoreType)


def _logger_levels(value: object, key: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping of logger name to level, got {_show(value)}")
    pairs: list[tuple[str, str]] = []
    for name, level in value.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}: logger names must be non-empty strings, got {_show(name)}")
        path = f"{key}.{name}"
        pairs.append((name, _level(_expand_env(level, path) if isinstance(level, str) else level, path)))
    return tuple(pairs)


# --- sections (Mesh and Cluster: broker/config_mesh.py) ---------------------------------------------

_MQTT: Final = _Section(
    MqttConfig,
    {
        "MaxConnections": ("max_connections", _integer(1)),
        "MaxPacketSize": ("max_packet_bytes", _integer(128, _MAX_PACKET_BYTES)),
        "MaxInflight": ("max_inflight", _integer(1, _MAX_U16)),
        "MaxQueuedMessages": ("max_queued_messages", _integer(0)),
        "ConnectTimeout": ("connect_timeout_s", _positive_seconds),
        "MaxKeepAlive": ("max_keepalive_s", _integer(1, _MAX_U16)),
        "MaxSessionExpiry": ("max_session_expiry_s", _integer(0, _MAX_U32)),
        "MaxTopicAlias": ("max_topic_alias", _integer(0, _MAX_U16)),
        "RetainAvailable": ("retain_available", _boolean),
        "MaximumQoS": ("maximum_qos", _integer(0, 2)),
        "ResponseInformation": ("response_information", _text()),
        "AllowEmptyClientId": ("allow_empty_client_id", _boolean),
        "MaxRetainedMessages": ("max_retained_messages", _integer(0)),
        "SysInterval": ("sys_interval_s", _integer(0, 86400)),
    },
)

_LOGGING: Final = _Section(
    LoggingConfig, {"Level": ("level", _level), "Loggers": ("loggers", _logger_levels)}
)

_SQLITE: Final = _Section(SqliteConfig, {"Path": ("path", _text(expected="a file path", allow_empty=False))})

_POSTGRES: Final = _Section(
    PostgresConfig,
    {
        "Url": ("url", _text(expected="a PostgreSQL connection URL or conninfo string", allow_empty=False)),
        "User": ("user", _text()),
        "Pass": ("password", _text()),
        # The schema name is put into SQL text (search_path, DDL), so only a plain identifier passes.
        "Schema": ("schema", _text(pattern=r"[a-z_][a-z0-9_]{0,62}", expected="a lower-case SQL identifier")),
        "PoolSize": ("pool_size", _integer(1, 1000)),
    },
)

_SESSION_STORE: Final = _Section(
    SessionStoreConfig,
    {"Type": ("type", _store_type), "SQLite": ("sqlite", _SQLITE), "Postgres": ("postgres", _POSTGRES)},
)

_WORKERS: Final = _integer(0, 1024)
_TCP_PORT: Final = _integer(0, _MAX_U16)

_TOP: Final = _Section(
    Config,
    {
        "NodeName": ("node_name", _NODE_NAME),
        "Workers": ("workers", _WORKERS),
        "ListenAddress": ("listen_address", _listen_address),
        "TCP": ("tcp_port", _TCP_PORT),
        "TCPS": ("tls_port", _TCP_PORT),
        "WS": ("ws_port", _TCP_PORT),
        "WSS": ("wss_port", _TCP_PORT),
        "TLS": ("tls", TLS),
        "WebSocket": ("websocket", WEBSOCKET),
        "Auth": ("auth", AUTH),
        "Limits": ("limits", LIMITS),
        "WorkerPortBase": ("worker_port_base", _integer(0, _MAX_U16 - 1024)),
        "ShutdownGrace": ("shutdown_grace_s", _positive_seconds),
        "MQTT": ("mqtt", _MQTT),
        "Cluster": ("cluster_config", _CLUSTER),
        "Http": ("http", _HTTP),
        "Mesh": ("mesh", _MESH),
        "SessionStore": ("session_store", _SESSION_STORE),
        "Logging": ("logging", _LOGGING),
    },
)


# --- loading ------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys in a mapping instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[object, object]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, str | int | float | bool | None):
            continue  # an unhashable key: construct_mapping reports it as a YAML error
        if key in seen:
            raise ConfigError(f"{key}: duplicate key (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return dict(loader.construct_mapping(node))


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_config(data: object, source: str = "<config>") -> Config:
    """Build a `Config` from parsed YAML (`None`, as from an empty file, means all defaults)."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values, got {_show(data)}")
    config = _TOP(data, "")
    _check_mesh(config.mesh)
    check_access(
        config.tls,
        config.auth,
        (config.tls_port, config.wss_port),
        config.session_store.type is not StoreType.MEMORY,
    )
    return dataclasses.replace(config, cluster=config.cluster or config.cluster_config.enabled)


def load_config(path: str | None) -> Config:
    """Read and validate the YAML file at `path`; `None` gives all defaults."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:  # bytes: PyYAML decodes, and reports bad encodings as YAMLError
            data = yaml.load(f, Loader=_StrictLoader)  # a SafeLoader subclass
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e}") from e
    except yaml.YAMLError as e:  # syntax, and bytes that are not UTF-8
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return parse_config(data, path)


def with_overrides(
    config: Config,
    *,
    workers: int | None = None,
    tcp_port: int | None = None,
    log_level: str | None = None,
    cluster: bool | None = None,
) -> Config:
    """Apply command-line options on top of the file, validated like the file's keys."""
    logging_config = config.logging
    if log_level is not None:
        logging_config = dataclasses.replace(logging_config, level=_level(log_level, "Logging.Level (-log)"))
    return dataclasses.replace(
        config,
        workers=config.workers if workers is None else _WORKERS(workers, "Workers (-workers)"),
        tcp_port=config.tcp_port if tcp_port is None else _TCP_PORT(tcp_port, "TCP (-port)"),
        logging=logging_config,
        # -cluster switches cluster mode on; it cannot switch off a file's Cluster.Enabled: true.
        cluster=config.cluster if cluster is None else cluster or config.cluster_config.enabled,
    )
