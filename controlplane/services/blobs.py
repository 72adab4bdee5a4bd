"""Content-addressed blobs. SQL holds the bytes (in chunks), so every
control-plane replica can serve every blob and a blob is published in the same
transaction as the rows that refer to it: nothing is ever half-published.

Each replica keeps a local cache of blobs it has read, to serve downloads from
a file rather than from the database. The cache is a copy and is never
trusted as such: a file is hashed before this process first serves it, and
again whenever it is another version of the file (its inode, size, mtime or
ctime changed). A file that does not match its digest (a flipped byte, a
truncation) is moved to `quarantine/` (one per digest, for whoever wants to
look at it), logged once, and rebuilt from the database copy; a missing one
is rebuilt too. A download reads the very file that was verified, by
descriptor, and checks after each read that it has not changed since: a
download in flight when the file changes ends with Unavailable (the agent
resumes, from the rebuilt file) rather than sending one unverified byte."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db.models import BlobChunkRow, BlobRow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.errors import NotFound, Unavailable

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
CHUNK_BYTES = 1024 * 1024
# Chunks inserted per statement: bounds memory for large models.
_INSERT_BATCH = 8
# A file whose mtime is this close to when it was hashed is "racy" (as git
# calls it): the kernel stamps mtime from a clock that ticks every few ms,
# so a write in the same tick as the last one leaves mtime unchanged. Such a
# version is served but not remembered as verified; the next open hashes it
# again, by when any later write would move mtime.
_RACY_NS = 100_000_000
# Opens that find the file changed again each time give up (Unavailable)
# rather than loop: something keeps writing into the cache.
_OPEN_ATTEMPTS = 3


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def valid_digest(digest: str) -> bool:
    return bool(_DIGEST.match(digest))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileVersion(NamedTuple):
    """One version of a cache file. The store only ever replaces cache files
    (a new inode), so any other change is corruption, and each moves one of
    these: a write in place mtime and ctime, a truncation the size. A tuple:
    it is built and compared after every chunk a download reads."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileVersion:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def renamed_from(self, other: FileVersion | None) -> bool:
        """Whether this is `other`, give or take a rename (which moves only
        the ctime). Size and mtime too, not the inode alone: a freed inode's
        number is soon reused."""
        return other is not None and self._replace(ctime_ns=other.ctime_ns) == other


