"""The ONNX Runtime ladder on real models: the digits MLP, the small digits
CNN, and a real pretrained CNN (PP-OCR's text-direction classifier, shipped
in the rapidocr-onnxruntime wheel). Every rung is built, run in ORT and
measured; the verdict is checked as constraints tighten."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgefleet.agent.runtimes import RuntimeUnavailable, open_runner
from edgefleet.agent.runtimes.onnxruntime import OnnxRuntimeRunner
from edgefleet.controlplane.build import ort_ladder
from edgefleet.controlplane.build.measure import accuracy, measure_with_outputs, reference_outputs
from edgefleet.controlplane.build.pipeline import run_build
from edgefleet.controlplane.build.samples import Samples, load_samples
from edgefleet.controlplane.build.types import BuildTarget, Candidate, Measurement
from edgefleet.controlplane.build.verdict import MIB, evaluate
from edgefleet.controlplane.domain.onnx_inspect import inspect_model, output_specs
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.demo.models import (
    BuiltModel,
    build_digits_classifier,
    build_small_cnn,
    render_text_lines,
)

RUNS = 20  # latency runs per candidate: enough for sane numbers, quick on 2 cores
RUNGS = ["fp32-opt", "fp16", "int8-dynamic", "int8-static-qdq"]


@dataclass
class Ladder:
    """A model's ladder, built and measured once per module."""

    model: BuiltModel
    samples: Samples
    built: dict[str, tuple[Candidate, Measurement]]
    reference_accuracy: float | None
    log: list[str]

    @property
    def pairs(self) -> list[tuple[Candidate, Measurement]]:
        return list(self.built.values())

    @property
    def fp32_p95(self) -> float:
        return self.built["fp32-opt"][1].latency_p95_ms

    def verdict(self, **limits: object) -> dict[str, tuple[bool, tuple[str, ...], bool]]:
        target = BuildTarget("test", "onnxruntime", **limits)  # type: ignore[arg-type]
        evaluated = evaluate(self.pairs, target, self.reference_accuracy, self.fp32_p95)
        return {e.candidate.name: (e.passed, e.reasons, e.chosen) for e in evaluated}


def run_ladder(model: BuiltModel, workdir: Path) -> Ladder:
    info = inspect_model(model.model)
    samples = load_samples(model.sample_data, info.inputs)
    reference = reference_outputs(model.model, samples, threads=1)
    log: list[str] = []
    target = BuildTarget("test", "onnxruntime")
    candidates = ort_ladder.build_candidates(model.model, samples, workdir, target, log.append)
    specs = output_specs(info, ())
    built = {
        c.name: (
            c,
            measure_with_outputs(c, samples, reference, threads=1, specs=specs, runs=RUNS)[0],
        )
        for c in candidates
    }
    return Ladder(model, samples, built, accuracy(reference, specs, samples.labels), log)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Ladder:
    root = tmp_path_factory.mktemp("mlp")
    return run_ladder(build_digits_classifier(root / "model"), root / "work")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Ladder:
    root = tmp_path_factory.mktemp("cnn")
    return run_ladder(build_small_cnn(root / "model"), root / "work")


@pytest.fixture(params=["mlp", "cnn"])
def ladder(request: pytest.FixtureRequest) -> Ladder:
    result: Ladder = request.getfixturevalue(request.param)
    return result


# -- every rung builds, runs and measures sanely --------------------------------------------------


def test_every_rung_builds_and_runs(ladder: Ladder) -> None:
    assert list(ladder.built) == RUNGS
    for name, (candidate, measurement) in ladder.built.items():
        assert candidate.path is not None and not candidate.error, (name, candidate.error)
        assert candidate.runtime == "onnxruntime"
        floor = candidate.min_runtime_versions["onnxruntime"]
        assert (1, 6) <= tuple(int(part) for part in floor.split(".")) <= (1, 99), floor
        assert not measurement.error, (name, measurement.error)
        assert measurement.size_bytes == candidate.path.stat().st_size
        assert 0 < measurement.latency_p50_ms <= measurement.latency_p95_ms < 50
        assert 0 <= measurement.peak_memory_mb < 200
        assert measurement.accuracy is not None


