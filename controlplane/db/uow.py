"""The unit of work: owns a session, commits only when told, rolls back on exit."""

from __future__ import annotations

from types import TracebackType

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker


class Database:
    """Session factories for one engine: read-only and read-write units of work."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = sessionmaker(bind=engine, expire_on_commit=False)
        writer = engine.execution_options(sqlite_begin="IMMEDIATE")
        self._write = sessionmaker(bind=writer, expire_on_commit=False)

    def unit_of_work(self, *, readonly: bool = False) -> UnitOfWork:
        return UnitOfWork((self._read if readonly else self._write)())

    def dispose(self) -> None:
        self.engine.dispose()


class UnitOfWork:
    """`with db.unit_of_work() as uow: ...; uow.commit()`. Anything not
    committed is rolled back when the block exits, exception or not."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def __enter__(self) -> UnitOfWork:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # close() rolls back anything uncommitted without expiring the rows
        # already loaded, so callers can read them after the block.
        self.session.close()

    def commit(self) -> None:
        self.session.commit()

    def flush(self) -> None:
        self.session.flush()
