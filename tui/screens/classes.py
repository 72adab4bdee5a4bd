"""Device classes: constraints, match rules and how many devices match;
create and edit in a form that shows the server's validation messages."""

from __future__ import annotations

from rich.table import Table
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from edgefleet.controlplane.client.format import format_bytes
from edgefleet.tui.data import DeviceClass
from edgefleet.tui.screens.base import FleetScreen, cursor_key, keep_cursor, reporting

NONE = "-"


def constraints_text(c: DeviceClass) -> str:
    """`onnxruntime auto, <= 4 MB, p95 <= 30 ms, mem <= 256 MB`."""
    parts = [f"{c.runtime or 'any'} {c.quantization or ''}".strip()]
    if c.max_model_size_mb is not None:
        parts.append(f"<= {c.max_model_size_mb:g} MB")
    if c.latency_budget_p95_ms is not None:
        parts.append(f"p95 <= {c.latency_budget_p95_ms:g} ms")
    if c.max_memory_mb is not None:
        parts.append(f"mem <= {c.max_memory_mb:g} MB")
    if c.min_accuracy_retention is not None:
        parts.append(f"acc >= {c.min_accuracy_retention:g}")
    if c.accelerator:
        parts.append(f"needs {c.accelerator}")
    if c.threads is not None:
        parts.append(f"{c.threads} threads")
    if c.speed_factor is not None:
        parts.append(f"speed x{c.speed_factor:g}")
    if c.microcontroller:
        parts.append("microcontroller")
    return ", ".join(parts)


def class_detail(c: DeviceClass) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("class", f"{c.name} (priority {c.priority}) {c.description}")
    table.add_row("constraints", constraints_text(c))
    table.add_row("rules", " AND ".join(c.rules) or "none (pin devices to it)")
    table.add_row("devices", str(c.device_count))
    table.add_row("delivery", delivery_text(c))
    if c.input_shapes or c.runtime == "tflite":
        table.add_row("input shapes", input_shapes_text(c))
    return table


def input_shapes_text(c: DeviceClass) -> str:
    """What a TFLite build fixes the model's dynamic input dims to."""
    if not c.input_shapes:
        return "the samples' shapes (edgefleet classes update --input-shape NAME=DIMS)"
    return ", ".join(c.input_shapes) + " (TFLite builds; a dynamic batch stays dynamic)"


def delivery_text(c: DeviceClass) -> str:
    """Where the class's devices fetch artifacts, and how fast they may."""
    where = (
        f"mirrors {', '.join(c.mirrors)}, then the server's"
        if c.mirrors
        else "the server's mirrors, then the control plane"
    )
    cap = f"at most {format_bytes(c.max_download_rate)}/s" if c.max_download_rate else "no cap"
    return f"{where}; {cap} (edgefleet classes update --artifact-mirror, --max-download-rate)"


class ClassesScreen(FleetScreen):
    TOPICS = frozenset({"class", "device"})
    NAV_MODE = "classes"
    BINDINGS = [
        Binding("n", "new", "New class"),
        Binding("e", "edit", "Edit"),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._items: list[DeviceClass] = []

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield DataTable(id="classes", cursor_type="row")
        yield Static(id="detail", classes="panel")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("name", "prio", "devices", "constraints", "rules")
        table.focus()
        super().on_mount()

    def reload(self) -> None:
        self.load()

    @work(exclusive=True, group="classes", exit_on_error=False)
    async def load(self) -> None:
        with reporting(self):
            self._items = await self.client.list_classes()
            table = self.query_one(DataTable)
            key = cursor_key(table)
            table.clear()
            for c in self._items:
                table.add_row(c.name, str(c.priority), str(c.device_count), constraints_text(c),
                              " AND ".join(c.rules) or NONE, key=c.name)  # fmt: skip
            keep_cursor(table, key)
            self.show_selected()

    def selected(self) -> DeviceClass | None:
        key = cursor_key(self.query_one(DataTable))
        return next((c for c in self._items if c.name == key), None)

    def show_selected(self) -> None:
        c = self.selected()
        self.query_one("#detail", Static).update(class_detail(c) if c else "no classes yet: n")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_selected()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_edit()

    def action_new(self) -> None:
        from edgefleet.tui.screens.class_form import ClassFormScreen

        self.app.push_screen(ClassFormScreen(None), lambda _: self.reload())

    def action_edit(self) -> None:
        from edgefleet.tui.screens.class_form import ClassFormScreen

        if (c := self.selected()) is not None:
            self.app.push_screen(ClassFormScreen(c), lambda _: self.reload())
