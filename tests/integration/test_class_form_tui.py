"""Issue 23 item 8 in the terminal UI: the class form, driven by a pilot,
over the real FleetClient against an in-process control plane. The new-class
form focuses its first field; Tab into a field edits its text instead of
selecting it for the next key to replace; emptying a constraint field and
saving removes the constraint (the old value used to stay)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from textual.pilot import Pilot
from textual.widgets import Input

from edgefleet.controlplane.server import ControlPlane
from edgefleet.tui.app import make_app
from edgefleet.tui.client import FleetClient
from edgefleet.tui.screens.class_form import ClassFormScreen
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import ADMIN, enroll_accepted

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def op(server: ControlPlane) -> AsyncIterator[og.OperatorServiceStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = og.OperatorServiceStub(channel)
        await stub.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name="pi",
                constraints=c.ConstraintProfile(
                    runtime=c.RUNTIME_TFLITE, latency_budget_p95_ms=20, max_memory_mb=64,
                    accelerator="jetson", threads=4,
                ),
                match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=["aarch64"])],
            ),
            metadata=ADMIN,
        )  # fmt: skip
        await enroll_accepted(channel, "hw-pi")  # an aarch64 device: the rules match it
        yield stub


async def settle(pilot: Pilot[None]) -> None:
    for _ in range(3):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


def _focused_id(pilot: Pilot[None]) -> str | None:
    focused = pilot.app.screen.focused
    return focused.id if focused is not None else None


async def _erase(pilot: Pilot[None], field: str) -> None:
    """Empty a field as a person would: into it, to its end, backspace."""
    widget = pilot.app.screen.query_one(f"#{field}", Input)
    widget.focus()
    await pilot.press("end", *["backspace"] * len(widget.value))
    assert widget.value == ""


async def test_the_form_focuses_edits_in_place_and_clears_constraints(
    server: ControlPlane, op: og.OperatorServiceStub
) -> None:
    app = make_app(FleetClient(server.address, ADMIN_TOKEN), watch=False)
    notes: list[str] = []
    shown = app.notify

    def notify(message: str, **kw: Any) -> None:
        notes.append(message)
        shown(message, **kw)

    app.notify = notify  # type: ignore[method-assign]
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot)
        await pilot.press("3")
        await settle(pilot)

        await pilot.press("n")
        await settle(pilot)
        assert isinstance(app.screen, ClassFormScreen)
        assert _focused_id(pilot) == "name"
        await pilot.press("p", "i", "2")
        assert app.screen.query_one("#name", Input).value == "pi2"
        await pilot.press("escape")
        await settle(pilot)

        await pilot.press("e")
        await settle(pilot)
        form = app.screen
        assert isinstance(form, ClassFormScreen) and form.existing is not None
        # The name cannot change: the first field to type in is the next one.
        assert _focused_id(pilot) == "description"
        await pilot.press("tab")
        assert _focused_id(pilot) == "priority"
        await pilot.press("7")
        # Typed after the 0 that was there, not over it.
        assert form.query_one("#priority", Input).value == "07"

        await _erase(pilot, "latency_budget_ms")
        await _erase(pilot, "accelerator")
        await _erase(pilot, "threads")
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert not isinstance(app.screen, ClassFormScreen), form.query_one("#errors").render()
        # The CLI's words for what the rules match (it said "0 devices match"
        # where `classes update` said 15: it showed the class's members).
        assert "class pi saved; its rules match 1 device now" in notes

    saved = await op.GetDeviceClass(o.GetDeviceClassRequest(name="pi"), metadata=ADMIN)
    k = saved.constraints
    assert not k.HasField("latency_budget_p95_ms")
    assert (k.accelerator, k.threads, k.max_memory_mb) == ("", 1, 64)
    assert saved.priority == 7
    assert [r.values[0] for r in saved.match_rules] == ["aarch64"]
    listed = await op.ListDeviceClasses(o.ListDeviceClassesRequest(), metadata=ADMIN)
    assert [x.name for x in listed.classes] == ["pi"]  # escape created nothing
