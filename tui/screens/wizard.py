"""The rollout wizard: version, cohort, stages with thresholds and gates,
an optional shadow stage, pacing. A dry run on the server shows, per stage,
the devices that land there and the excluded ones with the reasons; only a
draft that has been dry-run as it stands can be started."""

from __future__ import annotations

from collections import Counter

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.suggester import SuggestFromList
from textual.widgets import Button, Checkbox, Input, Label, Static

from edgefleet.controlplane.client.stages import empty_stage_warnings
from edgefleet.tui.client import ClientError
from edgefleet.tui.data import RolloutDraft, RolloutPlan
from edgefleet.tui.screens.base import FleetScreen, reporting
from edgefleet.tui.summary import compose_stages
from edgefleet.tui.widgets import KeyButton, MarkedCheckbox

# (field id, label, default, placeholder)
FIELDS = (
    ("version", "version", "", "model@version"),
    ("classes", "classes", "", "pi-class, x86-gateway"),
    ("labels", "labels", "", "tier=canary (all must hold)"),
    ("shadow", "shadow stage", "", "2,agreement=0.95 (optional)"),
    ("stages", "stages", "1,stratified; 100%", "10%,bake=5m; 50%; 100%"),
    ("thresholds", "thresholds", "", "success=100,errors=20/3 (every stage)"),
    ("gates", "gates", "", "latency=1.5,error-rate=5%,memory=1.2,silence=2m"),
    ("max_per_minute", "max per min", "", "0: no limit"),
    ("ramp", "ramp", "", "BASE:FACTOR, e.g. 10:2"),
    ("device_timeout", "device timeout", "", "10m"),
    ("retries", "retries", "", "0"),
)
CHECKS = (
    ("abort", "abort and revert on failure (default: pause)"),
    ("approve", "wait for approval between stages"),
    ("dynamic", "dynamic: devices that start matching join"),
)


# Device names shown per stage (and per exclusion reason); a cohort of
# thousands is summarised by class and reason instead.
SHOWN_NAMES = 6


def _names(names: list[str]) -> str:
    more = len(names) - SHOWN_NAMES
    return ", ".join(names[:SHOWN_NAMES]) + (f" and {more} more" if more > 0 else "")


