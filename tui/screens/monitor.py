"""A rollout live: per-stage progress bars, gate values against their
limits, devices (failures first, with reasons); pause, resume, approve and
abort (keep or revert) after confirmation; and remediation: retry failed
devices (all, or the marked ones), skip marked devices (with a reason),
promote the current stage, edit its thresholds, bake time and the pacing.
Enter on a device opens it at its deployment history (why it failed, whole)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Label, ProgressBar, Static

from edgefleet.controlplane.client.stages import parse_stage
from edgefleet.tui.data import FleetEvent, Gate, Rollout, RolloutDevice, RolloutEdit, StageStatus
from edgefleet.tui.screens.base import FleetScreen, cursor_key, keep_cursor, reporting
from edgefleet.tui.screens.modals import (
    AbortScreen,
    ChoiceScreen,
    ConfirmScreen,
    PromptScreen,
    RolloutEditScreen,
)
from edgefleet.tui.summary import action_refusal, format_gate

# Devices the table shows, those that need a look first: a 10,000-device
# rollout read whole on every reload held the control plane and this screen.
MAX_DEVICES = 200
# Devices that need a look come first.
_ORDER = {"failed": 0, "revert-failed": 0, "timed-out": 1, "rolled-back": 2, "rejected": 3,
          "in-progress": 4, "notified": 5, "reverting": 5, "reverted": 6, "waiting": 7,
          "skipped": 7, "dropped": 7, "committed": 8}  # fmt: skip
# Marks a device picked for retry or skip (space toggles it).
MARK = "* "


def device_order(d: RolloutDevice) -> tuple[int, int, str]:
    return (_ORDER.get(d.state, 9), d.stage, d.device_name)


def stage_counts(s: StageStatus) -> str:
    """`1/4 rolling, 1 failed, 2 waiting, 1 installing`: the members' own
    state names, as `edgefleet rollouts show` writes them."""
    counts = f"{s.committed}/{s.total} {s.phase or s.state}"
    if s.promoted_by:
        counts += f" by {s.promoted_by}"
    if s.failed:
        counts += f", {s.failed} failed"
    if s.waiting:
        counts += f", {s.waiting} waiting"
    if s.installing:
        counts += f", {s.installing} installing"
    if s.skipped:
        counts += f", {s.skipped} skipped"
    return counts


def _error_rate_limit(spec: str) -> float | None:
    try:
        gates = parse_stage(spec).gates
    except ValueError:
        return None
    return gates.max_error_rate if gates.HasField("max_error_rate") else None


def gate_line(s: StageStatus, g: Gate) -> str:
    """`stage 1: latency_p95 12.00 ms <= 30.00 ms ok`; `... waiting for
    telemetry` while no device has been checked (the server sends 0 against
    0), not a passing line. An error rate of 0 against 0 is a real reading
    where the stage sets `error-rate=0`."""
    quiet = g.value == 0 and g.limit == 0
    if quiet and g.name == "error_rate":
        quiet = _error_rate_limit(s.spec) != 0
    text = f"{g.name} waiting for telemetry" if quiet else format_gate(g)
    return f"stage {s.index + 1}: {text}"


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
        Binding("t", "retry", "Retry"),
        Binding("s", "skip", "Skip"),
        Binding("g", "promote", "Promote"),
        Binding("e", "edit", "Edit"),
        Binding("space", "mark", "Mark", show=False),
        Binding("enter", "open_device", "Device"),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self, rollout_id: str) -> None:
        super().__init__()
        self.rollout_id = rollout_id
        self.rollout: Rollout | None = None
        # Device ids marked for retry or skip.
        self.marked: set[str] = set()

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
        if not r.has_devices and self.rollout is not None:
            # A watch event: its state and stages, the devices of the last
            # reload (the keys act on the state shown).
            r = replace(r, devices=self.rollout.devices, has_devices=True)
        self.rollout = r
        devices = r.devices
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
        gates = [gate_line(s, g) for s in r.stages for g in s.gates]
        excluded = [f"excluded {e.device_name}: {e.reason}" for e in r.excluded]
        self.query_one("#gates", Static).update("\n".join(gates + excluded) or "no gates")
        table = self.query_one("#devices", DataTable)
        key = cursor_key(table)
        table.clear()
        for d in sorted(devices, key=device_order):
            mark = MARK if d.device_id in self.marked else ""
            table.add_row(f"{mark}{d.device_name}", d.class_name, str(d.stage + 1), d.state,
                          d.reason or "-", key=d.device_id)  # fmt: skip
        keep_cursor(table, key)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "devices" and event.row_key.value:
            self.open_device(str(event.row_key.value))

    def action_open_device(self) -> None:
        key = cursor_key(self.query_one("#devices", DataTable))
        if key:
            self.open_device(key)

    def open_device(self, device_id: str) -> None:
        from edgefleet.tui.screens.device_detail import DeviceDetailScreen

        self.app.push_screen(DeviceDetailScreen(device_id, at_history=True))

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
            # Whole: the column's width (app.tcss) cuts it only where it must.
            row.query_one(".stage-title", Label).update(
                f"{marker}{s.index + 1} {kind}{s.name or s.spec}"
            )
            row.query_one(ProgressBar).update(total=max(s.total, 1), progress=s.committed)
            row.query_one(".stage-counts", Label).update(stage_counts(s))

    def refused(self, action: str) -> bool:
        """Whether `action` does not apply to the rollout in the state shown;
        if so, say why (nothing is asked or sent)."""
        why = action_refusal(self.rollout, action) if self.rollout is not None else ""
        if why:
            self.app.notify(why, title=f"No {action} now", severity="warning", markup=False)
        return bool(why)

    def stage_shown(self) -> int:
        """The current stage (from 0) as the screen shows it: approve and
        promote name it, so a second key press cannot pass the next one too."""
        return self.rollout.current_stage if self.rollout is not None else 0

    def _act(self, action: str, verb: str, stage: int | None = None) -> None:
        if self.refused(action):
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.act(action, stage)

        at = f" at stage {stage + 1}" if stage is not None else ""
        self.app.push_screen(ConfirmScreen(f"{verb} rollout {self.rollout_id[:8]}{at}?", yes=verb),
                             answered)  # fmt: skip

    @work(group="monitor-action", exit_on_error=False)
    async def act(self, action: str, stage: int | None = None) -> None:
        with reporting(self):
            r = await self.client.rollout_action(self.rollout_id, action, "from the TUI", stage)
            self.app.notify(f"rollout {r.id[:8]}: {action} done, now {r.state}")
            self.show(r)

    def action_pause(self) -> None:
        self._act("pause", "Pause")

    def action_resume(self) -> None:
        self._act("resume", "Resume")

    def action_approve(self) -> None:
        self._act("approve", "Approve", self.stage_shown())

    def action_abort(self) -> None:
        if self.refused("abort"):
            return

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

    # ------------------------------------------------------------ remediation

    def chosen(self) -> list[RolloutDevice]:
        """The marked devices, or else the one under the cursor."""
        devices = self.rollout.devices if self.rollout is not None else ()
        marked = [d for d in devices if d.device_id in self.marked]
        if marked:
            return marked
        key = cursor_key(self.query_one("#devices", DataTable))
        return [d for d in devices if d.device_id == key]

    def action_mark(self) -> None:
        key = cursor_key(self.query_one("#devices", DataTable))
        if key is not None:
            self.marked ^= {key}
            if self.rollout is not None:
                self.show(self.rollout)

    @work(group="monitor-action", exit_on_error=False)
    async def remedy(self, call: Callable[[], Awaitable[Rollout]], done: str) -> None:
        with reporting(self):
            self.remedied(await call(), done)

    def remedied(self, r: Rollout, done: str) -> None:
        self.marked.clear()
        self.app.notify(f"rollout {r.id[:8]}: {done}, now {r.state}", markup=False)
        self.show(r)

    def action_retry(self) -> None:
        if self.refused("retry"):
            return
        chosen = self.chosen()
        names = ", ".join(d.device_name for d in chosen)
        options = [("every failed device", "")]
        if chosen:
            options.insert(0, (f"selected: {names}"[:60], "selected"))

        def answered(which: str | None) -> None:
            if which is None:
                return
            ids = [d.device_id for d in chosen] if which else []
            what = f"retried {names}" if which else "retried the failed devices"
            self.remedy(lambda: self.client.retry_rollout(self.rollout_id, ids, "from the TUI"),
                        what)  # fmt: skip

        self.app.push_screen(ChoiceScreen(f"Retry devices of rollout {self.rollout_id[:8]} "
                                          "(fresh retry budget)", options), answered)  # fmt: skip

    def action_skip(self) -> None:
        if self.refused("skip"):
            return
        chosen = self.chosen()
        if not chosen:
            self.app.notify("mark devices with space, or put the cursor on one",
                            title="Nothing to skip", severity="warning")  # fmt: skip
            return
        names = ", ".join(d.device_name for d in chosen)
        ids = [d.device_id for d in chosen]

        # Sent from the dialog: a missing reason is shown there, and the
        # operator's next keys still go to the dialog, not to this screen.
        async def skip(reason: str) -> None:
            r = await self.client.skip_rollout_devices(self.rollout_id, ids, reason)
            self.remedied(r, f"skipped {names}")

        self.app.push_screen(
            PromptScreen(f"Skip {names}? They stay on the version they run and the rollout "
                         "stops waiting for them.", placeholder="why (required)",
                         hint="Enter skips, Esc cancels", submit=skip),
        )  # fmt: skip

    def action_promote(self) -> None:
        if self.refused("promote"):
            return
        # The stage shown now, sent with the promote: confirmed twice (two
        # key presses, a stale screen), it passes this stage only.
        stage = self.stage_shown()

        def answered(yes: bool | None) -> None:
            if yes:
                self.remedy(lambda: self.client.promote_rollout(self.rollout_id, "from the TUI",
                                                                stage),
                            f"stage {stage + 1} promoted")  # fmt: skip

        self.app.push_screen(
            ConfirmScreen(f"Promote rollout {self.rollout_id[:8]}: pass stage {stage + 1} now, "
                          "whatever its thresholds and gates say?", yes="Promote"),
            answered,
        )  # fmt: skip

    def action_edit(self) -> None:
        if not self.refused("edit"):
            self.open_edit()

    @work(group="monitor-action", exit_on_error=False)
    async def open_edit(self) -> None:
        with reporting(self):
            stages = len(self.rollout.stages) if self.rollout is not None else 1
            stage = min(self.rollout.current_stage if self.rollout else 0, max(stages - 1, 0))
            edit = await self.client.rollout_edit(self.rollout_id, stage)
            self.app.push_screen(
                RolloutEditScreen(f"Edit rollout {self.rollout_id[:8]}: stage {stage + 1} "
                                  "and pacing", edit, submit=self.send_update))  # fmt: skip

    async def send_update(self, choice: tuple[RolloutEdit, str]) -> None:
        """The edit form's answer, sent from the form: what does not parse
        (InputError) is shown there, and the form stays open."""
        edit, reason = choice
        r, changes = await self.client.update_rollout(self.rollout_id, edit,
                                                      reason or "edited in the TUI")  # fmt: skip
        self.app.notify("\n".join(changes) or "updated", title=f"rollout {r.id[:8]} updated",
                        markup=False)  # fmt: skip
        self.show(r)
