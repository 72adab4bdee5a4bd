"""Keystrokes for five operator tasks (issue 23), counted on the current TUI:
each task is a script of keys after the TUI opens, run by a pilot against a
real control plane (in process, SQLite) with simulated devices (fleetsim) on
the real device protocol and the real FleetClient; the test asserts the
task's goal state, and that docs/operators/tui.md states the same count.

A script's waits (for a screen, a row, a dialog) are what a person's eyes
do between keys: they are not keys. Typed text counts a key per character."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static

from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import ControlPlane, create_server
from edgefleet.sim import Fleet, parse_profile
from edgefleet.tui.app import EdgeFleetApp, make_app
from edgefleet.tui.client import FleetClient
from edgefleet.tui.screens.device_detail import DeviceDetailScreen
from edgefleet.tui.screens.devices import DevicesScreen
from edgefleet.tui.screens.modals import AbortScreen, ConfirmScreen
from edgefleet.tui.screens.monitor import MonitorScreen
from edgefleet.tui.screens.rollouts import RolloutsScreen
from edgefleet.tui.screens.telemetry import TelemetryScreen
from edgefleet.tui.screens.wizard import WizardScreen
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.fleet import GW, PI, FleetSetup, prepare_for_fleets
from testkit.harness import ADMIN_TOKEN
from testkit.tui_pilot import until

pytestmark = pytest.mark.timeout(180)
ADMIN = bearer_metadata(ADMIN_TOKEN)
SIZE = (100, 30)
DOC = Path(__file__).resolve().parents[2] / "docs" / "operators" / "tui.md"
# The goal per task (issue 23): keys after the TUI opens.
GOAL = 10
FAIL_REASON = "validation failed: outputs differ from the reference"


# ------------------------------------------------------------------ scripts


@dataclass(frozen=True)
class Step:
    """Keys pressed (pilot key names; a str of several characters is typed
    text, a key each), then what the operator waits to see."""

    keys: tuple[str, ...]
    then: Callable[[EdgeFleetApp], object]
    what: str


def typed(text: str) -> tuple[str, ...]:
    return tuple(text)


def count(script: list[Step]) -> int:
    return sum(len(step.keys) for step in script)


def screen_is(kind: type) -> Callable[[EdgeFleetApp], object]:
    return lambda app: isinstance(app.screen, kind) and app.screen


def text_of(app: EdgeFleetApp, selector: str) -> str:
    """What the Static `selector` of the current screen shows, as text."""
    widget = app.screen.query_one(selector, Static)
    console = Console(width=max(widget.size.width, 40), file=io.StringIO(), record=True)
    console.print(widget.content)
    return console.export_text()


def rows(app: EdgeFleetApp, selector: str = "DataTable") -> list[list[str]]:
    table: DataTable[Any] = app.screen.query_one(selector, DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def seen(app: EdgeFleetApp) -> str:
    """What the app shows, for a failure's message: the screen, its
    notifications."""
    notes = "; ".join(f"{n.title}: {n.message}" for n in app._notifications)
    stack = " > ".join(type(s).__name__ for s in app.screen_stack)
    return f"screens {stack}, focused {app.focused!r}, notifications: {notes or 'none'}"


async def play(app: EdgeFleetApp, pilot: Pilot[None], script: list[Step]) -> None:
    # The TUI has opened: the overview, connected.
    await until(pilot, lambda: app.connection.state == "connected" and app.current_mode
                == "overview", "the overview")  # fmt: skip
    for step in script:
        await pilot.press(*step.keys)
        try:
            await until(pilot, lambda s=step: s.then(app), step.what)
        except AssertionError as err:
            raise AssertionError(f"after {' '.join(step.keys)}: {err} ({seen(app)})") from None


def documented() -> dict[str, int]:
    """Task -> keys, from the table in docs/operators/tui.md."""
    found = re.findall(r"^\| (.+?) \| `[^|]*` \| (\d+) \|", DOC.read_text(), re.MULTILINE)
    return {task: int(keys) for task, keys in found}


def check_documented(task: str, script: list[Step]) -> None:
    assert documented().get(task) == count(script), (
        f"docs/operators/tui.md: {task!r} takes {count(script)} keys"
    )


# ------------------------------------------------------------------ fixtures


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    server = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN,
            build_workers=0, heartbeat_interval_s=1, telemetry_interval_s=1, rollout_tick_s=0.2,
        )
    )  # fmt: skip
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


@pytest.fixture
async def ready(cp: ControlPlane, tmp_path: Path) -> AsyncIterator[FleetSetup]:
    """Classes pi and gw; digits 1.0.0 and 2.0.0 built; an auto-accept token."""
    setup = await prepare_for_fleets(cp, tmp_path)
    try:
        yield setup
    finally:
        await setup.channel.close()


def profile(**gw_versions: dict[str, Any]) -> Any:
    return parse_profile({
        "heartbeat_interval_s": 1, "telemetry_interval_s": 0.5,
        "classes": [
            {"name": "pi", "hardware": PI, "install_s": [0.05, 0.2], "latency_p95_ms": 12},
            {"name": "gw", "hardware": GW, "install_s": [0.05, 0.2], "latency_p95_ms": 20,
             "versions": gw_versions},
        ],
    })  # fmt: skip


def fleet(cp: ControlPlane, token: str, n: int, prefix: str, **kw: Any) -> Fleet:
    return Fleet(cp.address, token, kw.pop("sim_profile", profile()), n=n, prefix=prefix,
                 seed=prefix, heartbeat_interval_s=1, telemetry_interval_s=0.5, **kw)  # fmt: skip


async def on_version(op: og.OperatorServiceStub, f: Fleet, version: str) -> None:
    """Every device of `f` assigned digits@version, until each settled."""
    await op.AssignModel(o.AssignModelRequest(
        device_ids=[a.device_id for a in f.agents], model_name="digits", model_version=version,
    ), metadata=ADMIN)  # fmt: skip
    await f.wait_until(lambda fl: all(a.active_version == version for a in fl.agents), 60,
                       what=f"every device on {version}")  # fmt: skip


def run_app(cp: ControlPlane) -> EdgeFleetApp:
    return make_app(FleetClient(cp.address, ADMIN_TOKEN))


# ------------------------------------------------------------------ the tasks

ACCEPT_SITE = "accept all pending devices of a site"
CANARY = "roll a model to one class with a canary"
WHY_FAILED = "find why a device failed"
P95 = "see p95 latency of a version over 24 h"
REVERT = "revert a rollout"


def devices_shown(n: int) -> Callable[[EdgeFleetApp], object]:
    return lambda app: isinstance(app.screen, DevicesScreen) and len(rows(app)) == n


ACCEPT_SITE_SCRIPT = [
    Step(("2",), screen_is(DevicesScreen), "the devices"),
    Step(("slash",), lambda app: app.screen.query_one("#filter", Input).has_focus, "the filter"),
    # The site's name finds its devices by their label's value: the five
    # pending ones and two accepted already.
    Step(typed("north"), devices_shown(7), "the site's devices"),
    # `*` from the filter selects what it shows and hands the keys to the table.
    Step(
        ("asterisk",),
        lambda app: (
            "7 selected" in text_of(app, "#status") and app.screen.query_one(DataTable).has_focus
        ),
        "7 selected",
    ),
    # Accept takes the ones not accepted yet, and says so.
    Step(
        ("a",),
        lambda app: (
            isinstance(app.screen, ConfirmScreen)
            and "Accept 5 devices? (2 selected accepted already" in text_of(app, ".question")
        ),
        "the confirmation",
    ),
    Step(("y",), screen_is(DevicesScreen), "the devices again"),
]


async def test_accept_all_pending_devices_of_a_site(cp: ControlPlane, ready: FleetSetup) -> None:
    token = await ready.op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(
        name="site", policy=o.ENROLLMENT_POLICY_PENDING), metadata=ADMIN)  # fmt: skip
    north = fleet(cp, token.secret, 5, "north", labels={"site": "north"})
    south = fleet(cp, token.secret, 2, "south", labels={"site": "south"})
    accepted = fleet(cp, ready.token, 2, "old", labels={"site": "north"})
    async with north, south, accepted:
        app = run_app(cp)
        async with app.run_test(size=SIZE) as pilot:
            await play(app, pilot, ACCEPT_SITE_SCRIPT)

            async def states() -> dict[str, int]:
                listed = await ready.op.ListDevices(o.ListDevicesRequest(), metadata=ADMIN)
                return {d.name: d.state for d in listed.devices}

            deadline = asyncio.get_running_loop().time() + 30
            while any(s != c.DEVICE_STATE_ACCEPTED for n, s in (await states()).items()
                      if n.startswith("north")):  # fmt: skip
                assert asyncio.get_running_loop().time() < deadline, await states()
                await pilot.pause(0.1)
            assert all(s == c.DEVICE_STATE_PENDING for n, s in (await states()).items()
                       if n.startswith("south"))  # fmt: skip
    check_documented(ACCEPT_SITE, ACCEPT_SITE_SCRIPT)


def wizard_version(app: EdgeFleetApp) -> str:
    return app.screen.query_one("#version", Input).value


CANARY_SCRIPT = [
    Step(("5",), screen_is(RolloutsScreen), "the rollouts"),
    # The wizard suggests the newest version of the model: the one to roll.
    Step(
        ("n",),
        lambda app: isinstance(app.screen, WizardScreen) and wizard_version(app) == "digits@2.0.0",
        "the wizard, version suggested",
    ),
    Step(("tab",), lambda app: app.screen.query_one("#classes", Input).has_focus, "classes"),
    Step(typed("pi"), lambda app: app.screen.query_one("#classes", Input).value == "pi", "pi"),
    # The default stages are the canary: `1,stratified; 100%`.
    Step(("ctrl+r",), lambda app: app.screen.plan is not None, "the dry run"),
    Step(("ctrl+s",), screen_is(MonitorScreen), "the monitor"),
]


async def test_roll_a_model_to_one_class_with_a_canary(cp: ControlPlane, ready: FleetSetup) -> None:
    async with fleet(cp, ready.token, 4, "sim") as f:
        await on_version(ready.op, f, "1.0.0")
        app = run_app(cp)
        async with app.run_test(size=SIZE) as pilot:
            await play(app, pilot, CANARY_SCRIPT)
            assert isinstance(app.screen, MonitorScreen)
            rollout_id = app.screen.rollout_id
        got = await ready.op.GetRollout(o.GetRolloutRequest(id=rollout_id), metadata=ADMIN)
    spec = got.spec
    assert (spec.model_name, spec.model_version) == ("digits", "2.0.0")
    assert list(spec.class_names) == ["pi"]
    assert spec.stages[0].count == 1 and spec.stages[-1].percent == 100
    check_documented(CANARY, CANARY_SCRIPT)


WHY_FAILED_SCRIPT = [
    Step(("2",), screen_is(DevicesScreen), "the devices"),
    Step(("slash",), lambda app: app.screen.query_one("#filter", Input).has_focus, "the filter"),
    Step(typed("fail"), devices_shown(1), "the failed device"),
    Step(("enter",), lambda app: app.screen.query_one(DataTable).has_focus, "the table"),
    Step(
        ("enter",),
        lambda app: (
            isinstance(app.screen, DeviceDetailScreen)
            and FAIL_REASON[:40] in text_of(app, "#model")
        ),
        "the device, and why",
    ),
]


async def test_find_why_a_device_failed(cp: ControlPlane, ready: FleetSetup) -> None:
    failing = profile(**{"2.0.0": {"fail_rate": 1.0, "fail_reason": FAIL_REASON}})
    async with fleet(cp, ready.token, 4, "sim", sim_profile=failing) as f:
        await on_version(ready.op, f, "1.0.0")
        gw = next(a for a in f.agents if a.class_name == "gw")
        await ready.op.AssignModel(o.AssignModelRequest(
            device_ids=[gw.device_id], model_name="digits", model_version="2.0.0"),
            metadata=ADMIN)  # fmt: skip
        await f.wait_until(lambda _: gw.update_state == "failed", 60, what="the update failed")
        app = run_app(cp)
        async with app.run_test(size=SIZE) as pilot:
            await play(app, pilot, WHY_FAILED_SCRIPT)
            assert isinstance(app.screen, DeviceDetailScreen)
            assert app.screen.device_id == gw.device_id
    check_documented(WHY_FAILED, WHY_FAILED_SCRIPT)


P95_SCRIPT = [
    Step(("6",), screen_is(TelemetryScreen), "the telemetry"),
    # p95 latency by version is what the screen opens on; t: 15m, 1h, 6h, 24h.
    Step(("t",), lambda app: "last 6h" in text_of(app, "#choice"), "6 h"),
    Step(
        ("t",),
        lambda app: (
            "last 24h" in text_of(app, "#choice") and "digits@1.0.0" in text_of(app, "#legend")
        ),
        "24 h, the version's line",
    ),
]


async def test_see_p95_latency_of_a_version_over_24_hours(
    cp: ControlPlane, ready: FleetSetup
) -> None:
    async with fleet(cp, ready.token, 2, "sim") as f:
        await on_version(ready.op, f, "1.0.0")
        app = run_app(cp)
        async with app.run_test(size=SIZE) as pilot:
            await play(app, pilot, P95_SCRIPT)
            choice = text_of(app, "#choice")
            assert "p95 latency" in choice and "by version" in choice
    check_documented(P95, P95_SCRIPT)


REVERT_SCRIPT = [
    Step(("5",), lambda app: isinstance(app.screen, RolloutsScreen) and rows(app), "the rollout"),
    Step(
        ("enter",),
        lambda app: isinstance(app.screen, MonitorScreen) and app.screen.rollout is not None,
        "the monitor",
    ),
    # Revert is the choice the dialog opens on.
    Step(("x",), screen_is(AbortScreen), "the abort dialog"),
    Step(
        ("ctrl+y",),
        lambda app: (
            isinstance(app.screen, MonitorScreen)
            and app.screen.rollout is not None
            and app.screen.rollout.state == "aborted"
        ),
        "the rollout aborted",
    ),
]


async def test_revert_a_rollout(cp: ControlPlane, ready: FleetSetup) -> None:
    async with fleet(cp, ready.token, 4, "sim") as f:
        await on_version(ready.op, f, "1.0.0")
        created = await ready.op.CreateRollout(o.CreateRolloutRequest(
            spec=o.RolloutSpec(model_name="digits", model_version="2.0.0",
                               class_names=["pi", "gw"], stages=[
                                   # Waits for approval after the canary.
                                   o.StageSpec(count=2, stratified=True, require_approval=True),
                                   o.StageSpec(percent=100)]),
            start=True), metadata=ADMIN)  # fmt: skip
        await f.wait_until(lambda fl: sum(a.active_version == "2.0.0" for a in fl.agents) == 2,
                           60, what="the canary on 2.0.0")  # fmt: skip
        app = run_app(cp)
        async with app.run_test(size=SIZE) as pilot:
            await play(app, pilot, REVERT_SCRIPT)
        # Reverted: every device back on 1.0.0.
        await f.wait_until(lambda fl: all(a.active_version == "1.0.0" for a in fl.agents), 60,
                           what="every device back on 1.0.0")  # fmt: skip
        got = await ready.op.GetRollout(o.GetRolloutRequest(id=created.rollout.id),
                                        metadata=ADMIN)  # fmt: skip
        assert got.state == o.ROLLOUT_STATE_ABORTED
    check_documented(REVERT, REVERT_SCRIPT)


def test_every_task_is_within_the_goal_or_says_so() -> None:
    """The table's figures, against the goal of issue 23 (<= 10 keys)."""
    for task, keys in documented().items():
        shown = re.search(rf"^\| {re.escape(task)} \| .* \| {keys} \| (met|not met)",
                          DOC.read_text(), re.MULTILINE)  # fmt: skip
        assert shown is not None, task
        assert (shown.group(1) == "met") == (keys <= GOAL), task
