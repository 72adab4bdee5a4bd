"""Fleet overview: devices by status, class and version; active rollouts
with their stage progress; recent alerts."""

from __future__ import annotations

import asyncio

from rich.table import Table
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Static

from edgefleet.controlplane.client.format import format_bar
from edgefleet.tui.screens.base import FleetScreen, cursor_key, keep_cursor, reporting
from edgefleet.tui.summary import FleetSummary, rollout_progress, summarize


def _counts(title: str, rows: tuple[tuple[str, int], ...], limit: int = 6) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 1))
    table.add_column(ratio=1, no_wrap=True)
    table.add_column(justify="right")
    for name, count in rows[:limit]:
        table.add_row(name, str(count))
    if len(rows) > limit:
        table.add_row(f"+{len(rows) - limit} more", "")
    return table


class OverviewScreen(FleetScreen):
    TOPICS = frozenset({"device", "deployment", "rollout", "class"})
    NAV_MODE = "overview"
    BINDINGS = [
        Binding("enter", "open", "Open rollout", show=False),
        Binding("r", "refresh", "Refresh"),
    ]

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        with Horizontal(id="counts"):
            yield Static(id="by-state", classes="count-box")
            yield Static(id="by-class", classes="count-box")
            yield Static(id="by-version", classes="count-box")
        yield Static("Active rollouts", classes="section")
        yield DataTable(id="rollouts", cursor_type="row", zebra_stripes=False)
        yield Static("Alerts", classes="section")
        yield DataTable(id="alerts", cursor_type="row")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#rollouts", DataTable).add_columns("id", "version", "state", "progress",
                                                          "stage")  # fmt: skip
        self.query_one("#alerts", DataTable).add_columns("kind", "subject", "what")
        super().on_mount()

    def reload(self) -> None:
        self.load()

    @work(exclusive=True, group="overview", exit_on_error=False)
    async def load(self) -> None:
        with reporting(self):
            devices, rollouts = await asyncio.gather(
                self.client.list_devices(), self.client.list_rollouts()
            )
            self.show(summarize(devices, rollouts, self.now()))

    def show(self, s: FleetSummary) -> None:
        self.query_one("#by-state", Static).update(_counts("Devices", s.by_state))
        self.query_one("#by-class", Static).update(_counts("By class", s.by_class))
        self.query_one("#by-version", Static).update(_counts("Serving", s.by_version))
        rollouts = self.query_one("#rollouts", DataTable)
        key = cursor_key(rollouts)
        rollouts.clear()
        for r in s.active_rollouts:
            done, total = rollout_progress(r)
            stage = f"{r.current_stage + 1}/{len(r.stages)}" if r.stages else "-"
            rollouts.add_row(r.id[:8], r.ref, r.state, format_bar(done, total), stage, key=r.id)
        keep_cursor(rollouts, key)
        alerts = self.query_one("#alerts", DataTable)
        alerts.clear()
        for a in s.alerts:
            alerts.add_row(a.kind, a.subject, a.text)
        keep_cursor(alerts, None)

    def action_open(self) -> None:
        key = cursor_key(self.query_one("#rollouts", DataTable))
        if key:
            from edgefleet.tui.screens.monitor import MonitorScreen

            self.app.push_screen(MonitorScreen(key))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "rollouts" and event.row_key.value:
            from edgefleet.tui.screens.monitor import MonitorScreen

            self.app.push_screen(MonitorScreen(str(event.row_key.value)))
