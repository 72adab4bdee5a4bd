"""Shared fixtures: real servers, real SQLite and PostgreSQL databases, and
the models tests push to them."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import ControlPlane as InProcessControlPlane
from edgefleet.controlplane.server import create_server
from edgefleet.demo.models import (
    BuiltModel,
    ModelUnavailable,
    build_digits_classifier,
    fetch_ppocr_cls,
    fetch_silero_vad,
)
from testkit.fleet import FleetSetup, prepare_for_fleets
from testkit.harness import ADMIN_TOKEN, ControlPlane

PG_ADMIN_DSN = os.environ.get("EDGEFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def pg_server() -> str:
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but not reachable at {PG_ADMIN_DSN}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_DSN}")
    return PG_ADMIN_DSN


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    name = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = pg_server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both backends: an SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'edgefleet.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessControlPlane]:
    """An in-process control plane on SQLite, loopback port 0."""
    cp = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp",
            listen="127.0.0.1:0",
            admin_token=ADMIN_TOKEN,
            heartbeat_interval_s=2,
            max_upload_mb=4,
            build_workers=0,
        )
    )
    try:
        yield cp
    finally:
        await cp.stop(grace=0.5)


@pytest.fixture
async def fleet_setup(server: InProcessControlPlane, tmp_path: Path) -> AsyncIterator[FleetSetup]:
    """`server` ready for simulated fleets (testkit.fleet): two classes, digits
    1.0.0 and 2.0.0 built for both, an auto-accept token."""
    setup = await prepare_for_fleets(server, tmp_path)
    try:
        yield setup
    finally:
        await setup.channel.close(None)


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    """`edgefleet server` as a subprocess on SQLite (for restart/kill tests)."""
    cp = ControlPlane(tmp_path / "cp")
    cp.start()
    try:
        yield cp
    finally:
        cp.close()


@pytest.fixture
async def cp(tmp_path: Path, db_url: str) -> AsyncIterator[InProcessControlPlane]:
    """An in-process control plane on SQLite and on PostgreSQL (claims use FOR
    UPDATE SKIP LOCKED there), with no build runner: tests finish builds by
    hand (testkit.builds)."""
    server = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN,
            build_workers=0, db_url=db_url,
        )
    )  # fmt: skip
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> BuiltModel:
    """The demo's digits classifier: model, sample data and labels."""
    return build_digits_classifier(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def ppocr_cls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PP-OCR's mobile text-direction classifier (MobileNetV3, opset 11),
    from the rapidocr-onnxruntime wheel on PyPI."""
    try:
        return fetch_ppocr_cls(tmp_path_factory.mktemp("rapidocr"))
    except ModelUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def silero_vad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Silero VAD (stateful: an LSTM state fed back at every step, a scalar
    sample rate), from the silero-vad wheel on PyPI. Skipped, with the
    reason, where the wheel cannot be downloaded; a failure in CI, like
    `ppocr_cls`, so CI never passes without it."""
    try:
        return fetch_silero_vad(tmp_path_factory.mktemp("silero"))
    except ModelUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
