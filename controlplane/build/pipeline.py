"""One build: a pushed model and a device class's constraints in, every
candidate measured and judged out, with the chosen artifact's golden
samples and tolerances for its manifest.

inspect -> samples -> fp32 reference outputs -> the runtime's ladder ->
measure each candidate -> verdict -> golden samples (of the chosen one, and
of the lighter fallback when the class asks for one)."""

from __future__ import annotations

import dataclasses
import importlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgefleet import fidelity
from edgefleet.agent.runtimes import TensorInfo as RuntimeTensorInfo
from edgefleet.controlplane.build.measure import (
    DEFAULT_RUNS,
    accuracy,
    measure_with_outputs,
    reference_outputs,
    unroll_sequences,
)
from edgefleet.controlplane.build.samples import MAX_BUILD_OUTPUT_BYTES, MiB, Samples, load_samples
from edgefleet.controlplane.build.shapes import fit_samples
from edgefleet.controlplane.build.types import (
    BuildResult,
    BuildTarget,
    Candidate,
    Evaluated,
    Golden,
    GoldenSample,
    Measurement,
)
from edgefleet.controlplane.build.verdict import (
    DEFAULT_MIN_RETENTION,
    PRECISIONS,
    evaluate,
    pick_fallback,
    retention,
)
from edgefleet.controlplane.domain.onnx_inspect import (
    ModelInfo,
    TensorInfo,
    inspect_model,
    output_specs,
)
from edgefleet.controlplane.errors import DomainError, FailedPrecondition, InvalidArgument
from edgefleet.fidelity import OutputKind, OutputSpec

Progress = Callable[[float, str], None]
Ladder = Callable[[Path, Samples, Path, BuildTarget, Callable[[str], None]], list[Candidate]]

# The module holding each runtime's `build_candidates` (same signature as
# controlplane.build.ort_ladder.build_candidates), imported only when a
# build needs it: the TFLite and TensorRT toolchains are heavy and optional.
LADDERS = {
    "onnxruntime": "edgefleet.controlplane.build.ort_ladder",
    "tflite": "edgefleet.controlplane.build.tflite_ladder",
    "tensorrt": "edgefleet.controlplane.build.tensorrt_ladder",
}

# Golden samples travel inside the signed manifest, so they are few and small.
GOLDEN_MAX = 8
GOLDEN_MAX_BYTES = 1024 * 1024
# Device results are checked against the host's with the artifact's own
# deviation from fp32 times this headroom, but never tighter than the floor
# for its precision (kernels differ between CPUs even for the same file).
TOLERANCE_HEADROOM = 2.0
ATOL_FLOOR = {"fp32": 1e-4, "fp16": 1e-3, "int8": 1e-2}
RTOL = {"fp32": 1e-3, "fp16": 1e-2, "int8": 5e-2}


