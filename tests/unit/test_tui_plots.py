"""Every rule of the telemetry plot (tui.plots), on plain series: time axes in
the range's unit over the whole window, buckets that meet the hourly
rollups, what is left out, the top lines and "others", names for ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from textual.widgets import Input, Static

from edgefleet.tui.app import make_app
from edgefleet.tui.client import METRICS
from edgefleet.tui.data import Series
from edgefleet.tui.plots import (
    NO_MODEL,
    OTHERS_COLOR,
    RULES,
    DeviceScope,
    TimeAxis,
    bucket_step,
    build_plot,
    device_scope,
    match_devices,
    query_window,
)
from edgefleet.tui.screens.telemetry import TelemetryScreen
from testkit.tui_fake import NOW as FAKE_NOW
from testkit.tui_fake import TelemetryFleet
from tests.unit.test_tui_snapshots import _keys

NOW = datetime(2026, 1, 15, 12, 7, 30, tzinfo=UTC)
LATENCY = "p95 latency (ms)"


def at(**ago: float) -> datetime:
    return NOW - timedelta(**ago)


def flat(group: str, value: float, n: int = 4, every: timedelta = timedelta(minutes=1)) -> Series:
    return Series(group, tuple((NOW - every * (n - k), value) for k in range(n)))


@pytest.mark.parametrize(
    ("span", "step"),
    [
        (timedelta(minutes=15), timedelta(seconds=15)),
        (timedelta(hours=1), timedelta(minutes=1)),
        (timedelta(hours=6), timedelta(minutes=10)),
        # A day and more: whole hours, the server's rollup granularity.
        (timedelta(days=1), timedelta(hours=1)),
        (timedelta(days=7), timedelta(hours=3)),
    ],
)
def test_buckets_are_a_nice_step_and_whole_hours_from_a_day_up(
    span: timedelta, step: timedelta
) -> None:
    assert bucket_step(span) == step
    assert span / step <= 60


def test_the_query_window_starts_on_a_step_boundary_inside_the_range() -> None:
    start, end, step = query_window(timedelta(days=1), NOW)
    assert end == NOW and step == timedelta(hours=1)
    # 11:07:30 the day before -> 12:00: the rollup hours, none before the window.
    assert start == datetime(2026, 1, 14, 13, 0, tzinfo=UTC)
    start, _, step = query_window(timedelta(days=7), NOW)
    assert start == datetime(2026, 1, 8, 15, 0, tzinfo=UTC) and step == timedelta(hours=3)
    start, _, _ = query_window(timedelta(minutes=15), NOW)
    assert start == datetime(2026, 1, 15, 11, 52, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("span", "labels", "title"),
    [
        (timedelta(minutes=15), ("-15 m", "-10 m", "-5 m", "now"), "minutes ago (buckets of 15 s)"),
        (timedelta(hours=1), ("-60 m", "-50 m", "-40 m", "-30 m", "-20 m", "-10 m", "now"),
         "minutes ago (buckets of 1 m)"),
        (timedelta(hours=6), ("-6 h", "-5 h", "-4 h", "-3 h", "-2 h", "-1 h", "now"),
         "hours ago (buckets of 10 m)"),
        (timedelta(days=1), ("-24 h", "-20 h", "-16 h", "-12 h", "-8 h", "-4 h", "now"),
         "hours ago (buckets of 1 h)"),
        (timedelta(days=7), ("-7 d", "-6 d", "-5 d", "-4 d", "-3 d", "-2 d", "-1 d", "now"),
         "days ago (buckets of 3 h)"),
    ],
)  # fmt: skip
def test_time_axes_are_in_the_ranges_unit(
    span: timedelta, labels: tuple[str, ...], title: str
) -> None:
    axis = TimeAxis.for_span(span)
    values, shown = axis.ticks()
    assert shown == labels
    assert values[0] == axis.limits[0] and values[-1] == 0.0
    assert axis.title == title


@pytest.mark.parametrize("span", [timedelta(minutes=15), timedelta(days=1), timedelta(days=7)])
def test_a_single_sample_is_a_point_in_its_place_on_the_whole_window(span: timedelta) -> None:
    plot = build_plot([Series("d1", ((at(minutes=7), 12.0),))], metric=LATENCY,
                      group_by="device", span=span, now=NOW)  # fmt: skip
    (line,) = plot.lines
    assert plot.axis.limits == (-(span / plot.axis.unit), 0.0)
    assert line.xs == (-(timedelta(minutes=7) / plot.axis.unit),)
    low, high = plot.y_limits or (0, 0)
    assert low < 12.0 < high  # room around the one value


def test_the_7d_axis_is_in_days_and_points_fall_where_their_time_is() -> None:
    series = Series("d1", ((at(days=3), 5.0), (at(hours=12), 6.0)))
    plot = build_plot([series], metric=LATENCY, group_by="device", span=timedelta(days=7), now=NOW)
    assert plot.lines[0].xs == (-3.0, -0.5)
    assert plot.axis.limits == (-7.0, 0.0)


def test_no_model_samples_are_not_drawn_for_a_models_metrics() -> None:
    series = [flat("digits@1.0.0", 12.0), flat(NO_MODEL, 0.0)]
    for metric in ("p95 latency (ms)", "error rate", "request rate (/s)", "model memory (MB)"):
        plot = build_plot(series, metric=metric, group_by="version", span=timedelta(hours=1),
                          now=NOW)  # fmt: skip
        assert [line.label for line in plot.lines] == ["digits@1.0.0"], metric
        assert f"{NO_MODEL} samples not drawn" in plot.notes
    # The agent's own memory is real whether it serves a model or not.
    memory = build_plot([flat("digits@1.0.0", 120.0), flat(NO_MODEL, 95.0)], metric="memory (MB)",
                        group_by="version", span=timedelta(hours=1), now=NOW)  # fmt: skip
    assert [line.label for line in memory.lines] == ["digits@1.0.0", NO_MODEL]
    assert memory.notes == ()


def test_zeros_before_install_do_not_drag_the_y_axis_down() -> None:
    # Grouped by device the server cannot tell no-model samples apart: they
    # are latency 0 until the model came.
    installed = Series("d1", ((at(minutes=30), 0.0), (at(minutes=20), 0.0),
                              (at(minutes=10), 14.0), (at(minutes=5), 16.0)))  # fmt: skip
    plot = build_plot([installed], metric=LATENCY, group_by="device", span=timedelta(hours=1),
                      now=NOW)  # fmt: skip
    assert plot.lines[0].ys == (14.0, 16.0)
    assert plot.y_limits is not None and plot.y_limits[0] > 13
    assert plot.notes == ("zeros (no model or no request) not drawn",)
    # A zero error rate is a real one.
    errors = Series("d1", ((at(minutes=3), 0.0), (at(minutes=2), 0.1)))
    rates = build_plot([errors], metric="error rate", group_by="device",
                       span=timedelta(hours=1), now=NOW)  # fmt: skip
    assert rates.lines[0].ys == (0.0, 0.1) and rates.notes == ()


def test_a_series_of_only_zeros_is_not_drawn_at_all() -> None:
    plot = build_plot([flat("d1", 0.0)], metric=LATENCY, group_by="device",
                      span=timedelta(hours=1), now=NOW)  # fmt: skip
    assert plot.empty and plot.y_limits is None


def test_the_top_five_by_peak_are_drawn_and_the_rest_is_one_p95_line() -> None:
    series = [flat(f"id-{i:02d}", float(i)) for i in range(1, 21)]
    plot = build_plot(series, metric=LATENCY, group_by="device", span=timedelta(hours=1), now=NOW)
    assert [line.label for line in plot.lines] == [
        "id-20", "id-19", "id-18", "id-17", "id-16", "others (15 devices, p95)",
    ]  # fmt: skip
    others = plot.lines[-1]
    # p95 (nearest rank) of 1..15 at each bucket: the 15th smallest.
    assert set(others.ys) == {15.0} and others.color == OTHERS_COLOR
    assert len({line.color for line in plot.lines}) == 6


def test_others_are_the_mean_for_memory_and_request_rate() -> None:
    series = [flat(f"v{i}", float(i)) for i in range(1, 9)]
    plot = build_plot(series, metric="request rate (/s)", group_by="version",
                      span=timedelta(hours=1), now=NOW, top=2)  # fmt: skip
    assert plot.lines[-1].label == "others (6 versions, mean)"
    assert set(plot.lines[-1].ys) == {3.5}  # mean of 1..6


def test_others_merge_by_bucket_even_where_some_have_no_point() -> None:
    series = [flat("a", 10.0), flat("b", 9.0), Series("c", ((at(minutes=2), 1.0),)),
              Series("d", ((at(minutes=2), 3.0), (at(minutes=1), 5.0)))]  # fmt: skip
    plot = build_plot(series, metric="memory (MB)", group_by="class", span=timedelta(hours=1),
                      now=NOW, top=1)  # fmt: skip
    others = plot.lines[-1]
    assert others.label == "others (3 classes, mean)"
    assert others.ys == (9.0, 9.0, (9.0 + 1.0 + 3.0) / 3, (9.0 + 5.0) / 2)


def test_one_more_than_the_top_is_drawn_itself_not_as_others() -> None:
    series = [flat(f"d{i}", float(i)) for i in range(6)]
    plot = build_plot(series, metric="memory (MB)", group_by="device", span=timedelta(hours=1),
                      now=NOW)  # fmt: skip
    assert len(plot.lines) == 6 and not any("others" in line.label for line in plot.lines)


def test_legend_labels_are_device_names_not_ids() -> None:
    series = [flat("0000000a-0000-4000-8000-000000000000", 3.0),
              flat("0000000b-0000-4000-8000-000000000000", 2.0)]  # fmt: skip
    names = {"0000000a-0000-4000-8000-000000000000": "pi-kitchen"}
    plot = build_plot(series, metric=LATENCY, group_by="device", span=timedelta(hours=1),
                      now=NOW, names=names)  # fmt: skip
    # A device the list does not know (gone since): its short id.
    assert [line.label for line in plot.lines] == ["pi-kitchen", "0000000b"]


def test_only_keeps_the_filtered_devices() -> None:
    series = [flat("a", 1.0), flat("b", 2.0), flat("c", 3.0)]
    plot = build_plot(series, metric=LATENCY, group_by="device", span=timedelta(hours=1),
                      now=NOW, only=frozenset({"a", "c"}))  # fmt: skip
    assert [line.label for line in plot.lines] == ["c", "a"]


def test_a_device_filter_matches_an_exact_name_or_id_else_prefixes() -> None:
    names = {"0001abcd-x": "pi-kitchen", "0002abcd-x": "pi-kitchen-2", "0003ffff-x": "gateway"}
    assert match_devices("pi-kitchen", names) == {"0001abcd-x"}
    assert match_devices("PI-", names) == {"0001abcd-x", "0002abcd-x"}
    assert match_devices("0003", names) == {"0003ffff-x"}
    assert match_devices("nope", names) == frozenset()
    assert match_devices("  ", names) == frozenset()


def test_a_device_filter_narrows_the_query_keeps_lines_or_says_why_not() -> None:
    names = {"a1": "pi-kitchen", "a2": "pi-hall", "b1": "gateway"}
    assert device_scope("", names, "version") == DeviceScope()
    # One device: the server narrows the query, whatever the grouping.
    assert device_scope("gate", names, "class") == DeviceScope(device_id="b1")
    # Several, grouped by device: their lines are kept from the answer.
    assert device_scope("pi-", names, "device") == DeviceScope(only=frozenset({"a1", "a2"}))
    # Several, grouped by version: the server would mix them with the rest.
    assert device_scope("pi-", names, "version").refusal == (
        "'pi-' matches 2 devices (pi-hall, pi-kitchen, ...): name one, or group by device (g)"
    )
    assert device_scope("x", names, "device").refusal == (
        "no device named 'x' or with an id starting so"
    )


def test_every_metric_the_explorer_offers_has_a_rule() -> None:
    assert set(RULES) == set(METRICS)


# ------------------------------------------------------------------ the screen's device filter


async def _explore(device: str, *keys: str) -> tuple[TelemetryFleet, TelemetryScreen, str]:
    """The explorer after `keys` with `device` in its device filter: the
    fleet (its calls), the screen, the legend's text."""
    fleet = TelemetryFleet()
    app = make_app(fleet, clock=lambda: FAKE_NOW, watch=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await _keys("6", *keys, "d")(pilot)
        screen = app.screen
        assert isinstance(screen, TelemetryScreen)
        screen.query_one("#device", Input).value = device
        await _keys("enter")(pilot)
        return fleet, screen, str(screen.query_one("#legend", Static).render())


def _asked(fleet: TelemetryFleet) -> list[object]:
    return [args for call, args in fleet.calls if call == "telemetry"]


async def test_a_device_named_narrows_the_query_to_it() -> None:
    # gateway-1 sent samples of no model until 10 hours ago: not drawn.
    fleet, screen, legend = await _explore("gateway-1", "t", "t")
    gateway = next(x.id for x in fleet.devices if x.name == "gateway-1")
    assert _asked(fleet)[-1] == ("p95 latency (ms)", "version", timedelta(days=1), gateway)
    assert screen.plot is not None
    (line,) = screen.plot.lines
    assert line.label == "digits@1.0.0" and -10 <= line.xs[0] < -9
    assert f"{NO_MODEL} samples not drawn" in legend


async def test_a_prefix_grouped_by_device_keeps_the_devices_it_matches() -> None:
    fleet, screen, legend = await _explore("SENSOR-", "g", "g")
    assert _asked(fleet)[-1][3] == ""  # the server is asked for all, and
    assert screen.plot is not None  # the lines of the 11 sensors are kept
    labels = [line.label for line in screen.plot.lines]
    assert all(label.startswith("sensor-") for label in labels[:5])
    assert labels[5] == "others (6 devices, p95)" and "others (6 devices, p95)" in legend


async def test_a_prefix_of_several_devices_not_grouped_by_device_says_what_to_do() -> None:
    fleet, screen, legend = await _explore("sensor-")
    assert len(_asked(fleet)) == 1  # the first load only
    assert screen.plot is None
    assert legend == ("'sensor-' matches 11 devices (sensor-01, sensor-02, sensor-03, ...): "
                      "name one, or group by device (g)")  # fmt: skip


async def test_an_unknown_device_is_said_and_not_asked_for() -> None:
    fleet, _, legend = await _explore("nope")
    assert len(_asked(fleet)) == 1
    assert legend == "no device named 'nope' or with an id starting so"
