"""The verdict: which measured candidates meet a device class's constraints,
why each other one does not (with numbers and margins), the one to ship, and
the lighter fallback to ship beside it when the class asks for one (or why
there is none). Pure functions over measurements; no files, no runtimes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from edgefleet.controlplane.build.types import BuildTarget, Candidate, Evaluated, Measurement
from edgefleet.fidelity import OutputKind, lowest

MIB = 1024 * 1024
# Latency differences under 5% are within run-to-run noise on a build host:
# a quantized candidate that close to fp32 does not count as slower.
NOISE_MARGIN = 1.05
PRECISIONS = ("fp32", "fp16", "int8")


def retention(measurement: Measurement, reference_accuracy: float | None) -> tuple[float, str]:
    """How much of the fp32 model's quality the candidate keeps, and how it
    was judged: accuracy / reference accuracy when there are labels (and a
    reference accuracy above zero), otherwise the lowest judged output's
    fidelity by its kind's metric ("prob_map mask IoU")."""
    if measurement.accuracy is not None and reference_accuracy:
        return measurement.accuracy / reference_accuracy, "accuracy"
    worst = lowest(measurement.fidelity)
    if worst is None:
        return measurement.agreement, "agreement"
    return worst.value, f"{worst.output} {worst.metric}"


def check(
    candidate: Candidate,
    measurement: Measurement,
    target: BuildTarget,
    reference_accuracy: float | None,
) -> list[str]:
    """Every constraint the candidate misses, each with the measured value,
    the limit and the margin; empty when it meets them all."""
    if candidate.error or candidate.path is None:
        return [f"not built: {candidate.error or 'no artifact'}"]
    if measurement.error:
        return [f"could not run: {measurement.error}"]
    reasons: list[str] = []
    size_mb = measurement.size_bytes / MIB
    if target.max_model_size_mb is not None and size_mb > target.max_model_size_mb:
        reasons.append(
            f"size {_size(size_mb)} > max {_size(target.max_model_size_mb)}"
            f" ({_over(size_mb, target.max_model_size_mb)})"
        )
    if measurement.latency_is_proxy:
        # A stand-in runtime's speed and memory say nothing about the device's
        # accelerator: those budgets are checked when the device validates.
        return reasons + _retention_reasons(measurement, target, reference_accuracy)
    if target.latency_budget_p95_ms is not None:
        device_p95 = measurement.latency_p95_ms * target.speed_factor
        budget = target.latency_budget_p95_ms
        if device_p95 > budget:
            scaled = (
                f" x speed factor {target.speed_factor:g} = {_ms(device_p95)} ms"
                if target.speed_factor != 1.0
                else ""
            )
            reasons.append(
                f"latency p95 {_ms(measurement.latency_p95_ms)} ms{scaled} > budget "
                f"{_ms(budget)} ms ({_over(device_p95, budget)}){_timing(measurement)}"
            )
    if target.max_memory_mb is not None and measurement.peak_memory_mb > target.max_memory_mb:
        reasons.append(
            f"peak memory {measurement.peak_memory_mb:.1f} MiB > max {target.max_memory_mb:.1f} MiB"
            f" ({_over(measurement.peak_memory_mb, target.max_memory_mb)})"
        )
    return reasons + _retention_reasons(measurement, target, reference_accuracy)


def _retention_reasons(
    measurement: Measurement, target: BuildTarget, reference_accuracy: float | None
) -> list[str]:
    # A class that sets no floor still must not ship a model that disagrees
    # with the original on many inputs: "auto" would otherwise pick the
    # smallest candidate whatever its fidelity (seen: a TensorRT int8 at 66%
    # agreement). Operators who accept more loss set the floor explicitly,
    # for the class or for one model version (`models push --min-fidelity`).
    floor = target.fidelity_floor
    which = "min" if floor is not None else "default min"
    if target.min_fidelity is not None:
        which = "version's min"
    if floor is None:
        floor = DEFAULT_MIN_RETENTION
    reasons: list[str] = []
    # With labels, accuracy retention judges the scores it is measured on
    # (the first class-scores output); every other output keeps its metric.
    by_accuracy = ""
    labelled = measurement.accuracy is not None and bool(reference_accuracy)
    if measurement.accuracy is not None and reference_accuracy:
        kept = measurement.accuracy / reference_accuracy
        by_accuracy = next(
            (s.output for s in measurement.fidelity if s.kind is OutputKind.CLASS_SCORES), ""
        )
        if kept < floor:
            reasons.append(
                f"accuracy {measurement.accuracy:.4f} vs fp32 {reference_accuracy:.4f}: "
                f"retention {kept:.4f} < {which} {floor:.4f} ({_over(kept, floor)})"
            )
    if not measurement.fidelity:
        # A measurement from before output kinds: argmax agreement.
        if not labelled and measurement.agreement < floor:
            reasons.append(
                f"argmax agreement with fp32 {measurement.agreement:.4f} < {which} {floor:.4f} "
                f"({_over(measurement.agreement, floor)})"
            )
        return reasons
    # Every judged output on its own: a detector's boxes and scores both count.
    return reasons + [
        f"{s.output}: {s.metric} {s.value:.4f} < {which} {floor:.4f} ({_over(s.value, floor)})"
        for s in measurement.fidelity
        # `not >=`: a NaN (never expected, see fidelity.score) fails too.
        if s.judged and s.output != by_accuracy and not s.value >= floor
    ]


