"""Who may connect and how: the `TLS`, `WebSocket`, `Auth` and `Limits` sections of `meshmq.yaml`.

Why: the transports beyond plain TCP and the access rules are one concern (`broker/ACCESS.md`):
their frozen dataclasses, key tables and the rules between their keys live here, apart from the
broker's own sections in `broker/config.py` (which holds the `TCPS`, `WS`, `WSS` port keys
beside `TCP`).

Must not: import `broker.config` (it imports this module); open the certificate files (the net
layer loads them at start and reports a bad file naming the key: `broker/net/tls.py`).

Invariants (checked by `check_access` once the whole file is read, each naming the key to change):
- A TCPS or WSS port needs `TLS.CertFile` and `TLS.KeyFile`; client certificates
  (`optional`/`required`) and `UseSubjectAsUsername` need `TLS.CaFile`; `UseSubjectAsUsername`
  needs client certificates.
- `Auth.Enabled` needs a store that keeps users (SQLITE or POSTGRES).
- ACL rules in `Auth.Acl` are checked one by one and named `Auth.Acl[index].Key`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from broker.config_values import (
    ConfigError,
    _boolean,
    _choice,
    _integer,
    _Section,
    _show,
    _text,
)

ACL_ACCESS: Final = ("PUB", "SUB", "BOTH", "DENY")
CLIENT_CERTIFICATES: Final = ("NONE", "OPTIONAL", "REQUIRED")
SUBJECT_AS_USERNAME: Final = ("NONE", "CN", "DN")
TLS_VERSIONS: Final = ("TLSV1.2", "TLSV1.3")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: str = ""  # TLS.CertFile: the server's certificate chain (PEM)
    key_file: str = ""  # TLS.KeyFile: its private key (PEM)
    key_password: str = ""  # TLS.KeyPassword: for an encrypted key file
    ca_file: str = ""  # TLS.CaFile: CAs that sign client certificates
    crl_file: str = ""  # TLS.CrlFile: revoked client certificates (PEM CRLs of those CAs)
    client_certificates: str = "NONE"  # NONE | OPTIONAL | REQUIRED
    subject_as_username: str = "NONE"  # NONE | CN | DN
    min_version: str = "TLSV1.2"  # TLSV1.2 | TLSV1.3
    ciphers: str = ""  # OpenSSL cipher list for TLS 1.2; "" = OpenSSL's defaults

    def __repr__(self) -> str:  # the key password never reaches a log
        return (
            f"TlsConfig(cert_file={self.cert_file!r}, key_file={self.key_file!r}, ca_file={self.ca_file!r})"
        )


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    path: str = "/mqtt"  # WebSocket.Path: the HTTP path of the upgrade request


@dataclass(frozen=True, slots=True)
class AclRule:
    user: str  # a username, "$anonymous", or "*" (every client)
    topic: str  # an MQTT filter with %u (username) and %c (client id)
    access: str  # PUB | SUB | BOTH | DENY


@dataclass(frozen=True, slots=True)
class AuthConfig:
    enabled: bool = False  # Auth.Enabled: clients must authenticate; ACLs apply
    allow_anonymous: bool = False  # Auth.AllowAnonymous: with Enabled, let clients in without a username
    acl_no_match: str = "DENY"  # Auth.AclNoMatch: ALLOW | DENY when no rule decides
    acl: tuple[AclRule, ...] = ()  # Auth.Acl: rules checked after the store's


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Limits: 0 = no limit. Rates are per second per client, except MaxConnectRate (per source
    address, for the whole node)."""

    max_publish_rate: int = 0
    max_subscribe_rate: int = 0
    max_subscriptions: int = 0
    max_topic_levels: int = 0
    max_topic_length: int = 0
    max_connect_rate: int = 0


# --- converters ----------------------------------------------------------------------------------

_file: Final = _text(expected="a file path")


def _http_path(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c in value for c in " ?#"):
        raise ConfigError(
            f"{key}: must be an HTTP path starting with '/' (no spaces, '?' or '#'), got {_show(value)}"
        )
    return value


