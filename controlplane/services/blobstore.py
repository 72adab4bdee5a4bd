"""Where blob bytes live: a content-addressed directory, `sha256/ab/<digest>`.

SQL holds what a blob is (services/blobs.py: digest, size, media type); this
module holds its bytes, behind `BlobBytes`, so that another store (an object
store) can take the directory's place. The directory may be shared by several
control-plane replicas (`edgefleet server --blob-dir`): every write is a
temporary file in the store's `tmp/`, synced, renamed into place and its
directory synced, so a path only ever names a whole file, and two replicas
writing the same digest write the same bytes.

Nothing here is trusted as such: a file is hashed before this process first
serves it, and again whenever it is another version of the file (its inode,
size, mtime or ctime changed). A file that does not match its digest (a
flipped byte, a truncation) is moved to `quarantine/` (one per digest, for
whoever wants to look at it), logged once, and never served: the store holds
no other copy, so opening it raises DataLoss until an identical push or build
puts the bytes back. A download reads the very file that was verified, by
descriptor, and checks after each read that it has not changed since: a
download in flight when the file changes ends with Unavailable (the agent
resumes) rather than sending one unverified byte."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Protocol

from edgefleet.controlplane.errors import DataLoss, InvalidArgument, Unavailable
from edgefleet.fsutil import fsync_dir

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# A file whose mtime is this close to when it was hashed is "racy" (as git
# calls it): the kernel stamps mtime from a clock that ticks every few ms,
# so a write in the same tick as the last one leaves mtime unchanged. Such a
# version is served but not remembered as verified; the next open hashes it
# again, by when any later write would move mtime.
_RACY_NS = 100_000_000
# Opens that find the file changed again each time give up (Unavailable)
# rather than loop: something keeps writing into the store.
_OPEN_ATTEMPTS = 3
_COPY_BYTES = 1024 * 1024


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def valid_digest(digest: str) -> bool:
    return bool(_DIGEST.match(digest))


class BlobMissing(LookupError):
    """The store has no file for the digest (and never quarantined one)."""


class FileVersion(NamedTuple):
    """One version of a store file. The store only ever replaces files (a
    new inode), so any other change is corruption, and each moves one of
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


class _Watcher(Protocol):
    def changed_while_serving(self, digest: str, version: FileVersion) -> None: ...


class BlobFile:
    """A verified store file, open for one download. Reads go to the file
    that was verified, whatever is renamed over its path meanwhile."""

    def __init__(self, store: _Watcher, digest: str, fh: io.FileIO, version: FileVersion) -> None:
        self.digest = digest
        self.version = version
        self._store = store
        self._fh = fh

    @property
    def size(self) -> int:
        return self.version.size

    def fileno(self) -> int:
        """The descriptor of the verified file (for sendfile); whoever sends
        from it checks `unchanged()` after, as `read` does."""
        return self._fh.fileno()

    @property
    def file(self) -> io.FileIO:
        """The verified file, for loop.sendfile; check `unchanged()` after."""
        return self._fh

    def unchanged(self) -> bool:
        """Whether the file is still the version that was verified (if not,
        the store is told, and the next open verifies it again)."""
        if FileVersion.of(os.fstat(self._fh.fileno())) == self.version:
            return True
        self._store.changed_while_serving(self.digest, self.version)
        return False

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
                f"the control plane's stored copy of artifact {self.digest[:12]} changed on "
                "disk during the download; it is verified again before it is served: resume "
                f"from offset {offset}"
            )
        return data

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> BlobFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class BlobBytes(Protocol):
    """The bytes of content-addressed blobs, by sha256 digest."""

    def put(self, src: Path, digest: str, *, refresh: bool = False) -> None:
        """Store a copy of `src`, which must hash to `digest`, durably (synced)
        before returning; a good copy already there is kept (its mtime set to
        now with `refresh`), a damaged or missing one replaced."""

    def open(self, digest: str) -> BlobFile:
        """The bytes, verified; BlobMissing or DataLoss if not there whole."""

    def local_path(self, digest: str) -> Path:
        """A verified local file with the bytes (for readers by path)."""

    def remove(self, digest: str, *, older_than: float, keep: Callable[[], bool]) -> bool:
        """Delete the bytes unless written at or after `older_than` (epoch
        seconds) or `keep()` says, once they are out of reach, that they
        are wanted after all. Whether they were deleted."""

    def digests(self) -> Iterator[tuple[str, float]]:
        """Every stored digest with its file's mtime (epoch seconds)."""

    def sweep_tmp(self, older_than: float) -> int:
        """Remove temporary files untouched since `older_than`; how many."""


