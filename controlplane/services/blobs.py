"""Content-addressed blobs: SQL says what a blob is (BlobRow: digest, size,
media type) and who refers to it; the bytes live in a blob store
(services/blobstore.py), a directory every replica can share.

Publishing order, so that nothing is half-published: `add` puts the file in
the store (synced) before the caller's transaction, which inserts the rows
that refer to it, commits. A transaction that rolls back leaves at most a
file no row names, which garbage collection removes once it is older than
the grace period; one that commits finds its bytes already whole.

Garbage collection (`collect_garbage`, run now and then by every replica):
blob rows nothing refers to and older than the grace period are deleted with
their files, and so are files with no row, once older than the grace period
(a publish still in progress put its file, or touched it, within it).

Healing (services/blobheal.py): a blob whose row exists but whose bytes are
gone or damaged is fetched again from the artifact mirrors, when there are
any, before `open` gives up with DataLoss."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import ColumnElement, delete, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

from edgefleet.controlplane.db.models import ArtifactRow, BlobRow, BuildRow, ModelVersionRow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.errors import DataLoss, NotFound
from edgefleet.controlplane.services.blobheal import (
    HEAL_BACKOFF_S,
    MirrorHealer,
    Mirrors,
    no_mirrors,
)
from edgefleet.controlplane.services.blobstore import (
    BlobBytes,
    BlobFile,
    BlobMissing,
    DirectoryStore,
    FileVersion,
    sha256_file,
    valid_digest,
)

__all__ = ["BlobFile", "BlobStore", "FileVersion", "GarbageCollected", "sha256_file",
           "valid_digest"]  # fmt: skip

log = logging.getLogger(__name__)

# A blob or file nothing refers to is kept this long (seconds): a publish
# puts its file before its transaction commits, and may take this long.
DEFAULT_GRACE_S = 3600.0
# Digests looked up or deleted per statement.
_BATCH = 500


def _referencing_columns() -> tuple[InstrumentedAttribute[str | None], ...]:
    mv, b, a = ModelVersionRow, BuildRow, ArtifactRow
    return (
        mv.model_digest, mv.sample_data_digest, mv.labels_digest,
        b.artifact_digest, b.fallback_digest,
        a.digest, a.companion_digest, a.fallback_digest,
    )  # fmt: skip


def _unreferenced_clause() -> list[ColumnElement[bool]]:
    """BlobRow is referred to by no model version, build or artifact."""
    return [~exists().where(column == BlobRow.digest) for column in _referencing_columns()]


def unreferenced(session: Session, digests: set[str]) -> list[str]:
    """Those of `digests` no model version, build or artifact refers to."""
    if not digests:
        return []
    used: set[str] = set()
    for column in _referencing_columns():
        used.update(
            d for d in session.scalars(select(column).where(column.in_(digests)).distinct()) if d
        )
    return sorted(digests - used)


@dataclass(frozen=True)
class GarbageCollected:
    """What one collection removed."""

    blobs: int  # rows, with their files
    orphan_files: int
    temporary: int


class BlobStore:
    def __init__(
        self,
        root: Path,
        *,
        files: BlobBytes | None = None,
        mirrors: Mirrors = no_mirrors,
        clock: Callable[[], float] = time.monotonic,
        heal_backoff_s: float = HEAL_BACKOFF_S,
    ) -> None:
        """Blobs whose bytes live under `root` (the data dir's blob dir, or
        one shared by replicas), or in `files`. `mirrors()` names the base
        URLs (`<URL>/<sha256>`) a lost blob is healed from, in order, asked
        at each heal; `clock` times the back-off after a failed heal."""
        self.root = root
        self.tmp = root / "tmp"
        self.files: BlobBytes = files or DirectoryStore(root)
        self._healer = MirrorHealer(
            mirrors, self.files.put, self.tmp, clock=clock, backoff_s=heal_backoff_s
        )

    def store_path(self, digest: str) -> Path:
        """Where the directory store keeps a blob's file."""
        if not valid_digest(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / "sha256" / digest[:2] / digest

    # Callers from before the bytes left SQL call it the cache.
    cache_path = store_path

    # ------------------------------------------------------------ write

    def add(self, session: Session, src: Path, digest: str, media_type: str) -> bool:
        """Publish `src` (already hashed to `digest`) in the caller's
        transaction: the bytes are in the store, synced, when this returns,
        before the caller commits the rows that refer to them. Returns False
        if the blob was already stored; its file is put back if it went
        missing or was found damaged (the heal)."""
        # FOR KEY SHARE on PostgreSQL: garbage collection cannot delete the
        # row under a publish that refers to it.
        known = session.get(BlobRow, digest, with_for_update={"key_share": True})
        self.files.put(src, digest, refresh=known is None)
        if known is not None:
            return False
        session.add(BlobRow(digest=digest, size_bytes=src.stat().st_size, media_type=media_type))
        session.flush()
        return True

    def discard(self, digests: Sequence[str], *, since: float) -> None:
        """Remove the files of blobs whose rows were deleted (call after the
        commit). A file put at or after `since` (epoch seconds: when the
        deleting transaction began) belongs to a publish of the same bytes
        in progress and stays; one left for whatever reason is an orphan
        that garbage collection removes."""
        for digest in digests:
            try:
                self.files.remove(digest, older_than=since, keep=lambda: False)
            except OSError:
                log.exception("blob store: could not remove %s; garbage collection will", digest)

    # ------------------------------------------------------------ read

    def size(self, db: Database, digest: str) -> int:
        with db.unit_of_work(readonly=True) as uow:
            row = uow.session.get(BlobRow, digest) if valid_digest(digest) else None
            if row is None:
                raise NotFound(f"no blob with digest {digest!r}")
            return row.size_bytes

    def open(self, db: Database, digest: str) -> BlobFile:
        """The blob's bytes, verified against `digest`. NotFound for a digest
        no blob has, DataLoss for one whose bytes are gone or damaged and
        that no mirror could put back. The caller closes it."""
        if not valid_digest(digest):
            raise NotFound(f"no blob with digest {digest!r}")
        try:
            return self.files.open(digest)
        except BlobMissing:
            row = self._row(db, digest)
            if row is None:
                raise NotFound(f"no blob with digest {digest!r}") from None
            size, media_type = row
            loss = DataLoss(
                f"the bytes of blob {digest} ({media_type}, {size} bytes) are "
                f"missing from the blob store ({self.root}) and no other copy exists: push "
                "the model version again (edgefleet models push) if it is a model's file, or "
                "run its build again (edgefleet builds run) if it is an artifact; the same "
                "bytes pushed or built again put it back"
            )
        except DataLoss as exc:
            # Without mirrors, as before (no look-up); a file no row names
            # has no size to heal it against.
            row = self._row(db, digest) if self._healer.mirrors() else None
            if row is None:
                raise
            size, _ = row
            loss = exc
        return self._heal(digest, size, loss)

    def _heal(self, digest: str, size: int, loss: DataLoss) -> BlobFile:
        """The blob put back from a mirror, or `loss` (saying how each mirror
        failed)."""
        mirrors = self._healer.mirrors()
        if not mirrors:
            raise loss from None
        with self._healer.exclusive(digest):
            # Healed by the thread this one waited for (or pushed again).
            with contextlib.suppress(BlobMissing, DataLoss):
                return self.files.open(digest)
            failure = self._healer.heal(digest, size, mirrors)
            if failure is None:
                return self.files.open(digest)
        raise DataLoss(f"{loss}. {self._healer.explain(failure)}") from None

    @staticmethod
    def _row(db: Database, digest: str) -> tuple[int, str] | None:
        with db.unit_of_work(readonly=True) as uow:
            row = uow.session.get(BlobRow, digest)
            return None if row is None else (row.size_bytes, row.media_type)

    def local_path(self, db: Database, digest: str) -> Path:
        """A verified local file with the blob's bytes (for the builds, which
        read it by path)."""
        with self.open(db, digest):
            return self.files.local_path(digest)

    # ------------------------------------------------------------ collect

    def collect_garbage(
        self, db: Database, *, grace_s: float = DEFAULT_GRACE_S, now: float | None = None
    ) -> GarbageCollected:
        """Delete unreferenced blobs (rows and files) and files with no row,
        all older than `grace_s`, and temporary files untouched as long.
        Safe on every replica at once: each deletion re-checks in its own
        statement, and a file is only removed once out of reach (see
        DirectoryStore.remove)."""
        cutoff = (time.time() if now is None else now) - grace_s
        cutoff_at = dt.datetime.fromtimestamp(cutoff, dt.UTC)
        # Candidates in Python, from one pass over each referring column
        # (most have no index on the digest); each delete checks again.
        with db.unit_of_work(readonly=True) as uow:
            old = set(
                uow.session.scalars(select(BlobRow.digest).where(BlobRow.created_at < cutoff_at))
            )
            used: set[str] = set()
            for column in _referencing_columns():
                used.update(d for d in uow.session.scalars(select(column).distinct()) if d)
        blobs = 0
        for batch in _chunks(sorted(old - used), _BATCH):
            deleted = self._delete_rows(db, batch, cutoff_at)
            for digest in deleted:
                self.files.remove(digest, older_than=cutoff, keep=lambda: False)
            blobs += len(deleted)
        orphans = 0
        for chunk in _chunks((d for d, mtime in self.files.digests() if mtime < cutoff), _BATCH):
            with db.unit_of_work(readonly=True) as uow:
                rows = set(
                    uow.session.scalars(select(BlobRow.digest).where(BlobRow.digest.in_(chunk)))
                )
            for digest in chunk:
                if digest not in rows and self.files.remove(
                    digest, older_than=cutoff, keep=functools.partial(self._has_row, db, digest)
                ):
                    orphans += 1
        temporary = self.files.sweep_tmp(cutoff)
        if blobs or orphans or temporary:
            log.info(
                "blob store: collected %d unreferenced blob(s), %d file(s) with no blob row and "
                "%d temporary file(s) older than %.0f s", blobs, orphans, temporary, grace_s,
            )  # fmt: skip
        return GarbageCollected(blobs, orphans, temporary)

    @staticmethod
    def _delete_rows(db: Database, digests: list[str], cutoff_at: dt.datetime) -> list[str]:
        """Delete those of `digests` still unreferenced and old; which were.
        A publish that refers to one meanwhile wins: its foreign key fails
        the delete, which is then retried one digest at a time."""

        def attempt(batch: list[str]) -> list[str]:
            with db.unit_of_work() as uow:
                gone = list(
                    uow.session.scalars(
                        delete(BlobRow)
                        .where(
                            BlobRow.digest.in_(batch),
                            BlobRow.created_at < cutoff_at,
                            *_unreferenced_clause(),
                        )
                        .returning(BlobRow.digest)
                        .execution_options(synchronize_session=False)
                    )
                )
                uow.commit()
            return gone

        try:
            return attempt(digests)
        except IntegrityError:
            pass
        deleted: list[str] = []
        for digest in digests:
            try:
                deleted += attempt([digest])
            except IntegrityError:
                continue
        return deleted

    @staticmethod
    def _has_row(db: Database, digest: str) -> bool:
        with db.unit_of_work(readonly=True) as uow:
            return uow.session.get(BlobRow, digest) is not None


def _chunks(items: Iterable[str], size: int) -> Iterable[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
