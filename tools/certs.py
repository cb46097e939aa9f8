"""A throwaway PKI for MeshMQ's TLS listeners: a CA, a server certificate, client certificates.

Why: operators who want to try `TCPS` / `WSS`, the TLS tests and the TLS benchmark all need a CA,
a server certificate valid for the loopback names and client certificates (good, expired, or
signed by a CA the broker does not trust). This module makes them with the `openssl` command line,
so no Python package is added for it. Keys are EC P-256: fast to make and to handshake.

Must not: be used for production certificates (keys are written unencrypted, CAs live next to
what they sign) or import `broker/`.

Invariants:
- Every certificate gets a fresh random serial, so a reissued certificate differs from the
  previous one even with the same subject (the reload test depends on it).
- Leaf certificates are signed with `openssl ca` and explicit `-startdate`/`-enddate`: OpenSSL 3.0's
  `x509 -days` cannot go negative and `-not_before` does not exist before 3.4, and an expired
  client certificate needs both dates in the past.
- Subjects are written in the order given (`-preserveDN`): `/O=MeshMQ/CN=name`, whose RFC 4514
  form is `CN=name,O=MeshMQ`.

Usage: `python -m tools.certs DIR` writes a CA, a server certificate for 127.0.0.1 and localhost
and one client certificate into DIR and prints their paths.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

ORGANIZATION: Final = "MeshMQ"
CA_DAYS: Final = 3650
LEAF_DAYS: Final = 825
OPENSSL_TIMEOUT_S: Final = 30.0


class CertError(Exception):
    """An `openssl` command failed (its stderr is in the message)."""


@dataclass(frozen=True, slots=True)
class Ca:
    """A certificate authority: its certificate and (unencrypted) key."""

    name: str
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Pki:
    """A CA, a server certificate signed by it, and the directory where client certs go."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @property
    def ca(self) -> Ca:
        return Ca(name="ca", cert=self.ca_cert, key=self.ca_key)

    def client_cert(self, name: str, *, expired: bool = False, ca: Ca | None = None) -> tuple[Path, Path]:
        """A client certificate with CN `name` (and O=MeshMQ), signed by `ca` (default: this
        PKI's CA); `expired` makes one whose validity ended yesterday. Returns (cert, key)."""
        signer = ca or self.ca
        stem = f"client-{name}" + ("-expired" if expired else "") + ("" if ca is None else f"-{ca.name}")
        return issue(
            self.directory,
            stem,
            signer,
            common_name=name,
            purpose="client",
            expired=expired,
        )

    def server_cert_for(
        self, stem: str, *, common_name: str = "localhost", hosts: Sequence[str] = ("127.0.0.1", "localhost")
    ) -> tuple[Path, Path]:
        """Another server certificate from this PKI's CA (e.g. to replace the files and reload)."""
        return issue(self.directory, stem, self.ca, common_name=common_name, purpose="server", hosts=hosts)


