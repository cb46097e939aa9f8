"""The cluster's configuration: the `Mesh` and `Cluster` sections of `meshmq.yaml`.

Why: the mesh sections are the largest part of the file and the most tied together (timeouts
that must come in order, discovery methods that need their lists); their frozen dataclasses, key
tables, the syntax of peer lists and the rules between their keys live here, apart from the
broker's own sections in `broker/config.py`.

Must not: import `broker.config` (it imports this module; no cycles); parse static members with
a grammar of its own (`mesh/discovery/static.py` owns it, and is asked); accept
Cluster.SplitBrainProtection / Cluster.MergePolicy before the code that honours them exists;
let mDNS announce on every interface because none were named.

Invariants:
- Rules that tie keys together (Mesh.PeerHeartbeatMs < SuspectAfterMs < DeadAfterMs, mDNS and
  DNS need their lists, AllowedKeysDir needs KeyFile) are checked by `_check_mesh` after the
  whole file is read, and name the key to change.
- Peer list items are checked one by one and named `Key[index]` in errors.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Final

from broker.config_values import (
    _HOST_NAME,
    _MAX_U16,
    _NODE_NAME,
    ConfigError,
    _advertise_address,
    _bind_address,
    _boolean,
    _choice,
    _integer,
    _list_of,
    _Section,
    _show,
    _text,
)
from mesh.discovery.static import parse_member


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
class SplitBrainConfig:
    """Cluster.SplitBrainProtection: what a node does when it sees too few live members."""

    # MinimumClusterSize: live members (self included) below which a node is in the minority; 0 = off
    minimum_cluster_size: int = 0
    # AllowConnect: keep clients and accept CONNECTs in the minority (risky: sessions may split)
    allow_connect: bool = False
    allow_publish: bool = True  # AllowPublish: with AllowConnect, accept PUBLISH in the minority
    allow_subscribe: bool = True  # AllowSubscribe: with AllowConnect, accept SUBSCRIBE in the minority


@dataclass(frozen=True, slots=True)
class MergePolicyConfig:
    """Cluster.MergePolicy: how retained messages merge when a split heals (mesh/hlc.py)."""

    type: str = "LATEST_UPDATE"  # Type: LATEST_UPDATE, PUT_IF_ABSENT or HIGHER_HITS


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """Http: the node's HTTP port for health checks, metrics and admin (served by the relay)."""

    port: int = 0  # Http.Port; 0 = no HTTP
    bind_address: str = ""  # Http.BindAddress; "" = ListenAddress
    admin_token: str = field(default="", repr=False)  # Http.AdminToken; "" = write endpoints refused


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    enabled: bool = False  # Cluster.Enabled: same as -cluster
    # Cluster.ServerReference: sent to MQTT 5 clients with DISCONNECT 0x9C when this node drains
    # ("" = 0x8B without reference)
    server_reference: str = ""
    split_brain: SplitBrainConfig = field(default_factory=SplitBrainConfig)
    merge_policy: MergePolicyConfig = field(default_factory=MergePolicyConfig)


# --- peer list items: Mesh.TcpIp.Members, Mesh.Dns.Names, Mesh.Mdns.Interfaces -------------------

_MEMBER_FORMS: Final = '"host", "host:port", "[IPv6]:port", "a.b.c.d-e" or "name@host[:port]"'
_IPV4_RANGE: Final = re.compile(r"(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})-(\d{1,3})")


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


# --- sections -------------------------------------------------------------------------------------


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

_SPLIT_BRAIN: Final = _Section(
    SplitBrainConfig,
    {
        "MinimumClusterSize": ("minimum_cluster_size", _integer(0, 1000)),
        "AllowConnect": ("allow_connect", _boolean),
        "AllowPublish": ("allow_publish", _boolean),
        "AllowSubscribe": ("allow_subscribe", _boolean),
    },
)

_MERGE_POLICY: Final = _Section(
    MergePolicyConfig,
    {"Type": ("type", _choice(("LATEST_UPDATE", "PUT_IF_ABSENT", "HIGHER_HITS"), str))},
)

_CLUSTER: Final = _Section(
    ClusterConfig,
    {
        "Enabled": ("enabled", _boolean),
        "ServerReference": ("server_reference", _text()),
        "SplitBrainProtection": ("split_brain", _SPLIT_BRAIN),
        "MergePolicy": ("merge_policy", _MERGE_POLICY),
    },
)

_HTTP: Final = _Section(
    HttpConfig,
    {
        "Port": ("port", _integer(0, 65535)),
        "BindAddress": ("bind_address", _bind_address),
        "AdminToken": ("admin_token", _text()),
    },
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