def run_build(
    model_path: Path,
    sample_path: Path | None,
    target: BuildTarget,
    workdir: Path,
    progress: Progress,
    *,
    runs: int = DEFAULT_RUNS,
    check_cancelled: Callable[[], None] = lambda: None,
) -> BuildResult:
    """Build, measure and judge every candidate of `target.runtime`'s ladder
    for `model_path`. Progress goes from 0 to 1 with a short message per
    step; the same messages and the per-candidate details go to the log.

    Raises InvalidArgument when the model is not valid ONNX or does not run
    in ONNX Runtime (its fp32 outputs are the reference every candidate is
    judged against), and FailedPrecondition when the runtime's ladder cannot
    be loaded on this build host. A candidate that fails to build or run is
    not an error: it is judged failed, with the reason.

    `check_cancelled` runs at every log line (between steps, rungs and
    candidates) and raises build.types.BuildCancelled to stop the build."""
    started = time.monotonic()
    lines: list[str] = []

    def log(message: str) -> None:
        check_cancelled()
        lines.append(f"[{time.monotonic() - started:7.2f}s] {message}")

    def step(fraction: float, message: str) -> None:
        log(message)
        progress(fraction, message)

    step(0.0, "inspecting the model")
    info = inspect_model(model_path)
    specs = tuple(output_specs(info, target.outputs))
    state = fidelity.state_pairs(specs)
    samples = load_samples(sample_path, info.inputs, state=state)
    # A TFLite class's fixed input shapes: the samples must fit the artifact.
    samples = fit_samples(samples, info.inputs, target.input_shapes, log)
    log(
        f"model: opset {info.opset}, {info.producer or 'unknown producer'}; "
        f"{samples.describe()}{', with labels' if samples.labels is not None else ''}"
    )
    log("outputs: " + "; ".join(_describe_spec(spec) for spec in specs))
    ladder = _ladder(target.runtime)

    step(0.05, "running the fp32 model for reference outputs")
    try:
        # Sequences: each step's state input set to the fp32 model's state.
        samples = unroll_sequences(model_path, samples, target.threads)
        reference = reference_outputs(
            model_path, samples, target.threads, max_bytes=MAX_BUILD_OUTPUT_BYTES
        )
    except DomainError:
        raise
    except Exception as exc:  # ORT raises its own untyped errors
        raise InvalidArgument(_not_running(exc, samples, info, state)) from exc
    if len(reference[0]) < len(samples):
        per_sample = sum(out[:1].nbytes for out in reference)
        log(
            f"the model's outputs are {per_sample:,} bytes per sample: using the first "
            f"{len(reference[0]):,} of the {len(samples):,} samples, whose outputs fit "
            f"MAX_BUILD_OUTPUT_BYTES={MAX_BUILD_OUTPUT_BYTES // MiB} MiB"
        )
        samples = samples.head(len(reference[0]))
    _check_reference(reference, specs)
    reference_accuracy = accuracy(reference, specs, samples.labels)
    if reference_accuracy is not None:
        log(f"fp32 reference accuracy on the sample labels: {reference_accuracy:.4f}")

    step(0.1, f"building the {target.runtime} candidates")
    workdir.mkdir(parents=True, exist_ok=True)
    candidates = ladder(model_path, samples, workdir, target, log)

    onnx_inputs = _runtime_specs(info.inputs)
    onnx_outputs = _runtime_specs(info.outputs)
    measured: list[tuple[Candidate, Measurement]] = []
    # Each candidate's golden samples, taken as soon as it is measured: its
    # outputs on every sample are dropped before the next one runs.
    goldens: dict[str, Golden] = {}
    for index, candidate in enumerate(candidates):
        step(0.4 + 0.5 * index / max(1, len(candidates)), f"measuring {candidate.name}")
        measurement, candidate_outputs = measure_with_outputs(
            candidate,
            samples,
            reference,
            threads=target.threads,
            specs=specs,
            onnx_inputs=onnx_inputs,
            onnx_outputs=onnx_outputs,
            runs=runs,
        )
        measured.append((candidate, measurement))
        if candidate_outputs is not None and not measurement.error:
            goldens[candidate.name] = golden_samples(
                candidate.precision, measurement, samples, candidate_outputs, info, specs, target
            )
        del candidate_outputs
        log(f"{candidate.name}: {describe(measurement)}")

    step(0.9, "judging the candidates")
    fp32_p95 = min(
        (m.latency_p95_ms for c, m in measured if c.precision == "fp32" and not m.error),
        default=math.inf,
    )
    if math.isinf(fp32_p95):
        log("no fp32 candidate ran: latency is not compared with fp32 when choosing")
    evaluated = tuple(evaluate(measured, target, reference_accuracy, fp32_p95))
    for e in evaluated:
        verdict = "passes" if e.passed else "fails: " + "; ".join(e.reasons)
        log(f"{e.candidate.name}: {verdict}")
        for note in e.notes:
            log(f"{e.candidate.name}: note: {note}")
    chosen = next((e for e in evaluated if e.chosen), None)
    if chosen is None:
        step(1.0, f"no candidate meets the constraints of class {target.class_name!r}")
        return BuildResult(evaluated, reference_accuracy, log=tuple(lines))
    if target.quantization in PRECISIONS and chosen.candidate.precision != target.quantization:
        log(
            f"no {target.quantization} candidate passes; chose {chosen.candidate.name} "
            "by the auto rule instead"
        )
    golden = goldens[chosen.candidate.name]
    kept, basis = retention(chosen.measurement, reference_accuracy)
    log(
        f"golden: {len(golden.samples)} samples, atol {golden.atol:.3g}, rtol {golden.rtol:.3g}, "
        f"min agreement {golden.min_agreement:.3f}; chosen keeps {basis} {kept:.4f} of fp32"
    )
    fallback, fallback_reason = pick_fallback(evaluated, target)
    fallback_golden = None
    if fallback is not None:
        evaluated = tuple(
            dataclasses.replace(e, fallback=True) if e is fallback else e for e in evaluated
        )
        fallback_golden = goldens[fallback.candidate.name]
        log(describe_fallback(fallback, chosen, fallback_golden))
    elif fallback_reason:
        # Not a failure: the primary ships; devices keep serving it when hot.
        log(f"no {target.fallback} fallback: {fallback_reason}")
    step(1.0, f"chose {chosen.candidate.name}")
    return BuildResult(
        evaluated,
        reference_accuracy,
        log=tuple(lines),
        golden=golden,
        fallback_golden=fallback_golden,
        fallback_reason=fallback_reason,
    )


