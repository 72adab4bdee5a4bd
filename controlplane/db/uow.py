"""The unit of work: owns a session, commits only when told, rolls back on exit."""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker


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


class Database:
    """Session factories for one engine: read-only and read-write units of work."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = sessionmaker(bind=engine, expire_on_commit=False)
        writer = engine.execution_options(sqlite_begin="IMMEDIATE")
        self._write = sessionmaker(bind=writer, expire_on_commit=False)
        # PostgreSQL has row locks and many writers; SQLite one writer.
        self._writers = TicketLock() if engine.dialect.name == "sqlite" else None

    def unit_of_work(self, *, readonly: bool = False) -> UnitOfWork:
        if readonly:
            return UnitOfWork(self._read())
        return UnitOfWork(self._write(), self._writers)

    def dispose(self) -> None:
        self.engine.dispose()


class UnitOfWork:
    """`with db.unit_of_work() as uow: ...; uow.commit()`. Anything not
    committed is rolled back when the block exits, exception or not."""

    def __init__(self, session: Session, writers: TicketLock | None = None) -> None:
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
        finally:
            if self._writers is not None:
                self._writers.release()

    def commit(self) -> None:
        self.session.commit()

    def flush(self) -> None:
        self.session.flush()
