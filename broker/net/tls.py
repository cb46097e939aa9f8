"""TLS for the TCPS and WSS listeners: the server context, its reload, handshakes, identities.

Why: one place that turns the `TLS` section into an `ssl.SSLContext`, builds a new one on
SIGHUP (the listeners take the current one of a `LiveContext` at each accept), wraps accepted connections so that a failed handshake is seen (one log line, one
counter), and reads a verified client certificate's subject as the client's identity
(`broker/ACCESS.md`, "Transports").

Handshakes: asyncio's and uvloop's `create_server(ssl=...)` drop a failed handshake without a
word (the error is an `OSError`, logged only in debug mode), so the listeners are plain TCP servers
whose protocol factory builds the loop's own `SSLProtocol` around our MQTT protocol with a waiter
future of ours; the waiter tells how the handshake ended. The loop's TLS code (uvloop's is
compiled) still does all the record work: nothing of ours runs per TLS record.

Must not: interpret MQTT, or keep a certificate file open. A file that does not load at start is
a `ConfigError` naming the key; at reload it is logged and the old files stay in use.

Invariants:
- `verify_mode` follows `ClientCertificates` (NONE → CERT_NONE, OPTIONAL → CERT_OPTIONAL,
  REQUIRED → CERT_REQUIRED); with NONE no CA is loaded and no certificate is asked for.
- `identity` returns a name only for a certificate that verified (the handshake fails otherwise);
  the DN form is RFC 4514 (most specific RDN first, `CN=alice,O=Example`).
- Every failed handshake is counted once in `tls_handshake_failures` and logged once at WARNING
  with the peer address and the reason, never with a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from functools import partial
from typing import Final, Protocol, cast

from broker.config_access import TlsConfig
from broker.config_values import ConfigError
from broker.metrics import Counters

log = logging.getLogger("broker.net.tls")

HANDSHAKE_TIMEOUT_S: Final = 10.0
_VERIFY_MODES: Final = {
    "NONE": ssl.CERT_NONE,
    "OPTIONAL": ssl.CERT_OPTIONAL,
    "REQUIRED": ssl.CERT_REQUIRED,
}
_VERSIONS: Final = {"TLSV1.2": ssl.TLSVersion.TLSv1_2, "TLSV1.3": ssl.TLSVersion.TLSv1_3}

# RFC 4514 section 2.3: the attribute types with a short name; others keep OpenSSL's long name.
_SHORT_NAMES: Final = {
    "commonName": "CN",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}

# What `ssl.SSLSocket.getpeercert()` returns (typeshed's `_PeerCertRetDictType`).
PeerCert = Mapping[str, object]


# --- the context ---------------------------------------------------------------------------------


def make_context(tls: TlsConfig) -> ssl.SSLContext:
    """The server context of the TCPS / WSS listeners; a file that does not load is a ConfigError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    if tls.ciphers:
        try:
            ctx.set_ciphers(tls.ciphers)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"TLS.Ciphers: OpenSSL accepts none of {tls.ciphers!r} ({_reason(exc)})"
            ) from None
    _load_files(ctx, tls)
    ctx.verify_mode = _VERIFY_MODES[tls.client_certificates]
    return ctx


