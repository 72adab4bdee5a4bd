"""The unit of work: owns a session, commits only when told, rolls back on exit.

A database that cannot be reached or is restarting (SQLAlchemy's
OperationalError: connection refused or lost, "the database system is
starting up", also a lock timeout or a serialization failure) leaves the
block as the domain's Unavailable, so callers retry (gRPC UNAVAILABLE)
instead of seeing an internal error. Nothing was committed, or the commit
itself failed, in which case whether it landed is unknown to the caller, as
with any lost reply. The pool checks connections before use
(pool_pre_ping), so once the database is back the next unit of work gets a
live connection."""

from __future__ import annotations

import fcntl
import logging
import threading
from collections import deque
from pathlib import Path
from types import TracebackType

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.controlplane.errors import Unavailable

log = logging.getLogger(__name__)


class TicketLock:
    """A first-come, first-served lock. SQLite has one writer at a time, and
    its busy handler makes waiting writers poll with sleeps of up to 100 ms:
    under a steady stream of short writes (10,000 devices' telemetry) a
    longer transaction, such as an operator's assignment of 1,000 devices
    or an orchestrator step, lost that race for tens of seconds. Queueing
    this process's writers here first hands the write lock over in order,
    without polling, waking exactly the next writer."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: deque[threading.Lock] = deque()

    def acquire(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        turn.acquire()  # released by release(): the lock is now ours

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()  # handed over, still held
            else:
                self._held = False


class SqliteWriters:
    """SQLite's one writer at a time, handed over without polling: in order
    among this process's threads (TicketLock), and through a lock file
    beside the database among processes (the workers of `edgefleet server
    --workers N`), where a blocked writer sleeps in the kernel and wakes as
    soon as the holder lets go, instead of in SQLite's busy handler."""

    def __init__(self, database_file: Path | None) -> None:
        self._turns = TicketLock()
        # In-memory databases belong to one process and need no file.
        self._file = (
            open(f"{database_file}-writers.lock", "a+b")  # noqa: SIM115 - lives with the engine
            if database_file is not None
            else None
        )

    def acquire(self) -> None:
        self._turns.acquire()
        if self._file is not None:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX)
            except BaseException:
                self._turns.release()
                raise

    def release(self) -> None:
        try:
            if self._file is not None:
                fcntl.flock(self._file, fcntl.LOCK_UN)
        finally:
            self._turns.release()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Database:
    """Session factories for one engine: read-only and read-write units of work."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = sessionmaker(bind=engine, expire_on_commit=False)
        writer = engine.execution_options(sqlite_begin="IMMEDIATE")
        self._write = sessionmaker(bind=writer, expire_on_commit=False)
        # PostgreSQL has row locks and many writers; SQLite one writer.
        self._writers = None
        if engine.dialect.name == "sqlite":
            path = engine.url.database
            self._writers = SqliteWriters(
                Path(path) if path and path != ":memory:" and not path.startswith("file:") else None
            )

    def unit_of_work(self, *, readonly: bool = False) -> UnitOfWork:
        if readonly:
            return UnitOfWork(self._read())
        return UnitOfWork(self._write(), self._writers)

    def dispose(self) -> None:
        self.engine.dispose()
        if self._writers is not None:
            self._writers.close()


class UnitOfWork:
    """`with db.unit_of_work() as uow: ...; uow.commit()`. Anything not
    committed is rolled back when the block exits, exception or not."""

    def __init__(self, session: Session, writers: SqliteWriters | None = None) -> None:
        self.session = session
        self._writers = writers

    def __enter__(self) -> UnitOfWork:
        if self._writers is not None:
            self._writers.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # close() rolls back anything uncommitted without expiring the rows
        # already loaded, so callers can read them after the block.
        try:
            self.session.close()
        except OperationalError as closing:
            # The connection died after the work was done (PostgreSQL going
            # down between the last query and this rollback): what was read
            # or committed stands, and the pool has dropped the connection.
            # Raising would turn a finished call into INTERNAL (the fault
            # suite caught one).
            if exc is None:
                log.warning("closing a session on a lost connection: %s", _first_line(closing))
        finally:
            if self._writers is not None:
                self._writers.release()
        if isinstance(exc, OperationalError):
            log.warning("database unavailable: %s", _first_line(exc))
            raise Unavailable("the database is unavailable; try again") from exc

    def commit(self) -> None:
        self.session.commit()

    def flush(self) -> None:
        self.session.flush()


def _first_line(exc: OperationalError) -> str:
    return (str(exc.orig).splitlines() or [""])[0]