class BlobFile:
    """A verified cache file, open for one download. Reads go to the file
    that was verified, whatever is renamed over its path meanwhile."""

    def __init__(self, store: BlobStore, digest: str, fh: io.FileIO, version: FileVersion) -> None:
        self.digest = digest
        self.version = version
        self._store = store
        self._fh = fh

    @property
    def size(self) -> int:
        return self.version.size

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`. One pread and one fstat: cheap
        enough for the event loop."""
        fd = self._fh.fileno()
        data = os.pread(fd, length, offset)
        # Checked after the read: a write updates mtime before its bytes
        # land, so an unchanged version here means `data` predates any change.
        if FileVersion.of(os.fstat(fd)) != self.version or (not data and offset < self.size):
            self._store.changed_while_serving(self.digest, self.version)
            raise Unavailable(
                f"the control plane's cached copy of artifact {self.digest[:12]} changed on "
                "disk during the download; it is verified again (and rebuilt from the "
                f"database if damaged) before it is served: resume from offset {offset}"
            )
        return data

    @property
    def file(self) -> io.FileIO:
        """The verified file, for sendfile; check `intact()` after sending."""
        return self._fh

    def intact(self) -> bool:
        """Whether the file is still the version that was verified (else the
        store is told, and the next open verifies it again)."""
        if FileVersion.of(os.fstat(self._fh.fileno())) == self.version:
            return True
        self._store.changed_while_serving(self.digest, self.version)
        return False

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> BlobFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class BlobStore:
    def __init__(self, root: Path, *, owner: bool = True) -> None:
        """Open the local cache. Each control-plane process has its own data
        dir, so whatever is left in tmp/ was cut off by a crash: removed by
        its `owner` (not by a command run beside a live server)."""
        self.root = root
        self.tmp = root / "tmp"
        self.quarantine = root / "quarantine"
        if owner and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the dicts below
        # One lock per digest: a blob is verified or rebuilt by one thread
        # while others wait for its result; other blobs go on in parallel.
        self._locks: dict[str, threading.Lock] = {}
        # The file version each digest was last verified as (once per
        # process per version) and the last one found bad (logged once).
        self._verified: dict[str, FileVersion] = {}
        self._bad: dict[str, FileVersion] = {}
        self._changed: dict[str, FileVersion] = {}

    def cache_path(self, digest: str) -> Path:
        if not valid_digest(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / "sha256" / digest[:2] / digest

    def _lock_for(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(digest, threading.Lock())

    # ------------------------------------------------------------ write

    def add(self, session: Session, src: Path, digest: str, media_type: str) -> bool:
        """Stage `src` (already hashed to `digest`) in the caller's
        transaction. Returns False if the blob was already stored."""
        if session.get(BlobRow, digest) is not None:
            return False
        size = src.stat().st_size
        session.add(BlobRow(digest=digest, size_bytes=size, media_type=media_type))
        session.flush()
        batch: list[dict[str, object]] = []
        with open(src, "rb") as fh:
            seq = 0
            while block := fh.read(CHUNK_BYTES):
                batch.append({"digest": digest, "seq": seq, "data": block})
                seq += 1
                if len(batch) == _INSERT_BATCH:
                    session.execute(insert(BlobChunkRow), batch)
                    batch = []
        if batch:
            session.execute(insert(BlobChunkRow), batch)
        self._cache_copy(src, digest)
        return True

    def _cache_copy(self, src: Path, digest: str) -> None:
        # Caching before the commit is safe: the cache is keyed and checked by
        # digest, so an entry whose transaction rolled back is merely unused.
        # No fsync on this path (a push's): a copy torn by a power cut fails
        # its verification on first use and is rebuilt from the database.
        dest = self.cache_path(digest)
        with self._lock_for(digest):
            if dest.exists():
                return
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.tmp)
            os.close(fd)
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)

    def drop_cached(self, digests: list[str]) -> None:
        """Remove this replica's cache files of blobs deleted from SQL (call
        after the commit). Other replicas' copies stay, unused: what may be
        downloaded is decided by SQL rows (artifacts, assignments, model
        versions), none of which names a deleted blob any more."""
        for digest in digests:
            with self._lock_for(digest):
                self.cache_path(digest).unlink(missing_ok=True)
            with self._lock:
                self._verified.pop(digest, None)
                self._bad.pop(digest, None)
                self._changed.pop(digest, None)

    # ------------------------------------------------------------ read

    def size(self, db: Database, digest: str) -> int:
        with db.unit_of_work(readonly=True) as uow:
            row = uow.session.get(BlobRow, digest) if valid_digest(digest) else None
            if row is None:
                raise NotFound(f"no blob with digest {digest!r}")
            return row.size_bytes

    def open(self, db: Database, digest: str) -> BlobFile:
        """The blob's bytes in a cache file verified against `digest`; a
        cached copy that is missing or does not match is rebuilt from SQL.
        The caller closes it."""
        path = self.cache_path(digest)
        for _ in range(_OPEN_ATTEMPTS):
            try:
                fh = open(path, "rb", buffering=0)  # noqa: SIM115 - returned in a BlobFile
            except FileNotFoundError:
                self._forget_missing(digest, path)
                self._rebuild(db, digest, path)
                continue
            try:
                version = FileVersion.of(os.fstat(fh.fileno()))
                if self._verified.get(digest) == version or self._verify(digest, path, fh, version):
                    return BlobFile(self, digest, fh, version)
            except BaseException:
                fh.close()
                raise
            fh.close()
            self._rebuild(db, digest, path)
        raise Unavailable(
            f"the cached copy of blob {digest[:12]} changed on disk every time it was verified "
            "(something else writes to the blob cache); try again"
        )

    def local_path(self, db: Database, digest: str) -> Path:
        """A verified local file with the blob's bytes (for the builds, which
        read it by path), fetched from SQL into the cache if needed."""
        with self.open(db, digest):
            return self.cache_path(digest)

    def changed_while_serving(self, digest: str, version: FileVersion) -> None:
        """A download found its verified file changed: forget the version so
        that the next open verifies (and heals) whatever is there."""
        with self._lock:
            if self._verified.get(digest) == version:
                del self._verified[digest]
            if self._changed.get(digest) == version:
                return  # the other downloads of that version say nothing
            self._changed[digest] = version
        log.warning(
            "blob cache: %s changed on disk while being served; the downloads reading it end "
            "(agents resume) and the next one verifies it again",
            self.cache_path(digest),
        )

    def _verify(self, digest: str, path: Path, fh: io.FileIO, version: FileVersion) -> bool:
        """Whether the open file `fh` (at `version`) has the blob's bytes.
        If not, it is quarantined, once, for _rebuild to replace."""
        with self._lock_for(digest):
            if self._verified.get(digest) == version:
                return True  # another thread verified it while this one waited
            if version.renamed_from(self._bad.get(digest)):
                # Found bad (and quarantined) while this one waited. Moving it
                # to quarantine changed its ctime: a thread that opened it
                # before the move and looked after would otherwise hash it and
                # report it again.
                return False
            started = time.time_ns()
            actual = hashlib.file_digest(fh, "sha256").hexdigest()
            after = FileVersion.of(os.fstat(fh.fileno()))
            if actual == digest and after == version:
                if abs(version.mtime_ns - started) >= _RACY_NS:
                    self._verified[digest] = version
                return True
            self._bad[digest] = version
            self._quarantine(digest, path, version, actual if after == version else "")
            return False

    def _quarantine(self, digest: str, path: Path, version: FileVersion, actual: str) -> None:
        dest = self.quarantine / digest
        moved = False
        try:
            current = os.stat(path)
            # Only the version found bad: another thread may have rebuilt it.
            if (current.st_dev, current.st_ino) == (version.device, version.inode):
                self.quarantine.mkdir(exist_ok=True)
                os.replace(path, dest)  # one per digest: bounded by the cache's size
                moved = True
        except FileNotFoundError:
            pass
        log.warning(
            "blob cache: %s does not match its sha256 (%d bytes, %s); %s, rebuilding it from "
            "the database",
            path, version.size,
            f"hashes to {actual[:12]}" if actual else "changed while it was hashed",
            f"moved to {dest}" if moved else "already replaced",
        )  # fmt: skip

    def _forget_missing(self, digest: str, path: Path) -> None:
        with self._lock:
            served = self._verified.pop(digest, None)
        if served is not None:
            log.warning("blob cache: %s disappeared; rebuilt from the database", path)

    def _rebuild(self, db: Database, digest: str, path: Path) -> None:
        """Write the blob from SQL into the cache: a temporary file, synced,
        then renamed over `path`, so the path is only ever a whole file."""
        with self._lock_for(digest):
            if path.exists():
                return  # rebuilt while this thread waited: the caller verifies it
            hasher = hashlib.sha256()
            fd, tmp = tempfile.mkstemp(dir=self.tmp)
            try:
                with os.fdopen(fd, "wb") as out:
                    for block in self._chunks(db, digest):
                        hasher.update(block)
                        out.write(block)
                    out.flush()
                    os.fsync(out.fileno())
                if hasher.hexdigest() != digest:
                    raise RuntimeError(f"blob {digest} is corrupt in the database")
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, path)
                _fsync_dir(path.parent)
            finally:
                Path(tmp).unlink(missing_ok=True)

    def _chunks(self, db: Database, digest: str) -> Iterator[bytes]:
        with db.unit_of_work(readonly=True) as uow:
            if uow.session.get(BlobRow, digest) is None:
                raise NotFound(f"no blob with digest {digest!r}")
            seqs = list(
                uow.session.scalars(
                    select(BlobChunkRow.seq)
                    .where(BlobChunkRow.digest == digest)
                    .order_by(BlobChunkRow.seq)
                )
            )
            for seq in seqs:
                yield uow.session.get_one(BlobChunkRow, (digest, seq)).data
                uow.session.expunge_all()  # keep one chunk in memory at a time
