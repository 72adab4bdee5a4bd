"""`edgefleet rollouts` and OperatorService.WatchFleet: the `--stage` parser
(table-driven, good and bad strings), the renderings on hand-made Rollout
messages, and end to end against an in-process control plane: dry run with
exclusions, create and start, show, pause, resume, conflict, abort --keep,
watch; and fleet events pushed to watchers (kinds filter, drop-oldest).

Builds are hand-made results over a real file (as in test_deployments.py);
devices are enrolled but run no agent, so a started rollout sits in its
first stage with its devices notified, which is what the actions need."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from edgefleet.controlplane.api import operator_servicer
from edgefleet.controlplane.api.operator_servicer import _event_text, _Mailbox
from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.rollouts import rollout_ended
from edgefleet.controlplane.client.format import format_pacing
from edgefleet.controlplane.client.stages import format_stage, parse_ramp, parse_stage
from edgefleet.controlplane.client.syntax import parse_iso_time
from edgefleet.controlplane.server import ControlPlane
from edgefleet.controlplane.services.events import EventBus, FleetEvent
from edgefleet.demo.models import BuiltModel
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import classes_and_digits, publish_one_build
from testkit.cli import NOW, text_of, ts
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import ADMIN, FleetWatch

# The module, not the click group of the same name that controlplane.cli exports.
rollouts_cli = importlib.import_module("edgefleet.controlplane.cli.rollouts")

ROLLOUT_ID = "r0110u7a" + "5" * 24
DEV_A, DEV_B, DEV_C = ("d" * 7 + "a") * 2, ("d" * 7 + "b") * 2, ("d" * 7 + "c") * 2


def squash(text: str) -> str:
    return " ".join(text.split())


def _seconds(s: float) -> Any:
    from google.protobuf.duration_pb2 import Duration

    out = Duration()
    out.FromTimedelta(timedelta(seconds=s))
    return out


# ------------------------------------------------------------------ --stage parser


def _gates(**fields: Any) -> o.HealthGates:
    return o.HealthGates(**fields)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100%", o.StageSpec(percent=100)),
        ("12.5%", o.StageSpec(percent=12.5)),
        ("5", o.StageSpec(count=5)),
        (" 5 , approve ", o.StageSpec(count=5, require_approval=True)),
        ("shadow:5,agreement=0.95", o.StageSpec(count=5, shadow=True, min_agreement=0.95)),
        ("SHADOW: 10%,agreement=95%", o.StageSpec(percent=10, shadow=True, min_agreement=0.95)),
        (
            "10%,stratified,success=100,errors=20/3,bake=5m,latency=1.5,error-rate=0.05,"
            "memory=1.0,silence=2m,approve,on-failure=abort",
            o.StageSpec(
                percent=10,
                stratified=True,
                success_threshold_percent=100,
                error_threshold_percent=20,
                min_finished_for_error_threshold=3,
                bake_time=_seconds(300),
                require_approval=True,
                on_failure=o.FAILURE_ACTION_ABORT_REVERT,
                gates=_gates(
                    latency_budget_factor=1.5,
                    max_error_rate=0.05,
                    memory_limit_factor=1.0,
                    max_silence=_seconds(120),
                ),
            ),
        ),
        ("50%,errors=10", o.StageSpec(percent=50, error_threshold_percent=10)),
        ("50%,errors=0/4", o.StageSpec(percent=50, min_finished_for_error_threshold=4)),
        (
            "1,name=canary,on-failure=pause",
            o.StageSpec(count=1, name="canary", on_failure=o.FAILURE_ACTION_PAUSE),
        ),
        (
            "20%,error-rate=5%,success=90%",
            o.StageSpec(
                percent=20, success_threshold_percent=90, gates=_gates(max_error_rate=0.05)
            ),
        ),
        ("1,bake=1h30m", o.StageSpec(count=1, bake_time=_seconds(5400))),
    ],
)
def test_parse_stage(text: str, expected: o.StageSpec) -> None:
    assert parse_stage(text) == expected


def test_parse_stage_leaves_defaults_to_the_server() -> None:
    # Unset: the server's defaults apply (success 100 %, min finished 1, pause).
    stage = parse_stage("10%")
    assert stage.success_threshold_percent == 0
    assert stage.min_finished_for_error_threshold == 0
    assert stage.on_failure == o.FAILURE_ACTION_UNSPECIFIED
    assert not stage.gates.HasField("max_error_rate")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty stage"),
        (",approve", "empty stage"),
        ("ten", "must be a percent of the cohort (10%) or a device count (5)"),
        ("0", "device count"),
        ("-3", "device count"),
        ("1.5", "device count"),
        ("0%", "size=0: must be within (0, 100]"),
        ("150%", "must be within (0, 100]"),
        ("x%", "size='x': not a number"),
        ("10%,fast", "unknown stage option 'fast'; known: agent-memory, agreement, approve"),
        ("10%,approve=yes", "approve takes no value"),
        ("10%,stratified,stratified", "gives stratified twice"),
        ("10%,,approve", "empty option (two commas?)"),
        ("10%,bake", "bake needs a value"),
        ("10%,bake=", "bake needs a value"),
        ("10%,bake=soon", "bake: 'soon' is not a duration"),
        ("10%,success=0", "success=0: must be within (0, 100]"),
        ("10%,success=101", "must be within (0, 100]"),
        ("10%,errors=20/0", "the minimum after / must be a count of at least 1"),
        ("10%,errors=20/x", "the minimum after / must be a count"),
        ("10%,errors=abc", "errors='abc': not a number"),
        ("10%,latency=0", "latency=0: must be a finite number more than 0"),
        ("10%,latency=nan", "must be a finite number"),
        ("10%,error-rate=2", "error-rate=2: must be within [0, 1]"),
        ("10%,error-rate=200%", "must be within [0, 100]"),
        ("10%,on-failure=explode", "write on-failure=pause or on-failure=abort"),
        ("10%,name=", "name needs a value"),
        ("shadow:5", "needs agreement=RATIO"),
        ("5,agreement=0.9", "agreement= applies to shadow stages only"),
        ("shadow:5,agreement=1.5", "agreement=1.5: must be within [0, 1]"),
    ],
)
def test_parse_stage_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_stage(text)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "100%",
        "5,approve",
        "shadow:5,agreement=0.95",
        "10%,name=canary,stratified,success=90,errors=20/3,bake=5m,latency=1.5,error-rate=0.05,"
        "memory=1,silence=2m,approve,on-failure=abort",
    ],
)
def test_format_stage_writes_what_parse_stage_reads(text: str) -> None:
    assert format_stage(parse_stage(text)) == text
    assert parse_stage(format_stage(parse_stage(text))) == parse_stage(text)


def test_parse_ramp_and_start_at() -> None:
    assert parse_ramp("10:2") == (10, 2.0)
    assert parse_ramp(" 1:1.5 ") == (1, 1.5)
    for bad in ("10", "0:2", "x:2", "10:0.5", "10:"):
        with pytest.raises(ValueError):
            parse_ramp(bad)
    assert parse_iso_time("2026-11-23T02:00Z") == datetime(2026, 11, 23, 2, tzinfo=UTC)
    assert parse_iso_time("2026-11-23 03:00+01:00") == datetime(2026, 11, 23, 2, tzinfo=UTC)
    assert parse_iso_time("2026-11-23T02:00") == datetime(2026, 11, 23, 2, tzinfo=UTC)
    with pytest.raises(ValueError, match="not an ISO 8601 time"):
        parse_iso_time("tomorrow")


# ------------------------------------------------------------------ rendering


def sample_rollout(**overrides: Any) -> o.Rollout:
    spec = o.RolloutSpec(
        model_name="digits",
        model_version="2.0.0",
        class_names=["pi", "gw"],
        label_selector={"site": "a"},
        stages=[
            parse_stage("1,name=canary,stratified,latency=1.5,error-rate=0.05,approve"),
            parse_stage("100%,errors=20/3"),
        ],
        pacing=o.Pacing(max_per_minute=60, device_timeout=_seconds(600), device_retries=2),
    )
    rollout = o.Rollout(
        id=ROLLOUT_ID,
        spec=spec,
        state=o.ROLLOUT_STATE_PAUSED,
        current_stage=0,
        reason="paused by admin: gate latency_p95 failed",
        stages=[
            o.StageStatus(
                index=0,
                name="canary",
                total=2,
                committed=1,
                failed=1,
                state="failed",
                phase=o.STAGE_PHASE_FAILED,
                gates=[
                    o.GateValue(name="latency_p95", value=45, limit=30),
                    o.GateValue(name="error_rate", value=0.01, limit=0.05, passing=True),
                    o.GateValue(name="silence", value=float("inf"), limit=120),
                ],
            ),
            o.StageStatus(
                index=1,
                total=4,
                in_progress=4,
                waiting=4,
                state="pending",
                phase=o.STAGE_PHASE_PENDING,
            ),
        ],
        devices=[
            o.RolloutDevice(
                device_id=DEV_A,
                device_name="pi-1",
                class_name="pi",
                stage=0,
                state=o.ROLLOUT_DEVICE_STATE_COMMITTED,
                attempts=1,
            ),
            o.RolloutDevice(
                device_id=DEV_B,
                device_name="gw-1",
                class_name="gw",
                stage=0,
                state=o.ROLLOUT_DEVICE_STATE_FAILED,
                attempts=3,
                reason="verify failed: bad signature",
            ),
        ],
        excluded=[
            o.ExcludedDevice(device_id=DEV_C, device_name="pi-9", reason="device is offline")
        ],
        created_at=ts(NOW - timedelta(minutes=5)),
        created_by="admin",
    )
    for key, value in overrides.items():
        setattr(rollout, key, value)
    return rollout


def test_rollouts_table() -> None:
    text = squash(text_of(render.rollouts_table([sample_rollout()], NOW)))
    assert "ID MODEL@VERSION STATE STAGE COMMITTED FAILED CREATED REASON" in text
    assert "r0110u7a digits@2.0.0 paused 1/2 canary" in text
    assert "1/6 1 5m ago paused by admin: gate latency_p95 failed" in text


def test_rollout_detail_shows_stages_gates_devices_and_reasons() -> None:
    text = text_of(render.rollout_detail(sample_rollout(), NOW))
    flat = squash(text)
    for expected in (
        f"id {ROLLOUT_ID}",
        "model digits@2.0.0",
        "cohort classes pi, gw; labels site=a",
        "state paused",
        "stage 1/2 canary",
        "reason paused by admin: gate latency_p95 failed",
        "pacing <= 60/min, device timeout 10m, 2 retries",
        "created 5m ago by admin",
        # Stage 1: progress bar, counts, gates against limits, the rules.
        "▶1 canary 1 failed ██████░░░░░░ 1/2, 1 failed",
        "latency_p95 45.00 ms > 30.00 ms FAIL",
        "error_rate 1.00% <= 5.00% ok",
        "silence never > 2m FAIL",
        "stratified,latency=1.5,error-rate=0.05,approve",
        "2 - 100% pending ░░░░░░░░░░░░ 0/4, 4 waiting - errors=20/3",
        # Two of the six (the stage totals) were sent: GetRolloutRequest.device_limit.
        "devices (6):",
        "pi-1 dddddd",
        "pi 1 committed 1",
        "gw-1 ddddddd",
        "gw 1 failed 3 verify failed: bad signature",
        "... and 4 more (edgefleet rollouts show)",
        "excluded (1):",
        "pi-9 dddddddc device is offline",
    ):
        assert expected in flat, expected


def test_rollout_detail_can_cut_the_device_list_keeping_failures() -> None:
    devices = [
        o.RolloutDevice(
            device_id=f"{i:08d}",
            device_name=f"ok-{i}",
            stage=1,
            state=o.ROLLOUT_DEVICE_STATE_COMMITTED,
        )
        for i in range(30)
    ] + [
        o.RolloutDevice(
            device_id="f" * 8, device_name="broken", stage=1, state=o.ROLLOUT_DEVICE_STATE_TIMED_OUT
        )
    ]
    rollout = sample_rollout()
    del rollout.devices[:]
    rollout.devices.extend(devices)
    text = text_of(render.rollout_detail(rollout, NOW, max_devices=5))
    assert "broken" in text and "ok-4" not in text.replace("ok-3 ", "")
    assert "... and 26 more" in text
    assert "ok-29" in text_of(render.rollout_detail(rollout, NOW))


def test_rollout_plan_lists_each_stage_and_the_excluded() -> None:
    spec = sample_rollout().spec
    planned = [
        o.RolloutDevice(device_id=DEV_A, device_name="pi-1", class_name="pi", stage=0),
        o.RolloutDevice(device_id=DEV_B, device_name="gw-1", class_name="gw", stage=1),
    ]
    excluded = [o.ExcludedDevice(device_id=DEV_C, device_name="pi-9", reason="device is pending")]
    text = squash(text_of(render.rollout_plan(spec, planned, excluded)))
    assert (
        "stage 1 (canary): 1,name=canary,stratified,latency=1.5,error-rate=0.05,approve "
        "-> 1 device(s) NAME ID CLASS pi-1 ddddddda pi"
    ) in text
    assert "stage 2: 100%,errors=20/3 -> 1 device(s) NAME ID CLASS gw-1 dddddddb gw" in text
    assert "excluded (1): NAME ID REASON pi-9 dddddddc device is pending" in text
    assert "dry run: 2 device(s) in 2 stage(s), 1 excluded; nothing was created" in text


def test_rollout_action_and_ended() -> None:
    rollout = sample_rollout()
    assert squash(text_of(render.rollout_action("paused", rollout))) == (
        "paused rollout r0110u7a (digits@2.0.0): now paused "
        "paused by admin: gate latency_p95 failed"
    )
    assert not rollout_ended(rollout)
    assert rollout_ended(sample_rollout(state=o.ROLLOUT_STATE_SUCCEEDED))
    # Aborted: ended once it finished putting its devices back, not before
    # (right after the abort none may be reverting yet).
    aborted = sample_rollout(state=o.ROLLOUT_STATE_ABORTED)
    assert not rollout_ended(aborted)
    aborted.finished_at.FromDatetime(NOW)
    assert rollout_ended(aborted)
    # Failed members wait for `rollouts retry`: nothing more happens alone.
    assert rollout_ended(sample_rollout(state=o.ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES))


def test_stage_phases_skips_and_promotions_render() -> None:
    rollout = sample_rollout(state=o.ROLLOUT_STATE_RUNNING, current_stage=1)
    rollout.stages[0].CopyFrom(o.StageStatus(
        index=0, name="canary", total=3, committed=1, failed=1, acknowledged_failed=1, skipped=1,
        state="promoted", phase=o.STAGE_PHASE_PROMOTED, promoted_by="alice",
    ))  # fmt: skip
    rollout.devices[1].state = o.ROLLOUT_DEVICE_STATE_SKIPPED
    rollout.devices.add(device_id=DEV_C, device_name="pi-9", stage=1,
                        state=o.ROLLOUT_DEVICE_STATE_REVERTING)  # fmt: skip
    flat = squash(text_of(render.rollout_detail(rollout, NOW)))
    promoted = "1 canary 1 promoted by alice ████░░░░░░░░ 1/3, 1 failed (1 acknowledged), 1 skipped"
    assert promoted in flat, flat
    assert "▶2 - 100% pending" in flat
    assert "gw 1 skipped 3" in flat and "pi-9 dddddddc - 2 reverting" in flat
    done = sample_rollout(state=o.ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES)
    listed = squash(text_of(render.rollouts_table([done], NOW)))
    assert "digits@2.0.0 succeeded-with-failures 1/2" in listed


def test_format_gate_without_data() -> None:
    empty = o.GateValue(name="latency_p95", passing=True)
    assert text_of(render.format_gate(empty)).strip() == "latency_p95 waiting for telemetry"
    # No device checked: 0 against 0, whatever the stage's error-rate limit.
    quiet = o.GateValue(name="error_rate", passing=True)
    five = parse_stage("100%,error-rate=0.05")
    assert text_of(render.format_gate(quiet, five)).strip() == "error_rate waiting for telemetry"
    assert text_of(render.format_gate(quiet)).strip() == "error_rate waiting for telemetry"
    # error-rate=0 and no errors: a real reading.
    zero = parse_stage("100%,error-rate=0")
    assert text_of(render.format_gate(quiet, zero)).strip() == "error_rate 0.00% <= 0.00% ok"


def test_rollouts_show_has_no_passing_gate_line_before_telemetry() -> None:
    rollout = sample_rollout(state=o.ROLLOUT_STATE_RUNNING)
    rollout.spec.stages[0].gates.max_error_rate = 0.05
    del rollout.stages[0].gates[:]
    rollout.stages[0].gates.add(name="error_rate", passing=True)
    rollout.stages[0].gates.add(name="latency_p95", passing=True)
    flat = squash(text_of(render.rollout_detail(rollout, NOW)))
    assert "error_rate waiting for telemetry" in flat
    assert "latency_p95 waiting for telemetry" in flat
    assert " ok" not in flat


def test_stage_counts_use_the_member_state_names() -> None:
    stage = o.StageStatus(index=0, total=6, committed=1, failed=1, in_progress=4, waiting=3)
    rollout = sample_rollout(state=o.ROLLOUT_STATE_RUNNING)
    rollout.stages[0].CopyFrom(stage)
    flat = squash(text_of(render.rollout_detail(rollout, NOW)))
    assert "1/6, 1 failed, 3 waiting, 1 installing" in flat
    assert "pending" not in render.rollout_line(rollout)
    # Never-notified members have one name: the state's own, as devices show it.
    waiting = o.RolloutDevice(state=o.ROLLOUT_DEVICE_STATE_WAITING)
    assert str(render.rollout_device_state(waiting)) == "waiting"


def test_rollout_line() -> None:
    line = render.rollout_line(sample_rollout())
    assert line == (
        "r0110u7a digits@2.0.0 paused, stage 1/2 canary failed: 1/2 committed, 1 failed;"
        " paused by admin: gate latency_p95 failed"
    )
    assert "\n" not in line


def test_format_pacing() -> None:
    ramp = o.Pacing(ramp_base_per_minute=10, ramp_factor=2, device_retries=1)
    assert format_pacing(ramp) == "ramp from 10/min, x2 each minute, 1 retry"
    assert format_pacing(o.Pacing()) == "unlimited, no device timeout, no retries"


def test_format_gate_agreement_reads_the_other_way() -> None:
    low = o.GateValue(name="agreement", value=0.9, limit=0.95)
    high = o.GateValue(name="agreement", value=0.99, limit=0.95, passing=True)
    assert text_of(render.format_gate(low)).strip() == "agreement 90.00% < 95.00% FAIL"
    assert text_of(render.format_gate(high)).strip() == "agreement 99.00% >= 95.00% ok"


# ------------------------------------------------------------------ usage errors


def _cli(*args: str, server: str = "127.0.0.1:1") -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(
        cli, ["--server", server, "--token", ADMIN_TOKEN, *args]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--class", "pi", "--stage", "10%,fast"], "unknown stage option 'fast'"),
        (["--class", "pi"], "Missing option '--stage'"),
        (["--stage", "100%"], "name the cohort with --class and/or --label"),
        (["--class", "pi", "--stage", "100%", "--dry-run", "--start"], "--dry-run only plans"),
        (
            ["--class", "pi", "--stage", "100%", "--start", "--start-at", "2030-01-01T00:00Z"],
            "--start starts it now, --start-at at a time: give one of them",
        ),
        (["--class", "pi", "--stage", "100%", "--ramp", "10"], "must look like BASE:FACTOR"),
        (["--class", "pi", "--stage", "100%", "--start-at", "soon"], "not an ISO 8601 time"),
        (["--class", "pi", "--stage", "100%", "--device-timeout", "x"], "not a duration"),
    ],
)
def test_create_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = _cli("rollouts", "create", "digits@1.0.0", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


# ------------------------------------------------------------------ end to end


@dataclass
class Fleet:
    cp: ControlPlane
    op: og.OperatorServiceStub
    channel: grpc.aio.Channel
    arm: list[str]  # accepted aarch64 devices: class arm, which has an artifact
    pending: str  # an aarch64 device still pending
    gpu: str  # an x86_64 device whose class has no build

    async def cli(self, *args: str) -> Result:
        """The CLI in a thread: the control plane runs on this loop."""
        return await asyncio.to_thread(_cli, *args, server=self.cp.address)

    async def ok(self, *args: str) -> str:
        result = await self.cli(*args)
        assert result.exit_code == 0, result.output
        return result.stdout


async def _enroll(
    fleet_op: og.OperatorServiceStub,
    channel: grpc.aio.Channel,
    hw: str,
    arch: str,
    policy: int = o.ENROLLMENT_POLICY_AUTO_ACCEPT,
) -> str:
    token = await fleet_op.CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name=hw, policy=policy, labels={"site": "a"}),
        metadata=ADMIN,
    )
    resp = await dg.DeviceServiceStub(channel).Enroll(
        d.EnrollRequest(
            enrollment_token=token.secret,
            hardware_id=hw,
            hardware=c.HardwareProfile(arch=arch),
            name=hw,
        )
    )
    return str(resp.device_id)


@pytest.fixture
async def fleet(server: ControlPlane, digits: BuiltModel) -> AsyncIterator[Fleet]:
    """Classes arm (with a published artifact of digits@1.0.0) and gpu (no
    build); three arm devices, one pending arm device, one gpu device. Just
    enrolled, so online (enrollment counts as seen) for a minute."""
    op, channel = await classes_and_digits(server, digits)
    try:
        await publish_one_build(server, digits)
        await op.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name="gpu",
                constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME),
                match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=["x86_64"])],
            ),
            metadata=ADMIN,
        )
        arm = [await _enroll(op, channel, f"arm-{i}", "aarch64") for i in range(3)]
        pending = await _enroll(op, channel, "arm-new", "aarch64", o.ENROLLMENT_POLICY_PENDING)
        gpu = await _enroll(op, channel, "gpu-1", "x86_64")
        yield Fleet(server, op, channel, arm, pending, gpu)
    finally:
        await channel.close()


async def test_create_warns_of_a_stage_left_empty_and_a_start_time_past(fleet: Fleet) -> None:
    # Three arm devices can take part: a first stage of 5 takes them all.
    create = ("rollouts", "create", "digits@1.0.0", "--class", "arm",
              "--stage", "5", "--stage", "100%")  # fmt: skip
    expected = (
        "warning: stage 2 has no device: the stages before it take the whole cohort "
        "(3 devices); make them smaller or drop it"
    )
    planned = await fleet.cli(*create, "--dry-run")
    assert planned.exit_code == 0, planned.output
    assert "stage 2: 100% -> 0 device(s)" in squash(planned.stdout)
    assert expected in squash(planned.stderr), planned.stderr
    # A start time past starts it now, and says so.
    created = await fleet.cli(*create, "--start-at", "2020-01-01T00:00Z", "--json")
    assert created.exit_code == 0, created.output
    assert json.loads(created.stdout)["state"] == "ROLLOUT_STATE_RUNNING"
    assert expected in squash(created.stderr), created.stderr
    assert "warning: --start-at 2020-01-01T00:00Z is past: it starts now" in created.stderr
    # Stages that fit say nothing.
    fitting = await fleet.cli("rollouts", "create", "digits@1.0.0", "--class", "arm",
                              "--stage", "1", "--stage", "100%", "--dry-run")  # fmt: skip
    assert fitting.exit_code == 0 and "warning" not in fitting.stderr, fitting.stderr


async def test_rollouts_cli_end_to_end(fleet: Fleet) -> None:
    create = (
        "rollouts",
        "create",
        "digits@1.0.0",
        "--class",
        "arm",
        "--class",
        "gpu",
        "--stage",
        "1,name=canary",
        "--stage",
        "100%,errors=50/2",
    )

    # Dry run: per stage the devices that land there; the excluded and why.
    out = squash(await fleet.ok(*create, "--dry-run"))
    assert "stage 1 (canary): 1,name=canary -> 1 device(s)" in out
    assert "stage 2: 100%,errors=50/2 -> 2 device(s)" in out
    assert "excluded (2):" in out
    assert "arm-new" in out and "device is pending" in out
    assert "gpu-1" in out and "no successful build of this version" in out
    assert "nothing was created" in out
    planned = json.loads(await fleet.ok(*create, "--dry-run", "--json"))
    assert sorted(p["device_id"] for p in planned["planned"]) == sorted(fleet.arm)
    assert [p["stage"] for p in planned["planned"]].count(0) == 1
    assert {e["device_id"] for e in planned["excluded"]} == {fleet.pending, fleet.gpu}
    assert (await fleet.ok("rollouts", "ls", "--json")) == "[]\n"

    # Create and start; show it running (by its short id).
    out = squash(await fleet.ok(*create, "--start", "--max-per-minute", "100"))
    assert "state running" in out and "pacing <= 100/min" in out
    listed = json.loads(await fleet.ok("rollouts", "ls", "--json"))
    (rollout_id,) = [r["id"] for r in listed]
    short = rollout_id[:8]
    out = squash(await fleet.ok("rollouts", "show", short))
    assert f"id {rollout_id}" in out and "state running" in out
    assert re.search(r"started (just now|\d+s ago) finished -", out), out
    assert "▶1 canary 1" in out
    # Why the others are not in it is kept with the rollout.
    assert "excluded (2):" in out and "device is pending" in out
    shown = json.loads(await fleet.ok("rollouts", "show", short, "--json"))
    assert {dev["device_id"] for dev in shown["devices"]} == set(fleet.arm)
    out = squash(await fleet.ok("rollouts", "ls", "--state", "running"))
    assert f"{short} digits@1.0.0 running 1/2 canary" in out
    assert (await fleet.ok("rollouts", "ls", "--state", "paused", "--json")) == "[]\n"

    # At most one active rollout per device: a second one is refused, naming them.
    result = await fleet.cli(*create, "--start")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: FAILED_PRECONDITION: 3 device(s) are already in")

    # Pause, resume, abort --keep.
    out = squash(await fleet.ok("rollouts", "pause", short, "--reason", "lunch"))
    assert out == (
        f"paused rollout {short} (digits@1.0.0): now paused paused by bootstrap-admin: lunch"
    )
    shown = json.loads(await fleet.ok("rollouts", "show", short, "--json"))
    assert shown["state"] == "ROLLOUT_STATE_PAUSED"
    out = squash(await fleet.ok("rollouts", "resume", short))
    assert out == f"resumed rollout {short} (digits@1.0.0): now running"
    result = await fleet.cli("rollouts", "approve", short)
    assert result.exit_code == 1
    assert "approve applies to a rollout that is waiting approval" in result.stderr
    out = squash(await fleet.ok("rollouts", "abort", short, "--keep", "--reason", "enough"))
    assert out.startswith(f"aborted rollout {short} (digits@1.0.0): now aborted aborted by")
    out = squash(await fleet.ok("rollouts", "show", short))
    assert "state aborted" in out and "reason aborted by bootstrap-admin: enough" in out
    # Aborted --keep needs no more work: finished now, a few seconds after its start.
    assert re.search(r"finished (just now|\d+s ago), after \d+s", out), out

    # An ended rollout: watch draws it once and returns.
    lines = (await fleet.ok("rollouts", "watch", short, "--json")).splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["state"] == "ROLLOUT_STATE_ABORTED"
    # Into a pipe (CliRunner is not a terminal): one plain line, then it returns.
    (line,) = (await fleet.ok("rollouts", "watch", short)).splitlines()
    assert re.fullmatch(rf"\d\d:\d\d:\d\dZ {short} digits@1\.0\.0 aborted, stage .*", line), line

    result = await fleet.cli("rollouts", "show", "nope")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: NOT_FOUND: no rollout with id 'nope'")


async def test_a_draft_starts_with_the_start_command(fleet: Fleet) -> None:
    out = await fleet.ok(
        "rollouts", "create", "digits@1.0.0", "--label", "site=a", "--stage", "100%", "--json"
    )
    draft = json.loads(out)
    assert draft["state"] == "ROLLOUT_STATE_DRAFT"
    assert {e["device_id"] for e in draft["excluded"]} == {fleet.pending, fleet.gpu}
    out = squash(await fleet.ok("rollouts", "start", draft["id"]))
    assert out == f"started rollout {draft['id'][:8]} (digits@1.0.0): now running"


async def test_pinning_to_a_class_without_a_build_warns(fleet: Fleet) -> None:
    device = fleet.arm[0]
    await fleet.ok("devices", "assign", "digits@1.0.0", device)
    # gpu has no build of digits@1.0.0: the pin is done, with a warning.
    result = await fleet.cli("devices", "pin", device, "gpu")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("pinned device arm-0")
    assert result.stderr == (
        "warning: class gpu has no successful build of digits@1.0.0, which this device is"
        " assigned: it cannot take it until one exists"
        " (edgefleet builds run digits@1.0.0 --class gpu)\n"
    )
    shown = json.loads(await fleet.ok("devices", "show", device, "--json"))
    assert shown["class_name"] == "gpu" and shown["class_pinned"] is True
    # arm has one: no warning.
    result = await fleet.cli("devices", "pin", device, "arm")
    assert result.exit_code == 0 and result.stderr == "", result.output
    # A device assigned nothing has nothing to warn about.
    result = await fleet.cli("devices", "pin", fleet.arm[1], "gpu")
    assert result.exit_code == 0 and result.stderr == "", result.output


async def _started_rollout(fleet: Fleet) -> str:
    """A running two-stage rollout of digits@1.0.0 over the arm class: its id."""
    created = await fleet.op.CreateRollout(
        o.CreateRolloutRequest(
            spec=o.RolloutSpec(
                model_name="digits", model_version="1.0.0", class_names=["arm"],
                stages=[parse_stage("1"), parse_stage("100%")],
            ),
            start=True,
        ),
        metadata=ADMIN,
    )  # fmt: skip
    return str(created.rollout.id)


async def _watched_run_pause_abort(fleet: Fleet, *options: str) -> Any:
    """`rollouts watch` (with `options`) of a rollout that runs, is paused,
    then aborted: the CLI's result, once it ended by itself."""
    rollout_id = await _started_rollout(fleet)
    # One CLI run at a time (CliRunner swaps sys.stdout): act through the API.
    watch = asyncio.ensure_future(fleet.cli("rollouts", "watch", rollout_id[:8], *options))
    await asyncio.sleep(1.0)
    await fleet.op.PauseRollout(o.RolloutActionRequest(id=rollout_id), metadata=ADMIN)
    await asyncio.sleep(1.0)
    assert not watch.done()
    await fleet.op.AbortRollout(o.AbortRolloutRequest(id=rollout_id), metadata=ADMIN)
    result = await asyncio.wait_for(watch, timeout=30)
    assert result.exit_code == 0, result.output
    return result


