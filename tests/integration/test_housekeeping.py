"""Housekeeping through a real server (issue 22): builds cancelled (queued at
once; running when their runner stops them, a real worker process
included), model versions yanked (refused for new assignments and
rollouts, kept where deployed) and unyanked, and never-deployed versions
deleted with their builds, artifacts and the blobs only they used. On
SQLite and PostgreSQL (`cp`), except the real worker (SQLite)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import onnx
import pytest
from alembic import command
from click.testing import CliRunner
from sqlalchemy import func, inspect, select, text

from edgefleet.controlplane.build.types import BuildCancelled, BuildJob, BuildTarget
from edgefleet.controlplane.build.worker import read_progress, request_cancel, run_job
from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.client.stages import parse_stage
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.db.engine import alembic_config, make_engine, upgrade
from edgefleet.controlplane.db.models import (
    ArtifactRow,
    BlobRow,
    BuildRow,
    ModelVersionRow,
)
from edgefleet.controlplane.server import ControlPlane, create_server
from edgefleet.controlplane.services.builds import Lease
from edgefleet.demo.models import BuiltModel
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import build_service, classes_and_digits, fake_result, publish_one_build
from testkit.harness import ADMIN_TOKEN
from testkit.models import model_parts, push_requests
from testkit.rpc import ADMIN, enroll, status_of


async def _error(call: Any) -> tuple[grpc.StatusCode, str]:
    return await status_of(call)


async def _audit(op: og.OperatorServiceAsyncStub, action: str) -> list[o.AuditEntry]:
    listed = await op.ListAuditLog(o.ListAuditLogRequest(action=action), metadata=ADMIN)
    return list(listed.entries)


# ---------------------------------------------------------------- cancel


async def test_cancel_a_queued_build_at_once_and_refuse_a_finished_one(
    cp: ControlPlane, digits: BuiltModel
) -> None:
    op, channel = await classes_and_digits(cp, digits)
    try:
        listed = (await op.ListBuilds(o.ListBuildsRequest(), metadata=ADMIN)).builds
        arm = next(b for b in listed if b.class_name == "arm")
        # The server takes the short id `builds ls` shows.
        cancelled = await op.CancelBuild(o.CancelBuildRequest(id=arm.id[:8]), metadata=ADMIN)
        assert cancelled.id == arm.id and cancelled.state == o.BUILD_STATE_CANCELLED
        by = cancelled.cancelled_by
        assert by and cancelled.error == f"cancelled by {by}"
        # Never claimed: the twin is the only job left.
        builds = build_service(cp)
        job = await asyncio.to_thread(builds.claim, "runner", 60)
        assert job is not None and job.build_id != arm.id
        assert await asyncio.to_thread(builds.claim, "runner", 60) is None
        assert await asyncio.to_thread(builds.finish, job, "runner", fake_result(digits.model), "")

        code, details = await _error(op.CancelBuild(o.CancelBuildRequest(id=job.build_id),
                                                    metadata=ADMIN))  # fmt: skip
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "already succeeded" in details and "arm-twin" in details
        code, details = await _error(op.CancelBuild(o.CancelBuildRequest(id=arm.id),
                                                    metadata=ADMIN))  # fmt: skip
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"already cancelled by {cancelled.cancelled_by}" in details
        # Asking for the class's build again queues a new one.
        again = await op.RunBuild(
            o.RunBuildRequest(model_name="digits", model_version="1.0.0", class_name="arm"),
            metadata=ADMIN,
        )
        assert again.builds[0].id != arm.id
        assert again.builds[0].state in (o.BUILD_STATE_QUEUED, o.BUILD_STATE_SUCCEEDED)
        shown = await op.ListBuilds(
            o.ListBuildsRequest(state=o.BUILD_STATE_CANCELLED), metadata=ADMIN
        )
        assert [b.id for b in shown.builds] == [arm.id]
        (entry,) = await _audit(op, "build.cancel")
        assert entry.target == "model:digits@1.0.0" and arm.id in entry.details
        assert entry.actor == cancelled.cancelled_by
    finally:
        await channel.close()


async def test_a_running_build_is_cancelled_by_its_runner_or_by_the_next_claim(
    cp: ControlPlane, digits: BuiltModel
) -> None:
    """The runner's side of the protocol, played by the test: a cancel is
    requested while it runs, the runner learns it at its renewal and ends it
    CANCELLED; a runner that died meanwhile leaves it to the next claim."""
    op, channel = await classes_and_digits(cp, digits)
    builds = build_service(cp)
    try:
        job = await asyncio.to_thread(builds.claim, "runner", 60)
        assert job is not None
        asked = await op.CancelBuild(o.CancelBuildRequest(id=job.build_id), metadata=ADMIN)
        assert asked.state == o.BUILD_STATE_RUNNING and asked.cancelled_by
        # Asking again changes nothing (one audit entry).
        again = await op.CancelBuild(o.CancelBuildRequest(id=job.build_id), metadata=ADMIN)
        assert again.state == o.BUILD_STATE_RUNNING
        lease = await asyncio.to_thread(builds.renew, job.build_id, "runner", 60, 0.3, "rung 1")
        assert lease == Lease.CANCELLED
        await asyncio.to_thread(builds.cancelled, job, "runner", "rung 1")
        done = await op.GetBuild(o.GetBuildRequest(id=job.build_id), metadata=ADMIN)
        assert done.state == o.BUILD_STATE_CANCELLED and done.log == "rung 1"
        assert done.cancelled_by == asked.cancelled_by and done.finished_at.seconds

        # The twin: its runner's lease lapses after the cancel was asked.
        twin = await asyncio.to_thread(builds.claim, "dying-runner", 60)
        assert twin is not None and twin.build_id != job.build_id
        asked = await op.CancelBuild(o.CancelBuildRequest(id=twin.build_id), metadata=ADMIN)
        assert asked.state == o.BUILD_STATE_RUNNING
        # Its last renewal set a lease already over, and then it died (a
        # lease in the past, not a short one slept through: a slow machine
        # took 0.5 s between the claim and the cancel and it lapsed first).
        lapsed = await asyncio.to_thread(builds.renew, twin.build_id, "dying-runner", -1, 0.1, "")
        assert lapsed == Lease.CANCELLED
        assert await asyncio.to_thread(builds.claim, "live-runner", 60) is None
        done = await op.GetBuild(o.GetBuildRequest(id=twin.build_id), metadata=ADMIN)
        assert done.state == o.BUILD_STATE_CANCELLED
        # A result that arrives after the cancel is dropped: still cancelled.
        assert not await asyncio.to_thread(
            builds.finish, twin, "dying-runner", fake_result(digits.model), ""
        )
        assert len(await _audit(op, "build.cancel")) == 2
    finally:
        await channel.close()


@pytest.fixture
async def building(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    """An in-process control plane on SQLite with one real build worker."""
    server = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN,
            build_workers=1, build_lease_s=2.0,
        )
    )  # fmt: skip
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


@pytest.mark.timeout(300)
async def test_cancel_stops_a_build_running_in_a_worker_process(
    building: ControlPlane, digits: BuiltModel
) -> None:
    """A real build in the runner's worker process: cancelled once it runs,
    it stops before judging its candidates and ends CANCELLED. (Not timed
    to a rung: the cancel lands wherever the worker is; any step stops it.)"""
    async with grpc.aio.insecure_channel(building.address) as channel:
        op = og.OperatorServiceStub(channel)
        await op.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name="cpu", constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME)
            ),
            metadata=ADMIN,
        )
        parts = model_parts(model=digits.model, sample_data=digits.sample_data)
        await op.PushModel(push_requests("digits", "1.0.0", parts), metadata=ADMIN)
        running = None
        for _ in range(1200):
            listed = (await op.ListBuilds(o.ListBuildsRequest(), metadata=ADMIN)).builds
            if listed and listed[0].state == o.BUILD_STATE_RUNNING:
                running = listed[0]
                break
            assert not listed or listed[0].state == o.BUILD_STATE_QUEUED, listed[0]
            await asyncio.sleep(0.02)
        assert running is not None, "the build never started"
        asked = await op.CancelBuild(o.CancelBuildRequest(id=running.id), metadata=ADMIN)
        assert asked.cancelled_by
        for _ in range(600):
            done = await op.GetBuild(o.GetBuildRequest(id=running.id), metadata=ADMIN)
            if done.state != o.BUILD_STATE_RUNNING:
                break
            await asyncio.sleep(0.05)
        assert done.state == o.BUILD_STATE_CANCELLED, done.error
        assert done.cancelled_by == asked.cancelled_by and not done.candidates
        assert "judging the candidates" not in done.log
        # The worker is free again: a new build of the class runs to the end.
        again = await op.RunBuild(
            o.RunBuildRequest(model_name="digits", model_version="1.0.0"), metadata=ADMIN
        )
        for _ in range(1200):
            final = await op.GetBuild(o.GetBuildRequest(id=again.builds[0].id), metadata=ADMIN)
            if final.state in (o.BUILD_STATE_SUCCEEDED, o.BUILD_STATE_FAILED):
                break
            await asyncio.sleep(0.1)
        assert final.state == o.BUILD_STATE_SUCCEEDED, final.error


# ---------------------------------------------------------------- yank


def _rollout(version: str = "1.0.0") -> o.CreateRolloutRequest:
    return o.CreateRolloutRequest(
        spec=o.RolloutSpec(
            model_name="digits", model_version=version, class_names=["arm"],
            stages=[parse_stage("100%")],
        ),
    )  # fmt: skip


async def test_a_yanked_version_is_refused_for_new_assignments_and_rollouts_and_kept_where_deployed(
    cp: ControlPlane, digits: BuiltModel
) -> None:
    op, channel = await classes_and_digits(cp, digits)
    try:
        await publish_one_build(cp, digits)
        running = (await enroll(channel, op, "hw-1", "aarch64")).device_id
        other = (await enroll(channel, op, "hw-2", "aarch64")).device_id
        await op.AssignModel(
            o.AssignModelRequest(device_ids=[running], model_name="digits", model_version="1.0.0"),
            metadata=ADMIN,
        )
        before = await op.GetDevice(o.GetDeviceRequest(id=running), metadata=ADMIN)

        code, details = await _error(op.YankModelVersion(
            o.YankModelVersionRequest(model_name="digits", version="1.0.0"), metadata=ADMIN
        ))  # fmt: skip
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "why" in details
        yanked = await op.YankModelVersion(
            o.YankModelVersionRequest(
                model_name="digits", version="1.0.0", reason="mislabels sevens"
            ),
            metadata=ADMIN,
        )
        assert yanked.yanked and yanked.yank_reason == "mislabels sevens" and yanked.yanked_by
        assert yanked.yanked_at.seconds and yanked.first_assigned_at.seconds

        # The device running it keeps it: no new desired state.
        after = await op.GetDevice(o.GetDeviceRequest(id=running), metadata=ADMIN)
        assert after.desired_revision == before.desired_revision
        assert [(m.model_name, m.assigned_version) for m in after.models] == [("digits", "1.0.0")]
        # New assignments and rollouts are refused, saying why and what to do.
        for call in (
            op.AssignModel(o.AssignModelRequest(device_ids=[other], model_name="digits",
                                                model_version="1.0.0"), metadata=ADMIN),
            op.CreateRollout(_rollout(), metadata=ADMIN),
        ):  # fmt: skip
            code, details = await _error(call)
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "digits@1.0.0 is yanked (mislabels sevens" in details
            assert "edgefleet models unyank digits@1.0.0" in details
        # Its builds are still listed; the version shows yanked.
        assert (await op.ListBuilds(o.ListBuildsRequest(model_name="digits"),
                                    metadata=ADMIN)).builds  # fmt: skip
        model = await op.GetModel(o.GetModelRequest(name="digits"), metadata=ADMIN)
        assert [v.yanked for v in model.versions] == [True]

        code, details = await _error(op.UnyankModelVersion(
            o.UnyankModelVersionRequest(model_name="digits", version="2.0.0"), metadata=ADMIN
        ))  # fmt: skip
        assert code == grpc.StatusCode.NOT_FOUND
        unyanked = await op.UnyankModelVersion(
            o.UnyankModelVersionRequest(model_name="digits", version="1.0.0", reason="fixed"),
            metadata=ADMIN,
        )
        assert not unyanked.yanked and not unyanked.yank_reason
        assigned = await op.AssignModel(
            o.AssignModelRequest(device_ids=[other], model_name="digits", model_version="1.0.0"),
            metadata=ADMIN,
        )
        assert [a.device_id for a in assigned.assignments] == [other]
        created = await op.CreateRollout(_rollout(), metadata=ADMIN)
        assert created.rollout.id

        (yank,) = await _audit(op, "model.yank")
        (unyank,) = await _audit(op, "model.unyank")
        assert yank.target == unyank.target == "model:digits@1.0.0"
        assert "mislabels sevens" in yank.details and "fixed" in unyank.details
    finally:
        await channel.close()


# ---------------------------------------------------------------- delete


def _variant(digits: BuiltModel, tmp_path: Path, tag: str) -> Path:
    """The digits model with other bytes (its doc string)."""
    model = onnx.load(digits.model)
    model.doc_string = tag
    path = tmp_path / f"{tag}.onnx"
    onnx.save(model, path)
    return path


async def _push(op: og.OperatorServiceAsyncStub, version: str, model: Path, **parts: Path) -> None:
    await op.PushModel(
        push_requests("digits", version, model_parts(model=model, **parts)), metadata=ADMIN
    )


async def _answer_builds(cp: ControlPlane, artifacts: dict[str, Path]) -> None:
    """Finish every queued build with its model's own file (by digest)."""
    builds = build_service(cp)
    for _ in range(200):
        job = await asyncio.to_thread(builds.claim, "runner", 60)
        if job is None:
            return
        result = fake_result(artifacts[job.model_digest])
        assert await asyncio.to_thread(builds.finish, job, "runner", result, "")
    raise AssertionError("builds kept coming")