def _rule_topic(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be an MQTT topic filter (with %u, %c), got {_show(value)}")
    from broker.protocol.errors import MQTTError
    from broker.protocol.topics import validate_topic_filter

    try:
        validate_topic_filter(value)
    except MQTTError as e:
        raise ConfigError(f"{key}: not a valid topic filter: {e}") from e
    return value


_RULE: Final = _Section(
    lambda: AclRule("", "", ""),
    {
        "User": ("user", _text(allow_empty=False, expected="a username, $anonymous or *")),
        "Topic": ("topic", _rule_topic),
        "Access": ("access", _choice(ACL_ACCESS, str)),
    },
)


def _rules(value: object, key: str) -> tuple[AclRule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be a list of rules ({{User, Topic, Access}}), got {_show(value)}")
    rules = []
    for index, raw in enumerate(value):
        path = f"{key}[{index}]"
        rule = _RULE(raw, path)
        for name, field_name in (("User", "user"), ("Topic", "topic"), ("Access", "access")):
            if not getattr(rule, field_name):
                raise ConfigError(f"{path}.{name}: missing (every rule needs User, Topic and Access)")
        rules.append(rule)
    return tuple(rules)


# --- sections --------------------------------------------------------------------------------------

TLS: Final = _Section(
    TlsConfig,
    {
        "CertFile": ("cert_file", _file),
        "KeyFile": ("key_file", _file),
        "KeyPassword": ("key_password", _text()),
        "CaFile": ("ca_file", _file),
        "CrlFile": ("crl_file", _file),
        "ClientCertificates": ("client_certificates", _choice(CLIENT_CERTIFICATES, str)),
        "UseSubjectAsUsername": ("subject_as_username", _choice(SUBJECT_AS_USERNAME, str)),
        "MinVersion": ("min_version", _choice(TLS_VERSIONS, str)),
        "Ciphers": ("ciphers", _text()),
    },
)

WEBSOCKET: Final = _Section(WebSocketConfig, {"Path": ("path", _http_path)})

AUTH: Final = _Section(
    AuthConfig,
    {
        "Enabled": ("enabled", _boolean),
        "AllowAnonymous": ("allow_anonymous", _boolean),
        "AclNoMatch": ("acl_no_match", _choice(("ALLOW", "DENY"), str)),
        "Acl": ("acl", _rules),
    },
)

_RATE: Final = _integer(0, 1_000_000)

LIMITS: Final = _Section(
    LimitsConfig,
    {
        "MaxPublishRate": ("max_publish_rate", _RATE),
        "MaxSubscribeRate": ("max_subscribe_rate", _RATE),
        "MaxSubscriptions": ("max_subscriptions", _integer(0)),
        "MaxTopicLevels": ("max_topic_levels", _integer(0, 65535)),
        "MaxTopicLength": ("max_topic_length", _integer(0, 65535)),
        "MaxConnectRate": ("max_connect_rate", _RATE),
    },
)


def check_access(
    tls: TlsConfig, auth: AuthConfig, tls_ports: tuple[int, ...], store_keeps_users: bool
) -> None:
    """Rules between keys, checked once the whole file is read; each error names a key to change."""
    if any(tls_ports):
        if not tls.cert_file:
            raise ConfigError("TLS.CertFile: needed by the TCPS / WSS listeners (a PEM certificate chain)")
        if not tls.key_file:
            raise ConfigError("TLS.KeyFile: needed by the TCPS / WSS listeners (a PEM private key)")
    if tls.client_certificates != "NONE" and not tls.ca_file:
        raise ConfigError(
            f"TLS.CaFile: needed with TLS.ClientCertificates: {tls.client_certificates} "
            "(the CAs that sign client certificates)"
        )
    if tls.crl_file and tls.client_certificates == "NONE":
        raise ConfigError(
            "TLS.CrlFile: needs TLS.ClientCertificates: OPTIONAL or REQUIRED (it revokes client certificates)"
        )
    if tls.subject_as_username != "NONE" and tls.client_certificates == "NONE":
        raise ConfigError(
            "TLS.UseSubjectAsUsername: needs TLS.ClientCertificates: OPTIONAL or REQUIRED "
            "(there is no certificate subject otherwise)"
        )
    if auth.enabled and not store_keeps_users:
        raise ConfigError(
            "Auth.Enabled: needs SessionStore.Type SQLITE or POSTGRES (users are kept in the store)"
        )


__all__ = [
    "AUTH",
    "LIMITS",
    "TLS",
    "WEBSOCKET",
    "AclRule",
    "AuthConfig",
    "LimitsConfig",
    "TlsConfig",
    "WebSocketConfig",
    "check_access",
]
