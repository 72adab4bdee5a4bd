"""Rollout arithmetic (controlplane.domain.rollouts): stage planning, stage
verdicts with the minimum-count rule and acknowledged failures, health gates,
pacing, timeouts and retries. Pure functions, so plain tables."""

from __future__ import annotations

import bisect
import datetime as dt
import math
import random
from collections import Counter
from fractions import Fraction

import pytest

from edgefleet.controlplane.domain.rollouts import (
    RATE_TOLERANCE_S,
    UNLIMITED,
    Acknowledged,
    ClassLimits,
    CohortDevice,
    DeviceHealth,
    GateResult,
    Gates,
    InvalidStages,
    Pacing,
    StageCounts,
    StageRule,
    StageSize,
    Verdict,
    describe,
    device_timed_out,
    evaluate_gates,
    interleave,
    judge_stage,
    late_stage,
    notify_allowance,
    plan_stages,
    rate_allowance,
    rate_due,
    retry_delay_s,
    should_retry,
    stage_target,
    validate_sizes,
)
from edgefleet.controlplane.errors import InvalidArgument


def cohort(**classes: int) -> list[CohortDevice]:
    """`cohort(pi=3, jetson=2)`: devices pi-00, pi-01, pi-02, jetson-00, jetson-01."""
    return [CohortDevice(f"{name}-{i:02d}", name) for name, n in classes.items() for i in range(n)]


def pct(p: float, stratified: bool = False) -> StageSize:
    return StageSize(percent=p, stratified=stratified)


def cnt(n: int, stratified: bool = False) -> StageSize:
    return StageSize(count=n, stratified=stratified)


# --------------------------------------------------------------------------
# Stage planning
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "sizes", "expected"),
    [
        (10, [pct(10), pct(30), pct(60)], [1, 3, 6]),
        # ceil: 10% of 7 is 0.7 -> 1 device.
        (7, [pct(10), pct(90)], [1, 6]),
        (5, [pct(50), pct(50)], [3, 2]),
        (3, [pct(1), pct(1), pct(100)], [1, 1, 1]),
        # The stored decimal, not the binary float: 14.3% of 1000 is 143, not 144.
        (1000, [pct(14.3), pct(85.7)], [143, 857]),
        (10, [cnt(2), cnt(3), cnt(1)], [2, 3, 5]),
        (10, [cnt(1), pct(50), cnt(1)], [1, 5, 4]),
        # Capped by what is left; a stage may be empty.
        (10, [cnt(8), cnt(8), pct(10)], [8, 2, 0]),
        (2, [pct(50), pct(30), pct(20)], [1, 1, 0]),
        # The last stage takes everyone left, whatever its own size says.
        (20, [pct(10), pct(10)], [2, 18]),
        (20, [cnt(5), cnt(1)], [5, 15]),
        (4, [pct(10)], [4]),
        (0, [pct(10), pct(90)], [0, 0]),
    ],
)
def test_stage_sizes(n: int, sizes: list[StageSize], expected: list[int]) -> None:
    stages = plan_stages(cohort(pi=n), sizes)
    assert [len(stage) for stage in stages] == expected
    assert sorted(d for stage in stages for d in stage) == sorted(d.device_id for d in cohort(pi=n))


@pytest.mark.parametrize(
    ("size", "n", "target"),
    [(pct(10), 7, 1), (pct(10), 10, 1), (pct(10), 11, 2), (pct(100), 9, 9), (cnt(4), 2, 4)],
)
def test_stage_target(size: StageSize, n: int, target: int) -> None:
    assert stage_target(size, n) == target


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        # Equal classes: plain round-robin, classes by name, devices by id.
        (cohort(b=2, a=2, c=2), ["a-00", "b-00", "c-00", "a-01", "b-01", "c-01"]),
        # 3:1 mix: the small class sits where its share falls due.
        (cohort(a=3, b=1), ["a-00", "a-01", "b-00", "a-02"]),
        (cohort(solo=3), ["solo-00", "solo-01", "solo-02"]),
        ([], []),
    ],
)
def test_interleave_order(devices: list[CohortDevice], expected: list[str]) -> None:
    assert [d.device_id for d in interleave(devices)] == expected


