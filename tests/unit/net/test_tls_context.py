"""broker/net/tls.py: the context from the `TLS` section, errors that name the key, identities,
reload, and the handshake wrapper that counts and logs failures (broker/ACCESS.md, "Transports").

Handshakes in the context tests run in memory (two `ssl.MemoryBIO` pairs), no socket; the
wrapper tests use a loopback listener in this process, on asyncio's and on uvloop's loop.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import uvloop

from broker.config_access import TlsConfig
from broker.config_values import ConfigError
from broker.metrics import Counters
from broker.net import tls
from tools.certs import Pki, encrypt_key, make_ca, make_crl, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def config(pki: Pki, **changes: str) -> TlsConfig:
    base = TlsConfig(cert_file=str(pki.server_cert), key_file=str(pki.server_key), ca_file=str(pki.ca_cert))
    return replace(base, **changes)


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[bytes, ssl.SSLObject]:
    """An in-memory TLS handshake; the server certificate (DER) the client saw and the server side."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, side in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    if not all(done.values()):
        raise AssertionError("handshake did not complete")
    # TLS 1.3: the server checks a client certificate after the client finished; one record more.
    c.write(b"x")
    s_in.write(c_out.read())
    assert s.read(1) == b"x"
    der = c.getpeercert(binary_form=True)
    assert der is not None
    return der, s


def client_context(pki: Pki, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def der_of(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


# --- the context -----------------------------------------------------------------------------------


def test_context_from_config(pki: Pki) -> None:
    ctx = tls.make_context(config(pki))
    assert ctx.verify_mode is ssl.CERT_NONE
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    der, server_side = handshake(ctx, client_context(pki))
    assert der == der_of(pki.server_cert)
    assert server_side.getpeercert() is None


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("NONE", ssl.CERT_NONE), ("OPTIONAL", ssl.CERT_OPTIONAL), ("REQUIRED", ssl.CERT_REQUIRED)],
)
def test_client_certificates_set_verify_mode(pki: Pki, mode: str, expected: ssl.VerifyMode) -> None:
    assert tls.make_context(config(pki, client_certificates=mode)).verify_mode is expected


def test_min_version_and_ciphers(pki: Pki) -> None:
    ctx = tls.make_context(config(pki, min_version="TLSV1.3", ciphers="ECDHE+AESGCM"))
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
    client = client_context(pki)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        handshake(ctx, client)


def test_verified_client_certificate_is_seen(pki: Pki) -> None:
    ctx = tls.make_context(config(pki, client_certificates="REQUIRED"))
    _, server_side = handshake(ctx, client_context(pki, pki.client_cert("alice")))
    assert tls.identity(server_side.getpeercert(), "CN") == "alice"
    assert tls.identity(server_side.getpeercert(), "DN") == "CN=alice,O=MeshMQ"


