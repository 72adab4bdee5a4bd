"""The audit log: who did what, when, and why. Typing filters the loaded
entries; Enter searches the whole log on the server (`actor=alice
action=rollout edge-01`: the other words name the target, by name, id or id
prefix); pages back."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Input, Static

from edgefleet.tui.data import (
    ALL_AUDIT,
    AUDIT_SEARCH_FIELDS,
    AUDIT_SEARCH_TIMES,
    AuditEntry,
    AuditQuery,
)
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
        # The server-side search the entries are of (Enter sets it).
        self._query: AuditQuery = ALL_AUDIT
        # The filter's text that made it (since=2h is relative: its times
        # cannot be compared with a new parse).
        self._query_text = ""

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
            self._entries = await self.client.audit_log(limit=PAGE, query=self._query)
            self.render_table()

    @work(exclusive=True, group="audit", exit_on_error=False)
    async def load_older(self) -> None:
        with reporting(self):
            before = self._entries[-1].id if self._entries else 0
            self._entries += await self.client.audit_log(
                limit=PAGE, before_id=before, query=self._query
            )
            self.render_table()

    def render_table(self) -> None:
        typed = self.query_one(Input).value
        words = [w for w in typed.lower().split() if not _field_word(w)]
        if self._query != ALL_AUDIT and typed.split() == self._query_text.split():
            words = []  # what the server found (by name, id prefix) is all shown
        table = self.query_one(DataTable)
        table.clear()
        shown = 0
        for e in self._entries:
            text = f"{e.actor} {e.action} {e.target_text} {e.details}".lower()
            if all(w in text for w in words):
                table.add_row(format_time(e.at), e.actor, e.action, e.target_text, e.details or "-")
                shown += 1
        keep_cursor(table, None)
        status = f"{shown} of {len(self._entries)} entries (o: older)"
        if self._query != ALL_AUDIT:
            status = (
                f"{shown} of {len(self._entries)} entries the server found for "
                f"{self._query.describe()} (o: older; Enter on an empty filter: all)"
            )
        self.query_one("#status", Static).update(status)

    def on_input_changed(self) -> None:
        self.render_table()

    def on_input_submitted(self) -> None:
        """Search the whole log on the server for what the filter says."""
        try:
            query = AuditQuery.parse(self.query_one(Input).value, self.now())
        except ValueError as err:
            self.notify(str(err), title="Search", severity="error", markup=False)
            return
        self.set_focus(self.query_one(DataTable))
        if query != self._query or query != ALL_AUDIT:
            self._query = query
            self._query_text = self.query_one(Input).value
            self.load()

    def action_leave_filter(self) -> None:
        self.set_focus(self.query_one(DataTable))

    def action_filter(self) -> None:
        self.set_focus(self.query_one(Input))

    def action_older(self) -> None:
        self.load_older()


def _field_word(word: str) -> bool:
    """`actor=alice`: a server search's field, not text to filter on."""
    key, sep, _ = word.partition("=")
    return bool(sep) and key in (*AUDIT_SEARCH_FIELDS, *AUDIT_SEARCH_TIMES)
