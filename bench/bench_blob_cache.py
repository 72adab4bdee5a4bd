"""What the blob store's verification costs (controlplane/services/blobstore.py).

A --size-mb blob of random bytes is published with BlobStore.add (its row in
a fresh SQLite database, its bytes in the store directory), then, each
--runs times:

* first open: a fresh BlobStore on the same cache (a new process's view)
  opens the blob and hashes the file before serving it, page cache warm;
* first open, cold: the same after the file's pages were dropped from the
  page cache (posix_fadvise DONTNEED, this file only), so the disk is read;
* verified open: an open of a version this store already verified (what
  every later download pays: one fstat and a dict lookup);
* heal: one byte flipped in place, then an open: hashing finds it, the file
  is quarantined (DataLoss: no other copy), the same bytes are put again
  (temp file, fsync, rename, as a push of them does) and hashed again
  before they are served;
* bare hash: hashlib.file_digest of the same file, the floor of a first open;
* streaming: the whole blob read in 1 MiB chunks through BlobFile.read
  (pread plus the fstat check per chunk) against bare os.pread.

Peak Python memory of a first open is taken with tracemalloc.

    python bench/bench_blob_cache.py                 # 128 MiB, 5 runs
    python bench/bench_blob_cache.py --smoke         # CI: seconds, figures meaningless
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from edgefleet.controlplane.db.engine import make_engine, upgrade
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.errors import DataLoss
from edgefleet.controlplane.services.blobs import BlobStore

MIB = 1024 * 1024
# --smoke: the run of seconds CI makes (tests/e2e/test_bench_smoke.py) so the
# benchmark cannot rot; every row once on a 2 MiB blob. Figures meaningless.
SMOKE = {"size_mb": 2, "runs": 1}


def _timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _open(store: BlobStore, db: Database, digest: str) -> None:
    store.open(db, digest).close()


def _heal(store: BlobStore, db: Database, src: Path, digest: str) -> None:
    """Find the file damaged (DataLoss: the store holds no other copy), put
    the same bytes again (as a push or build of them does), open it."""
    try:
        _open(store, db, digest)
    except DataLoss:
        store.files.put(src, digest)
    _open(store, db, digest)


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _flip(path: Path, at: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 1]))


def _stream(store: BlobStore, db: Database, digest: str) -> None:
    with store.open(db, digest) as blob:
        offset = 0
        while offset < blob.size:
            offset += len(blob.read(offset, MIB))


def _hash_bare(path: Path) -> None:
    with path.open("rb") as fh:
        hashlib.file_digest(fh, "sha256")


def _stream_bare(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while data := os.pread(fd, MIB, offset):
            offset += len(data)
    finally:
        os.close(fd)


def run(size_mb: int, runs: int, work: Path) -> dict[str, object]:
    src = work / "blob"
    digest_of = hashlib.sha256()
    with src.open("wb") as fh:
        for _ in range(size_mb):
            block = os.urandom(MIB)
            digest_of.update(block)
            fh.write(block)
    digest = digest_of.hexdigest()
    engine = make_engine(f"sqlite:///{work / 'bench.db'}")
    upgrade(engine)
    db = Database(engine)
    root = work / "blobs"
    with db.unit_of_work() as uow:
        BlobStore(root).add(uow.session, src, digest, "application/octet-stream")
        uow.commit()
    cached = BlobStore(root).cache_path(digest)
    # Old enough not to be "racy": verified versions are remembered.
    past = time.time_ns() - 10**10
    os.utime(cached, ns=(past, past))

    def first_open() -> None:
        _open(BlobStore(root), db, digest)

    rows: dict[str, list[float]] = {k: [] for k in (
        "first_open_s", "hash_bare_s", "first_open_cold_s", "verified_open_us", "heal_s",
        "stream_checked_s", "stream_bare_s")}  # fmt: skip
    for _ in range(runs):
        rows["first_open_s"].append(_timed(first_open))
        rows["hash_bare_s"].append(_timed(_hash_bare, cached))
        _drop_from_page_cache(cached)
        rows["first_open_cold_s"].append(_timed(first_open))
        store = BlobStore(root)
        _open(store, db, digest)
        rows["verified_open_us"].append(_timed(_open, store, db, digest) * 1e6)
        _flip(cached, size_mb * MIB // 2)
        rows["heal_s"].append(_timed(_heal, store, db, src, digest))
        os.utime(cached, ns=(past, past))
        store = BlobStore(root)
        _open(store, db, digest)
        rows["stream_checked_s"].append(_timed(_stream, store, db, digest))
        rows["stream_bare_s"].append(_timed(_stream_bare, cached))
    tracemalloc.start()
    first_open()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    db.dispose()
    result: dict[str, object] = {
        "size_mib": size_mb, "runs": runs, "python": sys.version.split()[0],
        "peak_python_kib_first_open": round(peak / 1024, 1),
    }  # fmt: skip
    for name, values in rows.items():
        result[name] = {
            "median": round(statistics.median(values), 4),
            "min": round(min(values), 4),
            "max": round(max(values), 4),
        }
    # Against the baselines of the same run: the floor of each.
    medians = {name: statistics.median(values) for name, values in rows.items()}
    result["ratio_first_open_to_bare_hash"] = round(
        medians["first_open_s"] / medians["hash_bare_s"], 2
    )
    result["ratio_checked_stream_to_bare_pread"] = round(
        medians["stream_checked_s"] / medians["stream_bare_s"], 2
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="CI's run of seconds (SMOKE)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    with tempfile.TemporaryDirectory(prefix="bench-blob-cache-") as work:
        print(json.dumps(run(args.size_mb, args.runs, Path(work)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