def test_a_stage_mixes_classes_in_proportion() -> None:
    stages = plan_stages(cohort(pi=60, jetson=30, gateway=10), [pct(10), pct(40), pct(50)])
    classes = [Counter(d.split("-")[0] for d in stage) for stage in stages]
    assert classes[0] == {"pi": 6, "jetson": 3, "gateway": 1}
    assert classes[1] == {"pi": 24, "jetson": 12, "gateway": 4}


def test_stratified_first_stage_represents_every_class() -> None:
    devices = cohort(pi=40, jetson=1, gateway=1)
    plain = plan_stages(devices, [cnt(2), pct(100)])
    assert {d.split("-")[0] for d in plain[0]} == {"pi"}
    stratified = plan_stages(devices, [cnt(2, stratified=True), pct(100)])
    # One of each class even though that is more than the stage's count of 2.
    assert {d.split("-")[0] for d in stratified[0]} == {"pi", "jetson", "gateway"}
    assert len(stratified[0]) == 3
    assert len(stratified[1]) == 39


def test_stratified_stage_fills_up_to_its_size() -> None:
    stages = plan_stages(cohort(pi=18, jetson=1, gateway=1), [pct(50, stratified=True), pct(50)])
    assert len(stages[0]) == 10
    assert Counter(d.split("-")[0] for d in stages[0]) == {"pi": 8, "jetson": 1, "gateway": 1}


def test_stratified_later_stage_represents_the_classes_still_left() -> None:
    devices = cohort(pi=9, jetson=1)
    stages = plan_stages(devices, [cnt(5), cnt(1, stratified=True), pct(100)])
    # The only jetson fell in stage 1, so stage 2 has nothing more to represent.
    assert "jetson-00" in stages[0]
    assert len(stages[1]) == 1


def test_plan_is_deterministic_whatever_the_input_order() -> None:
    devices = cohort(pi=17, jetson=6, gateway=3)
    sizes = [cnt(3, stratified=True), pct(25), pct(75)]
    expected = plan_stages(devices, sizes)
    rng = random.Random(7)
    for _ in range(20):
        shuffled = devices[:]
        rng.shuffle(shuffled)
        assert plan_stages(shuffled, sizes) == expected


def test_device_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="pi-00 is in the cohort twice"):
        plan_stages([*cohort(pi=2), CohortDevice("pi-00", "pi")], [pct(100)])


def _random_sizes(rng: random.Random) -> list[StageSize]:
    sizes: list[StageSize] = []
    left = 100.0
    for _ in range(rng.randint(0, 4)):
        stratified = rng.random() < 0.3
        if rng.random() < 0.5 and left > 2:
            p = round(rng.uniform(0.5, left - 1), 1)
            left -= p
            sizes.append(pct(p, stratified))
        else:
            sizes.append(cnt(rng.randint(1, 15), stratified))
    sizes.append(pct(rng.choice([100, 50, 1])) if rng.random() < 0.5 else cnt(1))
    return sizes


