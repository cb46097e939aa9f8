"""The TLS, WebSocket, Auth and Limits sections: values, rules between keys, errors naming keys."""

from __future__ import annotations

import pytest

from broker.config import AclRule, ConfigError, parse_config

TLS_FILES = {"CertFile": "/etc/meshmq/server.pem", "KeyFile": "/etc/meshmq/server.key"}


def error_of(data: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_defaults_open_only_plain_tcp_and_check_nothing() -> None:
    config = parse_config({})
    assert (config.tcp_port, config.tls_port, config.ws_port, config.wss_port) == (1883, 0, 0, 0)
    assert not config.auth.enabled
    assert config.auth.acl_no_match == "DENY"
    assert config.websocket.path == "/mqtt"
    assert config.limits.max_publish_rate == 0


def test_listeners_and_tls_keys_are_read() -> None:
    config = parse_config(
        {
            "TCPS": 8883,
            "WS": 9001,
            "WSS": 9002,
            "TLS": {
                **TLS_FILES,
                "CaFile": "/etc/meshmq/ca.pem",
                "ClientCertificates": "required",
                "UseSubjectAsUsername": "cn",
                "MinVersion": "TLSv1.3",
            },
            "WebSocket": {"Path": "/ws"},
        }
    )
    assert (config.tls_port, config.ws_port, config.wss_port) == (8883, 9001, 9002)
    assert config.tls.client_certificates == "REQUIRED"
    assert config.tls.subject_as_username == "CN"
    assert config.tls.min_version == "TLSV1.3"
    assert config.websocket.path == "/ws"


def test_key_password_is_not_in_the_repr() -> None:
    config = parse_config({"TLS": {**TLS_FILES, "KeyPassword": "s3cret"}})
    assert config.tls.key_password == "s3cret"
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"TCPS": 8883}, "TLS.CertFile: needed by the TCPS / WSS listeners"),
        ({"WSS": 8884, "TLS": {"CertFile": "x.pem"}}, "TLS.KeyFile: needed by the TCPS / WSS listeners"),
        ({"TLS": {"ClientCertificates": "OPTIONAL"}}, "TLS.CaFile: needed with TLS.ClientCertificates"),
        ({"TLS": {"CaFile": "ca.pem", "UseSubjectAsUsername": "CN"}}, "TLS.UseSubjectAsUsername: needs"),
        ({"TLS": {"MinVersion": "SSLv3"}}, "TLS.MinVersion: must be one of TLSV1.2, TLSV1.3"),
        ({"TLS": {"CrlFile": "revoked.pem"}}, "TLS.CrlFile: needs TLS.ClientCertificates"),
        ({"WebSocket": {"Path": "mqtt"}}, "WebSocket.Path: must be an HTTP path"),
        ({"TCPS": 70000}, "TCPS: must be an integer from 0 to 65535"),
        (
            {"Auth": {"Enabled": True}, "SessionStore": {"Type": "MEMORY"}},
            "Auth.Enabled: needs SessionStore.Type SQLITE or POSTGRES",
        ),
        ({"Auth": {"AclNoMatch": "maybe"}}, "Auth.AclNoMatch: must be one of ALLOW, DENY"),
        ({"Auth": {"Acl": {"User": "*"}}}, "Auth.Acl: must be a list of rules"),
        (
            {"Auth": {"Acl": [{"User": "*", "Topic": "a/#/b", "Access": "pub"}]}},
            "Auth.Acl[0].Topic: not a valid",
        ),
        (
            {"Auth": {"Acl": [{"User": "*", "Topic": "a", "Access": "read"}]}},
            "Auth.Acl[0].Access: must be one of",
        ),
        ({"Auth": {"Acl": [{"User": "*", "Topic": "a"}]}}, "Auth.Acl[0].Access: missing"),
        (
            {"Auth": {"Acl": [{"User": "*", "Topic": "a", "Access": "pub", "Qos": 1}]}},
            "Auth.Acl[0].Qos: unknown key",
        ),
        ({"Limits": {"MaxPublishRate": -1}}, "Limits.MaxPublishRate: must be an integer from 0"),
        (
            {"Limits": {"MaxTopicLevls": 3}},
            "Limits.MaxTopicLevls: unknown key (did you mean MaxTopicLevels?)",
        ),
    ],
)
def test_bad_values_name_the_key(data: dict[str, object], expected: str) -> None:
    assert error_of(data).startswith(expected)


def test_acl_rules_keep_their_order_and_upper_case_access() -> None:
    config = parse_config(
        {
            "Auth": {
                "Enabled": True,
                "AllowAnonymous": True,
                "Acl": [
                    {"User": "$anonymous", "Topic": "public/#", "Access": "sub"},
                    {"User": "*", "Topic": "users/%u/#", "Access": "both"},
                ],
            }
        }
    )
    assert config.auth.acl == (
        AclRule("$anonymous", "public/#", "SUB"),
        AclRule("*", "users/%u/#", "BOTH"),
    )