class LiveContext:
    """The context the TLS listeners use for their next handshake: `reload` puts a new one here
    (open connections keep the one they started with)."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx


def _load_files(ctx: ssl.SSLContext, tls: TlsConfig) -> None:
    """Load the certificate chain, its key and the client CAs into ctx, naming the key at fault."""
    with_ca = tls.client_certificates != "NONE" and bool(tls.ca_file)
    for key, path in (
        ("TLS.CertFile", tls.cert_file),
        ("TLS.KeyFile", tls.key_file),
        ("TLS.CaFile", tls.ca_file),
    ):
        if key == "TLS.CaFile" and not with_ca:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{key}: cannot load {path!r}: {exc.strerror or exc}") from None
    try:
        # Always a callable: with None, OpenSSL would ask for a key's password on the terminal.
        ctx.load_cert_chain(tls.cert_file, tls.key_file, lambda: tls.key_password)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(_chain_error(tls, exc)) from None
    if with_ca:
        try:
            ctx.load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"TLS.CaFile: cannot load {tls.ca_file!r}: {_reason(exc)}") from None
    if with_ca and tls.crl_file:
        # Revoked client certificates: the CRL of the CA that signs them (PEM), checked for the
        # client's own certificate; a certificate whose CA has no CRL in the file fails too.
        try:
            with open(tls.crl_file, "rb") as crl:
                if b"-----BEGIN X509 CRL-----" not in crl.read():
                    raise ConfigError(
                        f"TLS.CrlFile: {tls.crl_file!r} holds no PEM certificate revocation list"
                    )
            ctx.load_verify_locations(cafile=tls.crl_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"TLS.CrlFile: cannot load {tls.crl_file!r}: {_reason(exc)}") from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _chain_error(tls: TlsConfig, exc: OSError) -> str:
    """Which key of the certificate / key / password trio is wrong (load_cert_chain does not say)."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:  # the certificate alone: a file that is not a PEM certificate names CertFile
        probe.load_verify_locations(cafile=tls.cert_file)
    except (ssl.SSLError, OSError) as cert_exc:
        return f"TLS.CertFile: cannot load {tls.cert_file!r}: {_reason(cert_exc)}"
    text = _reason(exc)
    if "KEY_VALUES_MISMATCH" in text.upper() or "values mismatch" in text.lower():
        return f"TLS.KeyFile: cannot load {tls.key_file!r}: the key does not match TLS.CertFile ({text})"
    try:
        with open(tls.key_file, "rb") as key:
            encrypted = b"ENCRYPTED" in key.read(1 << 16)
    except OSError:
        encrypted = False
    if encrypted:  # OpenSSL says only "PEM lib" for a wrong password
        missing = "missing" if not tls.key_password else "wrong"
        return f"TLS.KeyPassword: cannot decrypt {tls.key_file!r} ({missing} password)"
    return f"TLS.KeyFile: cannot load {tls.key_file!r}: {text}"


def _reason(exc: OSError) -> str:
    # An SSLError has `reason` only when OpenSSL gave one (not for set_ciphers, for one).
    reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else exc.strerror
    return str(reason or exc)


def reload(live: LiveContext, tls: TlsConfig) -> bool:
    """Build a new context from the files (CertFile, KeyFile, CaFile, CrlFile) and make it the
    one of the next handshakes; open connections keep theirs. On any error the old context stays
    and the error is logged. True when the new files are in use."""
    try:
        ctx = make_context(tls)
    except ConfigError as exc:
        log.error("TLS reload failed, keeping the certificates in use: %s", exc)
        return False
    live.ctx = ctx
    log.info("TLS reloaded: %s", tls)
    return True


# --- identities ----------------------------------------------------------------------------------


def identity(peercert: PeerCert | None, mode: str) -> str | None:
    """A verified client certificate's subject as a username: its CN (`mode` "CN") or its whole
    DN in RFC 4514 form (`mode` "DN"); None with mode NONE, without a certificate or without a CN."""
    if not peercert or mode == "NONE":
        return None
    subject = peercert.get("subject")
    if not isinstance(subject, tuple):
        return None
    rdns = cast(tuple[tuple[tuple[str, str], ...], ...], subject)
    if mode == "CN":
        names = [value for rdn in rdns for attr, value in rdn if attr == "commonName"]
        return names[-1] if names else None  # the most specific CN (RFC 4514 order: the first)
    if mode == "DN":
        text = ",".join(
            "+".join(f"{_SHORT_NAMES.get(a, a)}={_escape(v)}" for a, v in rdn) for rdn in reversed(rdns)
        )
        return text or None
    raise ValueError(f"unknown subject mode {mode!r}")


def _escape(value: str) -> str:
    """RFC 4514 section 2.4 escaping of an attribute value."""
    out = []
    for index, char in enumerate(value):
        if char in ',+"\\<>;' or (char == "#" and index == 0):
            out.append("\\" + char)
        elif char == " " and (index == 0 or index == len(value) - 1):
            out.append("\\ ")
        elif char == "\x00":
            out.append("\\00")
        else:
            out.append(char)
    return "".join(out)


class _HasExtraInfo(Protocol):
    def get_extra_info(self, name: str, default: object = None) -> object: ...


