"""broker.config: defaults, every key's validation, unknown keys, ${VAR} expansion, overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

# _TOP and _Section are the loader's key tables: imported to check that every key is tested.
from broker.config import (
    _TOP,
    ClusterConfig,
    Config,
    ConfigError,
    CurveConfig,
    DnsConfig,
    LoggingConfig,
    MdnsConfig,
    MeshConfig,
    MqttConfig,
    PostgresConfig,
    SqliteConfig,
    StoreType,
    TcpIpConfig,
    _Section,
    load_config,
    parse_config,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[2]


def nested(path: str, value: object) -> dict[str, Any]:
    """{"A": {"B": value}} from "A.B"."""
    *parents, leaf = path.split(".")
    data: dict[str, Any] = {leaf: value}
    for name in reversed(parents):
        data = {name: data}
    return data


def error_of(data: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


# --- defaults -------------------------------------------------------------------------------------


def test_no_file_and_empty_file_give_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(None) == Config()
    assert load_config(str(empty)) == Config()
    assert parse_config({}) == Config()


def test_defaults_are_the_documented_ones() -> None:
    c = Config()
    assert (c.workers, c.listen_address, c.tcp_port, c.cluster) == (0, "0.0.0.0", 1883, False)
    assert c.node_name  # the host name
    assert c.mqtt == MqttConfig(
        max_connections=100_000,
        max_packet_bytes=268_435_455,
        max_inflight=100,
        max_queued_messages=1000,
        connect_timeout_s=10.0,
        max_keepalive_s=65535,
        max_session_expiry_s=4_294_967_295,
        max_topic_alias=65535,
        retain_available=True,
        maximum_qos=2,
        response_information="",
        allow_empty_client_id=True,
        max_retained_messages=1_000_000,
    )
    assert c.session_store.type is StoreType.SQLITE
    assert c.session_store.sqlite == SqliteConfig(path="data/meshmq.db")
    assert c.session_store.postgres == PostgresConfig(
        url="postgresql://127.0.0.1:5432/meshmq", user="", password="", schema="meshmq", pool_size=8
    )
    assert c.logging == LoggingConfig(level="INFO", loggers=())
    assert c.mesh == MeshConfig(
        ipc_dir="",
        send_hwm=1000,
        recv_hwm=1000,
        heartbeat_ms=1000,
        handoff_timeout_ms=3000,
        cluster_name="meshmq",
        port=7946,
        bind_address="",
        advertise_address="",
        peer_heartbeat_ms=500,
        suspect_after_ms=1500,
        dead_after_ms=4000,
        plaintext=False,
        curve=CurveConfig(key_file="", allowed_keys_dir=""),
        tcp_ip=TcpIpConfig(enabled=True, members=()),
        mdns=MdnsConfig(enabled=False, interfaces=(), announce_interval_ms=5000),
        dns=DnsConfig(enabled=False, names=(), refresh_ms=5000),
    )
    assert c.cluster_config == ClusterConfig(enabled=False, server_reference="")


def test_shipped_config_loads_and_gives_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHMQ_PG_PASS", raising=False)
    assert load_config(str(REPO / "etc" / "meshmq.yaml")) == Config()


def test_values_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().mqtt.max_inflight = 5  # type: ignore[misc]


def test_a_section_with_all_keys_commented_out_is_empty() -> None:
    assert parse_config({"MQTT": None, "Logging": None}) == Config()


def test_worker_count() -> None:
    assert Config(workers=3).worker_count == 3
    assert Config(workers=0).worker_count >= 1


def test_password_is_not_in_repr() -> None:
    assert "s3cret" not in repr(parse_config(nested("SessionStore.Postgres.Pass", "s3cret")))


# --- every key: good values are taken ------------------------------------------------------------

GOOD: list[tuple[str, object, str, object]] = [
    ("NodeName", "node-1.lab_a", "node_name", "node-1.lab_a"),
    ("Workers", 4, "workers", 4),
    ("ListenAddress", "127.0.0.2", "listen_address", "127.0.0.2"),
    ("ListenAddress", "::1", "listen_address", "::1"),
    ("ListenAddress", "localhost", "listen_address", "localhost"),
    ("TCP", 0, "tcp_port", 0),
    ("TCPS", 0, "tls_port", 0),
    ("WS", 9001, "ws_port", 9001),
    ("WSS", 0, "wss_port", 0),
    ("TLS.CertFile", "server.pem", "tls.cert_file", "server.pem"),
    ("TLS.KeyFile", "server.key", "tls.key_file", "server.key"),
    ("TLS.KeyPassword", "pw", "tls.key_password", "pw"),
    ("TLS.CaFile", "ca.pem", "tls.ca_file", "ca.pem"),
    ("TLS.CrlFile", "", "tls.crl_file", ""),
    ("TLS.ClientCertificates", "none", "tls.client_certificates", "NONE"),
    ("TLS.UseSubjectAsUsername", "None", "tls.subject_as_username", "NONE"),
    ("TLS.MinVersion", "tlsv1.3", "tls.min_version", "TLSV1.3"),
    ("TLS.Ciphers", "ECDHE+AESGCM", "tls.ciphers", "ECDHE+AESGCM"),
    ("WebSocket.Path", "/", "websocket.path", "/"),
    ("Auth.Enabled", True, "auth.enabled", True),
    ("Auth.AllowAnonymous", True, "auth.allow_anonymous", True),
    ("Auth.AclNoMatch", "allow", "auth.acl_no_match", "ALLOW"),
    ("Auth.Acl", [], "auth.acl", ()),
    ("Limits.MaxPublishRate", 100, "limits.max_publish_rate", 100),
    ("Limits.MaxSubscribeRate", 10, "limits.max_subscribe_rate", 10),
    ("Limits.MaxSubscriptions", 50, "limits.max_subscriptions", 50),
    ("Limits.MaxTopicLevels", 8, "limits.max_topic_levels", 8),
    ("Limits.MaxTopicLength", 256, "limits.max_topic_length", 256),
    ("Limits.MaxConnectRate", 20, "limits.max_connect_rate", 20),
    ("WorkerPortBase", 20000, "worker_port_base", 20000),
    ("ShutdownGrace", 2.5, "shutdown_grace_s", 2.5),
    ("Mesh.IpcDir", "/run/meshmq", "mesh.ipc_dir", "/run/meshmq"),
    ("Mesh.SendHwm", 1, "mesh.send_hwm", 1),
    ("Mesh.RecvHwm", 500, "mesh.recv_hwm", 500),
    ("Mesh.HeartbeatMs", 50, "mesh.heartbeat_ms", 50),
    ("Mesh.HandoffTimeoutMs", 100, "mesh.handoff_timeout_ms", 100),
    ("Mesh.ClusterName", "prod-1", "mesh.cluster_name", "prod-1"),
    ("Mesh.Port", 65535, "mesh.port", 65535),
    ("Mesh.BindAddress", "127.0.0.3", "mesh.bind_address", "127.0.0.3"),
    ("Mesh.BindAddress", "", "mesh.bind_address", ""),
    ("Mesh.AdvertiseAddress", "node-1.lan", "mesh.advertise_address", "node-1.lan"),
    ("Mesh.AdvertiseAddress", "fd00::1", "mesh.advertise_address", "fd00::1"),
    ("Mesh.PeerHeartbeatMs", 50, "mesh.peer_heartbeat_ms", 50),
    ("Mesh.SuspectAfterMs", 1000, "mesh.suspect_after_ms", 1000),
    ("Mesh.DeadAfterMs", 600_000, "mesh.dead_after_ms", 600_000),
    ("Mesh.Plaintext", True, "mesh.plaintext", True),
    ("Mesh.Curve.KeyFile", "/etc/meshmq/cluster.key_secret", "mesh.curve.key_file", "/etc/meshmq/cluster.key_secret"),
    ("Mesh.Curve.AllowedKeysDir", "", "mesh.curve.allowed_keys_dir", ""),
    ("Mesh.TcpIp.Enabled", False, "mesh.tcp_ip.enabled", False),
    ("Mesh.TcpIp.Members", ["192.168.1.100-110", "n2@10.0.0.2:7000", "[fd00::2]"], "mesh.tcp_ip.members",
     ("192.168.1.100-110", "n2@10.0.0.2:7000", "[fd00::2]")),
    ("Mesh.TcpIp.Members", None, "mesh.tcp_ip.members", ()),
    ("Mesh.Mdns.Enabled", False, "mesh.mdns.enabled", False),
    ("Mesh.Mdns.Interfaces", ["127.0.0.1", "192.168.1.10"], "mesh.mdns.interfaces", ("127.0.0.1", "192.168.1.10")),
    ("Mesh.Mdns.AnnounceIntervalMs", 500, "mesh.mdns.announce_interval_ms", 500),
    ("Mesh.Dns.Enabled", False, "mesh.dns.enabled", False),
    ("Mesh.Dns.Names", ["meshmq-headless", "meshmq:7000"], "mesh.dns.names", ("meshmq-headless", "meshmq:7000")),
    ("Mesh.Dns.RefreshMs", 600_000, "mesh.dns.refresh_ms", 600_000),
    ("Cluster.Enabled", True, "cluster_config.enabled", True),
    ("Cluster.Enabled", True, "cluster", True),
    ("Cluster.ServerReference", "node-2:1883", "cluster_config.server_reference", "node-2:1883"),
    ("Cluster.SplitBrainProtection.MinimumClusterSize", 2, "cluster_config.split_brain.minimum_cluster_size", 2),
    ("Cluster.SplitBrainProtection.AllowConnect", True, "cluster_config.split_brain.allow_connect", True),
    ("Cluster.SplitBrainProtection.AllowPublish", False, "cluster_config.split_brain.allow_publish", False),
    ("Cluster.SplitBrainProtection.AllowSubscribe", False, "cluster_config.split_brain.allow_subscribe", False),
    ("Cluster.MergePolicy.Type", "HIGHER_HITS", "cluster_config.merge_policy.type", "HIGHER_HITS"),
    ("Http.Port", 8080, "http.port", 8080),
    ("Http.BindAddress", "127.0.0.1", "http.bind_address", "127.0.0.1"),
    ("Http.AdminToken", "s3cret", "http.admin_token", "s3cret"),
    ("MQTT.MaxConnections", 1, "mqtt.max_connections", 1),
    ("MQTT.MaxPacketSize", 128, "mqtt.max_packet_bytes", 128),
    ("MQTT.MaxInflight", 65535, "mqtt.max_inflight", 65535),
    ("MQTT.MaxQueuedMessages", 0, "mqtt.max_queued_messages", 0),
    ("MQTT.ConnectTimeout", 2.5, "mqtt.connect_timeout_s", 2.5),
    ("MQTT.ConnectTimeout", 3, "mqtt.connect_timeout_s", 3.0),
    ("MQTT.MaxKeepAlive", 1, "mqtt.max_keepalive_s", 1),
    ("MQTT.MaxSessionExpiry", 0, "mqtt.max_session_expiry_s", 0),
    ("MQTT.MaxTopicAlias", 0, "mqtt.max_topic_alias", 0),
    ("MQTT.RetainAvailable", False, "mqtt.retain_available", False),
    ("MQTT.MaximumQoS", 1, "mqtt.maximum_qos", 1),
    ("MQTT.ResponseInformation", "resp/", "mqtt.response_information", "resp/"),
    ("MQTT.AllowEmptyClientId", False, "mqtt.allow_empty_client_id", False),
    ("MQTT.MaxRetainedMessages", 0, "mqtt.max_retained_messages", 0),
    ("MQTT.SysInterval", 0, "mqtt.sys_interval_s", 0),
    ("SessionStore.Type", "POSTGRES", "session_store.type", StoreType.POSTGRES),
    ("SessionStore.Type", "memory", "session_store.type", StoreType.MEMORY),
    ("SessionStore.SQLite.Path", "/tmp/x.db", "session_store.sqlite.path", "/tmp/x.db"),
    ("SessionStore.Postgres.Url", "postgresql://h/db", "session_store.postgres.url", "postgresql://h/db"),
    ("SessionStore.Postgres.User", "mq", "session_store.postgres.user", "mq"),
    ("SessionStore.Postgres.Pass", "pw", "session_store.postgres.password", "pw"),
    ("SessionStore.Postgres.Schema", "mq_2", "session_store.postgres.schema", "mq_2"),
    ("SessionStore.Postgres.PoolSize", 1, "session_store.postgres.pool_size", 1),
    ("Logging.Level", "debug", "logging.level", "DEBUG"),
    ("Logging.Loggers", {"broker.net": "DEBUG", "mesh": "error"}, "logging.loggers",
     (("broker.net", "DEBUG"), ("mesh", "ERROR"))),
]  # fmt: skip


def attribute(config: Config, dotted: str) -> object:
    value: object = config
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


@pytest.mark.parametrize(("key", "value", "attr", "expected"), GOOD, ids=[f"{g[0]}={g[1]!r}" for g in GOOD])
def test_good_value_is_taken(key: str, value: object, attr: str, expected: object) -> None:
    assert attribute(parse_config(nested(key, value)), attr) == expected


# --- every key: wrong types and ranges name the key, the expectation and the value ---------------

BAD: list[tuple[str, object, str, str]] = [
    ("TCPS", -1, "an integer from 0 to 65535", "-1"),
    ("WS", "x", "an integer from 0 to 65535", "'x'"),
    ("WSS", 1.5, "an integer from 0 to 65535", "1.5"),
    ("TLS.CertFile", 1, "a file path", "1"),
    ("TLS.KeyFile", [], "a file path", "a list"),
    ("TLS.KeyPassword", 1, "a string", "1"),
    ("TLS.CaFile", 2, "a file path", "2"),
    ("TLS.CrlFile", 3, "a file path", "3"),
    ("TLS.ClientCertificates", "maybe", "one of NONE, OPTIONAL, REQUIRED", "'maybe'"),
    ("TLS.UseSubjectAsUsername", "email", "one of NONE, CN, DN", "'email'"),
    ("TLS.MinVersion", "TLSv1.0", "one of TLSV1.2, TLSV1.3", "'TLSv1.0'"),
    ("TLS.Ciphers", 3, "a string", "3"),
    ("WebSocket.Path", "ws", "an HTTP path", "'ws'"),
    ("Auth.Enabled", "yes", "true or false", "'yes'"),
    ("Auth.AllowAnonymous", 1, "true or false", "1"),
    ("Auth.AclNoMatch", "skip", "one of ALLOW, DENY", "'skip'"),
    ("Auth.Acl", "all", "a list of rules", "'all'"),
    ("Limits.MaxPublishRate", -1, "an integer from 0 to 1000000", "-1"),
    ("Limits.MaxSubscribeRate", "x", "an integer from 0 to 1000000", "'x'"),
    ("Limits.MaxSubscriptions", -2, "an integer >= 0", "-2"),
    ("Limits.MaxTopicLevels", 70000, "an integer from 0 to 65535", "70000"),
    ("Limits.MaxTopicLength", True, "an integer from 0 to 65535", "true"),
    ("Limits.MaxConnectRate", 2000000, "an integer from 0 to 1000000", "2000000"),
    ("NodeName", "", "letters, digits", "''"),
    ("NodeName", "a/b", "letters, digits", "'a/b'"),
    ("NodeName", 7, "letters, digits", "7"),
    ("Workers", -1, "an integer from 0 to 1024", "-1"),
    ("Workers", "2", "an integer from 0 to 1024", "'2'"),
    ("Workers", 1.0, "an integer from 0 to 1024", "1.0"),
    ("ListenAddress", "no spaces", "an IP address or host name", "'no spaces'"),
    ("ListenAddress", 1, "an IP address or host name", "1"),
    ("TCP", 65536, "an integer from 0 to 65535", "65536"),
    ("TCP", True, "an integer from 0 to 65535", "true"),
    ("WorkerPortBase", 65000, "an integer from 0 to 64511", "65000"),
    ("ShutdownGrace", 0, "seconds", "0"),
    ("Mesh.IpcDir", 5, "a directory path", "5"),
    ("Mesh.SendHwm", 0, "an integer from 1 to 10000000", "0"),
    ("Mesh.RecvHwm", "x", "an integer from 1 to 10000000", "'x'"),
    ("Mesh.HeartbeatMs", 10, "an integer from 50 to 60000", "10"),
    ("Mesh.HandoffTimeoutMs", 50, "an integer from 100 to 600000", "50"),
    ("Mesh.ClusterName", "a b", "letters, digits", "'a b'"),
    ("Mesh.Port", 0, "an integer from 1 to 65535", "0"),
    ("Mesh.BindAddress", "no spaces", "an IP address or host name", "'no spaces'"),
    ("Mesh.BindAddress", None, "an IP address or host name", "null"),
    ("Mesh.AdvertiseAddress", "0.0.0.0", "an address other nodes can reach", "'0.0.0.0'"),
    ("Mesh.AdvertiseAddress", "::", "an address other nodes can reach", "'::'"),
    ("Mesh.AdvertiseAddress", "a_b", "an IP address or host name", "'a_b'"),
    ("Mesh.PeerHeartbeatMs", 49, "an integer from 50 to 60000", "49"),
    ("Mesh.SuspectAfterMs", 99, "an integer from 100 to 600000", "99"),
    ("Mesh.DeadAfterMs", 600_001, "an integer from 200 to 600000", "600001"),
    ("Mesh.Plaintext", "yes", "true or false", "'yes'"),
    ("Mesh.Curve.KeyFile", 5, "a file path", "5"),
    ("Mesh.Curve.AllowedKeysDir", 5, "a directory path", "5"),
    ("Mesh.TcpIp.Enabled", "true", "true or false", "'true'"),
    ("Mesh.TcpIp.Members", 5, "a list of", "5"),
    ("Mesh.TcpIp.Members", "10.0.0.1", "a list of", "'10.0.0.1'"),
    ("Mesh.Mdns.Enabled", 1, "true or false", "1"),
    ("Mesh.Mdns.Interfaces", "eth0", "a list of IPv4 addresses", "'eth0'"),
    ("Mesh.Mdns.AnnounceIntervalMs", 499, "an integer from 500 to 600000", "499"),
    ("Mesh.Dns.Enabled", "no", "true or false", "'no'"),
    ("Mesh.Dns.Names", {"a": 1}, "a list of", "a mapping"),
    ("Mesh.Dns.RefreshMs", 600_001, "an integer from 500 to 600000", "600001"),
    ("Mesh.Curve", ["x"], "a mapping", "a list"),
    ("Cluster.Enabled", "yes", "true or false", "'yes'"),
    ("Cluster.ServerReference", 5, "a string", "5"),
    ("Cluster.SplitBrainProtection.MinimumClusterSize", -1, "an integer from 0 to 1000", "-1"),
    ("Cluster.SplitBrainProtection.AllowConnect", "no", "true or false", "'no'"),
    ("Cluster.SplitBrainProtection.AllowPublish", 1, "true or false", "1"),
    ("Cluster.SplitBrainProtection.AllowSubscribe", "yes", "true or false", "'yes'"),
    ("Cluster.MergePolicy.Type", "NEWEST", "one of LATEST_UPDATE, PUT_IF_ABSENT, HIGHER_HITS", "'NEWEST'"),
    ("Http.Port", 65536, "an integer from 0 to 65535", "65536"),
    ("Http.BindAddress", "not an address!", "", "'not an address!'"),
    ("Http.AdminToken", 5, "a string", "5"),
    ("MQTT.MaxConnections", 0, "an integer >= 1", "0"),
    ("MQTT.MaxPacketSize", 127, "an integer from 128 to 268435455", "127"),
    ("MQTT.MaxPacketSize", 268_435_456, "an integer from 128 to 268435455", "268435456"),
    ("MQTT.MaxInflight", "abc", "an integer from 1 to 65535", "'abc'"),
    ("MQTT.MaxInflight", 0, "an integer from 1 to 65535", "0"),
    ("MQTT.MaxQueuedMessages", -1, "an integer >= 0", "-1"),
    ("MQTT.ConnectTimeout", 0, "a number of seconds > 0", "0"),
    ("MQTT.ConnectTimeout", "10s", "a number of seconds > 0", "'10s'"),
    ("MQTT.ConnectTimeout", float("nan"), "a number of seconds > 0", "nan"),
    ("MQTT.MaxKeepAlive", 0, "an integer from 1 to 65535", "0"),
    ("MQTT.MaxKeepAlive", 65536, "an integer from 1 to 65535", "65536"),
    ("MQTT.MaxSessionExpiry", 4_294_967_296, "an integer from 0 to 4294967295", "4294967296"),
    ("MQTT.MaxTopicAlias", -1, "an integer from 0 to 65535", "-1"),
    ("MQTT.RetainAvailable", "yes", "true or false", "'yes'"),
    ("MQTT.RetainAvailable", 1, "true or false", "1"),
    ("MQTT.MaximumQoS", 3, "an integer from 0 to 2", "3"),
    ("MQTT.ResponseInformation", 5, "a string", "5"),
    ("MQTT.AllowEmptyClientId", "false", "true or false", "'false'"),
    ("MQTT.MaxRetainedMessages", None, "an integer >= 0", "null"),
    ("MQTT.SysInterval", 86401, "an integer from 0 to 86400", "86401"),
    ("SessionStore.Type", "MYSQL", "one of SQLITE, POSTGRES, MEMORY", "'MYSQL'"),
    ("SessionStore.SQLite.Path", "", "a file path", "''"),
    ("SessionStore.Postgres.Url", "", "a PostgreSQL connection URL", "''"),
    ("SessionStore.Postgres.User", ["x"], "a string", "a list"),
    ("SessionStore.Postgres.Pass", 1234, "a string", "1234"),
    ("SessionStore.Postgres.Schema", "x; DROP TABLE s", "a lower-case SQL identifier", "'x; DROP TABLE s'"),
    ("SessionStore.Postgres.PoolSize", 0, "an integer from 1 to 1000", "0"),
    ("Logging.Level", "VERBOSE", "one of DEBUG, INFO, WARNING, ERROR, CRITICAL", "'VERBOSE'"),
    ("Logging.Loggers", ["a"], "a mapping of logger name to level", "a list"),
    ("Logging.Loggers.broker", "LOUD", "one of DEBUG", "'LOUD'"),
    ("MQTT", 5, "a mapping", "5"),
    ("SessionStore.Postgres", "x", "a mapping", "'x'"),
]


@pytest.mark.parametrize(("key", "value", "expected", "shown"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_value_names_the_key_the_expectation_and_the_value(
    key: str, value: object, expected: str, shown: str
) -> None:
    message = error_of(nested(key, value))
    assert message.startswith(f"{key}: ")
    assert expected in message
    assert message.endswith(f"got {shown}")


def leaf_keys(section: _Section[Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, (_, convert) in section.keys.items():
        path = f"{prefix}{name}"
        keys |= leaf_keys(convert, f"{path}.") if isinstance(convert, _Section) else {path}
    return keys


def test_every_key_of_the_loader_is_tested() -> None:
    """Guards the tables above against a key added to the loader without a test."""
    assert {key for key, *_ in GOOD} == leaf_keys(_TOP)
    assert {key for key, *_ in BAD} >= leaf_keys(_TOP)


def test_spec_example_message() -> None:
    assert error_of({"MQTT": {"MaxInflight": "abc"}}) == (
        "MQTT.MaxInflight: must be an integer from 1 to 65535, got 'abc'"
    )


# --- unknown keys -----------------------------------------------------------------------------


def test_unknown_key_is_named_and_allowed_keys_listed() -> None:
    message = error_of({"MQTT": {"MaxInflght": 5}})
    assert message.startswith("MQTT.MaxInflght: unknown key")
    assert "did you mean MaxInflight?" in message
    assert "allowed keys in MQTT: MaxConnections, MaxPacketSize, MaxInflight" in message


def test_keys_are_case_sensitive() -> None:
    message = error_of({"mqtt": {}})
    assert message.startswith("mqtt: unknown key (did you mean MQTT?)")
    assert "allowed keys at the top level: NodeName, Workers" in message


def test_unknown_nested_key() -> None:
    assert error_of(nested("SessionStore.Postgres.Password", "x")).startswith(
        "SessionStore.Postgres.Password: unknown key"
    )


def test_top_level_must_be_a_mapping() -> None:
    assert error_of(["MQTT"]) == "<config>: the top level must be a mapping of keys to values, got a list"


# --- cluster keys: list items, rules between keys, cluster mode ----------------------------------

GOOD_MEMBERS = [
    "10.0.0.1",
    "10.0.0.1:7000",
    "node-2.lan",
    "node-2.lan:1",
    "localhost:65535",
    "[::1]",
    "[fd00::2]:7946",
    "192.168.1.100-110",
    "192.168.1.0-255",
    "192.168.1.7-7:7000",
    "n2@10.0.0.2",
    "node-2.lab_a@[fd00::2]:7946",
]


@pytest.mark.parametrize("member", GOOD_MEMBERS)
def test_member_syntax_is_accepted_as_written(member: str) -> None:
    assert parse_config(nested("Mesh.TcpIp.Members", ["10.9.9.9", member])).mesh.tcp_ip.members == (
        "10.9.9.9",
        member,
    )


BAD_MEMBERS = [  # the messages are those of mesh.discovery.static.parse_member, the one parser
    ("", "empty member entry"),
    ("n1@", "nothing after '@'"),
    ("@10.0.0.1", "node name '' must be"),
    ("a b@10.0.0.1", "node name 'a b' must be"),
    ("10.0.0.1:0", "port 0 is out of range"),
    ("10.0.0.1:65536", "port 65536 is out of range"),
    ("10.0.0.1:", "is not a number"),
    ("host:http", "port 'http' is not a number"),
    ("[::1", "without a closing ']'"),
    ("[::1]7946", "expected ':port' after ']'"),
    ("[10.0.0.1]:7946", "'10.0.0.1' in brackets is not an IPv6 address"),
    ("10.0.0.256", "is not a valid IPv4 address"),
    ("10.0.0", "is not a valid IPv4 address"),
    ("10.0.0.110-100", "the range starts after it ends"),
    ("10.0.0.1-256", "its end must be at most 255"),
    ("10.0.0.300-310", "300 is not an address octet"),
    ("10.0.0.1-5-9", "is not a valid range"),
    ("-host", "is neither an IP address, nor a range"),
]


@pytest.mark.parametrize(("member", "problem"), BAD_MEMBERS)
def test_bad_member_names_the_key_with_its_index(member: str, problem: str) -> None:
    message = error_of(nested("Mesh.TcpIp.Members", ["10.0.0.1", "10.0.0.2", member]))
    assert message.startswith("Mesh.TcpIp.Members[2]: ")
    assert problem in message


def test_member_that_is_not_a_string() -> None:
    assert error_of(nested("Mesh.TcpIp.Members", [7946])) == (
        'Mesh.TcpIp.Members[0]: must be one of "host", "host:port", "[IPv6]:port", "a.b.c.d-e" or '
        '"name@host[:port]" (a string), got 7946'
    )


@pytest.mark.parametrize(
    ("key", "item", "problem"),
    [
        ("Mesh.Mdns.Interfaces", "eth0", "must be the IPv4 address of one of this host's interfaces"),
        ("Mesh.Mdns.Interfaces", "0.0.0.0", "(not 0.0.0.0)"),
        ("Mesh.Mdns.Interfaces", "::1", "must be the IPv4 address"),
        ("Mesh.Dns.Names", "a b", "with a DNS name"),
        ("Mesh.Dns.Names", "svc:0", "the port must be from 1 to 65535"),
        ("Mesh.Dns.Names", "10.0.0.1-9", "with a DNS name"),
        ("Mesh.Dns.Names", "[::1]", "with a DNS name"),
    ],
)
def test_bad_list_item_names_the_key_with_its_index(key: str, item: str, problem: str) -> None:
    message = error_of(nested(key, ["127.0.0.1", item]))
    assert message.startswith(f"{key}[1]: ")
    assert problem in message
    assert message.endswith(f"got {item!r}")


def test_list_items_expand_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHMQ_TEST_PEER", "10.0.0.7")
    c = parse_config(nested("Mesh.TcpIp.Members", ["${MESHMQ_TEST_PEER}:7000", "n9@${MESHMQ_TEST_PEER}"]))
    assert c.mesh.tcp_ip.members == ("10.0.0.7:7000", "n9@10.0.0.7")
    monkeypatch.delenv("MESHMQ_TEST_PEER")
    assert error_of(nested("Mesh.TcpIp.Members", ["x", "${MESHMQ_TEST_PEER}"])).startswith(
        "Mesh.TcpIp.Members[1]: environment variable MESHMQ_TEST_PEER is not set"
    )


def test_a_list_from_one_env_var_is_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHMQ_TEST_MEMBERS", "10.0.0.1, 10.0.0.2:7000,,n3@h3")
    c = parse_config(nested("Mesh.TcpIp.Members", "${MESHMQ_TEST_MEMBERS}"))
    assert c.mesh.tcp_ip.members == ("10.0.0.1", "10.0.0.2:7000", "n3@h3")
    monkeypatch.setenv("MESHMQ_TEST_MEMBERS", "")
    assert parse_config(nested("Mesh.TcpIp.Members", "${MESHMQ_TEST_MEMBERS}")).mesh.tcp_ip.members == ()
    monkeypatch.setenv("MESHMQ_TEST_MEMBERS", "10.0.0.1,10.0.0.999")
    assert error_of(nested("Mesh.TcpIp.Members", "${MESHMQ_TEST_MEMBERS}")).startswith(
        "Mesh.TcpIp.Members[1]: "
    )


@pytest.mark.parametrize(
    ("mesh", "message"),
    [
        (
            {"PeerHeartbeatMs": 1500},
            "Mesh.SuspectAfterMs: must be greater than Mesh.PeerHeartbeatMs (1500), got 1500",
        ),
        (
            {"SuspectAfterMs": 4000},
            "Mesh.DeadAfterMs: must be greater than Mesh.SuspectAfterMs (4000), got 4000",
        ),
        (
            {"PeerHeartbeatMs": 100, "SuspectAfterMs": 300, "DeadAfterMs": 200},
            "Mesh.DeadAfterMs: must be greater than Mesh.SuspectAfterMs (300), got 200",
        ),
        (
            {"Mdns": {"Enabled": True}},
            "Mesh.Mdns.Interfaces: Mesh.Mdns.Enabled is true, so name the interfaces' IPv4 addresses; "
            "MeshMQ never announces on every interface by surprise",
        ),
        (
            {"Mdns": {"Enabled": True, "Interfaces": []}},
            "Mesh.Mdns.Interfaces: Mesh.Mdns.Enabled is true, so name the interfaces' IPv4 addresses; "
            "MeshMQ never announces on every interface by surprise",
        ),
        (
            {"Dns": {"Enabled": True}},
            "Mesh.Dns.Names: Mesh.Dns.Enabled is true, so give at least one DNS name to resolve",
        ),
        (
            {"Curve": {"AllowedKeysDir": "/etc/meshmq/nodes"}},
            "Mesh.Curve.AllowedKeysDir: needs Mesh.Curve.KeyFile (this node's own .key_secret file)",
        ),
    ],
)
def test_rules_between_keys_name_the_key(mesh: dict[str, Any], message: str) -> None:
    assert error_of({"Mesh": mesh}) == message


def test_keys_that_satisfy_the_rules_together() -> None:
    c = parse_config(
        {
            "Mesh": {
                "PeerHeartbeatMs": 200,
                "SuspectAfterMs": 600,
                "DeadAfterMs": 1500,
                "Mdns": {"Enabled": True, "Interfaces": ["127.0.0.1"]},
                "Dns": {"Enabled": True, "Names": ["meshmq-headless"]},
                "Curve": {"KeyFile": "/k/n1.key_secret", "AllowedKeysDir": "/k/nodes"},
            }
        }
    )
    assert (c.mesh.peer_heartbeat_ms, c.mesh.suspect_after_ms, c.mesh.dead_after_ms) == (200, 600, 1500)
    assert c.mesh.mdns.enabled and c.mesh.dns.enabled
    assert c.mesh.curve == CurveConfig(key_file="/k/n1.key_secret", allowed_keys_dir="/k/nodes")


def test_cluster_mode_from_the_file_or_the_command_line() -> None:
    from_file = parse_config(nested("Cluster.Enabled", True))
    assert from_file.cluster
    assert with_overrides(from_file).cluster
    assert with_overrides(from_file, cluster=False).cluster  # -cluster cannot switch the file's off
    plain = parse_config({})
    assert not plain.cluster and not with_overrides(plain, cluster=False).cluster
    assert with_overrides(plain, cluster=True).cluster
    assert not parse_config(nested("Cluster.Enabled", False)).cluster


def test_cluster_yaml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "Cluster:\n  Enabled: true\n  ServerReference: other:1883\n"
        "Mesh:\n  ClusterName: lab\n  Port: 7000\n  BindAddress: 127.0.0.2\n  Plaintext: true\n"
        "  TcpIp:\n    Members:\n      - 127.0.0.1-3\n      - n4@127.0.0.4:7001\n"
        "  Mdns:\n    Enabled: true\n    Interfaces: [127.0.0.1]\n"
    )
    c = load_config(str(path))
    assert (c.cluster, c.cluster_config.server_reference) == (True, "other:1883")
    assert (c.mesh.cluster_name, c.mesh.port, c.mesh.bind_address, c.mesh.plaintext) == (
        "lab",
        7000,
        "127.0.0.2",
        True,
    )
    assert c.mesh.tcp_ip.members == ("127.0.0.1-3", "n4@127.0.0.4:7001")
    assert c.mesh.mdns.interfaces == ("127.0.0.1",)


# --- files ------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_config(str(path))


def test_invalid_yaml_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("MQTT: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(str(path))


def test_bytes_that_are_not_utf8_are_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"MQTT:\n  ResponseInformation: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not valid YAML"):
        load_config(str(path))


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the configuration file"):
        load_config(str(tmp_path))


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("MQTT:\n  MaxInflight: 1\n  MaxInflight: 2\n")
    with pytest.raises(ConfigError, match=r"^MaxInflight: duplicate key \(line 3\)"):
        load_config(str(path))


def test_yaml_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "NodeName: n1\nTCP: 1884\nMQTT:\n  MaxInflight: 10\n  RetainAvailable: false\n"
        "SessionStore:\n  Type: MEMORY\nLogging:\n  Level: WARNING\n  Loggers:\n    mesh: DEBUG\n"
    )
    c = load_config(str(path))
    assert (c.node_name, c.tcp_port, c.mqtt.max_inflight, c.mqtt.retain_available) == ("n1", 1884, 10, False)
    assert c.session_store.type is StoreType.MEMORY
    assert c.logging == LoggingConfig(level="WARNING", loggers=(("mesh", "DEBUG"),))


# --- environment variables --------------------------------------------------------------------


def test_env_var_is_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHMQ_TEST_PASS", "s3cret")
    c = parse_config(nested("SessionStore.Postgres.Pass", "${MESHMQ_TEST_PASS}"))
    assert c.session_store.postgres.password == "s3cret"
    c = parse_config(nested("SessionStore.Postgres.Url", "postgresql://${MESHMQ_TEST_PASS}@h/db"))
    assert c.session_store.postgres.url == "postgresql://s3cret@h/db"


def test_env_default_when_unset_or_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHMQ_TEST_UNSET", raising=False)
    monkeypatch.setenv("MESHMQ_TEST_EMPTY", "")
    c = parse_config(nested("SessionStore.Postgres.User", "${MESHMQ_TEST_UNSET:-mq}-${MESHMQ_TEST_EMPTY:-x}"))
    assert c.session_store.postgres.user == "mq-x"
    c = parse_config(nested("SessionStore.Postgres.Pass", "${MESHMQ_TEST_UNSET:-}"))
    assert c.session_store.postgres.password == ""


def test_missing_env_var_names_key_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHMQ_TEST_UNSET", raising=False)
    message = error_of(nested("SessionStore.Postgres.Pass", "${MESHMQ_TEST_UNSET}"))
    assert message.startswith("SessionStore.Postgres.Pass: environment variable MESHMQ_TEST_UNSET is not set")


def test_set_but_empty_env_var_without_default_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHMQ_TEST_EMPTY", "")
    c = parse_config(nested("SessionStore.Postgres.Pass", "${MESHMQ_TEST_EMPTY}"))
    assert c.session_store.postgres.password == ""


def test_malformed_reference_and_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    assert error_of(nested("MQTT.ResponseInformation", "${OOPS")).startswith(
        "MQTT.ResponseInformation: malformed environment reference '${OOPS'"
    )
    c = parse_config(nested("MQTT.ResponseInformation", "$${LITERAL}"))
    assert c.mqtt.response_information == "${LITERAL}"


def test_env_var_can_fill_numbers_and_booleans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHMQ_TEST_PORT", "1999")
    monkeypatch.setenv("MESHMQ_TEST_FLAG", "false")
    monkeypatch.setenv("MESHMQ_TEST_SECONDS", "0.5")
    c = parse_config(
        {
            "TCP": "${MESHMQ_TEST_PORT}",
            "MQTT": {"RetainAvailable": "${MESHMQ_TEST_FLAG}", "ConnectTimeout": "${MESHMQ_TEST_SECONDS}"},
        }
    )
    assert (c.tcp_port, c.mqtt.retain_available, c.mqtt.connect_timeout_s) == (1999, False, 0.5)
    monkeypatch.setenv("MESHMQ_TEST_PORT", "http")
    assert error_of({"TCP": "${MESHMQ_TEST_PORT}"}) == "TCP: must be an integer from 0 to 65535, got 'http'"


# --- command-line overrides -------------------------------------------------------------------


def test_with_overrides_replaces_only_what_is_given() -> None:
    base = parse_config({"Workers": 2, "TCP": 1884, "Logging": {"Level": "ERROR", "Loggers": {"m": "DEBUG"}}})
    assert with_overrides(base) == base
    c = with_overrides(base, workers=0, tcp_port=0, log_level="debug", cluster=True)
    assert (c.workers, c.tcp_port, c.cluster) == (0, 0, True)
    assert c.logging == LoggingConfig(level="DEBUG", loggers=(("m", "DEBUG"),))
    assert c.mqtt == base.mqtt


@pytest.mark.parametrize(
    ("overrides", "prefix"),
    [
        ({"workers": -2}, "Workers (-workers): must be an integer from 0 to 1024"),
        ({"tcp_port": 70000}, "TCP (-port): must be an integer from 0 to 65535"),
        ({"log_level": "LOUD"}, "Logging.Level (-log): must be one of"),
    ],
)
def test_with_overrides_validates(overrides: dict[str, Any], prefix: str) -> None:
    with pytest.raises(ConfigError) as info:
        with_overrides(Config(), **overrides)
    assert str(info.value).startswith(prefix)
