"""The Validating step (agent/update/validate.py) on real models in real
runtimes: a small ONNX scorer built with onnx.helper, its golden outputs
computed with bare onnxruntime, and manifests that each break one promise
(wrong outputs, agreement, latency, memory, a corrupt file, a missing or too
old runtime, a model that hangs, a runtime that crashes)."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.runtimes.measure import agreement, measure_in_child
from edgefleet.agent.runtimes.tensorrt import tensorrt_version
from edgefleet.agent.serving import encode_tensor
from edgefleet.agent.update.machine import UpdateMachine
from edgefleet.agent.update.ports import FatalUpdateError, Ports
from edgefleet.agent.update.states import State
from edgefleet.agent.update.store import Assignment, UpdateStore
from edgefleet.agent.update.validate import ManifestValidator, ValidationResult, numeric_release
from edgefleet.agent.update.verify import ManifestVerifier
from edgefleet.v1 import common_pb2
from testkit.update_rig import (
    CLASS,
    SIGNER,
    TRUSTED,
    FakeActivator,
    FakeDownloader,
    FakeReporter,
    Faults,
)

FEATURES, CLASSES = 6, 4
GOLDEN = 6


# ------------------------------------------------------------------ models


def scorer(path: Path) -> Path:
    """x [batch, 8] -> features = relu(x W1 + b1) [batch, 6] and
    scores = features W2 + b2 [batch, 4]: a tiny classifier with two outputs."""
    rng = np.random.default_rng(7)
    w1 = rng.normal(size=(8, FEATURES)).astype(np.float32)
    b1 = rng.normal(size=FEATURES).astype(np.float32)
    w2 = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    b2 = rng.normal(size=CLASSES).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["features"]),
            helper.make_node("MatMul", ["features", "w2"], ["s"]),
            helper.make_node("Add", ["s", "b2"], ["scores"]),
        ],
        "scorer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", CLASSES]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", FEATURES]),
        ],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def endless_loop(path: Path) -> Path:
    """A valid model whose Loop runs 2^62 iterations: it hangs the runtime
    on its first run (load is fine)."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["v_in"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body)],
        "endless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [
            numpy_helper.from_array(np.array(2**62, dtype=np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "go"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


# ------------------------------------------------------------------ manifests


def tensor(name: str, array: np.ndarray) -> common_pb2.TensorData:
    dtype, shape, data = encode_tensor(array)
    return common_pb2.TensorData(name=name, dtype=dtype, shape=shape, data=data)


def golden_inputs(count: int = GOLDEN) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.random((1, 8), dtype=np.float32) for _ in range(count)]


def bare_outputs(model: Path, xs: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The model's outputs on each input, from onnxruntime directly."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(None, {"x": x}), strict=True)) for x in xs]


def manifest(
    model: Path,
    expected: list[dict[str, np.ndarray]] | None = None,
    *,
    runtime: common_pb2.Runtime.ValueType = common_pb2.RUNTIME_ONNXRUNTIME,
    xs: list[np.ndarray] | None = None,
    **fields: Any,
) -> bytes:
    """A manifest for `model`: golden samples from `xs` and `expected`
    (default: bare onnxruntime's outputs), tolerances a correct device
    meets, and `fields` on top."""
    xs = golden_inputs() if xs is None else xs
    expected = bare_outputs(model, xs) if expected is None else expected
    data = model.read_bytes()
    message = common_pb2.ArtifactManifest(
        model_name="scorer",
        model_version="1.0.0",
        class_name=CLASS,
        runtime=runtime,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        inputs=[common_pb2.TensorSpec(name="x", dtype="float32", shape=[-1, 8])],
        outputs=[
            common_pb2.TensorSpec(name="scores", dtype="float32", shape=[-1, CLASSES]),
            common_pb2.TensorSpec(name="features", dtype="float32", shape=[-1, FEATURES]),
        ],
        golden=[
            common_pb2.GoldenSample(
                inputs=[tensor("x", x)],
                expected_outputs=[tensor(k, v) for k, v in outs.items()],
            )
            for x, outs in zip(xs, expected, strict=True)
        ],
        atol=1e-4,
        rtol=1e-3,
        min_agreement=1.0,
        threads=1,
    )
    for name, value in fields.items():
        if name == "min_runtime_versions":
            message.min_runtime_versions.update(value)
        elif name == "output_specs":
            message.output_specs.extend(value)
        else:
            setattr(message, name, value)
    return message.SerializeToString()


def fatal(validator: ManifestValidator, path: Path, data: bytes) -> str:
    with pytest.raises(FatalUpdateError) as caught:
        validator.validate(path, data)
    return caught.value.message


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scorer(tmp_path_factory.mktemp("scorer") / "scorer.onnx")


@pytest.fixture(scope="module")
def validator() -> ManifestValidator:
    # Few runs: the numbers are not what these tests look at, and 2 shared cores.
    return ManifestValidator(runs=10, warmup=1, timeout_s=120)


# ------------------------------------------------------------------ passing


def test_a_correct_artifact_passes_and_reports_its_numbers(
    validator: ManifestValidator, model: Path
) -> None:
    data = manifest(
        model,
        latency_budget_p95_ms=10_000.0,
        max_memory_mb=4096.0,
        threads=2,
        min_runtime_versions={"onnxruntime": "1.0"},
    )
    validator.validate(model, data)
    result = validator.last_result
    assert isinstance(result, ValidationResult)
    assert (result.runtime, result.threads, result.golden_samples) == ("onnxruntime", 2, GOLDEN)
    assert 1 <= result.runs <= 10
    assert 0 < result.latency_p50_ms <= result.latency_p95_ms < 10_000
    assert 0 <= result.peak_memory_mb < 4096
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    assert result.agreement == 1.0
    assert "p95" in result.summary() and "agreement 1.000" in result.summary()


def test_no_golden_samples_still_loads_runs_and_measures(
    validator: ManifestValidator, model: Path
) -> None:
    validator.validate(model, manifest(model, [], xs=[]))
    result = validator.last_result
    assert result is not None
    assert result.golden_samples == 0 and result.max_abs_diff is None and result.agreement is None
    assert result.runs >= 1 and result.latency_p95_ms > 0


# ------------------------------------------------------------------ outputs


def test_wrong_expected_outputs_name_the_output_and_the_difference(
    validator: ManifestValidator, model: Path
) -> None:
    expected = bare_outputs(model, golden_inputs())
    expected[3]["features"] = expected[3]["features"] + np.float32(0.5)
    reason = fatal(validator, model, manifest(model, expected))
    assert "output 'features'" in reason
    assert "max |diff| 0.5" in reason and "golden sample 3" in reason
    assert "atol 0.0001 + rtol 0.001" in reason
    assert f"{FEATURES} of {GOLDEN * FEATURES} values" in reason
    # The numbers were measured: the agent can still report them.
    assert validator.last_result is not None and validator.last_result.max_abs_diff == (
        pytest.approx(0.5, abs=1e-5)
    )


def test_agreement_below_the_minimum_is_fatal(validator: ManifestValidator, model: Path) -> None:
    expected = bare_outputs(model, golden_inputs())
    # Scores reversed: every argmax becomes the argmin. The tolerance is wide
    # enough that only the agreement check can catch it.
    flipped = [{**outs, "scores": -outs["scores"]} for outs in expected]
    data = manifest(model, flipped, atol=1e3, min_agreement=0.75)
    reason = fatal(validator, model, data)
    got = np.concatenate([o["scores"] for o in expected])
    want = np.concatenate([o["scores"] for o in flipped])
    measured = agreement(got, want)
    assert measured < 0.75
    assert f"argmax agreement {measured:.3f}" in reason
    assert "output 'scores'" in reason and "minimum 0.750" in reason


def test_each_output_is_judged_by_its_kind_from_the_manifest(
    validator: ManifestValidator, model: Path
) -> None:
    """A manifest with output kinds: `features` as regression (cosine
    against min_fidelity), `scores` as class scores (argmax against
    min_agreement). Tolerances wide, so only the metrics can fail it."""
    expected = bare_outputs(model, golden_inputs())
    kinds = [
        common_pb2.OutputSpec(name="scores", kind=common_pb2.OUTPUT_KIND_CLASS_SCORES),
        common_pb2.OutputSpec(name="features", kind=common_pb2.OUTPUT_KIND_REGRESSION),
    ]
    wide = {"atol": 1e3, "output_specs": kinds, "min_fidelity": 0.99}
    validator.validate(model, manifest(model, expected, **wide))
    assert validator.last_result is not None and validator.last_result.agreement == 1.0
    # Features pointing elsewhere: their cosine fails, though every argmax of
    # the scores still agrees and the tolerance holds.
    turned = [{**outs, "features": outs["features"][:, ::-1].copy()} for outs in expected]
    reason = fatal(validator, model, manifest(model, turned, **wide))
    assert "output 'features': cosine similarity" in reason
    assert "below the manifest's minimum 0.990" in reason and f"{GOLDEN} golden samples" in reason
    # A state output is never judged: the same arrays pass when features is one.
    state = [kinds[0], common_pb2.OutputSpec(name="features", kind=common_pb2.OUTPUT_KIND_STATE)]
    validator.validate(model, manifest(model, turned, **{**wide, "output_specs": state}))


# ------------------------------------------------------------------ budgets


def test_an_impossible_latency_budget_is_fatal_with_the_measured_p95(
    validator: ManifestValidator, model: Path
) -> None:
    reason = fatal(validator, model, manifest(model, latency_budget_p95_ms=1e-6))
    result = validator.last_result
    assert result is not None
    assert f"p95 latency {result.latency_p95_ms:.3f} ms over {result.runs} runs" in reason
    assert "budget of 1e-06 ms" in reason and "1 thread(s)" in reason


def test_a_tiny_memory_limit_is_fatal_with_the_measured_memory(
    validator: ManifestValidator, model: Path
) -> None:
    reason = fatal(validator, model, manifest(model, max_memory_mb=0.001))
    result = validator.last_result
    assert result is not None and result.peak_memory_mb > 0.001
    assert f"adds {result.peak_memory_mb:.2f} MiB" in reason
    assert "limit of 0.001 MiB" in reason


# ------------------------------------------------------------------ the artifact and the runtime


def test_a_corrupt_artifact_cannot_load(
    validator: ManifestValidator, model: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07 this is not an onnx model")
    reason = fatal(validator, broken, manifest(model))
    assert reason.startswith("cannot load the artifact in onnxruntime: ")
    assert validator.last_result is None


@pytest.mark.skipif(tensorrt_version() is not None, reason="TensorRT is installed here")
def test_a_runtime_missing_on_this_device_is_fatal(
    validator: ManifestValidator, model: Path
) -> None:
    data = manifest(model, runtime=common_pb2.RUNTIME_TENSORRT)
    reason = fatal(validator, model, data)
    assert reason.startswith("runtime tensorrt not available on this device: ")
    assert "TensorRT is not installed" in reason
    # Asked for by version: refused before any process starts.
    data = manifest(
        model, runtime=common_pb2.RUNTIME_TENSORRT, min_runtime_versions={"tensorrt": "10.0"}
    )
    assert fatal(validator, model, data) == (
        "runtime tensorrt not available on this device: the artifact needs tensorrt >= 10.0"
    )


def test_a_device_without_onnxruntime_is_told_which_extra_installs_it(model: Path) -> None:
    # An agent installed without the onnxruntime extra (its fingerprint says so).
    validator = ManifestValidator(fingerprint=common_pb2.RuntimeFingerprint(), runs=10)
    data = manifest(model, min_runtime_versions={"onnxruntime": "1.13"})
    assert fatal(validator, model, data) == (
        "runtime onnxruntime not available on this device: the artifact needs "
        "onnxruntime >= 1.13 (pip install 'edgefleet[onnxruntime]')"
    )


def test_a_runtime_older_than_the_artifact_needs_is_fatal(
    validator: ManifestValidator, model: Path
) -> None:
    data = manifest(model, min_runtime_versions={"onnxruntime": "999.1"})
    reason = fatal(validator, model, data)
    assert reason == (
        f"runtime onnxruntime {ort.__version__} on this device is older than 999.1, "
        "the minimum the artifact needs"
    )


def test_release_numbers_compare_numerically() -> None:
    assert numeric_release("1.20.1") > numeric_release("1.17") > numeric_release("1.9.9")
    assert numeric_release("1.17") == numeric_release("1.17.0")
    assert numeric_release("10.0.1.6+cuda12") > numeric_release("10.0")
    assert numeric_release("") < numeric_release("0.1")


def test_a_malformed_golden_sample_is_fatal(validator: ManifestValidator, model: Path) -> None:
    parsed = common_pb2.ArtifactManifest()
    parsed.ParseFromString(manifest(model))
    parsed.golden[2].inputs[0].data = b"\x00" * 5
    reason = fatal(validator, model, parsed.SerializeToString())
    assert reason.startswith("golden sample 2 is malformed: ")
    assert "5 bytes of data" in reason


# ------------------------------------------------------------------ the child process


def test_a_model_that_hangs_the_runtime_times_out(tmp_path: Path) -> None:
    hang = endless_loop(tmp_path / "endless.onnx")
    x = np.zeros(1, dtype=np.float32)
    data = manifest(hang, [{"y": x}], xs=[x])
    started = time.monotonic()
    reason = fatal(ManifestValidator(timeout_s=3), hang, data)
    assert time.monotonic() - started < 30
    assert reason.startswith("validation in onnxruntime did not finish: ")
    assert "within 3 s" in reason and "hangs" in reason


def test_a_runtime_crash_is_fatal_with_the_signal(model: Path) -> None:
    # The child is replaced by a process that really dies of SIGSEGV, as a
    # runtime's native code would: what is tested is that the agent survives
    # it and says how the child died.
    segfault = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    reason = fatal(ManifestValidator(command=segfault), model, manifest(model))
    assert reason.startswith("the onnxruntime runtime crashed validating the artifact: ")
    assert "signal 11 SIGSEGV" in reason


def test_a_child_that_exits_without_a_result_names_the_exit_code(model: Path) -> None:
    quits = [sys.executable, "-c", "import sys; sys.stderr.write('out of luck\\n'); sys.exit(3)"]
    reason = fatal(ManifestValidator(command=quits), model, manifest(model))
    assert "measurement process died (exit 3): out of luck" in reason


def test_the_child_measures_what_onnxruntime_computes(model: Path) -> None:
    xs = golden_inputs(3)
    measured = measure_in_child(
        model, "onnxruntime", {"x": np.stack(xs)}, threads=1, runs=4, warmup=0, timeout_s=120
    )
    assert measured.output_names == ["scores", "features"]
    assert len(measured.latencies_ms) == 4
    expected = bare_outputs(model, xs)
    for k, name in enumerate(measured.output_names):
        np.testing.assert_allclose(
            measured.outputs[k], np.stack([e[name] for e in expected]), atol=1e-6
        )


# ------------------------------------------------------------------ in the update machine


def test_the_machine_rolls_back_an_artifact_that_fails_validation(
    validator: ManifestValidator, model: Path, tmp_path: Path
) -> None:
    data = model.read_bytes()
    signed = manifest(model, latency_budget_p95_ms=1e-6)
    digest = hashlib.sha256(data).hexdigest()
    faults = Faults()
    activator, reporter = FakeActivator(faults), FakeReporter(faults)
    machine = UpdateMachine(
        UpdateStore(tmp_path),
        Ports(
            downloader=FakeDownloader(data, faults=faults),
            verifier=ManifestVerifier(trusted_keys=TRUSTED, class_name=CLASS),
            validator=validator,
            activator=activator,
            reporter=reporter,
            sleep=lambda _s: None,
        ),
    )
    machine.assign(
        Assignment(
            model_name="scorer",
            model_version="1.0.0",
            artifact_digest=digest,
            artifact_size=len(data),
            manifest=signed,
            manifest_signature=SIGNER.sign(signed),
        )
    )
    record = machine.run_until_settled()
    assert record.history == [
        s.value
        for s in (
            State.IDLE,
            State.DOWNLOADING,
            State.VERIFYING,
            State.VALIDATING,
            State.ROLLING_BACK,
            State.FAILED,
            State.IDLE,
        )
    ]
    assert record.outcome == "failed"
    assert record.reason is not None and record.reason.startswith("p95 latency ")
    assert activator.paths == []  # never activated
    assert any(r[0] is State.FAILED and r[3] == record.reason for r in reporter.reports)


# ------------------------------------------------------------------ TFLite


@pytest.fixture(scope="module")
def tflite_scorer(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgefleet.controlplane.build.samples import Samples
    from edgefleet.controlplane.build.tflite_ladder import build_candidates
    from edgefleet.controlplane.build.toolchain import default_toolchains_dir, find_tflite
    from edgefleet.controlplane.build.types import BuildTarget

    toolchain = find_tflite(default_toolchains_dir())
    if toolchain is None:
        pytest.skip("TFLite toolchain not installed (edgefleet toolchain install tflite)")
    samples = Samples({"x": np.concatenate(golden_inputs(16))}, None, generated=False)
    fp32 = build_candidates(
        model,
        samples,
        tmp_path_factory.mktemp("tflite"),
        BuildTarget("pi", "tflite"),
        lambda line: None,
        toolchains_dir=toolchain.venv.parent,
    )[0]
    assert fp32.path is not None, fp32.error
    return fp32.path


def test_a_tflite_artifact_passes_against_onnxruntime_golden_outputs(
    validator: ManifestValidator, model: Path, tflite_scorer: Path
) -> None:
    # Golden outputs from the ONNX model in onnxruntime; the fp32 TFLite
    # conversion reproduces them within the manifest's 1e-4.
    data = manifest(model, runtime=common_pb2.RUNTIME_TFLITE, max_memory_mb=4096.0)
    validator.validate(tflite_scorer, data)
    result = validator.last_result
    assert result is not None and result.runtime == "tflite"
    assert result.golden_samples == GOLDEN and result.agreement == 1.0
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