def test_plan_properties_over_many_random_cohorts() -> None:
    rng = random.Random(20261122)
    for _ in range(400):
        devices = [
            CohortDevice(f"d{i:03d}", rng.choice("abcde"[: rng.randint(1, 5)]))
            for i in rng.sample(range(1000), rng.randint(0, 80))
        ]
        sizes = _random_sizes(rng)
        stages = plan_stages(devices, sizes)
        assert len(stages) == len(sizes)
        placed = [d for stage in stages for d in stage]
        # Every device in exactly one stage.
        assert sorted(placed) == sorted(d.device_id for d in devices)
        class_of = {d.device_id: d.class_name for d in devices}
        left = {d.device_id for d in devices}
        for index, (stage, size) in enumerate(zip(stages, sizes, strict=True)):
            classes_left = {class_of[d] for d in left}
            if index == len(sizes) - 1:
                assert set(stage) == left
            elif size.stratified:
                assert {class_of[d] for d in stage} == classes_left
                target = min(stage_target(size, len(devices)), len(left))
                assert len(stage) == max(len(classes_left), target)
            else:
                assert len(stage) == min(stage_target(size, len(devices)), len(left))
            left -= set(stage)
        # Every prefix of the order holds each class within one device of its share.
        order = interleave(devices)
        share = Counter(d.class_name for d in devices)
        seen: Counter[str] = Counter()
        for k, device in enumerate(order, start=1):
            seen[device.class_name] += 1
            for name, n_c in share.items():
                assert abs(seen[name] - Fraction(k * n_c, len(devices))) < 1


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ([], "at least one stage"),
        ([StageSize()], "stage 1: give either a percent or a count of devices, not neither"),
        ([pct(10), StageSize(percent=5, count=3)], "stage 2: .* not both"),
        ([pct(0)], "stage 1: percent must be more than 0 and at most 100, not 0"),
        ([pct(-5)], "not -5"),
        ([pct(150)], "not 150"),
        ([pct(math.nan)], "not nan"),
        ([cnt(0)], "stage 1: count must be at least 1, not 0"),
        ([pct(10), cnt(-2)], "stage 2: count must be at least 1, not -2"),
        ([pct(60), pct(40), pct(10)], "stages 1 to 2 already take 100% .* nothing for stage 3"),
        ([pct(10), pct(50), pct(100), pct(100)], "take 160% .* not a running total"),
    ],
)
def test_validate_sizes_rejects(sizes: list[StageSize], message: str) -> None:
    with pytest.raises(InvalidStages, match=message) as info:
        validate_sizes(sizes)
    # Catchable either way: as a ValueError or as the API's InvalidArgument.
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, InvalidArgument)


@pytest.mark.parametrize(
    "sizes",
    [
        [pct(100)],
        [cnt(1)],
        [pct(10), pct(40), pct(100)],  # the last stage's own percent is not summed
        [pct(99.9), pct(0.1)],
        [pct(33.3), pct(33.3), pct(33.3), pct(0.1)],
        [cnt(50), pct(90), cnt(1)],  # counts cannot be checked without a cohort
        [pct(50, stratified=True), pct(50)],
    ],
)
def test_validate_sizes_accepts(sizes: list[StageSize]) -> None:
    validate_sizes(sizes)


@pytest.mark.parametrize(
    ("current", "designated", "n_stages", "expected"),
    [
        (0, None, 3, 0),
        (1, None, 3, 1),
        (0, 2, 3, 2),  # a later stage: wait for it
        (1, 1, 3, 1),  # the current stage itself
        (2, 0, 3, 2),  # designated stage already finished: join the current one
        (2, 2, 3, 2),
    ],
)
def test_late_stage(current: int, designated: int | None, n_stages: int, expected: int) -> None:
    assert late_stage(current, designated, n_stages) == expected


@pytest.mark.parametrize(
    ("current", "designated", "n_stages"), [(3, None, 3), (-1, None, 3), (0, 3, 3), (0, -1, 3)]
)
def test_late_stage_rejects_stages_that_do_not_exist(
    current: int, designated: int | None, n_stages: int
) -> None:
    with pytest.raises(ValueError):
        late_stage(current, designated, n_stages)


# --------------------------------------------------------------------------
# Stage verdict
# --------------------------------------------------------------------------

RULE = StageRule(
    success_threshold_percent=80, error_threshold_percent=20, min_finished_for_error_threshold=5
)
NONE_ACKED = Acknowledged()


