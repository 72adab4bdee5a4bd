"""Writing files so that a reader, or a reboot, never sees half of one.

Standard library only: the agent imports it, and an agent must not load the
control plane's dependencies (or anything else it does not need)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def _replacing(path: Path, mode: int) -> Iterator[BinaryIO]:
    """A handle on a temporary file beside `path` that replaces it, synced,
    once the block ends without error (the directory synced too); on an
    error nothing changes and no temporary file is left.

    The temporary file gets a unique name in the same directory, so processes
    writing the same file at once (a server's workers starting together) do
    not trip over each other's temporaries; the last rename wins."""
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    # The rename is only durable once the directory entry is on disk.
    fsync_dir(directory)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that readers (and a reboot) see either the
    old content or the new, never a mix. Leaves no temp file behind."""
    with _replacing(path, mode) as handle:
        handle.write(data)


def atomic_copy(source: Path, path: Path, mode: int = 0o644) -> None:
    """Replace `path` with a copy of `source`, as atomic_write does, streaming
    (a blob may be larger than memory)."""
    with _replacing(path, mode) as handle, open(source, "rb") as src:
        shutil.copyfileobj(src, handle, 1024 * 1024)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
