"""Issue 23 item 6: the TUI drills down. Over the real FleetClient, an
in-process control plane and simulated agents (fleetsim) on the real device
protocol, where digits 2.0.0 fails validation on every gateway with a long,
two-line reason: Enter on an overview alert opens the device it names;
Enter on a failed device in the monitor opens it at its history, where the
agent's reason is shown whole, and its rollouts are listed (Enter opens
one); the jump (ctrl+p or `/`) opens a device by name and a rollout by id
prefix; a model is assigned, then unassigned, from the device view."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from textual.command import CommandPalette
from textual.fuzzy import Matcher
from textual.geometry import Region
from textual.pilot import Pilot
from textual.widgets import DataTable, OptionList, Static

from edgefleet.controlplane.server import ControlPlane
from edgefleet.sim import Fleet, parse_profile
from edgefleet.tui.app import EdgeFleetApp, make_app
from edgefleet.tui.client import FleetClient
from edgefleet.tui.data import Model
from edgefleet.tui.jump import jump_targets, score
from edgefleet.tui.screens.classes import ClassesScreen
from edgefleet.tui.screens.device_detail import DeviceDetailScreen
from edgefleet.tui.screens.devices import DevicesScreen
from edgefleet.tui.screens.modals import AssignScreen, ConfirmScreen
from edgefleet.tui.screens.monitor import MonitorScreen
from edgefleet.tui.screens.overview import AlertTarget, alert_target
from edgefleet.tui.summary import summarize
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from testkit.fleet import FAST, GW, PI, FleetSetup, random_mlp
from testkit.harness import ADMIN_TOKEN
from testkit.models import model_parts, push_requests
from testkit.rpc import ADMIN
from testkit.tui_fake import DONE, NOW, ROLLOUT, FakeFleet
from testkit.tui_pilot import until

pytestmark = pytest.mark.timeout(120)
SIZE = (100, 30)
# The agent's validation detail: longer than any cell, on two lines.
REASON = (
    "validation failed: golden outputs out of tolerance on 7 of 64 samples: sample 3: max "
    "|diff| 0.31 > atol 0.001 at output 'scores'[0, 7]; sample 9: max |diff| 0.27 > atol "
    "0.001 at output 'scores'[0, 2]; the candidate's argmax agrees on 89.1% of the samples "
    "(95.0% required)\nreference: digits@1.0.0 on CPUExecutionProvider, onnxruntime 1.20.1"
)


@dataclass
class World:
    cp: ControlPlane
    setup: FleetSetup
    fleet: Fleet
    pi: c.Device
    gateways: list[c.Device]

    def app(self) -> EdgeFleetApp:
        return make_app(FleetClient(self.cp.address, ADMIN_TOKEN))

    async def device(self, device_id: str) -> c.Device:
        return await self.setup.op.GetDevice(o.GetDeviceRequest(id=device_id), metadata=ADMIN)

    async def failed_rollout(self) -> o.Rollout:
        """digits 2.0.0 to the gateways: both fail, the rollout pauses."""
        created = await self.setup.op.CreateRollout(o.CreateRolloutRequest(
            spec=o.RolloutSpec(model_name="digits", model_version="2.0.0", class_names=["gw"],
                               stages=[o.StageSpec(percent=100)]),
            start=True), metadata=ADMIN)  # fmt: skip
        for _ in range(600):
            got = await self.setup.op.GetRollout(o.GetRolloutRequest(id=created.rollout.id),
                                                 metadata=ADMIN)  # fmt: skip
            failed = [x for x in got.devices if x.state == o.ROLLOUT_DEVICE_STATE_FAILED]
            if got.state == o.ROLLOUT_STATE_PAUSED and len(failed) == len(self.gateways):
                return got
            await asyncio.sleep(0.1)
        raise AssertionError(f"the rollout did not pause on both gateways: {got}")


@pytest.fixture
async def world(server: ControlPlane, fleet_setup: FleetSetup) -> AsyncIterator[World]:
    """A Pi and two gateways on digits 1.0.0; 2.0.0 fails validation on
    every gateway with REASON."""
    profile = parse_profile({
        "heartbeat_interval_s": 1, "telemetry_interval_s": 0.5,
        "classes": [
            {"name": "pi", "count": 1, "hardware": PI, **FAST},
            {"name": "gw", "count": 2, "hardware": GW, **FAST,
             "versions": {"2.0.0": {"fail_rate": 1.0, "fail_state": "validating",
                                    "fail_reason": REASON}}},
        ],
    })  # fmt: skip
    async with Fleet(server.address, fleet_setup.token, profile, n=3, prefix="drill", seed=1,
                     heartbeat_interval_s=1, telemetry_interval_s=0.5) as fleet:  # fmt: skip
        ids = [a.device_id for a in fleet.agents]
        await fleet_setup.op.AssignModel(
            o.AssignModelRequest(device_ids=ids, model_name="digits", model_version="1.0.0"),
            metadata=ADMIN,
        )
        await fleet.wait_until(lambda f: all(a.active_version == "1.0.0" for a in f.agents), 30,
                               what="every agent on 1.0.0")  # fmt: skip
        devices = [
            await fleet_setup.op.GetDevice(o.GetDeviceRequest(id=i), metadata=ADMIN) for i in ids
        ]
        (pi,) = [x for x in devices if x.class_name == "pi"]
        gateways = [x for x in devices if x.class_name == "gw"]
        yield World(server, fleet_setup, fleet, pi, gateways)


def _rows(table: DataTable[Any]) -> list[list[str]]:
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def _shown(static: Static) -> str:
    """The lines the widget draws, joined with spaces (a reason wrapped
    over several lines reads whole again)."""
    lines = static.render_lines(Region(0, 0, static.size.width, static.size.height))
    return " ".join(" ".join(strip.text for strip in lines).split())


def _detail(app: EdgeFleetApp, device_id: str) -> DeviceDetailScreen | None:
    screen = app.screen
    return screen if isinstance(screen, DeviceDetailScreen) and screen.device_id == device_id \
        else None  # fmt: skip


def _in_view(screen: DeviceDetailScreen, widget_id: str) -> bool:
    """The widget's top line is inside the scrolled body's viewport."""
    body = screen.query_one("#body")
    widget = screen.query_one(widget_id)
    return body.region.y <= widget.region.y < body.region.bottom


async def test_enter_on_an_alert_opens_its_device(world: World) -> None:
    await world.failed_rollout()
    bad = world.gateways[1]
    app = world.app()
    async with app.run_test(size=SIZE) as pilot:
        alerts = await until(pilot, lambda: app.screen.query_one("#alerts", DataTable),
                             "the alerts")  # fmt: skip
        row = await until(
            pilot, lambda: next(i + 1 for i, r in enumerate(_rows(alerts))
                                if r[0] == "failed deployment" and r[1] == bad.name),
            "the failed gateway's alert")  # fmt: skip
        alerts.focus()
        alerts.move_cursor(row=row - 1)
        await pilot.press("enter")
        detail = await until(pilot, lambda: _detail(app, bad.id), "the failed device")
        # Opened at its history, where the failure is.
        await until(pilot, lambda: "golden outputs" in _shown(detail.query_one("#history", Static))
                    and _in_view(detail, "#history-title"), "the history in view")  # fmt: skip


async def test_enter_on_a_failed_monitor_row_shows_the_full_reason(world: World) -> None:
    rollout = await world.failed_rollout()
    app = world.app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await until(pilot, lambda: app.screen.query_one("#rollouts", DataTable).row_count,
                    "the rollout listed")  # fmt: skip
        await pilot.press("enter")
        monitor: MonitorScreen = await until(
            pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen, "the monitor"
        )
        devices = monitor.query_one("#devices", DataTable)
        await until(pilot, lambda: _rows(devices)[0][3] == "failed", "the failure")
        failed_name = _rows(devices)[0][0]
        (failed,) = [x for x in world.gateways if x.name == failed_name]
        devices.focus()
        await pilot.press("enter")
        detail = await until(pilot, lambda: _detail(app, failed.id), "the failed device")
        history = detail.query_one("#history", Static)
        # The agent's reason whole (both lines, no cut), wrapped to the
        # screen's width, and scrolled into view.
        await until(pilot, lambda: " ".join(REASON.split()) in _shown(history),
                    "the whole reason")  # fmt: skip
        assert history.content_region.width <= SIZE[0]
        await until(pilot, lambda: _in_view(detail, "#history-title"), "the history in view")
        # Its rollouts, with where it stands in each; Enter opens the monitor.
        rollouts = detail.query_one("#rollouts", DataTable)
        await until(pilot, lambda: _rows(rollouts), "the device's rollouts")
        (row,) = _rows(rollouts)
        assert row[0] == rollout.id[:8] and row[1] == "digits@2.0.0" and row[4] == "failed"
        assert "golden outputs" in row[5]
        rollouts.focus()
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, MonitorScreen)
                    and app.screen is not monitor and app.screen.rollout_id == rollout.id,
                    "the rollout's monitor from the device")  # fmt: skip


def _hits(app: EdgeFleetApp) -> list[str]:
    """The palette's hits as it lists them, best first."""
    palette = app.screen
    assert isinstance(palette, CommandPalette)
    found = palette.query_one(OptionList)
    return [str(found.get_option_at_index(i).prompt) for i in range(found.option_count)]


