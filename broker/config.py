"""The node's configuration: YAML in, one validated, frozen `Config` out.

Why: an operator's mistake in `meshmq.yaml` must stop the broker at start with a message that
names the key (`MQTT.MaxInflight: must be an integer from 1 to 65535, got 'abc'`), never surface
later as a stack trace in a worker. Every key of the file is declared once, in a table per
section (YAML key -> dataclass field, converter); the generic `_Section` walks the table. A new
section is one frozen dataclass, one `_Section(...)` table and one row in its parent's table.

Must not: read anything but the file and the environment; keep dicts past this module (values
leave as frozen dataclasses); accept a key it does not know (a typo would otherwise be ignored
silently); accept the sections reserved for later work (Cluster, Mesh, Http, TCPS, WS, WSS, Auth)
before the code that honours them exists.

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

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "LOG_LEVELS",
    "Config",
    "ConfigError",
    "LoggingConfig",
    "MqttConfig",
    "PostgresConfig",
    "SessionStoreConfig",
    "SqliteConfig",
    "StoreType",
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
class MeshConfig:
    """The node's ZeroMQ mesh (see mesh/PROTOCOL.md)."""

    ipc_dir: str = (
        ""  # Mesh.IpcDir; "" = $XDG_RUNTIME_DIR/meshmq-<NodeName>, else /tmp/meshmq-<uid>-<NodeName>
    )
    send_hwm: int = (
        1000  # Mesh.SendHwm, envelopes (of at most 64 messages) queued per peer before backpressure
    )
    recv_hwm: int = 1000  # Mesh.RecvHwm
    heartbeat_ms: int = 1000  # Mesh.HeartbeatMs, worker -> relay
    handoff_timeout_ms: int = 3000  # Mesh.HandoffTimeoutMs, waiting for a session from another worker


@dataclass(frozen=True, slots=True)
class Config:
    node_name: str = field(default_factory=socket.gethostname)
    workers: int = 0  # 0: one per core
    listen_address: str = "0.0.0.0"
    tcp_port: int = 1883  # 0: no plain TCP listener
    worker_port_base: int = 0  # >0: worker N also listens on this + N (tests, benchmarks, debugging)
    shutdown_grace_s: float = 10.0  # SIGTERM: time for clients to be told and workers to drain
    cluster: bool = False  # from the command line (-cluster), not from the file
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    session_store: SessionStoreConfig = field(default_factory=SessionStoreConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

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


def _listen_address(value: object, key: str) -> str:
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if _HOST_NAME.fullmatch(value):
                return str(value)
    raise ConfigError(f"{key}: must be an IP address or host name, got {_show(value)}")


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

_MESH: Final = _Section(
    MeshConfig,
    {
        "IpcDir": ("ipc_dir", _text(expected="a directory path")),
        "SendHwm": ("send_hwm", _integer(1, 10_000_000)),
        "RecvHwm": ("recv_hwm", _integer(1, 10_000_000)),
        "HeartbeatMs": ("heartbeat_ms", _integer(50, 60_000)),
        "HandoffTimeoutMs": ("handoff_timeout_ms", _integer(100, 600_000)),
    },
)

# Node names appear in mesh identities, $SYS topics and log lines: no wildcards, slashes or spaces.
_NODE_NAME: Final = _text(
    pattern=r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
    expected="1 to 64 letters, digits, '.', '_' or '-' starting with a letter or digit",
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
        "Mesh": ("mesh", _MESH),
        "SessionStore": ("session_store", _SESSION_STORE),
        "Logging": ("logging", _LOGGING),
    },
    later=frozenset({"Cluster", "Http", "TCPS", "WS", "WSS", "Auth"}),
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
    return _TOP(data, "")


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
        cluster=config.cluster if cluster is None else cluster,
    )
