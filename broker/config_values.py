"""The generic half of the configuration loader: YAML values to typed values, and `_Section`.

Why: every section of `meshmq.yaml` is a table of (YAML key -> dataclass field, converter); this
module holds the converters those tables are built from and the `_Section` that walks a table, so
that how a value is read and how its error is worded is decided once for all sections.
`broker/config.py` (top level, MQTT, Logging, SessionStore) and `broker/config_mesh.py` (Mesh,
Cluster) only declare tables and the rules between keys.

Must not: import `broker.config` or `broker.config_mesh` (they import this module; no cycles);
declare a section's keys (the section modules do); read anything but the environment (for `${VAR}`).

Invariants:
- Keys are case-sensitive CamelCase; an unknown key is an error that lists the allowed keys.
- Every `ConfigError` message starts with the dotted key path (or the file name for errors of
  the file as a whole).
- Booleans must be YAML booleans (`true`/`false`), integers must be integers (YAML `1.0` or
  `true` is not an integer); the only strings turned into numbers or booleans are those that
  came from `${VAR}` expansion, since the environment has no other way to carry them.
- `${NAME}` and `${NAME:-default}` are expanded in every string value; `$${` is a literal `${`.
  A missing variable without a default is an error naming the key and the variable.
- List items are named `Key[index]` in errors (`Mesh.TcpIp.Members[2]: ...`).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, Generic, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_MAX_U16: Final = 65_535


class ConfigError(Exception):
    """A configuration value the broker cannot run with; the message starts with the key path."""


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


# --- names and addresses ---------------------------------------------------------------------------

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


# --- lists of strings: Mesh.TcpIp.Members, Mesh.Dns.Names, Mesh.Mdns.Interfaces ----------------------


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
