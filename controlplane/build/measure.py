"""Measuring candidates on the build host: size, fidelity to the fp32
model, latency and memory. Every candidate runs in a fresh child process
(controlplane.build.measure_worker) through the same runtime adapters the
agent serves with, so a crash, a leak or a runtime's arena in one
candidate cannot touch the build or the next candidate's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent.runtimes import TensorInfo
from controlplane.build.samples import Samples
from controlplane.build.types import Candidate, Measurement
from controlplane.errors import InvalidArgument

DEFAULT_RUNS = 200
# Runs before timing starts: first runs pay for lazy allocation, kernel
# selection and cold caches, which a serving device pays once.
WARMUP_RUNS = 5
CHILD_TIMEOUT_S = 900.0
# A last axis of one element has no argmax; such outputs agree when they are
# this close, relative to the reference's spread.
SCALAR_AGREEMENT_RTOL = 0.01


def reference_outputs(model: Path, samples: Samples, threads: int = 1) -> list[np.ndarray]:
    """The original model's outputs on every sample, run with ORT on CPU one
    sample at a time (a batch of one, as devices serve). One array per model
    output, stacked over samples: shape (samples, *batch-of-one output shape).
    Raises InvalidArgument when an output's shape varies between samples."""
    from agent.runtimes.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(model, threads=threads)
    per_sample = [runner.run(feed) for feed in samples.each()]
    stacked = []
    for k, spec in enumerate(runner.outputs):
        shapes = {outs[k].shape for outs in per_sample}
        if len(shapes) > 1:
            raise InvalidArgument(
                f"model output {spec.name!r} changes shape between samples ({sorted(shapes)}); "
                "builds compare candidates sample by sample and need each output's shape "
                "to follow from the input shape alone"
            )
        stacked.append(np.stack([outs[k] for outs in per_sample]))
    return stacked


def measurement_runtime(runtime: str) -> tuple[str, bool]:
    """The runtime to measure a candidate with, and whether it is a stand-in.
    TensorRT artifacts are ONNX files: where TensorRT is absent (no GPU on the
    build host) onnxruntime runs them, which checks the quantized graph's
    fidelity but says nothing about GPU latency or memory."""
    if runtime == "tensorrt":
        from agent.runtimes.tensorrt import tensorrt_version

        if tensorrt_version() is None:
            return "onnxruntime", True
    return runtime, False


def measure_with_outputs(
    candidate: Candidate,
    samples: Samples,
    reference_outputs: Sequence[np.ndarray],
    *,
    threads: int,
    onnx_inputs: Sequence[TensorInfo] | None = None,
    onnx_outputs: Sequence[TensorInfo] | None = None,
    runs: int = DEFAULT_RUNS,
) -> tuple[Measurement, list[np.ndarray] | None]:
    """Measure one candidate in a fresh child process, and return its
    outputs on every sample (stacked like `reference_outputs`; None when it
    could not run). A candidate that cannot be loaded or run gives a
    Measurement with `error` set, never an exception.

    - size: the artifact's bytes on disk.
    - latency: p50/p95 of `runs` single-sample inferences, cycling through
      the samples, after WARMUP_RUNS untimed ones, with `threads` threads.
    - peak memory: the child's peak resident set while loading the model and
      running it (warm-up and timed runs), minus its resident set just
      before loading, i.e. after the interpreter, numpy, the runtime
      library and the samples were already in memory. So it is what this
      model adds on a device that already runs the agent: weights, the
      runtime's arenas and buffers, its thread pool. On Linux the kernel's
      high-water mark is reset before loading; elsewhere the lifetime peak
      is used, which can only over-state it.
    - fidelity: max |candidate - reference| over all outputs, argmax
      agreement on the last axis of the first output, and accuracy against
      `samples.labels` when there are labels."""
    if candidate.path is None:
        return Measurement(size_bytes=0, error=candidate.error or "not built"), None
    size = candidate.path.stat().st_size
    runtime, proxy = measurement_runtime(candidate.runtime)
    with tempfile.TemporaryDirectory(prefix="measure-") as tmp:
        directory = Path(tmp)
        request = {
            "path": str(candidate.path),
            "runtime": runtime,
            "threads": threads,
            "runs": max(1, runs),
            "warmup": WARMUP_RUNS,
            "onnx_inputs": _specs(onnx_inputs),
            "onnx_outputs": _specs(onnx_outputs),
        }
        (directory / "request.json").write_text(json.dumps(request))
        np.savez(directory / "inputs.npz", **samples.arrays)  # type: ignore[arg-type]
        error = _run_child(directory)
        if error:
            return Measurement(size_bytes=size, error=error), None
        result = json.loads((directory / "result.json").read_text())
        with np.load(directory / "outputs.npz", allow_pickle=False) as archive:
            outputs = [archive[f"out_{k}"] for k in range(len(archive.files))]
    mismatch = _shape_mismatch(outputs, reference_outputs)
    if mismatch:
        return Measurement(size_bytes=size, error=mismatch), outputs
    latencies = np.asarray(result["latencies_ms"], dtype=np.float64)
    reference_first = reference_outputs[0]
    measurement = Measurement(
        size_bytes=size,
        latency_p50_ms=float(np.percentile(latencies, 50)),
        latency_p95_ms=float(np.percentile(latencies, 95)),
        peak_memory_mb=max(0.0, float(result["peak_rss_mb"]) - float(result["baseline_rss_mb"])),
        max_abs_diff=max_abs_diff(outputs, reference_outputs),
        agreement=agreement(outputs[0], reference_first),
        accuracy=accuracy(outputs[0], samples.labels),
        latency_is_proxy=proxy,
    )
    return measurement, outputs


