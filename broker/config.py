"""The node's configuration: YAML in, one validated, frozen `Config` out.

Why: an operator's mistake in `meshmq.yaml` must stop the broker at start with a message that
names the key (`MQTT.MaxInflight: must be an integer from 1 to 65535, got 'abc'`), never surface
later as a stack trace in a worker. Every key of the file is declared once, in a table per
section (YAML key -> dataclass field, converter); the generic `_Section` walks the table. A new
section is one frozen dataclass, one `_Section(...)` table and one row in its parent's table.

Must not: read anything but the file and the environment; keep dicts past this module (values
leave as frozen dataclasses); accept a key it does not know (a typo would otherwise be ignored
silently); accept the sections reserved for later work (Http, TCPS, WS, WSS, Auth, and
Cluster.SplitBrainProtection / Cluster.MergePolicy) before the code that honours them exists.

Invariants:
- Keys are case-sensitive CamelCase; an unknown key is an error that lists the allowed keys.
- Every `ConfigError` message starts with the dotted key path (or the file name for errors of
  the file as a whole).
- Booleans must be YAML booleans (`true`/`false`), integers must be integers (YAML `1.0` or
  `true` is not an integer); the only strings turned into numbers or booleans are those that
  came from `${VAR}` expansion, since the environment has no other way to carry them.
- `${NAME}` and `${NAME:-default}` are expanded in every string value; `$${` is a literal `${`.
  A missing variable without a default is an error naming the key and the variable.
- Duplicate keys in one YAML mapping are an error (PyYAML would keep the last one silently).
- List items are named `Key[index]` in errors (`Mesh.TcpIp.Members[2]: ...`); rules that tie
  keys together (timeouts in order, mDNS needs interfaces) are checked after the whole file is
  read and name the key to change.
- `Config.cluster` is true when `-cluster` was given or `Cluster.Enabled: true`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Final, Generic, TypeVar

import yaml

from mesh.discovery.static import parse_member

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "LOG_LEVELS",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "CurveConfig",
    "DnsConfig",
    "LoggingConfig",
    "MdnsConfig",
    "MeshConfig",
    "MqttConfig",
    "PostgresConfig",
    "SessionStoreConfig",
    "SqliteConfig",
    "StoreType",
    "TcpIpConfig",
    "load_config",
    "parse_config",
    "with_overrides",
]

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_MAX_PACKET_BYTES: Final = 268_435_455  # the largest Remaining Length an MQTT packet can carry
_MAX_U16: Final = 65_535
_MAX_U32: Final = 4_294_967_295


class ConfigError(Exception):
    """A configuration value the broker cannot run with; the message starts with the key path."""


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
class CurveConfig:
    key_file: str = ""  # Mesh.Curve.KeyFile: this node's key pair, or the cluster's shared pair
    # Mesh.Curve.AllowedKeysDir: per-node mode: <NodeName>.key public keys of the nodes allowed to join
    allowed_keys_dir: str = ""


@dataclass(frozen=True, slots=True)
class TcpIpConfig:
    enabled: bool = True
    members: tuple[str, ...] = ()  # Mesh.TcpIp.Members: "host", "host:port", "a.b.c.d-e", "name@host[:port]"


@dataclass(frozen=True, slots=True)
class MdnsConfig:
    enabled: bool = False
    # IPv4 addresses of the interfaces to use; REQUIRED (non-empty) when enabled
    interfaces: tuple[str, ...] = ()
    announce_interval_ms: int = 5000  # range 500..600000


@dataclass(frozen=True, slots=True)
class DnsConfig:
    enabled: bool = False
    names: tuple[str, ...] = ()  # "name" or "name:port"; REQUIRED non-empty when enabled
    refresh_ms: int = 5000  # 500..600000


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """The node's ZeroMQ mesh (see mesh/PROTOCOL.md) and its links to the other nodes."""

    ipc_dir: str = (
        ""  # Mesh.IpcDir; "" = $XDG_RUNTIME_DIR/meshmq-<NodeName>, else /tmp/meshmq-<uid>-<NodeName>
    )
    send_hwm: int = (
        1000  # Mesh.SendHwm, envelopes (of at most 64 messages) queued per peer before backpressure
    )
    recv_hwm: int = 1000  # Mesh.RecvHwm
    heartbeat_ms: int = 1000  # Mesh.HeartbeatMs, worker -> relay
    handoff_timeout_ms: int = 3000  # Mesh.HandoffTimeoutMs, waiting for a session from another worker
    cluster_name: str = "meshmq"  # Mesh.ClusterName: same text pattern as NodeName
    port: int = 7946  # Mesh.Port: the relay's tcp port for other nodes, 1..65535
    bind_address: str = ""  # Mesh.BindAddress: "" = ListenAddress; validated like ListenAddress
    # Mesh.AdvertiseAddress: address other nodes reach us at; "" = BindAddress if it is a specific
    # address, else the address the host name resolves to
    advertise_address: str = ""
    peer_heartbeat_ms: int = 500  # Mesh.PeerHeartbeatMs 50..60000
    suspect_after_ms: int = 1500  # Mesh.SuspectAfterMs 100..600000
    dead_after_ms: int = 4000  # Mesh.DeadAfterMs 200..600000; > SuspectAfterMs > PeerHeartbeatMs
    plaintext: bool = False  # Mesh.Plaintext: allow cluster links without CURVE (logged as a warning)
    curve: CurveConfig = field(default_factory=CurveConfig)
    tcp_ip: TcpIpConfig = field(default_factory=TcpIpConfig)
    mdns: MdnsConfig = field(default_factory=MdnsConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    enabled: bool = False  # Cluster.Enabled: same as -cluster
    # Cluster.ServerReference: sent to MQTT 5 clients with DISCONNECT 0x9C when this node drains
    # ("" = 0x8B without reference)
    server_reference: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    node_name: str = field(default_factory=socket.gethostname)
    workers: int = 0  # 0: one per core
    listen_address: str = "0.0.0.0"
    tcp_port: int = 1883  # 0: no plain TCP listener
    worker_port_base: int = 0  # >0: worker N also listens on this + N (tests, benchmarks, debugging)
    shutdown_grace_s: float = 10.0  # SIGTERM: time for clients to be told and workers to drain
    cluster: bool = False  # cluster mode: -cluster on the command line or Cluster.Enabled: true
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    session_store: SessionStoreConfig = field(default_factory=SessionStoreConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    cluster_config: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def worker_count(self) -> int:
        """`workers`, or the number of cores this process may run on when it is 0."""
        if self.workers:
            return self.workers
        try:
            return len(os.sched_getaffinity(0)) or 1
        except AttributeError:  # platforms without sched_getaffinity
            return os.cpu_count() or 1


# --- values: environment expansion and display -----------------------------------------------


class _Expanded(str):
    """A string that went through `${VAR}` expansion: numeric and boolean keys may parse it."""

    __slots__ = ()


_ENV_REF: Final = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(text: str, key: str) -> str:
    if "${" not in text:
        return text
    leftover = _ENV_REF.sub("", text)
    if "${" in leftover:
        bad = leftover[leftover.index("${") :]
        raise ConfigError(
            f"{key}: malformed environment reference {bad!r}; write ${{NAME}} or ${{NAME:-default}}"
        )

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name, default = m.group(1), m.group(2)
        value = os.environ.get(name)
        if default is not None:  # ${NAME:-default}: unset or empty takes the default, as in sh
            return value or default
        if value is None:
            raise ConfigError(
                f"{key}: environment variable {name} is not set (or write ${{{name}:-default}})"
            )
        return value

    return _Expanded(_ENV_REF.sub(substitute, text))


def _show(value: object) -> str:
    """A value as the operator wrote it in YAML, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(str(value)) if isinstance(value, str) else str(value)


# --- converters: (YAML value after ${VAR} expansion, dotted key) -> typed value, or ConfigError

_V = TypeVar("_V")
_D = TypeVar("_D", bound="DataclassInstance")
Converter = Callable[[object, str], object]


def _integer(low: int, high: int | None = None) -> Callable[[object, str], int]:
    expected = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"

    def convert(value: object, key: str) -> int:
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, _Expanded) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            number = int(value)
        if number is None or number < low or (high is not None and number > high):
            raise ConfigError(f"{key}: must be {expected}, got {_show(value)}")
        return number

    return convert


def _positive_seconds(value: object, key: str) -> float:
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, _Expanded):
        try:
            seconds = float(value)
        except ValueError:
            seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{key}: must be a number of seconds > 0, got {_show(value)}")
    return seconds


def _boolean(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, _Expanded) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"{key}: must be true or false (a YAML boolean), got {_show(value)}")


def _text(
    *, pattern: str | None = None, expected: str = "a string", allow_empty: bool = True
) -> Callable[[object, str], str]:
    compiled = re.compile(pattern) if pattern is not None else None

    def convert(value: object, key: str) -> str:
        if (
            not isinstance(value, str)
            or (not value and not allow_empty)
            or (compiled is not None and not compiled.fullmatch(value))
        ):
            raise ConfigError(f"{key}: must be {expected}, got {_show(value)}")
        return str(value)

    return convert


def _choice(names: tuple[str, ...], build: Callable[[str], _V]) -> Callable[[object, str], _V]:
    """One of a few upper-case names; the value's case does not matter (keys' case does)."""

    def convert(value: object, key: str) -> _V:
        if not isinstance(value, str) or value.strip().upper() not in names:
            raise ConfigError(f"{key}: must be one of {', '.join(names)}, got {_show(value)}")
        return build(value.strip().upper())

    return convert


_level: Final = _choice(LOG_LEVELS, str)
_store_type: Final = _choice(tuple(t.value for t in StoreType), StoreType)
_HOST_NAME: Final = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9-]+)*")


# Node names appear in mesh identities, $SYS topics, key file names and log lines: no wildcards,
# slashes or spaces. Cluster names follow the same pattern (they travel in mDNS TXT records).
_NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME_EXPECTED: Final = "1 to 64 letters, digits, '.', '_' or '-' starting with a letter or digit"
_NODE_NAME: Final = _text(pattern=_NAME_PATTERN, expected=_NAME_EXPECTED)


def _listen_address(value: object, key: str) -> str:
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if _HOST_NAME.fullmatch(value):
                return str(value)
    raise ConfigError(f"{key}: must be an IP address or host name, got {_show(value)}")


def _bind_address(value: object, key: str) -> str:
    return "" if value == "" else _listen_address(value, key)


def _advertise_address(value: object, key: str) -> str:
    if value == "":
        return ""
    address = _listen_address(value, key)
    if address in ("0.0.0.0", "::"):
        raise ConfigError(
            f"{key}: must be an address other nodes can reach, not every interface, got {_show(value)}"
        )
    return address


# --- lists of peers: Mesh.TcpIp.Members, Mesh.Dns.Names, Mesh.Mdns.Interfaces ---------------------


def _list_of(item: Callable[[str, str], str], expected: str) -> Callable[[object, str], tuple[str, ...]]:
    """A YAML list of strings, each checked by `item` under the key `Key[index]`.

    A string that came from `${VAR}` is a comma-separated list, so that the environment (compose,
    Kubernetes) can carry a whole list; a plain YAML string is not taken for a list of one.
    """

    def convert(value: object, key: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, _Expanded):
            items: list[object] = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, list):
            items = value
        else:
            raise ConfigError(f"{key}: must be a list of {expected}, got {_show(value)}")
        checked: list[str] = []
        for index, raw in enumerate(items):
            path = f"{key}[{index}]"
            text = _expand_env(raw, path) if isinstance(raw, str) else raw
            if not isinstance(text, str):
                raise ConfigError(f"{path}: must be one of {expected} (a string), got {_show(text)}")
            checked.append(item(str(text), path))
        return tuple(checked)

    return convert


_MEMBER_FORMS: Final = '"host", "host:port", "[IPv6]:port", "a.b.c.d-e" or "name@host[:port]"'
_IPV4_RANGE: Final = re.compile(r"(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})-(\d{1,3})")
_NUMERIC_HOST: Final = re.compile(r"[\d.-]+")


def _split_port(text: str, key: str, forms: str) -> tuple[str, str | None]:
    """(host, port text or None) of "host", "host:port", "[v6]" or "[v6]:port"; the port is checked."""
    port: str | None = None
    if text.startswith("["):
        host, bracket, after = text[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ConfigError(f"{key}: unbalanced brackets; write {forms}, got {_show(text)}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                f"{key}: {host!r} in brackets is not an IPv6 address, got {_show(text)}"
            ) from None
        port = after[1:] if after else None
    elif text.count(":") > 1:
        raise ConfigError(f"{key}: write IPv6 addresses in brackets, e.g. [fd00::1]:7946, got {_show(text)}")
    else:
        host, colon, port_text = text.partition(":")
        port = port_text if colon else None
    if port is not None and not (port.isdigit() and 1 <= int(port) <= _MAX_U16):
        raise ConfigError(f"{key}: the port must be from 1 to 65535, got {_show(text)}")
    return host, port


def _member(text: str, key: str) -> str:
    """One static member, checked by the parser that expands it (mesh/discovery/static.py)."""
    try:
        parse_member(text, 1)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}; write {_MEMBER_FORMS}") from None
    return text


def _dns_name(text: str, key: str) -> str:
    forms = '"name" or "name:port"'
    host, _ = _split_port(text, key, forms)
    if host.startswith("[") or not _HOST_NAME.fullmatch(host) or _IPV4_RANGE.fullmatch(host):
        raise ConfigError(f"{key}: must be {forms} with a DNS name, got {_show(text)}")
    return text


def _interface_address(text: str, key: str) -> str:
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        address = None
    if address is None or address.is_unspecified:
        raise ConfigError(
            f"{key}: must be the IPv4 address of one of this host's interfaces (not 0.0.0.0), got {_show(text)}"
        )
    return str(address)


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


# --- sections ---------------------------------------------------------------------------------


class _Section(Generic[_D]):
    """A YAML mapping read into a frozen dataclass through a table of its keys.

    `keys` maps each YAML key to (dataclass field, converter). A section is itself a converter,
    so sections nest by appearing as a row of their parent's table.
    """

    __slots__ = ("default", "keys", "later")

    def __init__(
        self,
        default: Callable[[], _D],
        keys: Mapping[str, tuple[str, Converter]],
        later: frozenset[str] = frozenset(),
    ) -> None:
        self.default = default
        self.keys = dict(keys)
        self.later = later  # keys a later version will accept: refused with a message that says so

    def __call__(self, value: object, key: str) -> _D:
        if value is None:  # a section whose keys are all commented out
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key or '(top level)'}: must be a mapping of keys to values, got {_show(value)}"
            )
        changes: dict[str, object] = {}
        for name, raw in value.items():
            path = f"{key}.{name}" if key else str(name)
            row = self.keys.get(name) if isinstance(name, str) else None
            if row is None:
                raise ConfigError(
                    f"{path}: unknown key{self._hint(name)}; allowed keys{self._where(key)}: "
                    f"{', '.join(self.keys)}"
                )
            field_name, convert = row
            changes[field_name] = convert(_expand_env(raw, path) if isinstance(raw, str) else raw, path)
        return dataclasses.replace(self.default(), **changes)

    def _hint(self, name: object) -> str:
        text = str(name)
        if text in self.later:
            return " (not supported in this version yet)"
        same_but_case = [k for k in self.keys if k.lower() == text.lower()]
        close = same_but_case or difflib.get_close_matches(text, list(self.keys), n=1)
        return f" (did you mean {close[0]}?)" if close else ""

    @staticmethod
    def _where(key: str) -> str:
        return f" in {key}" if key else " at the top level"


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

_CURVE: Final = _Section(
    CurveConfig,
    {
        "KeyFile": ("key_file", _text(expected="a file path")),
        "AllowedKeysDir": ("allowed_keys_dir", _text(expected="a directory path")),
    },
)

_TCP_IP: Final = _Section(
    TcpIpConfig,
    {"Enabled": ("enabled", _boolean), "Members": ("members", _list_of(_member, _MEMBER_FORMS))},
)

_MDNS: Final = _Section(
    MdnsConfig,
    {
        "Enabled": ("enabled", _boolean),
        "Interfaces": (
            "interfaces",
            _list_of(_interface_address, "IPv4 addresses of this host's interfaces"),
        ),
        "AnnounceIntervalMs": ("announce_interval_ms", _integer(500, 600_000)),
    },
)

_DNS: Final = _Section(
    DnsConfig,
    {
        "Enabled": ("enabled", _boolean),
        "Names": ("names", _list_of(_dns_name, '"name" or "name:port" DNS names')),
        "RefreshMs": ("refresh_ms", _integer(500, 600_000)),
    },
)

_MESH: Final = _Section(
    MeshConfig,
    {
        "IpcDir": ("ipc_dir", _text(expected="a directory path")),
        "SendHwm": ("send_hwm", _integer(1, 10_000_000)),
        "RecvHwm": ("recv_hwm", _integer(1, 10_000_000)),
        "HeartbeatMs": ("heartbeat_ms", _integer(50, 60_000)),
        "HandoffTimeoutMs": ("handoff_timeout_ms", _integer(100, 600_000)),
        "ClusterName": ("cluster_name", _NODE_NAME),
        "Port": ("port", _integer(1, _MAX_U16)),
        "BindAddress": ("bind_address", _bind_address),
        "AdvertiseAddress": ("advertise_address", _advertise_address),
        "PeerHeartbeatMs": ("peer_heartbeat_ms", _integer(50, 60_000)),
        "SuspectAfterMs": ("suspect_after_ms", _integer(100, 600_000)),
        "DeadAfterMs": ("dead_after_ms", _integer(200, 600_000)),
        "Plaintext": ("plaintext", _boolean),
        "Curve": ("curve", _CURVE),
        "TcpIp": ("tcp_ip", _TCP_IP),
        "Mdns": ("mdns", _MDNS),
        "Dns": ("dns", _DNS),
    },
)

_CLUSTER: Final = _Section(
    ClusterConfig,
    {"Enabled": ("enabled", _boolean), "ServerReference": ("server_reference", _text())},
    later=frozenset({"SplitBrainProtection", "MergePolicy"}),
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
        "WorkerPortBase": ("worker_port_base", _integer(0, _MAX_U16 - 1024)),
        "ShutdownGrace": ("shutdown_grace_s", _positive_seconds),
        "MQTT": ("mqtt", _MQTT),
        "Cluster": ("cluster_config", _CLUSTER),
        "Mesh": ("mesh", _MESH),
        "SessionStore": ("session_store", _SESSION_STORE),
        "Logging": ("logging", _LOGGING),
    },
    later=frozenset({"Http", "TCPS", "WS", "WSS", "Auth"}),
)


def _check_mesh(mesh: MeshConfig) -> None:
    """Rules between keys, checked once the whole file is read; each error names the later key."""
    if mesh.suspect_after_ms <= mesh.peer_heartbeat_ms:
        raise ConfigError(
            f"Mesh.SuspectAfterMs: must be greater than Mesh.PeerHeartbeatMs ({mesh.peer_heartbeat_ms}), "
            f"got {mesh.suspect_after_ms}"
        )
    if mesh.dead_after_ms <= mesh.suspect_after_ms:
        raise ConfigError(
            f"Mesh.DeadAfterMs: must be greater than Mesh.SuspectAfterMs ({mesh.suspect_after_ms}), "
            f"got {mesh.dead_after_ms}"
        )
    if mesh.mdns.enabled and not mesh.mdns.interfaces:
        raise ConfigError(
            "Mesh.Mdns.Interfaces: Mesh.Mdns.Enabled is true, so name the interfaces' IPv4 addresses; "
            "MeshMQ never announces on every interface by surprise"
        )
    if mesh.dns.enabled and not mesh.dns.names:
        raise ConfigError(
            "Mesh.Dns.Names: Mesh.Dns.Enabled is true, so give at least one DNS name to resolve"
        )
    if mesh.curve.allowed_keys_dir and not mesh.curve.key_file:
        raise ConfigError(
            "Mesh.Curve.AllowedKeysDir: needs Mesh.Curve.KeyFile (this node's own .key_secret file)"
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
