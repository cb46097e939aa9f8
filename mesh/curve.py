"""CURVE keys for the links between the relays of a cluster: make them, load them, apply them.

Why: the relays of a cluster talk over tcp://, so a node must prove it belongs before it is
heard, and what it says must not be readable on the wire. ZeroMQ's CURVE (CurveZMQ) gives both;
this module is the one place that knows the key files and the socket options. Two modes:

- cluster-key mode (`Mesh.Curve.KeyFile` only): every node has the same key pair; a relay admits
  exactly the clients that present that public key, so only holders of the secret join.
- per-node mode (`Mesh.Curve.AllowedKeysDir` too): each node has its own pair; the directory
  holds `<NodeName>.key` public keys of the nodes allowed to join (this node's among them), and a
  relay admits exactly those.

Files are ZeroMQ certificates as `zmq.auth.create_certificates` writes them (`<name>.key` holds the
public key, `<name>.key_secret` both), so czmq / pyzmq tools read them too.

Must not: import `broker` (the mesh never does); write over an existing key file; leave a secret
key readable by others, even for a moment (it is written inside a private 0700 staging directory,
chmod 0600 there, then hard-linked into place, which also fails instead of overwriting).

Invariants: keys are kept as z85 text in bytes (40 bytes); a loaded secret key always belongs to
the loaded public key; every error is a `CurveError` whose message starts with the file or
directory at fault and says what to do.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from mesh.errors import MeshError

__all__ = [
    "ZAP_DOMAIN",
    "CurveError",
    "CurveKeys",
    "client_socket",
    "generate",
    "load_keys",
    "server_socket",
    "start_authenticator",
]

ZAP_DOMAIN: Final = b"meshmq"
_Z85_KEY_BYTES: Final = 40  # a 32-byte Curve25519 key in z85 text
# Key names become file names and, in per-node mode, node names: the NodeName pattern of the config.
_KEY_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_LOGGED_REFUSALS: Final = 1000  # distinct unknown keys logged; bounds memory under a key-spraying peer
_log = logging.getLogger(__name__)


class CurveError(MeshError):
    """A key file or key directory that cannot be used; the message names it and the problem."""


@dataclass(frozen=True, slots=True)
class CurveKeys:
    public: bytes  # z85, 40 bytes
    secret: bytes  # z85, 40 bytes
    allowed: frozenset[bytes]  # z85 public keys whose clients the server accepts
    peers: Mapping[str, bytes]  # node name -> z85 public key (per-node mode); empty in cluster-key mode
    shared: bool  # True: cluster key pair mode (every node has the same pair)

    def __repr__(self) -> str:  # the secret key never reaches a log line
        return (
            f"CurveKeys(public={self.public!r}, allowed={len(self.allowed)} keys, "
            f"peers={sorted(self.peers)}, shared={self.shared})"
        )


# --- files ----------------------------------------------------------------------------------------


def generate(directory: str, name: str) -> tuple[str, str]:
    """Write <name>.key (public) and <name>.key_secret (both) in the ZeroMQ certificate format
    (zmq.auth.create_certificates), mode 0600 for the secret; return the two paths. Refuse to
    overwrite existing files (CurveError)."""
    if not _KEY_NAME.fullmatch(name):
        raise CurveError(
            f"{name!r}: a key name must be 1 to 64 letters, digits, '.', '_' or '-' starting with a "
            "letter or digit (in per-node mode it is the node's NodeName)"
        )
    public_path = os.path.join(directory, f"{name}.key")
    secret_path = os.path.join(directory, f"{name}.key_secret")
    for path in (public_path, secret_path):
        if os.path.lexists(path):
            raise CurveError(f"{path}: already exists; refusing to overwrite a key file")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{name}-keygen-", dir=directory)  # mode 0700
        try:
            staged_public, staged_secret = zmq.auth.create_certificates(staging, name)
            os.chmod(staged_secret, 0o600)
            os.chmod(staged_public, 0o644)
            os.link(staged_secret, secret_path)  # fails, never overwrites, if the name was taken meanwhile
            try:
                os.link(staged_public, public_path)
            except BaseException:
                os.unlink(secret_path)  # no half-written pair
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except FileExistsError as e:
        raise CurveError(f"{e.filename}: already exists; refusing to overwrite a key file") from e
    except OSError as e:
        raise CurveError(f"{directory}: cannot write the key files: {e.strerror or e}") from e
    return public_path, secret_path


def _check_key(key: bytes, path: str, what: str) -> bytes:
    try:
        valid = len(key) == _Z85_KEY_BYTES and len(z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError, TypeError):
        valid = False
    if not valid:
        raise CurveError(f"{path}: the {what} key is not a 40-character z85 CURVE key")
    return key


def _read_certificate(path: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of a ZeroMQ certificate file, checked."""
    if not os.path.isfile(path):
        raise CurveError(f"{path}: no such key file (make one with `meshctl keygen`)")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as e:
        raise CurveError(f"{path}: cannot read the key file: {e.strerror or e}") from e
    except ValueError as e:  # no public-key line: not a certificate at all
        raise CurveError(f"{path}: not a ZeroMQ certificate (no public-key line)") from e
    public = _check_key(public, path, "public")
    return public, None if secret is None else _check_key(secret, path, "secret")


