"""The Validating step: the artifact runs on this device as its manifest says
it must, before the agent activates it.

The model is loaded and run in a child process (agent.runtimes.measure, the
code the build host measured the artifact with), so a model that crashes or
hangs its runtime fails the update instead of taking the agent down. Checks,
in order, each failing with the numbers that failed it:

- the manifest's runtime is available here, at least at the version the
  artifact needs (min_runtime_versions);
- the artifact loads in it, with the class's thread count;
- every golden sample runs, and every output is within the manifest's
  tolerance of the expected one, per element |got - expected| <= atol +
  rtol * |expected| (the rule the build set the tolerances for);
- each judged output's fidelity to the golden outputs, by the metric of its
  kind (the manifest's output_specs, edgefleet.fidelity, as the build
  judged it): class scores' argmax agreement at least min_agreement, any
  other kind's metric (mask IoU, decoded exact match, cosine similarity) at
  least min_fidelity; a manifest without output kinds (an older build)
  checks argmax agreement on the first output;
- p95 latency over `runs` runs is within the class budget, when it has one;
- the memory the model adds (resident set growth from before loading to the
  peak while loading and running) is within the class limit, when it has one.

A failure is a FatalUpdateError: the same artifact on the same device fails
the same way. Only not being able to start the check at all (no process, no
temporary directory) is retryable."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from edgefleet.agent.hardware import detect_runtime
from edgefleet.agent.runtimes import TENSORRT, TFLITE
from edgefleet.agent.runtimes.measure import (
    CRASHED,
    LOAD,
    RUN,
    TIMED_OUT,
    UNAVAILABLE,
    Measured,
    MeasureFailed,
    agreement,
    measure_in_child,
)
from edgefleet.agent.serving import InvalidInput, decode_tensor
from edgefleet.extras import install_command
from edgefleet.v1 import common_pb2

from .activation import RUNTIME_NAMES, model_spec
from .ports import FatalUpdateError, RetryableUpdateError

if TYPE_CHECKING:
    # The agent imports this module at boot; numpy (~12 MB of RSS) is imported
    # by the functions below, which run only when an update is validated.
    import numpy as np

# Timed runs for the p95: enough for a stable tail on a small model, few
# enough that a slow model on a small board still validates in seconds.
DEFAULT_RUNS = 20
# ...and the timed runs stop once they took this long: a model far over
# budget is judged on the runs it managed.
DEFAULT_TIME_CAP_S = 10.0
# Warm-up runs before timing (the first runs pay for lazy allocation).
DEFAULT_WARMUP = 2
# The whole check, load included. Generous: on a Jetson a TensorRT artifact
# builds its engine on first load, which takes minutes.
DEFAULT_TIMEOUT_S = 900.0

# min_runtime_versions key -> the RuntimeFingerprint field with this device's version.
_VERSION_FIELDS = {
    "onnxruntime": "onnxruntime_version",
    TFLITE: "litert_version",
    "litert": "litert_version",
    "ai-edge-litert": "litert_version",
    "tflite-runtime": "litert_version",
    TENSORRT: "tensorrt_version",
}
# The extra that installs each runtime an agent may lack (pyproject.toml).
_RUNTIME_EXTRAS = {
    "onnxruntime": "onnxruntime",
    TFLITE: "litert",
    "litert": "litert",
    "ai-edge-litert": "litert",
}


@dataclass(frozen=True)
class ValidationResult:
    """What validating an artifact measured on this device (for reports)."""

    runtime: str
    threads: int
    golden_samples: int
    # Timed runs behind the latency figures.
    runs: int
    latency_p50_ms: float
    latency_p95_ms: float
    # The memory the model adds: peak resident set while loading and running
    # it, minus the resident set just before loading. MiB.
    peak_memory_mb: float
    # Largest |got - expected| over every golden output; None without golden samples.
    max_abs_diff: float | None
    # Argmax agreement with the golden outputs, 0..1; None without golden samples.
    agreement: float | None

    def summary(self) -> str:
        """One line for logs and status reports."""
        parts = [
            f"{self.runtime}, {self.threads} thread(s)",
            f"p95 {self.latency_p95_ms:.3f} ms over {self.runs} runs",
            f"peak +{self.peak_memory_mb:.1f} MiB",
        ]
        if self.max_abs_diff is not None:
            parts.append(
                f"{self.golden_samples} golden samples, max |diff| {self.max_abs_diff:.3g}"
            )
        if self.agreement is not None:
            parts.append(f"agreement {self.agreement:.3f}")
        return ", ".join(parts)


@dataclass(frozen=True)
class _Golden:
    # Each input stacked over the samples (axis 0), every sample as it is fed.
    inputs: dict[str, np.ndarray]
    # Per sample: expected output name -> array.
    expected: list[dict[str, np.ndarray]]


class ManifestValidator:
    """Implements the Validator port: loads and runs the artifact on this
    device in a child process and checks it against its manifest.
    `last_result` holds the latest measurement (also when a check failed on
    it; None when nothing could be measured)."""

    def __init__(
        self,
        *,
        runs: int = DEFAULT_RUNS,
        time_cap_s: float = DEFAULT_TIME_CAP_S,
        warmup: int = DEFAULT_WARMUP,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        fingerprint: common_pb2.RuntimeFingerprint | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        """`fingerprint`: this device's runtimes (detected when needed if
        None). `command`: the child's command line instead of
        `python -m edgefleet.agent.runtimes.measure` (the work directory is appended)."""
        self.runs = runs
        self.time_cap_s = time_cap_s
        self.warmup = warmup
        self.timeout_s = timeout_s
        self.fingerprint = fingerprint
        self.command = tuple(command) if command is not None else None
        self.last_result: ValidationResult | None = None

    def validate(self, path: Path, manifest: bytes) -> None:
        """Raise FatalUpdateError when the artifact at `path` must not be
        activated on this device, RetryableUpdateError when the check itself
        could not run; return None when it passed (see `last_result`)."""
        self.last_result = None
        parsed = common_pb2.ArtifactManifest()
        try:
            parsed.ParseFromString(manifest)
        except DecodeError as exc:
            raise FatalUpdateError(f"manifest does not parse: {exc}") from exc
        runtime = RUNTIME_NAMES.get(parsed.runtime)
        if runtime is None:
            raise FatalUpdateError(
                f"manifest names runtime {parsed.runtime}, which this agent does not know"
            )
        if not path.is_file():
            raise FatalUpdateError(f"artifact {path.name[:12]} is missing from {path.parent}")
        self._check_versions(parsed)
        golden = _decode_golden(parsed)
        threads = parsed.threads or 1
        measured = self._measure(path, runtime, parsed, golden, threads)
        max_diff = _check_tolerance(golden, measured, parsed) if golden.expected else None
        agreed = _fidelity(golden, measured, parsed) if golden.expected else None
        self.last_result = ValidationResult(
            runtime=runtime,
            threads=threads,
            golden_samples=len(golden.expected),
            runs=len(measured.latencies_ms),
            latency_p50_ms=measured.latency_percentile(50),
            latency_p95_ms=measured.latency_percentile(95),
            peak_memory_mb=measured.added_memory_mb,
            max_abs_diff=None if max_diff is None else max_diff[0],
            agreement=None if agreed is None else agreed[0],
        )
        result = self.last_result
        # Checked after last_result is set, so a failed check still reports
        # every number that was measured.
        if max_diff is not None and max_diff[1]:
            raise FatalUpdateError(max_diff[1])
        if agreed is not None and agreed[1]:
            raise FatalUpdateError(agreed[1] + f" ({len(golden.expected)} golden samples)")
        budget = parsed.latency_budget_p95_ms
        if budget > 0 and result.latency_p95_ms > budget:
            raise FatalUpdateError(
                f"p95 latency {result.latency_p95_ms:.3f} ms over {result.runs} runs "
                f"({runtime}, {threads} thread(s)) exceeds the class budget of {budget:g} ms"
            )
        limit = parsed.max_memory_mb
        if limit > 0 and result.peak_memory_mb > limit:
            raise FatalUpdateError(
                f"the model adds {result.peak_memory_mb:.2f} MiB of memory at its peak "
                f"(resident set growth while loading and running it), over the class "
                f"limit of {limit:g} MiB"
            )

    # ------------------------------------------------------------ helpers

    def _check_versions(self, manifest: common_pb2.ArtifactManifest) -> None:
        if not manifest.min_runtime_versions:
            return
        fingerprint = detect_runtime() if self.fingerprint is None else self.fingerprint
        for name, needed in sorted(manifest.min_runtime_versions.items()):
            field = _VERSION_FIELDS.get(name)
            if field is None:
                raise FatalUpdateError(
                    f"the artifact needs runtime {name} >= {needed}, which this agent does not know"
                )
            have = str(getattr(fingerprint, field))
            if not have:
                extra = _RUNTIME_EXTRAS.get(name)
                how = f" ({install_command(extra)})" if extra else ""
                raise FatalUpdateError(
                    f"runtime {name} not available on this device: the artifact needs "
                    f"{name} >= {needed}{how}"
                )
            if numeric_release(have) < numeric_release(needed):
                raise FatalUpdateError(
                    f"runtime {name} {have} on this device is older than {needed}, the "
                    f"minimum the artifact needs"
                )

    def _measure(
        self,
        path: Path,
        runtime: str,
        manifest: common_pb2.ArtifactManifest,
        golden: _Golden,
        threads: int,
    ) -> Measured:
        spec = model_spec(manifest)
        try:
            return measure_in_child(
                path,
                runtime,
                golden.inputs,
                threads=threads,
                runs=self.runs,
                warmup=self.warmup,
                time_cap_s=self.time_cap_s,
                timeout_s=self.timeout_s,
                onnx_inputs=spec.inputs or None,
                onnx_outputs=spec.outputs or None,
                command=self.command,
            )
        except MeasureFailed as exc:
            raise FatalUpdateError(_failure_reason(exc, runtime, golden)) from exc
        except OSError as exc:
            # No process or no temporary directory: the device's trouble,
            # not the artifact's, and it may pass.
            raise RetryableUpdateError(
                f"cannot run the validation process: {exc.strerror or exc}"
            ) from exc


def _failure_reason(exc: MeasureFailed, runtime: str, golden: _Golden) -> str:
    if exc.stage == UNAVAILABLE:
        return f"runtime {runtime} not available on this device: {exc.message}"
    if exc.stage == LOAD:
        return f"cannot load the artifact in {runtime}: {exc.message}"
    if exc.stage == RUN:
        if exc.sample is None:
            what = "the artifact"
        elif golden.expected:
            what = f"golden sample {exc.sample}"
        else:
            what = "the artifact (on zero inputs)"
        return f"{what} failed to run in {runtime}: {exc.message}"
    if exc.stage == CRASHED:
        return f"the {runtime} runtime crashed validating the artifact: {exc.message}"
    if exc.stage == TIMED_OUT:
        return (
            f"validation in {runtime} did not finish: {exc.message} (the model hangs the "
            "runtime or is far too slow for this device)"
        )
    return f"validation failed in {runtime}: {exc.message}"


def numeric_release(version: str) -> tuple[int, ...]:
    """The numeric release of a version: "1.20.1" -> (1, 20, 1),
    "10.0.1.6+cuda12" -> (10, 0, 1, 6); trailing zeros dropped so that
    "1.17" and "1.17.0" compare equal."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    parts = [int(p) for p in match.group().split(".")] if match else []
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _decode_golden(manifest: common_pb2.ArtifactManifest) -> _Golden:
    """The golden samples' inputs stacked for the child, and their expected
    outputs; FatalUpdateError for a malformed sample."""
    import numpy as np

    per_sample: list[dict[str, np.ndarray]] = []
    expected: list[dict[str, np.ndarray]] = []
    for i, sample in enumerate(manifest.golden):
        try:
            per_sample.append({t.name: _tensor(t) for t in sample.inputs})
            expected.append({t.name: _tensor(t) for t in sample.expected_outputs})
        except InvalidInput as exc:
            raise FatalUpdateError(f"golden sample {i} is malformed: {exc.message}") from exc
    if not per_sample:
        return _Golden({}, [])
    inputs: dict[str, np.ndarray] = {}
    for name in per_sample[0]:
        shapes = {s[name].shape if name in s else None for s in per_sample}
        if len(shapes) > 1:
            # The child runs the samples as one stacked array per input; the
            # build's golden samples always share shapes (one sample set).
            raise FatalUpdateError(
                f"golden samples disagree on input {name!r} (shapes "
                f"{sorted(str(s) for s in shapes)}); this agent validates golden samples "
                "of one shape"
            )
        inputs[name] = np.stack([s[name] for s in per_sample])
    return _Golden(inputs, expected)


