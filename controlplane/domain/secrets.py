"""Bearer secrets: generation, parsing and hashing.

A secret reads `<prefix>_<id>.<random>`: the id locates the stored row, and
only a SHA-256 of the whole string is stored. The random part carries 256 bits,
so a fast hash is enough (no password stretching needed), and comparison is
constant-time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from enum import StrEnum


class SecretKind(StrEnum):
    OPERATOR = "efo"
    ENROLLMENT = "efe"
    DEVICE = "efd"


def new_id() -> str:
    """A short random identifier for rows (hex, 16 chars)."""
    return secrets.token_hex(8)


def issue(kind: SecretKind, row_id: str) -> str:
    """A fresh secret for the row `row_id`."""
    return f"{kind.value}_{row_id}.{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def parse_id(kind: SecretKind, secret: str) -> str | None:
    """The row id a secret names, or None if it is not of this kind."""
    prefix = f"{kind.value}_"
    if not secret.startswith(prefix) or "." not in secret:
        return None
    row_id = secret[len(prefix) :].split(".", 1)[0]
    return row_id or None
