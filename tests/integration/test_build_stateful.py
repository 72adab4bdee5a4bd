"""Builds of models with state (an output fed back into an input at the next
step) and of inputs without a batch axis, in real ONNX Runtime: a tiny GRU
built here, and silero-vad (a real pretrained voice-activity detector from
its PyPI wheel). Samples pushed as sequences are unrolled through the fp32
model, and every candidate is judged over each sequence with its own state
looped (docs/operators/models.md#sample-data)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.runtimes.onnxruntime import OnnxRuntimeRunner
from edgefleet.controlplane.build import samples as build_samples
from edgefleet.controlplane.build.measure import (
    measure_with_outputs,
    reference_outputs,
    unroll_sequences,
)
from edgefleet.controlplane.build.pipeline import run_build
from edgefleet.controlplane.build.samples import load_samples
from edgefleet.controlplane.build.toolchain import find_tflite
from edgefleet.controlplane.build.types import BuildTarget, Candidate
from edgefleet.controlplane.domain.onnx_inspect import (
    SampleInfo,
    inspect_model,
    inspect_sample_data,
    output_specs,
    state_pairs,
)
from edgefleet.controlplane.errors import InvalidArgument

RUNS = 5  # latency runs per candidate: the numbers are not what is tested
HIDDEN = 8
SEQUENCES, STEPS = 4, 8


def gru_model(path: Path, *, state_scale: float = 1.0) -> Path:
    """A GRU step: `x [1, 1, 4]` (one step, batch 1), `h0 [1, 1, 8]`, a
    scalar float `gain`; outputs `y = Y * gain` and `hn` (the next h0).
    `state_scale` other than 1 multiplies `hn` by it: a model whose outputs
    at one step are right but whose state is not."""
    rng = np.random.default_rng(7)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
        for name, shape in (
            ("W", (1, 3 * HIDDEN, 4)),
            ("R", (1, 3 * HIDDEN, HIDDEN)),
            ("B", (1, 6 * HIDDEN)),
        )
    ]
    nodes = [
        helper.make_node("GRU", ["x", "W", "R", "B", "", "h0"], ["Y", "h"], hidden_size=HIDDEN),
        helper.make_node("Mul", ["Y", "gain"], ["y"]),
    ]
    if state_scale == 1.0:
        nodes.append(helper.make_node("Identity", ["h"], ["hn"]))
    else:
        weights.append(numpy_helper.from_array(np.float32(state_scale), "scale"))
        nodes.append(helper.make_node("Mul", ["h", "scale"], ["hn"]))
    graph = helper.make_graph(
        nodes,
        "gru",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 1, HIDDEN]),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, HIDDEN]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, 1, HIDDEN]),
        ],
        weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def gru(tmp_path: Path) -> tuple[Path, Path]:
    """The GRU and its sample data: 4 sequences of 8 steps of `x`, a
    constant `gain`, `h0` left out (zeros)."""
    model = gru_model(tmp_path / "gru.onnx")
    x = np.random.default_rng(0).normal(0, 1, (SEQUENCES, STEPS, 1, 1, 4)).astype(np.float32)
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=x, gain=np.float32(2.0))
    return model, samples


def test_sequences_are_unrolled_through_the_fp32_models_state(gru: tuple[Path, Path]) -> None:
    model, sample_path = gru
    info = inspect_model(model)
    assert state_pairs(info) == (("hn", "h0"),)
    assert inspect_sample_data(sample_path, info) == SampleInfo(32, False, steps=STEPS)
    loaded = load_samples(sample_path, info.inputs, state=state_pairs(info))
    assert (len(loaded), loaded.steps, loaded.state) == (32, STEPS, (("hn", "h0"),))
    assert "all pushed sequences of 8 steps (32 samples), state looped through hn -> h0" in (
        loaded.describe()
    )
    # Each sample is fed exactly as the model takes it.
    assert {k: v.shape for k, v in loaded.one(3).items()} == {
        "x": (1, 1, 4),
        "h0": (1, 1, HIDDEN),
        "gain": (),
    }
    samples = unroll_sequences(model, loaded)
    # The state input of every step is what the fp32 model gave at the step
    # before, run here step by step on its own.
    runner = OnnxRuntimeRunner(model)
    x = np.load(sample_path)["x"]
    for sequence in range(SEQUENCES):
        h = np.zeros((1, 1, HIDDEN), np.float32)
        for step in range(STEPS):
            index = sequence * STEPS + step
            np.testing.assert_array_equal(samples.one(index)["h0"], h)
            np.testing.assert_array_equal(samples.one(index)["x"], x[sequence, step])
            _, h = runner.run({"x": x[sequence, step], "h0": h, "gain": np.float32(2.0)})
    # Heads keep whole sequences.
    assert len(samples.head(20)) == 16 and len(samples.head(3)) == STEPS


def test_a_builds_sample_budget_counts_steps_and_keeps_constants_whole(
    gru: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, sample_path = gru
    info = inspect_model(model)
    monkeypatch.setattr(build_samples, "MAX_BUILD_SAMPLES", 16)
    used = load_samples(sample_path, info.inputs, state=state_pairs(info))
    # Two whole sequences, evenly spaced: the first and the third.
    assert (len(used), used.steps) == (16, STEPS)
    x = np.load(sample_path)["x"]
    np.testing.assert_array_equal(used.arrays["x"][STEPS:], x[2].reshape(STEPS, 1, 1, 4))
    assert "using 2 of 4 pushed sequences of 8 steps (16 samples)" in used.describe()
    # One sequence longer than the budget: its first steps.
    monkeypatch.setattr(build_samples, "MAX_BUILD_SAMPLES", 5)
    used = load_samples(sample_path, info.inputs, state=state_pairs(info))
    assert (len(used), used.steps) == (5, 5)
    # A constant whose axis 0 is not samples is read whole, however few
    # samples are picked.
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "table"], ["out"])],
        "lookup",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("table", TensorProto.FLOAT, [4, 3]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])],
    )
    matmul = tmp_path / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), matmul)
    constant = tmp_path / "constant.npz"
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(constant, x=np.ones((50, 4), np.float32), table=table)
    monkeypatch.setattr(build_samples, "MAX_BUILD_SAMPLES", 2)
    used = load_samples(constant, inspect_model(matmul).inputs)
    assert len(used) == 2 and used.one(1)["x"].shape == (1, 4)
    np.testing.assert_array_equal(used.one(1)["table"], table)
    assert reference_outputs(matmul, used)[0].shape == (2, 1, 3)
    # It goes with every sample to the measuring child: its bytes count
    # against the samples' budget (16 + 48 bytes a sample here).
    monkeypatch.setattr(build_samples, "MAX_BUILD_SAMPLES", 1000)
    monkeypatch.setattr(build_samples, "MAX_BUILD_SAMPLE_BYTES", 64 * 10)
    assert len(load_samples(constant, inspect_model(matmul).inputs)) == 10


def test_candidates_are_judged_with_their_own_state_looped(
    gru: tuple[Path, Path], tmp_path: Path
) -> None:
    model, sample_path = gru
    info = inspect_model(model)
    samples = unroll_sequences(model, load_samples(sample_path, info.inputs, state=(("hn", "h0"),)))
    reference = reference_outputs(model, samples)
    kinds = output_specs(info, ())
    # The fp32 model itself, its state looped: the reference, step for step.
    same = Candidate("fp32", "onnxruntime", "fp32", model)
    measurement, outputs = measure_with_outputs(
        same, samples, reference, threads=1, specs=kinds, runs=RUNS
    )
    assert not measurement.error and outputs is not None
    assert measurement.max_abs_diff < 1e-5
    # A candidate whose outputs are right at each step but whose state is
    # halved: right at every sequence's first step (the pushed state), wrong
    # after, as it would be serving.
    leaky = Candidate(
        "leaky", "onnxruntime", "fp32", gru_model(tmp_path / "leaky.onnx", state_scale=0.5)
    )
    measurement, outputs = measure_with_outputs(
        leaky, samples, reference, threads=1, specs=kinds, runs=RUNS
    )
    assert not measurement.error and outputs is not None
    y = np.abs(outputs[0] - reference[0]).reshape(SEQUENCES, STEPS, -1).max(axis=2)
    assert y[:, 0].max() < 1e-5
    assert y[:, 1:].min() > 1e-3, y
    assert measurement.max_abs_diff > 0.05
    # Judged by its kinds: y (regression) loses fidelity, the state is not judged.
    by_output = {score.output: score for score in measurement.fidelity}
    assert by_output["y"].metric == "cosine similarity" and by_output["y"].value < 0.999
    assert not by_output["hn"].judged
    # Judged sample by sample instead (each step fed the fp32 state), the
    # same candidate's `y` would look perfect: the looping is what sees it.
    flat = dataclasses.replace(samples, steps=1, state=())
    _, outputs = measure_with_outputs(leaky, flat, reference, threads=1, specs=kinds, runs=RUNS)
    assert outputs is not None and np.abs(outputs[0] - reference[0]).max() < 1e-5


def test_a_build_of_a_gru_pushed_as_sequences(gru: tuple[Path, Path], tmp_path: Path) -> None:
    model, sample_path = gru
    outcome = run_build(
        model, sample_path, BuildTarget("pi4", "onnxruntime"), tmp_path / "work",
        lambda fraction, message: None, runs=RUNS,
    )  # fmt: skip
    print("\n".join(outcome.log))
    assert any("sequences of 8 steps (32 samples)" in line for line in outcome.log)
    assert outcome.chosen is not None and outcome.golden is not None
    fp32 = next(e for e in outcome.candidates if e.candidate.name == "fp32-opt")
    assert not fp32.measurement.error and fp32.measurement.max_abs_diff < 1e-4
    # Golden samples are first steps (the pushed, zero state), which a
    # device reproduces running the chosen artifact on them as they are.
    assert outcome.chosen.candidate.path is not None
    runner = OnnxRuntimeRunner(outcome.chosen.candidate.path)
    for sample in outcome.golden.samples:
        assert not sample.inputs["h0"].any() and sample.inputs["gain"].shape == ()
        y, hn = runner.run(sample.inputs)
        np.testing.assert_allclose(y, sample.outputs["y"], atol=outcome.golden.atol)
        np.testing.assert_allclose(hn, sample.outputs["hn"], atol=outcome.golden.atol)


def test_generated_inputs_follow_the_shape_rules(tmp_path: Path) -> None:
    """No sample data: a GRU still builds (zeros for its state, its scalar
    fed as a scalar); a model the generated inputs do not suit fails saying
    which input, and what to push."""
    model = gru_model(tmp_path / "gru.onnx")
    outcome = run_build(
        model, None, BuildTarget("pi4", "onnxruntime"), tmp_path / "work",
        lambda fraction, message: None, runs=RUNS,
    )  # fmt: skip
    assert outcome.chosen is not None
    assert any("32 generated samples" in line for line in outcome.log)
    # A lookup into a table of 3 rows: generated indices (0-9) overrun it.
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["out"])],
        "lookup",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 2])],
        [numpy_helper.from_array(np.ones((3, 2), np.float32), "table")],
    )
    lookup = tmp_path / "lookup.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), lookup)
    with pytest.raises(
        InvalidArgument,
        match=r"No sample data was pushed, and the generated inputs \(uniform \[0, 1\) floats, "
        r"small integers, zeros for state\) may not suit input idx: push sample data .*"
        r"docs/operators/models.md#sample-data",
    ):
        run_build(
            lookup, None, BuildTarget("pi4", "onnxruntime"), tmp_path / "work2",
            lambda fraction, message: None, runs=RUNS,
        )  # fmt: skip


# -- silero-vad: a real stateful model without a batch axis on its state ------------------------


def vad_signal(sequences: int, steps: int, seed: int = 0) -> np.ndarray:
    """Synthetic 16 kHz audio shaped (sequences, steps, 1, 512): quiet noise
    with a tone burst in every other sequence."""
    rng = np.random.default_rng(seed)
    audio = rng.normal(0, 0.01, (sequences, steps * 512))
    t = np.arange(steps * 512) / 16000
    burst = (t > 0.05) & (t < 0.2)
    audio[::2] += 0.5 * np.sin(2 * np.pi * 440 * t) * burst
    return audio.reshape(sequences, steps, 1, 512).astype(np.float32)


def test_silero_vad_builds_from_sequences(silero_vad: Path, tmp_path: Path) -> None:
    info = inspect_model(silero_vad)
    assert state_pairs(info) == (("stateN", "state"),)
    samples = tmp_path / "vad.npz"
    # Its state's shape has a dynamic dimension: no zeros to guess.
    np.savez(samples, input=vad_signal(SEQUENCES, STEPS), sr=np.int64(16000))
    with pytest.raises(InvalidArgument, match=r"state input 'state'.*\[2, -1, 128\].*dynamic"):
        inspect_sample_data(samples, info)
    np.savez(
        samples,
        input=vad_signal(SEQUENCES, STEPS),
        state=np.zeros((2, 1, 128), np.float32),
        sr=np.int64(16000),
    )
    assert inspect_sample_data(samples, info) == SampleInfo(32, False, steps=STEPS)
    outcome = run_build(
        silero_vad, samples, BuildTarget("pi4", "onnxruntime"), tmp_path / "work",
        lambda fraction, message: None, runs=RUNS,
    )  # fmt: skip
    print("\n".join(outcome.log))
    assert outcome.chosen is not None, outcome.log
    fp32 = next(e for e in outcome.candidates if e.candidate.name == "fp32-opt")
    assert not fp32.measurement.error and fp32.measurement.max_abs_diff < 1e-4
    # Its network sits in If subgraphs, which dynamic quantization leaves
    # alone: no int8 file that is fp32 inside.
    dynamic = next(e for e in outcome.candidates if e.candidate.name == "int8-dynamic")
    assert "dynamic quantization found nothing to quantize" in dynamic.error
    assert outcome.golden is not None
    for sample in outcome.golden.samples:
        assert sample.inputs["sr"].shape == () and sample.inputs["state"].shape == (2, 1, 128)
    # Without sample data the build says why it cannot run, and what to push.
    with pytest.raises(InvalidArgument, match=r"No sample data was pushed.*push sample data"):
        run_build(
            silero_vad, None, BuildTarget("pi4", "onnxruntime"), tmp_path / "work2",
            lambda fraction, message: None, runs=RUNS,
        )  # fmt: skip


@pytest.mark.skipif(find_tflite() is None, reason="the TFLite toolchain (onnx2tf) is not installed")
def test_silero_vad_for_tflite_is_refused_naming_what_onnx2tf_cannot_convert(
    silero_vad: Path, tmp_path: Path
) -> None:
    """onnx2tf cannot convert silero-vad's If node (its decoder squeezes a
    dimension the static shapes leave at 128): every rung fails, the reason
    said once, naming the node, the error and the shapes the inputs were
    fixed to."""
    samples = tmp_path / "vad.npz"
    np.savez(
        samples,
        input=vad_signal(SEQUENCES, STEPS),
        state=np.zeros((2, 1, 128), np.float32),
        sr=np.int64(16000),
    )
    outcome = run_build(
        silero_vad, samples, BuildTarget("pi", "tflite"), tmp_path / "work",
        lambda fraction, message: None, runs=RUNS,
    )  # fmt: skip
    assert outcome.chosen is None
    first, *others = outcome.candidates
    assert first.candidate.name == "tflite-fp32"
    assert first.error.startswith("onnx2tf cannot convert the If node 'If_0' ("), first.error
    assert "inputs were fixed to input [1, 512], state [2, 1, 128], sr []" in first.error
    assert "Traceback" not in first.error and "\n" not in first.error
    assert [e.error for e in others] == ["the conversion failed (see tflite-fp32)"] * 2
