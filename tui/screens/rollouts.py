"""Rollouts, newest first; Enter opens the live monitor, n the wizard."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from edgefleet.controlplane.client.format import format_bar
from edgefleet.tui.data import FleetEvent, Rollout
from edgefleet.tui.screens.base import FleetScreen, cursor_key, keep_cursor, reporting
from edgefleet.tui.summary import format_time, rollout_progress


class RolloutsScreen(FleetScreen):
    TOPICS = frozenset({"rollout"})
    NAV_MODE = "rollouts"
    BINDINGS = [
        Binding("n", "new", "New rollout"),
        Binding("enter", "open", "Monitor", show=False),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._rollouts: dict[str, Rollout] = {}

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield DataTable(id="rollouts", cursor_type="row")
        yield Static(id="reason", classes="panel")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("id", "version", "state", "stage", "progress", "cohort", "created")
        table.focus()
        super().on_mount()

    def reload(self) -> None:
        self.load()

    def handle_event(self, event: FleetEvent) -> None:
        # The event carries the rollout's stages: show them before the reload.
        if event.rollout is not None and event.rollout.id in self._rollouts:
            self._rollouts[event.rollout.id] = event.rollout
            self.render_table()

    @work(exclusive=True, group="rollouts", exit_on_error=False)
    async def load(self) -> None:
        with reporting(self):
            self._rollouts = {r.id: r for r in await self.client.list_rollouts()}
            self.render_table()

    def render_table(self) -> None:
        table = self.query_one(DataTable)
        key = cursor_key(table)
        table.clear()
        for r in self._rollouts.values():
            done, total = rollout_progress(r)
            stage = f"{r.current_stage + 1}/{len(r.stages)}" if r.stages else "-"
            table.add_row(r.id[:8], r.ref, r.state, stage, format_bar(done, total, 8), r.cohort,
                          format_time(r.created_at), key=r.id)  # fmt: skip
        keep_cursor(table, key)
        self.show_reason()

    def show_reason(self) -> None:
        r = self._rollouts.get(cursor_key(self.query_one(DataTable)) or "")
        self.query_one("#reason", Static).update(
            f"{r.id}  {r.state}: {r.reason or '-'}" if r else "no rollouts yet: n starts the wizard"
        )

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_reason()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        if key := cursor_key(self.query_one(DataTable)):
            from edgefleet.tui.screens.monitor import MonitorScreen

            self.app.push_screen(MonitorScreen(key))

    def action_new(self) -> None:
        from edgefleet.tui.screens.wizard import WizardScreen

        self.app.push_screen(WizardScreen())
