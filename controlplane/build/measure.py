"""Measuring candidates on the build host: size, fidelity to the fp32
model, latency and memory. Every candidate runs in a fresh child process
(agent.runtimes.measure, the same code a device validates an artifact with)
through the same runtime adapters the agent serves with, so a crash, a leak
or a runtime's arena in one candidate cannot touch the build or the next
candidate's numbers."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgefleet.agent.runtimes import TensorInfo
from edgefleet.agent.runtimes.measure import (
    Measured,
    MeasureFailed,
    max_abs_diff,
    measure_in_child,
    predictions,
)
from edgefleet.controlplane.build.samples import Samples
from edgefleet.controlplane.build.types import Candidate, Measurement, is_noisy
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.fidelity import OutputKind, OutputScore, OutputSpec, lowest, score

DEFAULT_RUNS = 200
# Measurements of one candidate at most: the first and, while the timing is
# noisy, two more (each a fresh child over every sample).
MAX_MEASUREMENTS = 3
CHILD_TIMEOUT_S = 900.0


def reference_outputs(
    model: Path, samples: Samples, threads: int = 1, *, max_bytes: int | None = None
) -> list[np.ndarray]:
    """The original model's outputs on every sample, run with ORT on CPU one
    sample at a time (a batch of one, as devices serve, and as every
    candidate is measured: a batched run could pick other kernels and differ
    from it in the last bits). One array per model output, stacked over
    samples: shape (samples, *batch-of-one output shape), allocated once
    from the first sample's outputs and filled in place, so nothing per
    sample is kept.

    With `max_bytes`, only the first samples whose outputs fit in it (at
    least one) are run: the arrays are then shorter than `samples`, and the
    caller uses that many. Raises InvalidArgument when an output's shape
    varies between samples."""
    from edgefleet.agent.runtimes.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(model, threads=threads)
    count = len(samples)
    stacked: list[np.ndarray] = []
    for index in range(count):
        outputs = runner.run(samples.one(index))
        if index == 0:
            per_sample = sum(out.nbytes for out in outputs)
            if max_bytes is not None and per_sample > 0:
                count = max(1, min(count, max_bytes // per_sample))
                if samples.steps > 1:
                    # Whole sequences: a candidate is judged over each.
                    count = max(samples.steps, count // samples.steps * samples.steps)
            stacked = [np.empty((count, *out.shape), out.dtype) for out in outputs]
        for spec, out, into in zip(runner.outputs, outputs, stacked, strict=True):
            if out.shape != into.shape[1:]:
                raise InvalidArgument(
                    f"model output {spec.name!r} changes shape between samples "
                    f"({list(into.shape[1:])} on sample 0, {list(out.shape)} on sample {index}); "
                    "builds compare candidates sample by sample and need each output's shape "
                    "to follow from the input shape alone"
                )
            into[index] = out
        if index + 1 == count:
            break
    return stacked


def unroll_sequences(model: Path, samples: Samples, threads: int = 1) -> Samples:
    """`samples` in sequences (samples.steps > 1) with every step's state
    input holding the state the fp32 model had there: each sequence run
    step by step in ORT, each step's state output fed into the next step's
    state input (step 0 keeps the sequence's initial state). The flat
    samples then serve everything that takes one sample at a time
    (reference outputs, calibration, golden samples). Unchanged without
    sequences."""
    if samples.steps <= 1 or not samples.state:
        return samples
    from edgefleet.agent.runtimes.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(model, threads=threads)
    index = {spec.name: k for k, spec in enumerate(runner.outputs)}
    # Fresh, writable arrays for the state inputs (loaded ones may be
    # read-only views of one initial value).
    arrays = dict(samples.arrays)
    for _, name in samples.state:
        arrays[name] = np.array(arrays[name])
    unrolled = dataclasses.replace(samples, arrays=arrays)
    for start in range(0, len(samples), samples.steps):
        for step in range(start, start + samples.steps - 1):
            outputs = runner.run(unrolled.one(step))
            for output, name in samples.state:
                fed = unrolled.one(step + 1)[name]
                value = np.asarray(outputs[index[output]])
                if value.size != fed.size:
                    raise InvalidArgument(
                        f"state output {output!r} has shape {list(value.shape)} but its input "
                        f"{name!r} is fed {list(fed.shape)}; it cannot be fed back"
                    )
                arrays[name][step + 1] = value.reshape(arrays[name][step + 1].shape)
    return unrolled


def measurement_runtime(runtime: str) -> tuple[str, bool]:
    """The runtime to measure a candidate with, and whether it is a stand-in.
    TensorRT artifacts are ONNX files: where TensorRT is absent (no GPU on the
    build host) onnxruntime runs them, which checks the quantized graph's
    fidelity but says nothing about GPU latency or memory."""
    if runtime == "tensorrt":
        from edgefleet.agent.runtimes.tensorrt import tensorrt_version

        if tensorrt_version() is None:
            return "onnxruntime", True
    return runtime, False


def measure_with_outputs(
    candidate: Candidate,
    samples: Samples,
    reference_outputs: Sequence[np.ndarray],
    *,
    threads: int,
    specs: Sequence[OutputSpec],
    onnx_inputs: Sequence[TensorInfo] | None = None,
    onnx_outputs: Sequence[TensorInfo] | None = None,
    runs: int = DEFAULT_RUNS,
    max_measurements: int = MAX_MEASUREMENTS,
) -> tuple[Measurement, list[np.ndarray] | None]:
    """Measure one candidate in a fresh child process, and return its
    outputs on every sample (stacked like `reference_outputs`; None when it
    could not run). A candidate that cannot be loaded or run gives a
    Measurement with `error` set, never an exception.

    - size: the artifact's bytes on disk.
    - latency: p50/p95 of `runs` single-sample inferences, cycling through
      the samples, after WARMUP_RUNS untimed ones, with `threads` threads.
      While the timed runs are too spread (Measurement.noisy: the host was
      busy), the candidate is measured again, up to `max_measurements` in
      all, and the steadiest measurement is kept; its spread, the count and
      the host's load are recorded, so a verdict can say what it stood on.
    - peak memory: the child's peak resident set while loading the model and
      running it (warm-up and timed runs), minus its resident set just
      before loading, i.e. after the interpreter, numpy, the runtime
      library and the samples were already in memory. So it is what this
      model adds on a device that already runs the agent: weights, the
      runtime's arenas and buffers, its thread pool. On Linux the kernel's
      high-water mark is reset before loading; elsewhere the lifetime peak
      is used, which can only over-state it.
    - fidelity: each output judged by its kind's metric (`specs`, one per
      output: edgefleet.fidelity), the lowest judged one as `agreement`,
      max |candidate - reference| over all outputs, and accuracy against
      `samples.labels` on the first class-scores output when there are
      labels. Samples in sequences (`samples.steps` > 1) are run with the
      candidate's own state looped through each sequence (`samples.state`),
      as it serves."""
    if candidate.path is None:
        return Measurement(size_bytes=0, error=candidate.error or "not built"), None
    size = candidate.path.stat().st_size
    runtime, proxy = measurement_runtime(candidate.runtime)
    kept: Measured | None = None
    taken = 0
    loads: list[float] = []
    while taken < max(1, max_measurements):
        try:
            measured = measure_in_child(
                candidate.path,
                runtime,
                # Each sample as fed: a batch of one (what a device serves)
                # where the model has a batch axis.
                samples.fed(),
                threads=threads,
                runs=runs,
                timeout_s=CHILD_TIMEOUT_S,
                onnx_inputs=onnx_inputs,
                onnx_outputs=onnx_outputs,
                # Over sequences, the candidate's own state is looped.
                steps=samples.steps,
                state=samples.state,
            )
        except MeasureFailed as exc:
            return Measurement(size_bytes=size, error=exc.message), None
        taken += 1
        loads.append(host_load())
        if kept is None or spread(measured.latencies_ms)[0] < spread(kept.latencies_ms)[0]:
            kept = measured
        if proxy or not _noisy(kept.latencies_ms):
            break
    assert kept is not None
    outputs = kept.outputs
    mismatch = _shape_mismatch(outputs, reference_outputs)
    if mismatch:
        return Measurement(size_bytes=size, error=mismatch), outputs
    scores = judge(specs, outputs, reference_outputs)
    cv, ratio = spread(kept.latencies_ms)
    measurement = Measurement(
        size_bytes=size,
        latency_p50_ms=kept.latency_percentile(50),
        latency_p95_ms=kept.latency_percentile(95),
        peak_memory_mb=kept.added_memory_mb,
        max_abs_diff=_max_abs_diff(outputs, reference_outputs),
        agreement=_lowest_value(scores),
        fidelity=scores,
        accuracy=accuracy(outputs, specs, samples.labels),
        latency_is_proxy=proxy,
        latency_cv=cv,
        latency_p95_over_p50=ratio,
        latency_measurements=taken,
        host_load=max(loads),
    )
    return measurement, outputs


def host_load() -> float:
    """The build host's 1-minute load average per core (0 where unknown)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