def plan_table(plan: RolloutPlan, width: int) -> Table:
    """Per stage: how many devices of each class, and the first names; then
    the excluded devices grouped by reason. A stage's spec is shown whole
    where it fits in half the `width`, wrapped where it does not."""
    table = Table(title="Dry run", title_justify="left", box=None, padding=(0, 1), expand=True)
    # The devices column takes whatever the stage column leaves: without a
    # bound a long spec would squeeze it to one character.
    table.add_column("stage", overflow="fold", max_width=max(24, width // 2))
    table.add_column("devices", overflow="fold", ratio=1)
    for i, spec in enumerate(plan.stages):
        devices = plan.stage_devices(i)
        per_class = Counter(d.class_name for d in devices)
        counts = ", ".join(f"{n} {name}" for name, n in sorted(per_class.items()))
        names = _names([d.device_name for d in devices])
        table.add_row(f"{i + 1} {spec}", f"{counts}: {names}" if devices else "none")
    by_reason: dict[str, list[str]] = {}
    for e in plan.excluded:
        by_reason.setdefault(e.reason, []).append(e.device_name)
    for reason, left_out in sorted(by_reason.items()):
        table.add_row(
            f"excluded ({len(left_out)})", f"{reason}: {_names(left_out)}", style="yellow"
        )
    return table


class PlanView:
    """The dry run's table laid out for the width it is drawn at, so a wider
    terminal shows more of each stage's spec."""

    def __init__(self, plan: RolloutPlan) -> None:
        self.plan = plan

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield plan_table(self.plan, options.max_width)


class WizardScreen(FleetScreen):
    TOPICS = frozenset({"model", "build"})
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Cancel"),
        Binding("ctrl+r", "dry_run", "Dry run"),
        Binding("ctrl+s", "start", "Start"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._planned: RolloutDraft | None = None
        # The last dry run's answer.
        self.plan: RolloutPlan | None = None

    def compose(self) -> ComposeResult:
        yield Static("New rollout: fill in, dry run (ctrl+r), then start (ctrl+s)",
                     classes="title")  # fmt: skip
        with VerticalScroll(id="body"):
            for key, label, default, placeholder in FIELDS:
                with Horizontal(classes="field"):
                    yield Label(label, classes="field-label")
                    yield Input(default, placeholder=placeholder, id=key)
            for key, label in CHECKS:
                yield MarkedCheckbox(label, id=key)
            yield Static(id="errors", classes="errors")
            yield Static(id="plan", classes="panel")
            with Horizontal(classes="buttons"):
                yield KeyButton("Dry run", "ctrl+r", id="dry-run", variant="primary")
                yield KeyButton("Start", "ctrl+s", id="start", variant="success", disabled=True)
        yield from self.compose_footer()

    def on_mount(self) -> None:
        # At once, not at the next idle: keys typed as the wizard opens are
        # the version's (a quick Tab then a class went into the version).
        self.set_focus(self.query_one("#version", Input))
        super().on_mount()

    def reload(self) -> None:
        self.load_suggestions()

    @work(exclusive=True, group="wizard", exit_on_error=False)
    async def load_suggestions(self) -> None:
        with reporting(self):
            versions, classes = await self.client.list_versions(), await self.client.list_classes()
            refs = [v.ref for v in versions]
            version = self.query_one("#version", Input)
            version.suggester = SuggestFromList(refs, case_sensitive=False)
            if not version.value and refs:
                version.value = refs[0]
            self.query_one("#classes", Input).suggester = SuggestFromList(
                [c.name for c in classes], case_sensitive=False
            )

    def draft(self) -> RolloutDraft:
        v = {key: self.query_one(f"#{key}", Input).value.strip() for key, *_ in FIELDS}
        checks = {key: self.query_one(f"#{key}", Checkbox).value for key, _ in CHECKS}
        stages = compose_stages(
            shadow=v["shadow"], stages=v["stages"], thresholds=v["thresholds"], gates=v["gates"],
            on_failure="abort" if checks["abort"] else "pause", approve=checks["approve"],
        )  # fmt: skip

        def items(text: str) -> tuple[str, ...]:
            return tuple(p.strip() for p in text.split(",") if p.strip())

        return RolloutDraft(
            model_ref=v["version"], classes=items(v["classes"]), labels=items(v["labels"]),
            stages=stages, max_per_minute=v["max_per_minute"], ramp=v["ramp"],
            device_timeout=v["device_timeout"], retries=v["retries"], dynamic=checks["dynamic"],
        )  # fmt: skip

    def _changed(self) -> None:
        if self._planned is not None and self.draft() != self._planned:
            self._planned = None
            self.query_one("#start", Button).disabled = True

    def on_input_changed(self) -> None:
        self._changed()

    def on_checkbox_changed(self) -> None:
        self._changed()

    def on_input_submitted(self) -> None:
        self.action_dry_run()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.action_start()
        else:
            self.action_dry_run()

    def action_dry_run(self) -> None:
        self.dry_run(self.draft())

    def action_start(self) -> None:
        draft = self.draft()
        if draft != self._planned:
            self.app.notify("dry run this draft first (ctrl+r)", severity="warning")
            return
        if self.plan is not None and not self.plan.planned:
            self.app.notify("the dry run found no device to update: nothing to start",
                            severity="warning", markup=False)  # fmt: skip
            return
        self.start(draft)

    def _error(self, err: ClientError) -> None:
        self.query_one("#errors", Static).update(f"{err.title}: {err.message}")
        self.app.notify(err.message, title=err.title, severity="error", markup=False)

    @work(exclusive=True, group="wizard-plan", exit_on_error=False)
    async def dry_run(self, draft: RolloutDraft) -> None:
        try:
            plan = await self.client.plan_rollout(draft)
        except ClientError as err:
            self._error(err)
            return
        counts = (
            f"{len(plan.planned)} devices in {len(plan.stages)} stages, "
            f"{len(plan.excluded)} excluded"
        )
        # No device to update: nothing to start (the server refuses it);
        # the exclusions below say why.
        startable = bool(plan.planned)
        warnings = empty_stage_warnings(
            [len(plan.stage_devices(i)) for i in range(len(plan.stages))]
        )
        self.query_one("#errors", Static).update(
            "\n".join([f"{counts}; ctrl+s starts it" if startable
                        else f"{counts}: nothing to start; the exclusions say why",
                        *(f"warning: {w}" for w in warnings)])
        )  # fmt: skip
        self.query_one("#plan", Static).update(PlanView(plan))
        self._planned, self.plan = draft, plan
        self.query_one("#start", Button).disabled = not startable
        self.query_one("#plan", Static).scroll_visible()

    @work(exclusive=True, group="wizard-start", exit_on_error=False)
    async def start(self, draft: RolloutDraft) -> None:
        try:
            rollout = await self.client.start_rollout(draft)
        except ClientError as err:
            self._error(err)
            return
        from edgefleet.tui.screens.monitor import MonitorScreen

        self.app.notify(f"rollout {rollout.id[:8]} of {rollout.ref} started")
        self.app.pop_screen()
        self.app.push_screen(MonitorScreen(rollout.id))