def _not_running(
    exc: Exception, samples: Samples, info: ModelInfo, state: Sequence[tuple[str, str]]
) -> str:
    """Why the fp32 model did not run on its samples, and, for generated
    ones, which inputs they may not suit."""
    message = f"the model does not run in ONNX Runtime on its sample inputs: {exc}"
    if not samples.generated:
        return message
    state_inputs = {name for _, name in state}
    generated = [t.name for t in info.inputs if t.name not in state_inputs]
    # ORT names an input it refuses as 'name' or "input: name".
    named = [n for n in generated if f"'{n}'" in str(exc) or f"input: {n} " in f"{exc} "]
    return (
        f"{message}. No sample data was pushed, and the generated inputs (uniform [0, 1) "
        "floats, small integers, zeros for state) may not suit input"
        f"{'s' if len(named or generated) > 1 else ''} {', '.join(named or generated)}: push "
        "sample data with the model (docs/operators/models.md#sample-data)"
    )


def describe_fallback(fallback: Evaluated, chosen: Evaluated, golden: Golden) -> str:
    """The log line of the fallback: what it saves against the primary."""
    f, c = fallback.measurement, chosen.measurement
    return (
        f"fallback: {fallback.candidate.name}, {f.size_bytes:,} bytes "
        f"({f.size_bytes / c.size_bytes:.0%} of {chosen.candidate.name}'s {c.size_bytes:,}), "
        f"p95 {f.latency_p95_ms:.3f} ms vs {c.latency_p95_ms:.3f} ms, "
        f"peak +{f.peak_memory_mb:.1f} MiB vs +{c.peak_memory_mb:.1f} MiB; "
        f"golden: {len(golden.samples)} samples, atol {golden.atol:.3g}, rtol {golden.rtol:.3g}"
    )


def describe(m: Measurement) -> str:
    """One log line of a measurement."""
    if m.error:
        return f"error: {m.error}"
    quality = "; ".join(s.describe() for s in m.fidelity) or f"agreement {m.agreement:.4f}"
    if m.accuracy is not None:
        quality += f"; accuracy {m.accuracy:.4f}"
    timing = f"CV {m.latency_cv:.2f}, p95/p50 {m.latency_p95_over_p50:.2f}"
    if m.latency_measurements > 1:
        timing += f", {m.latency_measurements} measurements"
    return (
        f"{m.size_bytes:,} bytes, p50 {m.latency_p50_ms:.3f} ms, p95 {m.latency_p95_ms:.3f} ms "
        f"({timing}, host load {m.host_load:.2f}/core), peak +{m.peak_memory_mb:.1f} MiB, "
        f"max|diff| {m.max_abs_diff:.3g}; {quality}"
    )


def _check_reference(reference: Sequence[np.ndarray], specs: Sequence[OutputSpec]) -> None:
    """The fp32 model's outputs are what every candidate is judged against:
    each must be finite (a model that overflows on the samples, or takes the
    square root of a negative one, gives NaN, which no metric can judge),
    and each declaration must fit the sizes the model left dynamic."""
    for spec, out in zip(specs, reference, strict=True):
        finite = np.isfinite(out.reshape(len(out), -1)).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise InvalidArgument(
                f"the model's own output {spec.name!r} holds NaN or infinite values on "
                f"{len(bad)} of the {len(out)} samples (the first: sample {int(bad[0])}): the "
                "fp32 outputs every candidate is judged against must be finite; check the "
                "samples' values (a float32 overflows past 3.4e38) or the model"
            )
    try:
        fidelity.check_against_outputs(specs, [tuple(out.shape[1:]) for out in reference])
    except fidelity.SpecError as exc:
        raise InvalidArgument(str(exc)) from exc


