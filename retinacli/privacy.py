"""Pseudonymous identifiers: a keyed hash, so one patient maps to one id within a store or manifest,
but ids cannot be reversed or linked across stores that use different secrets."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from retinacli.errors import RetinaError
from retinacli.fsutil import atomic_path

SECRET_FILE = "secret.key"
KEY_BYTES = 32  # what create_secret writes
MIN_KEY_BYTES = 16  # shorter keys are refused: they can be guessed


def pseudonym(value: str, key: bytes, prefix: str = "p", length: int = 12) -> str:
    """`prefix` + the first `length` hex digits of HMAC-SHA256(key, value)."""
    # surrogateescape: a file name that is not valid UTF-8 hashes as its original bytes
    digest = hmac.new(key, value.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:length]}"


class SecretKeyError(RetinaError):
    """A key file exists but cannot be used: unreadable, not hex, or too short to keep ids secret."""


class SecretKeyMissingError(SecretKeyError):
    """No key file where one is needed."""


def load_secret(directory: Path) -> bytes:
    """The secret in ``directory/secret.key``; never creates one.

    Raises SecretKeyMissingError when the file is absent and SecretKeyError (naming the file) when it
    is unreadable, not hex, or shorter than MIN_KEY_BYTES: a short key lets anyone recompute the ids.
    """
    path = Path(directory) / SECRET_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise SecretKeyMissingError(f"{path}: no key file") from None
    except OSError as exc:
        raise SecretKeyError(f"{path}: unreadable key file ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError:
        text = "not hex"  # binary content: refused below like any other non-hex text
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise SecretKeyError(f"{path}: the key file is not hexadecimal; refusing to use it") from None
    if len(key) < MIN_KEY_BYTES:
        raise SecretKeyError(
            f"{path}: the key is {len(key)} bytes, fewer than {MIN_KEY_BYTES}; anyone could recompute "
            "the pseudonyms with it, so it is refused (restore the original key from a backup)"
        )
    return key


def existing_secret(directory: Path) -> bytes | None:
    """The key in `directory`, read only: None when there is none (a weak or unreadable key is still
    refused). For commands that never write into a store (retrieve, predict)."""
    try:
        return load_secret(directory)
    except SecretKeyMissingError:
        return None


def create_secret(directory: Path) -> bytes:
    """A fresh 32-byte secret written to ``directory/secret.key`` with owner-only permissions."""
    path = Path(directory) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # owner-only from the start
        with os.fdopen(fd, "w") as handle:
            handle.write(key.hex())
        tmp.chmod(0o600)  # the mode given to open is masked by the umask
    return key


def load_or_create_secret(directory: Path) -> bytes:
    """The secret in ``directory``, created when there is none (a new store or manifest folder).

    An existing key that is unusable is refused (SecretKeyError), never replaced."""
    try:
        return load_secret(directory)
    except SecretKeyMissingError:
        return create_secret(directory)
