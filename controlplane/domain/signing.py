"""Ed25519 signatures over artifact manifests (cryptography's implementation).
Key ids are derived from the public key, so a device can tell which pinned
key a signature claims without trusting anything else in the message."""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_RAW = serialization.Encoding.Raw


def key_id(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


def generate() -> tuple[str, bytes, bytes]:
    """A new key pair: (key id, raw private key, raw public key)."""
    private = Ed25519PrivateKey.generate()
    private_raw = private.private_bytes(
        _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public_raw = private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
    return key_id(public_raw), private_raw, public_raw


def sign(private_key: bytes, data: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private_key).sign(data)


class Signer:
    """Signs many messages with one key: loading the private key once, not
    per signature, when an assignment signs a statement per device."""

    def __init__(self, private_key: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(private_key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
