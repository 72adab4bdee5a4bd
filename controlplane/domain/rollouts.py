"""Rollout arithmetic: which devices go in which stage, whether a stage has
succeeded or failed, whether its health gates hold, how fast devices may be
notified, and when a device has timed out or may retry.

Pure logic: no I/O, no clocks (the caller passes times in), no randomness.
The orchestrator calls these functions on every tick with what it read from
the database, so each of them is deterministic: the same inputs give the same
answer on any replica, before or after a restart.

Stage numbers are 0-based indices in the API; messages meant for people count
from 1 ("stage 1").
"""

from __future__ import annotations

import datetime as dt
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction

from edgefleet.controlplane.errors import InvalidArgument

# What notify_allowance answers when nothing limits the rate.
UNLIMITED = sys.maxsize


class InvalidStages(InvalidArgument, ValueError):
    """The stage sizes cannot be planned; the message says what to change.

    Both an InvalidArgument (so the API maps it to INVALID_ARGUMENT) and a
    ValueError (so plain callers can catch the usual exception)."""


def _exact(value: float) -> Fraction:
    """The decimal a person wrote, as an exact fraction. Fraction(float) would
    keep binary noise (14.3 is stored as 14.3000000000000007...), and then
    ceil(14.3% of 1000) would give 144 instead of 143."""
    return Fraction(str(value))


def _pct(value: Fraction | float) -> str:
    """A percentage for messages: at most one decimal, no trailing zeros."""
    text = f"{float(value):.1f}"
    return text[:-2] if text.endswith(".0") else text


# --------------------------------------------------------------------------
# 1. Stage planning
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortDevice:
    device_id: str
    class_name: str


@dataclass(frozen=True)
class StageSize:
    """How big a stage is: a percentage of the whole cohort or a count."""

    percent: float | None = None  # of the whole cohort, 0 < p <= 100
    count: int | None = None  # exactly one of percent/count
    stratified: bool = False  # every class of the cohort represented in this stage


def validate_sizes(sizes: Sequence[StageSize]) -> None:
    """Raise InvalidStages (a ValueError) naming the first stage to fix.

    Rules:
    - at least one stage;
    - each stage gives exactly one of percent and count;
    - a percent is more than 0 and at most 100; a count is at least 1;
    - percents are shares of the *whole* cohort, not cumulative. The stages
      before the last must leave something for the last one: their percents
      must add up to less than 100. The last stage's own percent or count is
      not checked against the others, because the last stage always takes
      every device left (so "10, 40, 100" reads naturally as "then everyone").
      Counts cannot be checked here (the cohort size is not known yet): a
      count-sized stage that finds nothing left is simply empty, and the dry
      run shows it.
    """
    if not sizes:
        raise InvalidStages("a rollout needs at least one stage")
    earlier = Fraction(0)
    for index, size in enumerate(sizes):
        where = f"stage {index + 1}"
        if (size.percent is None) == (size.count is None):
            raise InvalidStages(
                f"{where}: give either a percent or a count of devices, "
                f"not {'both' if size.percent is not None else 'neither'}"
            )
        if size.percent is not None:
            # `not 0 < p <= 100` also rejects NaN.
            if not 0 < size.percent <= 100:
                raise InvalidStages(
                    f"{where}: percent must be more than 0 and at most 100, not {size.percent:g}"
                )
            if index < len(sizes) - 1:
                earlier += _exact(size.percent)
        if size.count is not None and size.count < 1:
            raise InvalidStages(f"{where}: count must be at least 1, not {size.count}")
    if earlier >= 100:
        last = len(sizes)
        raise InvalidStages(
            f"stages 1 to {last - 1} already take {_pct(earlier)}% of the cohort, leaving "
            f"nothing for stage {last}; each percent is a share of the whole cohort, not a "
            "running total (write 10, 40, 50 rather than 10, 50, 100)"
        )


def stage_target(size: StageSize, cohort_size: int) -> int:
    """The nominal number of devices of a stage in a cohort of `cohort_size`:
    ceil(percent * cohort / 100), or the count. Rounding up means a small
    percent of a small cohort still gets at least one device. plan_stages caps
    this by what is left and lets the last stage take the rest."""
    if size.count is not None:
        return size.count
    if size.percent is None:
        raise InvalidStages("a stage needs a percent or a count")
    return math.ceil(_exact(size.percent) * cohort_size / 100)