def _tensor(t: common_pb2.TensorData) -> np.ndarray:
    return decode_tensor(t.name, t.dtype, list(t.shape), t.data)


def _check_tolerance(
    golden: _Golden, measured: Measured, manifest: common_pb2.ArtifactManifest
) -> tuple[float, str]:
    """(max |got - expected| over every golden output, the failure reason
    or "" when every element is within atol + rtol * |expected|)."""
    import numpy as np

    index = {name: k for k, name in enumerate(measured.output_names)}
    atol, rtol = manifest.atol, manifest.rtol
    overall = 0.0
    failure = ""
    for name in golden.expected[0]:
        if name not in index:
            return overall, (
                f"golden output {name!r} is not an output of the artifact (its outputs: "
                f"{', '.join(measured.output_names)})"
            )
        worst: tuple[float, int, float, float] | None = None  # excess, sample, diff, allowed
        largest, outside, total = 0.0, 0, 0
        for i, sample in enumerate(golden.expected):
            want = sample[name].astype(np.float64)
            got = measured.outputs[index[name]][i].astype(np.float64)
            if got.shape != want.shape:
                return overall, (
                    f"output {name!r} has shape {list(got.shape)} on golden sample {i}; "
                    f"the golden output's is {list(want.shape)}"
                )
            close = np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
            diff = np.abs(got - want)
            # NaN where only one side is NaN is as far off as it gets; NaN on
            # both sides is a match.
            diff = np.where(np.isnan(diff), np.where(close, 0.0, np.inf), diff)
            allowed = atol + rtol * np.abs(want)
            largest = max(largest, float(np.max(diff, initial=0.0)))
            outside += int(np.count_nonzero(~close))
            total += int(close.size)
            if not close.all():
                excess = np.where(close, -np.inf, diff - allowed)
                at = int(np.argmax(excess))
                candidate = (
                    float(excess.flat[at]),
                    i,
                    float(diff.flat[at]),
                    float(allowed.flat[at]),
                )
                if worst is None or candidate[0] > worst[0]:
                    worst = candidate
        overall = max(overall, largest)
        if worst is not None and not failure:
            failure = (
                f"output {name!r} is outside the golden tolerance: max |diff| {largest:.4g}, "
                f"{outside} of {total} values beyond atol {atol:.3g} + rtol {rtol:.3g} x "
                f"|expected| (worst: golden sample {worst[1]}, |diff| {worst[2]:.4g} where "
                f"{worst[3]:.4g} is allowed)"
            )
    return overall, failure