def load_keys(key_file: str, allowed_keys_dir: str = "") -> CurveKeys:
    """key_file: a .key_secret file. Cluster-key mode (no dir): allowed = {own public}, shared=True.
    Per-node mode: allowed = every *.key in the dir (zmq.auth.load_certificate), peers = name->key
    from the file names; own public must be among them (else CurveError)."""
    public, secret = _read_certificate(key_file)
    if secret is None:
        raise CurveError(
            f"{key_file}: holds only a public key; Mesh.Curve.KeyFile must be the .key_secret file "
            "that `meshctl keygen` wrote"
        )
    if zmq.curve_public(secret) != public:
        raise CurveError(f"{key_file}: the secret key does not belong to the public key in the file")
    if not allowed_keys_dir:
        return CurveKeys(public, secret, frozenset({public}), MappingProxyType({}), shared=True)
    if not os.path.isdir(allowed_keys_dir):
        raise CurveError(f"{allowed_keys_dir}: not a directory (of <NodeName>.key public keys)")
    peers: dict[str, bytes] = {}
    for path in sorted(Path(allowed_keys_dir).glob("*.key")):
        name = path.name[: -len(".key")]
        if not _KEY_NAME.fullmatch(name):
            raise CurveError(f"{path}: the file name must be <NodeName>.key, and {name!r} is not a node name")
        peers[name], _ = _read_certificate(str(path))
    if public not in peers.values():
        raise CurveError(
            f"{allowed_keys_dir}: this node's public key (from {key_file}) is not among the allowed "
            "keys; copy its .key file into the directory"
        )
    return CurveKeys(public, secret, frozenset(peers.values()), MappingProxyType(peers), shared=False)


# --- sockets --------------------------------------------------------------------------------------


def server_socket(sock: zmq.Socket[bytes], keys: CurveKeys) -> None:
    """Make `sock` (before it binds) a CURVE server whose clients the ZAP handler checks.

    Start the context's authenticator (`start_authenticator`) first: until one runs, the socket
    admits no client at all.
    """
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    # Fail closed: without a running ZAP handler (start_authenticator) libzmq would otherwise admit
    # every client that completes the CURVE handshake, whatever its key.
    try:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except zmq.ZMQError:  # a libzmq without the option: the authenticator alone guards the door
        _log.warning("this libzmq cannot enforce ZAP; mesh links rely on the authenticator running")


def client_socket(sock: zmq.Socket[bytes], keys: CurveKeys, server_public: bytes) -> None:
    """Make `sock` (before it connects) a CURVE client of the server whose public key is given."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


class _AllowList:
    """The credentials provider of `configure_curve_callback`: admits exactly the allowed keys."""

    __slots__ = ("_allowed", "_refused")

    def __init__(self, allowed: frozenset[bytes]) -> None:
        self._allowed = allowed
        self._refused: set[bytes] = set()  # keys already logged: a retrying stranger logs once

    def callback(self, domain: str, key: bytes) -> bool:
        admitted = key in self._allowed
        if not admitted and key not in self._refused and len(self._refused) < _MAX_LOGGED_REFUSALS:
            self._refused.add(key)
            _log.warning("refused a mesh link from an unknown CURVE key %s", key.decode("ascii", "replace"))
        return admitted


def start_authenticator(ctx: zmq.Context[zmq.Socket[bytes]], keys: CurveKeys) -> ThreadAuthenticator:
    """A zmq.auth.thread.ThreadAuthenticator that accepts exactly the public keys in keys.allowed
    (use configure_curve_callback with a small callback class); return it (caller calls .stop())."""
    authenticator = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
    authenticator.start()
    authenticator.configure_curve_callback(
        domain=ZAP_DOMAIN.decode("ascii"), credentials_provider=_AllowList(keys.allowed)
    )
    return authenticator