def _count(cp: ControlPlane, stmt: Any) -> int:
    with cp.db.unit_of_work(readonly=True) as uow:
        return int(uow.session.scalar(stmt) or 0)


async def test_delete_a_never_deployed_version_and_refuse_a_deployed_one(
    cp: ControlPlane, digits: BuiltModel, tmp_path: Path
) -> None:
    op, channel = await classes_and_digits(cp, digits)
    try:
        # 1.0.0 (queued by classes_and_digits) and 2.0.0 share their bytes:
        # 2.0.0's builds reuse 1.0.0's result. 3.0.0 has bytes of its own.
        own = _variant(digits, tmp_path, "three")
        own_digest = hashlib.sha256(own.read_bytes()).hexdigest()
        shared_digest = hashlib.sha256(digits.model.read_bytes()).hexdigest()
        await _answer_builds(cp, {shared_digest: digits.model})
        await _push(op, "2.0.0", digits.model, sample_data=digits.sample_data)
        await _push(op, "3.0.0", own)
        for _ in range(100):
            listed = (await op.ListBuilds(o.ListBuildsRequest(), metadata=ADMIN)).builds
            if len(listed) == 6:
                break
            await asyncio.sleep(0.05)
        await _answer_builds(cp, {shared_digest: digits.model, own_digest: own})
        cached = cp.config.blob_dir / "sha256" / own_digest[:2] / own_digest
        assert cached.exists()

        # 3.0.0: its model blob (and artifact: the same bytes) only it uses.
        deleted = await op.DeleteModelVersion(
            o.DeleteModelVersionRequest(model_name="digits", version="3.0.0", reason="typo"),
            metadata=ADMIN,
        )
        assert (deleted.builds_deleted, deleted.artifacts_deleted, deleted.blobs_deleted) == (
            2, 2, 1,
        )  # fmt: skip
        assert deleted.bytes_freed == own.stat().st_size
        assert _count(cp, select(func.count()).where(BlobRow.digest == own_digest)) == 0
        assert not cached.exists()
        code, _ = await _error(op.GetModelVersion(
            o.GetModelVersionRequest(model_name="digits", version="3.0.0"), metadata=ADMIN
        ))  # fmt: skip
        assert code == grpc.StatusCode.NOT_FOUND

        # 1.0.0: the blobs stay (2.0.0 uses them); 2.0.0's builds reused
        # 1.0.0's, and still publish for a new class with that profile.
        first_builds = [b.id for b in listed if b.model_version == "1.0.0"]
        deleted = await op.DeleteModelVersion(
            o.DeleteModelVersionRequest(model_name="digits", version="1.0.0"), metadata=ADMIN
        )
        assert (deleted.builds_deleted, deleted.artifacts_deleted, deleted.blobs_deleted) == (
            2, 2, 0,
        )  # fmt: skip
        assert _count(cp, select(func.count()).where(BuildRow.id.in_(first_builds))) == 0
        assert _count(cp, select(func.count()).where(BlobRow.digest == shared_digest)) == 1
        assert _count(cp, select(func.count()).select_from(ArtifactRow)) == 2
        await op.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name="arm-third",
                constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME, max_model_size_mb=1),
            ),
            metadata=ADMIN,
        )
        for _ in range(100):
            third = (await op.ListBuilds(o.ListBuildsRequest(class_name="arm-third"),
                                         metadata=ADMIN)).builds  # fmt: skip
            if third:
                break
            await asyncio.sleep(0.05)
        assert third[0].state == o.BUILD_STATE_SUCCEEDED and third[0].reused_from

        # 2.0.0, deployed: refused, saying where and to yank instead.
        device = (await enroll(channel, op, "hw-1", "aarch64")).device_id
        await op.AssignModel(
            o.AssignModelRequest(device_ids=[device], model_name="digits", model_version="2.0.0"),
            metadata=ADMIN,
        )
        refused = o.DeleteModelVersionRequest(model_name="digits", version="2.0.0")
        code, details = await _error(op.DeleteModelVersion(refused, metadata=ADMIN))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "assigned to 1 device(s): hw-1" in details
        assert "edgefleet models yank digits@2.0.0" in details
        # Unassigned since: still deployed once, still refused.
        await op.UnassignModel(
            o.UnassignModelRequest(device_ids=[device], model_name="digits"), metadata=ADMIN
        )
        code, details = await _error(op.DeleteModelVersion(refused, metadata=ADMIN))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "assigned since" in details

        entries = await _audit(op, "model.delete")
        assert sorted(e.target for e in entries) == ["model:digits@1.0.0", "model:digits@3.0.0"]
    finally:
        await channel.close()


