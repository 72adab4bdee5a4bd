"""Issue 23 item 5: one action on many devices, from the CLI (ids and/or
--selector/--state, one confirmation with the count, a summary and a line
per failure) and the TUI (space, shift+arrows, `*` for every row the filter
shows; one confirmation; one summary), against an in-process control plane."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc
import pytest
from click.testing import CliRunner, Result
from textual.app import App
from textual.pilot import Pilot
from textual.widgets import DataTable, Input

from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.server import ControlPlane
from edgefleet.tui.app import EdgeFleetApp, make_app
from edgefleet.tui.client import FleetClient
from edgefleet.tui.screens.devices import SELECTED, DevicesScreen
from edgefleet.tui.screens.modals import ConfirmScreen
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import ADMIN, enrollment_token

pytestmark = pytest.mark.timeout(120)

PENDING = 100
SIZE = (120, 36)


@dataclass
class Fleet:
    cp: ControlPlane
    op: og.OperatorServiceAsyncStub
    pending: list[str]  # PENDING pending devices; the first 10 at site line-3
    accepted: list[str]  # two accepted x86_64 devices (class gateway), at site line-3

    async def cli(self, *args: str) -> Result:
        """The CLI in a thread: the control plane runs on this loop."""
        return await asyncio.to_thread(
            CliRunner(env={"COLUMNS": "200"}).invoke,
            cli,
            ["--server", self.cp.address, "--token", ADMIN_TOKEN, *args],
        )

    async def states(self) -> dict[str, str]:
        listed = await self.op.ListDevices(o.ListDevicesRequest(page_size=1000), metadata=ADMIN)
        return {x.id: c.DeviceState.Name(x.state) for x in listed.devices}

    async def device(self, device_id: str) -> c.Device:
        return await self.op.GetDevice(o.GetDeviceRequest(id=device_id), metadata=ADMIN)


@pytest.fixture
async def fleet(server: ControlPlane) -> AsyncIterator[Fleet]:
    """Classes pi-class (aarch64) and gateway (x86_64); PENDING aarch64
    devices enrolled with a pending token, two accepted gateways."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        op: og.OperatorServiceAsyncStub = og.OperatorServiceStub(channel)
        dev: dg.DeviceServiceAsyncStub = dg.DeviceServiceStub(channel)
        for name, arch in (("pi-class", "aarch64"), ("gateway", "x86_64")):
            await op.CreateDeviceClass(
                o.CreateDeviceClassRequest(
                    name=name,
                    constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME),
                    match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=[arch])],
                ),
                metadata=ADMIN,
            )

        async def enroll(token: str, name: str, arch: str, site: str) -> str:
            resp = await dev.Enroll(
                d.EnrollRequest(
                    enrollment_token=token, hardware_id=f"hw-{name}", name=name,
                    labels={"site": site}, hardware=c.HardwareProfile(arch=arch, memory_mb=2048),
                )
            )  # fmt: skip
            return str(resp.device_id)

        pending_token = await enrollment_token(op, o.ENROLLMENT_POLICY_PENDING)
        pending = [
            await enroll(pending_token, f"pi-{i:03d}", "aarch64", "line-3" if i < 10 else "a")
            for i in range(PENDING)
        ]
        accept_token = await enrollment_token(op, o.ENROLLMENT_POLICY_AUTO_ACCEPT)
        accepted = [await enroll(accept_token, f"gw-{i}", "x86_64", "line-3") for i in range(2)]
        yield Fleet(server, op, pending, accepted)


# ------------------------------------------------------------------ CLI


