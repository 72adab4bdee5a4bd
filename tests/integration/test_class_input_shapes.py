"""A device class's input shapes (issue 22, item 3) through `edgefleet
classes` and real builds against an in-process control plane (SQLite and
PostgreSQL): set, shown, replaced, cleared, refused with the reason; a
push warns what TFLite classes will fix; a text detector that takes any
batch and width as ONNX gets a TFLite artifact of the class's width with
its batch kept dynamic, which the build report and the signed manifest say
and which LiteRT serves at batch 1 and 3.

One onnx2tf conversion in all (cached for the module, both databases): a
class whose shape names an input the model lacks fails before converting."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.runtimes import TensorInfo, open_runner
from edgefleet.controlplane.build.pipeline import run_build
from edgefleet.controlplane.build.toolchain import INSTALL_TFLITE, find_tflite
from edgefleet.controlplane.build.types import BuildResult, BuildTarget
from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.server import ControlPlane
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import build_service
from testkit.harness import ADMIN_TOKEN
from testkit.models import model_parts, push_requests
from testkit.rpc import ADMIN, status_of

pytestmark = pytest.mark.timeout(600)


def _cli(server: str, *args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(
        cli, ["--server", server, "--token", ADMIN_TOKEN, *args]
    )


async def _run(cp: ControlPlane, *args: str) -> Result:
    return await asyncio.to_thread(_cli, cp.address, *args)


async def _ok(cp: ControlPlane, *args: str) -> Result:
    result = await _run(cp, *args)
    assert result.exit_code == 0, result.output
    return result


async def _shapes(cp: ControlPlane, name: str) -> list[dict[str, Any]]:
    shown = json.loads((await _ok(cp, "classes", "show", name, "--json")).stdout)
    return shown["constraints"].get("input_shapes", [])  # type: ignore[no-any-return]


async def test_set_shown_replaced_cleared_and_refused(cp: ControlPlane) -> None:
    created = await _ok(
        cp, "classes", "create", "ocr", "--runtime", "tflite",
        "--input-shape", "images=1x3x48x320", "--input-shape", "lengths=1",
    )  # fmt: skip
    lines = [line.strip() for line in created.stdout.splitlines()]
    assert "input shapes     images=1x3x48x320" in lines, created.stdout
    assert "lengths=1" in lines  # sorted by name, one a line
    assert await _shapes(cp, "ocr") == [
        {"name": "images", "dims": ["1", "3", "48", "320"]},  # int64 in JSON: strings
        {"name": "lengths", "dims": ["1"]},
    ]
    # Other changes keep them; --input-shape replaces them all.
    await _ok(cp, "classes", "update", "ocr", "--threads", "2")
    assert len(await _shapes(cp, "ocr")) == 2
    await _ok(cp, "classes", "update", "ocr", "--input-shape", "images=1x3x48x640")
    assert await _shapes(cp, "ocr") == [{"name": "images", "dims": ["1", "3", "48", "640"]}]

    # Refused whole, with the reason, and nothing changes.
    for shape, says in (
        ("images=1x0x48x320", "dimension 1 is 0"),
        ("images=1x3x48x65537", "from 1 to 65536"),
        ("images=" + "x".join(["1"] * 9), "input_shapes[0].dims has 9 items; at most 8"),
    ):
        result = await _run(cp, "classes", "update", "ocr", "--input-shape", shape)
        assert result.exit_code != 0 and says in result.output, result.output
    result = await _run(
        cp, "classes", "update", "ocr", "--input-shape", "a=1", "--input-shape", "a=2"
    )
    assert result.exit_code != 0 and "input 'a' is given twice" in result.output
    result = await _run(cp, "classes", "update", "ocr", "--input-shape", "images")
    assert result.exit_code != 0 and "NAME=DIMS" in result.output
    assert await _shapes(cp, "ocr") == [{"name": "images", "dims": ["1", "3", "48", "640"]}]
    async with grpc.aio.insecure_channel(cp.address) as channel:
        op = og.OperatorServiceStub(channel)

        def update(*shapes: c.InputShape) -> Any:
            return op.UpdateDeviceClass(
                o.UpdateDeviceClassRequest(
                    name="ocr", constraints=c.ConstraintProfile(input_shapes=shapes)
                ),
                metadata=ADMIN,
            )

        for shapes, says in (
            ([c.InputShape(name="bad\x00name", dims=[1])], "control character U+0000"),
            ([c.InputShape(name="x", dims=[-1])], "dimension 0 is -1"),
            ([c.InputShape(name=f"i{k}", dims=[1]) for k in range(33)], "has 33 items; at most 32"),
        ):
            code, details = await status_of(update(*shapes))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and says in details, details
    result = await _run(
        cp, "classes", "update", "ocr", "--input-shape", "x=1", "--clear", "input-shapes"
    )
    assert result.exit_code != 0 and "--input-shape and --clear input-shapes" in result.output
    cleared = await _ok(cp, "classes", "update", "ocr", "--clear", "input-shapes")
    assert "(none: TFLite builds fix dynamic dims to the samples' shape)" in cleared.stdout
    assert await _shapes(cp, "ocr") == []


# ------------------------------------------------------------------ a real build


def text_detector(path: Path) -> Path:
    """A DBNet-like text detector: any batch and width in, a probability
    map of the same size out."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (1, 4, 1, 1)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("Sigmoid", ["c2"], ["maps"]),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 48, "W"])],
        [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["N", 1, 48, "W"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@dataclasses.dataclass(frozen=True)
class Detector:
    model: Path
    samples: Path


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    root = tmp_path_factory.mktemp("detector")
    samples = root / "samples.npz"
    rng = np.random.default_rng(1)
    np.savez(samples, images=rng.random((8, 3, 48, 192), dtype=np.float32))
    return Detector(text_detector(root / "detector.onnx"), samples)


Builder = Callable[[BuildTarget], BuildResult]


@pytest.fixture(scope="module")
def builder(detector: Detector, tmp_path_factory: pytest.TempPathFactory) -> Builder:
    """Real builds of the detector, one per profile, kept for the module."""
    if find_tflite() is None:
        pytest.skip(f"the TFLite toolchain (onnx2tf) is not installed: run `{INSTALL_TFLITE}`")
    root = tmp_path_factory.mktemp("builds")
    done: dict[BuildTarget, BuildResult] = {}

    def build(target: BuildTarget) -> BuildResult:
        profile = dataclasses.replace(target, class_name="")
        if profile not in done:
            workdir = root / f"build-{len(done)}"
            done[profile] = run_build(
                detector.model, detector.samples, target, workdir, lambda _f, _m: None, runs=5
            )
        return done[profile]

    return build


async def test_a_class_shape_makes_the_tflite_artifact_and_the_report_says_so(
    cp: ControlPlane, detector: Detector, builder: Builder
) -> None:
    await _ok(cp, "classes", "create", "ocr", "--runtime", "tflite", "--quantization", "fp32",
              "--input-shape", "images=1x3x48x320", "--match", "arch == aarch64")  # fmt: skip
    await _ok(cp, "classes", "create", "typo", "--runtime", "tflite",
              "--input-shape", "image=1x3x48x320", "--match", "arch == riscv64")  # fmt: skip
    async with grpc.aio.insecure_channel(cp.address) as channel:
        op: og.OperatorServiceAsyncStub = og.OperatorServiceStub(channel)
        parts = model_parts(model=detector.model, sample_data=detector.samples)
        pushed = await op.PushModel(push_requests("det", "1.0.0", parts), metadata=ADMIN)
        ocr_warning, typo_warning, typo_fixes = pushed.push_warnings
        assert "'ocr'" in ocr_warning and "images ?x3x48x? -> 1x3x48x320 (class)" in ocr_warning
        assert "'typo' fixes input 'image', which this model does not have" in typo_warning
        assert "images ?x3x48x? -> the samples' shape" in typo_fixes

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
            if len(listed) == 2 and all(b.state in finished for b in listed):
                break
            await asyncio.sleep(0.05)
        by_class = {b.class_name: b for b in listed}

        # A shape naming an input the model lacks is for another model of
        # the class: not used here, and the log says so.
        typo = by_class["typo"]
        assert typo.state == o.BUILD_STATE_SUCCEEDED, typo.error
        assert "the class's input shape for 'image' is not used: no such model input" in typo.log

        ocr = by_class["ocr"]
        assert ocr.state == o.BUILD_STATE_SUCCEEDED, ocr.error
        note = "input images fixed to [1,3,48,320] (class input shape), batch kept dynamic"
        assert f"tflite: {note}" in ocr.log
        assert "3x48x192 -> 3x48x320 (zero-padded or cut at the end)" in ocr.log
        (chosen,) = [cand for cand in ocr.candidates if cand.chosen]
        assert chosen.name == "tflite-fp32" and chosen.notes[0] == note
        assert [(t.name, list(t.shape)) for t in chosen.accepted_inputs] == [
            ("images", [-1, 3, 48, 320])
        ]
        shown = await _ok(cp, "builds", "show", ocr.id)
        assert "images [-1,3,48,320] (-1: any size)" in shown.stdout

        # The signed manifest carries the artifact's own shapes, not the model's.
        (artifact,) = (
            await op.ListArtifacts(o.ListArtifactsRequest(class_name="ocr"), metadata=ADMIN)
        ).artifacts
        manifest = c.ArtifactManifest.FromString(artifact.signed_manifest.manifest)
        assert [(t.name, list(t.shape), list(t.dim_names)) for t in manifest.inputs] == [
            ("images", [-1, 3, 48, 320], ["N", "", "", ""])
        ]
        version = await op.GetModelVersion(
            o.GetModelVersionRequest(model_name="det", version="1.0.0"), metadata=ADMIN
        )
        assert list(version.inputs[0].shape) == [-1, 3, 48, -1]  # the model's own

    # The artifact, as a device runs it: any batch, the class's width.
    result = builder(BuildTarget("ocr", "tflite", quantization="fp32",
                                 input_shapes=(("images", (1, 3, 48, 320)),)))  # fmt: skip
    path = next(e.candidate.path for e in result.candidates if e.chosen)
    assert path is not None
    runner = open_runner(
        path,
        "tflite",
        onnx_inputs=[TensorInfo("images", "float32", (-1, 3, 48, -1))],
        onnx_outputs=[TensorInfo("maps", "float32", (-1, 1, 48, -1))],
    )
    assert [list(t.shape) for t in runner.inputs] == [[-1, 3, 48, 320]]
    session = ort.InferenceSession(str(detector.model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    for rows in (1, 3):
        feed = {"images": rng.random((rows, 3, 48, 320), dtype=np.float32)}
        (got,), (want,) = runner.run(feed), session.run(None, feed)
        assert got.shape == want.shape == (rows, 1, 48, 320)
        assert float(np.abs(got - want).max()) < 1e-4
    with pytest.raises(ValueError, match=r"the artifact takes \[-1, 48, 320, 3\]"):
        runner.run({"images": np.zeros((1, 3, 48, 192), np.float32)})
