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

    def to_json(self) -> dict[str, Any]:
        """The form a build row stores (and the dedup key hashes)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BuildTarget:
        """A target as `to_json` stored it."""
        return cls(**data)


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


@dataclass(frozen=True)
class Measurement:
    """What running a candidate on the build host showed."""

    size_bytes: int
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    peak_memory_mb: float = 0.0
    max_abs_diff: float = 0.0
    # Argmax agreement with the fp32 reference over the samples, 0..1.
    agreement: float = 0.0
    # Accuracy against the sample labels, when there are labels.
    accuracy: float | None = None
    error: str = ""  # set when the candidate could not be run
    # Latency and memory came from a stand-in runtime (TensorRT candidates run
    # in onnxruntime on a build host without TensorRT): they show fidelity,
    # not device speed, so budgets are checked on the device instead.
    latency_is_proxy: bool = False


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
    and the share of samples whose argmax (last axis of the first output)
    must match."""

    samples: tuple[GoldenSample, ...]
    atol: float
    rtol: float
    min_agreement: float


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
