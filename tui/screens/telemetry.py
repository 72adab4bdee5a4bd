"""The telemetry explorer: p95 latency, error rate, memory and request
rate over time by version, class or device, over a chosen range, narrowed
to a model or to devices. What is drawn (axes, top lines, "others", what is
left out) is decided in tui.plots; this screen asks and shows."""

from __future__ import annotations

from datetime import timedelta

from rich.style import Style
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Input, Static
from textual_plotext import PlotextPlot

from edgefleet.tui import plots
from edgefleet.tui.client import GROUP_BY, METRICS
from edgefleet.tui.screens.base import FleetScreen, reporting

RANGES = (
    ("15m", timedelta(minutes=15)), ("1h", timedelta(hours=1)), ("6h", timedelta(hours=6)),
    ("24h", timedelta(days=1)), ("7d", timedelta(days=7)),
)  # fmt: skip


class TelemetryPlot(PlotextPlot):
    """A tui.plots.Plot drawn with plotext: the x-axis is the whole window,
    ticks in the range's unit; the legend is the screen's, below."""

    def draw(self, plot: plots.Plot) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(plot.title if not plot.empty else f"{plot.title}: no data in this range")
        plt.xlabel(plot.axis.title)
        plt.xlim(*plot.axis.limits)
        ticks, labels = plot.axis.ticks()
        plt.xticks(list(ticks), list(labels))
        if plot.y_limits:
            plt.ylim(*plot.y_limits)
        for line in plot.lines:
            xs, ys = list(line.xs), list(line.ys)
            if len(xs) == 1:
                # A line through one point draws nothing: a dot that shows.
                plt.scatter(xs, ys, marker="●", color=line.color)
            else:
                plt.plot(xs, ys, marker="braille", color=line.color)
        self.refresh()

    def blank(self, title: str) -> None:
        """Nothing drawn, and why (no lines of an earlier answer left standing)."""
        self.plt.clear_data()
        self.plt.clear_figure()
        self.plt.title(title)
        self.refresh()


def legend(plot: plots.Plot) -> Text:
    """Each line's colour, name and peak; then what was left out."""
    if plot.empty:
        return Text("no samples in this range", style="italic")
    text = Text("peak ")
    for line in plot.lines:
        text.append("━━", Style(color=f"rgb({','.join(map(str, line.color))})"))
        text.append(f" {line.label} {line.peak:.3g}  ")
    if plot.notes:
        text.append("\n" + "; ".join(plot.notes), style="italic")
    return text


class TelemetryScreen(FleetScreen):
    # Telemetry itself is not on the watch stream: a new version or device
    # (a deployment) is when the groups change.
    TOPICS = frozenset({"deployment", "telemetry"})
    NAV_MODE = "telemetry"
    # Nothing focused at first, so the digit keys switch screens.
    AUTO_FOCUS = ""
    BINDINGS = [
        Binding("m", "cycle('metric')", "Metric"),
        Binding("g", "cycle('group')", "Group by"),
        Binding("t", "cycle('range')", "Range"),
        Binding("slash", "focus_filter('filter')", "Model"),
        Binding("d", "focus_filter('device')", "Device"),
        Binding("r", "refresh", "Refresh"),
        Binding("escape", "blur", "Leave filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.metric = 0
        self.group = 0
        self.range = 1
        # What is drawn now (None before the first answer, or when refused).
        self.plot: plots.Plot | None = None

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield Static(id="choice", classes="status")
        with Horizontal(id="filters"):
            yield Input(placeholder="/ model name (Enter applies)", id="filter")
            yield Input(placeholder="d device: name or id prefix", id="device")
        yield TelemetryPlot(id="plot")
        yield Static(id="legend", classes="status")
        yield from self.compose_footer()

    def reload(self) -> None:
        self.load()

    def action_cycle(self, what: str) -> None:
        sizes = {"metric": len(METRICS), "group": len(GROUP_BY), "range": len(RANGES)}
        setattr(self, what, (getattr(self, what) + 1) % sizes[what])
        self.reload()

    def action_focus_filter(self, which: str) -> None:
        self.set_focus(self.query_one(f"#{which}", Input))

    def on_input_submitted(self) -> None:
        self.set_focus(None)
        self.reload()

    def action_blur(self) -> None:
        self.set_focus(None)

    @work(exclusive=True, group="telemetry", exit_on_error=False)
    async def load(self) -> None:
        metric = list(METRICS)[self.metric]
        group = list(GROUP_BY)[self.group]
        label, span = RANGES[self.range]
        model = self.query_one("#filter", Input).value.strip()
        device = self.query_one("#device", Input).value.strip()
        self.query_one("#choice", Static).update(
            f"[m] {metric}   [g] by {group}   [t] last {label}"
            + (f"   model {model}" if model else "")
            + (f"   device {device}" if device else "")
        )
        shown = self.query_one("#legend", Static)
        self.plot = None
        with reporting(self):
            names = {dev.id: dev.name for dev in await self.client.list_devices()}
            scope = plots.device_scope(device, names, group)
            if scope.refusal:
                self.query_one(TelemetryPlot).blank(scope.refusal)
                shown.update(Text(scope.refusal))
                return
            series = await self.client.query_telemetry(
                metric, group, span, device_id=scope.device_id, model_name=model
            )
            plot = plots.build_plot(series, metric=metric, group_by=group, span=span,
                                    now=self.now(), names=names, only=scope.only)  # fmt: skip
            self.query_one(TelemetryPlot).draw(plot)
            shown.update(legend(plot))
            self.plot = plot
