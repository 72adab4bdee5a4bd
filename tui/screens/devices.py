"""Devices: a sortable, filterable table; Enter opens the detail view.
Actions (accept, reject, labels, pin, assign, unassign) act on the devices
selected (space, shift+up/down, `*` for every row the filter shows; escape
clears), or on the device under the cursor when none is."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.coordinate import Coordinate
from textual.widgets import DataTable, Input, Static

from edgefleet.controlplane.client.bulk import BulkResult
from edgefleet.controlplane.client.format import format_ago
from edgefleet.tui.data import Device, FleetEvent
from edgefleet.tui.screens import actions
from edgefleet.tui.screens.base import (
    COALESCE_S,
    FleetScreen,
    cursor_key,
    keep_cursor,
    reporting,
)
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


# Before the name of a selected device: a mark, not a colour.
SELECTED = "✓ "

# Devices re-read one by one after events (patch) before a whole reload is
# cheaper: a page of the list is 500 devices.
PATCH_LIMIT = 50


def _truncate(text: str, width: int = MODELS_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def matches(device: Device, text: str) -> bool:
    """Every word of the filter is in one of the shown fields (a label's
    value too: `north` finds the devices at site=north); `k=v` words must be
    labels of the device."""
    fields = [device.name, device.id, device_status(device), device.class_name,
              device.models_text, device.state, *device.labels.values()]  # fmt: skip
    for word in text.lower().split():
        if "=" in word:
            key, _, value = word.partition("=")
            if device.labels.get(key, None) != value:
                return False
        elif not any(word in f.lower() for f in fields):
            return False
    return True


class FilterInput(Input):
    """The devices filter. `*` is not typed into it (a filter has no use for
    it): it selects every row shown (DevicesScreen), so "/north*" then an
    action is the whole of acting on a site. An Input claims every printable
    key, which hides the screen's binding of it, unless it lets this one go."""

    def check_consume_key(self, key: str, character: str | None) -> bool:
        return key != "asterisk" and super().check_consume_key(key, character)


