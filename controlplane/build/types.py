"""The values a build passes around, and the two that cross the process
boundary between the control plane and a build worker: a BuildJob in, a
BuildResult out.

The boundary is a ProcessPoolExecutor (services.build_runner), which pickles
a job's arguments and its return value. So these are plain frozen
dataclasses that pickle as they are, golden arrays included (at most
pipeline.GOLDEN_MAX_BYTES): no hand-written wire format to keep in step
with the fields. JSON appears only where SQL stores a value (BuildTarget in
a build row, a TensorRTSpec in a candidate's report): `to_json` and
`from_json` are that storage form."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.fidelity import OutputScore, OutputSpec


class BuildCancelled(BaseException):
    """Raised in a build worker when its job was cancelled. A BaseException,
    as asyncio.CancelledError is: the ladders catch Exception to judge a rung
    failed, and a cancel must not read as one rung's failure."""


@dataclass(frozen=True)
class BuildTarget:
    """What a device class asks of its artifact (its constraint profile)."""

    class_name: str
    runtime: str  # onnxruntime | tflite | tensorrt
    quantization: str = "auto"  # fp32 | fp16 | int8 | auto
    max_model_size_mb: float | None = None
    latency_budget_p95_ms: float | None = None
    max_memory_mb: float | None = None
    min_accuracy_retention: float | None = None
    accelerator: str = ""
    threads: int = 1
    speed_factor: float = 1.0
    microcontroller: bool = False
    # Also publish a lighter fallback artifact in this precision ("": none;
    # fp16, int8 or auto): verdict.pick_fallback.
    fallback: str = ""
    # The model version's own judging spec: every output's kind (declared at
    # push or inferred; empty: inferred at build time) and its fidelity
    # floor, which replaces the class's min_accuracy_retention.
    outputs: tuple[OutputSpec, ...] = ()
    min_fidelity: float | None = None

    @property
    def fidelity_floor(self) -> float | None:
        """The floor every judged output's metric must reach: the version's,
        else the class's; None: the default (verdict.DEFAULT_MIN_RETENTION)."""
        return self.min_fidelity if self.min_fidelity is not None else self.min_accuracy_retention

    # TFLite: (input name, static shape) the conversion fixes the model's
    # dynamic input dimensions to, sorted by name (the class's
    # --input-shape; domain/input_shapes.py). Empty for other runtimes.
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The form a build row stores (and the dedup key hashes). A version
        that declares nothing stores what builds stored before."""
        data = dataclasses.asdict(self)
        data["outputs"] = [o.to_json() for o in self.outputs]
        for key in ("outputs", "min_fidelity"):
            if not data[key]:
                del data[key]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BuildTarget:
        """A target as `to_json` stored it (JSON made its tuples lists)."""
        fields = dict(data)
        fields["outputs"] = tuple(OutputSpec.from_json(o) for o in fields.get("outputs", ()))
        fields["input_shapes"] = tuple(
            (str(name), tuple(dims)) for name, dims in fields.get("input_shapes") or ()
        )
        return cls(**fields)


@dataclass(frozen=True)
class ShapeRange:
    """One input's shapes in a TensorRT optimization profile. The names are
    the TensorRTBuildSpec.ShapeRange message's."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class TensorRTSpec:
    """How a device builds its TensorRT engine from the artifact's ONNX (the
    TensorRTBuildSpec message; tensorrt_ladder.engine_build_spec)."""

    precision: str  # fp16 | int8
    workspace_mb: int
    # Only inputs with a dynamic dimension have a range.
    profile: tuple[ShapeRange, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The message's JSON mapping, which is also the form the agent's
        engine builder takes (agent.runtimes.tensorrt.build_engine)."""
        return {
            "precision": self.precision,
            "workspace_mb": self.workspace_mb,
            "profile": [
                {"input": r.input, "min": list(r.min), "opt": list(r.opt), "max": list(r.max)}
                for r in self.profile
            ],
        }


@dataclass(frozen=True)
class Candidate:
    """One rung of the ladder, as built (not yet measured)."""

    name: str  # "fp32-opt", "fp16", "int8-dynamic", "int8-static-qdq", "tflite-int8", ...
    runtime: str
    precision: str  # fp32 | fp16 | int8
    path: Path | None  # None when it could not be built
    media_type: str = "application/onnx"
    error: str = ""  # why it could not be built
    # Files shipped beside the artifact (the TFLite Micro C source).
    companion: Path | None = None
    # TensorRT: how the device builds its engine.
    tensorrt_spec: TensorRTSpec | None = None
    # Minimum runtime versions the artifact needs, e.g. {"onnxruntime": "1.17"}.
    min_runtime_versions: dict[str, str] = field(default_factory=dict)
    # The input shapes the artifact accepts, in ONNX terms (names, dtypes,
    # layout; -1: any size), when they differ from the ONNX model's: a
    # TFLite artifact fixes dynamic dimensions. Empty: the model's own.
    accepted_inputs: tuple[TensorShape, ...] = ()
    # Remarks that are not failures, e.g. the shapes a TFLite artifact was
    # fixed to (BuildCandidate.notes).
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorShape:
    """One input as an artifact accepts it (a TensorSpec)."""

    name: str
    dtype: str
    shape: tuple[int, ...]  # -1: any size
    # The ONNX model's names of the dimensions still free ("" elsewhere).
    dim_names: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The TensorSpec JSON form the registry stores (api.convert reads it)."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "dim_names": list(self.dim_names),
        }


# A timing spread beyond either bound is noise, not the model: the build
# measures again (measure.MAX_MEASUREMENTS in all). A quiet host's runs of a
# small model show a CV of 0.05-0.15 and p95/p50 of 1.1-1.3; a busy loop on
# every core gave 0.4-1.2 and 2-4.7.
MAX_LATENCY_CV = 0.3
MAX_P95_OVER_P50 = 1.6
# ...unless p95 - p50 is under this: below it the spread is timer and
# scheduler jitter (a 0.01 ms model showed p95/p50 1.9 on a quiet host),
# which no latency budget is set at.
MIN_NOISE_MS = 0.1


def is_noisy(cv: float, p95_over_p50: float, p50_ms: float) -> bool:
    """Whether timed runs are too spread to judge a latency budget on."""
    spread_ms = p50_ms * (p95_over_p50 - 1.0)
    return (cv > MAX_LATENCY_CV or p95_over_p50 > MAX_P95_OVER_P50) and spread_ms >= MIN_NOISE_MS


@dataclass(frozen=True)
class Measurement:
    """What running a candidate on the build host showed."""

    size_bytes: int
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    peak_memory_mb: float = 0.0
    max_abs_diff: float = 0.0
    # The lowest judged output's fidelity (its kind's metric) to the fp32
    # reference over the samples, 0..1; each output's is in `fidelity`.
    agreement: float = 0.0
    fidelity: tuple[OutputScore, ...] = ()
    # Accuracy against the sample labels, when there are labels.
    accuracy: float | None = None
    error: str = ""  # set when the candidate could not be run
    # Latency and memory came from a stand-in runtime (TensorRT candidates run
    # in onnxruntime on a build host without TensorRT): they show fidelity,
    # not device speed, so budgets are checked on the device instead.
    latency_is_proxy: bool = False
    # How steady the timing was: the coefficient of variation (stdev / mean)
    # and p95/p50 of the timed runs of the measurement kept, how many
    # measurements were taken (another is taken while one is noisy), and
    # the build host's 1-minute load average per core while measuring.
    latency_cv: float = 0.0
    latency_p95_over_p50: float = 0.0
    latency_measurements: int = 1
    host_load: float = 0.0

    @property
    def noisy(self) -> bool:
        """Whether the kept timing is too spread to judge a budget on."""
        return is_noisy(self.latency_cv, self.latency_p95_over_p50, self.latency_p50_ms)


@dataclass(frozen=True)
class Evaluated:
    """A candidate, its measurement and the verdict on it."""

    candidate: Candidate
    measurement: Measurement
    passed: bool
    # Each constraint missed and by how much, e.g. "size 9.7 MB > max 4 MB (+143%)".
    reasons: tuple[str, ...] = ()
    chosen: bool = False
    # Published as the class's lighter fallback artifact (verdict.pick_fallback).
    fallback: bool = False
    # Remarks that are not failures, e.g. a latency within a few percent of
    # the budget, or timing that stayed noisy.
    notes: tuple[str, ...] = ()

    @property
    def error(self) -> str:
        """Why the candidate could not be built or run; empty when it ran."""
        return self.candidate.error or self.measurement.error


@dataclass(frozen=True, eq=False)
class GoldenSample:
    """One sample for the manifest: inputs and the chosen artifact's outputs
    on them, keyed by the ONNX model's input and output names, each array a
    batch of one."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]

    # Arrays have no single truth value, so the generated __eq__ (which
    # compares the dicts) would raise; equal means same names, same arrays.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GoldenSample):
            return NotImplemented
        return _same_arrays(self.inputs, other.inputs) and _same_arrays(self.outputs, other.outputs)


def _same_arrays(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )


@dataclass(frozen=True)
class Golden:
    """The chosen artifact's golden samples, and how closely a device must
    reproduce them: per element, |device - golden| <= atol + rtol * |golden|;
    for class scores, the share of argmax positions that must match; for
    every other judged output, its kind's metric (`outputs`) at least
    `min_fidelity`."""

    samples: tuple[GoldenSample, ...]
    atol: float
    rtol: float
    min_agreement: float
    outputs: tuple[OutputSpec, ...] = ()
    min_fidelity: float = 0.0


@dataclass(frozen=True)
class BuildJob:
    """One build, as the control plane hands it to a worker process."""

    model_path: Path
    sample_path: Path | None
    target: BuildTarget
    # The worker's own directory: candidates, progress file.
    workdir: Path
    # Where installed build toolchains live (the TFLite converter).
    toolchains_dir: Path | None = None


@dataclass(frozen=True)
class BuildResult:
    """The result of one build: every candidate judged, in ladder order, at
    most one of them chosen and at most one other the lighter fallback, and
    the golden samples of each."""

    candidates: tuple[Evaluated, ...]
    reference_accuracy: float | None
    log: tuple[str, ...] = ()
    # None when nothing was chosen.
    golden: Golden | None = None
    # The fallback's own golden samples; None when there is no fallback.
    fallback_golden: Golden | None = None
    # Why there is no fallback although the class asked for one ("" otherwise).
    fallback_reason: str = ""

    @property
    def chosen(self) -> Evaluated | None:
        return next((e for e in self.candidates if e.chosen), None)

    @property
    def fallback(self) -> Evaluated | None:
        return next((e for e in self.candidates if e.fallback), None)
