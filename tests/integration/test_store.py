"""The SQL store on both backends: migrations, schema agreement, and the
services' transactional behaviour against a real database."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text

from edgefleet.controlplane.db.engine import alembic_config, current_revision, make_engine, upgrade
from edgefleet.controlplane.db.models import AuditRow, Base, DeviceRow, EnrollmentTokenRow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain.rules import parse_rule
from edgefleet.controlplane.errors import (
    AlreadyExists,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from edgefleet.controlplane.services import audit
from edgefleet.controlplane.services.classes import (
    ClassService,
    ClassSpec,
    ClassUpdate,
    Constraints,
)
from edgefleet.controlplane.services.devices import DeviceService
from edgefleet.controlplane.services.enrollment import EnrollmentService, ReenrollmentProof
from edgefleet.controlplane.services.events import FleetEvent


class Recorder:
    def __init__(self) -> None:
        self.events: list[FleetEvent] = []

    def publish(self, event: FleetEvent) -> None:
        self.events.append(event)


class NoPresence:
    def is_connected(self, device_id: str) -> bool:
        return False


@pytest.fixture
def db(db_url: str) -> Database:
    engine = make_engine(db_url)
    upgrade(engine)
    database = Database(engine)
    yield database  # type: ignore[misc]
    database.dispose()


def test_every_migration_runs_on_an_empty_database_and_matches_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    assert current_revision(engine) is None
    upgrade(engine)
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert current_revision(engine) == head
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    assert diff == []
    tables = set(inspect(engine).get_table_names())
    assert {t.name for t in Base.metadata.sorted_tables} <= tables
    upgrade(engine)  # idempotent: the server runs it on every start
    # Downgrade to nothing and back: the migration is reversible.
    from alembic import command

    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(engine)
    engine.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def _services(db: Database) -> tuple[EnrollmentService, DeviceService, ClassService, Recorder]:
    events = Recorder()
    return (
        EnrollmentService(db, events),
        DeviceService(db, events, NoPresence(), offline_after_s=60),
        ClassService(db, events),
        events,
    )


def _enroll(svc: EnrollmentService, token: str, hw_id: str, **hw: object) -> str:
    return svc.enroll(
        token=token, hardware_id=hw_id, name="", labels={}, hardware=dict(hw), runtime={}
    ).device_id


@pytest.mark.parametrize("policy", ["auto-accept", "pending"])
def test_reenrollment_needs_proof_for_every_token_policy(db: Database, policy: str) -> None:
    """The re-enrollment rule (docs/security.md), for a token of each policy:
    without proof nothing changes and the attempt is audited; with the
    device's credential the same device comes back in its state, with its
    operator's labels, and the token's use is counted; once decommissioned,
    the hardware id enrolls afresh as the token's policy says."""
    enrollment, devices, _, _ = _services(db)
    _, first_token = enrollment.create_token(
        "op", name="t", policy="pending", labels={"site": "lab"}, max_uses=1, ttl=None
    )
    first = enrollment.enroll(
        token=first_token, hardware_id="hw-1", name="pi-1", labels={"site": "x", "zone": "a"},
        hardware={"arch": "aarch64"}, runtime={},
    )  # fmt: skip
    assert first.state == "pending" and not first.reenrolled
    devices.accept("op", first.device_id)
    devices.update_labels("op", first.device_id, {"zone": "ops-set"}, [])
    _, token = enrollment.create_token(
        "op", name="other", policy=policy, labels={"zone": "token", "team": "t"}, max_uses=2,
        ttl=None,
    )  # fmt: skip

    def snapshot() -> tuple[object, ...]:
        with db.unit_of_work(readonly=True) as uow:
            row = uow.session.get(DeviceRow, first.device_id)
            tok = uow.session.scalars(
                select(EnrollmentTokenRow).where(EnrollmentTokenRow.name == "other")
            ).one()
            assert row is not None
            return (row.state, row.credential_hash, dict(row.labels), row.desired_revision,
                    tok.uses)  # fmt: skip

    before = snapshot()
    for proof in (
        None,  # what an attacker who knows the hardware id has
        ReenrollmentProof(device_id=first.device_id),
        ReenrollmentProof(device_id=first.device_id, credential="dev_x.y"),
        ReenrollmentProof(device_id="another", credential=first.credential),
    ):
        with pytest.raises(PermissionDenied, match="already enrolled as device"):
            enrollment.enroll(
                token=token, hardware_id="hw-1", name="", labels={"zone": "evil"},
                hardware={}, runtime={}, proof=proof,
            )  # fmt: skip
        assert snapshot() == before
    # Audited once per token, device and reason (two of the four gave the
    # same reason): a refusal repeated in a loop does not fill the log.
    refused = audit.list_entries(db, action="device.reenroll.refused")
    assert len(refused) == 3 and all(e.target == f"device:{first.device_id}" for e in refused)

    again = enrollment.enroll(
        token=token, hardware_id="hw-1", name="", labels={"zone": "agent"}, hardware={},
        runtime={}, proof=ReenrollmentProof(first.device_id, first.credential),
    )  # fmt: skip
    assert again.device_id == first.device_id and again.reenrolled
    assert again.credential != first.credential and again.state == "accepted"
    state, credential_hash, labels, _, uses = snapshot()
    assert state == "accepted"
    # The device proven again keeps its labels as operators left them: not
    # the agent's, not the token's.
    assert labels == {"site": "lab", "zone": "ops-set"}
    assert first.credential not in credential_hash and uses == 1
    # Its old credential is no longer proof.
    with pytest.raises(PermissionDenied, match="not the device's current one"):
        enrollment.enroll(
            token=token, hardware_id="hw-1", name="", labels={}, hardware={}, runtime={},
            proof=ReenrollmentProof(first.device_id, first.credential),
        )  # fmt: skip

    devices.decommission("op", first.device_id, "retired")
    # Its own agent, still holding the retired identity, gets nothing back.
    with pytest.raises(PermissionDenied, match="decommissioned by an operator"):
        enrollment.enroll(
            token=token, hardware_id="hw-1", name="", labels={}, hardware={}, runtime={},
            proof=ReenrollmentProof(again.device_id, again.credential),
        )  # fmt: skip
    # A reinstalled board (no identity left) enrolls afresh.
    fresh = enrollment.enroll(
        token=token, hardware_id="hw-1", name="", labels={}, hardware={}, runtime={}
    )
    assert fresh.device_id == first.device_id and not fresh.reenrolled
    assert fresh.state == ("accepted" if policy == "auto-accept" else "pending")
    assert snapshot()[-1] == 2
    # Every enrollment uses the token: a third is over its limit of two.
    with pytest.raises(ResourceExhausted, match="is used up \\(its limit is 2 enrollments\\)"):
        enrollment.enroll(
            token=token, hardware_id="hw-1", name="", labels={}, hardware={}, runtime={},
            proof=ReenrollmentProof(fresh.device_id, fresh.credential),
        )  # fmt: skip
    with db.unit_of_work(readonly=True) as uow:
        assert uow.session.scalar(select(func.count()).select_from(DeviceRow)) == 1