async def test_delete_refuses_a_version_in_a_rollout(cp: ControlPlane, digits: BuiltModel) -> None:
    op, channel = await classes_and_digits(cp, digits)
    try:
        await publish_one_build(cp, digits)
        await enroll(channel, op, "hw-1", "aarch64")
        created = await op.CreateRollout(_rollout(), metadata=ADMIN)
        code, details = await _error(op.DeleteModelVersion(
            o.DeleteModelVersionRequest(model_name="digits", version="1.0.0"), metadata=ADMIN
        ))  # fmt: skip
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"in rollout(s) {created.rollout.id[:12]}" in details
    finally:
        await channel.close()


# ---------------------------------------------------------------- CLI


async def test_cli_cancel_yank_unyank_and_delete(cp: ControlPlane, digits: BuiltModel) -> None:
    op, channel = await classes_and_digits(cp, digits)
    runner = CliRunner(env={"COLUMNS": "200"})

    async def edgefleet(*args: str) -> Any:
        return await asyncio.to_thread(
            runner.invoke, cli, ["--server", cp.address, "--token", ADMIN_TOKEN, *args]
        )

    try:
        listed = (await op.ListBuilds(o.ListBuildsRequest(), metadata=ADMIN)).builds
        result = await edgefleet("builds", "cancel", listed[0].id[:8])
        assert result.exit_code == 0, result.output
        assert f"cancelled build {listed[0].id[:8]}" in result.output
        result = await edgefleet("builds", "cancel", listed[0].id[:8])
        assert result.exit_code == 1 and "already cancelled" in result.output

        result = await edgefleet("models", "yank", "digits@1.0.0", "--reason", "bad sevens")
        assert result.exit_code == 0 and "yanked digits@1.0.0: bad sevens" in result.output
        result = await edgefleet("models", "show", "digits", "1.0.0")
        assert "bad sevens" in result.output and "never" in result.output
        result = await edgefleet("models", "show", "digits")
        assert "1.0.0 (yanked)" in result.output
        result = await edgefleet("models", "ls")
        assert "1 (1 yanked)" in result.output
        result = await edgefleet("models", "unyank", "digits@1.0.0")
        assert result.exit_code == 0 and "unyanked" in result.output

        # No terminal to ask on: refused without --yes.
        result = await edgefleet("models", "delete", "digits@1.0.0")
        assert result.exit_code == 1 and "add --yes" in result.output
        result = await edgefleet("models", "delete", "digits@1.0.0", "--yes", "--json")
        assert result.exit_code == 0, result.output
        assert '"builds_deleted": 2' in result.output and '"blobs_deleted": 2' in result.output
    finally:
        await channel.close()