async def _jump(pilot: Pilot[None], key: str, text: str, expect: str) -> None:
    """Open the palette with `key`, type `text`, and once the best hit is
    `expect` (the fleet is read when the palette opens), take it."""
    app = pilot.app
    await pilot.press(key)
    await until(pilot, lambda: isinstance(app.screen, CommandPalette), "the palette")
    await pilot.press(*text)
    await until(pilot, lambda: _hits(app)[0].startswith(expect), f"the hit {expect!r}")
    # Enter highlights the best hit when none is yet, Enter again takes it.
    await pilot.press("enter")
    await pilot.pause(0.1)
    if isinstance(app.screen, CommandPalette):
        await pilot.press("enter")


async def test_jump_by_name_and_by_id_prefix(world: World) -> None:
    rollout = await world.failed_rollout()
    app = world.app()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.screen.query_one("#alerts", DataTable).row_count,
                    "the overview")  # fmt: skip
        await _jump(pilot, "ctrl+p", world.pi.name, f"device {world.pi.name}")
        await until(pilot, lambda: _detail(app, world.pi.id), "the device jumped to by name")
        # Opened over the devices list: Esc goes back to it, 1 to the overview.
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, DevicesScreen), "the devices list")
        await pilot.press("1")
        # `/` opens it too (the overview filters nothing with it); an id
        # prefix as the tables show it finds the rollout.
        await _jump(pilot, "slash", rollout.id[:8], "rollout digits@2.0.0")
        await until(pilot, lambda: isinstance(app.screen, MonitorScreen)
                    and app.screen.rollout_id == rollout.id, "the rollout by its id")  # fmt: skip
        await pilot.press("escape")
        gateway = world.gateways[0]
        await _jump(pilot, "ctrl+p", gateway.id[:6], f"device {gateway.name}")
        await until(pilot, lambda: _detail(app, gateway.id), "the device by id prefix")