def notes(measurement: Measurement, target: BuildTarget) -> list[str]:
    """Remarks on a measured candidate that are not failures: a latency close
    to the budget (another day's load may tip it), timing that stayed noisy
    after re-measuring."""
    remarks: list[str] = []
    if measurement.error or measurement.latency_is_proxy:
        return remarks
    budget = target.latency_budget_p95_ms
    if budget:
        device_p95 = measurement.latency_p95_ms * target.speed_factor
        margin = (budget - device_p95) / budget
        if abs(margin) <= NEAR_BUDGET:
            side = "under" if margin >= 0 else "over"
            remarks.append(
                f"latency p95 {_ms(device_p95)} ms is {abs(margin):.1%} {side} the budget "
                f"{_ms(budget)} ms: within run-to-run noise, so a busier host or device may "
                "tip it"
            )
    failed_on_latency = budget is not None and (
        measurement.latency_p95_ms * target.speed_factor > budget
    )
    if measurement.noisy and not failed_on_latency:
        # (A latency failure's reason already says what it stood on.)
        remarks.append(
            f"timing stayed noisy over {measurement.latency_measurements} measurement(s) "
            f"(CV {measurement.latency_cv:.2f}, p95/p50 {measurement.latency_p95_over_p50:.2f}, "
            f"host load {measurement.host_load:.2f} per core)"
        )
    return remarks


def _ms(ms: float) -> str:
    """`21.30`; three decimals under 1 ms, where 0.17 against 0.17 would hide
    which is larger."""
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


# A latency this close to the budget (either side) gets a note.
NEAR_BUDGET = 0.05


def _timing(m: Measurement) -> str:
    """What a latency verdict stood on, when it was not one quiet measurement."""
    if m.latency_measurements <= 1 and not m.noisy:
        return ""
    state = "still noisy" if m.noisy else "steady"
    return (
        f"; {state} after {m.latency_measurements} measurements (CV {m.latency_cv:.2f}, "
        f"p95/p50 {m.latency_p95_over_p50:.2f}, host load {m.host_load:.2f} per core)"
    )


# Applies when a class sets no min_accuracy_retention.
DEFAULT_MIN_RETENTION = 0.95


def _size(mib: float) -> str:
    """Sizes readable at any scale: a 2 KiB budget must not print as 0.00 MiB."""
    return f"{mib * 1024:.1f} KiB" if mib < 0.1 else f"{mib:.2f} MiB"


def evaluate(
    built: Sequence[tuple[Candidate, Measurement]],
    target: BuildTarget,
    reference_accuracy: float | None,
    fp32_latency_p95: float,
) -> list[Evaluated]:
    """Judge every candidate against `target` and mark at most one chosen.

    The choice follows the class's quantization preference: fp32, fp16 or
    int8 take the passing candidate of that precision (ranked as below when
    there are several); with none passing, or with `auto`, every passing
    candidate is ranked: the smallest of those not slower than fp32 (p95 at
    most `fp32_latency_p95` x NOISE_MARGIN; pass inf when unknown), ties by
    latency. When every passing candidate is slower than fp32, the fastest."""
    evaluated = []
    for candidate, measurement in built:
        reasons = tuple(check(candidate, measurement, target, reference_accuracy))
        remarks = tuple(notes(measurement, target))
        evaluated.append(
            Evaluated(candidate, measurement, passed=not reasons, reasons=reasons, notes=remarks)
        )
    passing = [e for e in evaluated if e.passed]
    preferred = [e for e in passing if e.candidate.precision == target.quantization]
    pick = _rank(preferred or passing, fp32_latency_p95)
    return [dataclasses.replace(e, chosen=True) if e is pick else e for e in evaluated]