def max_abs_diff(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """The largest absolute difference over every element of every output."""
    diffs = [
        float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
        for a, b in zip(outputs, reference, strict=True)
    ]
    return max(diffs, default=0.0)


def predictions(output: np.ndarray) -> np.ndarray:
    """Argmax over the last axis (the class axis of a classifier's scores)."""
    return np.asarray(np.argmax(output, axis=-1))


def agreement(output: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of argmax positions (over the last axis) where `output`
    picks what `reference` picks: for a classifier, the share of samples
    whose top class is unchanged. A last axis of one element has no argmax;
    there, the share of values within SCALAR_AGREEMENT_RTOL of the
    reference's range."""
    if output.size == 0:
        return 1.0
    if output.shape[-1] == 1:
        spread = float(np.ptp(reference)) or 1.0
        close = np.abs(output.astype(np.float64) - reference) <= SCALAR_AGREEMENT_RTOL * spread
        return float(np.mean(close))
    return float(np.mean(predictions(output) == predictions(reference)))


def accuracy(output: np.ndarray, labels: np.ndarray | None) -> float | None:
    """Top-1 accuracy of the first output's argmax against `labels`; None
    without labels or when the labels do not line up with the predictions
    (e.g. a detector's outputs)."""
    if labels is None or output.shape[-1] <= 1:
        return None
    predicted = predictions(output)
    if predicted.size != labels.size:
        return None
    return float(np.mean(predicted.reshape(labels.shape) == labels))


def _run_child(directory: Path) -> str:
    """Run the worker on `directory`; the error text, or "" on success."""
    env = dict(os.environ)
    # The child must not inherit a parent's thread-count overrides for BLAS
    # or OpenMP: the runtime's own thread setting is what is measured.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.pop(name, None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "controlplane.build.measure_worker", str(directory)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"measurement did not finish within {CHILD_TIMEOUT_S:.0f} s"
    result = directory / "result.json"
    if not result.exists():
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
        return f"measurement process died ({how}){': ' + tail[0] if tail else ''}"
    error = json.loads(result.read_text()).get("error", "")
    return str(error)


def _specs(specs: Sequence[TensorInfo] | None) -> list[dict[str, object]] | None:
    if specs is None:
        return None
    return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in specs]


def _shape_mismatch(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> str:
    if len(outputs) != len(reference):
        return f"candidate has {len(outputs)} outputs; the model has {len(reference)}"
    for k, (a, b) in enumerate(zip(outputs, reference, strict=True)):
        if a.shape != b.shape:
            return (
                f"output {k} has shape {list(a.shape[1:])} per sample; the model's is "
                f"{list(b.shape[1:])}"
            )
    return ""