def test_token_limits_expiry_and_revocation(db: Database) -> None:
    enrollment, _, _, _ = _services(db)
    row, token = enrollment.create_token(
        "op", name="once", policy="pending", labels={}, max_uses=1, ttl=None
    )
    _enroll(enrollment, token, "a")
    with pytest.raises(ResourceExhausted, match="is used up"):
        _enroll(enrollment, token, "b")
    _, short = enrollment.create_token(
        "op", name="short", policy="pending", labels={}, max_uses=0, ttl=dt.timedelta(seconds=1)
    )
    with db.unit_of_work() as uow:
        tok = uow.session.scalars(
            select(EnrollmentTokenRow).where(EnrollmentTokenRow.name == "short")
        ).one()
        tok.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        uow.commit()
    with pytest.raises(Unauthenticated, match="expired"):
        _enroll(enrollment, short, "c")
    enrollment.revoke_token("op", row.id)
    with pytest.raises(Unauthenticated, match="revoked"):
        _enroll(enrollment, token, "a")
    with pytest.raises(Unauthenticated, match="invalid enrollment token"):
        _enroll(enrollment, token[:-2] + "xx", "a")


def test_concurrent_enrollments_never_exceed_max_uses(db: Database) -> None:
    enrollment, _, _, _ = _services(db)
    _, token = enrollment.create_token(
        "op", name="five", policy="auto-accept", labels={}, max_uses=5, ttl=None
    )
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            _enroll(enrollment, token, f"hw-{i}")
            result = "ok"
        except ResourceExhausted:
            result = "exhausted"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 5 and outcomes.count("exhausted") == 7
    with db.unit_of_work(readonly=True) as uow:
        assert uow.session.scalar(select(func.count()).select_from(DeviceRow)) == 5