async def test_keys_1_to_7_open_their_list_not_a_view_left_open(world: World) -> None:
    """A stranger jumped to a device from the classes screen; `3` later
    showed that device again instead of the classes, and `5 Enter x`
    offered to reject it instead of aborting a rollout."""
    app = world.app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        await until(pilot, lambda: isinstance(app.screen, ClassesScreen), "the classes")
        await _jump(pilot, "ctrl+p", world.pi.name, f"device {world.pi.name}")
        await until(pilot, lambda: _detail(app, world.pi.id), "the device")
        await pilot.press("3")
        await until(pilot, lambda: isinstance(app.screen, ClassesScreen), "the classes again")
        await pilot.press("2")
        await until(pilot, lambda: isinstance(app.screen, DevicesScreen), "the devices list")
        assert len(app.screen_stack) == 1


def _assigned(device: c.Device) -> dict[str, str]:
    return {m.model_name: m.assigned_version for m in device.models if m.assigned_version}


async def test_assign_then_unassign_a_model_from_the_device_view(world: World) -> None:
    pi = world.pi
    assert _assigned(await world.device(pi.id)) == {"digits": "1.0.0"}
    app = world.app()
    async with app.run_test(size=SIZE) as pilot:
        await _jump(pilot, "ctrl+p", pi.name, f"device {pi.name}")
        detail = await until(pilot, lambda: _detail(app, pi.id), "the device")
        await until(pilot, lambda: detail.device is not None, "the device loaded")

        # m: the models, then the versions of the one highlighted.
        await pilot.press("m")
        dialog = await until(pilot, lambda: isinstance(app.screen, AssignScreen) and app.screen,
                             "the assign dialog")  # fmt: skip
        models = dialog.query_one("#assign-models", OptionList)
        names = [str(models.get_option_at_index(i).prompt) for i in range(models.option_count)]
        assert names == ["digits (has 1.0.0)", "vad"]
        models.focus()
        await pilot.press("down", "enter")  # vad, then its versions
        versions = dialog.query_one("#assign-versions", OptionList)
        assert [str(versions.get_option_at_index(i).prompt)
                for i in range(versions.option_count)] == ["1.0.0"]  # fmt: skip
        await pilot.press("enter")
        # A confirmation first: nothing is assigned before it.
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        assert _assigned(await world.device(pi.id)) == {"digits": "1.0.0"}
        await pilot.press("y")
        for _ in range(100):
            if _assigned(await world.device(pi.id)) == {"digits": "1.0.0", "vad": "1.0.0"}:
                break
            await pilot.pause(0.05)
        assert _assigned(await world.device(pi.id)) == {"digits": "1.0.0", "vad": "1.0.0"}
        # The view follows: vad is listed among its models.
        await until(pilot, lambda: detail.device is not None
                    and {m.name for m in detail.device.models} == {"digits", "vad"},
                    "vad in the device view")  # fmt: skip

        # u: which model, then a confirmation; digits stays.
        await pilot.press("u")
        choices = await until(pilot, lambda: app.screen.query_one("#choices", OptionList),
                              "the unassign choice")  # fmt: skip
        labels = [str(choices.get_option_at_index(i).prompt) for i in range(choices.option_count)]
        choices.highlighted = labels.index("vad@1.0.0")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("y")
        for _ in range(100):
            if _assigned(await world.device(pi.id)) == {"digits": "1.0.0"}:
                break
            await pilot.pause(0.05)
        assert _assigned(await world.device(pi.id)) == {"digits": "1.0.0"}