def spread(latencies_ms: Sequence[float]) -> tuple[float, float]:
    """(coefficient of variation, p95 / p50) of timed runs; (0, 1) for fewer
    than two runs."""
    if len(latencies_ms) < 2:
        return 0.0, 1.0
    values = np.asarray(latencies_ms, dtype=np.float64)
    mean = float(values.mean())
    p50, p95 = (float(x) for x in np.percentile(values, [50, 95]))
    cv = float(values.std()) / mean if mean > 0 else 0.0
    return cv, (p95 / p50 if p50 > 0 else 1.0)


def _noisy(latencies_ms: Sequence[float]) -> bool:
    cv, ratio = spread(latencies_ms)
    p50 = float(np.median(np.asarray(latencies_ms, dtype=np.float64))) if latencies_ms else 0.0
    return is_noisy(cv, ratio, p50)


def judge(
    specs: Sequence[OutputSpec],
    outputs: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
) -> tuple[OutputScore, ...]:
    """Every output's fidelity by its kind's metric, over bounded slices of
    the samples where the metric allows it (fidelity.score of the whole
    arrays copies them to float64 several times)."""
    return tuple(
        _score_in_slices(spec, out, ref)
        for spec, out, ref in zip(specs, outputs, reference, strict=True)
    )


def _score_in_slices(spec: OutputSpec, output: np.ndarray, reference: np.ndarray) -> OutputScore:
    parts = _slices(output)
    if len(parts) == 1 or spec.kind is not OutputKind.CLASS_SCORES or output.shape[-1] < 2:
        # Mask IoU, PSNR, cosines and one-column scores (judged against the
        # whole reference's spread) are not means of per-slice values; the
        # outputs are bounded by MAX_BUILD_OUTPUT_BYTES already.
        return score(spec, output, reference)
    weights = [len(output[part]) for part in parts]
    pieces = [score(spec, output[part], reference[part]) for part in parts]
    total = sum(weights)
    value = sum(p.value * w for p, w in zip(pieces, weights, strict=True)) / total
    details = {
        key: sum(p.details[key] * w for p, w in zip(pieces, weights, strict=True)) / total
        for key in pieces[0].details
    }
    return OutputScore(spec.name, spec.kind, pieces[0].metric, value, details)


