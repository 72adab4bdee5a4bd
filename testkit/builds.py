"""Builds answered by hand, for tests about what comes after a build: the
result a build worker would return (over a real file), claiming and finishing
queued builds of an in-process control plane (its runner disabled), the
device classes and pushed digits model most of those tests start from, and
digits versions published on a control plane in another process through
its database."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import platform
import threading
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import onnx

from edgefleet.controlplane.build.types import (
    BuildResult,
    Candidate,
    Evaluated,
    Golden,
    Measurement,
)
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.server import ControlPlane
from edgefleet.controlplane.services.blobs import BlobStore
from edgefleet.controlplane.services.builds import BuildService
from edgefleet.demo.models import BuiltModel, build_digits_classifier
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.models import model_parts, push_model, push_requests
from testkit.rpc import ADMIN


def fake_result(artifact: Path) -> BuildResult:
    """What a build worker returns, over a real file: int8-dynamic chosen,
    fp32-opt failed on size."""
    versions = {"onnxruntime": "1.17"}
    int8 = Candidate("int8-dynamic", "onnxruntime", "int8", artifact, min_runtime_versions=versions)
    fp32 = dataclasses.replace(int8, name="fp32-opt", precision="fp32")
    measured = Measurement(
        size_bytes=artifact.stat().st_size,
        latency_p50_ms=0.01,
        latency_p95_ms=0.02,
        peak_memory_mb=1.0,
        max_abs_diff=0.01,
        agreement=1.0,
        accuracy=0.97,
    )
    too_big = ("size 2.00 MB > max 1.00 MB (+100%)",)
    return BuildResult(
        candidates=(
            Evaluated(fp32, measured, passed=False, reasons=too_big),
            Evaluated(int8, measured, passed=True, chosen=True),
        ),
        reference_accuracy=0.97,
        log=("built",),
        golden=Golden(samples=(), atol=1e-3, rtol=1e-3, min_agreement=0.99),
    )


def one_candidate_result(artifact: Path, log: str) -> BuildResult:
    """What a build worker returns when its one candidate (fp32, over the
    real file `artifact`) passed: for setups that need an artifact, not a
    build."""
    chosen = Candidate(
        "fp32", "onnxruntime", "fp32", artifact, min_runtime_versions={"onnxruntime": "1.17"}
    )
    measured = Measurement(
        size_bytes=artifact.stat().st_size,
        latency_p50_ms=0.01,
        latency_p95_ms=0.02,
        peak_memory_mb=1.0,
        agreement=1.0,
    )
    return BuildResult(
        candidates=(Evaluated(chosen, measured, passed=True, chosen=True),),
        reference_accuracy=None,
        log=(log,),
        golden=Golden(samples=(), atol=1e-3, rtol=1e-3, min_agreement=0.99),
    )


def build_service(cp: ControlPlane) -> BuildService:
    assert cp.builds is not None
    return cp.builds


async def classes_and_digits(
    cp: ControlPlane, digits: BuiltModel
) -> tuple[og.OperatorServiceAsyncStub, grpc.aio.Channel]:
    """Classes "arm" and "arm-twin" (aarch64, ONNX Runtime, 1 MB at most;
    "arm" first) and digits 1.0.0 pushed, its two builds queued; the
    operator stub and its channel (the caller closes it)."""
    channel = grpc.aio.insecure_channel(cp.address)
    op: og.OperatorServiceAsyncStub = og.OperatorServiceStub(channel)
    for name, arch in (("arm", "aarch64"), ("arm-twin", "aarch64")):
        await op.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name=name,
                priority=1 if name == "arm" else 0,
                constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME, max_model_size_mb=1),
                match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=[arch])],
            ),
            metadata=ADMIN,
        )
    parts = model_parts(model=digits.model, sample_data=digits.sample_data)
    await op.PushModel(push_requests("digits", "1.0.0", parts), metadata=ADMIN)
    # The push queues one build per class, asynchronously.
    for _ in range(100):
        listed = await op.ListBuilds(o.ListBuildsRequest(), metadata=ADMIN)
        if len(listed.builds) == 2:
            break
        await asyncio.sleep(0.05)
    return op, channel


async def publish_one_build(cp: ControlPlane, digits: BuiltModel) -> None:
    """Claim one queued build and finish it with fake_result over the digits model."""
    builds = build_service(cp)
    job = await asyncio.to_thread(builds.claim, "runner", 60)
    assert job is not None
    assert await asyncio.to_thread(builds.finish, job, "runner", fake_result(digits.model), "")


async def finish_builds_by_hand(
    cp: ControlPlane, op: og.OperatorServiceAsyncStub, artifact: Path, count: int
) -> None:
    """Answer every queued build job with a hand-made result over `artifact`
    until `count` builds succeeded (for tests about what comes after builds)."""
    builds = build_service(cp)
    for _ in range(400):
        job = await asyncio.to_thread(builds.claim, "test", 60)
        if job is not None:
            await asyncio.to_thread(builds.finish, job, "test", fake_result(artifact), "")
            continue
        listed = (await op.ListBuilds(o.ListBuildsRequest(), metadata=ADMIN)).builds
        if len(listed) == count and all(b.state == o.BUILD_STATE_SUCCEEDED for b in listed):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} builds did not succeed")


# The model and class publish_digits_versions makes.
DIGITS = "digits"
CPU_CLASS = "cpu"


def publish_digits_versions(
    op: Any,
    db: Database,
    root: Path,
    versions: tuple[str, ...] = ("1.0.0", "2.0.0", "3.0.0"),
    *,
    blob_dir: Path,
) -> dict[str, str]:
    """For a control plane in another process, `db` its database and
    `blob_dir` its blob directory: the class
    "cpu" (this machine's arch and label tier=cpu) and "digits" at every one
    of `versions` (one trained digits classifier, each version's file
    differing by its doc string), their builds answered with the files
    themselves; the artifact digest of each version. `op` is a blocking stub."""
    op.CreateDeviceClass(o.CreateDeviceClassRequest(
        name=CPU_CLASS, constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME),
        match_rules=[
            c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=[platform.machine()]),
            c.MatchRule(field="label.tier", op=c.MATCH_OP_EQ, values=[CPU_CLASS]),
        ],
    ))  # fmt: skip
    built = build_digits_classifier(root / "model")
    files: dict[str, Path] = {}
    for version in versions:
        model = onnx.load(built.model)
        model.doc_string = f"digits {version}"
        path = root / f"model-{version}.onnx"
        onnx.save(model, path)
        files[hashlib.sha256(path.read_bytes()).hexdigest()] = path
        push_model(op, DIGITS, version, model_parts(model=path, sample_data=built.sample_data))
    answer_builds(db, blob_dir, files, op)
    return {b.model_version: b.artifact_digest
            for b in op.ListBuilds(o.ListBuildsRequest()).builds}  # fmt: skip


class _NoEvents:
    def publish(self, event: object) -> None:
        pass


def answer_builds(db: Database, blob_dir: Path, files: dict[str, Path], op: Any) -> None:
    """Answer the queued builds (of a control plane without build workers;
    `db` its database, `blob_dir` its blob directory, where the artifacts
    are published) with the pushed model itself: `files` maps each pushed
    file's digest to it, one class, so one build per file."""
    builds = BuildService(db, BlobStore(blob_dir), _NoEvents())
    for _ in range(400):
        job = builds.claim("test", 60)
        if job is not None:
            assert builds.finish(job, "test", fake_result(files[job.model_digest]), "")
            continue
        listed = op.ListBuilds(o.ListBuildsRequest()).builds
        if len(listed) == len(files) and all(b.state == o.BUILD_STATE_SUCCEEDED for b in listed):
            return
        threading.Event().wait(0.05)
    raise AssertionError("builds did not succeed")