def test_measurements_are_sane(ladder: Ladder) -> None:
    m = {name: measurement for name, (_, measurement) in ladder.built.items()}
    # The optimized graph computes what the original does.
    assert m["fp32-opt"].agreement == 1.0
    assert m["fp32-opt"].max_abs_diff < 1e-4
    assert m["fp32-opt"].accuracy == ladder.reference_accuracy
    assert ladder.reference_accuracy is not None and ladder.reference_accuracy > 0.9
    # fp16 halves the weights; int8 shrinks them further.
    assert m["fp16"].size_bytes < 0.7 * m["fp32-opt"].size_bytes
    assert m["int8-dynamic"].size_bytes < m["fp16"].size_bytes
    assert m["int8-static-qdq"].size_bytes < 0.7 * m["fp32-opt"].size_bytes
    assert 0 < m["fp16"].max_abs_diff < 1e-2 and m["fp16"].agreement >= 0.99
    for name in ("int8-dynamic", "int8-static-qdq"):
        assert m[name].max_abs_diff > m["fp16"].max_abs_diff
        assert m[name].agreement >= 0.95, name


def test_static_int8_is_qdq_with_per_channel_weights(mlp: Ladder) -> None:
    candidate, _ = mlp.built["int8-static-qdq"]
    assert candidate.path is not None
    model = onnx.load(str(candidate.path))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    scales = {init.name: init for init in model.graph.initializer}
    per_channel = [
        node
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and len(scales[node.input[1]].dims) == 1
    ]
    assert per_channel, "weights should have one scale per output channel"


# -- the verdict on real measurements -------------------------------------------------------------


def test_no_constraints_everything_passes(mlp: Ladder) -> None:
    verdict = mlp.verdict()
    assert all(passed for passed, _, _ in verdict.values())
    assert sum(chosen for _, _, chosen in verdict.values()) == 1


def test_a_size_limit_forces_int8(ladder: Ladder) -> None:
    sizes = {name: m.size_bytes for name, (_, m) in ladder.built.items()}
    smallest_float = min(sizes["fp32-opt"], sizes["fp16"])
    smallest_int8 = min(sizes["int8-dynamic"], sizes["int8-static-qdq"])
    assert smallest_int8 < smallest_float
    verdict = ladder.verdict(max_model_size_mb=(smallest_int8 + smallest_float) / 2 / MIB)
    for name in ("fp32-opt", "fp16"):
        passed, reasons, _ = verdict[name]
        assert not passed and reasons[0].startswith("size ") and "iB > max" in reasons[0]
    (chosen,) = [name for name, (_, _, c) in verdict.items() if c]
    assert chosen.startswith("int8-")


def test_a_tight_accuracy_floor_rejects_lossy_int8(ladder: Ladder) -> None:
    """With labels, retention is accuracy / fp32 accuracy; any int8 rung that
    lost a sample fails a 0.999 floor with the numbers, fp32 never does."""
    verdict = ladder.verdict(min_accuracy_retention=0.999)
    assert verdict["fp32-opt"][0]
    assert ladder.reference_accuracy is not None
    for name in ("int8-dynamic", "int8-static-qdq"):
        passed, reasons, _ = verdict[name]
        kept = (ladder.built[name][1].accuracy or 0.0) / ladder.reference_accuracy
        assert passed == (kept >= 0.999), (name, kept, reasons)
        if not passed:
            assert reasons[0].startswith("accuracy ") and "< min 0.9990" in reasons[0]


def test_an_impossible_latency_budget_fails_everything_with_numbers(mlp: Ladder) -> None:
    verdict = mlp.verdict(latency_budget_p95_ms=0.0001)
    assert not any(passed or chosen for passed, _, chosen in verdict.values())
    for name, (_, reasons, _) in verdict.items():
        p95 = mlp.built[name][1].latency_p95_ms
        assert len(reasons) == 1
        # Three decimals under 1 ms; then, when it was measured again, what
        # the timing stood on.
        assert reasons[0].startswith(f"latency p95 {p95:.3f} ms > budget 0.000 ms (+"), reasons
        assert "%)" in reasons[0], reasons


# -- calibration data -----------------------------------------------------------------------------


