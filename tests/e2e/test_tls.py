"""MQTT over TLS (the TCPS listener) end to end: paho and mosquitto clients, client certificates,
MinVersion, a bad file at start, and the SIGHUP reload (broker/ACCESS.md, "Transports").

Brokers are module-scoped (one per TLS setup) to keep the file fast; certificates come from
`tools.certs` (the `openssl` command). Every connection goes to 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.broker_proc import BrokerProcess, free_port
from tests.e2e.clients import TestClient
from tools.certs import Pki, make_ca, make_crl, make_pki

pytestmark = pytest.mark.meshmq_only

MOSQUITTO_PUB = "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = "/usr/bin/mosquitto_sub"
HANDSHAKE_FAILED = r"TCPS: TLS handshake with 127\.0\.0\.1:\d+ failed: [^\n]*"


@dataclass
class Endpoint:
    host: str
    port: int


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def start_broker(
    workdir: Path, pki: Pki, tls: dict[str, Any], *, cert_dir: Path | None = None
) -> BrokerProcess:
    cert_dir = cert_dir or pki.directory
    tls = {
        "CertFile": str(cert_dir / pki.server_cert.name),
        "KeyFile": str(cert_dir / pki.server_key.name),
        **tls,
    }
    broker = BrokerProcess(workdir=workdir, config={"TCPS": free_port(), "TLS": tls})
    return broker.start()  # TCP is bound after TCPS: once TCP accepts, so does TCPS


def tls_port(broker: BrokerProcess) -> int:
    return int(broker.config["TCPS"])


@pytest.fixture(scope="module")
def server_only(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[BrokerProcess]:
    """No client certificates; TLS 1.3 at least; the certificate files live in a directory the
    reload test may rewrite (same CA, same names: the other tests do not notice)."""
    live = tmp_path_factory.mktemp("live-certs")
    shutil.copy(pki.server_cert, live / pki.server_cert.name)
    shutil.copy(pki.server_key, live / pki.server_key.name)
    broker = start_broker(
        tmp_path_factory.mktemp("server_only"), pki, {"MinVersion": "TLSv1.3"}, cert_dir=live
    )
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def required(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[BrokerProcess]:
    broker = start_broker(
        tmp_path_factory.mktemp("required"),
        pki,
        {"CaFile": str(pki.ca_cert), "ClientCertificates": "REQUIRED", "UseSubjectAsUsername": "CN"},
    )
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def optional(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[BrokerProcess]:
    broker = start_broker(
        tmp_path_factory.mktemp("optional"),
        pki,
        {"CaFile": str(pki.ca_cert), "ClientCertificates": "OPTIONAL", "UseSubjectAsUsername": "DN"},
    )
    yield broker
    broker.stop()


def tls_context(pki: Pki, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def tls_client(
    made: list[TestClient], broker: BrokerProcess, ctx: ssl.SSLContext, client_id: str, *, version: int = 5
) -> TestClient:
    """A paho TestClient over TLS to the broker's TCPS port (not yet connected)."""
    c = TestClient(Endpoint(broker.host, tls_port(broker)), client_id, version=version)
    c._client.tls_set_context(ctx)
    made.append(c)
    return c


def connected(
    made: list[TestClient], broker: BrokerProcess, ctx: ssl.SSLContext, client_id: str, **kw: Any
) -> TestClient:
    c = tls_client(made, broker, ctx, client_id, **kw)
    assert c.connect().reason_code == 0
    return c


def assert_refused(
    made: list[TestClient], broker: BrokerProcess, ctx: ssl.SSLContext, client_id: str
) -> None:
    """The handshake fails (at once, or for TLS 1.3 client certificates right after it)."""
    c = tls_client(made, broker, ctx, client_id)
    with pytest.raises(OSError):  # ssl.SSLError, or ConnectionError: closed before CONNACK
        c.connect()


def round_trip(sub: TestClient, pub: TestClient, topic: str, payload: bytes = b"hi") -> None:
    sub.subscribe(topic, qos=1)
    pub.publish(topic, payload, qos=1)
    m = sub.expect_one()
    assert (m.topic, m.payload) == (topic, payload)


