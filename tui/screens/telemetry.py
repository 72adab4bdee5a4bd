"""The telemetry explorer: p95 latency, error rate, memory and request
rate over time by version, class or device, over a chosen range."""

from __future__ import annotations

from datetime import timedelta

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Input, Static

from edgefleet.tui.client import GROUP_BY, METRICS
from edgefleet.tui.screens.base import FleetScreen, reporting
from edgefleet.tui.widgets import SeriesPlot

RANGES = (
    ("15m", timedelta(minutes=15)), ("1h", timedelta(hours=1)), ("6h", timedelta(hours=6)),
    ("24h", timedelta(days=1)), ("7d", timedelta(days=7)),
)  # fmt: skip


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
        Binding("slash", "filter", "Filter"),
        Binding("r", "refresh", "Refresh"),
        Binding("escape", "blur", "Leave filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.metric = 0
        self.group = 0
        self.range = 1

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield Static(id="choice", classes="status")
        yield Input(placeholder="/ filter: model name (Enter applies)", id="filter")
        yield SeriesPlot(id="plot")
        yield Static(id="legend", classes="status")
        yield from self.compose_footer()

    def reload(self) -> None:
        self.load()

    def action_cycle(self, what: str) -> None:
        sizes = {"metric": len(METRICS), "group": len(GROUP_BY), "range": len(RANGES)}
        setattr(self, what, (getattr(self, what) + 1) % sizes[what])
        self.reload()

    def action_filter(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self) -> None:
        self.set_focus(None)
        self.reload()

    def action_blur(self) -> None:
        self.set_focus(None)

    @work(exclusive=True, group="telemetry", exit_on_error=False)
    async def load(self) -> None:
        metric = list(METRICS)[self.metric]
        group = list(GROUP_BY)[self.group]
        label, since = RANGES[self.range]
        model = self.query_one(Input).value.strip()
        self.query_one("#choice", Static).update(
            f"[m] {metric}   [g] by {group}   [t] last {label}"
            + (f"   model {model}" if model else "")
        )
        with reporting(self):
            series = await self.client.query_telemetry(metric, group, since, model_name=model)
            self.query_one(SeriesPlot).show(series, self.now(), f"{metric} by {group}")
            legend = ", ".join(
                f"{s.group or 'all'}: last {s.points[-1][1]:.3g}" for s in series if s.points
            )
            self.query_one("#legend", Static).update(legend or "no samples in this range")
