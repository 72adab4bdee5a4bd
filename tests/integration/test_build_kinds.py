"""Builds of small real models of every output kind (testkit.model_zoo)
through every rung of the onnxruntime ladder (and the TFLite ladder where
its toolchain is installed), each output judged by its kind's metric: the
classifier by top-1 agreement, the U-Net's probability map by mask IoU, the
CTC recognizer by its decoded sequences, the stateful GRU's output by cosine
similarity with its state not judged. A numerically exact conversion
(fp32-opt) scores at least 0.99 on every metric, and the verdict and the
golden samples' floor use the same metric (issue 22)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.controlplane.build.pipeline import run_build
from edgefleet.controlplane.build.toolchain import find_tflite
from edgefleet.controlplane.build.types import BuildResult, BuildTarget
from edgefleet.fidelity import METRIC, OutputKind
from testkit import model_zoo
from testkit.model_zoo import ZooModel

RUNS = 10
ORT_RUNGS = ["fp32-opt", "fp16", "int8-dynamic", "int8-static-qdq"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ZooModel]:
    root = tmp_path_factory.mktemp("zoo")
    return {name: build(root / name) for name, (build, _) in model_zoo.BUILDERS.items()}


def _build(model: ZooModel, target: BuildTarget, workdir: Path) -> BuildResult:
    return run_build(
        model.model, model.sample_data, target, workdir, lambda fraction, message: None,
        runs=RUNS,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["image_classifier", "unet_segmenter", "ctc_recognizer"])
def test_every_rung_is_judged_by_each_outputs_metric(
    zoo: dict[str, ZooModel], name: str, tmp_path: Path
) -> None:
    model = zoo[name]
    result = _build(model, BuildTarget("x86", "onnxruntime"), tmp_path)
    log = "\n".join(result.log)
    assert [e.candidate.name for e in result.candidates] == ORT_RUNGS, log
    for kind_name, kind in model.kinds.items():
        assert f"{kind_name}={kind.value}" in log  # the log says each output's kind
    for e in result.candidates:
        assert not e.error, (e.candidate.name, e.error)
        scores = {s.output: s for s in e.measurement.fidelity}
        assert {n: s.kind for n, s in scores.items()} == model.kinds
        for s in scores.values():
            assert s.metric == METRIC[s.kind]
        # What the floor is compared with: the lowest judged output.
        assert e.measurement.agreement == min(s.value for s in scores.values() if s.judged)
        failed_on_fidelity = [r for r in e.reasons if " < default min 0.9500" in r]
        for reason in failed_on_fidelity:
            assert any(reason.startswith(f"{o}: {METRIC[k]} ") for o, k in model.kinds.items())
    exact = result.candidates[0].measurement
    assert all(s.value >= 0.99 for s in exact.fidelity if s.judged), exact.fidelity
    assert result.chosen is not None and result.golden is not None
    assert {s.name: s.kind for s in result.golden.outputs} == model.kinds
    assert result.golden.min_fidelity == 0.95


def test_a_version_floor_rejects_what_the_class_default_accepts(
    zoo: dict[str, ZooModel], tmp_path: Path
) -> None:
    """The U-Net's int8 maps lose edges: a version floor of 0.999 on mask IoU
    leaves only the float rungs, named by output and metric."""
    model = zoo["unet_segmenter"]
    target = BuildTarget("x86", "onnxruntime", min_fidelity=0.999)
    result = _build(model, target, tmp_path)
    for e in result.candidates:
        iou = next(s for s in e.measurement.fidelity if s.output == "prob_map")
        if iou.value < 0.999:
            assert f"prob_map: mask IoU {iou.value:.4f} < version's min 0.9990" in e.reasons[0]
        else:
            assert e.passed, e.reasons
    assert result.chosen is not None and result.chosen.candidate.precision in ("fp32", "fp16")
    assert result.golden is not None and result.golden.min_fidelity == 0.999


def test_the_stateful_gru_is_judged_on_its_output_not_its_state(
    zoo: dict[str, ZooModel], tmp_path: Path
) -> None:
    model = zoo["gru_stateful"]
    result = _build(model, BuildTarget("x86", "onnxruntime"), tmp_path)
    fp32 = result.candidates[0].measurement
    scores = {s.output: s for s in fp32.fidelity}
    assert scores["y"].kind is OutputKind.REGRESSION and scores["y"].value >= 0.99
    assert scores["hn"].kind is OutputKind.STATE and not scores["hn"].judged


@pytest.mark.skipif(find_tflite() is None, reason="the TFLite toolchain (onnx2tf) is not installed")
def test_the_unet_through_the_tflite_ladder_is_judged_by_mask_iou(
    zoo: dict[str, ZooModel], tmp_path: Path
) -> None:
    result = _build(zoo["unet_segmenter"], BuildTarget("pi", "tflite"), tmp_path)
    by_name = {e.candidate.name: e for e in result.candidates}
    fp32 = by_name["tflite-fp32"].measurement
    assert not fp32.error, fp32.error
    (iou,) = fp32.fidelity
    assert iou.metric == "mask IoU" and iou.value >= 0.99
    assert iou.details["PSNR dB"] > 40


def test_a_model_whose_own_outputs_are_nan_is_refused_naming_the_output(tmp_path: Path) -> None:
    """The fp32 outputs are the reference: NaN there (a square root of a
    negative sample) would make every metric meaningless."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from edgefleet.controlplane.errors import InvalidArgument

    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["features"])], "sqrt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 4])],
    )  # fmt: skip
    model = tmp_path / "sqrt.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    samples = tmp_path / "s.npz"
    values = np.ones((10, 4), np.float32)
    values[7, 2] = -1.0
    np.savez(samples, x=values)
    with pytest.raises(InvalidArgument, match=r"output 'features' holds NaN or infinite values on "
                       r"1 of the 10 samples \(the first: sample 7\)"):  # fmt: skip
        run_build(model, samples, BuildTarget("x86", "onnxruntime"), tmp_path / "w",
                  lambda fraction, message: None, runs=RUNS)  # fmt: skip
