"""What the telemetry explorer draws, computed from the series the server
returns: no Textual, no plotext, so every rule is tested on plain data.

Time. The x-axis is always the whole selected window, in the range's own
unit (minutes up to an hour, hours up to a day, days beyond), ticks labelled
"-20 m", "-6 h", "-3 d" and "now": a single sample is a point in its place,
never an axis of its own. Buckets are a "nice" step of about a sixtieth of
the range; ranges of a day or more use whole hours, because the server
rolls raw samples older than its retention into hourly rows standing at
the start of their hour (controlplane/services/telemetry.py), so a finer
step would leave every other bucket empty. The query window starts on a
step boundary (epoch-aligned, so hourly steps meet the rollup hours).

What is left out. Samples an agent sends while it serves no model come
back as the "(no model)" version group; for a model's metrics (latency,
error and request rate, model memory) they say nothing and are not drawn.
Grouped by device or class the server cannot set them apart, but for
latency and model memory a 0 can only mean "no request measured" or "no
model loaded" (a served request takes time, a loaded model memory), so
zeros of those metrics are left out too, rather than drawn as a line at 0
that drags the y-axis down. Zero request and error rates are real and
drawn.

How many lines. The `top` series with the highest peak (the worst latency,
the busiest device: what an operator looks for) are drawn under their
names (device names, not ids); the rest become one "others" line, the p95
across them at each bucket for latency and error rate (a tail, as a budget
is checked) and their mean for memory and request rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from edgefleet.tui.data import Series

# The server's group of samples of no model (services/telemetry.py NO_MODEL).
NO_MODEL = "(no model)"
DEFAULT_TOP = 5
# About this many buckets over any range (the client's historic default).
BUCKETS = 60
NICE_STEPS = tuple(
    timedelta(seconds=s)
    for s in (10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
)
ROLLUP_STEP = timedelta(hours=1)
# Line colours, as RGB so the plot and the legend (Rich markup) agree; the
# "others" line is grey so it never reads as one more series.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 130, 200), (60, 180, 75), (230, 25, 75), (255, 225, 25), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (180, 225, 40), (250, 190, 212),
)  # fmt: skip
OTHERS_COLOR = (150, 150, 150)


@dataclass(frozen=True)
class MetricRule:
    """How one metric of the explorer is cleaned and aggregated."""

    # "p95" or "mean": how the series beyond the top ones are merged.
    others: str
    # Means something only while a model serves: "(no model)" is left out.
    model_only: bool
    # A 0 is "nothing measured", not a value: left out.
    zero_is_absent: bool


# By the names tui.client.METRICS shows (a test checks they match).
RULES: dict[str, MetricRule] = {
    "p95 latency (ms)": MetricRule("p95", model_only=True, zero_is_absent=True),
    "error rate": MetricRule("p95", model_only=True, zero_is_absent=False),
    "memory (MB)": MetricRule("mean", model_only=False, zero_is_absent=False),
    "request rate (/s)": MetricRule("mean", model_only=True, zero_is_absent=False),
    "model memory (MB)": MetricRule("mean", model_only=True, zero_is_absent=True),
}
_DEFAULT_RULE = MetricRule("mean", model_only=False, zero_is_absent=False)

# Group-by name -> what one group is, for "others (K devices)".
_KINDS = {"device": ("device", "devices"), "class": ("class", "classes"),
          "version": ("version", "versions")}  # fmt: skip


# ------------------------------------------------------------------ time


def bucket_step(span: timedelta) -> timedelta:
    """The bucket length for a range: the smallest nice step giving at most
    BUCKETS buckets, whole hours from a day up (see the module doc)."""
    wanted = span / BUCKETS
    step = next((s for s in NICE_STEPS if s >= wanted), NICE_STEPS[-1])
    return max(step, ROLLUP_STEP) if span >= timedelta(days=1) else step


def query_window(span: timedelta, now: datetime) -> tuple[datetime, datetime, timedelta]:
    """(start, end, step) to ask the server for: the last `span` up to `now`,
    starting on the first step boundary (from the epoch) inside it, so every
    bucket lies in the window and hourly buckets are the rollup hours."""
    step = bucket_step(span)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    steps_in = math.ceil((now - span - epoch) / step)
    return epoch + step * steps_in, now, step


@dataclass(frozen=True)
class TimeAxis:
    """Where a time goes on the x-axis: units before `now`, negative."""

    span: timedelta
    unit: timedelta
    # "m", "h" or "d": tick labels; `unit_words` for the axis title.
    suffix: str
    unit_words: str
    tick_every: int
    step: timedelta

    @classmethod
    def for_span(cls, span: timedelta) -> TimeAxis:
        choices: tuple[int, ...]
        if span <= timedelta(hours=1):
            unit, suffix, words = timedelta(minutes=1), "m", "minutes"
            choices = (1, 2, 5, 10, 15, 30)
        elif span <= timedelta(days=1):
            unit, suffix, words, choices = timedelta(hours=1), "h", "hours", (1, 2, 3, 4, 6, 12)
        else:
            unit, suffix, words, choices = timedelta(days=1), "d", "days", (1, 2, 7, 14, 30)
        width = span / unit
        # At most 7 intervals: the labels of an 80-column plot stay apart.
        every = next((c for c in choices if width / c <= 7), choices[-1])
        return cls(span, unit, suffix, words, every, bucket_step(span))

    @property
    def limits(self) -> tuple[float, float]:
        return -(self.span / self.unit), 0.0

    def x(self, at: datetime, now: datetime) -> float:
        return -((now - at) / self.unit)

    def ticks(self) -> tuple[tuple[float, ...], tuple[str, ...]]:
        lowest = int(self.span / self.unit)
        values = [float(-v) for v in range(lowest - lowest % self.tick_every, 0, -self.tick_every)]
        labels = [f"-{int(-v)} {self.suffix}" for v in values]
        return (*values, 0.0), (*labels, "now")

    @property
    def title(self) -> str:
        return f"{self.unit_words} ago (buckets of {_duration(self.step)})"


def _duration(step: timedelta) -> str:
    seconds = int(step.total_seconds())
    for size, suffix in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds % size == 0:
            return f"{seconds // size} {suffix}"
    return f"{seconds} s"


# ------------------------------------------------------------------ lines


@dataclass(frozen=True)
class Line:
    label: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    color: tuple[int, int, int]
    # The highest value in the window, which ranks the lines.
    peak: float
    last: float


@dataclass(frozen=True)
class Plot:
    title: str
    lines: tuple[Line, ...]
    axis: TimeAxis
    # None: nothing to draw.
    y_limits: tuple[float, float] | None
    # What was left out and why, in words ("" for nothing).
    notes: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.lines


def _clean(series: Series, rule: MetricRule) -> tuple[tuple[datetime, float], ...]:
    if rule.model_only and series.group == NO_MODEL:
        return ()
    if rule.zero_is_absent:
        return tuple(p for p in series.points if p[1] != 0)
    return series.points


def _p95(values: Sequence[float]) -> float:
    """Nearest rank: the ceil(0.95 n)-th smallest (as the agent's percentiles)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _merge(groups: Sequence[tuple[tuple[datetime, float], ...]], how: str) -> tuple[
    tuple[datetime, float], ...
]:  # fmt: skip
    at_time: dict[datetime, list[float]] = {}
    for points in groups:
        for at, value in points:
            at_time.setdefault(at, []).append(value)
    pick = _p95 if how == "p95" else (lambda vs: sum(vs) / len(vs))
    return tuple((at, pick(vs)) for at, vs in sorted(at_time.items()))