class DirectoryStore:
    """BlobBytes in a local (or shared, e.g. NFS) directory."""

    def __init__(self, root: Path) -> None:
        """Open the store. What is left in tmp/ may be another replica's
        write in progress: it is removed by `sweep_tmp` once old, not here."""
        self.root = root
        self.tmp = root / "tmp"
        self.quarantine = root / "quarantine"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the dicts below
        # One lock per digest: a blob is verified or written by one thread
        # while others wait for its result; other blobs go on in parallel.
        # Reentrant: put verifies what it finds under the digest's lock.
        self._locks: dict[str, threading.RLock] = {}
        # The file version each digest was last verified as (once per
        # process per version) and the last one found bad (logged once).
        self._verified: dict[str, FileVersion] = {}
        self._bad: dict[str, FileVersion] = {}
        self._changed: dict[str, FileVersion] = {}

    def path(self, digest: str) -> Path:
        if not valid_digest(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / "sha256" / digest[:2] / digest

    def _lock_for(self, digest: str) -> threading.RLock:
        with self._lock:
            return self._locks.setdefault(digest, threading.RLock())

    def _forget(self, digest: str) -> None:
        with self._lock:
            self._verified.pop(digest, None)
            self._bad.pop(digest, None)
            self._changed.pop(digest, None)

    # ------------------------------------------------------------ write

    def put(self, src: Path, digest: str, *, refresh: bool = False) -> None:
        path = self.path(digest)
        with self._lock_for(digest):
            if self._holds(digest, path):
                if refresh:
                    try:
                        # Tells garbage collection (remove) that a row is
                        # about to refer to it again.
                        os.utime(path)
                    except FileNotFoundError:
                        pass  # collected just now: written below
                    else:
                        return
                else:
                    return
            self._write(src, digest, path)

    def _holds(self, digest: str, path: Path) -> bool:
        """Whether `path` holds the blob's bytes (verified; a bad file is
        quarantined, as by open)."""
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return False
        with fh:
            version = FileVersion.of(os.fstat(fh.fileno()))
            return self._verified.get(digest) == version or self._verify(digest, path, fh, version)

    def _write(self, src: Path, digest: str, path: Path) -> None:
        """Copy `src` to a temporary file, hashing it; synced, renamed into
        place, the directory synced: the path is only ever a whole file, and
        only ever the bytes of `digest`."""
        hasher = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as fh:
                while block := fh.read(_COPY_BYTES):
                    hasher.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if hasher.hexdigest() != digest:
                raise InvalidArgument(
                    f"{src.name} hashes to {hasher.hexdigest()}, not the {digest} it was "
                    "stored as; nothing was stored"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self._forget(digest)

    # ------------------------------------------------------------ read

    def open(self, digest: str) -> BlobFile:
        """The caller closes it."""
        path = self.path(digest)
        found_bad = False
        for _ in range(_OPEN_ATTEMPTS):
            try:
                fh = open(path, "rb", buffering=0)  # noqa: SIM115 - returned in a BlobFile
            except FileNotFoundError:
                self._forget_missing(digest, path)
                if found_bad or (self.quarantine / digest).exists():
                    raise DataLoss(self._corrupt_message(digest)) from None
                raise BlobMissing(digest) from None
            try:
                version = FileVersion.of(os.fstat(fh.fileno()))
                if self._verified.get(digest) == version or self._verify(digest, path, fh, version):
                    return BlobFile(self, digest, fh, version)
            except BaseException:
                fh.close()
                raise
            fh.close()
            # Quarantined (by this thread or another): the next try finds it
            # gone, or a good copy another replica put meanwhile.
            found_bad = True
        raise Unavailable(
            f"the stored copy of blob {digest[:12]} changed on disk every time it was verified "
            "(something else writes to the blob store); try again"
        )

    def _corrupt_message(self, digest: str) -> str:
        return (
            f"the bytes of blob {digest} are damaged in the blob store (they no longer match "
            f"their sha256; kept for inspection in {self.quarantine / digest}) and no other "
            "copy exists: push the model version again (edgefleet models push) if it is a "
            "model's file, or run its build again (edgefleet builds run) if it is an "
            "artifact; the same bytes pushed or built again replace it"
        )

    def local_path(self, digest: str) -> Path:
        with self.open(digest):
            return self.path(digest)

    def changed_while_serving(self, digest: str, version: FileVersion) -> None:
        """A download found its verified file changed: forget the version so
        that the next open verifies whatever is there."""
        with self._lock:
            if self._verified.get(digest) == version:
                del self._verified[digest]
            if self._changed.get(digest) == version:
                return  # the other downloads of that version say nothing
            self._changed[digest] = version
        log.warning(
            "blob store: %s changed on disk while being served; the downloads reading it end "
            "(agents resume) and the next one verifies it again",
            self.path(digest),
        )

    def _verify(self, digest: str, path: Path, fh: io.FileIO, version: FileVersion) -> bool:
        """Whether the open file `fh` (at `version`) has the blob's bytes.
        If not, it is quarantined, once."""
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
            fh.seek(0)
            actual = hashlib.file_digest(fh, "sha256").hexdigest()
            after = FileVersion.of(os.fstat(fh.fileno()))
            if actual == digest and after == version:
                if abs(version.mtime_ns - started) >= _RACY_NS:
                    with self._lock:
                        self._verified[digest] = version
                return True
            with self._lock:
                self._bad[digest] = version
                # Moved away by this store, not lost: no "disappeared" later.
                self._verified.pop(digest, None)
            self._quarantine(digest, path, version, actual if after == version else "")
            return False

    def _quarantine(self, digest: str, path: Path, version: FileVersion, actual: str) -> None:
        dest = self.quarantine / digest
        moved = False
        try:
            current = os.stat(path)
            # Only the version found bad: another replica may have put a
            # good copy meanwhile.
            if (current.st_dev, current.st_ino) == (version.device, version.inode):
                self.quarantine.mkdir(exist_ok=True)
                os.replace(path, dest)  # one per digest: bounded by the store's size
                moved = True
        except FileNotFoundError:
            pass
        log.error(
            "blob store: %s does not match its sha256 (%d bytes, %s); %s. It is not served: "
            "the same bytes pushed or built again replace it",
            path, version.size,
            f"hashes to {actual[:12]}" if actual else "changed while it was hashed",
            f"moved to {dest}" if moved else "already replaced",
        )  # fmt: skip

    def _forget_missing(self, digest: str, path: Path) -> None:
        with self._lock:
            served = self._verified.pop(digest, None)
        if served is not None:
            log.error("blob store: %s disappeared", path)

    # ------------------------------------------------------------ delete

    def remove(self, digest: str, *, older_than: float, keep: Callable[[], bool]) -> bool:
        """Moved out of its path first (atomically), then judged: a file put
        (or refreshed) since `older_than` is a publish in progress, and one
        `keep()` claims was referenced meanwhile; both go back unless a new
        copy took the path."""
        path = self.path(digest)
        with self._lock_for(digest):
            trash = self.tmp / f"remove-{digest}-{os.getpid()}-{threading.get_ident()}"
            try:
                os.replace(path, trash)
            except FileNotFoundError:
                return False
            try:
                if os.stat(trash).st_mtime >= older_than or keep():
                    self._restore(trash, path)
                    return False
            except BaseException:
                self._restore(trash, path)
                raise
            trash.unlink()
            self._forget(digest)
            return True

    @staticmethod
    def _restore(trash: Path, path: Path) -> None:
        with contextlib.suppress(FileExistsError):
            os.link(trash, path)  # never over a copy put meanwhile
        trash.unlink()

    def digests(self) -> Iterator[tuple[str, float]]:
        top = self.root / "sha256"
        if not top.is_dir():
            return
        for prefix in sorted(os.listdir(top)):
            try:
                entries = list(os.scandir(top / prefix))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if valid_digest(entry.name) and entry.name[:2] == prefix:
                    try:
                        yield entry.name, entry.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:
                        continue

    def sweep_tmp(self, older_than: float) -> int:
        """Writes and uploads a crash cut off. Another replica's in progress
        is younger: a write touches its file's mtime as it goes."""
        removed = 0
        for entry in list(os.scandir(self.tmp)):
            try:
                newest = entry.stat(follow_symlinks=False).st_mtime
                if entry.is_dir(follow_symlinks=False):
                    for child in os.scandir(entry.path):
                        newest = max(newest, child.stat(follow_symlinks=False).st_mtime)
                if newest >= older_than:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue
        return removed
