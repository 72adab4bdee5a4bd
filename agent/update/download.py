"""A resumable download into <state_dir>/downloads/<digest>.part.

Resume: the offset is the length of the .part file, so a download resumes
from the bytes on disk, across retries and across restarts. A chunk that does
not start where the file ends is refused (retryable); a source that answers a
resumed request from offset 0 (it ignored the offset) restarts the file from
zero; a source that sends more than the assigned size, or another total size,
is refused (fatal).

Hashing each byte once: hashlib objects cannot be saved, so the running
sha256 lives in this object. Keep one ResumableDownload per artifact for the
life of the process (the machine does): a retry then continues with the same
hasher and never reads the prefix again. Only a fresh object (after a restart)
re-hashes the existing prefix, once, from disk. Bytes are written before they
are hashed; if a write fails half-way, the file is cut back to what was hashed.

The file is renamed to <state_dir>/downloads/<digest> only after its sha256
matched, so the final path exists only for a complete, correct artifact.
Before fetching, free space must cover the remaining bytes plus a margin, or
the attempt fails with a retryable "disk full while downloading ..." (the
machine backs off and tries again, up to its attempt limit: space may free
meanwhile); if the disk fills up anyway (something else wrote to it, or it
hit a quota or went read-only), the partial file is deleted as the attempt
fails the same way, so a full disk never keeps a half-written file."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edgefleet.agent.disk import disk_full_label
from edgefleet.fsutil import fsync_dir

from .ports import Downloader, FatalUpdateError, MirroredDownloader, RetryableUpdateError

log = logging.getLogger(__name__)

DOWNLOADS_DIR = "downloads"
DEFAULT_MARGIN = 8 * 1024 * 1024
_READ_BLOCK = 1024 * 1024


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def artifact_path(state_dir: Path, digest: str) -> Path:
    return state_dir / DOWNLOADS_DIR / digest


def part_path(state_dir: Path, digest: str) -> Path:
    return state_dir / DOWNLOADS_DIR / f"{digest}.part"


class ResumableDownload:
    """One artifact's download; run() it again after a failure to resume."""

    def __init__(
        self,
        state_dir: Path,
        digest: str,
        size: int,
        *,
        hash_factory: Callable[[], Hasher] = hashlib.sha256,
        disk_usage: Callable[[Path], Any] = shutil.disk_usage,
        margin: int = DEFAULT_MARGIN,
    ) -> None:
        self.digest = digest
        self.size = size
        self.final = artifact_path(state_dir, digest)
        self.part = part_path(state_dir, digest)
        self._hash_factory = hash_factory
        self._disk_usage = disk_usage
        self._margin = margin
        self._hasher: Hasher | None = None
        self._hashed = 0  # bytes of .part fed to self._hasher

    @property
    def bytes_done(self) -> int:
        return self._hashed

    def run(self, downloader: Downloader, on_progress: Callable[[int], None] | None = None) -> Path:
        """Fetch the rest of the artifact and return its final path. Raises
        RetryableUpdateError (interrupted, chunk refused, disk full) or
        FatalUpdateError (wrong size, sha256 mismatch)."""
        if self.final.exists():
            # Renamed into place only after its sha256 matched.
            self._hashed = self.size
            return self.final
        try:
            self.part.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            offset = self._prepare()
            self._check_space(self.size - offset)
            try:
                if offset < self.size:
                    self._fetch(downloader, offset, on_progress)
                return self._finish()
            except _Mismatch as exc:
                self._discard()
                mirrors = (
                    downloader.distrust(self.digest)
                    if isinstance(downloader, MirroredDownloader) else []
                )  # fmt: skip
                if not mirrors:
                    raise FatalUpdateError(str(exc)) from None
                named = ", ".join(mirrors)
                log.warning(
                    "artifact %s: %s from %s; left for this artifact", self.digest[:12], exc,
                    f"mirror {named}" if len(mirrors) == 1 else f"mirrors {named}",
                )  # fmt: skip
                # A mirror's bytes are not the signed ones: download again
                # without it (the machine retries; the next source serves).
                raise RetryableUpdateError(
                    f"{exc} from mirror {', '.join(mirrors)}; downloading again from the next "
                    "source"
                ) from None
        except (ConnectionError, TimeoutError):
            raise  # the source's trouble, retryable (machine.classify)
        except OSError as exc:
            label = disk_full_label(exc)
            if label is not None:
                # The space the partial file held lets the agent record the
                # failure on the same full disk, and no half-written file
                # stays behind; a later attempt starts again from zero.
                with contextlib.suppress(OSError):
                    self.part.unlink(missing_ok=True)
                self._hasher, self._hashed = None, 0
                raise RetryableUpdateError(
                    f"{label} while downloading {self.digest[:12]} "
                    f"({exc.strerror or exc}); the partial file was deleted"
                ) from exc
            raise FatalUpdateError(f"{self.part}: {exc.strerror or exc}") from exc

    def _discard(self) -> None:
        """Forget the partial download: its bytes are not the artifact's."""
        self.part.unlink(missing_ok=True)
        self._hasher, self._hashed = None, 0

    def _reset(self) -> None:
        self._hasher = self._hash_factory()
        self._hashed = 0

    def _prepare(self) -> int:
        """Line up the .part file and the hasher; return the resume offset."""
        on_disk = self.part.stat().st_size if self.part.exists() else 0
        if on_disk > self.size:
            on_disk = 0
            self.part.write_bytes(b"")
            self._reset()
        if self._hasher is not None and on_disk >= self._hashed:
            if on_disk > self._hashed:  # a write that failed half-way
                os.truncate(self.part, self._hashed)
            return self._hashed
        # A new process (or a file that shrank): hash the prefix once.
        self._reset()
        assert self._hasher is not None
        if on_disk:
            with self.part.open("rb") as handle:
                while block := handle.read(_READ_BLOCK):
                    self._hasher.update(block)
                    self._hashed += len(block)
        return self._hashed

    def _check_space(self, remaining: int) -> None:
        free = int(self._disk_usage(self.part.parent).free)
        if free < remaining + self._margin:
            raise RetryableUpdateError(
                f"disk full while downloading {self.digest[:12]}: {remaining} bytes still to "
                f"download (plus a {self._margin}-byte margin) but only {free} bytes free"
            )

    def _fetch(
        self, downloader: Downloader, offset: int, on_progress: Callable[[int], None] | None
    ) -> None:
        assert self._hasher is not None
        first = True
        with self.part.open("r+b" if self.part.exists() else "wb") as handle:
            handle.seek(offset)
            try:
                for chunk in downloader.fetch(self.digest, offset):
                    if chunk.total_size != self.size:
                        raise _Mismatch(
                            f"the source says the artifact has {chunk.total_size} bytes; "
                            f"{self.size} were assigned"
                        )
                    if first and offset and chunk.offset == 0:
                        # The source ignored the offset: start again from zero.
                        handle.seek(0)
                        handle.truncate(0)
                        self._reset()
                        offset = 0
                    first = False
                    if chunk.offset != offset:
                        raise RetryableUpdateError(
                            f"chunk at offset {chunk.offset} refused: expected offset {offset}"
                        )
                    if offset + len(chunk.data) > self.size:
                        raise _Mismatch(f"the source sent more than the assigned {self.size} bytes")
                    handle.write(chunk.data)
                    self._hasher.update(chunk.data)
                    offset += len(chunk.data)
                    self._hashed = offset
                    if on_progress is not None:
                        on_progress(offset)
                    if offset == self.size:
                        break
            finally:
                handle.flush()
                os.fsync(handle.fileno())
        if offset < self.size:
            raise RetryableUpdateError(f"download interrupted at {offset} of {self.size} bytes")

    def _finish(self) -> Path:
        assert self._hasher is not None
        actual = self._hasher.hexdigest()
        if actual != self.digest:
            raise _Mismatch(
                f"sha256 mismatch: downloaded bytes hash to {actual[:12]}, "
                f"expected {self.digest[:12]} (corrupted download)"
            )
        os.replace(self.part, self.final)
        fsync_dir(self.final.parent)
        return self.final


class _Mismatch(Exception):
    """The bytes are not the assigned ones (size or sha256): fatal, unless
    a mirror sent them (ResumableDownload.run)."""


def remove_download(state_dir: Path, digest: str, *, keep_final: bool = False) -> None:
    """Delete the partial file (and the final one unless `keep_final`)."""
    part_path(state_dir, digest).unlink(missing_ok=True)
    if not keep_final:
        artifact_path(state_dir, digest).unlink(missing_ok=True)


__all__ = ["DOWNLOADS_DIR", "ResumableDownload", "artifact_path", "part_path", "remove_download"]