def test_classes_classify_on_enroll_and_reclassify_on_change(db: Database) -> None:
    enrollment, devices, classes, events = _services(db)
    _, token = enrollment.create_token(
        "op", name="t", policy="auto-accept", labels={}, max_uses=0, ttl=None
    )
    pi = _enroll(enrollment, token, "pi", arch="aarch64", memory_mb=3900)
    gw = _enroll(enrollment, token, "gw", arch="x86_64", memory_mb=16000)
    assert devices.get(pi).class_name == "" and devices.list(unclassified=True).devices
    classes.create(
        "op",
        ClassSpec(
            name="arm-small",
            constraints=Constraints(runtime="tflite", max_model_size_mb=8),
            rules=(parse_rule("arch == aarch64"), parse_rule("memory_mb < 4096")),
        ),
    )
    assert devices.get(pi).class_name == "arm-small"
    assert devices.get(gw).class_name == ""
    assert any(e.desired_changed and pi in e.device_ids for e in events.events)
    # A rule change moves devices out again.
    classes.update("op", "arm-small", ClassUpdate(rules=(parse_rule("memory_mb < 2048"),)))
    assert devices.get(pi).class_name == ""
    # Pinning overrides rules; unpinning hands the device back to them.
    classes.update("op", "arm-small", ClassUpdate(rules=(parse_rule("arch == aarch64"),)))
    devices.set_class("op", gw, "arm-small")
    classes.update("op", "arm-small", ClassUpdate(priority=3))
    assert devices.get(gw).class_name == "arm-small" and devices.get(gw).row.class_pinned
    devices.set_class("op", gw, "")
    assert devices.get(gw).class_name == ""
    assert [v.device_count for v in classes.list()] == [1]
    with pytest.raises(AlreadyExists):
        classes.create("op", ClassSpec(name="arm-small", constraints=Constraints(runtime="tflite")))
    assert classes.delete("op", "arm-small") == 1
    assert devices.get(pi).class_name == ""
    with pytest.raises(NotFound):
        classes.get("arm-small")


def test_rejected_device_cannot_enroll_again_and_failed_changes_leave_nothing(
    db: Database,
) -> None:
    enrollment, devices, _, _ = _services(db)
    _, token = enrollment.create_token(
        "op", name="t", policy="pending", labels={}, max_uses=0, ttl=None
    )
    device_id = _enroll(enrollment, token, "hw")
    assert devices.get(device_id).row.state == "pending"
    devices.reject("op", device_id, "unknown hardware")
    with pytest.raises(PermissionDenied, match="rejected"):
        _enroll(enrollment, token, "hw")
    before = devices.get(device_id).row.desired_revision
    with pytest.raises(NotFound):
        devices.set_class("op", device_id, "no-such-class")
    after = devices.get(device_id).row
    assert after.desired_revision == before and not after.class_pinned
    with db.unit_of_work(readonly=True) as uow:
        actions = list(uow.session.scalars(select(AuditRow.action).order_by(AuditRow.id)))
    assert actions == ["token.create", "device.enroll", "device.reject"]


