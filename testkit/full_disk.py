"""A device's disk that fills up, for tests: a small tmpfs of the test's own
(skipped where mounting is not permitted), filled to the last byte, and the
leftovers an atomic write must never leave."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.fault_scenarios import small_disk, tmpfs_unavailable

MIB = 1024 * 1024


@contextlib.contextmanager
def small_tmpfs(root: Path, size_bytes: int = 4 * MIB) -> Iterator[Path]:
    """A fresh tmpfs of `size_bytes` under `root` for the block; skips the
    test where mounting is not permitted."""
    reason = tmpfs_unavailable(root / "probe")
    if reason:
        pytest.skip(reason)
    with small_disk(root / "disk", size_bytes) as where:
        yield where


def fill_to_the_last_byte(filler: Path) -> None:
    """Write `filler` until the file system refuses even one more byte."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for block in (MIB, 4096, 1):
            data = b"\0" * block
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, data)
        with pytest.raises(OSError) as refused:
            os.write(fd, b"\0")
        assert refused.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert shutil.disk_usage(filler.parent).free == 0


def temp_files(directory: Path) -> list[str]:
    """Leftovers of atomic writes (`.<name>.<random>.tmp`): none, ever."""
    return sorted(p.name for p in directory.rglob("*.tmp"))
