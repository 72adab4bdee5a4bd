"""Content-addressed file storage: blobs/sha256/ab/abcdef..., written once,
published by an atomic rename so a reader never sees half a file."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    def __init__(self, root: Path) -> None:
        """Open the store. Each control-plane process has its own data dir, so
        whatever is left in tmp/ was an upload cut off by a crash: removed."""
        self.root = root
        self.tmp = root / "tmp"
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / "sha256" / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, src: Path, digest: str) -> bool:
        """Move a fully written, already hashed temp file into place. Returns
        False (and removes src) if the blob was already stored."""
        dest = self.path(digest)
        if dest.exists():
            src.unlink(missing_ok=True)
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(src, dest)
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return True

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)