# --- server certificate only -----------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_paho_over_tls(server_only: BrokerProcess, pki: Pki, clients: list[TestClient], version: int) -> None:
    ctx = tls_context(pki)
    sub = connected(clients, server_only, ctx, f"tls-sub-{version}", version=version)
    pub = connected(clients, server_only, ctx, f"tls-pub-{version}", version=version)
    round_trip(sub, pub, f"tls/{version}", b"over tls" * 1000)
    peer = sub._client.socket()
    assert isinstance(peer, ssl.SSLSocket) and peer.version() == "TLSv1.3"


def test_tls_and_tcp_clients_share_the_broker(
    server_only: BrokerProcess, pki: Pki, clients: list[TestClient]
) -> None:
    over_tls = connected(clients, server_only, tls_context(pki), "mixed-tls")
    plain = TestClient(server_only, "mixed-tcp")
    clients.append(plain)
    plain.connect()
    round_trip(over_tls, plain, "mixed/a")
    round_trip(plain, over_tls, "mixed/b")


def test_mosquitto_clients_over_tls(server_only: BrokerProcess, pki: Pki) -> None:
    common = ["-h", "127.0.0.1", "-p", str(tls_port(server_only)), "--cafile", str(pki.ca_cert)]
    subprocess.run(
        [MOSQUITTO_PUB, *common, "-t", "cli/tls", "-m", "from mosquitto_pub", "-r", "-q", "1"],
        check=True,
        timeout=10,
    )
    try:
        done = subprocess.run(
            [MOSQUITTO_SUB, *common, "-V", "5", "-t", "cli/tls", "-C", "1", "-W", "5"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "from mosquitto_pub"
    finally:  # clear the retained message
        subprocess.run([MOSQUITTO_PUB, *common, "-t", "cli/tls", "-n", "-r"], check=True, timeout=10)


def test_min_version_refuses_a_tls12_client(
    server_only: BrokerProcess, pki: Pki, clients: list[TestClient]
) -> None:
    before = len(server_only.wait_log(HANDSHAKE_FAILED, 0))
    old = tls_context(pki)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    c = tls_client(clients, server_only, old, "tls12")
    with pytest.raises(ssl.SSLError):
        c.connect()
    server_only.wait_log(HANDSHAKE_FAILED, before + 1)
    connected(clients, server_only, tls_context(pki), "tls13-still-fine")


def test_plain_mqtt_to_the_tls_port_is_one_log_line(
    server_only: BrokerProcess, clients: list[TestClient]
) -> None:
    before = len(server_only.wait_log(HANDSHAKE_FAILED, 0))
    c = TestClient(Endpoint(server_only.host, tls_port(server_only)), "plain-to-tls")
    clients.append(c)
    with pytest.raises(OSError):
        c.connect()
    lines = server_only.wait_log(HANDSHAKE_FAILED, before + 1)
    assert "not a TLS client" in lines[-1]
    assert "Traceback" not in server_only.log()


def test_sighup_reloads_certificates(server_only: BrokerProcess, pki: Pki, clients: list[TestClient]) -> None:
    """New files + SIGHUP to the supervisor: new connections get the new certificate, a connection
    opened before stays up and keeps getting messages."""
    ctx = tls_context(pki)
    old_sub = connected(clients, server_only, ctx, "reload-old")
    old_sub.subscribe("reload/t", qos=1)
    old_der = _peer_der(old_sub)
    assert old_der == ssl.PEM_cert_to_DER_cert(pki.server_cert.read_text())

    live = Path(server_only.config["TLS"]["CertFile"]).parent
    new_cert, new_key = pki.server_cert_for("server-reloaded", common_name="reloaded")
    for source, name in ((new_key, pki.server_key.name), (new_cert, pki.server_cert.name)):
        shutil.copy(source, live / f".{name}.tmp")
        os.replace(live / f".{name}.tmp", live / name)
    reloads = len(server_only.wait_log("TLS reloaded", 0))
    assert server_only.proc is not None
    os.kill(server_only.proc.pid, signal.SIGHUP)  # the supervisor, which forwards it to workers
    server_only.wait_log("SIGHUP received: reloading TLS in 1 worker", 1)
    server_only.wait_log("TLS reloaded", reloads + 1)

    new_pub = connected(clients, server_only, ctx, "reload-new")
    assert _peer_der(new_pub) == ssl.PEM_cert_to_DER_cert(new_cert.read_text()) != old_der
    new_pub.publish("reload/t", b"after reload", qos=1)
    assert old_sub.expect_one().payload == b"after reload"
    assert old_sub.is_connected


def _peer_der(client: TestClient) -> bytes:
    sock = client._client.socket()
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


# --- client certificates ---------------------------------------------------------------------------


def test_required_client_certificate(
    required: BrokerProcess, pki: Pki, clients: list[TestClient], tmp_path: Path
) -> None:
    """No certificate, an untrusted CA's, an expired one: each handshake fails (and is logged),
    while a client with a good certificate on the same broker keeps working."""
    good = tls_context(pki, pki.client_cert("device-1"))
    sub = connected(clients, required, good, "good-sub")
    sub.subscribe("req/t", qos=1)
    before = len(required.wait_log(HANDSHAKE_FAILED, 0))
    untrusted = make_ca(tmp_path, "untrusted")
    bad = {
        "none": tls_context(pki),
        "untrusted": tls_context(pki, pki.client_cert("eve", ca=untrusted)),
        "expired": tls_context(pki, pki.client_cert("old", expired=True)),
    }
    for name, ctx in bad.items():
        assert_refused(clients, required, ctx, f"bad-{name}")
    lines = required.wait_log(HANDSHAKE_FAILED, before + 3)[before:]
    assert any("certificate has expired" in line for line in lines), lines
    assert any("unable to get local issuer certificate" in line for line in lines), lines
    assert "Traceback" not in required.log()
    pub = connected(clients, required, tls_context(pki, pki.client_cert("device-2")), "good-pub", version=4)
    pub.publish("req/t", b"still here", qos=1)
    assert sub.expect_one().payload == b"still here"


def test_subject_as_username_client_connects(
    required: BrokerProcess, pki: Pki, clients: list[TestClient]
) -> None:
    """With UseSubjectAsUsername the certificate authenticates: a verified client connects with
    or without a username (the CN extraction itself is unit-tested in tests/unit/net)."""
    ctx = tls_context(pki, pki.client_cert("sensor-7"))
    c = tls_client(clients, required, ctx, "cn-client")
    c._client.username_pw_set("ignored", "ignored")
    assert c.connect().reason_code == 0


def test_optional_client_certificate(
    optional: BrokerProcess, pki: Pki, clients: list[TestClient], tmp_path: Path
) -> None:
    without = connected(clients, optional, tls_context(pki), "opt-without")
    with_cert = connected(clients, optional, tls_context(pki, pki.client_cert("opt")), "opt-with")
    round_trip(without, with_cert, "opt/t")
    # A certificate that is sent must verify, even when it is optional.
    assert_refused(
        clients, optional, tls_context(pki, pki.client_cert("opt-old", expired=True)), "opt-expired"
    )
    assert_refused(
        clients,
        optional,
        tls_context(pki, pki.client_cert("opt-eve", ca=make_ca(tmp_path, "x"))),
        "opt-untrusted",
    )


# --- configuration -------------------------------------------------------------------------------


def test_bad_certificate_file_stops_the_node(tmp_path: Path, pki: Pki) -> None:
    missing = tmp_path / "missing.crt"
    broker = BrokerProcess(
        workdir=tmp_path,
        config={"TCPS": free_port(), "TLS": {"CertFile": str(missing), "KeyFile": str(pki.server_key)}},
        port=free_port(),
    )
    with pytest.raises(RuntimeError, match="exited with 2"):  # checked before any process starts
        broker.start()
    assert f"meshmq: config error: TLS.CertFile: cannot load '{missing}'" in broker.log()


def test_a_taken_websocket_or_tls_port_stops_the_node_with_a_clear_error(tmp_path: Path, pki: Pki) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        broker = BrokerProcess(workdir=tmp_path, config={"WS": taken}, port=free_port())
        with pytest.raises(RuntimeError, match="exited with 1"):
            broker.start()
        assert f"cannot listen on 127.0.0.1:{taken}" in broker.log()
        same = free_port()
        (tmp_path / "twice").mkdir()
        twice = BrokerProcess(
            workdir=tmp_path / "twice",
            config={
                "WS": same,
                "WSS": same,
                "TLS": {"CertFile": str(pki.server_cert), "KeyFile": str(pki.server_key)},
            },
            port=free_port(),
        )
        with pytest.raises(RuntimeError, match="exited with 1"):
            twice.start()
        assert "two listeners on one port" in twice.log()


# --- the certificate as the username, with Auth.Enabled --------------------------------------------


def test_the_certificate_subject_is_the_username_for_auth_and_acls(
    tmp_path: Path, pki: Pki, clients: list[TestClient]
) -> None:
    broker = BrokerProcess(
        workdir=tmp_path,
        config={
            "TCPS": free_port(),
            "TLS": {
                "CertFile": str(pki.server_cert),
                "KeyFile": str(pki.server_key),
                "CaFile": str(pki.ca_cert),
                "ClientCertificates": "REQUIRED",
                "UseSubjectAsUsername": "CN",
            },
            "SessionStore": {"Type": "SQLITE", "SQLite": {"Path": str(tmp_path / "store.db")}},
            "Auth": {"Enabled": True, "Acl": [{"User": "*", "Topic": "users/%u/#", "Access": "BOTH"}]},
        },
    ).start()
    try:
        # no user of that name in the store, no password: the verified certificate is enough
        alice = tls_client(clients, broker, tls_context(pki, pki.client_cert("alice")), "alice-dev")
        assert alice.connect().reason_code == 0
        assert alice.subscribe("users/alice/#", qos=1) == [1]
        assert alice.subscribe("users/bob/#", qos=1) == [0x87]
        assert alice.publish("users/alice/x", b"own", qos=1) == 0
        assert alice.expect_one().payload == b"own"
        assert alice.publish("users/bob/x", b"theirs", qos=1) == 0x87
        # the CONNECT's user name and password are ignored: the certificate says who this is
        bob = TestClient(
            Endpoint(broker.host, tls_port(broker)), "bob-dev", username="alice", password="nope"
        )
        bob._client.tls_set_context(tls_context(pki, pki.client_cert("bob")))
        clients.append(bob)
        assert bob.connect().reason_code == 0
        assert bob.publish("users/alice/x", b"spoof", qos=1) == 0x87
        assert bob.publish("users/bob/x", b"fine", qos=1) == 0x10  # allowed; nobody subscribed
        alice.expect_none(0.3)
    finally:
        broker.stop()


# --- revocation (TLS.CrlFile) ---------------------------------------------------------------------


def test_revoked_client_certificates_are_refused_and_a_new_crl_applies_on_sighup(
    tmp_path: Path, pki: Pki, clients: list[TestClient]
) -> None:
    alice, bob = pki.client_cert("rev-alice"), pki.client_cert("rev-bob")
    crl = tmp_path / "revoked.pem"
    shutil.copy(make_crl(tmp_path / "crls", pki.ca, [bob[0]], name="first"), crl)
    (tmp_path / "node").mkdir()
    broker = start_broker(
        tmp_path / "node",
        pki,
        {"CaFile": str(pki.ca_cert), "ClientCertificates": "REQUIRED", "CrlFile": str(crl)},
    )
    try:
        sub = connected(clients, broker, tls_context(pki, alice), "rev-alice-sub")
        sub.subscribe("rev/t", qos=1)
        assert_refused(clients, broker, tls_context(pki, bob), "rev-bob")
        # alice is revoked too, and the node told so: her open connection stays, new ones fail
        shutil.copy(make_crl(tmp_path / "crls", pki.ca, [bob[0], alice[0]], name="second"), crl)
        reloads = len(broker.wait_log("TLS reloaded", 0))
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGHUP)
        broker.wait_log("TLS reloaded", reloads + 1)
        assert_refused(clients, broker, tls_context(pki, alice), "rev-alice-again")
        carol = connected(clients, broker, tls_context(pki, pki.client_cert("rev-carol")), "rev-carol")
        carol.publish("rev/t", b"still here", qos=1)
        assert sub.expect_one().payload == b"still here"
    finally:
        broker.stop()