async def test_watch_follows_a_rollout_until_it_ends(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollouts_cli, "POLL_INTERVAL_S", 0.1)
    result = await _watched_run_pause_abort(fleet, "--json")
    states = [json.loads(line)["state"] for line in result.stdout.splitlines()]
    assert states[0] == "ROLLOUT_STATE_RUNNING" and states[-1] == "ROLLOUT_STATE_ABORTED"
    assert "ROLLOUT_STATE_PAUSED" in states
    assert len(states) == len(set(result.stdout.splitlines()))  # a line per change only


async def test_watch_into_a_pipe_prints_a_line_per_change(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollouts_cli, "POLL_INTERVAL_S", 0.1)
    result = await _watched_run_pause_abort(fleet)
    lines = result.stdout.splitlines()
    states = [line.split()[3].rstrip(",") for line in lines]
    assert states[0] == "running" and states[-1] == "aborted", lines
    assert "paused" in states
    assert "\x1b" not in result.stdout  # plain text: no live display, no colour
    bodies = [line.split(" ", 1)[1] for line in lines]
    assert all(a != b for a, b in itertools.pairwise(bodies))  # changes only


# ------------------------------------------------------------------ WatchFleet


def _bus(cp: ControlPlane) -> EventBus:
    # The bus is not part of ControlPlane's surface; the orchestrator holds it.
    assert cp.orchestrator is not None
    bus = cp.orchestrator._events
    assert isinstance(bus, EventBus)
    return bus


