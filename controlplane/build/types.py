"""The values a build passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


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


@dataclass
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
    # TensorRT: how the device builds its engine (TensorRTBuildSpec fields).
    tensorrt_spec: dict[str, Any] | None = None
    # Minimum runtime versions the artifact needs, e.g. {"onnxruntime": "1.17"}.
    min_runtime_versions: dict[str, str] = field(default_factory=dict)


@dataclass
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


@dataclass
class Evaluated:
    candidate: Candidate
    measurement: Measurement
    passed: bool
    # Each constraint missed and by how much, e.g. "size 9.7 MB > max 4 MB (+143%)".
    reasons: list[str] = field(default_factory=list)
    chosen: bool = False


@dataclass
class BuildOutcome:
    """The result of one build: every candidate, and the chosen one if any."""

    evaluated: list[Evaluated]
    chosen: Evaluated | None
    reference_accuracy: float | None
    log: list[str] = field(default_factory=list)
    # For the manifest: a few sample inputs and the chosen artifact's outputs
    # on them, as (inputs, outputs) pairs keyed by the ONNX model's input and
    # output names, each array a batch of one. Empty when nothing was chosen.
    golden: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = field(default_factory=list)
    # How closely a device must reproduce the golden outputs: per element,
    # |device - golden| <= atol + rtol * |golden|; and the share of golden
    # samples whose argmax (last axis of the first output) must match.
    atol: float = 0.0
    rtol: float = 0.0
    min_agreement: float = 0.0