def label_of(group: str, group_by: str, names: Mapping[str, str]) -> str:
    """A device's name for its id (the server groups devices by id); other
    groups are names already ("digits@1.2.0", a class)."""
    if group_by == "device":
        return names.get(group) or group[:8]
    return group or "all"


def build_plot(
    series: Sequence[Series],
    *,
    metric: str,
    group_by: str,
    span: timedelta,
    now: datetime,
    names: Mapping[str, str] | None = None,
    only: frozenset[str] | None = None,
    top: int = DEFAULT_TOP,
) -> Plot:
    """The plot of `series` (one per group, as QueryTelemetry returns them)
    over the last `span` before `now`. `names`: device id -> name, for the
    labels; `only`: the groups (device ids) to keep, for a device filter the
    server cannot apply (several devices)."""
    rule = RULES.get(metric, _DEFAULT_RULE)
    axis = TimeAxis.for_span(span)
    names = names or {}
    notes: list[str] = []
    kept: list[tuple[str, tuple[tuple[datetime, float], ...]]] = []
    dropped_no_model = dropped_zeros = False
    for s in series:
        if only is not None and s.group not in only:
            continue
        points = _clean(s, rule)
        if rule.model_only and s.group == NO_MODEL:
            dropped_no_model |= bool(s.points)
        else:
            dropped_zeros |= len(points) < len(s.points)
        if points:
            kept.append((label_of(s.group, group_by, names), points))
    if dropped_no_model:
        notes.append(f"{NO_MODEL} samples not drawn")
    if dropped_zeros:
        notes.append("zeros (no model or no request) not drawn")
    # Highest peak first; the label breaks ties so the order is stable.
    kept.sort(key=lambda g: (-max(v for _, v in g[1]), g[0]))
    shown = kept if len(kept) <= top + 1 else kept[:top]
    rest = kept[len(shown) :]
    lines = [_line(label, points, PALETTE[i % len(PALETTE)], axis, now)
             for i, (label, points) in enumerate(shown)]  # fmt: skip
    if rest:
        one, many = _KINDS.get(group_by, ("series", "series"))
        label = f"others ({len(rest)} {many if len(rest) > 1 else one}, {rule.others})"
        merged = _merge([points for _, points in rest], rule.others)
        lines.append(_line(label, merged, OTHERS_COLOR, axis, now))
    return Plot(f"{metric} by {group_by}", tuple(lines), axis, _y_limits(lines), tuple(notes))


