"""Who may read what the control plane keeps on disk: only its own user.

The data directory holds the SQLite database (the CA's private key, the
signing keys, credential hashes), the bootstrap admin token and the blob
cache (every model pushed). `edgefleet server` sets a umask of 077 before
it opens anything, so that every file it, its SQLite library or its build
workers create is 0600 and every directory 0700, whatever umask it was
started under; and it tightens what an earlier version left readable."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# Files the owner may read and write, directories the owner may enter: nothing
# for the group or anyone else.
PRIVATE_UMASK = 0o077
PRIVATE_DIR = 0o700

# What the data directory holds besides the database: made by the server,
# the blob store (unless --blob-dir puts it elsewhere) and the builds' work
# directories (model bytes).
_DATA_FILES = ("admin-token", "ca.pem", "port", "device-port")
_DATA_TREES = ("blobs", "builds")
# SQLite keeps its journal and shared memory beside the database; the
# writers' lock file is ours (uow.SqliteWriters).
SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal", "-writers.lock")


def restrict_new_files() -> int:
    """Make every file this process (and any it starts) creates private to
    its user. Returns the umask it replaces."""
    return os.umask(PRIVATE_UMASK)


def secure_data_dir(data_dir: Path, sqlite_file: Path | None = None) -> int:
    """Create `data_dir` 0700, or tighten it to 0700, and take group and
    other permissions off what an earlier start left in it (and off
    `sqlite_file` and its companions when the database lives elsewhere).
    Only what the server itself keeps there is touched, never the whole
    directory: a data dir given as a home directory keeps its other files
    as they are. Returns how many paths were tightened."""
    data_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    targets: list[Path] = [data_dir]
    targets += (data_dir / name for name in _DATA_FILES)
    for tree in _DATA_TREES:
        targets += _walk(data_dir / tree)
    if sqlite_file is not None:
        targets += (sqlite_file.with_name(sqlite_file.name + s) for s in SQLITE_COMPANIONS)
    tightened = _tighten(targets)
    if tightened:
        log.warning(
            "took group and other permissions off %d path(s) in %s (keys and credentials "
            "live there; see docs/security.md)", tightened, data_dir,
        )  # fmt: skip
    return tightened


def _walk(root: Path) -> Iterator[Path]:
    """`root` and everything under it, without following symbolic links."""
    if not root.is_dir() or root.is_symlink():
        return
    yield root
    for parent, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            yield Path(parent, name)


def _tighten(paths: Iterable[Path]) -> int:
    tightened = 0
    for path in paths:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode) or not mode & 0o077:
            continue
        try:
            path.chmod(stat.S_IMODE(mode) & 0o700)
        except OSError as exc:  # not ours: say so, the server still starts
            log.warning("cannot make %s private: %s", path, exc.strerror)
            continue
        tightened += 1
    return tightened
