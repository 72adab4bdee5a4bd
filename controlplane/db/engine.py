"""Engine construction and schema upgrades (Alembic only, never create_all)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url

# An arbitrary constant shared by every replica ("edgefleet" in ASCII).
_MIGRATION_LOCK = 0x6564676566_6C656574 % (2**63)


def sqlite_url(data_dir: Path) -> str:
    """The embedded default: a SQLite file in the data dir."""
    return f"sqlite:///{(data_dir / 'edgefleet.db').resolve()}"


def make_engine(url: str | URL, *, pool_size: int = 10) -> Engine:
    """Create an engine. SQLite gets WAL, foreign keys, a busy timeout and
    explicit BEGIN so write transactions can take the write lock up front.

    Statements' parameters stay out of error messages (hide_parameters):
    SQLAlchemy would otherwise print them with every failed statement, and
    the server logs unexpected errors whole, so a failing insert of a device
    or a token put its credential hash in the log."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            hide_parameters=True,
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        hide_parameters=True,
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's implicit BEGIN is DEFERRED: two writers that both start by
        # reading then deadlock on the upgrade to a write lock (SQLITE_BUSY with
        # no retry). We emit BEGIN ourselves, IMMEDIATE for writers.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def alembic_config() -> Config:
    """Alembic configuration pointing at the migrations shipped in the package."""
    script_location = resources.files("edgefleet.migrations")
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    return cfg


def upgrade(engine: Engine, revision: str = "head", *, blob_dir: Path | None = None) -> None:
    """Bring the schema to `revision`. Safe to run on every start. 0016
    moves blob bytes out of SQL into `blob_dir` (the blob store's directory),
    and refuses to run without it when there are any."""
    cfg = alembic_config()
    if blob_dir is not None:
        cfg.attributes["blob_dir"] = blob_dir
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Replicas starting together would race to create the same tables;
            # the transaction-scoped lock makes the later ones wait, then find
            # nothing left to do.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