def _rank(pool: Sequence[Evaluated], fp32_latency_p95: float) -> Evaluated | None:
    if not pool:
        return None
    limit = fp32_latency_p95 * NOISE_MARGIN
    not_slower = [e for e in pool if e.measurement.latency_p95_ms <= limit]
    if not_slower:
        return min(
            not_slower, key=lambda e: (e.measurement.size_bytes, e.measurement.latency_p95_ms)
        )
    return min(pool, key=lambda e: (e.measurement.latency_p95_ms, e.measurement.size_bytes))


def _over(value: float, limit: float) -> str:
    """The margin by which `value` misses `limit`, as a signed percentage."""
    if limit == 0:
        return "limit is 0"
    percent = (value - limit) / limit * 100
    return f"{percent:+.1f}%" if abs(percent) < 10 else f"{percent:+.0f}%"


def pick_fallback(
    evaluated: Sequence[Evaluated], target: BuildTarget
) -> tuple[Evaluated | None, str]:
    """The lighter fallback artifact the class asks for (`target.fallback`),
    or None and why there is none ("" when the class asks for none).

    The pool: candidates that passed every check of the class, other than
    the chosen one, strictly smaller than it (smaller weights mean less
    memory traffic, which is what a hot or battery-low device saves). With
    fp16 or int8 only that precision counts; with auto the whole pool. Of
    those, the fastest (p95), ties by size. Returns an element of
    `evaluated` itself, not yet marked (Evaluated.fallback)."""
    wanted = target.fallback
    if not wanted:
        return None, ""
    chosen = next((e for e in evaluated if e.chosen), None)
    if chosen is None:
        return None, "no candidate was chosen, so there is no artifact to fall back from"
    limit = chosen.measurement.size_bytes
    lighter = [
        e for e in evaluated if e is not chosen and e.passed and e.measurement.size_bytes < limit
    ]
    pool = [e for e in lighter if wanted == "auto" or e.candidate.precision == wanted]
    if pool:
        return _fastest(pool), ""
    which = "" if wanted == "auto" else f"{wanted} "
    of_wanted = [
        e
        for e in evaluated
        if e is not chosen and (wanted == "auto" or e.candidate.precision == wanted)
    ]
    what = (
        "; ".join(_lacks(e, limit) for e in of_wanted)
        or f"the {target.runtime} ladder built no other {which}candidate"
    )
    if lighter:
        # Another precision would do: say which, so the operator can choose.
        hint = f"--fallback auto would pick {_fastest(lighter).candidate.name}"
    else:
        hint = f"{chosen.candidate.name} is already the lightest candidate that passes: set "
        hint += "--fallback none"
        failing = [
            e.candidate.name
            for e in evaluated
            if not e.passed and not e.error and 0 < e.measurement.size_bytes < limit
        ]
        if failing:
            verb = "fails" if len(failing) == 1 else "fail"
            hint += f", or loosen the constraints {', '.join(failing)} {verb}"
    return None, (
        f"no {which}candidate passes and is smaller than the chosen "
        f"{chosen.candidate.name} ({_bytes(limit)}): {what} ({hint})"
    )


def _fastest(pool: Sequence[Evaluated]) -> Evaluated:
    return min(pool, key=lambda e: (e.measurement.latency_p95_ms, e.measurement.size_bytes))


def _lacks(e: Evaluated, limit: int) -> str:
    """Why one candidate is not the fallback: its size when it is not lighter
    (then no check it fails matters), else the checks it fails."""
    name, size = e.candidate.name, e.measurement.size_bytes
    if not e.error and size >= limit:
        return f"{name} is {_bytes(size)}, not smaller"
    return f"{name} fails ({'; '.join(e.reasons) or e.error or 'failed'})"


def _bytes(size: int) -> str:
    """Artifact sizes as operators compare them: 11.7 KiB, 412 KiB, 9.71 MiB."""
    if size < MIB:
        kib = size / 1024
        return f"{kib:.1f} KiB" if kib < 100 else f"{kib:.0f} KiB"
    return f"{size / MIB:.2f} MiB"