class DevicesScreen(FleetScreen):
    TOPICS = frozenset({"device", "deployment", "class"})
    NAV_MODE = "devices"
    BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("escape", "leave_filter", "Leave filter / clear selection", show=False),
        Binding("s", "sort", "Sort"),
        Binding("space", "toggle_select", "Select"),
        Binding("shift+down", "extend(1)", "Select down", show=False),
        Binding("shift+up", "extend(-1)", "Select up", show=False),
        # Priority: before the focused filter (FilterInput) sees it.
        Binding("asterisk", "select_shown", "Select all shown", priority=True),
        Binding("a", "accept", "Accept"),
        Binding("x", "reject", "Reject"),
        Binding("l", "labels", "Labels"),
        Binding("p", "pin", "Pin"),
        Binding("m", "assign", "Assign"),
        Binding("u", "unassign", "Unassign"),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._devices: list[Device] = []
        self._sort = 0
        self._reverse = False
        # Selected device ids: kept across reloads and filter changes.
        self.selection: set[str] = set()
        # Ids of the rows the filter shows, in table order.
        self._shown: list[str] = []
        # Devices named by events since the last re-read of them (patch).
        self._dirty: set[str] = set()

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield FilterInput(
            placeholder="/ filter: words or label k=v; * selects all shown", id="filter"
        )
        yield DataTable(id="devices", cursor_type="row")
        yield Static(id="status", classes="status")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*(title for title, _ in COLUMNS))
        self.query_one(DataTable).focus()
        super().on_mount()

    def reload(self) -> None:
        self._dirty.clear()
        self.load()

    @work(exclusive=True, group="devices", exit_on_error=False)
    async def load(self) -> None:
        with reporting(self):
            self._devices = await self.client.list_devices()
            self.render_table()

    def patch(self, event: FleetEvent) -> bool:
        """A device or deployment event naming a few known devices: re-read
        just those (coalesced like a reload) and update their rows in place."""
        known = {d.id for d in self._devices}
        if (event.topic not in ("device", "deployment") or event.devices_elided
                or not event.device_ids or not set(event.device_ids) <= known):  # fmt: skip
            return False  # a new device, many, or something else: reload
        if len(self._dirty | set(event.device_ids)) > PATCH_LIMIT:
            return False
        if not self._dirty:
            self.set_timer(COALESCE_S, self.refresh_dirty)
        self._dirty |= set(event.device_ids)
        return True

    @work(group="devices-patch", exit_on_error=False)
    async def refresh_dirty(self) -> None:
        ids, self._dirty = self._dirty, set()
        with reporting(self):
            fresh = await asyncio.gather(*(self.client.get_device(i) for i in ids))
            by_id = {d.id: d for d in fresh}
            # Decommissioned devices leave the list, as list_devices leaves them out.
            self._devices = [
                by_id.get(d.id, d) for d in self._devices
                if by_id.get(d.id, d).state != "decommissioned"
            ]  # fmt: skip
            table = self.query_one(DataTable)
            text = self.query_one("#filter", Input).value
            if any(
                (d.id in table.rows) != (matches(d, text) and d.state != "decommissioned")
                for d in fresh
            ):
                self.render_table()  # a row comes into or leaves the list
                return
            now = self.now()
            for d in fresh:
                if d.id in table.rows:
                    row = table.get_row_index(d.id)
                    for column, value in enumerate(self._cells(d, now)):
                        table.update_cell_at(Coordinate(row, column), value, update_width=True)
            self._show_status()

    def selected(self) -> Device | None:
        key = cursor_key(self.query_one(DataTable))
        return next((d for d in self._devices if d.id == key), None)

    def targets(self) -> list[Device]:
        """What an action acts on: the selection, else the cursor's device."""
        if self.selection:
            return [d for d in self._devices if d.id in self.selection]
        return [d] if (d := self.selected()) is not None else []

    def _name_cell(self, device: Device) -> str:
        return (SELECTED if device.id in self.selection else "") + device.name

    def render_table(self) -> None:
        table = self.query_one(DataTable)
        key = cursor_key(table)
        text = self.query_one("#filter", Input).value
        sort_key = COLUMNS[self._sort][1]
        shown = sorted((d for d in self._devices if matches(d, text)), key=lambda d: d.name)
        shown.sort(key=sort_key, reverse=self._reverse)
        table.clear()
        now = self.now()
        # A device gone from the fleet (decommissioned) leaves the selection.
        self.selection &= {d.id for d in self._devices}
        for d in shown:
            table.add_row(*self._cells(d, now), key=d.id)
        keep_cursor(table, key)
        self._shown = [d.id for d in shown]
        self._show_status()

    def _cells(self, d: Device, now: datetime) -> tuple[str, ...]:
        return (
            self._name_cell(d), device_status(d),
            d.class_name + (" (pinned)" if d.class_pinned else ""),
            _truncate(d.models_text or "-"), format_labels(d.labels.items()) or "-",
            format_ago(d.last_seen_at, now),
        )  # fmt: skip

    def _show_status(self) -> None:
        title = COLUMNS[self._sort][0]
        order = "descending" if self._reverse else "ascending"
        text = f"{len(self._shown)} of {len(self._devices)} devices, sorted by {title} ({order})"
        if self.selection:
            text += f"; {len(self.selection)} selected (actions apply to them; escape clears)"
        self.query_one("#status", Static).update(text)

    def _redraw_marks(self, ids: set[str]) -> None:
        """Update the name cells of `ids` in place (no refill: the cursor stays)."""
        table = self.query_one(DataTable)
        for d in self._devices:
            if d.id in ids and d.id in table.rows:
                table.update_cell_at(
                    Coordinate(table.get_row_index(d.id), 0), self._name_cell(d), update_width=True
                )
        self._show_status()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.render_table()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.set_focus(self.query_one(DataTable))

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
        table = self.query_one(DataTable)
        if table.has_focus and self.selection:
            cleared, self.selection = self.selection, set()
            self._redraw_marks(cleared)
        self.set_focus(table)

    def action_toggle_select(self) -> None:
        if (key := cursor_key(self.query_one(DataTable))) is not None:
            self.selection ^= {key}
            self._redraw_marks({key})

    def action_extend(self, step: int) -> None:
        """Select the row under the cursor and the next one up or down."""
        table = self.query_one(DataTable)
        if (key := cursor_key(table)) is None:
            return
        table.move_cursor(row=table.cursor_row + step)
        changed = {key, cursor_key(table) or key}
        self.selection |= changed
        self._redraw_marks(changed)

    def action_select_shown(self) -> None:
        """Every row the filter shows (hidden selected rows stay selected);
        from the filter, the table takes the keys that follow."""
        added = set(self._shown) - self.selection
        self.selection |= added
        self._redraw_marks(added)
        # At once (focus() waits for the next idle): keys typed right after
        # `*` are the table's.
        self.set_focus(self.query_one(DataTable))

    def _acted(self, result: BulkResult) -> None:
        """After an action on the selection: the failed devices stay
        selected, to look at or try again."""
        self.selection = {o.device_id for o in result.failed}

    def action_filter(self) -> None:
        self.set_focus(self.query_one("#filter", Input))

    def action_sort(self) -> None:
        # Each column ascending then descending, then the next column.
        if self._reverse:
            self._reverse = False
            self._sort = (self._sort + 1) % len(COLUMNS)
        else:
            self._reverse = True
        self.render_table()

    def action_accept(self) -> None:
        if self.selection:
            actions.accept_many(self, self.targets(), self._acted)
        elif (d := self.selected()) is not None:
            actions.accept(self, d)

    def action_reject(self) -> None:
        if self.selection:
            actions.reject_many(self, self.targets(), self._acted)
        elif (d := self.selected()) is not None:
            actions.reject(self, d)

    def action_labels(self) -> None:
        if self.selection:
            actions.labels_many(self, self.targets(), self._acted)
        elif (d := self.selected()) is not None:
            actions.edit_labels(self, d)

    def action_pin(self) -> None:
        if self.selection:
            actions.pin_many(self, self.targets(), self._acted)
        elif (d := self.selected()) is not None:
            actions.pin(self, d)

    def action_assign(self) -> None:
        if targets := self.targets():
            actions.assign_many(self, targets, self._acted)

    def action_unassign(self) -> None:
        if self.selection:
            actions.unassign_many(self, self.targets(), self._acted)
        elif (d := self.selected()) is not None:
            actions.unassign(self, d)