def test_a_worker_asked_to_cancel_stops_at_its_next_step(
    digits: BuiltModel, tmp_path: Path
) -> None:
    """The worker's side, in this process: a job whose workdir holds the
    runner's cancel request raises BuildCancelled (not an Exception, which
    the ladders would take for one rung's failure) at its first step."""
    workdir = tmp_path / "job"
    request_cancel(workdir)
    job = BuildJob(digits.model, digits.sample_data, BuildTarget("cpu", "onnxruntime"), workdir)
    with pytest.raises(BuildCancelled):
        run_job(job)
    assert not issubclass(BuildCancelled, Exception)
    assert read_progress(workdir) == (0.0, [])


def test_0015_marks_versions_deployed_before_it_and_goes_down(db_url: str, tmp_path: Path) -> None:
    """Versions deployed before 0015 (a device reported one; its assignment
    since replaced) are marked deployed, so they cannot be deleted."""
    engine = make_engine(db_url)
    upgrade(engine, "0014")
    digest = "a" * 64
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO blobs (digest, size_bytes, media_type, created_at)"
            f" VALUES ('{digest}', 1, 'application/onnx', '2026-11-22 00:00:00+00')"
        ))  # fmt: skip
        conn.execute(text(
            "INSERT INTO models (id, name, description, created_at)"
            " VALUES ('m', 'digits', '', '2026-11-22 00:00:00+00')"
        ))  # fmt: skip
        for version in ("1.0.0", "2.0.0"):
            conn.execute(text(
                "INSERT INTO model_versions (id, model_id, version, version_sort, description,"
                " model_digest, size_bytes, inputs, outputs, opset, producer, sample_size_bytes,"
                " sample_count, sample_has_labels, labels_count, created_at, created_by) VALUES"
                f" ('v{version[0]}', 'm', '{version}', '{version}', '', '{digest}', 1, '[]', '[]',"
                " 17, '', 0, 0, false, 0, '2026-11-22 00:00:00+00', 'admin')"
            ))  # fmt: skip
        conn.execute(text(
            "INSERT INTO devices (id, hardware_id, name, state, labels, hardware, runtime,"
            " class_pinned, credential_hash, enrolled_at, desired_revision, applied_revision,"
            " update_status, state_reason, assignment_seq) VALUES ('d', 'hw', 'd', 'accepted',"
            " '{}', '{}', '{}', false, 'x', '2026-11-22 00:00:00+00', 1, 0, '{}', '', 0)"
        ))  # fmt: skip
        conn.execute(text(
            "INSERT INTO deployment_events (device_id, sequence, model_name, model_version,"
            " artifact_digest, state, reason, bytes_done, bytes_total, at) VALUES ('d', 1,"
            f" 'digits', '1.0.0', '{digest}', 'committed', '', 0, 0, '2026-11-23 10:00:00+00')"
        ))  # fmt: skip
    upgrade(engine)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(ModelVersionRow.version, ModelVersionRow.first_assigned_at)
            ).all()
            marked = {version: at for version, at in rows}
        assert marked == {"1.0.0": dt.datetime(2026, 11, 23, 10, tzinfo=dt.UTC), "2.0.0": None}
        config = alembic_config()
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            # Through 0016, which puts blob bytes back from the blob directory.
            config.attributes["blob_dir"] = tmp_path
            command.downgrade(config, "0014")
        columns = {c["name"] for c in inspect(engine).get_columns("model_versions")}
        assert not columns & {"yanked_at", "yanked_by", "yank_reason", "first_assigned_at"}
        assert "cancelled_by" not in {c["name"] for c in inspect(engine).get_columns("builds")}
        upgrade(engine)
    finally:
        engine.dispose()
