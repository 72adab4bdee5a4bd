"""The TUI's layout promises, checked on the screen drawn (fake fleet, fixed
clock): every dialog centred and whole at 80x24 and 160x48, buttons that name
their key whatever is done to them, radio buttons and checkboxes whose state
is in their text (not only in their colour), and stage specs that a wide
terminal shows whole."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import Button, Checkbox, Input, Label, RadioButton, Static

from edgefleet.tui import data as d
from edgefleet.tui.app import EdgeFleetApp, make_app
from edgefleet.tui.screens.modals import AbortScreen
from edgefleet.tui.screens.monitor import MonitorScreen
from edgefleet.tui.screens.wizard import WizardScreen, plan_table
from edgefleet.tui.widgets import KeyButton
from testkit.tui_fake import NOW, ROLLOUT, FakeFleet

SIZES = {"80x24": (80, 24), "160x48": (160, 48)}

# The keys that open each dialog (from the overview).
DIALOGS = {
    "confirm": ("5", "enter", "g"),
    "prompt": ("5", "enter", "s"),
    "abort": ("5", "enter", "x"),
    "edit": ("5", "enter", "e"),
    "choice": ("2", *["down"] * 5, "enter", "u"),
    "push": ("4", "u"),
    "class_form": ("3", "e"),
    "help": ("question_mark",),
}
# A stage spec longer than an 80-column monitor has room for.
LONG_SPEC = "10%,stratified,bake=5m,latency=1.5,error-rate=5%"


def _app(fleet: FakeFleet | None = None) -> EdgeFleetApp:
    return make_app(fleet or FakeFleet(), clock=lambda: NOW, watch=False)


async def _press(pilot: Pilot[None], *keys: str) -> None:
    for key in ("", *keys):
        if key:
            await pilot.press(key)
        for _ in range(3):  # until every worker is done and what it showed is drawn
            await pilot.app.workers.wait_for_complete()
            await pilot.pause()


def _text(widget: Button | RadioButton | Checkbox | Label) -> str:
    """What the widget draws, as text (no colour)."""
    return " ".join(widget.render_line(y).text for y in range(widget.size.height)).strip()


@pytest.mark.parametrize(
    ("dialog", "size"), [pytest.param(k, s, id=f"{k}-{s}") for k in DIALOGS for s in SIZES]
)
async def test_every_dialog_is_centred_and_whole(dialog: str, size: str) -> None:
    width, height = SIZES[size]
    app = _app()
    async with app.run_test(size=(width, height)) as pilot:
        await _press(pilot, *DIALOGS[dialog])
        box = app.screen.query_one(".dialog").region
        assert box.x >= 0 and box.y >= 0 and box.right <= width and box.bottom <= height, box
        # Centred: as much room on either side (one cell off where it is odd).
        assert abs(box.x - (width - box.right)) <= 1, (box, width)
        assert abs(box.y - (height - box.bottom)) <= 1, (box, height)


async def test_buttons_keep_their_key_after_focus_and_relabelling() -> None:
    app = _app()
    async with app.run_test(size=SIZES["80x24"]) as pilot:
        await _press(pilot, *DIALOGS["abort"])
        assert isinstance(app.screen, AbortScreen)
        labels = {b.id: _text(b) for b in app.screen.query(KeyButton)}
        # `[esc]` read as markup would be a style tag and vanish.
        assert labels == {"abort": "Abort [ctrl+y]", "cancel": "Cancel [esc]"}
        cancel = app.screen.query_one("#cancel", KeyButton)
        cancel.focus()
        await pilot.hover("#cancel")
        await _press(pilot)
        assert cancel.has_focus and _text(cancel) == "Cancel [esc]"
        cancel.label = "Close"
        await _press(pilot)
        assert _text(cancel) == "Close [esc]"
        # The key it names is the key that does it.
        await _press(pilot, "escape")
        assert not isinstance(app.screen, AbortScreen)


@pytest.mark.parametrize("dialog", ["confirm", "abort", "edit", "push", "class_form"])
async def test_every_dialog_button_names_its_key(dialog: str) -> None:
    app = _app()
    async with app.run_test(size=SIZES["80x24"]) as pilot:
        await _press(pilot, *DIALOGS[dialog])
        buttons = list(app.screen.query(Button))
        assert buttons
        for button in buttons:
            assert isinstance(button, KeyButton), button
            assert _text(button).endswith(f"[{button.key_hint}]"), _text(button)


async def test_the_abort_choice_is_readable_without_colour() -> None:
    app = _app()
    async with app.run_test(size=SIZES["80x24"]) as pilot:
        await _press(pilot, *DIALOGS["abort"])
        revert = app.screen.query_one("#revert", RadioButton)
        keep = app.screen.query_one("#keep", RadioButton)
        assert _text(revert).startswith("(•) revert")
        assert _text(keep).startswith("( ) keep")
        # Down to "keep", Enter picks it: the marks follow, not just a colour.
        await _press(pilot, "down", "enter")
        assert keep.value and not revert.value
        assert _text(keep).startswith("(•) keep")
        assert _text(revert).startswith("( ) revert")


async def test_wizard_checkboxes_show_ticks_without_colour() -> None:
    app = _app()
    async with app.run_test(size=SIZES["80x24"]) as pilot:
        await _press(pilot, "5", "n")
        assert isinstance(app.screen, WizardScreen)
        approve = app.screen.query_one("#approve", Checkbox)
        assert _text(approve) == "[ ] wait for approval between stages"
        approve.focus()
        await _press(pilot, "space")
        assert approve.value
        assert _text(approve) == "[x] wait for approval between stages"


async def test_the_dry_run_warns_of_a_stage_left_empty() -> None:
    app = _app()  # the fake plans its devices into the first two stages
    async with app.run_test(size=SIZES["160x48"]) as pilot:
        await _press(pilot, "5", "n")
        assert isinstance(app.screen, WizardScreen)
        app.screen.query_one("#version", Input).value = "digits@1.1.0"
        app.screen.query_one("#classes", Input).value = "pi-class"
        app.screen.query_one("#stages", Input).value = "1; 50%; 100%"
        await _press(pilot, "ctrl+r")
        status = str(app.screen.query_one("#errors", Static).render())
        assert "warning: stage 3 has no device: the stages before it take the whole cohort " \
               "(3 devices)" in status, status  # fmt: skip
        app.screen.query_one("#stages", Input).value = "1; 100%"
        await _press(pilot, "ctrl+r")
        status = str(app.screen.query_one("#errors", Static).render())
        assert "3 devices in 2 stages" in status and "warning" not in status, status


async def _monitor_title(size: tuple[int, int]) -> tuple[str, int]:
    """The first stage's title as drawn on a monitor `size` wide, and the
    width the title had."""
    fleet = FakeFleet()
    stage = d.StageStatus(0, "", 4, 1, 0, 3, "rolling", spec=LONG_SPEC, phase="rolling")
    rollout = replace(ROLLOUT, id="r0000009-aaaa-4bbb-8ccc-000000000000", current_stage=0,
                      stages=(stage,))  # fmt: skip
    fleet.rollouts.append(rollout)
    app = _app(fleet)
    async with app.run_test(size=size) as pilot:
        app.push_screen(MonitorScreen(rollout.id))
        await _press(pilot)
        title = app.screen.query_one("#stage-0 .stage-title", Label)
        return _text(title), title.size.width


async def test_a_wide_terminal_shows_the_stage_spec_whole() -> None:
    wide, wide_width = await _monitor_title(SIZES["160x48"])
    assert wide == f">1 {LONG_SPEC}"
    narrow, narrow_width = await _monitor_title(SIZES["80x24"])
    # Cut where it must be, and said to be cut.
    assert narrow_width < len(wide) and narrow.endswith("…") and wide.startswith(narrow[:-1])
    assert wide_width > narrow_width


def test_the_dry_run_shows_a_stage_spec_whole_where_it_fits() -> None:
    plan = d.RolloutPlan(
        stages=(LONG_SPEC, "100%"),
        planned=(d.RolloutDevice("1", "pi-kitchen", "pi-class", 0, "waiting"),
                 d.RolloutDevice("2", "pi-hallway", "pi-class", 1, "waiting")),
        excluded=(),
    )  # fmt: skip

    def drawn(width: int) -> list[str]:
        console = Console(width=width, file=io.StringIO(), color_system=None)
        console.print(plan_table(plan, width))
        assert isinstance(console.file, io.StringIO)
        return console.file.getvalue().splitlines()

    wide = drawn(156)
    assert any(f"1 {LONG_SPEC}" in line and "pi-kitchen" in line for line in wide), wide
    # Narrow: the spec wraps, and the devices keep a column of their own.
    narrow = drawn(76)
    assert not any(LONG_SPEC in line for line in narrow)
    assert any(line.rstrip().endswith("1 pi-class: pi-kitchen") for line in narrow), narrow