def interleave(devices: Sequence[CohortDevice]) -> list[CohortDevice]:
    """The deterministic order stages are filled from.

    Within a class, devices are sorted by device_id. Classes are then merged
    so that every prefix of the order holds each class in proportion to its
    share of the cohort: in the first k devices, a class with n_c of the n
    devices has fewer than one device more or less than k * n_c / n. Classes
    of equal size therefore alternate round-robin (a, b, c, a, b, c, ...),
    and a class of 90 next to one of 10 gives nine of one, then one of the
    other. Because every stage is a run of this order, each stage mixes the
    classes in proportion too.

    The rule is Tijdeman's solution of the "chairman assignment problem"
    (1980): at step k, among the classes that are at least δ = 1/(2C - 2)
    behind their share, pick the one whose next device is due soonest, i.e.
    the smallest (x_c + 1 - δ) / p_c (x_c: taken so far, p_c = n_c / n); ties
    go to the class whose name sorts first. A plain "most behind goes next"
    rule can drift by more than one device; this one cannot. Integer
    arithmetic throughout, O(n * classes).
    """
    by_class: dict[str, list[CohortDevice]] = {}
    for device in sorted(devices, key=lambda d: (d.class_name, d.device_id)):
        by_class.setdefault(device.class_name, []).append(device)
    groups = [by_class[name] for name in sorted(by_class)]
    if len(groups) <= 1:
        return [d for group in groups for d in group]
    n = sum(len(group) for group in groups)
    sizes = [len(group) for group in groups]
    denominator = 2 * len(groups) - 2  # δ = 1 / denominator
    taken = [0] * len(groups)
    order: list[CohortDevice] = []
    best_due = 0
    for k in range(1, n + 1):
        best = -1
        for c, size in enumerate(sizes):
            if taken[c] == size:
                continue
            # Eligible: k·n_c/n - x_c ≥ δ, multiplied through by n·denominator.
            if (k * size - taken[c] * n) * denominator < n:
                continue
            # Due time ∝ ((x_c + 1)·denominator - 1) / n_c; compare crosswise.
            due = (taken[c] + 1) * denominator - 1
            if best < 0 or due * sizes[best] < best_due * size:
                best, best_due = c, due
        if best < 0:
            # The theorem says some class is always eligible; should rounding
            # ever prove it wrong, fall back to the first class with devices
            # left rather than lose one.
            best = next(c for c, size in enumerate(sizes) if taken[c] < size)
        order.append(groups[best][taken[best]])
        taken[best] += 1
    return order


def plan_stages(devices: Sequence[CohortDevice], sizes: Sequence[StageSize]) -> list[list[str]]:
    """Split a cohort into stages; returns each stage's device ids.

    - Stages are filled in order from `interleave(devices)` (see there: by
      class, then device_id, classes mixed in proportion).
    - A stage's size is `stage_target` (ceil(percent * cohort / 100), or the
      count), capped by what is left; a stage may therefore be empty.
    - The last stage always takes every device left, whatever its size says,
      so nobody is forgotten.
    - A stratified stage first takes one device of each class that still has
      devices left (the first of each in the order), then fills up to its size
      from the order. If there are more such classes than its size, the stage
      is bigger than its size: representing every class wins.
    - Within a stage, ids are listed in the order.

    Every device lands in exactly one stage. Raises InvalidStages for bad
    sizes and ValueError for a device id given twice.
    """
    validate_sizes(sizes)
    seen: set[str] = set()
    for device in devices:
        if device.device_id in seen:
            raise ValueError(f"device {device.device_id} is in the cohort twice")
        seen.add(device.device_id)
    order = interleave(devices)
    position = {device.device_id: i for i, device in enumerate(order)}
    remaining = order
    stages: list[list[str]] = []
    for index, size in enumerate(sizes):
        if index == len(sizes) - 1:
            chosen = list(remaining)
        else:
            target = stage_target(size, len(order))
            chosen = []
            if size.stratified:
                classes: set[str] = set()
                for device in remaining:
                    if device.class_name not in classes:
                        classes.add(device.class_name)
                        chosen.append(device)
            picked = {device.device_id for device in chosen}
            for device in remaining:
                if len(chosen) >= target:
                    break
                if device.device_id not in picked:
                    chosen.append(device)
        picked = {device.device_id for device in chosen}
        remaining = [device for device in remaining if device.device_id not in picked]
        chosen.sort(key=lambda d: position[d.device_id])
        stages.append([device.device_id for device in chosen])
    return stages