async def test_cli_accepts_100_pending_devices_with_one_yes(fleet: Fleet) -> None:
    # No terminal to ask on and no --yes: refused, with the count and why.
    refused = await fleet.cli("devices", "accept", "--state", "pending")
    assert refused.exit_code == 1
    assert refused.stderr == (
        f"error: Accept {PENDING} devices: not confirmed; add --yes "
        "(stdin is not a terminal to ask on)\n"
    )
    assert set((await fleet.states()).values()) == {"DEVICE_STATE_PENDING", "DEVICE_STATE_ACCEPTED"}

    result = await fleet.cli("devices", "accept", "--state", "pending", "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"accepted {PENDING} of {PENDING}\n"
    assert set((await fleet.states()).values()) == {"DEVICE_STATE_ACCEPTED"}

    # Nothing pending any more: nothing to do, said so.
    again = await fleet.cli("devices", "accept", "--state", "pending", "--yes")
    assert again.exit_code == 0 and again.stdout == ""
    assert "no device matches state=pending: nothing to do" in again.stderr


async def test_cli_answers_the_question_on_a_terminal(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runner's stdin is no terminal: pretend it is one, and answer.
    import click.testing

    monkeypatch.setattr(click.testing._NamedTextIOWrapper, "isatty", lambda self: True)
    pair = ",".join(["class=pi-class", "site=line-3"])
    no = await asyncio.to_thread(
        CliRunner().invoke, cli,
        ["--server", fleet.cp.address, "--token", ADMIN_TOKEN, "devices", "accept",
         "--selector", pair], input="n\n",
    )  # fmt: skip
    assert "Accept 10 devices? [y/N]" in no.output
    assert no.exit_code == 1 and "cancelled: nothing was changed" in no.output
    yes = await asyncio.to_thread(
        CliRunner().invoke, cli,
        ["--server", fleet.cp.address, "--token", ADMIN_TOKEN, "devices", "accept",
         "--selector", pair], input="y\n",
    )  # fmt: skip
    assert yes.exit_code == 0, yes.output
    assert "accepted 10 of 10" in yes.output


async def test_cli_selector_by_label_and_class(fleet: Fleet) -> None:
    # site=line-3 alone: the 10 pending pis and the 2 gateways.
    result = await fleet.cli(
        "devices", "label", "--selector", "site=line-3", "tier=canary", "--yes", "--json"
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["device_id"] for r in rows} == set(fleet.pending[:10] + fleet.accepted)
    assert all(r["ok"] and r["error"] == "" for r in rows)
    assert {r["name"] for r in rows} >= {"pi-000", "gw-1"}

    # And class=pi-class: the gateways are left alone.
    result = await fleet.cli(
        "devices", "pin", "--selector", "class=pi-class,site=line-3", "--state", "pending",
        "gateway", "--yes",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == "pinned to gateway: 10 of 10\n"
    pinned = await fleet.device(fleet.pending[0])
    assert pinned.class_name == "gateway"
    assert dict(pinned.labels) == {"site": "line-3", "tier": "canary"}
    assert (await fleet.device(fleet.pending[10])).labels.get("tier", "") == ""

    bad = await fleet.cli("devices", "accept", "--selector", "class")
    assert bad.exit_code == 2 and "label 'class' must look like key=value" in bad.stderr
    none = await fleet.cli("devices", "accept")
    assert none.exit_code == 2 and "give device IDs, --selector" in none.stderr


async def test_cli_partial_failure_names_each_and_exits_1(fleet: Fleet) -> None:
    gone = fleet.pending[2]
    await fleet.op.DecommissionDevice(o.DecommissionDeviceRequest(id=gone), metadata=ADMIN)
    unknown = "f" * 32
    result = await fleet.cli(
        "devices", "accept", fleet.pending[0], fleet.pending[1], gone, unknown, "--yes"
    )
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "accepted 2 of 4; 2 failed:"
    assert lines[1].startswith(f"  {gone} ({gone}): FAILED_PRECONDITION: ")
    assert "decommissioned" in lines[1]
    assert lines[2].startswith(f"  {unknown} ({unknown}): NOT_FOUND: ")
    states = await fleet.states()
    assert states[fleet.pending[0]] == states[fleet.pending[1]] == "DEVICE_STATE_ACCEPTED"

    # --json: the per-device results, the failures' words included.
    result = await fleet.cli("devices", "reject", unknown, fleet.pending[3], "--yes", "--json")
    assert result.exit_code == 1
    rows = {r["device_id"]: r for r in json.loads(result.stdout)}
    assert rows[fleet.pending[3]]["ok"] and not rows[unknown]["ok"]
    assert rows[unknown]["error"].startswith("NOT_FOUND: ")


async def test_cli_one_device_reads_as_before(fleet: Fleet) -> None:
    result = await fleet.cli("devices", "accept", fleet.pending[0])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"accepted device pi-000 ({fleet.pending[0]})\n"


# ------------------------------------------------------------------ TUI


async def settle(pilot: Pilot[None]) -> None:
    for _ in range(3):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


async def until(pilot: Pilot[None], condition: Callable[[], Any], what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + 30
    while not (value := condition()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the TUI never showed {what}")
        await pilot.pause(0.05)
    return value


def _notes(app: EdgeFleetApp) -> list[str]:
    """Every notification's message from now on."""
    messages: list[str] = []
    shown = app.notify

    def notify(message: str, **kw: Any) -> None:
        messages.append(message)
        shown(message, **kw)

    app.notify = notify  # type: ignore[method-assign]
    return messages


def _names(app: App[Any]) -> list[str]:
    table = app.screen.query_one("#devices", DataTable)
    return [str(table.get_row_at(i)[0]) for i in range(table.row_count)]


async def _devices_screen(pilot: Pilot[None]) -> DevicesScreen:
    await pilot.press("2")
    await until(pilot, lambda: isinstance(pilot.app.screen, DevicesScreen), "the devices screen")
    await until(pilot, lambda: len(_names(pilot.app)) == PENDING + 2, "every device")
    return cast(DevicesScreen, pilot.app.screen)


async def test_tui_accepts_100_filtered_pending_devices_with_one_confirmation(
    fleet: Fleet,
) -> None:
    app = make_app(FleetClient(fleet.cp.address, ADMIN_TOKEN), watch=False)
    notes = _notes(app)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _devices_screen(pilot)
        await pilot.press("slash", *"pending", "enter")
        await until(pilot, lambda: len(_names(app)) == PENDING, "the pending devices")
        await pilot.press("asterisk")
        assert screen.selection == set(fleet.pending)
        assert all(n.startswith(SELECTED) for n in _names(app))
        assert f"{PENDING} selected" in str(screen.query_one("#status").render())

        await pilot.press("a")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        assert f"Accept {PENDING} devices?" in str(app.screen.query_one(".question").render())
        await pilot.press("y")
        await until(pilot, lambda: f"accepted {PENDING}" in notes, "the summary")
        await settle(pilot)
        # One dialog: the screen is back, nothing else asked.
        assert app.screen is screen and screen.selection == set()
    assert set((await fleet.states()).values()) == {"DEVICE_STATE_ACCEPTED"}


async def test_tui_space_and_shift_select_and_a_failure_stays_selected(fleet: Fleet) -> None:
    gone = fleet.pending[1]
    app = make_app(FleetClient(fleet.cp.address, ADMIN_TOKEN), watch=False)
    notes = _notes(app)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _devices_screen(pilot)
        # Sorted by name: gw-0, gw-1, pi-000, pi-001, ...
        await pilot.press("down", "down", "space")
        assert screen.selection == {fleet.pending[0]}
        await pilot.press("shift+down", "shift+down")
        assert screen.selection == set(fleet.pending[:3])
        assert _names(app)[2:6] == [f"{SELECTED}pi-000", f"{SELECTED}pi-001",
                                    f"{SELECTED}pi-002", "pi-003"]  # fmt: skip
        await pilot.press("space")  # the cursor's row (pi-002) leaves the selection
        assert screen.selection == set(fleet.pending[:2])
        await pilot.press("escape")
        assert screen.selection == set() and not any(n.startswith(SELECTED) for n in _names(app))
        await pilot.press("shift+up", "shift+up")
        assert screen.selection == set(fleet.pending[:3])

        # pi-001 is decommissioned under the TUI's feet: its accept fails.
        await fleet.op.DecommissionDevice(o.DecommissionDeviceRequest(id=gone), metadata=ADMIN)
        await pilot.press("a")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("y")
        summary = await until(pilot, lambda: [n for n in notes if n.startswith("accepted")],
                              "the summary")  # fmt: skip
        assert summary[0].startswith("accepted 2, 1 failed: pi-001: FAILED_PRECONDITION: ")
        await settle(pilot)
        # The reload dropped the decommissioned device, and with it the selection.
        assert screen.selection == set()
    states = await fleet.states()
    assert states[fleet.pending[0]] == states[fleet.pending[2]] == "DEVICE_STATE_ACCEPTED"


async def test_tui_selection_survives_a_live_update(fleet: Fleet) -> None:
    app = make_app(FleetClient(fleet.cp.address, ADMIN_TOKEN))
    async with app.run_test(size=SIZE) as pilot:
        screen = await _devices_screen(pilot)
        await until(pilot, lambda: app.events_seen, "the watch")
        await pilot.press("down", "down", "space", "down", "space")
        assert screen.selection == set(fleet.pending[:2])
        loads = screen.query_one("#devices", DataTable)

        # Another operator relabels a device: the watch reloads the table.
        await fleet.op.UpdateDeviceLabels(
            o.UpdateDeviceLabelsRequest(id=fleet.pending[5], set={"tier": "canary"}),
            metadata=ADMIN,
        )
        await until(pilot, lambda: "tier=canary" in " ".join(
            str(c) for c in loads.get_row(fleet.pending[5])), "the live update")  # fmt: skip
        assert screen.selection == set(fleet.pending[:2])
        assert _names(app)[2:5] == [f"{SELECTED}pi-000", f"{SELECTED}pi-001", "pi-002"]

        # A filter hides a selected row; it stays selected, and acts with the rest.
        filter_box = screen.query_one("#filter", Input)
        filter_box.value = "pi-001"
        await pilot.pause()
        assert _names(app) == [f"{SELECTED}pi-001"]
        assert screen.selection == set(fleet.pending[:2])


class _CountingClient(FleetClient):
    """The real client, counting whole-list reads."""

    lists = 0

    async def list_devices(self) -> list[Any]:
        self.lists += 1
        return await super().list_devices()


async def test_a_device_event_updates_its_row_without_reading_the_list(fleet: Fleet) -> None:
    """Event to row (issue 23's figure, bench_tui): a device another operator
    accepts is re-read alone and its row updated in place; the whole list
    (20 pages at 10,000 devices, seconds) is not read again. A device
    decommissioned meanwhile leaves the table."""
    client = _CountingClient(fleet.cp.address, ADMIN_TOKEN)
    app = make_app(client)  # with the live watch
    async with app.run_test(size=SIZE) as pilot:
        screen = await _devices_screen(pilot)
        table = screen.query_one("#devices", DataTable)
        # The watch's resync (and the reload it starts) before counting;
        # settle() would wait on the watch worker, which never ends.
        await until(pilot, lambda: app.events_seen >= 1, "the watch's resync")
        await pilot.pause(0.5)
        reads = client.lists
        target, gone = fleet.pending[5], fleet.pending[6]

        def status(device_id: str) -> str:
            return str(table.get_row(device_id)[1])

        assert status(target) == "pending"
        await fleet.op.AcceptDevice(o.AcceptDeviceRequest(id=target), metadata=ADMIN)
        await until(pilot, lambda: status(target) != "pending", "the accepted device's row")
        await fleet.op.DecommissionDevice(o.DecommissionDeviceRequest(id=gone), metadata=ADMIN)
        await until(pilot, lambda: gone not in table.rows, "the decommissioned device gone")
        await pilot.pause(0.5)
        assert client.lists == reads
        assert len(_names(app)) == PENDING + 1


async def test_cli_pin_to_a_class_that_is_not_there_fails_once(fleet: Fleet) -> None:
    """Not the same NOT_FOUND once per device (a stranger got 20)."""
    result = await fleet.cli("devices", "pin", "--selector", "site=line-3", "nosuchclass", "--yes")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "nosuchclass" in result.stderr
    assert result.stderr.startswith("error: NOT_FOUND: ")
