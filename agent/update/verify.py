"""The Verifying step's manifest checks (the signed statement is checked first,
by trust.py): the manifest is signed by a trusted control-plane key,
was built for this device's class, and names the artifact that was
downloaded; the file has the manifest's size.

The signature is checked first, so nothing unsigned is parsed. The file's
sha256 was already checked while downloading (download.py renames the file
into place only when it matched); `rehash=True` reads the file again, which
the device does (DeviceVerifier): a restart may re-enter Verifying long
after the download, and SD cards rot. A file whose bytes no longer match is
removed, so the next assignment of it downloads it afresh."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path

from google.protobuf.message import DecodeError

from edgefleet.agent.identity import load_trusted_keys
from edgefleet.v1 import common_pb2

from .ports import FatalUpdateError

OTHER_CLASS = "manifest for another device class"


def signature_valid(public_key: bytes, data: bytes, signature: bytes) -> bool:
    # Imported here, not at the top: cryptography's native library costs an
    # idle agent ~6.6 MB of RSS, and a signature is only checked when an
    # update arrives.
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def check_names_assigned(manifest: bytes, model_name: str, model_version: str) -> None:
    """Refuse a (verified) manifest published for another model or version
    than the assignment's: the device serves and reports the model under the
    name its manifest gives, so both must be what the operator assigned."""
    try:
        parsed = common_pb2.ArtifactManifest.FromString(manifest)
    except DecodeError as exc:
        raise FatalUpdateError(f"signed manifest does not parse: {exc}") from exc
    if (parsed.model_name, parsed.model_version) != (model_name, model_version):
        raise FatalUpdateError(
            f"manifest is for {parsed.model_name}@{parsed.model_version}, the assignment "
            f"for {model_name}@{model_version}"
        )


class ManifestVerifier:
    """Implements the Verifier port."""

    def __init__(
        self, *, trusted_keys: Mapping[str, bytes], class_name: str, rehash: bool = False
    ) -> None:
        self.trusted_keys = dict(trusted_keys)
        self.class_name = class_name
        self.rehash = rehash

    @classmethod
    def from_state_dir(cls, state_dir: Path, class_name: str) -> ManifestVerifier:
        return cls(trusted_keys=load_trusted_keys(state_dir), class_name=class_name)

    def verify(
        self,
        path: Path,
        *,
        digest: str,
        manifest: bytes,
        signature: bytes,
        trusted_keys: Mapping[str, bytes] | None = None,
    ) -> None:
        keys = self.trusted_keys if trusted_keys is None else trusted_keys
        if not keys:
            raise FatalUpdateError("no pinned signing keys: cannot verify the manifest")
        if not any(signature_valid(key, manifest, signature) for key in keys.values()):
            raise FatalUpdateError("manifest signature does not match any pinned signing key")
        parsed = common_pb2.ArtifactManifest()
        try:
            parsed.ParseFromString(manifest)
        except DecodeError as exc:
            raise FatalUpdateError(f"signed manifest does not parse: {exc}") from exc
        if parsed.class_name != self.class_name:
            raise FatalUpdateError(
                f"{OTHER_CLASS}: built for {parsed.class_name!r}, this device is "
                f"{self.class_name!r}"
            )
        if parsed.sha256 != digest:
            raise FatalUpdateError(
                f"manifest names artifact {parsed.sha256[:12]}, the assignment {digest[:12]}"
            )
        check_on_disk(path, digest, parsed.size_bytes, "artifact", rehash=self.rehash)


def check_on_disk(path: Path, digest: str, size: int, what: str, *, rehash: bool) -> None:
    """The downloaded file `what` is at `path` with the `size` its manifest
    gives, and (`rehash`) still hashes to `digest`; FatalUpdateError naming
    `what` otherwise."""
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise FatalUpdateError(f"{what} {digest[:12]} is missing from disk") from None
    if actual != size:
        raise FatalUpdateError(
            f"{what} truncated or padded: {actual} bytes on disk, manifest says {size}"
        )
    if rehash:
        check_digest(path, digest, what)


def check_digest(path: Path, digest: str, what: str) -> None:
    """`path` hashes to `digest`; otherwise it is removed and FatalUpdateError
    says `what` was corrupted on disk."""
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1024 * 1024):
            hasher.update(block)
    if hasher.hexdigest() != digest:
        path.unlink(missing_ok=True)
        raise FatalUpdateError(
            f"{what} on disk is corrupted: sha256 mismatch since it was downloaded "
            "(removed; assign it again to download it afresh)"
        )


class DeviceVerifier:
    """Implements the Verifier port with what holds at verification time:
    the trusted keys the machine passes (after the statement's key rotations;
    without them, the keys pinned at the latest enrollment) and the device's
    current class (a device reclassified after the assignment must refuse its
    artifact)."""

    def __init__(self, state_dir: Path, class_name: Callable[[], str]) -> None:
        self.state_dir = state_dir
        self.class_name = class_name

    def verify(
        self,
        path: Path,
        *,
        digest: str,
        manifest: bytes,
        signature: bytes,
        trusted_keys: Mapping[str, bytes] | None = None,
    ) -> None:
        verifier = ManifestVerifier.from_state_dir(self.state_dir, self.class_name())
        verifier.rehash = True
        verifier.verify(
            path, digest=digest, manifest=manifest, signature=signature, trusted_keys=trusted_keys
        )