def late_stage(current_stage: int, designated: int | None, n_stages: int) -> int:
    """The stage a device joins when it starts matching the cohort while the
    rollout runs (dynamic cohorts).

    It joins the designated stage if one is given and that stage has not
    finished yet (it is the current stage or a later one); otherwise, with no
    designated stage or one already finished, it joins the current stage, so
    it is updated soon and judged with the devices being updated now. Stages
    are 0-based; raises ValueError for a stage outside 0..n_stages-1.
    """
    if not 0 <= current_stage < n_stages:
        raise ValueError(f"current stage {current_stage} is not within 0..{n_stages - 1}")
    if designated is None:
        return current_stage
    if not 0 <= designated < n_stages:
        raise ValueError(
            f"designated stage {designated + 1} does not exist; the rollout has {n_stages}"
        )
    return max(designated, current_stage)


# --------------------------------------------------------------------------
# 2. Stage verdict
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class StageCounts:
    total: int  # devices in the stage
    committed: int
    failed: int  # failed + rolled back + rejected + timed out (and silent devices)
    in_progress: int  # notified, not finished


@dataclass(frozen=True)
class Acknowledged:
    """What `resume` acknowledged and is still so: the stage's members that
    had failed (and still are failed), and those that had finished (failed
    or committed) by then."""

    failed: int = 0
    finished: int = 0


@dataclass(frozen=True)
class StageRule:
    success_threshold_percent: float  # % of the stage's devices committed
    error_threshold_percent: float  # % failed of finished, over new (unacknowledged) ones
    min_finished_for_error_threshold: int


