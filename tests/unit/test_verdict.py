"""The verdict as tables: constraints in, pass/fail with reasons and the
chosen candidate out. Pure: no models, no runtimes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from edgefleet.controlplane.build.types import BuildTarget, Candidate, Measurement
from edgefleet.controlplane.build.verdict import MIB, evaluate

FP32_P95 = 10.0


def built(
    name: str,
    precision: str,
    *,
    size_mb: float = 1.0,
    p95: float = 10.0,
    memory: float = 10.0,
    agreement: float = 1.0,
    accuracy: float | None = None,
    error: str = "",
    build_error: str = "",
) -> tuple[Candidate, Measurement]:
    candidate = Candidate(
        name,
        "onnxruntime",
        precision,
        None if build_error else Path(f"/artifacts/{name}.onnx"),
        error=build_error,
    )
    measurement = Measurement(
        size_bytes=round(size_mb * MIB),
        latency_p50_ms=p95 * 0.8,
        latency_p95_ms=p95,
        peak_memory_mb=memory,
        agreement=agreement,
        accuracy=accuracy,
        error=error,
    )
    return candidate, measurement


def target(**limits: object) -> BuildTarget:
    return BuildTarget(class_name="pi4", runtime="onnxruntime", **limits)  # type: ignore[arg-type]


# -- each constraint: which candidates fail, with what reason -------------------------------------

LADDER = [
    built("fp32-opt", "fp32", size_mb=9.71, p95=10.0, memory=40.0, accuracy=0.980),
    built("fp16", "fp16", size_mb=4.86, p95=11.0, memory=30.0, accuracy=0.980),
    built("int8-dynamic", "int8", size_mb=2.50, p95=14.0, memory=25.0, accuracy=0.975),
    built("int8-static-qdq", "int8", size_mb=2.60, p95=8.0, memory=24.0, accuracy=0.940),
]

CONSTRAINT_CASES = [
    # (limits, {candidate: reason fragments or [] when it passes})
    (
        {"max_model_size_mb": 4.0},
        {
            "fp32-opt": ["size 9.71 MiB > max 4.00 MiB (+143%)"],
            "fp16": ["size 4.86 MiB > max 4.00 MiB (+21%)"],
            "int8-dynamic": [],
            "int8-static-qdq": [],
        },
    ),
    (
        {"latency_budget_p95_ms": 12.0},
        {
            "fp32-opt": [],
            "fp16": [],
            "int8-dynamic": ["latency p95 14.00 ms > budget 12.00 ms (+17%)"],
            "int8-static-qdq": [],
        },
    ),
    (
        # A device twice as slow as the build host.
        {"latency_budget_p95_ms": 20.0, "speed_factor": 2.0},
        {
            "fp32-opt": [],
            "fp16": ["latency p95 11.00 ms x speed factor 2 = 22.00 ms > budget 20.00 ms (+10%)"],
            "int8-dynamic": ["= 28.00 ms > budget 20.00 ms (+40%)"],
            "int8-static-qdq": [],
        },
    ),
    (
        {"max_memory_mb": 26.0},
        {
            "fp32-opt": ["peak memory 40.0 MiB > max 26.0 MiB (+54%)"],
            "fp16": ["peak memory 30.0 MiB > max 26.0 MiB (+15%)"],
            "int8-dynamic": [],
            "int8-static-qdq": [],
        },
    ),
    (
        # With labels, retention is accuracy / fp32 accuracy (0.98).
        {"min_accuracy_retention": 0.99},
        {
            "fp32-opt": [],
            "fp16": [],
            "int8-dynamic": [],  # 0.975 / 0.98 = 0.9949
            "int8-static-qdq": ["accuracy 0.9400 vs fp32 0.9800: retention 0.9592 < min 0.9900"],
        },
    ),
    (
        {"min_accuracy_retention": 0.999},
        {
            "fp32-opt": [],
            "fp16": [],
            "int8-dynamic": ["retention 0.9949 < min 0.9990 (-0.4%)"],
            "int8-static-qdq": ["retention 0.9592 < min 0.9990 (-4.0%)"],
        },
    ),
]


@pytest.mark.parametrize(("limits", "expected"), CONSTRAINT_CASES)
def test_each_constraint_fails_the_candidates_that_miss_it(
    limits: dict[str, float], expected: dict[str, list[str]]
) -> None:
    evaluated = evaluate(LADDER, target(**limits), 0.98, FP32_P95)
    by_name = {e.candidate.name: e for e in evaluated}
    for name, fragments in expected.items():
        e = by_name[name]
        assert e.passed == (not fragments), (name, e.reasons)
        assert len(e.reasons) == len(fragments), (name, e.reasons)
        for fragment, reason in zip(fragments, e.reasons, strict=True):
            assert fragment in reason, (name, reason)


def test_every_missed_constraint_is_listed() -> None:
    limits = {
        "max_model_size_mb": 1.0,
        "latency_budget_p95_ms": 1.0,
        "max_memory_mb": 1.0,
        "min_accuracy_retention": 0.999,
    }
    (e,) = evaluate([LADDER[3]], target(**limits), 0.98, FP32_P95)
    assert not e.passed and not e.chosen
    assert [r.split()[0] for r in e.reasons] == ["size", "latency", "peak", "accuracy"]


def test_without_labels_retention_is_agreement_with_fp32() -> None:
    ladder = [
        built("fp32-opt", "fp32", agreement=1.0),
        built("int8-static-qdq", "int8", agreement=0.95, size_mb=0.3),
    ]
    evaluated = evaluate(ladder, target(min_accuracy_retention=0.99), None, FP32_P95)
    assert evaluated[0].passed
    assert evaluated[1].reasons == ("argmax agreement with fp32 0.9500 < min 0.9900 (-4.0%)",)


def test_candidates_with_errors_fail_with_their_error() -> None:
    ladder = [
        built("fp32-opt", "fp32"),
        built("fp16", "fp16", build_error="ValidationError: bad graph"),
        built("int8-dynamic", "int8", error="measurement process died (signal 11)"),
    ]
    evaluated = evaluate(ladder, target(), None, FP32_P95)
    assert [e.passed for e in evaluated] == [True, False, False]
    assert evaluated[1].reasons == ("not built: ValidationError: bad graph",)
    assert evaluated[2].reasons == ("could not run: measurement process died (signal 11)",)
    assert evaluated[0].chosen


# -- the choice -----------------------------------------------------------------------------------

CHOICE_CASES = [
    # (quantization, ladder, fp32 p95, chosen)
    pytest.param(
        "auto",
        [
            built("fp32-opt", "fp32", size_mb=4.0, p95=10.0),
            built("fp16", "fp16", size_mb=2.0, p95=10.4),  # within the 5% noise margin
            built("int8-static-qdq", "int8", size_mb=1.0, p95=12.0),  # smaller but slower
        ],
        10.0,
        "fp16",
        id="auto: smallest not slower than fp32",
    ),
    pytest.param(
        "auto",
        [
            built("fp32-opt", "fp32", size_mb=4.0, p95=10.0),
            built("int8-dynamic", "int8", size_mb=1.0, p95=9.0),
            built("int8-static-qdq", "int8", size_mb=1.0, p95=7.0),
        ],
        10.0,
        "int8-static-qdq",
        id="auto: equal sizes, faster wins",
    ),
    pytest.param(
        "auto",
        [
            built("fp16", "fp16", size_mb=2.0, p95=13.0),
            built("int8-dynamic", "int8", size_mb=1.0, p95=12.0),
        ],
        10.0,
        "int8-dynamic",
        id="auto: all slower than fp32, the fastest",
    ),
    pytest.param(
        "auto",
        [built("fp16", "fp16", size_mb=2.0, p95=13.0), built("int8", "int8", size_mb=1.0)],
        math.inf,
        "int8",
        id="auto: fp32 latency unknown, smallest",
    ),
    pytest.param(
        "int8",
        [
            built("fp32-opt", "fp32", size_mb=4.0, p95=10.0),
            built("int8-dynamic", "int8", size_mb=1.0, p95=30.0),
        ],
        10.0,
        "int8-dynamic",
        id="int8 preferred even when slower",
    ),
    pytest.param(
        "fp32",
        [
            built("fp32-opt", "fp32", size_mb=4.0, p95=10.0),
            built("int8-static-qdq", "int8", size_mb=1.0, p95=5.0),
        ],
        10.0,
        "fp32-opt",
        id="fp32 preferred over a smaller, faster int8",
    ),
    pytest.param(
        "fp16",
        [
            built("fp32-opt", "fp32", size_mb=4.0, p95=10.0),
            built("fp16", "fp16", build_error="converter failed"),
            built("int8-static-qdq", "int8", size_mb=1.0, p95=9.0),
        ],
        10.0,
        "int8-static-qdq",
        id="preferred precision fails: auto rule",
    ),
    pytest.param(
        "auto",
        [built("fp32-opt", "fp32", error="crashed"), built("fp16", "fp16", error="crashed")],
        10.0,
        None,
        id="nothing passes: nothing chosen",
    ),
]


@pytest.mark.parametrize(("quantization", "ladder", "fp32_p95", "chosen"), CHOICE_CASES)
def test_choice(
    quantization: str,
    ladder: list[tuple[Candidate, Measurement]],
    fp32_p95: float,
    chosen: str | None,
) -> None:
    evaluated = evaluate(ladder, target(quantization=quantization), None, fp32_p95)
    picked = [e.candidate.name for e in evaluated if e.chosen]
    assert picked == ([chosen] if chosen else [])


def test_only_passing_candidates_are_chosen() -> None:
    ladder = [
        built("fp32-opt", "fp32", size_mb=4.0, p95=10.0),
        built("int8-static-qdq", "int8", size_mb=1.0, p95=9.0, accuracy=0.5),
    ]
    evaluated = evaluate(
        ladder, target(quantization="int8", min_accuracy_retention=0.99), 0.98, FP32_P95
    )
    assert [e.chosen for e in evaluated] == [True, False]


def test_tiny_sizes_are_written_in_kib() -> None:
    target = BuildTarget("mcu", "tflite", max_model_size_mb=0.002)
    candidate = Candidate("tflite-int8", "tflite", "int8", Path("m.tflite"))
    measured = Measurement(size_bytes=5456, agreement=1.0)
    reasons = evaluate([(candidate, measured)], target, None, 1.0)[0].reasons
    assert reasons == ("size 5.3 KiB > max 2.0 KiB (+160%)",)


def test_a_class_without_a_floor_still_rejects_low_fidelity() -> None:
    target = BuildTarget("jetson", "tensorrt")  # no min_accuracy_retention
    small = Candidate("trt-int8-qdq", "tensorrt", "int8", Path("a.onnx"))
    large = Candidate("trt-fp16", "tensorrt", "fp16", Path("b.onnx"))
    judged = evaluate(
        [(small, Measurement(size_bytes=100, agreement=0.656)),
         (large, Measurement(size_bytes=200, agreement=0.969))],
        target, None, math.inf,
    )  # fmt: skip
    assert [e.passed for e in judged] == [False, True]
    assert judged[1].chosen
    assert judged[0].reasons == ("argmax agreement with fp32 0.6560 < default min 0.9500 (-31%)",)
    # An explicit, lower floor is the operator's call.
    loose = BuildTarget("jetson", "tensorrt", min_accuracy_retention=0.6)
    assert evaluate([(small, Measurement(size_bytes=100, agreement=0.656))], loose, None, math.inf)[
        0
    ].passed


def test_proxy_measurements_skip_device_budgets_but_not_size_or_fidelity() -> None:
    target = BuildTarget(
        "jetson", "tensorrt", latency_budget_p95_ms=0.001, max_memory_mb=0.001,
        max_model_size_mb=1.0, min_accuracy_retention=0.99,
    )  # fmt: skip
    candidate = Candidate("trt-fp16", "tensorrt", "fp16", Path("m.onnx"))
    fine = Measurement(size_bytes=1000, latency_p95_ms=5.0, peak_memory_mb=50.0, agreement=1.0,
                       latency_is_proxy=True)  # fmt: skip
    (judged,) = evaluate([(candidate, fine)], target, None, 1.0)
    assert judged.passed and judged.chosen
    lossy = Measurement(size_bytes=1000, latency_p95_ms=5.0, agreement=0.5, latency_is_proxy=True)
    (judged,) = evaluate([(candidate, lossy)], target, None, 1.0)
    assert not judged.passed and "argmax agreement" in judged.reasons[0]
