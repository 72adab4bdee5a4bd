"""Snapshots of every TUI screen at 80x24 and 160x48 over fixed data (tests/tui_fake.py:
a fake FleetApi with a fixed clock) with the cursor blink frozen.
`pytest tests/test_tui_snapshots.py --snapshot-update` rewrites them after a
deliberate change; look at the SVGs in tests/__snapshots__ before committing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace

import grpc
import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Label, OptionList, Static

from edgefleet.tui import data as d
from edgefleet.tui.app import EdgeFleetApp, make_app
from edgefleet.tui.client import ServerError
from edgefleet.tui.screens.modals import ConfirmScreen, PromptScreen, RolloutEditScreen
from edgefleet.tui.screens.monitor import MonitorScreen
from testkit.tui_fake import DONE, NOW, ROLLOUT, FakeFleet, TelemetryFleet

SIZE = (80, 24)
# Every screen is shot at the smallest terminal it is laid out for and at a
# wide one (where columns and dialogs must grow or stay centred, not stretch).
SIZES = {"80x24": SIZE, "160x48": (160, 48)}


@pytest.fixture(autouse=True)
def no_cursor_blink(monkeypatch: pytest.MonkeyPatch) -> None:
    """A blinking cursor is on or off depending on when the shot is taken."""
    monkeypatch.setattr(Input, "_toggle_cursor", lambda self: None)


def _app() -> EdgeFleetApp:
    return make_app(FakeFleet(), clock=lambda: NOW, watch=False)


async def settle(pilot: Pilot[None]) -> None:
    """Until every worker is done and what they showed is drawn."""
    for _ in range(3):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


def _keys(*keys: str) -> Callable[[Pilot[None]], Awaitable[None]]:
    async def run(pilot: Pilot[None]) -> None:
        await settle(pilot)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)

    return run


def _typed(keys: Iterable[str], fields: dict[str, str], then: Iterable[str] = ()) -> Callable[
    [Pilot[None]], Awaitable[None]
]:  # fmt: skip
    async def run(pilot: Pilot[None]) -> None:
        await _keys(*keys)(pilot)
        for field, value in fields.items():
            pilot.app.screen.query_one(f"#{field}", Input).value = value
        await settle(pilot)
        await _keys(*then)(pilot)

    return run


CASES = {
    "overview": _keys(),
    "devices": _keys("2"),
    "devices_filtered": _keys("2", "slash", "p", "i", "escape"),
    "device_detail": _keys("2", "down", "down", "enter"),
    # pi-kitchen: two models, one of them downloading.
    "device_models": _keys("2", *["down"] * 5, "enter"),
    "unassign_choice": _keys("2", *["down"] * 5, "enter", "u"),
    "classes": _keys("3", "down"),
    "class_form_error": _typed(["3", "e"], {"latency_budget_ms": "-5"}, ["ctrl+s"]),
    "models": _keys("4", "tab", "down"),
    "push_dialog": _keys("4", "u"),
    "rollouts": _keys("5"),
    "wizard_dry_run": _typed(["5", "n"], {"version": "digits@1.1.0",
                                          "classes": "pi-class,x86-gateway",
                                          "gates": "memory=0.2"}, ["ctrl+r"]),
    "monitor": _keys("5", "enter"),
    "abort_dialog": _keys("5", "enter", "x"),
    # Invalid input is shown in the dialog, which stays open.
    "skip_reason_required": _keys("5", "enter", "s", "enter"),
    "edit_form_error": _typed(["5", "enter", "e"], {"success": "abc"}, ["ctrl+s"]),
    "telemetry": _keys("6"),
    "audit": _keys("7"),
    "help": _keys("question_mark"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "size"), [pytest.param(c, s, id=f"{c}-{s}") for c in CASES for s in SIZES]
)
def test_screen(case: str, size: str, snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(_app(), terminal_size=SIZES[size], run_before=CASES[case])


class RefusedFleet(FakeFleet):
    """A server that turns the token down, as FleetClient.whoami reports it."""

    async def whoami(self) -> str:
        raise ServerError(grpc.StatusCode.UNAUTHENTICATED, "operator token 'ci' was revoked")


@pytest.mark.parametrize("size", list(SIZES))
def test_refused_token_screen(size: str, snap_compare: Callable[..., bool]) -> None:
    app = make_app(RefusedFleet(), clock=lambda: NOW, watch=False)
    assert snap_compare(app, terminal_size=SIZES[size], run_before=_keys("2"))


# From the 1h the explorer opens on, "t" steps 6h, 24h, 7d, 15m.
TELEMETRY_RANGES = {"15m": ("t",) * 4, "24h": ("t",) * 2, "7d": ("t",) * 3}


@pytest.mark.parametrize(
    ("span", "size"), [pytest.param(r, s, id=f"{r}-{s}") for r in TELEMETRY_RANGES for s in SIZES]
)
def test_telemetry_range(span: str, size: str, snap_compare: Callable[..., bool]) -> None:
    """By device over a week of samples (TelemetryFleet): more devices than
    lines (top 5 and "others"), one with a single sample, one with zeros
    before its install; the x-axis in the range's unit."""
    app = make_app(TelemetryFleet(), clock=lambda: NOW, watch=False)
    keys = _keys("6", "g", "g", *TELEMETRY_RANGES[span])
    assert snap_compare(app, terminal_size=SIZES[size], run_before=keys)