class Verdict(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class StageOutcome:
    verdict: Verdict
    reason: str  # with the numbers, e.g. "3 of 5 finished devices failed (60% > 20%)"


def _devices(n: int) -> str:
    return f"{n} device" if n == 1 else f"{n} devices"


def judge_stage(
    counts: StageCounts, rule: StageRule, acknowledged: Acknowledged = Acknowledged()
) -> StageOutcome:
    """Decide a stage from its device counts.

    In order:
    1. An empty stage succeeds at once (there is nothing to wait for).
    2. Error threshold (AWS IoT Jobs abort criteria, Meshanics' acknowledged
       failures). Only *new* devices count: finished = committed + failed,
       minus what `resume` acknowledged. Once at least
       `min_finished_for_error_threshold` new devices have finished, the stage
       FAILS when new failed / new finished > the threshold. Strictly greater:
       the threshold is the failure rate tolerated, so 0% means "no failure at
       all" and 100% means "never abort on the rate"; with ≥, 0% would fail a
       stage before anything happened. One early failure therefore cannot
       abort a stage while fewer than the minimum have finished. The minimum
       is capped at the number of devices that can still finish (total minus
       acknowledged), so a stage smaller than the minimum is judged on its
       rate once all its devices have finished rather than never.
       This check comes before success: errors are the emergency brake
       (hawkBit's error condition), so a stage that meets its success
       threshold while tripping the error threshold fails.
    3. Success threshold (hawkBit's success condition): committed /
       counted ≥ the threshold, where counted is the stage's devices less
       the acknowledged failed ones (Meshanics' acknowledged failures: once
       an operator resumed past them they no longer hold the stage back).
       0% succeeds at once; 100% needs every counted device.
    4. When every device has finished and neither threshold decided, the
       stage FAILS: it can no longer reach its success threshold.
    5. Otherwise PENDING, with the numbers so far.

    Counts are compared as exact fractions, so 80% of 5 is exactly 4.
    Acknowledged counts larger than the current ones count as zero new
    devices. `in_progress` only shapes the message (clamped to the devices
    not finished). Raises ValueError for negative counts or more finished
    devices than the stage has.
    """
    for name in ("total", "committed", "failed", "in_progress"):
        if getattr(counts, name) < 0:
            raise ValueError(f"stage counts: {name} must not be negative")
    finished = counts.committed + counts.failed
    if finished > counts.total:
        raise ValueError(
            f"stage counts: {finished} finished devices exceed the stage's {counts.total}"
        )
    # in_progress only feeds the message, so a caller that counts a device both
    # failed (silent) and in progress gets a sane message, not a crashed tick.
    in_progress = min(counts.in_progress, counts.total - finished)
    if counts.total == 0:
        return StageOutcome(Verdict.SUCCEEDED, "the stage has no devices")

    success = _exact(rule.success_threshold_percent)
    error = _exact(rule.error_threshold_percent)
    new_failed = max(0, counts.failed - acknowledged.failed)
    new_finished = max(new_failed, finished - acknowledged.finished)
    minimum = min(
        rule.min_finished_for_error_threshold,
        max(0, counts.total - acknowledged.finished),
    )
    since = " since resume" if acknowledged.finished or acknowledged.failed else ""
    noun = "newly finished devices" if since else "finished devices"
    if new_finished >= minimum and new_finished > 0 and new_failed * 100 > error * new_finished:
        rate = Fraction(new_failed * 100, new_finished)
        acked = f"; {acknowledged.failed} earlier failed acknowledged" if since else ""
        return StageOutcome(
            Verdict.FAILED,
            f"{new_failed} of {new_finished} {noun} failed{since} "
            f"({_pct(rate)}% > {_pct(error)}% error threshold{acked})",
        )

    counted = max(0, counts.total - min(acknowledged.failed, counts.failed))
    left_out_n = counts.total - counted
    left_out = f", {left_out_n} acknowledged failed left out" if left_out_n else ""
    if counted == 0:
        return StageOutcome(
            Verdict.SUCCEEDED, f"every device of the stage failed and was acknowledged{left_out}"
        )
    committed_pct = Fraction(counts.committed * 100, counted)
    if counts.committed * 100 >= success * counted:
        return StageOutcome(
            Verdict.SUCCEEDED,
            f"{counts.committed} of {counted} devices committed{left_out} "
            f"({_pct(committed_pct)}% ≥ {_pct(success)}% needed)",
        )
    if finished == counts.total:
        of = f" of {counted}" if left_out_n else ""
        return StageOutcome(
            Verdict.FAILED,
            f"all {_devices(counts.total)} finished but only {counts.committed}{of} committed"
            f" ({_pct(committed_pct)}%, {_pct(success)}% needed; {counts.failed} failed"
            f"{left_out})",
        )
    if new_finished < minimum:
        errors = (
            f"{new_failed} of {new_finished} {noun} failed{since}; the error threshold "
            f"applies from {minimum} finished"
        )
    else:
        errors = (
            f"{new_failed} of {new_finished} {noun} failed{since} "
            f"({_pct(Fraction(new_failed * 100, new_finished)) if new_finished else '0'}% "
            f"≤ {_pct(error)}%)"
        )
    waiting = counts.total - finished - in_progress
    return StageOutcome(
        Verdict.PENDING,
        f"{counts.committed} of {counts.total} committed ({_pct(committed_pct)}%, "
        f"{_pct(success)}% needed), {in_progress} in progress, {waiting} waiting; "
        f"{errors}",
    )


# --------------------------------------------------------------------------
# 3. Health gates
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceHealth:
    device_id: str
    class_name: str
    latency_p95_ms: float | None  # worst interval since the device committed; None: no samples
    error_rate: float | None  # errors / requests since commit (a fraction, 0..1)
    # The agent's whole process RSS (MB; most of it the agent itself):
    # judged by the agent-memory gate only.
    memory_mb: float | None
    last_report_age_s: float | None  # seconds since the last telemetry/status; None: never
    # The memory the model adds to the agent (MB), measured as the build host
    # measures a candidate, so comparable with the class's max_memory_mb:
    # what the memory gate judges. None (or 0, as agents report "not
    # measured"): no figure.
    model_memory_mb: float | None = None


@dataclass(frozen=True)
class ClassLimits:
    latency_budget_p95_ms: float | None
    max_memory_mb: float | None


@dataclass(frozen=True)
class Gates:
    """Health gates of a stage; None: that gate is off."""

    latency_budget_factor: float | None = None  # p95 ≤ class budget * factor
    max_error_rate: float | None = None  # a fraction, 0..1
    memory_limit_factor: float | None = None  # model's memory ≤ class limit * factor
    max_silence_s: float | None = None  # no report for longer: the device failed
    max_agent_memory_mb: float | None = None  # the agent's whole RSS ≤ this, MB


LATENCY, ERROR_RATE, MEMORY, SILENCE = "latency_p95", "error_rate", "memory", "silence"
AGENT_MEMORY = "agent_memory"


@dataclass(frozen=True)
class GateResult:
    """One gate over a stage's devices.

    `value` and `limit` are in the gate's own unit (ms, fraction, MB, s) and
    belong to the worst device: the one furthest over (or closest to) its own
    limit. For latency and memory each device has its own limit (its class's
    budget * factor), so the worst device is the one with the highest
    value / limit, and `limit` is that device's limit. `passing` is
    `value <= limit`: no device is over its limit. Silence for a device that
    never reported is math.inf. With no device to check, value and limit are
    0 and the gate passes (missing data is the silence gate's business).
    """

    name: str  # "latency_p95", "error_rate", "memory", "agent_memory", "silence"
    value: float
    limit: float
    passing: bool
    failing_devices: tuple[str, ...]  # worst first
    worst_device: str = ""
    checked: int = 0  # devices the gate applied to


def _clean(value: float | None) -> float | None:
    """Telemetry may carry NaN; treat it as no sample rather than compare it."""
    return None if value is None or math.isnan(value) else value


def _gate(name: str, checks: list[tuple[str, float, float]]) -> GateResult:
    """Build a result from (device_id, value, limit) per checked device."""
    if not checks:
        return GateResult(name, 0.0, 0.0, True, ())

    def severity(check: tuple[str, float, float]) -> tuple[float, str]:
        device_id, value, limit = check
        # A zero limit (a gate of 0) makes any positive value infinitely bad.
        ratio = value / limit if limit > 0 else (math.inf if value > 0 else 0.0)
        # Sort descending by ratio, then ascending by id, in one key.
        return (-ratio, device_id)

    ranked = sorted(checks, key=severity)
    failing = tuple(device_id for device_id, value, limit in ranked if value > limit)
    worst_id, worst_value, worst_limit = ranked[0]
    return GateResult(
        name=name,
        value=worst_value,
        limit=worst_limit,
        passing=not failing,
        failing_devices=failing,
        worst_device=worst_id,
        checked=len(checks),
    )


def evaluate_gates(
    health: Sequence[DeviceHealth], gates: Gates, limits: Mapping[str, ClassLimits]
) -> list[GateResult]:
    """Check a stage's devices against its health gates.

    Returns one GateResult per configured gate, in the order latency_p95,
    error_rate, memory, agent_memory, silence. A device fails a gate when its
    value is over the limit (the limit itself passes, as in "p95 ≤ budget *
    factor"):
    - latency_p95: limit = its class's p95 budget * latency_budget_factor;
    - error_rate: limit = max_error_rate;
    - memory: the memory the model adds (model_memory_mb, the figure builds
      measure as peak_memory_mb), limit = its class's max_memory_mb *
      memory_limit_factor;
    - agent_memory: the agent's whole RSS (memory_mb), limit =
      max_agent_memory_mb, the same for every class;
    - silence: last_report_age_s > max_silence_s, and a device that never
      reported counts as silent. The orchestrator counts silent devices as
      failed.
    A class without a budget (or missing from `limits`) makes the latency or
    memory gate not apply to its devices; a device without a sample for a
    metric is not judged on it (configure silence to catch devices that stop
    reporting), nor is one whose model memory is 0 (not measured).
    """
    results: list[GateResult] = []
    if gates.latency_budget_factor is not None:
        factor = gates.latency_budget_factor
        checks = []
        for device in health:
            value = _clean(device.latency_p95_ms)
            budget = limits.get(device.class_name)
            if value is None or budget is None or budget.latency_budget_p95_ms is None:
                continue
            checks.append((device.device_id, value, budget.latency_budget_p95_ms * factor))
        results.append(_gate(LATENCY, checks))
    if gates.max_error_rate is not None:
        limit = gates.max_error_rate
        checks = [
            (device.device_id, rate, limit)
            for device in health
            if (rate := _clean(device.error_rate)) is not None
        ]
        results.append(_gate(ERROR_RATE, checks))
    if gates.memory_limit_factor is not None:
        factor = gates.memory_limit_factor
        checks = []
        for device in health:
            value = _clean(device.model_memory_mb)
            budget = limits.get(device.class_name)
            # 0 is what an agent reports when it could not measure the model.
            if not value or budget is None or budget.max_memory_mb is None:
                continue
            checks.append((device.device_id, value, budget.max_memory_mb * factor))
        results.append(_gate(MEMORY, checks))
    if gates.max_agent_memory_mb is not None:
        limit = gates.max_agent_memory_mb
        checks = [
            (device.device_id, rss, limit)
            for device in health
            if (rss := _clean(device.memory_mb)) is not None
        ]
        results.append(_gate(AGENT_MEMORY, checks))
    if gates.max_silence_s is not None:
        limit = gates.max_silence_s
        checks = [
            (device.device_id, math.inf if age is None else age, limit)
            for device in health
            for age in [_clean(device.last_report_age_s)]
        ]
        results.append(_gate(SILENCE, checks))
    return results


def _amount(name: str, value: float) -> str:
    if name == ERROR_RATE:
        return f"{_pct(value * 100)}%"
    if name in (MEMORY, AGENT_MEMORY):
        return f"{value:g} MB"
    if name == SILENCE:
        return f"{value:g} s"
    return f"{value:g} ms"


def _some(devices: tuple[str, ...], shown: int = 3) -> str:
    if len(devices) <= shown:
        return ", ".join(devices)
    return f"{', '.join(devices[:shown])} and {len(devices) - shown} more"


def describe(result: GateResult) -> str:
    """One line for events and the UI, e.g.
    "latency_p95 failing on 2 of 4 devices (d3, d1): worst 180 ms on d3, limit 120 ms"."""
    if result.checked == 0:
        return f"{result.name} passing: no device to check yet"
    if result.name == SILENCE and math.isinf(result.value):
        worst = f"{result.worst_device} never reported"
    elif result.name == SILENCE:
        worst = f"longest silence {result.value:g} s on {result.worst_device}"
    else:
        worst = f"worst {_amount(result.name, result.value)} on {result.worst_device}"
    limit = f"limit {_amount(result.name, result.limit)}"
    if result.passing:
        return f"{result.name} passing on {_devices(result.checked)}: {worst}, {limit}"
    return (
        f"{result.name} failing on {len(result.failing_devices)} of "
        f"{_devices(result.checked)} ({_some(result.failing_devices)}): {worst}, {limit}"
    )


# --------------------------------------------------------------------------
# 4. Pacing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pacing:
    max_per_minute: int = 0  # 0: unlimited
    ramp_base_per_minute: int = 0  # exponential ramp when > 0
    ramp_factor: float = 1.0


def _ramp_allowed(base: int, factor: float, elapsed_s: float) -> int:
    """Cumulative devices the ramp allows by `elapsed_s`: minute k allows
    floor(base * factor^k), spread evenly over that minute."""
    minute, into = divmod(elapsed_s, 60.0)
    k = int(minute)
    if factor == 1.0:
        done, rate = base * k, base
    else:
        done, rate_f = 0, float(base)
        for _ in range(k):
            done += math.floor(rate_f)
            if done >= UNLIMITED:
                return UNLIMITED
            rate_f *= factor
        rate = math.floor(rate_f)
    return done + math.floor(rate * into / 60.0) + 1


# How early a fixed rate lets a device go (rate_allowance's tolerance): the
# orchestrator looks twice a second, so at high rates a tick must be able to
# notify what half a second allows; at low rates it bounds a burst to one
# device more in any 60 s.
RATE_TOLERANCE_S = 1.0


def rate_allowance(max_per_minute: int, due: dt.datetime | None, now: dt.datetime) -> int:
    """How many devices a fixed rate of `max_per_minute` (0: none) allows
    now, `due` the time the next one is due (None: now).

    The generic cell rate algorithm (virtual scheduling): one device every
    60/N s, each allowed at most RATE_TOLERANCE_S before it is due. Time
    nothing was notified in is not banked: after a bake, a pause, a promote
    or a restart the devices go out at the rate, not in one burst (the
    earlier allowance, counted from the rollout's start, sent a bake's worth
    at once). Pair with rate_due to move `due` on."""
    if max_per_minute <= 0:
        return UNLIMITED
    interval = 60.0 / max_per_minute
    start = now if due is None or due < now else due
    early = RATE_TOLERANCE_S - (start - now).total_seconds()
    return 0 if early < 0 else math.floor(early / interval) + 1


def rate_due(
    max_per_minute: int, due: dt.datetime | None, now: dt.datetime, sent: int
) -> dt.datetime | None:
    """When the next device is due after `sent` more went out now."""
    if max_per_minute <= 0 or sent <= 0:
        return due
    start = now if due is None or due < now else due
    return start + dt.timedelta(seconds=sent * 60.0 / max_per_minute)


def notify_allowance(pacing: Pacing, elapsed_s: float, notified_so_far: int) -> int:
    """How many more devices may be notified now, `elapsed_s` seconds after
    the rollout started notifying, given `notified_so_far`.

    Fixed rate N = max_per_minute: by time t, floor(N * t / 60) + 1 devices in
    all, i.e. one at once and then evenly spread. This gives exactly N in each
    minute counted from the start ([0, 60), [60, 120), ...), and at most N in
    any 60-second window, without notifying a whole minute's worth in one
    burst (which would have the devices download at the same moment).

    Ramp (ramp_base_per_minute B > 0, factor f): minute k allows floor(B * f^k)
    devices, spread the same way; the allowance is cumulative, so what was not
    used in one minute may be used later. With both set, the smaller of the
    two cumulative allowances applies. With neither, UNLIMITED (sys.maxsize).
    Never negative; before notifying starts (elapsed < 0, e.g. clocks of two
    replicas disagree) it is 0.
    """
    if elapsed_s < 0 or math.isnan(elapsed_s):
        return 0
    allowed = UNLIMITED
    if pacing.max_per_minute > 0:
        allowed = min(allowed, math.floor(pacing.max_per_minute * elapsed_s / 60.0) + 1)
    if pacing.ramp_base_per_minute > 0:
        allowed = min(
            allowed, _ramp_allowed(pacing.ramp_base_per_minute, pacing.ramp_factor, elapsed_s)
        )
    if allowed >= UNLIMITED:
        return UNLIMITED
    return max(0, allowed - max(0, notified_so_far))


# --------------------------------------------------------------------------
# 5. Per-device timeout and retries
# --------------------------------------------------------------------------


def device_timed_out(notified_at_s: float, now_s: float, timeout_s: float | None) -> bool:
    """True when a device notified at `notified_at_s` is still unfinished past
    its timeout (strictly: at exactly the timeout it still has time). None or
    0 means no timeout (the spec's "0: no timeout")."""
    if timeout_s is None or timeout_s <= 0:
        return False
    return now_s - notified_at_s > timeout_s


def retry_delay_s(attempt: int, base_s: float = 30.0, cap_s: float = 600.0) -> float:
    """Backoff before the next attempt, after `attempt` attempts have failed
    (1 after the first failure): base * 2^(attempt - 1), at most cap.
    attempt < 1 counts as 1. No jitter: the pacing already spread the
    devices' first attempts, so their retries are spread too, and a fixed
    delay keeps the plan the same on every replica."""
    exponent = min(max(attempt, 1) - 1, 62)  # 2^62 * anything is past any cap
    return float(min(cap_s, base_s * 2**exponent))


def should_retry(attempts: int, retries: int) -> bool:
    """Whether a failed device gets another attempt: `attempts` made so far
    against `retries` allowed retries, i.e. 1 + retries attempts in all."""
    return attempts < 1 + max(0, retries)
