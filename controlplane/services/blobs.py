"""Content-addressed blobs. SQL holds the bytes (in chunks), so every
control-plane replica can serve every blob and a blob is published in the same
transaction as the rows that refer to it: nothing is ever half-published.
Each replica keeps a local cache of blobs it has read, verified by digest, to
serve downloads from a file rather than from the database."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from controlplane.db.models import BlobChunkRow, BlobRow
from controlplane.db.uow import Database
from controlplane.errors import NotFound

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
CHUNK_BYTES = 1024 * 1024
# Chunks inserted per statement: bounds memory for large models.
_INSERT_BATCH = 8


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def valid_digest(digest: str) -> bool:
    return bool(_DIGEST.match(digest))


class BlobStore:
    def __init__(self, root: Path) -> None:
        """Open the local cache. Each control-plane process has its own data
        dir, so whatever is left in tmp/ was cut off by a crash: removed."""
        self.root = root
        self.tmp = root / "tmp"
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def cache_path(self, digest: str) -> Path:
        if not valid_digest(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / "sha256" / digest[:2] / digest

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
        dest = self.cache_path(digest)
        if dest.exists():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp)
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)

    # ------------------------------------------------------------ read

    def size(self, db: Database, digest: str) -> int:
        with db.unit_of_work(readonly=True) as uow:
            row = uow.session.get(BlobRow, digest) if valid_digest(digest) else None
            if row is None:
                raise NotFound(f"no blob with digest {digest!r}")
            return row.size_bytes

    def local_path(self, db: Database, digest: str) -> Path:
        """A verified local file with the blob's bytes, fetched from SQL into
        the cache on first use."""
        path = self.cache_path(digest)
        if path.exists():
            return path
        with self._lock:
            if path.exists():
                return path
            hasher = hashlib.sha256()
            fd, tmp = tempfile.mkstemp(dir=self.tmp)
            try:
                with os.fdopen(fd, "wb") as out:
                    for block in self._chunks(db, digest):
                        hasher.update(block)
                        out.write(block)
                if hasher.hexdigest() != digest:
                    raise RuntimeError(f"blob {digest} is corrupt in the database")
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        return path

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
