"""blob bytes move out of SQL (issue 24): each blob's chunks are written to
the blob store's directory (sha256/ab/<digest>, hash-checked, synced) and
blob_chunks is dropped; SQL keeps what a blob is (blobs), the directory its
bytes (services/blobstore.py)

The directory comes from the caller (edgefleet.controlplane.db.engine.upgrade:
config.attributes["blob_dir"], the server's blob dir); a database holding
blob bytes is not upgraded without one. Self-contained on purpose: a
migration must not change when the application code does.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 03:00:00
"""

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import context, op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("edgefleet.migrations.0016")

_NO_DIR = (
    "revision 0016 moves the blob bytes held in the database into the blob store's "
    "directory, and was given none: run `edgefleet db upgrade --data-dir DIR [--blob-dir DIR]` "
    "or start `edgefleet server` (which passes its blob directory)"
)


def _blob_dir() -> Path | None:
    value = context.config.attributes.get("blob_dir")
    return Path(value) if value is not None else None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def upgrade() -> None:
    bind = op.get_bind()
    digests = [
        row[0]
        for row in bind.execute(sa.text("SELECT DISTINCT digest FROM blob_chunks ORDER BY digest"))
    ]
    if digests:
        root = _blob_dir()
        if root is None:
            raise RuntimeError(_NO_DIR)
        for digest in digests:
            _move_out(bind, root, digest)
    op.drop_table("blob_chunks")


def _move_out(bind: sa.Connection, root: Path, digest: str) -> None:
    """Write one blob's chunks (read one at a time) to a temporary file in
    the store, check its sha256, then rename it into place. A blob whose
    chunks do not hash to its digest goes to quarantine/ (logged): its
    bytes were damaged in the database, and opening it will say so."""
    seqs = [
        row[0]
        for row in bind.execute(
            sa.text("SELECT seq FROM blob_chunks WHERE digest = :d ORDER BY seq"), {"d": digest}
        )
    ]
    tmp_dir = root / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="migrate-")
    try:
        with os.fdopen(fd, "wb") as out:
            for seq in seqs:
                data = bind.execute(
                    sa.text("SELECT data FROM blob_chunks WHERE digest = :d AND seq = :s"),
                    {"d": digest, "s": seq},
                ).scalar_one()
                hasher.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if hasher.hexdigest() == digest:
            dest = root / "sha256" / digest[:2] / digest
        else:
            dest = root / "quarantine" / digest
            log.error(
                "blob %s: its bytes in the database hash to %s; moved to %s, not served "
                "(push the model again or run the build again)",
                digest, hasher.hexdigest(), dest,
            )  # fmt: skip
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def downgrade() -> None:
    """Puts the bytes back into SQL from the blob directory; without one,
    refused when there are blobs (their bytes would be lost)."""
    op.create_table(
        "blob_chunks",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["digest"], ["blobs.digest"], name=op.f("fk_blob_chunks_digest_blobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("digest", "seq", name=op.f("pk_blob_chunks")),
    )  # fmt: skip
    bind = op.get_bind()
    digests = [row[0] for row in bind.execute(sa.text("SELECT digest FROM blobs"))]
    if not digests:
        return
    root = _blob_dir()
    if root is None:
        raise RuntimeError(
            "downgrading below 0016 puts the blob bytes back into the database and needs the "
            "blob directory they live in (config.attributes['blob_dir']); or restore the "
            "backup taken before the upgrade"
        )
    chunk = 1024 * 1024
    for digest in digests:
        path = root / "sha256" / digest[:2] / digest
        try:
            with open(path, "rb") as fh:
                if hashlib.file_digest(fh, "sha256").hexdigest() != digest:
                    raise RuntimeError(f"{path} does not match its sha256; not downgraded")
                fh.seek(0)
                seq = 0
                while block := fh.read(chunk):
                    bind.execute(
                        sa.text("INSERT INTO blob_chunks (digest, seq, data) VALUES (:d, :s, :b)"),
                        {"d": digest, "s": seq, "b": block},
                    )
                    seq += 1
        except FileNotFoundError:
            log.warning("blob %s has no file in %s; it has no bytes below 0016", digest, root)
