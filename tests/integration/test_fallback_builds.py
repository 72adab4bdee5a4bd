"""Classes that ask for a lighter fallback artifact (issue 20, item 5),
through a real server and real builds: the ONNX Runtime ladder built and
measured on a digits MLP, the fallback chosen, published signed inside the
primary's manifest, reproducing its own golden samples in ONNX Runtime, and
downloadable exactly by the devices that may download its primary.

The MLP is wider than the demo's (64 hidden units, not 32) so that its weights
dominate the files: every int8 candidate is then smaller than fp16, and
fp16 smaller than fp32, whatever the quantization nodes add. Each profile is
built once per module (the build does not depend on the database); the
server, its database and the publishing are per test."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import onnxruntime as ort
import pytest
from sqlalchemy import select

from edgefleet.agent.serving import decode_tensor
from edgefleet.controlplane.build.pipeline import run_build
from edgefleet.controlplane.build.types import BuildResult, BuildTarget
from edgefleet.controlplane.cli import render
from edgefleet.controlplane.db.models import DeviceClassRow, ModelVersionRow
from edgefleet.controlplane.domain import signing
from edgefleet.controlplane.errors import PermissionDenied
from edgefleet.controlplane.server import ControlPlane
from edgefleet.controlplane.services.deployments import _class_artifact
from edgefleet.demo.models import BuiltModel, build_digits_classifier
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import build_service
from testkit.cli import NOW, text_of
from testkit.models import model_parts, push_requests
from testkit.rpc import ADMIN

Builder = Callable[[BuildTarget], BuildResult]


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> BuiltModel:
    return build_digits_classifier(tmp_path_factory.mktemp("wide"), hidden=64)


@pytest.fixture(scope="module")
def builder(wide: BuiltModel, tmp_path_factory: pytest.TempPathFactory) -> Builder:
    """Real builds of `wide`, one per profile (the class name only names the
    class in the log), their candidate files kept for the module."""
    root = tmp_path_factory.mktemp("builds")
    done: dict[BuildTarget, BuildResult] = {}

    def build(target: BuildTarget) -> BuildResult:
        profile = dataclasses.replace(target, class_name="")
        if profile not in done:
            workdir = root / f"build-{len(done)}"
            done[profile] = run_build(
                wide.model, wide.sample_data, target, workdir, lambda _f, _m: None
            )
        return done[profile]

    return build


def profile(
    quantization: c.Quantization.ValueType, fallback: c.Quantization.ValueType | None
) -> c.ConstraintProfile:
    return c.ConstraintProfile(
        runtime=c.RUNTIME_ONNXRUNTIME, quantization=quantization, fallback=fallback
    )


async def setup(
    cp: ControlPlane, wide: BuiltModel, classes: dict[str, tuple[str, c.ConstraintProfile]]
) -> tuple[og.OperatorServiceAsyncStub, grpc.aio.Channel]:
    """`classes` (name -> the arch its devices have, its constraints) and
    wide@1.0.0 pushed; the operator stub and its channel (the caller closes it)."""
    channel = grpc.aio.insecure_channel(cp.address)
    op: og.OperatorServiceAsyncStub = og.OperatorServiceStub(channel)
    for name, (arch, constraints) in classes.items():
        await op.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name=name,
                constraints=constraints,
                match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=[arch])],
            ),
            metadata=ADMIN,
        )
    await push(op, wide, "wide", "1.0.0")
    return op, channel


async def push(op: og.OperatorServiceAsyncStub, wide: BuiltModel, name: str, version: str) -> None:
    parts = model_parts(model=wide.model, sample_data=wide.sample_data)
    await op.PushModel(push_requests(name, version, parts), metadata=ADMIN)


async def finish_builds(
    cp: ControlPlane, op: og.OperatorServiceAsyncStub, builder: Builder, count: int
) -> dict[str, o.Build]:
    """Run every queued build for real until `count` builds finished; the
    builds by class name (of model wide)."""
    builds = build_service(cp)
    finished = {o.BUILD_STATE_SUCCEEDED, o.BUILD_STATE_FAILED}
    for _ in range(400):
        job = await asyncio.to_thread(builds.claim, "test", 60)
        if job is not None:
            result = await asyncio.to_thread(builder, job.target)
            log = "\n".join(result.log)
            assert await asyncio.to_thread(builds.finish, job, "test", result, log)
            continue
        listed = (await op.ListBuilds(o.ListBuildsRequest(), metadata=ADMIN)).builds
        if len(listed) == count and all(b.state in finished for b in listed):
            return {b.class_name: b for b in listed if b.model_name == "wide"}
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} builds did not finish")


async def signing_keys(
    channel: grpc.aio.Channel, op: og.OperatorServiceAsyncStub
) -> dict[str, bytes]:
    token = await op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="k"), metadata=ADMIN)
    enrolled = await dg.DeviceServiceStub(channel).Enroll(
        d.EnrollRequest(enrollment_token=token.secret, hardware_id="hw-keys")
    )
    return {k.key_id: k.public_key for k in enrolled.signing_keys}


def squash(text: str) -> str:
    return " ".join(text.split())


def fallback_of(build: o.Build) -> o.BuildCandidate:
    (fallback,) = [cand for cand in build.candidates if cand.fallback]
    return fallback


def chosen_of(build: o.Build) -> o.BuildCandidate:
    (chosen,) = [cand for cand in build.candidates if cand.chosen]
    return chosen


def reproduce(path: Path, manifest: c.ArtifactManifest) -> None:
    """Run every golden sample of `manifest` on the artifact at `path` in
    ONNX Runtime: each output within atol + rtol x |expected|, argmax
    agreement at least min_agreement (the agent's validation rule)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    agreed = 0
    assert manifest.golden
    for sample in manifest.golden:
        feeds = {
            t.name: decode_tensor(t.name, t.dtype, list(t.shape), t.data) for t in sample.inputs
        }
        names = [t.name for t in sample.expected_outputs]
        outputs = session.run(names, feeds)
        for t, got in zip(sample.expected_outputs, outputs, strict=True):
            want = decode_tensor(t.name, t.dtype, list(t.shape), t.data)
            got = np.asarray(got).reshape(want.shape)
            assert np.all(np.abs(got - want) <= manifest.atol + manifest.rtol * np.abs(want))
        first = sample.expected_outputs[0]
        want = decode_tensor(first.name, first.dtype, list(first.shape), first.data)
        agreed += int(np.argmax(outputs[0]) == np.argmax(want))
    assert agreed / len(manifest.golden) >= manifest.min_agreement


async def test_an_int8_fallback_is_published_signed_inside_the_primary_and_reproduces(
    cp: ControlPlane, wide: BuiltModel, builder: Builder, tmp_path: Path
) -> None:
    op, channel = await setup(
        cp, wide, {
            "hot": ("aarch64", profile(c.QUANTIZATION_FP32, c.QUANTIZATION_INT8)),
            "plain": ("x86_64", profile(c.QUANTIZATION_FP32, None)),
        },
    )  # fmt: skip
    try:
        builds = await finish_builds(cp, op, builder, count=2)
        hot = builds["hot"]
        assert hot.state == o.BUILD_STATE_SUCCEEDED and hot.fallback_reason == ""
        chosen, fallback = chosen_of(hot), fallback_of(hot)
        assert chosen.name == "fp32-opt" and not fallback.chosen and fallback.passed
        assert fallback.quantization == c.QUANTIZATION_INT8
        assert fallback.size_bytes < chosen.size_bytes
        # The fastest of the int8 candidates that pass and are lighter.
        pool = [
            cand for cand in hot.candidates
            if cand.quantization == c.QUANTIZATION_INT8 and cand.passed
            and cand.size_bytes < chosen.size_bytes
        ]  # fmt: skip
        assert fallback.latency_p95_ms == min(cand.latency_p95_ms for cand in pool)
        assert hot.fallback_digest and hot.fallback_size == fallback.size_bytes
        assert f"fallback: {fallback.name}, {fallback.size_bytes:,} bytes" in hot.log
        # A class that asks for none gets none, and no reason.
        plain = builds["plain"]
        assert not any(cand.fallback for cand in plain.candidates)
        assert (plain.fallback_digest, plain.fallback_reason) == ("", "")

        (artifact,) = (
            await op.ListArtifacts(o.ListArtifactsRequest(class_name="hot"), metadata=ADMIN)
        ).artifacts
        assert artifact.fallback_digest == hot.fallback_digest
        # The fallback's digest finds the artifact that ships it.
        owner = await op.GetArtifact(
            o.GetArtifactRequest(digest=hot.fallback_digest), metadata=ADMIN
        )
        assert (owner.digest, owner.fallback_digest) == (artifact.digest, hot.fallback_digest)
        keys = await signing_keys(channel, op)
        signed = artifact.signed_manifest
        assert signing.verify(keys[signed.key_id], signed.manifest, signed.signature)
        outer = c.ArtifactManifest.FromString(signed.manifest)
        nested = c.ArtifactManifest.FromString(outer.fallback_manifest)
        # What it is for is the primary's; what it is, its own.
        for field in ("model_name", "model_version", "class_name", "build_id", "created_at",
                      "runtime", "inputs", "outputs", "latency_budget_p95_ms", "max_memory_mb",
                      "threads"):  # fmt: skip
            assert getattr(nested, field) == getattr(outer, field), field
        assert (nested.model_name, nested.model_version, nested.class_name) == (
            "wide", "1.0.0", "hot",
        )  # fmt: skip
        assert nested.build_id == hot.id
        assert (nested.candidate, nested.precision) == (fallback.name, c.QUANTIZATION_INT8)
        assert nested.sha256 == hot.fallback_digest != outer.sha256
        assert nested.memory_mb == fallback.peak_memory_mb
        assert nested.rtol > outer.rtol  # int8's tolerances, not fp32's
        assert not nested.fallback_manifest
        # Changing the nested manifest breaks the outer signature.
        nested.atol *= 10
        outer.fallback_manifest = nested.SerializeToString(deterministic=True)
        tampered = outer.SerializeToString(deterministic=True)
        assert not signing.verify(keys[signed.key_id], tampered, signed.signature)

        # A device of the class may download the fallback; its bytes are
        # what the nested manifest signs, and reproduce its golden samples.
        dev = dg.DeviceServiceStub(channel)
        token = await op.CreateEnrollmentToken(
            o.CreateEnrollmentTokenRequest(name="t"), metadata=ADMIN
        )

        async def enroll(hw_id: str, arch: str) -> str:
            resp = await dev.Enroll(d.EnrollRequest(
                enrollment_token=token.secret, hardware_id=hw_id,
                hardware=c.HardwareProfile(arch=arch),
            ))  # fmt: skip
            return resp.device_id

        hot_device, plain_device = (
            await enroll("hw-hot", "aarch64"),
            await enroll("hw-pl", "x86_64"),
        )
        artifacts = cp.services.artifacts
        blob = await asyncio.to_thread(artifacts.open_for_device, hot_device, hot.fallback_digest)
        try:
            data = blob.read(0, blob.size)
        finally:
            blob.close()
        assert len(data) == nested.size_bytes == hot.fallback_size
        assert hashlib.sha256(data).hexdigest() == nested.sha256
        fallback_file = tmp_path / "fallback.onnx"
        fallback_file.write_bytes(data)
        reproduce(fallback_file, nested)
        # The primary still is the class's too; another class's device may
        # have neither (its class built fp32-opt with no fallback).
        (
            await asyncio.to_thread(artifacts.open_for_device, hot_device, hot.artifact_digest)
        ).close()
        with pytest.raises(PermissionDenied):
            await asyncio.to_thread(artifacts.open_for_device, plain_device, hot.fallback_digest)

        # What operators see: the candidates table marks it, a line names it,
        # `artifacts show` gives its digest.
        shown = await op.GetBuild(o.GetBuildRequest(id=hot.id), metadata=ADMIN)
        detail = text_of(render.build_detail(shown, NOW))
        assert f"fallback {fallback.name} as {hot.fallback_digest} (" in squash(detail)
        # The candidates table's row (the fidelity-by-output table below it
        # starts its rows with the candidate's name too).
        row = next(line for line in detail.splitlines() if line.startswith(fallback.name + " "))
        assert squash(row).endswith(" fallback -")
        report = squash(text_of(render.build_report([shown])))
        assert f"fallback {fallback.name} as {hot.fallback_digest[:12]}" in report
        shown_artifact = squash(text_of(render.artifact_detail(artifact)))
        assert f"fallback {hot.fallback_digest} {fallback.name}, int8, " in shown_artifact
    finally:
        await channel.close(None)


async def test_an_auto_fallback_is_the_fastest_lighter_candidate_of_any_precision(
    cp: ControlPlane, wide: BuiltModel, builder: Builder
) -> None:
    op, channel = await setup(
        cp, wide, {"auto": ("aarch64", profile(c.QUANTIZATION_FP32, c.QUANTIZATION_AUTO))}
    )
    try:
        build = (await finish_builds(cp, op, builder, count=1))["auto"]
        chosen, fallback = chosen_of(build), fallback_of(build)
        pool = [
            cand for cand in build.candidates
            if cand.passed and not cand.chosen and cand.size_bytes < chosen.size_bytes
        ]  # fmt: skip
        assert {cand.quantization for cand in pool} == {c.QUANTIZATION_FP16, c.QUANTIZATION_INT8}
        assert fallback.latency_p95_ms == min(cand.latency_p95_ms for cand in pool)
        assert build.fallback_digest and build.fallback_reason == ""
    finally:
        await channel.close(None)


async def test_a_fallback_no_candidate_qualifies_for_leaves_a_reason_not_a_failure(
    cp: ControlPlane, wide: BuiltModel, builder: Builder
) -> None:
    """fp16 asked for beside an int8 primary: no fp16 file is smaller."""
    op, channel = await setup(
        cp, wide, {"cool": ("aarch64", profile(c.QUANTIZATION_INT8, c.QUANTIZATION_FP16))}
    )
    try:
        build = (await finish_builds(cp, op, builder, count=1))["cool"]
        assert build.state == o.BUILD_STATE_SUCCEEDED and build.artifact_digest
        chosen = chosen_of(build)
        assert chosen.quantization == c.QUANTIZATION_INT8
        assert not any(cand.fallback for cand in build.candidates)
        assert (build.fallback_digest, build.fallback_size) == ("", 0)
        reason = build.fallback_reason
        assert reason.startswith(
            f"no fp16 candidate passes and is smaller than the chosen {chosen.name} ("
        ), reason
        assert "fp16 is " in reason and "not smaller" in reason
        assert f"no fp16 fallback: {reason}" in build.log
        (artifact,) = (
            await op.ListArtifacts(o.ListArtifactsRequest(class_name="cool"), metadata=ADMIN)
        ).artifacts
        assert artifact.fallback_digest == "" and not artifact.manifest.fallback_manifest
        detail = text_of(render.build_detail(build, NOW))
        assert "fallback none: no fp16 candidate passes" in squash(detail)
    finally:
        await channel.close(None)


async def test_reused_results_name_the_reusing_model_in_both_manifests(
    cp: ControlPlane, wide: BuiltModel, builder: Builder
) -> None:
    """Issue 18, finding 2, for the nested manifest: a twin class completed
    from the build, and the same bytes pushed under another model name,
    each get outer and nested manifests naming their own model, version,
    class and build, signed."""
    hot = profile(c.QUANTIZATION_FP32, c.QUANTIZATION_INT8)
    op, channel = await setup(cp, wide, {"hot": ("aarch64", hot), "hot-twin": ("armv7l", hot)})
    try:
        await finish_builds(cp, op, builder, count=2)
        # The same bytes under another name: its builds reuse the result at
        # once (no build runs; finish_builds would fail the test if one did).
        await push(op, wide, "copycat", "3.1.0")
        for _ in range(100):
            listed = (await op.ListBuilds(o.ListBuildsRequest(), metadata=ADMIN)).builds
            if len(listed) == 4:
                break
            await asyncio.sleep(0.05)
        assert len(listed) == 4 and all(b.state == o.BUILD_STATE_SUCCEEDED for b in listed)
        builds = {b.id: b for b in listed}
        assert sum(1 for b in listed if b.reused_from) == 3
        assert len({b.fallback_digest for b in listed}) == 1 and listed[0].fallback_digest
        keys = await signing_keys(channel, op)
        artifacts = (await op.ListArtifacts(o.ListArtifactsRequest(), metadata=ADMIN)).artifacts
        assert len(artifacts) == 4
        for artifact in artifacts:
            signed = artifact.signed_manifest
            assert signing.verify(keys[signed.key_id], signed.manifest, signed.signature)
            outer = c.ArtifactManifest.FromString(signed.manifest)
            build = builds[outer.build_id]
            assert artifact.fallback_digest == build.fallback_digest
            nested = c.ArtifactManifest.FromString(outer.fallback_manifest)
            for manifest in (outer, nested):
                assert (manifest.model_name, manifest.model_version) == (
                    build.model_name, build.model_version,
                )  # fmt: skip
                assert (manifest.class_name, manifest.build_id) == (build.class_name, build.id)
            assert nested.created_at == outer.created_at
            assert nested.sha256 == build.fallback_digest
        assert {(b.model_name, b.class_name) for b in listed} == {
            ("wide", "hot"), ("wide", "hot-twin"), ("copycat", "hot"), ("copycat", "hot-twin"),
        }  # fmt: skip
    finally:
        await channel.close(None)


async def test_a_fallback_turned_off_and_on_again_ships_again(
    cp: ControlPlane, wide: BuiltModel, builder: Builder
) -> None:
    """int8 -> none -> int8: the third profile is the first one again, whose
    build is reused; the class's newest build must be that result, since
    assignments take the newest (a stranger's try found the device without
    its fallback: the old build was found and nothing new recorded)."""
    op, channel = await setup(
        cp, wide, {"hot": ("aarch64", profile(c.QUANTIZATION_FP32, c.QUANTIZATION_INT8))}
    )

    async def fallback(value: c.Quantization.ValueType) -> None:
        await op.UpdateDeviceClass(
            o.UpdateDeviceClassRequest(name="hot", constraints=c.ConstraintProfile(fallback=value)),
            metadata=ADMIN,
        )

    async def published() -> str:
        with cp.db.unit_of_work(readonly=True) as uow:
            cls = uow.session.scalar(select(DeviceClassRow).where(DeviceClassRow.name == "hot"))
            mv = uow.session.scalars(select(ModelVersionRow)).one()
            assert cls is not None
            found = _class_artifact(uow.session, cls.id, mv.id)
            assert not isinstance(found, str), found
            return found.fallback_digest or ""

    try:
        first = (await finish_builds(cp, op, builder, count=1))["hot"]
        assert first.fallback_digest and await published() == first.fallback_digest
        await fallback(c.QUANTIZATION_UNSPECIFIED)
        await finish_builds(cp, op, builder, count=2)
        assert await published() == ""
        await fallback(c.QUANTIZATION_INT8)
        # A reuse, not a build: it finishes as it is recorded.
        await finish_builds(cp, op, builder, count=3)
        listed = (await op.ListBuilds(o.ListBuildsRequest(), metadata=ADMIN)).builds
        assert [b.reused_from for b in listed].count(first.id) == 1
        assert await published() == first.fallback_digest
    finally:
        await channel.close(None)