async def test_watch_fleet_pushes_rollout_updates_and_filters_kinds(fleet: Fleet) -> None:
    created = await fleet.op.CreateRollout(
        o.CreateRolloutRequest(
            spec=o.RolloutSpec(
                model_name="digits",
                model_version="1.0.0",
                class_names=["arm"],
                stages=[parse_stage("100%")],
            ),
            start=True,
        ),
        metadata=ADMIN,
    )
    rollout_id = created.rollout.id
    subscribers = len(_bus(fleet.cp)._subscribers)
    rollouts = await FleetWatch(fleet.op, "rollout.updated").ready()
    enrolled = await FleetWatch(fleet.op, "device.enrolled").ready()
    everything = await FleetWatch(fleet.op).ready()
    assert len(_bus(fleet.cp)._subscribers) == subscribers + 3

    await fleet.op.PauseRollout(
        o.RolloutActionRequest(id=rollout_id, reason="look"), metadata=ADMIN
    )
    while True:  # the orchestrator may announce its own steps first
        event = await rollouts.next()
        assert event.kind == "rollout.updated"
        assert event.WhichOneof("subject") == "rollout" and event.rollout.id == rollout_id
        assert not event.rollout.devices  # the summary, not every device
        assert event.at.ToDatetime(UTC) > datetime.now(UTC) - timedelta(minutes=1)
        if event.rollout.state == o.ROLLOUT_STATE_PAUSED:
            break
    assert event.rollout.reason == "paused by bootstrap-admin: look"
    assert [s.total for s in event.rollout.stages] == [3]

    device_id = await _enroll(fleet.op, fleet.channel, "late", "aarch64")
    # The first event this watcher gets is the enrollment: the rollout
    # events before it were filtered out.
    event = await enrolled.next()
    assert (event.kind, event.message) == ("device.enrolled", f"device {device_id}")
    kinds = {(await everything.next()).kind for _ in range(2)}
    assert "rollout.updated" in kinds

    for watch in (rollouts, enrolled, everything):
        watch.call.cancel()
    for _ in range(100):  # each stream unsubscribes as it ends
        if len(_bus(fleet.cp)._subscribers) == subscribers:
            break
        await asyncio.sleep(0.05)
    assert len(_bus(fleet.cp)._subscribers) == subscribers


