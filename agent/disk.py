"""A full state directory: how the agent recognises it, reports it and
writes again once there is room.

A full disk (ENOSPC; also EDQUOT, a quota, and EROFS, a file system that
went read-only) must never take inference down. The agent keeps what it
learned in memory, keeps serving the active model, and writes the state
file again later:

- `disk_full_label` recognises the condition in an OSError, an sqlite3 error
  or a StateError raised from one; `write_error` turns a failed write into
  DiskFull (not fatal) or StateError (fatal), by errno, never by text;
- `DiskCondition` is the agent's single record of which writes are waiting
  for room and why. It logs once when a write starts failing and once when
  it lands again (never once per retry), and tells its listeners (the
  daemon sends the control plane a fresh Hello: the update status's reason
  says "disk full: ..." and the hardware profile the free space);
- `RetriedWrite` keeps one file current: the newest value is written at
  once, and if the disk is full it is kept and written again with capped
  exponential backoff, until it lands (a newer value replaces it).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Generic, TypeVar

from edgefleet.agent.errors import DiskFull, StateError

log = logging.getLogger("edgefleet.agent.disk")

T = TypeVar("T")

# What the operator reads in the update status's reason; every one of them
# starts with "disk" so that a person (or a filter) finds them together.
_ERRNO_LABELS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk full (quota exceeded)",
    errno.EROFS: "disk not writable (read-only file system)",
}
# SQLite reports ENOSPC as SQLITE_FULL and a read-only file as SQLITE_READONLY
# (the primary code is the low byte of an extended one).
_SQLITE_LABELS = {
    sqlite3.SQLITE_FULL: "disk full",
    sqlite3.SQLITE_READONLY: "disk not writable (read-only database)",
}
# Backoff for writes waiting for room: soon after a short spike, at most this
# long after space frees on a disk that stayed full for a while.
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 30.0


def disk_full_label(exc: BaseException | None) -> str | None:
    """The label ("disk full", or its quota / read-only variants) when `exc`, or an
    exception it was raised from, says the file system cannot take the
    write; None otherwise."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return exc.message.partition(":")[0]
        if isinstance(exc, OSError) and exc.errno in _ERRNO_LABELS:
            return _ERRNO_LABELS[exc.errno]
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in _SQLITE_LABELS:
                return _SQLITE_LABELS[code & 0xFF]
        exc = exc.__cause__
    return None


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or its cause) says the disk is full; see disk_full_label."""
    return disk_full_label(exc) is not None


def write_error(path: Path, exc: OSError) -> StateError:
    """The error for a failed write of `path`: DiskFull when the file
    system is full (the agent waits for room), else StateError (fatal)."""
    label = disk_full_label(exc)
    detail = exc.strerror or str(exc)
    if label is not None:
        return DiskFull(f"{label}: cannot write {path} ({detail})")
    return StateError(f"{path}: cannot write: {detail}")


def retry_delay(
    attempt: int, initial_s: float = RETRY_INITIAL_S, max_s: float = RETRY_MAX_S
) -> float:
    """The wait before retry number `attempt` (0-based): doubling, capped."""
    return min(max_s, initial_s * 2.0 ** min(attempt, 32))


class DiskCondition:
    """Which writes to the state directory wait for room, and why.
    Thread-safe: the event loop, the update thread and telemetry's worker
    threads all report to one instance."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, str] = {}
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener` (on the reporting thread) whenever a write starts
        or stops waiting for room."""
        with self._lock:
            self._listeners.append(listener)

    def failed(self, what: str, reason: str) -> None:
        """`what` could not be written for lack of room (`reason`, e.g.
        "disk full: cannot write ..."). Logged the first time only."""
        with self._lock:
            new = what not in self._waiting
            self._waiting[what] = reason
            listeners = list(self._listeners) if new else []
        if new:
            log.warning(
                "%s; the agent keeps serving and writes %s again when there is room", reason, what
            )
        for listener in listeners:
            listener()

    def recovered(self, what: str) -> None:
        """`what` was written: it no longer waits. Logged once per condition."""
        with self._lock:
            if self._waiting.pop(what, None) is None:
                return
            listeners = list(self._listeners)
        log.info("%s written: the state directory takes writes again", what)
        for listener in listeners:
            listener()

    @property
    def reason(self) -> str | None:
        """Why the oldest waiting write waits; None when none does."""
        with self._lock:
            return next(iter(self._waiting.values()), None)

    def waiting(self) -> list[str]:
        """What waits for room, oldest first."""
        with self._lock:
            return list(self._waiting)


class RetriedWrite(Generic[T]):
    """Keeps one state file current despite a full disk (module docstring).

    `write` persists a value and raises DiskFull (kept and retried) or any
    other StateError (propagated: fatal, as before). `submit` runs on the
    event loop; `run` is the retry task, started beside the agent's others."""

    def __init__(
        self,
        what: str,
        write: Callable[[T], None],
        condition: DiskCondition,
        *,
        initial_s: float = RETRY_INITIAL_S,
        max_s: float = RETRY_MAX_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.what = what
        self._write = write
        self._condition = condition
        self._initial_s, self._max_s = initial_s, max_s
        self._sleep = sleep
        self._pending: tuple[T] | None = None
        self._wake = asyncio.Event()

    @property
    def pending(self) -> bool:
        """A value waits to be written."""
        return self._pending is not None

    def submit(self, value: T) -> bool:
        """Write `value` now; True when it is on disk. On a full disk it is
        kept (replacing any older one still waiting) for `run` to write."""
        self._pending = None
        if not self._try(value):
            self._pending = (value,)
            self._wake.set()
            return False
        return True

    def _try(self, value: T) -> bool:
        try:
            self._write(value)
        except DiskFull as exc:
            self._condition.failed(self.what, exc.message)
            return False
        self._condition.recovered(self.what)
        return True

    async def run(self) -> None:
        """Write whatever waits, with backoff, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            attempt = 0
            while self._pending is not None:
                await self._sleep(retry_delay(attempt, self._initial_s, self._max_s))
                attempt += 1
                # submit() runs on this loop too: the newest value is the one
                # waiting now, and nothing replaces it during the write.
                pending = self._pending
                if pending is not None and self._try(pending[0]):
                    self._pending = None