@pytest.mark.parametrize(
    ("counts", "rule", "acked", "verdict", "reason"),
    [
        # An empty stage has nothing to wait for.
        (StageCounts(0, 0, 0, 0), RULE, NONE_ACKED, Verdict.SUCCEEDED, "the stage has no devices"),
        # Minimum-count rule: one early failure with min 5 stays pending.
        (
            StageCounts(10, 0, 1, 3),
            RULE,
            NONE_ACKED,
            Verdict.PENDING,
            "1 of 1 finished devices failed; the error threshold applies from 5 finished",
        ),
        (StageCounts(10, 3, 1, 3), RULE, NONE_ACKED, Verdict.PENDING, "applies from 5"),
        # Five finished: the rate now counts. 1 of 5 is 20%, not over 20%.
        (StageCounts(10, 4, 1, 3), RULE, NONE_ACKED, Verdict.PENDING, "(20% ≤ 20%)"),
        (
            StageCounts(10, 3, 2, 3),
            RULE,
            NONE_ACKED,
            Verdict.FAILED,
            "2 of 5 finished devices failed (40% > 20% error threshold)",
        ),
        (StageCounts(5, 2, 3, 0), RULE, NONE_ACKED, Verdict.FAILED, "3 of 5 finished devices"),
        # Success threshold: 4 of 5 is exactly 80%.
        (
            StageCounts(5, 4, 0, 1),
            RULE,
            NONE_ACKED,
            Verdict.SUCCEEDED,
            "4 of 5 devices committed (80% ≥ 80% needed)",
        ),
        (StageCounts(10, 7, 0, 3), RULE, NONE_ACKED, Verdict.PENDING, "7 of 10 committed (70%"),
        # Everyone finished, rate tolerated, success not reached: failed.
        (
            StageCounts(5, 3, 2, 0),
            StageRule(80, 50, 5),
            NONE_ACKED,
            Verdict.FAILED,
            "all 5 devices finished but only 3 committed (60%, 80% needed; 2 failed)",
        ),
        # The error threshold wins over a met success threshold.
        (StageCounts(10, 6, 4, 0), StageRule(50, 10, 5), NONE_ACKED, Verdict.FAILED, "40% > 10%"),
        # Error threshold 0: no failure tolerated (once the minimum finished).
        (StageCounts(10, 1, 1, 8), StageRule(100, 0, 1), NONE_ACKED, Verdict.FAILED, "50% > 0%"),
        (StageCounts(10, 1, 0, 8), StageRule(100, 0, 1), NONE_ACKED, Verdict.PENDING, "(0% ≤ 0%)"),
        # Error threshold 100: the rate never aborts; success decides.
        (
            StageCounts(5, 0, 5, 0),
            StageRule(80, 100, 1),
            NONE_ACKED,
            Verdict.FAILED,
            "only 0 committed",
        ),
        (StageCounts(5, 0, 4, 1), StageRule(80, 100, 1), NONE_ACKED, Verdict.PENDING, "(100% ≤"),
        # Success threshold 0: met at once; 100: every device.
        (StageCounts(5, 0, 0, 0), StageRule(0, 20, 5), NONE_ACKED, Verdict.SUCCEEDED, "(0% ≥ 0%"),
        (StageCounts(5, 4, 0, 1), StageRule(100, 20, 5), NONE_ACKED, Verdict.PENDING, "80%"),
        (StageCounts(5, 5, 0, 0), StageRule(100, 20, 5), NONE_ACKED, Verdict.SUCCEEDED, "100%"),
        # A stage smaller than the minimum is judged on its rate once all finished.
        (StageCounts(3, 0, 1, 2), StageRule(50, 50, 5), NONE_ACKED, Verdict.PENDING, "from 3"),
        (
            StageCounts(3, 1, 2, 0),
            StageRule(50, 50, 5),
            NONE_ACKED,
            Verdict.FAILED,
            "2 of 3 finished devices failed (66.7% > 50%",
        ),
        # Minimum 0: the first failure counts.
        (StageCounts(10, 0, 1, 0), StageRule(80, 20, 0), NONE_ACKED, Verdict.FAILED, "1 of 1"),
    ],
)
def test_judge_stage(
    counts: StageCounts, rule: StageRule, acked: Acknowledged, verdict: Verdict, reason: str
) -> None:
    outcome = judge_stage(counts, rule, acked)
    assert outcome.verdict is verdict, outcome.reason
    assert reason in outcome.reason


# Resume acknowledged 3 failures among 5 finished devices of a 20-device stage.
ACKED = Acknowledged(failed=3, finished=5)


