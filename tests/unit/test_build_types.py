"""What crosses the process boundary between the control plane and a build
worker: a BuildJob and a BuildResult, pickled whole (build.types); and a
BuildTarget as a build row stores it."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from edgefleet.controlplane.build.types import (
    BuildJob,
    BuildResult,
    BuildTarget,
    Candidate,
    Evaluated,
    Golden,
    GoldenSample,
    Measurement,
    ShapeRange,
    TensorRTSpec,
)


def _golden(value: float) -> GoldenSample:
    return GoldenSample({"x": np.full((1, 4), value, np.float32)}, {"y": np.ones((1, 2))})


def test_a_job_and_a_result_cross_a_process_pickled_whole(tmp_path: Path) -> None:
    target = BuildTarget("jetson", "tensorrt", max_memory_mb=512.0)
    job = BuildJob(tmp_path / "model.onnx", None, target, tmp_path / "job", tmp_path / "tools")
    spec = TensorRTSpec("fp16", 256, (ShapeRange("x", (1, 4), (1, 4), (8, 4)),))
    candidate = Candidate("trt-fp16", "tensorrt", "fp16", tmp_path / "a.onnx", tensorrt_spec=spec)
    result = BuildResult(
        candidates=(Evaluated(candidate, Measurement(100, agreement=1.0), True, chosen=True),),
        reference_accuracy=None,
        log=("chose trt-fp16",),
        golden=Golden((_golden(0.5),), atol=1e-3, rtol=1e-2, min_agreement=1.0),
    )
    assert pickle.loads(pickle.dumps(job)) == job
    back = pickle.loads(pickle.dumps(result))
    assert back == result and back.chosen == result.candidates[0]
    # Golden samples compare by their arrays' values.
    assert _golden(0.5) == _golden(0.5) and _golden(0.5) != _golden(0.25)


def test_a_target_is_stored_as_json_and_read_back() -> None:
    target = BuildTarget("pi4", "onnxruntime", quantization="int8", latency_budget_p95_ms=20.0)
    stored = json.loads(json.dumps(target.to_json()))
    assert BuildTarget.from_json(stored) == target
