"""The blob store (issue 24): SQL holds what a blob is, a content-addressed
directory its bytes. Publishing order, verification and quarantine, garbage
collection, replicas sharing one directory, and the migration that moved the
bytes out of SQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import onnx
import pytest
from sqlalchemy import inspect, select, text

from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.db.engine import current_revision, make_engine, upgrade
from edgefleet.controlplane.db.models import BlobRow, ModelRow, ModelVersionRow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from edgefleet.controlplane.server import ControlPlane, create_server
from edgefleet.controlplane.services.blobs import BlobStore
from edgefleet.controlplane.services.blobstore import BlobMissing, DirectoryStore
from edgefleet.controlplane.services.builds import ClaimedJob
from edgefleet.demo.models import BuiltModel
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import build_service, classes_and_digits, fake_result
from testkit.models import model_parts, push_requests
from testkit.rpc import ADMIN, ADMIN_TOKEN

HOUR = 3600.0


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    engine = make_engine(db_url)
    upgrade(engine)
    database = Database(engine)
    yield database
    database.dispose()


def _file(tmp_path: Path, name: str, data: bytes) -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _publish(db: Database, store: BlobStore, src: Path, digest: str) -> None:
    with db.unit_of_work() as uow:
        store.add(uow.session, src, digest, "application/octet-stream")
        uow.commit()


def _refer(db: Database, digest: str, name: str) -> None:
    """A model version whose model file is the blob `digest`."""
    with db.unit_of_work() as uow:
        uow.session.add(ModelRow(id=name, name=name))
        uow.session.flush()
        uow.session.add(
            ModelVersionRow(
                id=name, model_id=name, version="1.0.0", version_sort="1.0.0",
                model_digest=digest, size_bytes=1, inputs=[], outputs=[], opset=17,
                created_by="test",
            )
        )  # fmt: skip
        uow.commit()


# ---------------------------------------------------------------- the directory


def test_put_open_verify_round_trip(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    data = os.urandom(3 * 1024 * 1024 + 7)
    src, digest = _file(tmp_path, "blob", data)
    store.put(src, digest)
    path = store.path(digest)
    assert path == tmp_path / "store" / "sha256" / digest[:2] / digest
    assert path.read_bytes() == data
    assert not list(store.tmp.iterdir())  # the temporary file was renamed, not left
    with store.open(digest) as blob:
        assert blob.size == len(data)
        assert blob.read(0, 10) == data[:10]
        assert os.pread(blob.fileno(), 5, len(data) - 5) == data[-5:]
        assert blob.unchanged()
    assert store.local_path(digest) == path
    assert [d for d, _ in store.digests()] == [digest]
    # Putting the same bytes again keeps the file (no new inode).
    inode = path.stat().st_ino
    store.put(src, digest)
    assert path.stat().st_ino == inode
    # Bytes that are not the digest's are refused, and nothing is stored.
    other, _ = _file(tmp_path, "other", b"not those bytes")
    with pytest.raises(InvalidArgument, match="hashes to"):
        store.put(other, "0" * 64)
    assert not store.path("0" * 64).exists()
    with pytest.raises(BlobMissing):
        store.open("1" * 64)


def test_a_corrupted_file_is_quarantined_never_served_and_healed_by_the_same_bytes(
    db: Database, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = os.urandom(200_000)
    src, digest = _file(tmp_path, "model.onnx", data)
    _publish(db, store, src, digest)
    _refer(db, digest, "digits")
    path = store.store_path(digest)
    with store.open(db, digest) as blob:  # verified, and remembered
        # A download in flight when the file is written in place stops.
        damaged = bytearray(data)
        damaged[1000] ^= 0xFF
        time.sleep(0.01)
        with open(path, "r+b") as fh:
            fh.write(bytes(damaged))
        with pytest.raises(Unavailable, match="changed on disk"):
            blob.read(0, 4096)
    for _ in range(2):  # never served, however often asked
        with pytest.raises(DataLoss) as info:
            store.open(db, digest)
        message = str(info.value)
        assert digest in message and "damaged" in message
        assert "push the model version again" in message
    assert not path.exists()
    assert (tmp_path / "blobs" / "quarantine" / digest).read_bytes() == bytes(damaged)
    with pytest.raises(DataLoss):
        store.local_path(db, digest)
    # The same bytes pushed again put it back (the row exists already).
    with db.unit_of_work() as uow:
        assert not store.add(uow.session, src, digest, "application/onnx")
        uow.commit()
    with store.open(db, digest) as healed:
        assert healed.read(0, len(data)) == data


def test_a_missing_file_of_a_known_blob_is_data_loss_an_unknown_one_not_found(
    db: Database, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "blobs")
    src, digest = _file(tmp_path, "labels.txt", b"zero\none\n")
    _publish(db, store, src, digest)
    store.store_path(digest).unlink()
    with pytest.raises(DataLoss, match=f"{digest}.*missing from the blob store"):
        store.open(db, digest)
    with pytest.raises(NotFound):
        store.open(db, "e" * 64)
    with pytest.raises(NotFound):
        store.open(db, "../../etc/passwd")


def test_a_damaged_file_found_while_publishing_is_replaced(db: Database, tmp_path: Path) -> None:
    """Found bad by the put itself (before any open): quarantined, rewritten."""
    store = BlobStore(tmp_path / "blobs")
    data = os.urandom(50_000)
    src, digest = _file(tmp_path, "blob", data)
    _publish(db, store, src, digest)
    path = store.store_path(digest)
    path.write_bytes(data[:-1])  # truncated
    _publish(db, BlobStore(tmp_path / "blobs"), src, digest)  # another replica's publish
    assert path.read_bytes() == data
    assert (tmp_path / "blobs" / "quarantine" / digest).read_bytes() == data[:-1]


# ---------------------------------------------------------------- publish & collect


def test_a_failed_publish_leaves_no_row_and_its_file_is_collected_after_the_grace(
    db: Database, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "blobs")
    src, digest = _file(tmp_path, "blob", os.urandom(10_000))
    with pytest.raises(RuntimeError, match="boom"), db.unit_of_work() as uow:
        assert store.add(uow.session, src, digest, "application/onnx")
        # The bytes are in the store, synced, before anything commits.
        assert store.store_path(digest).read_bytes() == src.read_bytes()
        raise RuntimeError("boom")
    with db.unit_of_work(readonly=True) as uow:
        assert uow.session.get(BlobRow, digest) is None
    # Within the grace period it stays (a publish may still be committing).
    kept = store.collect_garbage(db, grace_s=HOUR)
    assert kept.orphan_files == 0 and store.store_path(digest).exists()
    gone = store.collect_garbage(db, grace_s=HOUR, now=time.time() + 2 * HOUR)
    assert gone.orphan_files == 1
    assert not store.store_path(digest).exists()


def test_collection_keeps_referenced_blobs_and_deletes_old_unreferenced_ones(
    db: Database, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "blobs")
    used, used_digest = _file(tmp_path, "used", os.urandom(5000))
    unused, unused_digest = _file(tmp_path, "unused", os.urandom(5000))
    _publish(db, store, used, used_digest)
    _publish(db, store, unused, unused_digest)
    _refer(db, used_digest, "digits")
    # A temporary file a crash left behind (an upload's spool).
    leftover = store.tmp / "upload-crashed"
    leftover.mkdir()
    (leftover / "model").write_bytes(b"partial")

    assert store.collect_garbage(db, grace_s=HOUR).blobs == 0  # all young
    later = time.time() + 2 * HOUR
    done = store.collect_garbage(db, grace_s=HOUR, now=later)
    assert (done.blobs, done.orphan_files, done.temporary) == (1, 0, 1)
    with db.unit_of_work(readonly=True) as uow:
        assert set(uow.session.scalars(select(BlobRow.digest))) == {used_digest}
    assert not store.store_path(unused_digest).exists()
    assert not leftover.exists()
    with store.open(db, used_digest) as blob:
        assert blob.read(0, 5000) == used.read_bytes()
    # Nothing left to do the second time.
    assert store.collect_garbage(db, grace_s=HOUR, now=later) == type(done)(0, 0, 0)


def test_a_blob_referred_to_after_collection_picked_it_stays(db: Database, tmp_path: Path) -> None:
    """Each delete checks again that nothing refers to the blob: a publish
    that committed a reference after the candidates were picked wins."""
    store = BlobStore(tmp_path / "blobs")
    src, digest = _file(tmp_path, "blob", os.urandom(1000))
    _publish(db, store, src, digest)
    _refer(db, digest, "late")  # committed after the (simulated) pick
    cutoff_at = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert BlobStore._delete_rows(db, [digest], cutoff_at) == []
    with db.unit_of_work(readonly=True) as uow:
        assert uow.session.get(BlobRow, digest) is not None


def test_a_file_published_again_during_collection_stays(db: Database, tmp_path: Path) -> None:
    """An old orphan file about to be collected is put again by a publish
    (which refreshes its mtime): the removal puts it back."""
    store = BlobStore(tmp_path / "blobs")
    src, digest = _file(tmp_path, "blob", os.urandom(1000))
    store.files.put(src, digest)
    old = time.time() - 2 * HOUR
    os.utime(store.store_path(digest), (old, old))
    assert store.files.remove(digest, older_than=time.time() - HOUR, keep=lambda: True) is False
    assert store.store_path(digest).exists()
    store.files.put(src, digest, refresh=True)  # a publish of the same bytes
    assert store.collect_garbage(db, grace_s=HOUR).orphan_files == 0
    assert store.store_path(digest).exists()


# ---------------------------------------------------------------- two replicas


@pytest.fixture
async def two_replicas(tmp_path: Path, pg_url: str) -> AsyncIterator[tuple[ControlPlane, ...]]:
    """Two in-process control planes on one PostgreSQL database and one blob
    directory, each with a data dir of its own, no build runner."""
    shared = tmp_path / "shared-blobs"
    replicas: list[ControlPlane] = []
    try:
        for name in ("a", "b"):
            replicas.append(
                await create_server(
                    ServerConfig(
                        data_dir=tmp_path / name, db_url=pg_url, blob_store_dir=shared,
                        listen="127.0.0.1:0", admin_token=ADMIN_TOKEN, build_workers=0,
                    )
                )
            )  # fmt: skip
        yield tuple(replicas)
    finally:
        for cp in replicas:
            await cp.stop(grace=0.5)


async def _download(dev: dg.DeviceServiceStub, credential: str, digest: str) -> bytes:
    out = bytearray()
    async for piece in dev.DownloadArtifact(
        d.DownloadArtifactRequest(digest=digest), metadata=bearer_metadata(credential)
    ):
        out += piece.data
    return bytes(out)


async def test_two_control_planes_sharing_a_blob_dir_serve_each_others_artifacts(
    two_replicas: tuple[ControlPlane, ControlPlane], digits: BuiltModel, tmp_path: Path
) -> None:
    a, b = two_replicas
    assert a.config.blob_dir == b.config.blob_dir == tmp_path / "shared-blobs"
    op_a, channel_a = await classes_and_digits(a, digits)  # pushed to a
    channel_b = grpc.aio.insecure_channel(b.address)
    try:
        # a publishes the artifact (as a's build runner would).
        job = await _claim(a)
        assert await _finish(a, job, digits.model)
        built = await op_a.GetBuild(o.GetBuildRequest(id=job.build_id), metadata=ADMIN)
        # b reads the model a received, for its builds, by path.
        model_digest = hashlib.sha256(digits.model.read_bytes()).hexdigest()
        path = await asyncio.to_thread(b.services.blobs.local_path, b.db, model_digest)
        assert path.read_bytes() == digits.model.read_bytes()

        # A device enrolled on b downloads the artifact a published.
        dev_b = dg.DeviceServiceStub(channel_b)
        token = await op_a.CreateEnrollmentToken(
            o.CreateEnrollmentTokenRequest(name="t"), metadata=ADMIN
        )
        enrolled = await dev_b.Enroll(
            d.EnrollRequest(
                enrollment_token=token.secret, hardware_id="hw-arm",
                hardware=c.HardwareProfile(arch="aarch64"),
            )
        )  # fmt: skip
        data = digits.model.read_bytes()
        assert await _download(dev_b, enrolled.device_credential, built.artifact_digest) == data

        # And the other way round: b receives a push (other bytes: the
        # same would reuse 1.0.0's build), publishes its build, a serves it.
        model = onnx.load(digits.model)
        model.doc_string = "two"
        other = tmp_path / "two.onnx"
        onnx.save(model, other)
        op_b: og.OperatorServiceAsyncStub = og.OperatorServiceStub(channel_b)
        await op_b.PushModel(
            push_requests("digits", "2.0.0", model_parts(model=other)), metadata=ADMIN
        )
        job = await _claim(b)
        assert await _finish(b, job, other)
        built = await op_b.GetBuild(o.GetBuildRequest(id=job.build_id), metadata=ADMIN)
        dev_a = dg.DeviceServiceStub(channel_a)
        got = await _download(dev_a, enrolled.device_credential, built.artifact_digest)
        assert got == other.read_bytes()
    finally:
        await channel_a.close()
        await channel_b.close()


async def _claim(cp: ControlPlane) -> ClaimedJob:
    for _ in range(100):
        job = await asyncio.to_thread(build_service(cp).claim, "runner", 60)
        if job is not None:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError("no build was queued")


async def _finish(cp: ControlPlane, job: ClaimedJob, artifact: Path) -> bool:
    result = fake_result(artifact)
    return await asyncio.to_thread(build_service(cp).finish, job, "runner", result, "")


# ---------------------------------------------------------------- the migration


def test_0016_moves_chunk_bytes_into_the_store_and_drops_the_table(
    db_url: str, tmp_path: Path
) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0015")
    data = os.urandom(2 * 1024 * 1024 + 99)  # three chunks
    digest = hashlib.sha256(data).hexdigest()
    bad = "b" * 64  # chunks that do not hash to their digest
    mib = 1024 * 1024
    with engine.begin() as conn:
        for blob, size in ((digest, len(data)), (bad, 3)):
            conn.execute(
                text(
                    "INSERT INTO blobs (digest, size_bytes, media_type, created_at) VALUES "
                    "(:d, :s, 'application/onnx', '2026-11-22 00:00:00+00')"
                ),
                {"d": blob, "s": size},
            )
        for seq in range(3):
            conn.execute(
                text("INSERT INTO blob_chunks (digest, seq, data) VALUES (:d, :s, :b)"),
                {"d": digest, "s": seq, "b": data[seq * mib : (seq + 1) * mib]},
            )
        conn.execute(
            text("INSERT INTO blob_chunks (digest, seq, data) VALUES (:d, 0, :b)"),
            {"d": bad, "b": b"abc"},
        )
    try:
        # Without the blob directory, a database holding bytes is left as is.
        with pytest.raises(RuntimeError, match="blob store's directory"):
            upgrade(engine)
        assert current_revision(engine) == "0015"
        blobs = tmp_path / "blobs"
        upgrade(engine, "0016", blob_dir=blobs)
        assert current_revision(engine) == "0016"
        assert "blob_chunks" not in inspect(engine).get_table_names()
        assert (blobs / "sha256" / digest[:2] / digest).read_bytes() == data
        assert (blobs / "quarantine" / bad).read_bytes() == b"abc"
        db = Database(engine)
        store = BlobStore(blobs)
        with store.open(db, digest) as blob:
            assert blob.read(0, len(data)) == data
        with pytest.raises(DataLoss):
            store.open(db, bad)
    finally:
        engine.dispose()
