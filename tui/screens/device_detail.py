"""One device: hardware, runtimes, every model it holds (versions, update
state, progress or last failure, the version it committed before), labels, the
rollouts it is a member of (Enter opens one), the deployment history per
model with each reason whole, and its telemetry. Assign (m) and unassign (u)
a model after confirming."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Static

from edgefleet.controlplane.client.format import format_ago
from edgefleet.tui.data import (
    RESYNC_TOPICS,
    DeploymentEvent,
    Device,
    DeviceModel,
    DeviceRollout,
    FleetEvent,
)
from edgefleet.tui.screens import actions
from edgefleet.tui.screens.base import FleetScreen, cursor_key, keep_cursor, reporting
from edgefleet.tui.screens.modals import AssignScreen, ConfirmScreen
from edgefleet.tui.summary import device_status, format_labels, format_time
from edgefleet.tui.widgets import SeriesPlot

PLOT_RANGE = timedelta(hours=1)


def _grid(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value or "-")
    return table


def earlier_version(model: DeviceModel, history: list[DeploymentEvent]) -> str:
    """The newest version of `model` the device committed other than the one
    it serves (history is newest first): what it ran before. Not a loaded
    standby: the agent drops its standby once an update commits."""
    active = model.serving_version
    return next((e.model_version for e in history if e.model_name == model.name
                 and e.state == "committed" and e.model_version != active), "")  # fmt: skip


def models_table(models: tuple[DeviceModel, ...], history: list[DeploymentEvent]) -> Table:
    """One row per model: assigned and served version, state, the version
    committed before, and the update in flight or the last failure."""
    table = Table(title="Models", title_justify="left", box=None, padding=(0, 1),
                  header_style="bold")  # fmt: skip
    for title in ("model", "assigned", "serving", "state", "before"):
        table.add_column(title, no_wrap=True)
    table.add_column("update", overflow="fold")
    for m in models:
        state = (m.state or "-") + (" (shadow)" if m.shadow else "")
        style = "red" if m.failed else "yellow" if m.detail and m.state != "failed" else ""
        # Text, not markup: names and reasons come from outside and may hold `[`.
        table.add_row(Text(m.name), Text(m.assigned_version or "(unassigned)"),
                      Text(m.serving_version or "-"), Text(state, style=style),
                      Text(earlier_version(m, history) or "-"), Text(m.detail or "-"))  # fmt: skip
    if not models:
        table.add_row("-", "", "", "", "", "no model assigned")
    return table


def history_table(history: list[DeploymentEvent]) -> Table:
    """Per model (by name), newest first within each; each reason whole,
    wrapped to the width (an agent's validation detail runs to many lines)."""
    table = Table(box=None, padding=(0, 1), header_style="bold", expand=True)
    for title in ("model", "at", "seq", "version", "state"):
        table.add_column(title, no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=1)
    for e in sorted(history, key=lambda e: e.model_name):
        style = "red" if e.state == "failed" else ""
        table.add_row(Text(e.model_name), format_time(e.at), str(e.sequence),
                      Text(e.model_version), Text(e.state or "-", style=style),
                      Text(e.reason or "-"))  # fmt: skip
    if not history:
        table.add_row("-", "", "", "", "", "no update reported yet")
    return table


class DeviceDetailScreen(FleetScreen):
    TOPICS = frozenset({"device", "deployment", "telemetry"})
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("a", "accept", "Accept"),
        Binding("x", "reject", "Reject"),
        Binding("l", "labels", "Labels"),
        Binding("p", "pin", "Pin"),
        Binding("m", "assign", "Assign model"),
        Binding("u", "unassign", "Unassign model"),
        Binding("enter", "open_rollout", "Open rollout", show=False),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self, device_id: str, *, at_history: bool = False) -> None:
        """`at_history`: scrolled to the deployment history once shown (the
        monitor and the overview open a failed device so)."""
        super().__init__()
        self.device_id = device_id
        self.device: Device | None = None
        self.rollouts: list[DeviceRollout] = []
        self._at_history = at_history
        # Whether the rollouts must be read again: they cost a read of each
        # rollout in full, so not on every event of a rollout's other devices.
        self._rollouts_due = True

    def compose(self) -> ComposeResult:
        yield Static(id="title", classes="title")
        with VerticalScroll(id="body"):
            with Horizontal(id="facts"):
                yield Static(id="hardware", classes="panel")
                yield Static(id="runtime", classes="panel")
            yield Static(id="model", classes="panel")
            yield Static("Rollouts (Enter opens one)", classes="section")
            yield DataTable(id="rollouts", cursor_type="row")
            yield Static("Deployment history", id="history-title", classes="section")
            yield Static(id="history", classes="panel")
            yield SeriesPlot(id="plot")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#rollouts", DataTable).add_columns("rollout", "version", "state",
                                                          "stage", "device", "reason")  # fmt: skip
        super().on_mount()

    def reload(self) -> None:
        self.load()
        if self._rollouts_due:
            self._rollouts_due = False
            self.load_rollouts()

    def action_refresh(self) -> None:
        self._rollouts_due = True
        self.reload()

    def handle_event(self, event: FleetEvent) -> None:
        # An event names up to a few devices by id, then "and N more".
        if (event.topic in RESYNC_TOPICS or self.device_id in event.message
                or " more)" in event.message):  # fmt: skip
            self._rollouts_due = True

    @work(exclusive=True, group="device", exit_on_error=False)
    async def load(self) -> None:
        with reporting(self):
            device, history, series = await asyncio.gather(
                self.client.get_device(self.device_id),
                self.client.device_history(self.device_id),
                self.client.query_telemetry("p95 latency (ms)", "version", PLOT_RANGE,
                                            device_id=self.device_id),
            )  # fmt: skip
            self.device = device
            self.show(device, history)
            self.query_one(SeriesPlot).show(series, self.now(), "p95 latency (ms), last hour")
            if self._at_history:
                self._at_history = False
                self.call_after_refresh(self.scroll_to_history)

    @work(exclusive=True, group="device-rollouts", exit_on_error=False)
    async def load_rollouts(self) -> None:
        """Apart from the rest: finding the rollouts reads each in full."""
        with reporting(self):
            self.show_rollouts(await self.client.device_rollouts(self.device_id))

    def scroll_to_history(self) -> None:
        self.query_one("#body", VerticalScroll).scroll_to_widget(
            self.query_one("#history-title"), animate=False, top=True
        )

    def show_rollouts(self, rollouts: list[DeviceRollout]) -> None:
        self.rollouts = rollouts
        table = self.query_one("#rollouts", DataTable)
        key = cursor_key(table)
        table.clear()
        for x in rollouts:
            r, member = x.rollout, x.member
            stage = f"{member.stage + 1}/{len(r.stages)}" if r.stages else str(member.stage + 1)
            table.add_row(r.id[:8], Text(r.ref), r.state, stage, member.state,
                          Text(member.reason or "-"), key=r.id)  # fmt: skip
        keep_cursor(table, key)

    def show(self, d: Device, history: list[DeploymentEvent]) -> None:
        now = self.now()
        pinned = " (pinned)" if d.class_pinned else ""
        self.query_one("#title", Static).update(
            f"{d.name}  {d.id[:8]}  {device_status(d)}  class {d.class_name or '-'}{pinned}  "
            f"last seen {format_ago(d.last_seen_at, now)}"
        )
        hw, rt = d.hardware, d.runtime
        accel = ", ".join(f"{a.kind} {a.name}" for a in hw.accelerators)
        self.query_one("#hardware", Static).update(_grid("Hardware", [
            ("board", hw.board_model), ("os", f"{hw.os} {hw.os_release}".strip()),
            ("arch", hw.arch), ("cpu", f"{hw.cpu_model} x{hw.cpu_cores}"),
            ("memory", f"{hw.memory_mb} MB"), ("disk", f"{hw.disk_free_mb}/{hw.disk_total_mb} MB"),
            ("accel", accel),
        ]))  # fmt: skip
        self.query_one("#runtime", Static).update(_grid("Runtimes", [
            ("agent", rt.agent_version), ("python", rt.python_version),
            ("onnxruntime", rt.onnxruntime_version),
            ("providers", ", ".join(rt.onnxruntime_providers)),
            ("litert", f"{rt.litert_package} {rt.litert_version}".strip()),
            ("tensorrt", rt.tensorrt_version), ("labels", format_labels(d.labels.items())),
        ]))  # fmt: skip
        self.query_one("#model", Static).update(models_table(d.models, history))
        self.query_one("#history", Static).update(history_table(history))

    def action_accept(self) -> None:
        if self.device is not None:
            actions.accept(self, self.device)

    def action_reject(self) -> None:
        if self.device is not None:
            actions.reject(self, self.device)

    def action_labels(self) -> None:
        if self.device is not None:
            actions.edit_labels(self, self.device)

    def action_pin(self) -> None:
        if self.device is not None:
            actions.pin(self, self.device)

    def action_unassign(self) -> None:
        if self.device is not None:
            actions.unassign(self, self.device)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "rollouts" and event.row_key.value:
            self.open_rollout(str(event.row_key.value))

    def action_open_rollout(self) -> None:
        key = cursor_key(self.query_one("#rollouts", DataTable))
        if key:
            self.open_rollout(key)

    def open_rollout(self, rollout_id: str) -> None:
        from edgefleet.tui.screens.monitor import MonitorScreen

        self.app.push_screen(MonitorScreen(rollout_id))

    def action_assign(self) -> None:
        if self.device is not None:
            self.choose_assignment(self.device)

    @work(group="device-action", exit_on_error=False)
    async def choose_assignment(self, device: Device) -> None:
        """The pushed versions to choose from, then a confirmation, then
        AssignModel (the server says why a device cannot take it)."""
        versions = None
        with reporting(self):
            versions = await self.client.list_versions()
        if versions is None:
            return
        if not versions:
            self.app.notify("no model version is pushed yet: push one on the Models screen (4)",
                            title="Nothing to assign", severity="warning")  # fmt: skip
            return
        assigned = {m.name: m.assigned_version for m in device.models if m.assigned_version}

        def chosen(choice: tuple[str, str] | None) -> None:
            if choice is not None:
                self.confirm_assignment(device, *choice, was=assigned.get(choice[0], ""))

        self.app.push_screen(AssignScreen(f"Assign a model to {device.name}", versions, assigned),
                             chosen)  # fmt: skip

    def confirm_assignment(self, device: Device, model: str, version: str, *, was: str) -> None:
        ref = f"{model}@{version}"
        if was == version:
            self.app.notify(f"{device.name} has {ref} assigned already", markup=False)
            return
        instead = f" in place of {model}@{was}" if was else ""
        stay = "" if was else " Its other models stay."
        question = (f"Assign {ref} to {device.name}{instead}?{stay} Its agent installs its "
                    "class's build of it.")  # fmt: skip

        def answered(yes: bool | None) -> None:
            if yes:
                actions.run(self, lambda: self.client.assign_model(device.id, model, version,
                                                                   "assigned in the TUI"),
                            f"assigned {ref} to {device.name}")  # fmt: skip

        self.app.push_screen(ConfirmScreen(question, yes="Assign"), answered)