def _fidelity(
    golden: _Golden, measured: Measured, manifest: common_pb2.ArtifactManifest
) -> tuple[float, str] | None:
    """(the lowest judged output's fidelity to the golden outputs, why it
    fails or ""), by each output's kind as the build judged the artifact;
    None when no output can be compared (the tolerance check names why)."""
    import numpy as np

    from edgefleet.fidelity import OutputKind, score
    from edgefleet.fidelity_wire import UnknownKind, spec_from_wire

    if not manifest.output_specs:
        return _argmax_agreement(golden, measured, manifest)
    results: list[tuple[float, str]] = []
    for wire in manifest.output_specs:
        name = wire.name
        if name not in golden.expected[0] or name not in measured.output_names:
            continue
        try:
            spec = spec_from_wire(wire)
        except UnknownKind:
            continue  # a kind from a newer build: the tolerance check still holds
        if not spec.judged:
            continue
        got = measured.outputs[measured.output_names.index(name)]
        want = np.stack([s[name] for s in golden.expected])
        if got.shape != want.shape:
            continue
        result = score(spec, got, want)
        floor = (
            manifest.min_agreement
            if spec.kind is OutputKind.CLASS_SCORES
            else manifest.min_fidelity
        )
        failure = ""
        if result.value < floor:
            failure = (
                f"output {name!r}: {result.metric} {result.value:.3f} against the golden "
                f"outputs is below the manifest's minimum {floor:.3f}"
            )
        results.append((result.value, failure))
    # A failing output first (the lowest of those), else the lowest value.
    return min(results, key=lambda r: (not r[1], r[0]), default=None)


def _argmax_agreement(
    golden: _Golden, measured: Measured, manifest: common_pb2.ArtifactManifest
) -> tuple[float, str] | None:
    """For a manifest without output kinds: argmax agreement on the first
    model output the golden samples cover, as builds before kinds judged."""
    import numpy as np

    order = [t.name for t in manifest.outputs] or measured.output_names
    name = next((n for n in order if n in golden.expected[0]), None)
    if name is None or name not in measured.output_names:
        return None
    got = measured.outputs[measured.output_names.index(name)]
    want = np.stack([s[name] for s in golden.expected])
    if got.shape != want.shape:
        return None  # the tolerance check names the shape mismatch
    value = agreement(got, want)
    if value >= manifest.min_agreement:
        return value, ""
    return value, (
        f"argmax agreement {value:.3f} with the golden outputs (output {name!r}) is below "
        f"the manifest's minimum {manifest.min_agreement:.3f}"
    )