def test_required_client_certificate_refuses_untrusted_and_expired(pki: Pki, tmp_path: Path) -> None:
    ctx = tls.make_context(config(pki, client_certificates="REQUIRED"))
    other = make_ca(tmp_path, "other")
    for cert in (None, pki.client_cert("mallory", ca=other), pki.client_cert("old", expired=True)):
        with pytest.raises(ssl.SSLError):
            handshake(ctx, client_context(pki, cert))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cert_file": "/nonexistent/server.crt"}, "TLS.CertFile: cannot load '/nonexistent/server.crt'"),
        ({"key_file": "/nonexistent/server.key"}, "TLS.KeyFile: cannot load '/nonexistent/server.key'"),
        ({"ca_file": "/nonexistent/ca.crt", "client_certificates": "OPTIONAL"}, "TLS.CaFile: cannot load"),
        ({"ciphers": "NO-SUCH-CIPHER"}, "TLS.Ciphers:"),
    ],
)
def test_missing_files_name_the_key(pki: Pki, changes: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        tls.make_context(config(pki, **changes))
    assert str(info.value).startswith(message), info.value


def test_bad_files_name_the_key(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        ({"cert_file": str(garbage)}, "TLS.CertFile: cannot load"),
        ({"key_file": str(garbage)}, "TLS.KeyFile: cannot load"),
        ({"key_file": str(pki.ca_key)}, "TLS.KeyFile: cannot load"),  # does not match the certificate
        ({"ca_file": str(garbage), "client_certificates": "REQUIRED"}, "TLS.CaFile: cannot load"),
    ]
    for changes, message in cases:
        with pytest.raises(ConfigError) as info:
            tls.make_context(config(pki, **changes))
        assert str(info.value).startswith(message), (changes, info.value)


def test_encrypted_key_needs_its_password(pki: Pki, tmp_path: Path) -> None:
    locked = encrypt_key(pki.server_key, "s3cret", tmp_path / "locked.key")
    ctx = tls.make_context(config(pki, key_file=str(locked), key_password="s3cret"))
    assert handshake(ctx, client_context(pki))[0] == der_of(pki.server_cert)
    for password in ("wrong", ""):  # "" must fail, never ask on a terminal
        with pytest.raises(ConfigError) as info:
            tls.make_context(config(pki, key_file=str(locked), key_password=password))
        assert str(info.value).startswith("TLS.KeyPassword: cannot decrypt"), info.value


# --- reload ----------------------------------------------------------------------------------------


def test_reload_uses_new_files_for_new_handshakes(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    live = tmp_path / "live"
    live.mkdir()
    cfg = TlsConfig(cert_file=str(live / "s.crt"), key_file=str(live / "s.key"))
    shutil.copy(pki.server_cert, live / "s.crt")
    shutil.copy(pki.server_key, live / "s.key")
    live_ctx = tls.LiveContext(tls.make_context(cfg))
    old = live_ctx.ctx
    assert handshake(live_ctx.ctx, client_context(pki))[0] == der_of(pki.server_cert)

    new_cert, new_key = pki.server_cert_for("server2", common_name="reloaded")
    shutil.copy(new_cert, live / "s.crt")
    shutil.copy(new_key, live / "s.key")
    assert tls.reload(live_ctx, cfg) is True
    assert live_ctx.ctx is not old  # a new context for new handshakes; the old one stays intact
    assert handshake(live_ctx.ctx, client_context(pki))[0] == der_of(new_cert)
    assert handshake(old, client_context(pki))[0] == der_of(pki.server_cert)


def test_reload_keeps_the_old_files_when_the_new_ones_do_not_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = make_pki(tmp_path)
    live = tmp_path / "live"
    live.mkdir()
    cfg = TlsConfig(cert_file=str(live / "s.crt"), key_file=str(live / "s.key"))
    shutil.copy(pki.server_cert, live / "s.crt")
    shutil.copy(pki.server_key, live / "s.key")
    live_ctx = tls.LiveContext(tls.make_context(cfg))
    old = live_ctx.ctx

    other_cert, _other_key = pki.server_cert_for("other")
    shutil.copy(other_cert, live / "s.crt")  # the new certificate with the old key: a mismatch
    with caplog.at_level(logging.ERROR, logger="broker.net.tls"):
        assert tls.reload(live_ctx, cfg) is False
    assert "keeping the certificates in use" in caplog.text
    assert "TLS.KeyFile" in caplog.text
    assert live_ctx.ctx is old
    assert handshake(live_ctx.ctx, client_context(pki))[0] == der_of(pki.server_cert)

    (live / "s.crt").unlink()
    assert tls.reload(live_ctx, cfg) is False
    assert live_ctx.ctx is old


# --- identities ------------------------------------------------------------------------------------


def cert_with(*rdns: tuple[tuple[str, str], ...]) -> dict[str, object]:
    return {"subject": rdns}


def test_identity_cn_and_dn() -> None:
    peer = cert_with(
        (("countryName", "DE"),), (("organizationName", "Acme, Inc."),), (("commonName", "dev 1"),)
    )
    assert tls.identity(peer, "CN") == "dev 1"
    assert tls.identity(peer, "DN") == "CN=dev 1,O=Acme\\, Inc.,C=DE"
    assert tls.identity(peer, "NONE") is None


def test_identity_rfc4514_escaping_and_multi_valued_rdn() -> None:
    peer = cert_with(
        (("organizationalUnitName", "a+b"), ("userId", "42")),
        (("commonName", "#lead "),),
        (("emailAddress", "x@example.com"),),
    )
    assert tls.identity(peer, "DN") == "emailAddress=x@example.com,CN=\\#lead\\ ,OU=a\\+b+UID=42"
    assert tls.identity(cert_with((("commonName", 'q"<>;\\'),)), "DN") == 'CN=q\\"\\<\\>\\;\\\\'


def test_identity_without_certificate_or_cn() -> None:
    assert tls.identity(None, "CN") is None
    assert tls.identity({}, "DN") is None
    assert tls.identity(cert_with((("organizationName", "Acme"),)), "CN") is None


def test_identity_takes_the_most_specific_cn() -> None:
    peer = cert_with((("commonName", "group"),), (("commonName", "device"),))
    assert tls.identity(peer, "CN") == "device"


# --- the handshake wrapper -------------------------------------------------------------------------


class _Echo(asyncio.Protocol):
    def __init__(self, seen: list[str | None]) -> None:
        self.seen = seen
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.seen.append(tls.transport_identity(transport, "CN"))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


def _client(port: int, ctx: ssl.SSLContext | None) -> bytes:
    """Connect, say hello, return what came back (b"" if the server hung up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        if ctx is None:
            raw.sendall(b"\x10\x0cMQTT plain\r\n")
            return raw.recv(100)
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"hello")
                return s.recv(100)
        except (ssl.SSLError, ConnectionError):
            return b""


@pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_failed_handshakes_are_counted_and_logged_once(
    pki: Pki,
    tmp_path: Path,
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = tls.make_context(config(pki, client_certificates="REQUIRED"))
    counters = Counters()
    seen: list[str | None] = []
    untrusted = make_ca(tmp_path, "untrusted")
    clients: list[tuple[str, ssl.SSLContext | None]] = [
        ("good", client_context(pki, pki.client_cert("dev1"))),
        ("no certificate", client_context(pki)),
        ("expired", client_context(pki, pki.client_cert("old", expired=True))),
        ("untrusted", client_context(pki, pki.client_cert("eve", ca=untrusted))),
        ("plain TCP", None),
    ]
    replies: dict[str, bytes] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tls.install_exception_handler(loop)
        server = await loop.create_server(
            tls.tls_factory(loop, tls.LiveContext(ctx), lambda: _Echo(seen), counters, "TCPS"), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        for name, client in clients:
            replies[name] = await loop.run_in_executor(None, _client, port, client)
        for _ in range(100):  # the server side of the last failure may lag the client by a tick
            if counters.tls_handshake_failures >= 4:
                break
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()

    loop = loop_factory()
    try:
        with caplog.at_level(logging.DEBUG):
            loop.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        loop.close()
    assert replies["good"] == b"hello"
    assert seen == ["dev1"]
    assert all(replies[name] == b"" for name in replies if name != "good")
    assert counters.tls_handshake_failures == 4
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 4, [r.getMessage() for r in warnings]
    assert all(r.name == "broker.net.tls" and r.exc_info is None for r in warnings)
    text = "\n".join(r.getMessage() for r in warnings)
    assert "certificate has expired" in text
    assert "not a TLS client" in text
    assert "TCPS: TLS handshake with 127.0.0.1:" in text
    assert "Traceback" not in caplog.text


def test_handshake_reasons() -> None:
    assert tls.handshake_reason(ConnectionAbortedError("slow")) == "no handshake within 10s"
    assert tls.handshake_reason(ConnectionResetError()) == "connection closed during the handshake"


# --- revocation ------------------------------------------------------------------------------------


def test_a_revoked_client_certificate_fails_and_a_reloaded_crl_revokes_more(pki: Pki, tmp_path: Path) -> None:
    alice, bob = pki.client_cert("crl-alice"), pki.client_cert("crl-bob")
    crl = tmp_path / "live-crl.pem"
    shutil.copy(make_crl(tmp_path, pki.ca, [alice[0]], name="crl-1"), crl)
    cfg = config(pki, client_certificates="REQUIRED", crl_file=str(crl))
    live_ctx = tls.LiveContext(tls.make_context(cfg))
    with pytest.raises(ssl.SSLError):
        handshake(live_ctx.ctx, client_context(pki, alice))
    handshake(live_ctx.ctx, client_context(pki, bob))
    shutil.copy(make_crl(tmp_path, pki.ca, [alice[0], bob[0]], name="crl-2"), crl)
    assert tls.reload(live_ctx, cfg) is True
    with pytest.raises(ssl.SSLError):
        handshake(live_ctx.ctx, client_context(pki, bob))
    handshake(live_ctx.ctx, client_context(pki, pki.client_cert("crl-carol")))


def test_a_crl_file_that_is_not_a_crl_names_the_key(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        tls.make_context(config(pki, client_certificates="REQUIRED", crl_file=str(pki.ca_cert)))
    assert str(info.value).startswith("TLS.CrlFile:"), info.value
    with pytest.raises(ConfigError) as info:
        tls.make_context(config(pki, client_certificates="REQUIRED", crl_file=str(tmp_path / "none.pem")))
    assert str(info.value).startswith("TLS.CrlFile: cannot load"), info.value