async def test_an_assignment_the_server_refuses_says_why_in_one_line(
    world: World, tmp_path: Path
) -> None:
    """A version with no successful build for the device's class (its
    builds still queued): the server refuses, and the operator reads its
    reason in one line; nothing is assigned."""
    model = random_mlp(tmp_path / "digits-3.onnx", seed=7)
    await world.setup.op.PushModel(push_requests("digits", "3.0.0", model_parts(model=model)),
                                   metadata=ADMIN)  # fmt: skip
    pi = world.pi
    app = world.app()
    async with app.run_test(size=SIZE) as pilot:
        await _jump(pilot, "ctrl+p", pi.name, f"device {pi.name}")
        detail = await until(pilot, lambda: _detail(app, pi.id), "the device")
        await until(pilot, lambda: detail.device is not None, "the device loaded")
        await pilot.press("m")
        dialog = await until(pilot, lambda: isinstance(app.screen, AssignScreen) and app.screen,
                             "the assign dialog")  # fmt: skip
        dialog.query_one("#assign-models", OptionList).focus()
        await pilot.press("enter")  # digits; its newest version is highlighted
        versions = dialog.query_one("#assign-versions", OptionList)
        assert str(versions.get_option_at_index(0).prompt) == "3.0.0"
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("y")
        error = await until(pilot, lambda: next((n for n in app._notifications
                                                 if n.severity == "error"), None),
                            "the refusal")  # fmt: skip
        assert error.title == "FAILED_PRECONDITION"
        assert "no successful build of this version" in error.message
        assert "\n" not in error.message
    assert _assigned(await world.device(pi.id)) == {"digits": "1.0.0"}


# ------------------------------------------------------------------ pure parts


def test_each_alert_names_what_it_opens() -> None:
    """Over the snapshot tests' fleet: a failed device, a failing gate of an
    active rollout, a silent device, a rollout that succeeded with failures
    and the devices in no class each open what the alert is about."""
    fleet = FakeFleet()
    bad = replace(ROLLOUT, id="r0000002-aaaa-4bbb-8ccc-000000000000", model_version="0.9.0",
                  state="succeeded-with-failures", reason="1 device failed")  # fmt: skip
    lost = replace(fleet.devices[1], id="lost", name="lost", class_name="")
    devices, rollouts = [*fleet.devices, lost], [ROLLOUT, DONE, bad]
    summary = summarize(devices, rollouts, NOW)
    by_kind = {(a.kind, a.subject): alert_target(a) for a in summary.alerts}
    assert by_kind == {
        ("failed deployment", "jetson-dock"): AlertTarget("device", devices[2].id),
        ("gate", "digits@1.1.0 stage 2"): AlertTarget("rollout", ROLLOUT.id),
        ("rollout", f"digits@0.9.0 {bad.id[:8]}"): AlertTarget("rollout", bad.id),
        ("silent", "pi-garage"): AlertTarget("device", devices[5].id),
        ("unclassified", "1 device matches no class"): AlertTarget("unclassified"),
    }

    # Two devices of one name: each alert opens its own (it used to match
    # the name back, and both opened the first).
    twin = replace(devices[2], id="twin-of-jetson")
    alerts = summarize([*devices, twin], rollouts, NOW).alerts
    failed = [alert_target(a) for a in alerts if a.kind == "failed deployment"]
    assert AlertTarget("device", devices[2].id) in failed
    assert AlertTarget("device", "twin-of-jetson") in failed


def test_jump_scores_an_id_prefix_and_a_whole_name_above_any_fuzzy_hit() -> None:
    fleet = FakeFleet()
    targets = jump_targets(fleet.devices, [ROLLOUT], [Model("digits")], [])

    def best(query: str) -> list[str]:
        fuzzy = Matcher(query).match
        ranked = sorted(targets, key=lambda t: score(t, query, fuzzy), reverse=True)
        return [t.name for t in ranked if score(t, query, fuzzy) > 0][:2]

    assert best("r0000001") == ["digits@1.1.0"]
    assert best("00000004") == ["gateway-1"]
    # Too short to mean one id: matched as a name only (none here).
    assert best("000") == []
    assert best("pi-kitchen")[0] == "pi-kitchen"
    assert best("pi-k")[0] == "pi-kitchen"
    # A device is not found by a model's name.
    assert score(targets[0], "digits", Matcher("digits").match) == 0