def _lowest_value(scores: Sequence[OutputScore]) -> float:
    worst = lowest(scores)
    return 1.0 if worst is None else worst.value


def accuracy(
    outputs: Sequence[np.ndarray], specs: Sequence[OutputSpec], labels: np.ndarray | None
) -> float | None:
    """Top-1 accuracy of the first class-scores output's argmax against
    `labels`; None without labels, without a class-scores output, or when
    the labels do not line up with the predictions."""
    if labels is None:
        return None
    output = next(
        (o for o, s in zip(outputs, specs, strict=True) if s.kind is OutputKind.CLASS_SCORES),
        None,
    )
    if output is None or output.shape[-1] <= 1:
        return None
    predicted = predictions(output)
    if predicted.size != labels.size:
        return None
    return float(np.mean(predicted.reshape(labels.shape) == labels))


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


# Fidelity is computed over this many bytes of outputs at a time: comparing
# whole arrays makes float64 copies several times their size.
FIDELITY_CHUNK_BYTES = 4 * 1024 * 1024


def _slices(output: np.ndarray) -> list[slice]:
    """Consecutive slices of the samples of about FIDELITY_CHUNK_BYTES each."""
    step = max(1, FIDELITY_CHUNK_BYTES // max(1, output[:1].nbytes))
    return [slice(start, start + step) for start in range(0, len(output), step)]


def _max_abs_diff(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """agent.runtimes.measure.max_abs_diff, over bounded slices of the samples."""
    worst = 0.0
    for a, b in zip(outputs, reference, strict=True):
        for part in _slices(a):
            worst = max(worst, max_abs_diff([a[part]], [b[part]]))
    return worst
