"""How the store keeps passwords: salted scrypt hashes in one self-describing string.

Why: users live in the store so that every node shares them (`broker/ACCESS.md`); the node that
takes a new password (the relay's HTTP thread) hashes it, and the worker that checks a CONNECT
verifies against the stored string. Both sides import this module (`mesh` and `broker` may import
`store`), so the format is defined once.

Format: `$scrypt$ln=14,r=8,p=1$<salt>$<hash>` (salt and hash in unpadded standard base64, like
the PHC string format), so the cost can be raised later without breaking stored hashes.

Both checkers of passwords (a worker's CONNECT, the relay's HTTP Basic for admins) also share
`CredentialCache`, the memory of passwords that verified, and `dummy_hash`, what an unknown user's
password is checked against so that the time taken does not tell unknown from wrong.

Must not: log or return a password; keep a password, or a digest that verifies without the
process's random key; compare digests with `==` (timing); run on an event loop (`verify` takes
tens of milliseconds: callers use a thread, and hashlib releases the GIL).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from typing import Final

LOG2_N: Final = 14  # n = 16384: ~16 MiB and tens of ms per hash
R: Final = 8
P: Final = 1
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
_MAX_MEM: Final = 64 * 1024 * 1024
_FORMAT: Final = re.compile(
    r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)
MAX_PASSWORD_BYTES: Final = 65535  # what an MQTT CONNECT can carry
CACHE_MAX: Final = 100_000  # remembered verifications; the memory starts over when full
_dummy: list[str] = []  # made on first use: every process would pay a hash at import


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str | bytes, *, log2_n: int = LOG2_N) -> str:
    """A new salted hash of `password` in the stored format."""
    secret = password.encode() if isinstance(password, str) else password
    salt = os.urandom(SALT_BYTES)
    digest = hashlib.scrypt(secret, salt=salt, n=1 << log2_n, r=R, p=P, maxmem=_MAX_MEM, dklen=HASH_BYTES)
    return f"$scrypt$ln={log2_n},r={R},p={P}${_b64(salt)}${_b64(digest)}"


def is_hash(text: str) -> bool:
    """Whether `text` is a stored hash this module can verify."""
    match = _FORMAT.fullmatch(text)
    return (
        match is not None
        and 10 <= int(match[1]) <= 20
        and 1 <= int(match[2]) <= 32
        and 1 <= int(match[3]) <= 16
    )


def verify_password(password: str | bytes, stored: str) -> bool:
    """Whether `password` is the one `stored` was made from; False for a malformed `stored`."""
    match = _FORMAT.fullmatch(stored)
    if match is None or not is_hash(stored):
        return False
    try:
        salt = _unb64(match[4])
        expected = _unb64(match[5])
    except (binascii.Error, ValueError):
        return False
    secret = password.encode() if isinstance(password, str) else password
    if len(secret) > MAX_PASSWORD_BYTES:
        return False
    digest = hashlib.scrypt(
        secret,
        salt=salt,
        n=1 << int(match[1]),
        r=int(match[2]),
        p=int(match[3]),
        maxmem=_MAX_MEM,
        dklen=len(expected),
    )
    return hmac.compare_digest(digest, expected)


def dummy_hash() -> str:
    """A stored-format hash of a random password, to verify against for an unknown user."""
    if not _dummy:
        _dummy.append(hash_password(os.urandom(16)))
    return _dummy[0]


class CredentialCache:
    """(username, stored hash) -> HMAC, under a random per-process key, of the password that
    verified against that hash: a reconnect storm costs one HMAC per client, not one scrypt.
    Safe to share between threads (single dict operations; a lost entry costs one more hash)."""

    __slots__ = ("_key", "_known")

    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._known: dict[tuple[str, str], bytes] = {}

    def _mac(self, password: bytes) -> bytes:
        return hmac.new(self._key, password, hashlib.sha256).digest()

    def knows(self, username: str, stored: str, password: bytes) -> bool:
        known = self._known.get((username, stored))
        return known is not None and hmac.compare_digest(known, self._mac(password))

    def remember(self, username: str, stored: str, password: bytes) -> None:
        if len(self._known) >= CACHE_MAX:
            self._known.clear()
        self._known[(username, stored)] = self._mac(password)

    def forget_others(self, current: dict[str, str]) -> None:
        """The users changed: keep only entries whose user still has the same hash."""
        self._known = {key: mac for key, mac in self._known.items() if current.get(key[0]) == key[1]}

    def __len__(self) -> int:
        return len(self._known)