async def test_unassign_a_model_from_the_detail_view_after_confirming() -> None:
    fleet = FakeFleet()
    app = make_app(fleet, clock=lambda: NOW, watch=False)
    kitchen = next(x for x in fleet.devices if x.name == "pi-kitchen")
    async with app.run_test(size=SIZE) as pilot:
        await _keys("2", *["down"] * 5, "enter", "u", "down", "enter")(pilot)
        # A confirmation first: nothing is sent before it.
        assert isinstance(app.screen, ConfirmScreen)
        assert not [c for c in fleet.calls if c[0] == "unassign"]
        await _keys("y")(pilot)
        assert ("unassign", (kitchen.id, "vad")) in fleet.calls
        (after,) = [x for x in fleet.devices if x.id == kitchen.id]
        assert [m.name for m in after.models] == ["digits"]
        assert any("unassigned vad from pi-kitchen" in n.message for n in app._notifications)
        # One model left: no choice to make, straight to the confirmation;
        # "n" cancels and nothing is sent.
        await _keys("u")(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        await _keys("n")(pilot)
        assert [c for c in fleet.calls if c[0] == "unassign"] == [("unassign", (kitchen.id, "vad"))]


async def test_the_fake_fails_like_the_server() -> None:
    fleet = FakeFleet()
    with pytest.raises(ServerError) as unknown:
        await fleet.unassign_model("nope", "vad")
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND
    device = fleet.devices[1]
    assert await fleet.unassign_model(device.id, "vad") is False  # not held: nothing to do


async def test_the_fake_refuses_remediation_like_the_server() -> None:
    fleet = FakeFleet()
    rollout = await fleet.get_rollout("r0000001-aaaa-4bbb-8ccc-000000000000")
    committed = next(x.device_id for x in rollout.devices if x.state == "committed")
    with pytest.raises(ServerError) as refused:
        await fleet.retry_rollout(rollout.id, [committed])
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "only failed, rejected or timed-out" in refused.value.message
    with pytest.raises(ServerError) as missing:
        await fleet.skip_rollout_devices("nope", ["2"], "why")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ServerError) as ended:
        await fleet.promote_rollout("r0000000-aaaa-4bbb-8ccc-000000000000")
    assert ended.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_monitor_retries_skips_promotes_and_edits_through_the_client() -> None:
    fleet = FakeFleet()
    app = make_app(fleet, clock=lambda: NOW, watch=False)
    async with app.run_test(size=SIZE) as pilot:
        # The failed pi-hallway is listed first, under the cursor.
        await _keys("5", "enter", "t")(pilot)
        pilot.app.screen.query_one(OptionList).highlighted = 0
        await _keys("enter")(pilot)
        assert ("retry", ("2",)) in fleet.calls
        await _keys("space", "s")(pilot)
        pilot.app.screen.query_one("#prompt", Input).value = "bad board"
        await _keys("enter")(pilot)
        assert ("skip", (("2",), "bad board")) in fleet.calls
        await _keys("g", "y")(pilot)
        # The stage shown (stage 2, from 0: 1) goes with the promote.
        assert ("promote", ("r0000001-aaaa-4bbb-8ccc-000000000000", 1)) in fleet.calls
        await _keys("e")(pilot)
        assert pilot.app.screen.query_one("#errors", Input).value == ""
        pilot.app.screen.query_one("#errors", Input).value = "20/3"
        await _keys("ctrl+s")(pilot)
        assert any("stage 2: 100%,latency=1 -> 100%,errors=20/3,latency=1" in n.message
                   for n in app._notifications)  # fmt: skip