@pytest.mark.parametrize(
    ("counts", "verdict", "reason"),
    [
        # Without the acknowledgement, 4 of 6 failed would trip at once.
        (StageCounts(20, 2, 4, 5), Verdict.PENDING, "1 of 1 newly finished devices failed"),
        (StageCounts(20, 2, 4, 5), Verdict.PENDING, "since resume; the error threshold applies"),
        # Five new devices finished, one failed: 20%, tolerated.
        (StageCounts(20, 6, 4, 5), Verdict.PENDING, "1 of 5 newly finished devices"),
        # Five new finished, two failed: trips.
        (
            StageCounts(20, 5, 5, 5),
            Verdict.FAILED,
            "2 of 5 newly finished devices failed since resume (40% > 20% error threshold; "
            "3 earlier failed acknowledged)",
        ),
        # Success counts every committed device, acknowledged or not, over
        # the devices less the acknowledged failed ones (issue 21).
        (
            StageCounts(20, 16, 3, 1),
            Verdict.SUCCEEDED,
            "16 of 17 devices committed, 3 acknowledged failed left out",
        ),
        # Every device but the acknowledged failed ones committed: 100 % of
        # those counted.
        (StageCounts(20, 17, 3, 0), Verdict.SUCCEEDED, "17 of 17 devices committed"),
    ],
)
def test_judge_stage_counts_only_new_failures_after_resume(
    counts: StageCounts, verdict: Verdict, reason: str
) -> None:
    outcome = judge_stage(counts, RULE, ACKED)
    assert outcome.verdict is verdict, outcome.reason
    assert reason in outcome.reason


def test_the_same_counts_without_acknowledgement_trip() -> None:
    outcome = judge_stage(StageCounts(20, 2, 4, 5), RULE)
    assert outcome.verdict is Verdict.FAILED
    assert "4 of 6 finished devices failed (66.7% > 20%" in outcome.reason


def test_a_device_counted_failed_and_in_progress_does_not_crash_the_tick() -> None:
    # A silent device may be counted failed while its row still says notified.
    outcome = judge_stage(StageCounts(5, 1, 2, 4), RULE)
    assert outcome.verdict is Verdict.PENDING
    assert "2 in progress, 0 waiting" in outcome.reason


def test_acknowledged_more_than_seen_counts_as_nothing_new() -> None:
    outcome = judge_stage(StageCounts(10, 1, 1, 0), RULE, Acknowledged(failed=5, finished=8))
    assert outcome.verdict is Verdict.PENDING


@pytest.mark.parametrize(
    "counts",
    [StageCounts(-1, 0, 0, 0), StageCounts(5, 4, 2, 0), StageCounts(5, 0, -1, 0)],
)
def test_judge_stage_rejects_impossible_counts(counts: StageCounts) -> None:
    with pytest.raises(ValueError):
        judge_stage(counts, RULE)


# --------------------------------------------------------------------------
# Health gates
# --------------------------------------------------------------------------

LIMITS = {
    "pi": ClassLimits(latency_budget_p95_ms=100, max_memory_mb=500),
    "jetson": ClassLimits(latency_budget_p95_ms=20, max_memory_mb=2000),
    "gateway": ClassLimits(latency_budget_p95_ms=None, max_memory_mb=None),
}


def health(
    device_id: str,
    class_name: str,
    latency: float | None = None,
    errors: float | None = None,
    memory: float | None = None,
    age: float | None = 1.0,
    rss: float | None = None,
) -> DeviceHealth:
    """`memory` is the model's own (what the memory gate judges), `rss` the
    agent's whole resident set (the agent-memory gate's)."""
    return DeviceHealth(device_id, class_name, latency, errors, rss, age, model_memory_mb=memory)


