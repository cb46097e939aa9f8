"""How the store keeps passwords: salted scrypt hashes in one self-describing string.

Why: users live in the store so that every node shares them (`broker/ACCESS.md`); the node that
takes a new password (the relay's HTTP thread) hashes it, and the worker that checks a CONNECT
verifies against the stored string. Both sides import this module (`mesh` and `broker` may import
`store`), so the format is defined once.

Format: `$scrypt$ln=14,r=8,p=1$<salt>$<hash>` (salt and hash in unpadded standard base64, like
the PHC string format), so the cost can be raised later without breaking stored hashes.

Must not: log or return a password; compare digests with `==` (timing); run on an event loop
(`verify` takes tens of milliseconds: callers use a thread, and hashlib releases the GIL).
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