def _dialog_errors(app: EdgeFleetApp) -> str:
    errors = app.screen.query_one("#dialog-errors", Static)
    return str(errors.render()) if errors.display else ""


async def test_a_dialog_stays_open_on_invalid_input_and_keeps_the_keys() -> None:
    fleet = FakeFleet()
    app = make_app(fleet, clock=lambda: NOW, watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await _keys("5", "enter", "s", "enter")(pilot)
        # No reason: said in the dialog, which stays open; nothing sent.
        assert isinstance(app.screen, PromptScreen)
        assert _dialog_errors(app) == "Invalid input: skip: say why the devices are skipped"
        assert not [c for c in fleet.calls if c[0] == "skip"]
        # What the operator types next goes into the dialog, not to the
        # monitor's keys (r refresh, e edit, p pause).
        await _keys(*"replaced", "space", *"psu")(pilot)
        assert app.screen.query_one("#prompt", Input).value == "replaced psu"
        assert not [c for c in fleet.calls if c[0] in ("pause", "update")]
        await _keys("enter")(pilot)
        assert isinstance(app.screen, MonitorScreen)
        assert ("skip", (("2",), "replaced psu")) in fleet.calls

        # The edit form: a value that does not parse is said in the form,
        # which keeps every value typed; Escape closes it, sending nothing.
        await _keys("e")(pilot)
        form = app.screen
        assert isinstance(form, RolloutEditScreen)
        form.query_one("#success", Input).value = "abc"
        form.query_one("#bake", Input).value = "5m"
        await _keys("ctrl+s")(pilot)
        assert app.screen is form
        assert "success='abc': not a number" in _dialog_errors(app)
        assert (form.query_one("#success", Input).value,
                form.query_one("#bake", Input).value) == ("abc", "5m")  # fmt: skip
        # Fixed: sent, and the form closes.
        form.query_one("#success", Input).value = "90"
        await _keys("ctrl+s")(pilot)
        assert isinstance(app.screen, MonitorScreen)
        (update,) = [c for c in fleet.calls if c[0] == "update"]
        assert isinstance(update[1], d.RolloutEdit) and update[1].success == "90"
        await _keys("e", "escape")(pilot)
        assert isinstance(app.screen, MonitorScreen)
        assert len([c for c in fleet.calls if c[0] == "update"]) == 1


async def test_a_server_refusal_closes_the_dialog_and_says_why() -> None:
    fleet = FakeFleet()
    app = make_app(fleet, clock=lambda: NOW, watch=False)
    async with app.run_test(size=SIZE) as pilot:
        # pi-kitchen (committed) under the cursor: the server refuses to skip it.
        await _keys("5", "enter")(pilot)
        monitor = app.screen
        assert isinstance(monitor, MonitorScreen)
        table = monitor.query_one("#devices", DataTable)
        rows = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        table.move_cursor(row=rows.index("pi-kitchen"))
        await _keys("s")(pilot)
        app.screen.query_one("#prompt", Input).value = "why not"
        await _keys("enter")(pilot)
        assert app.screen is monitor
        assert any(n.severity == "error" and "members are skipped" in n.message
                   for n in app._notifications)  # fmt: skip


async def _monitor(fleet: FakeFleet, rollout: d.Rollout, pilot: Pilot[None]) -> MonitorScreen:
    fleet.rollouts.append(rollout)
    pilot.app.push_screen(MonitorScreen(rollout.id))
    await settle(pilot)
    assert isinstance(pilot.app.screen, MonitorScreen)
    return pilot.app.screen


@pytest.mark.parametrize(
    ("state", "offered", "refused"),
    [
        ("succeeded", "", "etsg"),
        ("aborted", "", "etsg"),
        # Failed members may be retried after it finished with them.
        ("succeeded-with-failures", "t", "esg"),
        ("paused", "etsg", ""),
        ("draft", "e", "tsg"),
    ],
)
async def test_the_monitor_offers_only_what_applies_in_the_state(
    state: str, offered: str, refused: str
) -> None:
    fleet = FakeFleet()
    app = make_app(fleet, clock=lambda: NOW, watch=False)
    rollout = replace(DONE, id=f"r{state[:7]:0<7}-aaaa-4bbb-8ccc-000000000000", state=state)
    async with app.run_test(size=SIZE) as pilot:
        monitor = await _monitor(fleet, rollout, pilot)
        for key in offered:
            await _keys(key)(pilot)
            assert app.screen is not monitor, key  # its dialog opened
            await _keys("escape")(pilot)
            assert app.screen is monitor
        words = state.replace("-", " ")
        for key in refused:
            app.clear_notifications()
            await _keys(key)(pilot)
            assert app.screen is monitor, key  # nothing asked, nothing sent
            (note,) = app._notifications
            assert note.severity == "warning"
            assert note.message.startswith(f"rollout {rollout.id[:8]} is {words}; "), note.message
            assert " applies to a rollout that is " in note.message
        assert not [c for c in fleet.calls if c[0] in ("retry", "skip", "promote", "update")]


async def test_stage_counts_tell_waiting_from_installing() -> None:
    fleet = FakeFleet()
    app = make_app(fleet, clock=lambda: NOW, watch=False)
    stage = d.StageStatus(0, "", 20, 1, 0, 19, "rolling", phase="rolling", waiting=17)
    rollout = replace(ROLLOUT, id="r0000009-aaaa-4bbb-8ccc-000000000000", current_stage=0,
                      stages=(stage,))  # fmt: skip
    async with app.run_test(size=SIZE) as pilot:
        monitor = await _monitor(fleet, rollout, pilot)
        counts = str(monitor.query_one("#stage-0 .stage-counts", Label).render())
        assert counts == "1/20 rolling, 17 waiting, 2 installing"
        assert "moving" not in counts


async def test_approve_and_promote_name_the_stage_shown() -> None:
    fleet = FakeFleet()
    app = make_app(fleet, clock=lambda: NOW, watch=False)
    waiting = replace(ROLLOUT, id="r0000008-aaaa-4bbb-8ccc-000000000000", current_stage=0,
                      state="waiting-approval")  # fmt: skip
    async with app.run_test(size=SIZE) as pilot:
        await _monitor(fleet, waiting, pilot)
        await _keys("a", "y")(pilot)
        assert ("approve", (waiting.id, 0)) in fleet.calls
        # The screen showed another stage than the rollout is at (a second
        # press before the first answer came back): refused, nothing passed.
        await _monitor(fleet, replace(ROLLOUT, id="r0000007-aaaa-4bbb-8ccc-000000000000",
                                      current_stage=0), pilot)  # fmt: skip
        fleet.rollouts[-1] = replace(fleet.rollouts[-1], current_stage=1)
        await _keys("g", "y")(pilot)
        assert not [c for c in fleet.calls if c[0] == "promote"]
        assert any("is at stage 2, not stage 1" in n.message for n in app._notifications)
