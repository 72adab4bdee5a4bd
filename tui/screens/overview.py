"""Fleet overview: devices by status, class and version; active rollouts
with their stage progress; recent alerts. Enter opens the rollout under the
cursor, or what the alert under it names: a device (at its deployment
history), a rollout, or a choice of the devices in no class."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from rich.table import Table
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Static

from edgefleet.controlplane.client.format import format_bar
from edgefleet.tui.data import Device
from edgefleet.tui.screens.base import FleetScreen, cursor_key, keep_cursor, reporting
from edgefleet.tui.screens.modals import ChoiceScreen
from edgefleet.tui.summary import Alert, FleetSummary, rollout_progress, summarize


@dataclass(frozen=True)
class AlertTarget:
    """What an alert names: a device or a rollout (by id), or the devices in
    no class."""

    kind: Literal["device", "rollout", "unclassified"]
    id: str = ""


def alert_target(alert: Alert) -> AlertTarget | None:
    """The device or rollout `alert` (summary.summarize) is about."""
    if alert.kind == "unclassified":
        return AlertTarget("unclassified")
    if not alert.target_id:
        return None
    kind: Literal["device", "rollout"] = (
        "device" if alert.kind in ("failed deployment", "silent") else "rollout"
    )
    return AlertTarget(kind, alert.target_id)


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
        Binding("enter", "open", "Open", show=False),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._devices: list[Device] = []
        # What each alert row (keyed by its index) opens.
        self._targets: list[AlertTarget | None] = []

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        with Horizontal(id="counts"):
            yield Static(id="by-state", classes="count-box")
            yield Static(id="by-class", classes="count-box")
            yield Static(id="by-version", classes="count-box")
        yield Static("Active rollouts", classes="section")
        yield DataTable(id="rollouts", cursor_type="row", zebra_stripes=False)
        yield Static("Alerts (Enter opens what one names)", classes="section")
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
            summary = summarize(devices, rollouts, self.now())
            self._devices = devices
            self._targets = [alert_target(a) for a in summary.alerts]
            self.show(summary)

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
        key = cursor_key(alerts)
        alerts.clear()
        for i, a in enumerate(s.alerts):
            alerts.add_row(a.kind, a.subject, a.text, key=str(i))
        keep_cursor(alerts, key)

    def action_open(self) -> None:
        table = self.query_one("#alerts", DataTable)
        if self.focused is not table:
            table = self.query_one("#rollouts", DataTable)
        key = cursor_key(table)
        if key:
            self.open_row(table, key)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.open_row(event.data_table, str(event.row_key.value))

    def open_row(self, table: DataTable[object], key: str) -> None:
        if table.id == "rollouts":
            self.open_rollout(key)
        elif table.id == "alerts" and int(key) < len(self._targets):
            self.open_alert(self._targets[int(key)])

    def open_rollout(self, rollout_id: str) -> None:
        from edgefleet.tui.screens.monitor import MonitorScreen

        self.app.push_screen(MonitorScreen(rollout_id))

    def open_alert(self, target: AlertTarget | None) -> None:
        from edgefleet.tui.screens.device_detail import DeviceDetailScreen

        if target is None:
            self.app.notify("this alert names nothing that can be opened now (refresh: r)",
                            severity="warning")  # fmt: skip
        elif target.kind == "device":
            self.app.push_screen(DeviceDetailScreen(target.id, at_history=True))
        elif target.kind == "rollout":
            self.open_rollout(target.id)
        else:
            self.choose_unclassified()

    def choose_unclassified(self) -> None:
        """The accepted devices in no class, to open one (and pin it, p)."""
        lost = [x for x in self._devices if x.state == "accepted" and not x.class_name]
        options = [(" ".join(f for f in (x.name, x.hardware.arch, x.hardware.board_model) if f),
                    x.id) for x in lost]  # fmt: skip

        def chosen(device_id: str | None) -> None:
            if device_id:
                from edgefleet.tui.screens.device_detail import DeviceDetailScreen

                self.app.push_screen(DeviceDetailScreen(device_id))

        self.app.push_screen(ChoiceScreen("Devices in no class: open one (p pins it)", options),
                             chosen)  # fmt: skip
