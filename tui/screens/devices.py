"""Devices: a sortable, filterable table; Enter opens the detail view.
Actions on the selected device: accept, reject, labels, pin."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Input, Static

from edgefleet.controlplane.client.format import format_ago
from edgefleet.tui.data import Device
from edgefleet.tui.screens import actions
from edgefleet.tui.screens.base import FleetScreen, cursor_key, keep_cursor, reporting
from edgefleet.tui.summary import device_status, format_labels

# (column title, sort key) in the order `s` cycles through them.
COLUMNS: tuple[tuple[str, Callable[[Device], Any]], ...] = (
    ("name", lambda d: d.name),
    ("status", device_status),
    ("class", lambda d: d.class_name),
    ("models", lambda d: d.models_text),
    ("labels", lambda d: format_labels(d.labels.items())),
    ("last seen", lambda d: -(d.last_seen_at.timestamp() if d.last_seen_at else 0)),
)


# The models cell's width: several models must not push the labels and the
# last-seen time off the screen (the detail view lists them all).
MODELS_WIDTH = 40


def _truncate(text: str, width: int = MODELS_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def matches(device: Device, text: str) -> bool:
    """Every word of the filter is in one of the shown fields; `k=v` words
    must be labels of the device."""
    fields = [device.name, device.id, device_status(device), device.class_name,
              device.models_text, device.state]  # fmt: skip
    for word in text.lower().split():
        if "=" in word:
            key, _, value = word.partition("=")
            if device.labels.get(key, None) != value:
                return False
        elif not any(word in f.lower() for f in fields):
            return False
    return True


class DevicesScreen(FleetScreen):
    TOPICS = frozenset({"device", "deployment", "class"})
    NAV_MODE = "devices"
    BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("escape", "leave_filter", "Leave filter", show=False),
        Binding("s", "sort", "Sort"),
        Binding("a", "accept", "Accept"),
        Binding("x", "reject", "Reject"),
        Binding("l", "labels", "Labels"),
        Binding("p", "pin", "Pin"),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._devices: list[Device] = []
        self._sort = 0
        self._reverse = False

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield Input(placeholder="/ filter: words or label k=v", id="filter")
        yield DataTable(id="devices", cursor_type="row")
        yield Static(id="status", classes="status")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*(title for title, _ in COLUMNS))
        self.query_one(DataTable).focus()
        super().on_mount()

    def reload(self) -> None:
        self.load()

    @work(exclusive=True, group="devices", exit_on_error=False)
    async def load(self) -> None:
        with reporting(self):
            self._devices = await self.client.list_devices()
            self.render_table()

    def selected(self) -> Device | None:
        key = cursor_key(self.query_one(DataTable))
        return next((d for d in self._devices if d.id == key), None)

    def render_table(self) -> None:
        table = self.query_one(DataTable)
        key = cursor_key(table)
        text = self.query_one("#filter", Input).value
        title, sort_key = COLUMNS[self._sort]
        shown = sorted((d for d in self._devices if matches(d, text)), key=lambda d: d.name)
        shown.sort(key=sort_key, reverse=self._reverse)
        table.clear()
        now = self.now()
        for d in shown:
            table.add_row(
                d.name, device_status(d), d.class_name + (" (pinned)" if d.class_pinned else ""),
                _truncate(d.models_text or "-"), format_labels(d.labels.items()) or "-",
                format_ago(d.last_seen_at, now), key=d.id,
            )  # fmt: skip
        keep_cursor(table, key)
        order = "descending" if self._reverse else "ascending"
        self.query_one("#status", Static).update(
            f"{len(shown)} of {len(self._devices)} devices, sorted by {title} ({order})"
        )

    def on_input_changed(self, event: Input.Changed) -> None:
        self.render_table()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(DataTable).focus()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        self._set_sort(event.column_index)

    def _set_sort(self, index: int) -> None:
        self._reverse = not self._reverse if index == self._sort else False
        self._sort = index
        self.render_table()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            from edgefleet.tui.screens.device_detail import DeviceDetailScreen

            self.app.push_screen(DeviceDetailScreen(str(event.row_key.value)))

    def action_leave_filter(self) -> None:
        self.query_one(DataTable).focus()

    def action_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_sort(self) -> None:
        # Each column ascending then descending, then the next column.
        if self._reverse:
            self._reverse = False
            self._sort = (self._sort + 1) % len(COLUMNS)
        else:
            self._reverse = True
        self.render_table()

    def action_accept(self) -> None:
        if (d := self.selected()) is not None:
            actions.accept(self, d)

    def action_reject(self) -> None:
        if (d := self.selected()) is not None:
            actions.reject(self, d)

    def action_labels(self) -> None:
        if (d := self.selected()) is not None:
            actions.edit_labels(self, d)

    def action_pin(self) -> None:
        if (d := self.selected()) is not None:
            actions.pin(self, d)