def _describe_spec(spec: OutputSpec) -> str:
    how = "declared" if spec.declared else "inferred"
    judged = f"judged by {fidelity.METRIC[spec.kind]}" if spec.judged else "not judged"
    return f"{spec.describe()} ({how}; {judged})"


def _ladder(runtime: str) -> Ladder:
    module_name = LADDERS.get(runtime)
    if module_name is None:
        raise InvalidArgument(
            f"no build ladder for runtime {runtime!r}; expected one of {sorted(LADDERS)}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FailedPrecondition(
            f"the {runtime} build ladder cannot be loaded on this build host ({exc}); "
            f"install its toolchain or build for another runtime"
        ) from exc
    ladder: Ladder = module.build_candidates
    return ladder


def _runtime_specs(specs: Sequence[TensorInfo]) -> list[RuntimeTensorInfo]:
    return [RuntimeTensorInfo(t.name, t.dtype, t.shape) for t in specs]


def golden_samples(
    precision: str,
    m: Measurement,
    samples: Samples,
    outputs: list[np.ndarray],
    info: ModelInfo,
    specs: Sequence[OutputSpec],
    target: BuildTarget,
) -> Golden:
    """A candidate's golden samples and tolerances, from its outputs on the
    build host, should it be chosen. Copies: nothing here keeps `outputs`
    (every sample's) alive."""
    atol = max(ATOL_FLOOR.get(precision, 1e-2), TOLERANCE_HEADROOM * m.max_abs_diff)
    rtol = RTOL.get(precision, 5e-2)
    output_names = [t.name for t in info.outputs]
    scores = next(
        (o for o, spec in zip(outputs, specs, strict=True) if spec.kind is OutputKind.CLASS_SCORES),
        None,
    )
    # In sequences a candidate ran with its own state looped, while a sample
    # holds the fp32 model's state: the two agree only at a sequence's first
    # step, so only first steps can be golden.
    allowed = range(0, len(outputs[0]), samples.steps) if samples.steps > 1 else None
    indices = golden_indices(scores, atol, samples, outputs, allowed=allowed)
    golden = tuple(
        GoldenSample(
            {name: array.copy() for name, array in samples.one(i).items()},
            {name: out[i].copy() for name, out in zip(output_names, outputs, strict=True)},
        )
        for i in indices
    )
    # Near ties were left out of the golden set, so a device running the
    # same artifact should reproduce every argmax; with enough samples one
    # flip is tolerated rather than failing a device on a single borderline
    # case.
    count = len(golden)
    min_agreement = 1.0 if count < 4 else (count - 1) / count
    floor = target.fidelity_floor
    return Golden(
        golden,
        atol,
        rtol,
        min_agreement,
        outputs=tuple(specs),
        min_fidelity=DEFAULT_MIN_RETENTION if floor is None else floor,
    )


def golden_indices(
    scores: np.ndarray | None,
    atol: float,
    samples: Samples,
    outputs: list[np.ndarray],
    *,
    allowed: Sequence[int] | None = None,
) -> list[int]:
    """Which samples become golden: at most GOLDEN_MAX whose inputs and
    outputs fit GOLDEN_MAX_BYTES (at least one), in sample order, preferring
    those whose top two class scores (of the first class-scores output,
    `scores`) differ by more than 2 x atol, whose argmax a correct device
    therefore cannot flip within tolerance. `allowed`: the samples that may
    be golden (default: all)."""
    count = len(outputs[0])
    candidates = list(range(count) if allowed is None else allowed)
    clear: list[int] = []
    if scores is not None and scores.ndim >= 2 and scores.shape[-1] >= 2:
        top2 = np.sort(scores.reshape(count, -1, scores.shape[-1]), axis=-1)[..., -2:]
        margins = (top2[..., 1] - top2[..., 0]).min(axis=1)
        clear = [i for i in candidates if margins[i] > 2 * atol]
    clear_set = set(clear)
    order = clear + [i for i in candidates if i not in clear_set]
    chosen: list[int] = []
    used = 0
    for i in order[:GOLDEN_MAX]:
        size = sum(a[i].nbytes for a in samples.arrays.values()) + sum(o[i].nbytes for o in outputs)
        if chosen and used + size > GOLDEN_MAX_BYTES:
            break
        chosen.append(i)
        used += size
    return sorted(chosen)