@pytest.mark.parametrize(
    ("devices", "gates", "expected"),
    [
        # Per-class budgets times the factor: pi 150 ms, jetson 30 ms.
        (
            [health("p1", "pi", latency=140), health("j1", "jetson", latency=35)],
            Gates(latency_budget_factor=1.5),
            [("latency_p95", 35, 30, False, ("j1",))],
        ),
        # The worst device is the one furthest over its own limit, not the slowest.
        (
            [health("p1", "pi", latency=140), health("j1", "jetson", latency=25)],
            Gates(latency_budget_factor=1.5),
            [("latency_p95", 140, 150, True, ())],
        ),
        # Exactly at the limit passes.
        (
            [health("p1", "pi", latency=150)],
            Gates(latency_budget_factor=1.5),
            [("latency_p95", 150, 150, True, ())],
        ),
        # Classes without a budget (or unknown) are not judged; nor are devices without samples.
        (
            [
                health("g1", "gateway", latency=9999, memory=9999),
                health("x1", "unknown", latency=9999, memory=9999),
                health("p1", "pi", latency=None, memory=None),
                health("p2", "pi", latency=math.nan),
            ],
            Gates(latency_budget_factor=1.0, memory_limit_factor=1.0),
            [("latency_p95", 0, 0, True, ()), ("memory", 0, 0, True, ())],
        ),
        (
            [
                health("p1", "pi", errors=0.01),
                health("p2", "pi", errors=0.2),
                health("j1", "jetson", errors=0.1),
                health("j2", "jetson", errors=0.05),
            ],
            Gates(max_error_rate=0.05),
            [("error_rate", 0.2, 0.05, False, ("p2", "j1"))],
        ),
        (
            [health("p1", "pi", memory=400), health("j1", "jetson", memory=2100)],
            Gates(memory_limit_factor=1.0),
            [("memory", 2100, 2000, False, ("j1",))],
        ),
        # Silence: over the limit fails, and never reporting is silence.
        (
            [
                health("p1", "pi", age=10),
                health("p2", "pi", age=61),
                health("p3", "pi", age=None),
                health("p4", "pi", age=60),
            ],
            Gates(max_silence_s=60),
            [("silence", math.inf, 60, False, ("p3", "p2"))],
        ),
        # One result per configured gate, in a fixed order.
        (
            [health("p1", "pi", latency=90, errors=0.0, memory=100, age=5)],
            Gates(
                latency_budget_factor=1.0,
                max_error_rate=0.01,
                memory_limit_factor=1.2,
                max_silence_s=30,
            ),
            [
                ("latency_p95", 90, 100, True, ()),
                ("error_rate", 0.0, 0.01, True, ()),
                ("memory", 100, 600, True, ()),
                ("silence", 5, 30, True, ()),
            ],
        ),
        ([health("p1", "pi", latency=9999)], Gates(), []),
        # A zero error-rate gate: any error fails.
        (
            [health("p1", "pi", errors=0.0), health("p2", "pi", errors=0.001)],
            Gates(max_error_rate=0.0),
            [("error_rate", 0.001, 0.0, False, ("p2",))],
        ),
    ],
)
def test_evaluate_gates(
    devices: list[DeviceHealth],
    gates: Gates,
    expected: list[tuple[str, float, float, bool, tuple[str, ...]]],
) -> None:
    results = evaluate_gates(devices, gates, LIMITS)
    got = [(r.name, r.passing, r.failing_devices) for r in results]
    assert got == [(name, passing, failing) for name, _, _, passing, failing in expected]
    for result, (_, value, limit, _, _) in zip(results, expected, strict=True):
        assert result.value == pytest.approx(value)
        assert result.limit == pytest.approx(limit)
    for result in results:
        assert result.passing == (result.value <= result.limit)


@pytest.mark.parametrize(
    ("result", "text"),
    [
        (
            GateResult("latency_p95", 180, 120, False, ("d3", "d1"), "d3", 4),
            "latency_p95 failing on 2 of 4 devices (d3, d1): worst 180 ms on d3, limit 120 ms",
        ),
        (
            GateResult("error_rate", 0.125, 0.05, False, ("a", "b", "c", "d", "e"), "a", 9),
            "error_rate failing on 5 of 9 devices (a, b, c and 2 more): worst 12.5% on a, limit 5%",
        ),
        (
            GateResult("memory", 300, 512, True, (), "p1", 1),
            "memory passing on 1 device: worst 300 MB on p1, limit 512 MB",
        ),
        (
            GateResult("silence", math.inf, 60, False, ("p3",), "p3", 2),
            "silence failing on 1 of 2 devices (p3): p3 never reported, limit 60 s",
        ),
        (
            GateResult("silence", 75, 60, False, ("p3",), "p3", 2),
            "longest silence 75 s on p3, limit 60 s",
        ),
        (GateResult("latency_p95", 0, 0, True, ()), "latency_p95 passing: no device to check yet"),
    ],
)
def test_describe(result: GateResult, text: str) -> None:
    assert text in describe(result)


