"""A rollout live: per-stage progress bars, gate values against their
limits, devices (failures first, with reasons); pause, resume, approve and
abort (keep or revert) after confirmation."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Label, ProgressBar, Static

from edgefleet.tui.data import FleetEvent, Rollout, RolloutDevice
from edgefleet.tui.screens.base import FleetScreen, keep_cursor, reporting
from edgefleet.tui.screens.modals import AbortScreen, ConfirmScreen
from edgefleet.tui.summary import format_gate

# Devices the table shows, those that need a look first: a 10,000-device
# rollout read whole on every reload held the control plane and this screen.
MAX_DEVICES = 200
# Devices that need a look come first.
_ORDER = {"failed": 0, "timed-out": 1, "rolled-back": 2, "rejected": 3, "in-progress": 4,
          "notified": 5, "reverted": 6, "waiting": 7, "committed": 8}  # fmt: skip


def device_order(d: RolloutDevice) -> tuple[int, int, str]:
    return (_ORDER.get(d.state, 9), d.stage, d.device_name)


class StageRow(Horizontal):
    """One stage: title, a progress bar of committed devices, counts."""

    def __init__(self, index: int) -> None:
        super().__init__(id=f"stage-{index}", classes="stage-row")

    def compose(self) -> ComposeResult:
        yield Label(classes="stage-title")
        yield ProgressBar(total=1, show_eta=False, show_percentage=False)
        yield Label(classes="stage-counts")


class MonitorScreen(FleetScreen):
    TOPICS = frozenset({"rollout", "deployment"})
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("p", "pause", "Pause"),
        Binding("u", "resume", "Resume"),
        Binding("a", "approve", "Approve"),
        Binding("x", "abort", "Abort"),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self, rollout_id: str) -> None:
        super().__init__()
        self.rollout_id = rollout_id
        self.rollout: Rollout | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="title", classes="title")
        with VerticalScroll(id="body"):
            yield Static(id="reason", classes="panel")
            yield Vertical(id="stages")
            yield Static(id="gates", classes="panel")
            yield DataTable(id="devices", cursor_type="row")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#devices", DataTable).add_columns("device", "class", "stage", "state",
                                                         "reason")  # fmt: skip
        super().on_mount()

    def reload(self) -> None:
        self.load()

    def handle_event(self, event: FleetEvent) -> None:
        r = event.rollout
        if r is not None and r.id == self.rollout_id and self.rollout is not None:
            # Stages now, the devices with the reload.
            self.show(r)

    @work(exclusive=True, group="monitor", exit_on_error=False)
    async def load(self) -> None:
        with reporting(self):
            self.show(await self.client.get_rollout(self.rollout_id, MAX_DEVICES))

    def show(self, r: Rollout) -> None:
        if r.has_devices or self.rollout is None:
            self.rollout = r
            devices = r.devices
        else:
            devices = self.rollout.devices
        stage_now = f"stage {r.current_stage + 1}/{len(r.stages)}" if r.stages else ""
        self.query_one("#title", Static).update(
            f"rollout {r.id[:8]}  {r.ref}  {r.state.upper()}  {stage_now}"
        )
        total = sum(s.total for s in r.stages)
        shown = f"\ndevices: the {len(devices)} of {total} that most need a look" if (
            len(devices) < total) else ""  # fmt: skip
        self.query_one("#reason", Static).update(
            f"{r.reason or '-'}\ncohort: {r.cohort}   pacing: {r.pacing}{shown}"
        )
        self.show_stages(r)
        gates = [f"stage {s.index + 1}: {format_gate(g)}" for s in r.stages for g in s.gates]
        excluded = [f"excluded {e.device_name}: {e.reason}" for e in r.excluded]
        self.query_one("#gates", Static).update("\n".join(gates + excluded) or "no gates")
        table = self.query_one("#devices", DataTable)
        table.clear()
        for d in sorted(devices, key=device_order):
            table.add_row(d.device_name, d.class_name, str(d.stage + 1), d.state, d.reason or "-")
        keep_cursor(table, None)

    def show_stages(self, r: Rollout) -> None:
        box = self.query_one("#stages", Vertical)
        rows = list(box.query(StageRow))
        if len(rows) != len(r.stages):
            box.remove_children()
            rows = [StageRow(s.index) for s in r.stages]
            box.mount_all(rows)
            # Filled in once mounted (their labels exist then).
            self.call_after_refresh(self.show_stages, r)
            return
        for row, s in zip(rows, r.stages, strict=True):
            marker = ">" if s.index == r.current_stage and r.active else " "
            kind = "shadow " if s.shadow else ""
            row.query_one(".stage-title", Label).update(
                f"{marker}{s.index + 1} {kind}{s.name or s.spec}"[:22]
            )
            row.query_one(ProgressBar).update(total=max(s.total, 1), progress=s.committed)
            counts = f"{s.committed}/{s.total} {s.state}"
            if s.failed:
                counts += f", {s.failed} failed"
            if s.in_progress:
                counts += f", {s.in_progress} moving"
            row.query_one(".stage-counts", Label).update(counts)

    def _act(self, action: str, verb: str) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.act(action)

        self.app.push_screen(ConfirmScreen(f"{verb} rollout {self.rollout_id[:8]}?", yes=verb),
                             answered)  # fmt: skip

    @work(group="monitor-action", exit_on_error=False)
    async def act(self, action: str) -> None:
        with reporting(self):
            r = await self.client.rollout_action(self.rollout_id, action, "from the TUI")
            self.app.notify(f"rollout {r.id[:8]}: {action} done, now {r.state}")
            self.show(r)

    def action_pause(self) -> None:
        self._act("pause", "Pause")

    def action_resume(self) -> None:
        self._act("resume", "Resume")

    def action_approve(self) -> None:
        self._act("approve", "Approve")

    def action_abort(self) -> None:
        def answered(choice: tuple[bool, str] | None) -> None:
            if choice is not None:
                self.abort(*choice)

        self.app.push_screen(AbortScreen(f"rollout {self.rollout_id[:8]}"), answered)

    @work(group="monitor-action", exit_on_error=False)
    async def abort(self, revert: bool, reason: str) -> None:
        with reporting(self):
            r = await self.client.abort_rollout(self.rollout_id, revert=revert,
                                                reason=reason or "aborted in the TUI")  # fmt: skip
            self.app.notify(f"rollout {r.id[:8]} aborted" + (", reverting" if revert else ""))
            self.show(r)
