"""Pseudonymous identifiers: a keyed hash, so one patient maps to one id within a store or manifest,
but ids cannot be reversed or linked across stores that use different secrets."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from retinacli.fsutil import atomic_path

SECRET_FILE = "secret.key"


def pseudonym(value: str, key: bytes, prefix: str = "p", length: int = 12) -> str:
    """`prefix` + the first `length` hex digits of HMAC-SHA256(key, value)."""
    # surrogateescape: a file name that is not valid UTF-8 hashes as its original bytes
    digest = hmac.new(key, value.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:length]}"


def load_or_create_secret(directory: Path) -> bytes:
    """The per-store (or per-manifest) secret, created once with owner-only permissions."""
    path = Path(directory) / SECRET_FILE
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # owner-only from the start
        with os.fdopen(fd, "w") as handle:
            handle.write(key.hex())
        tmp.chmod(0o600)  # the mode given to open is masked by the umask
    return key