def _bad_samples(samples: Samples, kind: str) -> Samples:
    (name, array), *_ = samples.arrays.items()
    if kind == "none":
        return Samples({name: array[:0]}, None, False)
    if kind == "missing":
        return Samples({"pixels": array}, None, False)
    if kind == "dtype":
        return Samples({name: array.astype(np.float64)}, None, False)
    if kind == "shape":
        return Samples({name: array[..., :-1]}, None, False)
    nan = array.copy()
    nan[0, 0] = np.nan
    return Samples({name: nan}, None, False)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("none", "at least one sample"),
        ("missing", "lacks arrays for model inputs ['input']"),
        ("dtype", "is float64; the model input is float32"),
        ("shape", "axis 1: 63 != 64"),
        ("nan", "holds 1 NaN or infinite values"),
    ],
)
def test_invalid_calibration_data_is_invalid_argument(
    mlp: Ladder, tmp_path: Path, kind: str, message: str
) -> None:
    bad = _bad_samples(mlp.samples, kind)
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        ort_ladder.quantize_static_qdq(mlp.model.model, tmp_path / "q.onnx", bad)
    assert not (tmp_path / "q.onnx").exists()


def test_a_failed_rung_does_not_stop_the_ladder(mlp: Ladder, tmp_path: Path) -> None:
    log: list[str] = []
    bad = _bad_samples(mlp.samples, "nan")
    candidates = ort_ladder.build_candidates(
        mlp.model.model, bad, tmp_path, BuildTarget("test", "onnxruntime"), log.append
    )
    by_name = {c.name: c for c in candidates}
    assert list(by_name) == RUNGS
    failed = by_name["int8-static-qdq"]
    assert failed.path is None and "NaN" in failed.error
    assert all(by_name[n].path is not None for n in RUNGS[:3])
    assert any(line.startswith("int8-static-qdq: not built") for line in log)
    # Measuring the failed rung reports its error instead of raising.
    reference = reference_outputs(mlp.model.model, mlp.samples)
    specs = output_specs(inspect_model(mlp.model.model), ())
    measurement = measure_with_outputs(
        failed, mlp.samples, reference, threads=1, specs=specs, runs=RUNS
    )[0]
    assert measurement.error == failed.error


