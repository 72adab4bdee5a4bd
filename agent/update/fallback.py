"""A version's lighter fallback artifact, as the update machine handles it.

A class may ask for a fallback of each version (e.g. int8 beside fp32;
docs/power.md): the primary's signed ArtifactManifest then carries
`fallback_manifest`, the serialized ArtifactManifest of the fallback (same
model, version, class and build; its own candidate, precision, digest,
size, golden samples, tolerances and budgets; its own fallback_manifest
empty). It is signed as part of the primary's manifest, and the agent
downloads the fallback by its digest like the primary.

The update covers both artifacts through the same states (machine.py):

- Downloading reads the fallback's digest and size from the manifest to
  know what to fetch, before the manifest is verified, as it takes the
  primary's from the assignment: nothing is trusted yet. The digest must be
  a sha256 hex digest before it names a file. Progress counts both
  artifacts' bytes (`download_total`).
- Verifying, after the signed manifest passed its checks, checks the nested
  manifest (`check_nested`): it parses, names an artifact, the same model,
  version, class and build as the primary's, and no fallback of its own;
  and the downloaded file (`check_file`) has the size it gives and hashes
  to its digest again (download.py checked it on the way, but a restart may
  re-enter Verifying long after; the primary is hashed again the same way).
- Validating runs the fallback against the nested manifest with the same
  validator as the primary (golden samples, tolerances, budgets).
- Activating installs both (activation.py).

Any failure of the fallback fails the update with a reason that names it
(`Fallback.label`): the build validated both, so a fallback that fails on the
device means something is wrong."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from edgefleet.v1 import common_pb2

from .download import artifact_path
from .ports import FatalUpdateError
from .store import Assignment
from .verify import check_on_disk

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Fallback:
    """The fallback artifact a manifest names."""

    digest: str
    size: int
    # The nested ArtifactManifest, serialized as signed.
    manifest: bytes
    # Its precision, for messages ("int8"; "" when unspecified).
    precision: str = ""

    @property
    def label(self) -> str:
        """How reasons name it: "fallback artifact (int8, 0a1b2c3d4e5f)"."""
        what = f"{self.precision}, " if self.precision else ""
        return f"fallback artifact ({what}{self.digest[:12]})"


def _precision(manifest: common_pb2.ArtifactManifest) -> str:
    if manifest.precision == common_pb2.QUANTIZATION_UNSPECIFIED:
        return ""
    name = common_pb2.Quantization.Name(manifest.precision)
    return name.removeprefix("QUANTIZATION_").lower()


def _parse(manifest: bytes) -> common_pb2.ArtifactManifest:
    try:
        return common_pb2.ArtifactManifest.FromString(manifest)
    except DecodeError as exc:
        raise FatalUpdateError(f"manifest does not parse: {exc}") from exc


def fallback_of(manifest: bytes) -> Fallback | None:
    """The fallback `manifest` (the primary's, serialized) names; None when
    it names none. FatalUpdateError when the nested manifest does not parse
    or names no artifact (a digest that is not a sha256 hex digest never
    becomes a file name)."""
    outer = _parse(manifest)
    if not outer.fallback_manifest:
        return None
    try:
        inner = common_pb2.ArtifactManifest.FromString(outer.fallback_manifest)
    except DecodeError as exc:
        raise FatalUpdateError(f"the fallback artifact's manifest does not parse: {exc}") from exc
    if not _SHA256.fullmatch(inner.sha256):
        raise FatalUpdateError(
            f"the fallback artifact's manifest names no artifact: sha256 {inner.sha256[:80]!r} "
            "is not a sha256 hex digest"
        )
    if inner.size_bytes <= 0:
        raise FatalUpdateError(
            f"the fallback artifact's manifest gives its size as {inner.size_bytes} bytes"
        )
    return Fallback(inner.sha256, inner.size_bytes, outer.fallback_manifest, _precision(inner))


def check_nested(manifest: bytes) -> Fallback | None:
    """Verifying, once `manifest` itself passed: the fallback it names is one
    of the same version (model, version, class and build), with no fallback
    of its own; FatalUpdateError naming what differs."""
    fallback = fallback_of(manifest)
    if fallback is None:
        return None
    outer = _parse(manifest)
    inner = common_pb2.ArtifactManifest.FromString(fallback.manifest)
    for field in ("model_name", "model_version", "class_name", "build_id"):
        mine, theirs = getattr(inner, field), getattr(outer, field)
        if mine != theirs:
            raise FatalUpdateError(
                f"{fallback.label}: its manifest names {field} {mine!r}, the primary's "
                f"{theirs!r}: not a fallback of this version"
            )
    if inner.fallback_manifest:
        raise FatalUpdateError(f"{fallback.label}: its manifest names a fallback of its own")
    return fallback


def check_file(state_dir: Path, fallback: Fallback) -> Path:
    """The downloaded fallback's path, once it is there with the size its
    manifest gives and still hashes to its digest (module docstring)."""
    path = artifact_path(state_dir, fallback.digest)
    check_on_disk(path, fallback.digest, fallback.size, fallback.label, rehash=True)
    return path


def assignment_digests(assignment: Assignment) -> set[str]:
    """The artifacts an assignment downloads: its own and its fallback's
    (when its manifest names a well-formed one). Never raises: it decides
    which files to keep, and keeping fewer would delete one in use."""
    digests = {assignment.artifact_digest}
    try:
        fallback = fallback_of(assignment.manifest)
    except FatalUpdateError:
        return digests
    if fallback is not None:
        digests.add(fallback.digest)
    return digests


def download_total(assignment: Assignment) -> int:
    """The bytes an assignment downloads, its fallback's included."""
    try:
        fallback = fallback_of(assignment.manifest)
    except FatalUpdateError:
        fallback = None
    return assignment.artifact_size + (fallback.size if fallback is not None else 0)