async def test_a_slow_watcher_drops_the_oldest_events_and_is_told(
    server: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(operator_servicer, "WATCH_QUEUE_SIZE", 2)
    async with grpc.aio.insecure_channel(server.address) as channel:
        watch = await FleetWatch(og.OperatorServiceStub(channel), "test.event").ready()
        # Published on the bus's own loop, so delivered at once, faster than
        # the stream drains: two fit, three are dropped (the oldest).
        for i in range(5):
            _bus(server).publish(FleetEvent("test.event", subject=str(i)))
        alert = await watch.next()
        assert alert.kind == "alert" and "missed 3 event(s)" in alert.message
        assert [(await watch.next()).message for _ in range(2)] == ["3", "4"]


async def test_mailbox_filters_drops_oldest_and_counts() -> None:
    box = _Mailbox(frozenset({"a"}), 2)
    for i in range(4):
        box.offer(FleetEvent("a", subject=str(i)))
        box.offer(FleetEvent("b", subject="ignored"))
    _, event, dropped = await box.take()
    assert (event.subject, dropped) == ("2", 2)
    _, event, dropped = await box.take()
    assert (event.subject, dropped) == ("3", 0)


async def test_mailbox_queues_a_rollout_once_until_taken() -> None:
    box = _Mailbox(frozenset(), 10)
    for kind, subject in [("rollout.updated", "r1"), ("device.updated", ""),
                          ("rollout.updated", "r1"), ("rollout.updated", "r2")]:  # fmt: skip
        box.offer(FleetEvent(kind, subject=subject))
    taken = [(await box.take())[1] for _ in range(3)]
    assert [(e.kind, e.subject) for e in taken] == [
        ("rollout.updated", "r1"), ("device.updated", ""), ("rollout.updated", "r2"),
    ]  # fmt: skip
    box.offer(FleetEvent("rollout.updated", subject="r1"))  # taken since: queued again
    assert (await box.take())[1].subject == "r1"


def test_event_text() -> None:
    assert _event_text(FleetEvent("rollout.updated", subject="r1", message="pause")) == "r1: pause"
    assert _event_text(FleetEvent("device.enrolled", ("d1",))) == "device d1"
    many = tuple(f"d{i}" for i in range(25))
    text = _event_text(FleetEvent("device.assigned", many, subject="digits"))
    assert text.startswith("digits (devices d0, d1,") and text.endswith("d19 and 5 more)")
