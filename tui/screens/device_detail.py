"""One device: hardware, runtimes, every model it holds (versions, update
state, progress or last failure, the version it committed before), labels, the
deployment history per model with reasons, and its telemetry."""

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
from edgefleet.tui.data import DeploymentEvent, Device, DeviceModel, FleetEvent
from edgefleet.tui.screens import actions
from edgefleet.tui.screens.base import FleetScreen, keep_cursor, reporting
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


class DeviceDetailScreen(FleetScreen):
    TOPICS = frozenset({"device", "deployment", "telemetry"})
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("a", "accept", "Accept"),
        Binding("x", "reject", "Reject"),
        Binding("l", "labels", "Labels"),
        Binding("p", "pin", "Pin"),
        Binding("u", "unassign", "Unassign model"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self, device_id: str) -> None:
        super().__init__()
        self.device_id = device_id
        self.device: Device | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="title", classes="title")
        with VerticalScroll(id="body"):
            with Horizontal(id="facts"):
                yield Static(id="hardware", classes="panel")
                yield Static(id="runtime", classes="panel")
            yield Static(id="model", classes="panel")
            yield Static("Deployment history", classes="section")
            yield DataTable(id="history", cursor_type="row")
            yield SeriesPlot(id="plot")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#history", DataTable).add_columns("model", "at", "seq", "version",
                                                         "state", "reason")  # fmt: skip
        super().on_mount()

    def reload(self) -> None:
        self.load()

    def handle_event(self, event: FleetEvent) -> None:
        pass

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
        table = self.query_one("#history", DataTable)
        table.clear()
        # Per model (by name), newest first within each.
        for e in sorted(history, key=lambda e: e.model_name):
            table.add_row(e.model_name, format_time(e.at), str(e.sequence), e.model_version,
                          e.state or "-", e.reason or "-")  # fmt: skip
        keep_cursor(table, None)

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
