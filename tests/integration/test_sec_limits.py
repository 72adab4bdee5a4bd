"""Issue 18, finding 5, in process: a value the database refuses fails only
the upload that carried it, not the others committed with it. The hostile
messages against a real `edgefleet server` are tests/e2e/test_sec_limits.py."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select

from edgefleet.controlplane.db.engine import make_engine, upgrade
from edgefleet.controlplane.db.models import DeviceRow, TelemetryRow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.controlplane.services.telemetry import Sample, TelemetryService, epoch_ms


def test_a_value_the_database_refuses_fails_only_its_own_upload(pg_url: str) -> None:
    """Behind the API's limits, the group commit itself: a sample only the
    database refuses (a NUL, which the service's own checks let through and
    SQLite would store) used to fail every upload of its group commit on
    PostgreSQL; now the group is stored upload by upload and only that one
    is refused."""
    engine = make_engine(pg_url)
    upgrade(engine)
    db = Database(engine)
    try:
        with db.unit_of_work() as uow:
            for device_id in ("a", "b", "c"):
                row = DeviceRow(id=device_id, hardware_id=f"hw-{device_id}", name=device_id)
                row.state, row.credential_hash = "accepted", "x"
                uow.session.add(row)
            uow.commit()
        now = dt.datetime.now(dt.UTC)
        service = TelemetryService(db, clock=lambda: now)
        at = epoch_ms(now)

        def samples(*seqs: int, **fields: Any) -> list[Sample]:
            return [Sample(seq=s, at_ms=at, model_name="m", **fields) for s in seqs]

        results = service.ingest_many(
            [("a", samples(1, 2)), ("b", samples(1, model_version="1.0\x00")), ("c", samples(7))]
        )
        assert results[0] == 2 and results[2] == 7
        assert isinstance(results[1], InvalidArgument)
        assert "cannot store a value of this upload" in results[1].message
        with db.unit_of_work(readonly=True) as uow:
            stored = dict(
                uow.session.execute(
                    select(TelemetryRow.device_id, func.count()).group_by(TelemetryRow.device_id)
                ).all()
            )
        assert stored == {"a": 2, "c": 1}
    finally:
        db.dispose()