# --------------------------------------------------------------------------
# Pacing
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pacing", "elapsed", "notified", "allowance"),
    [
        (Pacing(), 0, 0, UNLIMITED),
        (Pacing(), 1e6, 10**9, UNLIMITED),
        # 60 a minute: one at once, then one a second.
        (Pacing(max_per_minute=60), 0, 0, 1),
        (Pacing(max_per_minute=60), 0.5, 0, 1),
        (Pacing(max_per_minute=60), 1, 0, 2),
        (Pacing(max_per_minute=60), 59.999, 0, 60),
        (Pacing(max_per_minute=60), 60, 0, 61),
        (Pacing(max_per_minute=60), 60, 61, 0),
        (Pacing(max_per_minute=60), 60, 100, 0),  # never negative
        (Pacing(max_per_minute=10), 6, 0, 2),
        (Pacing(max_per_minute=10), 120, 15, 6),
        (Pacing(max_per_minute=10), -5, 0, 0),  # before notifying started
        (Pacing(), -5, 0, 0),
        # Ramp 10, x2: minutes allow 10, 20, 40, ... (cumulative 10, 30, 70).
        (Pacing(ramp_base_per_minute=10, ramp_factor=2), 0, 0, 1),
        (Pacing(ramp_base_per_minute=10, ramp_factor=2), 59.99, 0, 10),
        (Pacing(ramp_base_per_minute=10, ramp_factor=2), 60, 0, 11),
        (Pacing(ramp_base_per_minute=10, ramp_factor=2), 119.99, 0, 30),
        (Pacing(ramp_base_per_minute=10, ramp_factor=2), 150, 25, 26),
        (Pacing(ramp_base_per_minute=10, ramp_factor=2), 1e7, 0, UNLIMITED),
        (Pacing(ramp_base_per_minute=10, ramp_factor=1), 600, 0, 101),
        # Both: the smaller cumulative allowance.
        (Pacing(max_per_minute=25, ramp_base_per_minute=10, ramp_factor=2), 60, 0, 11),
        (Pacing(max_per_minute=25, ramp_base_per_minute=10, ramp_factor=2), 180, 0, 71),
    ],
)
def test_notify_allowance(pacing: Pacing, elapsed: float, notified: int, allowance: int) -> None:
    assert notify_allowance(pacing, elapsed, notified) == allowance


def per_minute(pacing: Pacing, minutes: int) -> list[int]:
    """How many devices the allowance admits within each minute counted from
    the start: what is allowed just before the minute ends minus what was
    allowed just before it began."""

    def allowed_by(t: float) -> int:
        return notify_allowance(pacing, t, 0) if t >= 0 else 0

    eps = 1e-6
    return [allowed_by(60 * (k + 1) - eps) - allowed_by(60 * k - eps) for k in range(minutes)]


def test_an_orchestrator_ticking_each_second_keeps_the_rate() -> None:
    """Ticking once a second and notifying everything allowed: 600 a minute
    on average, at most 10 a tick (no burst), and the total never ahead of
    the allowance."""
    pacing = Pacing(max_per_minute=600)
    notified, largest = 0, 0
    for second in range(300):
        allowed = notify_allowance(pacing, float(second), notified)
        largest = max(largest, allowed)
        notified += allowed
    assert notified == 600 * 299 // 60 + 1
    assert largest == 10