def test_last_seen_batch_update(db: Database) -> None:
    enrollment, devices, _, _ = _services(db)
    _, token = enrollment.create_token(
        "op", name="t", policy="auto-accept", labels={}, max_uses=0, ttl=None
    )
    ids = [_enroll(enrollment, token, f"hw-{i}") for i in range(3)]
    at = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    devices.touch({ids[0]: at, ids[2]: at})
    assert devices.get(ids[0]).row.last_seen_at == at
    assert devices.get(ids[1]).row.last_seen_at != at
    assert devices.count_by_state() == {"accepted": 3}


def test_pg_fixture_is_a_fresh_database(pg_url: str) -> None:
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        assert (
            conn.execute(text("select count(*) from pg_tables where schemaname='public'")).scalar()
            == 0
        )
    engine.dispose()


def test_blob_rows_in_sql_bytes_in_the_store_any_replica_sharing_it_reads_them(
    db: Database, tmp_path: Path
) -> None:
    import hashlib
    import os

    from edgefleet.controlplane.errors import DataLoss
    from edgefleet.controlplane.services.blobs import BlobStore

    data = os.urandom(2 * 1024 * 1024 + 12345)
    digest = hashlib.sha256(data).hexdigest()
    src = tmp_path / "blob"
    src.write_bytes(data)
    shared = tmp_path / "shared"
    writer = BlobStore(shared)
    with db.unit_of_work() as uow:
        assert writer.add(uow.session, src, digest, "application/octet-stream")
        assert not writer.add(uow.session, src, digest, "application/octet-stream")
        uow.commit()
    # Another replica on the same directory serves it, verified.
    reader = BlobStore(shared)
    path = reader.local_path(db, digest)
    assert path.read_bytes() == data
    assert reader.size(db, digest) == len(data)
    # A replica with a directory of its own has no copy: data loss, said so.
    with pytest.raises(DataLoss, match="missing from the blob store"):
        BlobStore(tmp_path / "elsewhere").local_path(db, digest)
    # A rolled-back add leaves no row behind (the file is garbage).
    other = tmp_path / "other"
    other.write_bytes(b"x" * 10)
    other_digest = hashlib.sha256(b"x" * 10).hexdigest()
    with db.unit_of_work() as uow:
        writer.add(uow.session, other, other_digest, "text/plain")
    with pytest.raises(NotFound):
        reader.size(db, other_digest)


def test_a_damaged_store_file_is_reported_once_by_downloads_that_opened_it_before_it_moved(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """CI found this race: a download opened the damaged file, another
    quarantined it (a rename: the ctime moves), and the first, looking only
    after the move, saw a "new" version, hashed it and reported it again."""
    import hashlib
    import logging
    import os

    from edgefleet.controlplane.errors import DataLoss
    from edgefleet.controlplane.services.blobs import BlobStore, FileVersion
    from edgefleet.controlplane.services.blobstore import DirectoryStore

    data = os.urandom(100_000)
    digest = hashlib.sha256(data).hexdigest()
    src = tmp_path / "blob"
    src.write_bytes(data)
    store = BlobStore(tmp_path / "replica")
    with db.unit_of_work() as uow:
        assert store.add(uow.session, src, digest, "application/octet-stream")
        uow.commit()
    path = store.cache_path(digest)
    damaged = bytearray(path.read_bytes())
    damaged[3] ^= 0xFF
    path.write_bytes(bytes(damaged))

    caplog.set_level(logging.WARNING)
    files = store.files
    assert isinstance(files, DirectoryStore)
    with open(path, "rb", buffering=0) as early:  # the first download's open
        damaged_inode = os.fstat(early.fileno()).st_ino
        with pytest.raises(DataLoss):  # the second: quarantines, serves nothing
            store.open(db, digest)
        late_look = FileVersion.of(os.fstat(early.fileno()))
        assert not files._verify(digest, path, early, late_look)
    assert sum("does not match its sha256" in r.getMessage() for r in caplog.records) == 1
    assert not path.exists()
    # The same bytes published again put it back.
    with db.unit_of_work() as uow:
        assert not store.add(uow.session, src, digest, "application/octet-stream")
        uow.commit()
    with store.open(db, digest) as healed:
        assert healed.version.inode != damaged_inode
    assert path.read_bytes() == data
