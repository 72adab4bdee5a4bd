"""The fallback choice as tables: a judged ladder and the class's fallback
precision in, the lighter candidate to publish beside the chosen one (or
why there is none) out. Pure: fake measurements, no models, no runtimes."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.controlplane.build.types import BuildTarget, Candidate, Evaluated, Measurement
from edgefleet.controlplane.build.verdict import evaluate, pick_fallback

KIB = 1024
FP32_P95 = 10.0


def built(
    name: str, precision: str, size_kib: float, p95: float, agreement: float = 1.0
) -> tuple[Candidate, Measurement]:
    candidate = Candidate(name, "onnxruntime", precision, Path(f"/artifacts/{name}.onnx"))
    measurement = Measurement(
        size_bytes=round(size_kib * KIB),
        latency_p50_ms=p95 * 0.8,
        latency_p95_ms=p95,
        peak_memory_mb=size_kib / KIB,
        agreement=agreement,
    )
    return candidate, measurement


# The sizes of the ONNX Runtime ladder on a small MLP: the static int8 carries
# its quantize/dequantize nodes and is larger than the dynamic one.
LADDER = [
    built("fp32-opt", "fp32", size_kib=1600, p95=10.0),
    built("fp16", "fp16", size_kib=800, p95=9.0),
    built("int8-dynamic", "int8", size_kib=420, p95=12.0),
    built("int8-static-qdq", "int8", size_kib=412, p95=7.0),
]


def judged(
    ladder: list[tuple[Candidate, Measurement]] | None = None, /, **profile: object
) -> tuple[list[Evaluated], BuildTarget]:
    target = BuildTarget(class_name="pi4", runtime="onnxruntime", **profile)  # type: ignore[arg-type]
    return evaluate(ladder or LADDER, target, None, FP32_P95), target


def picked(**profile: object) -> tuple[str | None, str]:
    evaluated, target = judged(**profile)
    fallback, reason = pick_fallback(evaluated, target)
    return (fallback.candidate.name if fallback else None), reason


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        # fp32 chosen: every lighter candidate of the precision asked for
        # qualifies; the fastest of them is the fallback.
        ({"quantization": "fp32", "fallback": "int8"}, "int8-static-qdq"),
        ({"quantization": "fp32", "fallback": "fp16"}, "fp16"),
        ({"quantization": "fp32", "fallback": "auto"}, "int8-static-qdq"),
        # fp16 chosen: only the int8 candidates are lighter.
        ({"quantization": "fp16", "fallback": "auto"}, "int8-static-qdq"),
        ({"quantization": "fp16", "fallback": "int8"}, "int8-static-qdq"),
        # A budget only the slower int8 misses leaves the faster one.
        (
            {"quantization": "fp32", "fallback": "int8", "latency_budget_p95_ms": 11.0},
            "int8-static-qdq",
        ),
    ],
)
def test_the_fallback_is_the_fastest_lighter_passing_candidate_of_its_precision(
    profile: dict[str, object], expected: str
) -> None:
    assert picked(**profile) == (expected, "")


def test_ranking_is_by_latency_then_size() -> None:
    ladder = [
        built("fp32-opt", "fp32", size_kib=1600, p95=10.0),
        built("int8-a", "int8", size_kib=500, p95=6.0),
        built("int8-b", "int8", size_kib=450, p95=6.0),
        built("int8-c", "int8", size_kib=300, p95=6.5),
    ]
    evaluated, target = judged(ladder, quantization="fp32", fallback="int8")
    fallback, _ = pick_fallback(evaluated, target)
    assert fallback is not None and fallback.candidate.name == "int8-b"
    # It is an element of the list itself, not yet marked.
    assert any(e is fallback for e in evaluated) and not fallback.fallback


def test_a_candidate_that_fails_a_check_is_never_the_fallback() -> None:
    ladder = [*LADDER[:3], built("int8-static-qdq", "int8", size_kib=412, p95=7.0, agreement=0.5)]
    evaluated, target = judged(ladder, quantization="fp32", fallback="int8")
    fallback, reason = pick_fallback(evaluated, target)
    # Low agreement fails it: the slower int8 passes and is the fallback.
    assert fallback is not None and fallback.candidate.name == "int8-dynamic" and reason == ""


def test_no_fallback_asked_is_no_fallback_and_no_reason() -> None:
    assert picked(quantization="fp32") == (None, "")
    assert picked(quantization="fp32", fallback="") == (None, "")


def test_the_chosen_lightest_int8_leaves_no_int8_fallback_and_says_why() -> None:
    # int8 chosen: int8-static-qdq (412 KiB, fastest and smallest).
    name, reason = picked(quantization="int8", fallback="int8")
    assert name is None
    assert reason.startswith(
        "no int8 candidate passes and is smaller than the chosen int8-static-qdq (412 KiB): "
        "int8-dynamic is 420 KiB, not smaller"
    ), reason
    assert "int8-static-qdq is already the lightest candidate that passes: set --fallback none" in (
        reason
    )


def test_a_fallback_of_another_precision_that_would_do_is_named() -> None:
    # fp16 chosen, fp16 fallback asked: no other fp16, but an int8 is lighter.
    name, reason = picked(quantization="fp16", fallback="fp16")
    assert name is None
    assert reason == (
        "no fp16 candidate passes and is smaller than the chosen fp16 (800 KiB): the onnxruntime "
        "ladder built no other fp16 candidate (--fallback auto would pick int8-static-qdq)"
    )


def test_candidates_of_the_precision_that_fail_are_listed_with_their_reasons() -> None:
    # fp32 chosen; both int8 fail agreement; fp16 passes and is lighter.
    ladder = [
        *LADDER[:2],
        built("int8-dynamic", "int8", size_kib=420, p95=12.0, agreement=0.90),
        built("int8-static-qdq", "int8", size_kib=412, p95=7.0, agreement=0.80),
    ]
    evaluated, target = judged(ladder, quantization="fp32", fallback="int8")
    fallback, reason = pick_fallback(evaluated, target)
    assert fallback is None
    assert reason.startswith(
        "no int8 candidate passes and is smaller than the chosen fp32-opt (1.56 MiB): "
        "int8-dynamic fails (argmax agreement with fp32 0.9000 < default min 0.9500 (-5.3%)); "
        "int8-static-qdq fails (argmax agreement with fp32 0.8000 < default min 0.9500 (-16%))"
    ), reason
    assert reason.endswith("(--fallback auto would pick fp16)")


def test_auto_with_nothing_lighter_passing_names_what_fails() -> None:
    # Only the smallest candidate fits the size limit, so it is chosen and
    # every other one is heavier or fails.
    name, reason = picked(quantization="auto", fallback="auto", max_model_size_mb=0.41)
    assert name is None
    assert reason.startswith("no candidate passes and is smaller than the chosen ")
    assert "set --fallback none" in reason
    # A smaller candidate that fails a check is named as what to loosen.
    ladder = [*LADDER, built("int8-tiny", "int8", size_kib=100, p95=5.0, agreement=0.5)]
    evaluated, target = judged(ladder, quantization="int8", fallback="auto")
    fallback, reason = pick_fallback(evaluated, target)
    assert fallback is None
    assert reason.endswith(
        "(int8-static-qdq is already the lightest candidate that passes: set --fallback none, "
        "or loosen the constraints int8-tiny fails)"
    ), reason


def test_nothing_chosen_means_nothing_to_fall_back_from() -> None:
    evaluated, target = judged(quantization="fp32", fallback="int8", max_model_size_mb=0.1)
    assert not any(e.chosen for e in evaluated)
    fallback, reason = pick_fallback(evaluated, target)
    assert fallback is None and "no candidate was chosen" in reason


def test_an_equal_size_is_not_lighter() -> None:
    ladder = [
        built("fp32-opt", "fp32", size_kib=400, p95=10.0),
        built("int8-dynamic", "int8", size_kib=400, p95=5.0),
    ]
    evaluated, target = judged(ladder, quantization="fp32", fallback="int8")
    fallback, reason = pick_fallback(evaluated, target)
    assert fallback is None
    assert "int8-dynamic is 400 KiB, not smaller" in reason
