"""Filling an artifact mirror: every published artifact's blobs written to
a directory by digest (<dir>/<sha256>), for any static file server, CDN or
bucket to serve as `edgefleet server --artifact-mirror URL` (agents fetch
<URL>/<sha256> and check it against the signed manifest, so the mirror
needs no trust and no credential)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from edgefleet.controlplane.db.models import ArtifactRow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.services.blobs import BlobStore, sha256_file
from edgefleet.fsutil import atomic_copy


@dataclass
class ExportReport:
    written: list[str] = field(default_factory=list)
    # Already there with the right bytes.
    kept: list[str] = field(default_factory=list)
    # There with other bytes (a torn copy, an edit): replaced.
    replaced: list[str] = field(default_factory=list)
    bytes_written: int = 0


def published_digests(db: Database) -> list[str]:
    """Every blob an agent may be sent to fetch: artifacts, their lighter
    fallbacks and their companions."""
    with db.unit_of_work(readonly=True) as uow:
        rows = uow.session.execute(
            select(ArtifactRow.digest, ArtifactRow.fallback_digest, ArtifactRow.companion_digest)
        ).all()
    return sorted({d for row in rows for d in row if d})


def export_blobs(db: Database, blobs: BlobStore, dest: Path) -> ExportReport:
    """Write every published blob into `dest` by digest. A file already
    there is hashed and kept if it matches; each new one appears whole
    (fsutil.atomic_copy), readable by the web server's user."""
    dest.mkdir(parents=True, exist_ok=True)
    report = ExportReport()
    for digest in published_digests(db):
        target = dest / digest
        if target.is_file():
            if sha256_file(target) == digest:
                report.kept.append(digest)
                continue
            report.replaced.append(digest)
        else:
            report.written.append(digest)
        # Verified against its digest; readable by the web server's user.
        atomic_copy(blobs.local_path(db, digest), target, mode=0o644)
        report.bytes_written += target.stat().st_size
    return report