def _line(label: str, points: Sequence[tuple[datetime, float]], color: tuple[int, int, int],
          axis: TimeAxis, now: datetime) -> Line:  # fmt: skip
    ys = tuple(v for _, v in points)
    return Line(label, tuple(axis.x(at, now) for at, _ in points), ys, color, max(ys), ys[-1])


def _y_limits(lines: Sequence[Line]) -> tuple[float, float] | None:
    """The values' range with a little room; a flat range (one sample, a
    constant) gets room around the value so it is drawn mid-height."""
    values = [v for line in lines for v in line.ys]
    if not values:
        return None
    low, high = min(values), max(values)
    room = (high - low) * 0.05 or abs(high) * 0.1 or 1.0
    return low - room, high + room


def match_devices(text: str, names: Mapping[str, str]) -> frozenset[str]:
    """The device ids `text` names: the device of that exact name or id, else
    every device whose name or id starts with it (case-insensitive)."""
    wanted = text.strip().lower()
    if not wanted:
        return frozenset()
    exact = {i for i, n in names.items() if wanted in (i.lower(), n.lower())}
    if exact:
        return frozenset(exact)
    return frozenset(i for i, n in names.items()
                     if i.lower().startswith(wanted) or n.lower().startswith(wanted))  # fmt: skip


@dataclass(frozen=True)
class DeviceScope:
    """How a device filter applies: `device_id` for the server to narrow the
    query to (one device), `only` the device groups to keep of its answer
    (several devices, grouped by device), or `refusal`: why nothing is
    asked, in words."""

    device_id: str = ""
    only: frozenset[str] | None = None
    refusal: str = ""


def device_scope(text: str, names: Mapping[str, str], group_by: str) -> DeviceScope:
    """The scope of the device filter `text` over the devices `names` (id ->
    name); the server's answer for several devices grouped by version or
    class mixes them with the others, so that is refused, saying what to do."""
    if not text.strip():
        return DeviceScope()
    matched = match_devices(text, names)
    if not matched:
        return DeviceScope(refusal=f"no device named {text!r} or with an id starting so")
    if len(matched) == 1:
        return DeviceScope(device_id=next(iter(matched)))
    if group_by == "device":
        return DeviceScope(only=matched)
    some = ", ".join(sorted(names[i] for i in matched)[:3])
    return DeviceScope(refusal=f"{text!r} matches {len(matched)} devices ({some}, ...): "
                               "name one, or group by device (g)")  # fmt: skip