def test_a_candidate_that_cannot_load_is_a_measurement_error(mlp: Ladder, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    reference = reference_outputs(mlp.model.model, mlp.samples)
    candidate = Candidate("broken", "onnxruntime", "fp32", broken)
    specs = output_specs(inspect_model(mlp.model.model), ())
    measurement = measure_with_outputs(
        candidate, mlp.samples, reference, threads=1, specs=specs, runs=RUNS
    )[0]
    assert measurement.error and measurement.size_bytes == len(b"not an onnx model")


# -- runner and ORT format ------------------------------------------------------------------------


def test_runner_reports_specs_and_runs(mlp: Ladder) -> None:
    runner = open_runner(mlp.model.model, "onnxruntime", threads=2)
    assert isinstance(runner, OnnxRuntimeRunner)
    assert runner.providers == ["CPUExecutionProvider"]
    assert [(t.name, t.dtype, t.shape) for t in runner.inputs] == [("input", "float32", (-1, 64))]
    assert [(t.name, t.shape) for t in runner.outputs] == [("probabilities", (-1, 10))]
    (probabilities,) = runner.run(mlp.samples.one(0))
    assert probabilities.shape == (1, 10) and abs(float(probabilities.sum()) - 1) < 1e-5


def test_runner_refuses_a_missing_accelerator(mlp: Ladder) -> None:
    with pytest.raises(RuntimeUnavailable, match="TensorrtExecutionProvider"):
        OnnxRuntimeRunner(mlp.model.model, providers=["TensorrtExecutionProvider"])


def test_ort_format_loads(mlp: Ladder, tmp_path: Path) -> None:
    path = ort_ladder.to_ort_format(mlp.model.model, tmp_path / "model.ort")
    (probabilities,) = OnnxRuntimeRunner(path).run(mlp.samples.one(0))
    assert probabilities.shape == (1, 10)


def test_small_cnn_is_a_real_classifier(cnn: Ladder) -> None:
    assert cnn.model.accuracy > 0.9
    assert cnn.reference_accuracy is not None
    assert abs(cnn.reference_accuracy - cnn.model.accuracy) < 0.05
    ops = {n.op_type for n in onnx.load(str(cnn.model.model)).graph.node}
    assert {"Conv", "Relu", "MaxPool", "Gemm", "Softmax"} <= ops


# -- the whole pipeline ---------------------------------------------------------------------------


def test_pipeline_on_the_mlp(mlp: Ladder, tmp_path: Path) -> None:
    steps: list[tuple[float, str]] = []
    outcome = run_build(
        mlp.model.model,
        mlp.model.sample_data,
        BuildTarget("pi4", "onnxruntime", quantization="int8"),
        tmp_path,
        lambda fraction, message: steps.append((fraction, message)),
        runs=RUNS,
    )
    fractions = [f for f, _ in steps]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert all(message for _, message in steps)
    assert [e.candidate.name for e in outcome.candidates] == RUNGS
    assert outcome.chosen is not None and outcome.chosen.candidate.precision == "int8"
    assert outcome.reference_accuracy == mlp.reference_accuracy
    assert any("chose" in line for line in outcome.log)
    # Golden samples: inputs and the chosen artifact's outputs, reproducible
    # by a device within the tolerances.
    golden = outcome.golden
    assert golden is not None and 1 <= len(golden.samples) <= 8
    assert golden.atol >= 1e-2 and golden.rtol > 0 and 0 < golden.min_agreement <= 1
    assert outcome.chosen.candidate.path is not None
    runner = OnnxRuntimeRunner(outcome.chosen.candidate.path)
    for sample in golden.samples:
        assert list(sample.inputs) == ["input"] and list(sample.outputs) == ["probabilities"]
        (got,) = runner.run(sample.inputs)
        np.testing.assert_allclose(got, sample.outputs["probabilities"], atol=golden.atol)
    # The result crosses the process boundary pickled: it must come back
    # whole, golden arrays included.
    assert pickle.loads(pickle.dumps(outcome)) == outcome


def test_pipeline_without_a_passing_candidate(mlp: Ladder, tmp_path: Path) -> None:
    outcome = run_build(
        mlp.model.model,
        mlp.model.sample_data,
        BuildTarget("tiny", "onnxruntime", max_model_size_mb=0.001),
        tmp_path,
        lambda fraction, message: None,
        runs=RUNS,
    )
    assert outcome.chosen is None and outcome.golden is None
    assert all(e.reasons[0].startswith("size ") for e in outcome.candidates)
    assert "no candidate meets" in outcome.log[-1]


def test_pipeline_rejects_an_unknown_runtime(mlp: Ladder, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="no build ladder for runtime 'coreml'"):
        run_build(
            mlp.model.model,
            None,
            BuildTarget("mac", "coreml"),
            tmp_path,
            lambda fraction, message: None,
        )


# -- a real pretrained CNN: PP-OCR's text-direction classifier ------------------------------------


def test_pipeline_on_a_real_pretrained_cnn(ppocr_cls: Path, tmp_path: Path) -> None:
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=render_text_lines(32))
    outcome = run_build(
        ppocr_cls,
        samples,
        BuildTarget("pi4", "onnxruntime"),
        tmp_path / "work",
        lambda fraction, message: None,
        runs=RUNS,
    )
    print("\n".join(outcome.log))
    m = {e.candidate.name: e.measurement for e in outcome.candidates}
    assert list(m) == RUNGS
    assert all(not x.error for x in m.values()), {n: x.error for n, x in m.items()}
    assert outcome.reference_accuracy is None  # no labels: agreement stands in
    assert m["fp32-opt"].agreement == 1.0 and m["fp32-opt"].max_abs_diff < 1e-4
    assert m["fp16"].agreement >= 0.95 and m["fp16"].size_bytes < 0.6 * m["fp32-opt"].size_bytes
    assert m["int8-dynamic"].size_bytes < 0.5 * m["fp32-opt"].size_bytes
    assert m["int8-static-qdq"].size_bytes < 0.7 * m["fp32-opt"].size_bytes
    # The opset-11 model was upgraded for per-channel QDQ.
    assert any("upgraded opset 11 -> 13" in line for line in outcome.log)
    assert outcome.chosen is not None and outcome.golden is not None
    first, *_ = outcome.golden.samples
    assert first.inputs["x"].shape == (1, 3, 48, 192)
    assert first.outputs["save_infer_model/scale_0.tmp_1"].shape == (1, 2)
    # A tight floor on agreement rejects the int8 rungs that flipped samples.
    pairs = [(e.candidate, e.measurement) for e in outcome.candidates]
    tight = BuildTarget("strict", "onnxruntime", min_accuracy_retention=0.999)
    fp32_p95 = m["fp32-opt"].latency_p95_ms
    for e in evaluate(pairs, tight, None, fp32_p95):
        if e.measurement.agreement < 0.999:
            # Named by the output and its kind's metric (a classifier's scores).
            assert e.reasons[0].startswith("save_infer_model/scale_0.tmp_1: top-1 agreement"), (
                e.reasons
            )
        else:
            assert e.passed
    assert min(m["int8-dynamic"].agreement, m["int8-static-qdq"].agreement) < 0.999
