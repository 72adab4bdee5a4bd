"""Builds end to end through a real control-plane process: a real pretrained
model (PP-OCR's direction classifier from the rapidocr wheel) is pushed, built
for an onnxruntime class and a tflite class in worker processes, published as
signed artifacts; a device downloads its class's artifact and validates it in
LiteRT against the manifest's golden outputs. And a control plane killed
mid-build finishes the build exactly once after a restart."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

from edgefleet.agent.runtimes import TensorInfo, open_runner
from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.domain import signing
from edgefleet.demo.models import build_digits_classifier, render_text_lines
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import operator_pb2 as o
from testkit.harness import ControlPlane
from testkit.models import model_parts, push_model, wait_builds

pytestmark = pytest.mark.timeout(900)
TERMINAL = (o.BUILD_STATE_SUCCEEDED, o.BUILD_STATE_FAILED)


def _class(op: Any, name: str, runtime: int, arch: str, **limits: Any) -> None:
    op.CreateDeviceClass(
        o.CreateDeviceClassRequest(
            name=name,
            constraints=c.ConstraintProfile(runtime=runtime, **limits),
            match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=[arch])],
        )
    )


def _array(t: c.TensorData) -> np.ndarray:
    return np.frombuffer(t.data, dtype=np.dtype(t.dtype).newbyteorder("<")).reshape(tuple(t.shape))


def _download(cp: ControlPlane, credential: str, digest: str) -> bytes:
    out = bytearray()
    for piece in cp.device_stub().DownloadArtifact(
        d.DownloadArtifactRequest(digest=digest), metadata=bearer_metadata(credential)
    ):
        out += piece.data
    return bytes(out)


def test_a_real_model_builds_for_onnxruntime_and_tflite_classes(
    tmp_path: Path,
    ppocr_cls: Path,
) -> None:
    cp = ControlPlane(tmp_path / "cp", None, "--build-workers", "1")
    cp.start()
    try:
        op = cp.operator()
        _class(op, "gateway", c.RUNTIME_ONNXRUNTIME, "x86_64", latency_budget_p95_ms=50)
        _class(op, "pi", c.RUNTIME_TFLITE, "aarch64", max_model_size_mb=1)
        samples = tmp_path / "samples.npz"
        np.savez(samples, x=render_text_lines(24))
        push_model(op, "ppocr-cls", "2.0.0", model_parts(model=ppocr_cls, sample_data=samples))
        builds = {b.class_name: b for b in wait_builds(op, 2, 600)}
        for name, build in builds.items():
            assert build.state == o.BUILD_STATE_SUCCEEDED, (name, build.error, build.log)
            assert sum(cand.chosen for cand in build.candidates) == 1
            for cand in build.candidates:
                assert cand.error or (cand.size_bytes > 0 and cand.latency_p95_ms > 0), cand
        assert {cand.name for cand in builds["gateway"].candidates} == {
            "fp32-opt", "fp16", "int8-dynamic", "int8-static-qdq"
        }  # fmt: skip
        assert {cand.name for cand in builds["pi"].candidates} == {
            "tflite-fp32", "tflite-fp16", "tflite-int8"
        }  # fmt: skip

        # A Pi-class device: enrolls, pins the signing key, downloads its
        # class's artifact, checks hash and signature, validates in LiteRT.
        token = op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="t")).secret
        enrolled = cp.device_stub().Enroll(
            d.EnrollRequest(
                enrollment_token=token, hardware_id="pi-1",
                hardware=c.HardwareProfile(arch="aarch64"),
            )
        )  # fmt: skip
        pinned = {k.key_id: k.public_key for k in enrolled.signing_keys}
        (artifact,) = op.ListArtifacts(o.ListArtifactsRequest(class_name="pi")).artifacts
        signed = artifact.signed_manifest
        assert signing.verify(pinned[signed.key_id], signed.manifest, signed.signature)
        manifest = c.ArtifactManifest.FromString(signed.manifest)
        assert manifest.runtime == c.RUNTIME_TFLITE and manifest.media_type.endswith("tflite")
        data = _download(cp, enrolled.device_credential, manifest.sha256)
        assert hashlib.sha256(data).hexdigest() == manifest.sha256
        assert len(data) == manifest.size_bytes <= 1024 * 1024
        path = tmp_path / "artifact.tflite"
        path.write_bytes(data)
        spec = [TensorInfo(t.name, t.dtype, tuple(t.shape)) for t in manifest.inputs]
        out_spec = [TensorInfo(t.name, t.dtype, tuple(t.shape)) for t in manifest.outputs]
        runner = open_runner(path, "tflite", onnx_inputs=spec, onnx_outputs=out_spec)
        assert manifest.golden
        agree = 0
        for golden in manifest.golden:
            got = runner.run({t.name: _array(t) for t in golden.inputs})
            (expected,) = [_array(t) for t in golden.expected_outputs]
            assert np.allclose(got[0], expected, atol=manifest.atol, rtol=manifest.rtol)
            agree += int(got[0].argmax() == expected.argmax())
        assert agree / len(manifest.golden) >= manifest.min_agreement
        # The gateway's artifact is not this device's to take.
        (gateway,) = op.ListArtifacts(o.ListArtifactsRequest(class_name="gateway")).artifacts
        with pytest.raises(grpc.RpcError) as info:
            _download(cp, enrolled.device_credential, gateway.digest)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        cp.close()


def test_a_control_plane_killed_mid_build_finishes_it_once_after_restart(
    tmp_path: Path,
) -> None:
    model = build_digits_classifier(tmp_path / "digits")
    cp = ControlPlane(tmp_path / "cp", None, "--build-workers", "1", "--build-lease", "2")
    cp.start()
    try:
        op = cp.operator()
        _class(op, "gateway", c.RUNTIME_ONNXRUNTIME, "x86_64")
        push_model(
            op, "digits", "1.0.0", model_parts(model=model.model, sample_data=model.sample_data)
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            (build,) = op.ListBuilds(o.ListBuildsRequest()).builds or [None]
            if build is not None and build.state == o.BUILD_STATE_RUNNING:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the build never started")
        assert cp.proc is not None
        workers = psutil.Process(cp.proc.pid).children(recursive=True)
        assert workers  # the build runs in a worker process
        cp.kill()  # SIGKILL: no chance to clean up or hand the job back
        # Its workers notice the parent is gone and exit: no orphans.
        _gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"orphaned build workers: {alive}"
        cp.start()
        op = cp.operator()
        (done,) = wait_builds(op, 1, 300)
        assert done.state == o.BUILD_STATE_SUCCEEDED, done.error
        assert len(op.ListArtifacts(o.ListArtifactsRequest()).artifacts) == 1
        assert len(op.ListBuilds(o.ListBuildsRequest()).builds) == 1
        # The killed attempt's workspace was cleared on restart.
        assert not list((tmp_path / "cp" / "builds").iterdir())
    finally:
        cp.close()