@pytest.mark.parametrize(
    ("pacing", "expected"),
    [
        (Pacing(max_per_minute=1), [1, 1, 1, 1]),
        (Pacing(max_per_minute=7), [7, 7, 7, 7]),
        (Pacing(max_per_minute=1000), [1000] * 4),
        (Pacing(max_per_minute=10_000), [10_000] * 4),
        (Pacing(ramp_base_per_minute=10, ramp_factor=2), [10, 20, 40, 80]),
        (Pacing(ramp_base_per_minute=10, ramp_factor=1.5), [10, 15, 22, 33]),
        (Pacing(max_per_minute=25, ramp_base_per_minute=10, ramp_factor=2), [10, 20, 40, 30]),
    ],
)
def test_exactly_the_rate_in_each_minute(pacing: Pacing, expected: list[int]) -> None:
    assert per_minute(pacing, len(expected)) == expected


@pytest.mark.parametrize("rate", [1, 7, 60, 1000])
def test_at_most_the_rate_in_any_sixty_seconds(rate: int) -> None:
    pacing = Pacing(max_per_minute=rate)
    times: list[float] = []
    notified = 0
    for tick in range(4 * 60 * 4):
        elapsed = tick * 0.25
        allowed = notify_allowance(pacing, elapsed, notified)
        notified += allowed
        times += [elapsed] * allowed
    for start in times:
        assert sum(1 for t in times if start <= t < start + 60) <= rate


# --------------------------------------------------------------------------
# Timeouts and retries
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notified_at", "now", "timeout", "expected"),
    [
        (0, 1e9, None, False),
        (0, 1e9, 0, False),  # 0: no timeout
        (0, 10, 10, False),  # at the timeout it still has time
        (0, 10.001, 10, True),
        (100, 50, 10, False),  # a clock behind the notification time
        (1000, 1300.5, 300, True),
    ],
)
def test_device_timed_out(
    notified_at: float, now: float, timeout: float | None, expected: bool
) -> None:
    assert device_timed_out(notified_at, now, timeout) is expected


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "delay"),
    [
        (1, 30, 600, 30),
        (2, 30, 600, 60),
        (3, 30, 600, 120),
        (5, 30, 600, 480),
        (6, 30, 600, 600),
        (1000, 30, 600, 600),
        (0, 30, 600, 30),
        (-3, 30, 600, 30),
        (4, 1, 5, 5),
        (3, 2.5, 100, 10),
    ],
)
def test_retry_delay(attempt: int, base: float, cap: float, delay: float) -> None:
    assert retry_delay_s(attempt, base, cap) == delay


def test_retry_delay_defaults() -> None:
    assert [retry_delay_s(a) for a in range(1, 7)] == [30, 60, 120, 240, 480, 600]


@pytest.mark.parametrize(
    ("attempts", "retries", "expected"),
    [
        (0, 0, True),  # nothing tried yet
        (1, 0, False),
        (1, 1, True),
        (2, 1, False),
        (2, 2, True),
        (3, 2, False),
        (11, 10, False),
        (1, -1, False),
    ],
)
def test_should_retry(attempts: int, retries: int, expected: bool) -> None:
    assert should_retry(attempts, retries) is expected


@pytest.mark.parametrize("per_minute", [1, 2, 30, 100, 10_000])
def test_a_fixed_rate_sends_at_most_n_in_any_minute_however_long_it_was_quiet(
    per_minute: int,
) -> None:
    """Ticks every 0.5 s for 3 minutes, after 10 quiet minutes (a bake): no
    60 s window holds more than N + what RATE_TOLERANCE_S lets go early,
    and the rate is kept (N a minute, give or take one)."""
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    due = start - dt.timedelta(minutes=10)
    sent: list[float] = []
    for tick in range(360):
        now = start + dt.timedelta(seconds=tick / 2)
        n = rate_allowance(per_minute, due, now)
        due = rate_due(per_minute, due, now, n)
        sent += [tick / 2] * n
    early = 1 + math.floor(per_minute * RATE_TOLERANCE_S / 60)
    # `sent` is in time order: each window counted by bisection.
    for i, t in enumerate(sent):
        assert bisect.bisect_left(sent, t + 60) - i <= per_minute + early
    in_second_minute = bisect.bisect_left(sent, 120) - bisect.bisect_left(sent, 60)
    assert abs(in_second_minute - per_minute) <= 1
    assert rate_allowance(0, None, start) == UNLIMITED
