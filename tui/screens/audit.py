"""The audit log: who did what, when, and why; filterable, pages back."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Input, Static

from edgefleet.tui.data import AuditEntry
from edgefleet.tui.screens.base import FleetScreen, keep_cursor, reporting
from edgefleet.tui.summary import format_time

PAGE = 200


class AuditScreen(FleetScreen):
    TOPICS = frozenset({"device", "class", "model", "rollout", "build"})
    NAV_MODE = "audit"
    BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("escape", "leave_filter", "Leave filter", show=False),
        Binding("o", "older", "Older"),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._entries: list[AuditEntry] = []

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield Input(placeholder="/ filter: actor, action, target or details", id="filter")
        yield DataTable(id="audit", cursor_type="row")
        yield Static(id="status", classes="status")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("at", "actor", "action", "target", "details")
        table.focus()
        super().on_mount()

    def reload(self) -> None:
        self.load()

    @work(exclusive=True, group="audit", exit_on_error=False)
    async def load(self) -> None:
        with reporting(self):
            self._entries = await self.client.audit_log(limit=PAGE)
            self.render_table()

    @work(exclusive=True, group="audit", exit_on_error=False)
    async def load_older(self) -> None:
        with reporting(self):
            before = self._entries[-1].id if self._entries else 0
            self._entries += await self.client.audit_log(limit=PAGE, before_id=before)
            self.render_table()

    def render_table(self) -> None:
        words = self.query_one(Input).value.lower().split()
        table = self.query_one(DataTable)
        table.clear()
        shown = 0
        for e in self._entries:
            text = f"{e.actor} {e.action} {e.target} {e.details}".lower()
            if all(w in text for w in words):
                table.add_row(format_time(e.at), e.actor, e.action, e.target, e.details or "-")
                shown += 1
        keep_cursor(table, None)
        status = f"{shown} of {len(self._entries)} entries (o: older)"
        self.query_one("#status", Static).update(status)

    def on_input_changed(self) -> None:
        self.render_table()

    def on_input_submitted(self) -> None:
        self.query_one(DataTable).focus()

    def action_leave_filter(self) -> None:
        self.query_one(DataTable).focus()

    def action_filter(self) -> None:
        self.query_one(Input).focus()

    def action_older(self) -> None:
        self.load_older()