def _openssl(*args: str | Path, cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(
            ["openssl", *(str(a) for a in args)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=OPENSSL_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CertError("the `openssl` command is not installed (Debian package `openssl`)") from exc
    if done.returncode != 0:
        raise CertError(f"openssl {args[0]} failed: {done.stderr.strip()}")


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    path.chmod(0o600)


def _serial_hex() -> str:
    return f"{secrets.randbits(63) | 1 << 62:016X}"


def make_ca(directory: str | Path, name: str) -> Ca:
    """A self-signed CA `name` (CN=`name` CA, O=MeshMQ): `<name>.crt` and `<name>.key` in directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _new_key(key)
    config = directory / f".{name}-req.cnf"
    config.write_text(
        "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = v3_ca\n[dn]\n"
        "[v3_ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n"
        "subjectKeyIdentifier = hash\n"
    )
    try:
        _openssl(
            "req", "-x509", "-new", "-config", config, "-key", key, "-sha256", "-days", str(CA_DAYS),
            "-subj", f"/O={ORGANIZATION}/CN={name} CA", "-set_serial", "0x" + _serial_hex(), "-out", cert,
        )  # fmt: skip
    finally:
        config.unlink(missing_ok=True)
    return Ca(name=name, cert=cert, key=key)


def _ca_config(workdir: Path, ca: Ca, purpose: str, hosts: Sequence[str]) -> Path:
    if purpose == "server":
        alt = ", ".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
        usage = "extendedKeyUsage = serverAuth\n" + (f"subjectAltName = {alt}\n" if alt else "")
    else:
        usage = "extendedKeyUsage = clientAuth\n"
    (workdir / "index.txt").write_text("")
    (workdir / "serial").write_text(_serial_hex() + "\n")
    config = workdir / "ca.cnf"
    config.write_text(
        "[ca]\ndefault_ca = ca_default\n"
        "[ca_default]\n"
        f"dir = {workdir}\ndatabase = $dir/index.txt\nnew_certs_dir = $dir\nserial = $dir/serial\n"
        f"certificate = {ca.cert}\nprivate_key = {ca.key}\n"
        "default_md = sha256\npolicy = policy_any\nunique_subject = no\nemail_in_dn = no\n"
        "copy_extensions = none\nx509_extensions = leaf\n"
        "[policy_any]\norganizationName = optional\ncommonName = supplied\n"
        "[leaf]\nbasicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n" + usage
    )
    return config


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%SZ")


def issue(
    directory: str | Path,
    stem: str,
    ca: Ca,
    *,
    common_name: str,
    purpose: str,
    hosts: Sequence[str] = (),
    expired: bool = False,
) -> tuple[Path, Path]:
    """A leaf certificate (`purpose` "server" or "client") signed by `ca`: `<stem>.crt` and
    `<stem>.key` in directory. Server certificates carry `hosts` as subjectAltNames."""
    if purpose not in ("server", "client"):
        raise ValueError(f"purpose must be 'server' or 'client', got {purpose!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    _new_key(key)
    now = datetime.now(UTC)
    if expired:
        start, end = now - timedelta(days=30), now - timedelta(days=1)
    else:
        start, end = now - timedelta(hours=1), now + timedelta(days=LEAF_DAYS)
    with tempfile.TemporaryDirectory(prefix="meshmq-ca-") as tmp:
        workdir = Path(tmp)
        csr = workdir / "leaf.csr"
        _openssl(
            "req", "-new", "-config", _req_config(workdir), "-key", key,
            "-subj", f"/O={ORGANIZATION}/CN={common_name}", "-out", csr,
        )  # fmt: skip
        _openssl(
            "ca", "-batch", "-notext", "-preserveDN", "-config", _ca_config(workdir, ca, purpose, hosts),
            "-startdate", _stamp(start), "-enddate", _stamp(end), "-in", csr, "-out", cert,
        )  # fmt: skip
    return cert, key


def make_crl(directory: str | Path, ca: Ca, revoked: Sequence[str | Path], *, name: str = "crl") -> Path:
    """A PEM certificate revocation list of `ca` that revokes the certificates in `revoked`
    (possibly none): `<name>.pem` in directory, valid for 30 days."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{name}.pem"
    with tempfile.TemporaryDirectory(prefix="meshmq-crl-") as tmp:
        workdir = Path(tmp)
        config = _ca_config(workdir, ca, "client", ())
        (workdir / "crlnumber").write_text("01\n")
        text = config.read_text().replace(
            "new_certs_dir = $dir\n",
            "new_certs_dir = $dir\ncrlnumber = $dir/crlnumber\ndefault_crl_days = 30\n",
            1,
        )
        config.write_text(text)
        for cert in revoked:
            _openssl("ca", "-batch", "-config", config, "-revoke", cert)
        _openssl("ca", "-batch", "-config", config, "-gencrl", "-out", out)
    return out


def _req_config(workdir: Path) -> Path:
    config = workdir / "req.cnf"
    config.write_text("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n")
    return config


def encrypt_key(key: str | Path, password: str, out: str | Path) -> Path:
    """A copy of `key` encrypted with `password` (AES-256), for `TLS.KeyPassword`."""
    out = Path(out)
    _openssl("pkey", "-in", key, "-aes256", "-passout", f"pass:{password}", "-out", out)
    out.chmod(0o600)
    return out


def make_pki(directory: str | Path, *, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> Pki:
    """A CA (`ca.crt`, `ca.key`) and a server certificate (`server.crt`, `server.key`, CN=the
    first host, subjectAltNames = hosts) in directory; client certificates via `Pki.client_cert`."""
    directory = Path(directory)
    ca = make_ca(directory, "ca")
    server_cert, server_key = issue(
        directory, "server", ca, common_name=hosts[0] if hosts else "localhost", purpose="server", hosts=hosts
    )
    return Pki(directory, ca.cert, ca.key, server_cert, server_key)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.certs", description="Write a throwaway test PKI (not for production)."
    )
    parser.add_argument("directory", help="where to write the files (created if missing)")
    parser.add_argument(
        "--host", action="append", help="server name or IP (repeatable; default 127.0.0.1, localhost)"
    )
    parser.add_argument("--client", default="client", help="CN of the client certificate (default: client)")
    args = parser.parse_args(argv)
    if shutil.which("openssl") is None:
        print("error: the `openssl` command is not installed (Debian package `openssl`)", file=sys.stderr)
        return 1
    try:
        pki = make_pki(args.directory, hosts=tuple(args.host or ("127.0.0.1", "localhost")))
        client_cert, client_key = pki.client_cert(args.client)
    except CertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for label, path in (
        ("ca_cert", pki.ca_cert),
        ("ca_key", pki.ca_key),
        ("server_cert", pki.server_cert),
        ("server_key", pki.server_key),
        ("client_cert", client_cert),
        ("client_key", client_key),
    ):
        print(f"{label}: {path.resolve()}")
    return 0


__all__ = ["Ca", "CertError", "Pki", "encrypt_key", "issue", "main", "make_ca", "make_pki"]

if __name__ == "__main__":
    raise SystemExit(main())