def transport_identity(transport: _HasExtraInfo, mode: str) -> str | None:
    """The identity of the client certificate of an established TLS transport (None on plain TCP)."""
    if mode == "NONE":
        return None
    peercert = transport.get_extra_info("peercert")
    return identity(cast(PeerCert, peercert), mode) if isinstance(peercert, dict) else None


# --- handshakes ----------------------------------------------------------------------------------


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Callable[..., asyncio.BaseProtocol]:
    """The loop's own SSLProtocol: uvloop's compiled one on uvloop, asyncio's otherwise."""
    try:
        import uvloop
        import uvloop.loop

        if isinstance(loop, uvloop.Loop):
            # Not in uvloop's stubs, but the class its own create_server(ssl=...) uses.
            return cast(Callable[..., asyncio.BaseProtocol], getattr(uvloop.loop, "SSLProtocol"))  # noqa: B009
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    from asyncio import sslproto

    return sslproto.SSLProtocol


def tls_factory(
    loop: asyncio.AbstractEventLoop,
    live: LiveContext,
    app_factory: Callable[[], asyncio.Protocol],
    counters: Counters,
    listener: str,
) -> Callable[[], asyncio.BaseProtocol]:
    """A protocol factory for a plain TCP server that speaks TLS and then `app_factory`'s protocol.

    The app protocol's `connection_made` runs once the handshake succeeded, with the TLS
    transport (`get_extra_info("peercert")` works on it); a failed handshake never reaches it."""
    ssl_protocol = _ssl_protocol_class(loop)

    def factory() -> asyncio.BaseProtocol:
        waiter: asyncio.Future[None] = loop.create_future()
        app = app_factory()
        wrapped = ssl_protocol(
            loop, app, live.ctx, waiter, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S
        )
        peer = _PeerNote(wrapped)
        waiter.add_done_callback(partial(_handshake_done, peer, counters, listener))
        return peer

    return factory


class _PeerNote(asyncio.Protocol):
    """Notes the peer address at accept time and then steps aside: it hands the transport to the
    loop's SSLProtocol (`set_protocol`) so no call of ours sits on the data path."""

    __slots__ = ("peer", "wrapped")

    def __init__(self, wrapped: asyncio.BaseProtocol) -> None:
        self.wrapped = wrapped
        self.peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        transport.set_protocol(self.wrapped)
        self.wrapped.connection_made(transport)

    # Both loops start reading only after connection_made returns, so no data can reach this
    # protocol; only a connection lost before the hand-over could.
    def connection_lost(self, exc: Exception | None) -> None:  # pragma: no cover
        self.wrapped.connection_lost(exc)


def _handshake_done(peer: _PeerNote, counters: Counters, listener: str, waiter: asyncio.Future[None]) -> None:
    if waiter.cancelled():
        return
    exc = waiter.exception()
    if exc is None:
        return
    counters.tls_handshake_failures += 1
    log.warning("%s: TLS handshake with %s failed: %s", listener, peer.peer, handshake_reason(exc))


def handshake_reason(exc: BaseException) -> str:
    """A short reason for a failed handshake, for the log line."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate rejected ({exc.verify_message or _reason(exc)})"
    if isinstance(exc, ssl.SSLError):
        reason = _reason(exc)
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_RECORD", "RECORD_LAYER_FAILURE"):
            return f"not a TLS client ({reason})"
        return reason
    if isinstance(exc, ConnectionAbortedError):
        return f"no handshake within {HANDSHAKE_TIMEOUT_S:.0f}s"
    if isinstance(exc, ConnectionError):
        return "connection closed during the handshake"
    return f"{type(exc).__name__}: {exc}"


def install_exception_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Turn any TLS error that still reaches the loop's exception handler into one WARNING line
    (no traceback); everything else keeps the default handling. (The handshakes of our listeners
    are reported by `tls_factory`; this is the net under it.)"""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ssl.SSLError):
            log.warning("TLS: %s: %s", context.get("message", "error"), _reason(exc))
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "PeerCert",
    "handshake_reason",
    "identity",
    "install_exception_handler",
    "make_context",
    "reload",
    "tls_factory",
    "transport_identity",
]
