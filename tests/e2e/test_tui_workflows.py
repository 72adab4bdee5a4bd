"""Operator workflows through the TUI, driven by a pilot, against a real
control plane (in process, SQLite) with simulated agents (fleetsim) on the
real device protocol and the real FleetClient: accept a pending device;
push a model and see its measured build table; create a rollout in the
wizard and watch it complete live; abort one and see the devices revert;
remedy a paused rollout from the monitor (retry, skip, promote) and edit
one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Label, OptionList, Static

from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import ControlPlane, create_server
from edgefleet.demo.models import BuiltModel, build_digits_classifier
from edgefleet.sim import Fleet, parse_profile
from edgefleet.tui.app import EdgeFleetApp, make_app
from edgefleet.tui.client import FleetClient, ServerError
from edgefleet.tui.screens.devices import DevicesScreen
from edgefleet.tui.screens.models import CANDIDATE_COLUMNS, ModelsScreen
from edgefleet.tui.screens.monitor import MonitorScreen
from edgefleet.tui.screens.wizard import WizardScreen
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import finish_builds_by_hand
from testkit.harness import ADMIN_TOKEN
from testkit.models import model_parts, push_requests
from testkit.tui_pilot import until

pytestmark = pytest.mark.timeout(120)
ADMIN = bearer_metadata(ADMIN_TOKEN)
SIZE = (100, 30)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> BuiltModel:
    return build_digits_classifier(tmp_path_factory.mktemp("digits"), hidden=8)


async def _server(tmp_path: Path, build_workers: int = 0) -> ControlPlane:
    return await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN,
            build_workers=build_workers, heartbeat_interval_s=1, telemetry_interval_s=1,
            rollout_tick_s=0.2,
        )
    )  # fmt: skip


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    server = await _server(tmp_path)
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


@pytest.fixture
async def op(cp: ControlPlane) -> AsyncIterator[og.OperatorServiceStub]:
    async with grpc.aio.insecure_channel(cp.address) as channel:
        yield og.OperatorServiceStub(channel)


def _app(cp: ControlPlane) -> EdgeFleetApp:
    return make_app(FleetClient(cp.address, ADMIN_TOKEN))


def _rows(table: DataTable[Any]) -> list[list[str]]:
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def _profile(**versions: dict[str, Any]) -> Any:
    return parse_profile({
        "heartbeat_interval_s": 1, "telemetry_interval_s": 0.5, "versions": versions,
        "classes": [
            {"name": "pi", "weight": 1, "hardware": {"arch": "aarch64"}, "install_s": [0.05, 0.2],
             "latency_p95_ms": 10, "error_rate": 0.0},
            {"name": "gw", "weight": 1, "hardware": {"arch": "x86_64"}, "install_s": [0.05, 0.2],
             "latency_p95_ms": 10, "error_rate": 0.0},
        ],
    })  # fmt: skip


async def _token(op: og.OperatorServiceStub, **kw: Any) -> str:
    resp = await op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="sim", **kw),
                                          metadata=ADMIN)  # fmt: skip
    return str(resp.secret)


async def _classes(op: og.OperatorServiceStub) -> None:
    for name, arch in (("pi", "aarch64"), ("gw", "x86_64")):
        await op.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name=name,
                constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME,
                                                latency_budget_p95_ms=30),
                match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=[arch])],
            ),
            metadata=ADMIN,
        )  # fmt: skip


# ---------------------------------------------------------------- devices


async def test_accept_a_pending_device(cp: ControlPlane, op: og.OperatorServiceStub) -> None:
    token = await _token(op, policy=o.ENROLLMENT_POLICY_PENDING)
    async with Fleet(cp.address, token, _profile(), n=1, prefix="field", seed=1,
                     heartbeat_interval_s=1) as fleet:  # fmt: skip
        device_id = fleet.agents[0].device_id
        app = _app(cp)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("2")
            screen = await until(pilot, lambda: isinstance(app.screen, DevicesScreen)
                                 and app.screen, "the devices screen")  # fmt: skip
            table = screen.query_one(DataTable)
            await until(pilot, lambda: any(r[1] == "pending" for r in _rows(table)),
                        "the pending device")  # fmt: skip
            await pilot.press("a")
            # The watch stream brings the change back: no refresh pressed.
            await until(pilot, lambda: _rows(table)[0][1] in ("online", "offline"),
                        "the device accepted")  # fmt: skip
            shown = await op.GetDevice(o.GetDeviceRequest(id=device_id), metadata=ADMIN)
            assert shown.state == c.DEVICE_STATE_ACCEPTED
            # Labels: typed in a dialog, applied by the server, shown live.
            await pilot.press("l")
            await until(pilot, lambda: app.screen.query_one("#prompt", Input), "the labels dialog")
            app.screen.query_one("#prompt", Input).value = "tier=canary"
            await pilot.press("enter")
            await until(pilot, lambda: "tier=canary" in _rows(table)[0][4], "the new label")
            shown = await op.GetDevice(o.GetDeviceRequest(id=device_id), metadata=ADMIN)
            assert shown.labels["tier"] == "canary"
            # What does not parse is a notification naming the problem.
            await pilot.press("l")
            await until(pilot, lambda: app.screen.query_one("#prompt", Input), "the labels dialog")
            app.screen.query_one("#prompt", Input).value = "=oops"
            await pilot.press("enter")
            await until(pilot, lambda: any(n.severity == "error" and "key=value" in n.message
                                           for n in app._notifications),
                        "the input error")  # fmt: skip


async def test_server_errors_carry_the_status_on_both_stacks(
    cp: ControlPlane, tmp_path: Path
) -> None:
    # Calls go over grpc.aio, whose AioRpcError is not a grpc.Call; uploads
    # over the blocking stack. Either way the notification is titled with
    # the status and says the server's words, not an exception's repr.
    client = FleetClient(cp.address, ADMIN_TOKEN)
    stranger = FleetClient(cp.address, "not-a-token")
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not really a model")
    try:
        with pytest.raises(ServerError) as missing:
            await client.get_device("no-such-device")
        assert (missing.value.code, missing.value.title) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
        assert "no-such-device" in missing.value.message
        assert "AioRpcError" not in missing.value.message
        for refused in (stranger.list_models(), stranger.push_model("m", "1.0.0", model)):
            with pytest.raises(ServerError) as unauthenticated:
                await refused
            assert unauthenticated.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert unauthenticated.value.title == "UNAUTHENTICATED"
            assert "RpcError" not in unauthenticated.value.message
    finally:
        await client.close()
        await stranger.close()


# ---------------------------------------------------------------- models and builds


async def test_push_a_model_and_see_its_build_table(tmp_path: Path, digits: BuiltModel) -> None:
    server = await _server(tmp_path, build_workers=1)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = og.OperatorServiceStub(channel)
            await stub.CreateDeviceClass(
                o.CreateDeviceClassRequest(
                    name="gw", constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME,
                                                               max_model_size_mb=1),
                    match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=["x86_64"])],
                ),
                metadata=ADMIN,
            )  # fmt: skip
        app = _app(server)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4", "u")
            await until(pilot, lambda: app.screen.query_one("#model", Input), "the push dialog")
            for field, value in (("name", "digits"), ("version", "1.0.0"),
                                 ("model", str(digits.model)),
                                 ("sample_data", str(digits.sample_data))):  # fmt: skip
                app.screen.query_one(f"#{field}", Input).value = value
            await pilot.press("ctrl+s")
            screen = await until(pilot, lambda: isinstance(app.screen, ModelsScreen)
                                 and app.screen, "the models screen again")  # fmt: skip
            builds = screen.query_one("#builds", DataTable)
            # A real build: every candidate measured; the table follows it live.
            await until(pilot, lambda: _rows(builds) and _rows(builds)[0][1] == "succeeded",
                        "the build succeeded", within_s=90)  # fmt: skip
            candidates = screen.query_one("#candidates", DataTable)
            await until(pilot, lambda: candidates.row_count >= 2, "the candidate table")
            rows = _rows(candidates)
            assert {r[0] for r in rows} >= {"fp32-opt", "int8-dynamic"}
            assert sum(r[CANDIDATE_COLUMNS.index("verdict")] == "CHOSEN" for r in rows) == 1
            assert _rows(builds)[0][3] in {r[0] for r in rows}
    finally:
        await server.stop(grace=0.5)


# ---------------------------------------------------------------- rollouts


async def _versions(cp: ControlPlane, op: og.OperatorServiceStub, digits: BuiltModel) -> None:
    """digits 1.0.0 and 2.0.0, with build results made by hand (the ladder
    is tested elsewhere; this is about the wizard and the monitor)."""
    await _classes(op)
    parts = model_parts(model=digits.model, sample_data=digits.sample_data)
    for version in ("1.0.0", "2.0.0"):
        await op.PushModel(push_requests("digits", version, parts), metadata=ADMIN)
    await finish_builds_by_hand(cp, op, digits.model, 4)


async def _on_version(op: og.OperatorServiceStub, fleet: Fleet, version: str) -> None:
    ids = [a.device_id for a in fleet.agents]
    await op.AssignModel(o.AssignModelRequest(device_ids=ids, model_name="digits",
                                              model_version=version), metadata=ADMIN)  # fmt: skip
    await fleet.wait_until(lambda f: all(a.active_version == version for a in f.agents), 30,
                           what=f"every agent on {version}")  # fmt: skip


async def _wizard(pilot: Pilot[None], app: EdgeFleetApp, stages: str) -> MonitorScreen:
    """Fill in the wizard, dry run, check the plan, start: the monitor opens."""
    await pilot.press("5", "n")
    wizard = await until(pilot, lambda: isinstance(app.screen, WizardScreen) and app.screen,
                         "the wizard")  # fmt: skip
    await until(pilot, lambda: wizard.query_one("#version", Input).value, "a version suggested")
    for field, value in (("version", "digits@2.0.0"), ("classes", "pi,gw"), ("stages", stages)):
        wizard.query_one(f"#{field}", Input).value = value
    await pilot.press("ctrl+s")  # not dry-run yet: refused
    await until(pilot, lambda: any("dry run" in n.message for n in app._notifications),
                "start refused before a dry run")  # fmt: skip
    await pilot.press("ctrl+r")
    plan = wizard.query_one("#plan", Static)
    await until(pilot, lambda: "excluded" in str(wizard.query_one("#errors", Static).render()),
                "the dry run")  # fmt: skip
    assert wizard.plan is not None and len(wizard.plan.planned) == 4
    # Stratified: the one-device stage holds one device of each class.
    assert sorted(d.class_name for d in wizard.plan.stage_devices(0)) == ["gw", "pi"]
    assert plan.display
    await pilot.press("ctrl+s")
    monitor: MonitorScreen = await until(
        pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen, "the monitor"
    )
    return monitor


def _title(monitor: MonitorScreen) -> str:
    return str(monitor.query_one("#title", Static).render())


@contextlib.asynccontextmanager
async def _fleet_on_1_0_0(
    cp: ControlPlane, op: og.OperatorServiceStub, digits: BuiltModel
) -> AsyncIterator[Fleet]:
    """Four simulated devices over two classes, all serving digits 1.0.0,
    with 2.0.0 built for the rollout."""
    await _versions(cp, op, digits)
    async with Fleet(cp.address, await _token(op), _profile(), n=4, prefix="sim", seed=1,
                     heartbeat_interval_s=1, telemetry_interval_s=0.5) as fleet:  # fmt: skip
        await _on_version(op, fleet, "1.0.0")
        yield fleet


async def test_create_a_rollout_in_the_wizard_and_watch_it_complete(
    cp: ControlPlane, op: og.OperatorServiceStub, digits: BuiltModel
) -> None:
    async with _fleet_on_1_0_0(cp, op, digits) as fleet:
        app = _app(cp)
        async with app.run_test(size=SIZE) as pilot:
            # The first stage bakes a few seconds, so the rollout is RUNNING
            # for at least that long whatever the machine's speed: without it
            # a quick fleet could finish before the monitor's first frame.
            monitor = await _wizard(pilot, app, "1,stratified,bake=4s; 100%")
            seen: set[str] = set()

            def done() -> bool:
                seen.add(_title(monitor).split()[3])
                return "SUCCEEDED" in _title(monitor)

            # Live: the monitor follows the watch stream to the end.
            await until(pilot, done, "the rollout succeeded", within_s=60)
            assert "RUNNING" in seen
            devices = monitor.query_one("#devices", DataTable)
            await until(pilot, lambda: [r[3] for r in _rows(devices)] == ["committed"] * 4,
                        "every device committed")  # fmt: skip
            assert app.events_seen > 0
        assert all(a.active_version == "2.0.0" for a in fleet.agents)


async def test_abort_a_rollout_and_see_devices_revert(
    cp: ControlPlane, op: og.OperatorServiceStub, digits: BuiltModel
) -> None:
    async with _fleet_on_1_0_0(cp, op, digits) as fleet:
        app = _app(cp)
        async with app.run_test(size=SIZE) as pilot:
            # The first stage bakes for long: the rollout waits there.
            monitor = await _wizard(pilot, app, "2,stratified,bake=10m; 100%")
            devices = monitor.query_one("#devices", DataTable)
            await until(pilot, lambda: sum(r[3] == "committed" for r in _rows(devices)) == 2,
                        "the first stage committed")  # fmt: skip
            # The next stage's devices are not notified yet: waiting, not "moving".
            await until(pilot, lambda: str(monitor.query_one("#stage-1 .stage-counts", Label)
                                           .render()) == "0/2 pending, 2 waiting",
                        "the second stage waiting")  # fmt: skip
            await pilot.press("x")
            await until(pilot, lambda: app.screen.query_one("#revert"), "the abort dialog")
            await pilot.press("ctrl+y")
            await until(pilot, lambda: "ABORTED" in _title(monitor), "the rollout aborted")

            # The first stage's two go back; the second's, never notified, are
            # dropped (once they too showed as "reverted", so the count of
            # reverted rows went 2 -> 4 and a slow screen could miss the 2).
            # Control plane, fleet and TUI share this one event loop: on a
            # loaded machine the reverts take longer than a quiet one's few
            # seconds.
            def states() -> list[str]:
                return sorted(r[3] for r in _rows(devices))

            try:
                await until(pilot, lambda: states() == ["dropped"] * 2 + ["reverted"] * 2,
                            "two devices reverted, two dropped", within_s=60)  # fmt: skip
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {_title(monitor)!r} {_rows(devices)!r}") from None
        await fleet.wait_until(lambda f: all(a.active_version == "1.0.0" for a in f.agents), 30,
                               what="every device back on 1.0.0")  # fmt: skip


# ---------------------------------------------------------------- remediation


async def _wait_rollout(op: og.OperatorServiceStub, rollout_id: str,
                        done: Callable[[o.Rollout], bool]) -> o.Rollout:  # fmt: skip
    for _ in range(600):
        rollout = await op.GetRollout(o.GetRolloutRequest(id=rollout_id), metadata=ADMIN)
        if done(rollout):
            return rollout
        await asyncio.sleep(0.1)
    raise AssertionError(f"rollout did not get there: {rollout}")


def _dialog_errors(app: EdgeFleetApp) -> str:
    """What the open dialog says is wrong with its input ("" if nothing)."""
    errors = app.screen.query_one("#dialog-errors", Static)
    return str(errors.render()) if errors.display else ""


def _notified(app: EdgeFleetApp, text: str, severity: str = "information") -> bool:
    return any(text in n.message and n.severity == severity for n in app._notifications)


async def test_retry_skip_and_promote_from_the_monitor(
    cp: ControlPlane, op: og.OperatorServiceStub, digits: BuiltModel
) -> None:
    await _versions(cp, op, digits)
    # 2.0.0 fails validation on every gateway: the first stage pauses.
    profile = parse_profile({
        "heartbeat_interval_s": 1, "telemetry_interval_s": 0.5,
        "classes": [
            {"name": "pi", "weight": 1, "hardware": {"arch": "aarch64"},
             "install_s": [0.05, 0.2]},
            {"name": "gw", "weight": 1, "hardware": {"arch": "x86_64"}, "install_s": [0.05, 0.2],
             "versions": {"2.0.0": {"fail_rate": 1.0, "fail_state": "validating"}}},
        ],
    })  # fmt: skip
    async with Fleet(cp.address, await _token(op), profile, n=4, prefix="sim", seed=1,
                     heartbeat_interval_s=1, telemetry_interval_s=0.5) as fleet:  # fmt: skip
        await _on_version(op, fleet, "1.0.0")
        created = await op.CreateRollout(o.CreateRolloutRequest(
            spec=o.RolloutSpec(model_name="digits", model_version="2.0.0",
                               class_names=["pi", "gw"], stages=[
                                   o.StageSpec(count=2, stratified=True),
                                   o.StageSpec(percent=100, error_threshold_percent=50)]),
            start=True), metadata=ADMIN)  # fmt: skip
        rollout_id = created.rollout.id
        paused = await _wait_rollout(op, rollout_id, lambda r: r.state == o.ROLLOUT_STATE_PAUSED)
        (bad,) = [d for d in paused.devices if d.state == o.ROLLOUT_DEVICE_STATE_FAILED]
        app = _app(cp)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("5")
            await until(pilot, lambda: app.screen.query_one("#rollouts", DataTable).row_count,
                        "the rollout listed")  # fmt: skip
            await pilot.press("enter")
            monitor: MonitorScreen = await until(
                pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen, "the monitor"
            )
            devices = monitor.query_one("#devices", DataTable)
            await until(pilot, lambda: "PAUSED" in _title(monitor)
                        and _rows(devices)[0][3] == "failed", "the failure")  # fmt: skip
            assert _rows(devices)[0][0] == bad.device_name
            devices.focus()

            # Retry the selected (failed) device: the server takes it again
            # (and it fails again there).
            await pilot.press("t")
            choices = await until(pilot, lambda: app.screen.query_one(OptionList), "the choice")
            choices.highlighted = 0
            await pilot.press("enter")
            await until(pilot, lambda: _notified(app, f"retried {bad.device_name}"), "retried")
            audit = await op.ListAuditLog(o.ListAuditLogRequest(limit=20), metadata=ADMIN)
            (retry,) = [e for e in audit.entries if e.action == "rollout.retry"]
            assert bad.device_id in retry.details
            await until(pilot, lambda: "PAUSED" in _title(monitor)
                        and _rows(devices)[0][3] == "failed", "paused again")  # fmt: skip

            # A refusal reads as the server's words: a committed device is not retried.
            devices.move_cursor(row=[r[3] for r in _rows(devices)].index("committed"))
            await pilot.press("t")
            choices = await until(pilot, lambda: app.screen.query_one(OptionList), "the choice")
            choices.highlighted = 0
            await pilot.press("enter")
            await until(pilot, lambda: _notified(app, "only failed, rejected or timed-out",
                                                 "error"), "the refusal")  # fmt: skip
            assert not any("RpcError" in n.message for n in app._notifications)

            # Skip the failed device: a reason is required (said in the
            # dialog, which stays open for it), then it is skipped.
            devices.move_cursor(row=0)
            await pilot.press("space", "s")
            prompt = await until(pilot, lambda: app.screen.query_one("#prompt", Input),
                                 "the reason prompt")  # fmt: skip
            dialog = app.screen
            await pilot.press("enter")  # no reason: nothing sent
            await until(pilot, lambda: "say why" in _dialog_errors(app), "reason required")
            assert app.screen is dialog
            await pilot.press(*"flaky", "space", *"board")  # typed into the dialog
            assert prompt.value == "flaky board" and "PAUSED" in _title(monitor)
            await pilot.press("enter")
            await until(pilot, lambda: any(r[3] == "skipped" for r in _rows(devices)),
                        "the device skipped")  # fmt: skip
            shown = await op.GetRollout(o.GetRolloutRequest(id=rollout_id), metadata=ADMIN)
            (skipped,) = [d for d in shown.devices if d.device_id == bad.device_id]
            assert skipped.state == o.ROLLOUT_DEVICE_STATE_SKIPPED
            assert "flaky board" in skipped.reason

            # Promote after confirming: stage 1 passes by hand; stage 2
            # tolerates the other gateway failing.
            await pilot.press("g")
            await until(pilot, lambda: app.screen.query_one("#yes"), "the confirmation")
            await pilot.press("y")
            await until(pilot, lambda: "SUCCEEDED-WITH-FAILURES" in _title(monitor),
                        "the rollout finished with failures", within_s=60)  # fmt: skip
            stage_one = str(monitor.query_one("#stage-0 .stage-counts", Label).render())
            assert "promoted by bootstrap-admin" in stage_one and "1 skipped" in stage_one
        done = await op.GetRollout(o.GetRolloutRequest(id=rollout_id), metadata=ADMIN)
        assert done.stages[0].phase == o.STAGE_PHASE_PROMOTED
        audit = await op.ListAuditLog(o.ListAuditLogRequest(limit=50), metadata=ADMIN)
        assert len([e for e in audit.entries if e.action == "rollout.promote"]) == 1
        # The client names the stage it promotes: the same promote again
        # (a second key press on a stale screen) passes nothing more.
        client = FleetClient(cp.address, ADMIN_TOKEN)
        try:
            with pytest.raises(ServerError) as again:
                await client.promote_rollout(rollout_id, "again", stage=0)
            assert again.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "is at stage 2, not stage 1" in again.value.message
        finally:
            await client.close()


async def test_edit_a_rollout_from_the_monitor(
    cp: ControlPlane, op: og.OperatorServiceStub, digits: BuiltModel
) -> None:
    async with _fleet_on_1_0_0(cp, op, digits):
        created = await op.CreateRollout(o.CreateRolloutRequest(
            spec=o.RolloutSpec(model_name="digits", model_version="2.0.0",
                               class_names=["pi", "gw"], stages=[
                                   o.StageSpec(count=1), o.StageSpec(percent=100)]),
        ), metadata=ADMIN)  # fmt: skip
        rollout_id = created.rollout.id
        app = _app(cp)
        async with app.run_test(size=SIZE) as pilot:
            app.push_screen(MonitorScreen(rollout_id))
            monitor = await until(pilot, lambda: isinstance(app.screen, MonitorScreen)
                                  and "DRAFT" in _title(app.screen) and app.screen,
                                  "the monitor")  # fmt: skip
            await pilot.press("e")
            form = await until(pilot, lambda: app.screen.query_one("#errors", Input)
                               and app.screen, "the edit form")  # fmt: skip
            form.query_one("#errors", Input).value = "20/3"
            form.query_one("#bake", Input).value = "5m"
            form.query_one("#max_per_minute", Input).value = "40"
            await pilot.press("ctrl+s")
            await until(pilot, lambda: _notified(app, "stage 1: 1 -> 1,success=80,errors=20/3"),
                        "what changed")  # fmt: skip
            spec = (await op.GetRollout(o.GetRolloutRequest(id=rollout_id), metadata=ADMIN)).spec
            assert spec.stages[0].error_threshold_percent == 20
            assert spec.stages[0].bake_time.seconds == 300 and spec.pacing.max_per_minute == 40
            assert spec.stages[1] == created.rollout.spec.stages[1]
            # What does not parse is named; nothing is sent.
            await pilot.press("e")
            form = await until(pilot, lambda: app.screen.query_one("#bake", Input)
                               and app.screen, "the edit form")  # fmt: skip
            form.query_one("#bake", Input).value = "soon"
            await pilot.press("ctrl+s")
            # Said in the form, which stays open with what was typed.
            await until(pilot, lambda: "'soon' is not a duration" in _dialog_errors(app),
                        "the input error")  # fmt: skip
            assert app.screen is form and form.query_one("#bake", Input).value == "soon"
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is monitor, "the monitor again")
            # An aborted rollout is not edited: said at once, no form opens.
            await op.AbortRollout(o.AbortRolloutRequest(id=rollout_id), metadata=ADMIN)
            await until(pilot, lambda: "ABORTED" in _title(monitor), "the rollout aborted")
            await pilot.press("e")
            await until(pilot, lambda: _notified(app, "edit applies to a rollout that is draft",
                                                 "warning"), "edit refused")  # fmt: skip
            assert app.screen is monitor
