"""`edgefleet rollouts retry|skip|promote|update` against an in-process
control plane with a simulated fleet (fleetsim) on the real device
protocol: digits 2.0.0 fails validation on every gateway, so a rollout
pauses on its failures and the operator remedies it from the CLI. Each
command's success and a refusal (one line, the server's status), and
`show`/`ls` rendering what remediation leaves (skipped members, a promoted
stage, a rollout that succeeded with failures); the pure edit helpers
(controlplane.client.rollout_edit) table-driven."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from click.testing import CliRunner, Result

from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.client.rollout_edit import (
    describe_changes,
    edit_spec,
    edit_stage,
    resolve_members,
)
from edgefleet.controlplane.client.stages import format_stage, parse_ramp, parse_stage
from edgefleet.controlplane.server import ControlPlane
from edgefleet.sim import Fleet, parse_profile
from edgefleet.v1 import operator_pb2 as o
from testkit.fleet import FAST, GW, PI, FleetSetup
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import ADMIN

pytestmark = pytest.mark.timeout(240)


def squash(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    ("stage", "changes", "expected"),
    [
        ("100%", {"errors": "20/3", "bake": "5m"}, "100%,errors=20/3,bake=5m"),
        ("1,latency=1.5,approve", {"latency": "off", "approve": "off"}, "1"),
        ("1", {"approve": "on", "on-failure": "abort"}, "1,approve,on-failure=abort"),
        ("1,bake=5m", {"bake": "0"}, "1"),
        ("shadow:5,agreement=0.9", {"agreement": "0.8"}, "shadow:5,agreement=0.8"),
        ("shadow:5,agreement=0.9", {"silence": "2m"}, "shadow:5,silence=2m,agreement=0.9"),
        # A stored default success (100 less the errors) follows the errors.
        ("10%,success=80,errors=20", {"errors": "50"}, "10%,errors=50"),
        ("10%,success=90,errors=20", {"errors": "50"}, "10%,success=90,errors=50"),
        ("10%,errors=20/3", {"success": "off"}, "10%,errors=20/3"),
    ],
)
def test_edit_stage(stage: str, changes: dict[str, str], expected: str) -> None:
    assert format_stage(edit_stage(parse_stage(stage), changes)) == expected


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"latency": "0"}, "stage 1: latency=0: must be a finite number more than 0"),
        ({"agreement": "0.5"}, "agreement= applies to shadow stages only"),
        ({"size": "3"}, "'size' cannot be changed; these can: success, errors"),
        ({"approve": "maybe"}, "approve=maybe: write on or off"),
        ({"bake": "5m,approve"}, "one value, no commas"),
    ],
)
def test_edit_spec_rejects(changes: dict[str, str], message: str) -> None:
    spec = o.RolloutSpec(stages=[parse_stage("1"), parse_stage("100%")])
    with pytest.raises(ValueError, match=None) as info:
        edit_spec(spec, stage_changes=changes)
    assert message in str(info.value)
    with pytest.raises(ValueError, match="there is no stage 3: the rollout has 2"):
        edit_spec(spec, stage=3, stage_changes={"bake": "1m"})
    with pytest.raises(ValueError, match="retries=x: a count"):
        edit_spec(spec, pacing_changes={"retries": "x"})


def test_edit_spec_changes_one_stage_and_pacing_and_says_what() -> None:
    spec = o.RolloutSpec(stages=[parse_stage("1,name=canary"), parse_stage("100%")])
    new = edit_spec(spec, stage=2, stage_changes={"errors": "20/3"},
                    pacing_changes={"max-per-minute": "30", "ramp": "5:2",
                                    "device-timeout": "10m"})  # fmt: skip
    assert new.stages[0] == spec.stages[0]
    assert describe_changes(spec, new) == [
        "stage 2: 100% -> 100%,errors=20/3",
        "pacing: unlimited, no device timeout, no retries -> <= 30/min, ramp from 5/min, "
        "x2 each minute, device timeout 10m",
    ]
    back = edit_spec(new, pacing_changes={"ramp": "off", "device-timeout": "off"})
    assert (back.pacing.ramp_base_per_minute, back.pacing.HasField("device_timeout")) == (0, False)


def test_resolve_members_by_id_short_id_or_name() -> None:
    members = [o.RolloutDevice(device_id="ab12" * 4, device_name="pi-1"),
               o.RolloutDevice(device_id="ab34" * 4, device_name="pi-2"),
               o.RolloutDevice(device_id="cd56" * 4, device_name="pi-2")]  # fmt: skip
    assert resolve_members(["pi-1", "ab34", "cd56" * 4, "pi-1"], members) == [
        "ab12" * 4, "ab34" * 4, "cd56" * 4,
    ]  # fmt: skip
    assert resolve_members(["nope"], members) == ["nope"]  # the server says NOT_FOUND
    with pytest.raises(ValueError, match="'pi-2' is ambiguous"):
        resolve_members(["pi-2"], members)
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_members(["ab"], members)


def test_resolve_members_refuses_an_empty_text_and_lists_few_candidates() -> None:
    members = [o.RolloutDevice(device_id=f"ab{i:02d}" + "0" * 12, device_name="pi")
               for i in range(8)]  # fmt: skip
    # "" starts every id: not "ambiguous among them all", but refused as empty.
    for empty in ("", " "):
        with pytest.raises(ValueError, match=r"^a device id or name must not be empty$"):
            resolve_members([empty], members)
    with pytest.raises(ValueError) as by_name:
        resolve_members(["pi"], members)
    assert str(by_name.value) == (
        "device name 'pi' is ambiguous in this rollout: use one of its ids: "
        "ab00000000000000, ab01000000000000, ab02000000000000, ab03000000000000, "
        "ab04000000000000 and 3 more"
    )
    with pytest.raises(ValueError) as by_prefix:
        resolve_members(["ab0"], members)
    assert str(by_prefix.value).endswith("ab04000000000000 and 3 more")
    assert str(by_prefix.value).startswith("device id 'ab0' is ambiguous in this rollout: ")
    with pytest.raises(ValueError) as five:
        resolve_members(["pi"], members[:5])
    assert "more" not in str(five.value) and "ab04000000000000" in str(five.value)


@pytest.mark.parametrize(
    ("parse", "message"),
    [
        # No upper bound: "within [1, inf]" read as if infinity were allowed.
        (lambda: parse_ramp("1:inf"), "factor=inf: must be a finite number of at least 1"),
        (lambda: parse_ramp("1:0.5"), "factor=0.5: must be a finite number of at least 1"),
        (lambda: parse_stage("1,memory=inf"), "memory=inf: must be a finite number more than 0"),
        (lambda: parse_stage("1,agent-memory=-1"),
         "agent-memory=-1: must be a finite number of at least 0"),
        # A bounded range still reads as one.
        (lambda: parse_stage("1,success=0"), "success=0: must be within (0, 100]"),
    ],
)  # fmt: skip
def test_number_ranges_read_right(parse: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse()
    assert str(info.value) == message


# ------------------------------------------------------------------ against a server


def _cli(server: str, *args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(
        cli, ["--server", server, "--token", ADMIN_TOKEN, *args]
    )


@dataclass
class World:
    cp: ControlPlane
    setup: FleetSetup
    fleet: Fleet

    async def cli(self, *args: str) -> Result:
        """The CLI in a thread: the control plane runs on this loop."""
        return await asyncio.to_thread(_cli, self.cp.address, *args)

    async def ok(self, *args: str) -> str:
        result = await self.cli(*args)
        assert result.exit_code == 0, result.output
        return result.stdout

    async def refused(self, *args: str) -> str:
        """A refusal: exit 1 and one line on stderr, no traceback."""
        result = await self.cli(*args)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.output
        return result.stderr

    async def get(self, rollout_id: str) -> o.Rollout:
        return await self.setup.op.GetRollout(o.GetRolloutRequest(id=rollout_id), metadata=ADMIN)

    async def wait(self, rollout_id: str, done: Callable[[o.Rollout], bool]) -> o.Rollout:
        for _ in range(600):
            rollout = await self.get(rollout_id)
            if done(rollout):
                return rollout
            await asyncio.sleep(0.1)
        raise AssertionError(f"rollout did not get there: {rollout}")

    async def create(self, *stages: str, start: bool = True) -> str:
        request = o.CreateRolloutRequest(
            spec=o.RolloutSpec(model_name="digits", model_version="2.0.0",
                               class_names=["pi", "gw"],
                               stages=[parse_stage(s) for s in stages]),
            start=start,
        )  # fmt: skip
        return str((await self.setup.op.CreateRollout(request, metadata=ADMIN)).rollout.id)

    def name(self, rollout: o.Rollout, state: int, class_name: str) -> str:
        return next(d.device_name for d in rollout.devices
                    if d.state == state and d.class_name == class_name)  # fmt: skip


def _state(state: int) -> Callable[[o.Rollout], bool]:
    return lambda r: r.state == state


@pytest.fixture
async def world(server: ControlPlane, fleet_setup: FleetSetup) -> AsyncIterator[World]:
    """Two Pis and two gateways on digits 1.0.0; 2.0.0 fails validation on
    every gateway."""
    profile = parse_profile({
        "heartbeat_interval_s": 1, "telemetry_interval_s": 0.5,
        "classes": [
            {"name": "pi", "count": 2, "hardware": PI, **FAST},
            {"name": "gw", "count": 2, "hardware": GW, **FAST,
             "versions": {"2.0.0": {"fail_rate": 1.0, "fail_state": "validating"}}},
        ],
    })  # fmt: skip
    async with Fleet(server.address, fleet_setup.token, profile, n=4, prefix="fix", seed=1,
                     heartbeat_interval_s=1, telemetry_interval_s=0.5) as fleet:  # fmt: skip
        ids = [a.device_id for a in fleet.agents]
        await fleet_setup.op.AssignModel(
            o.AssignModelRequest(device_ids=ids, model_name="digits", model_version="1.0.0"),
            metadata=ADMIN,
        )
        await fleet.wait_until(lambda f: all(a.active_version == "1.0.0" for a in f.agents), 30,
                               what="every agent on 1.0.0")  # fmt: skip
        yield World(server, fleet_setup, fleet)


async def test_retry_skip_and_promote_remedy_a_paused_rollout(world: World) -> None:
    rollout_id = await world.create("2,stratified", "100%,errors=50")
    short = rollout_id[:8]
    paused = await world.wait(rollout_id, _state(o.ROLLOUT_STATE_PAUSED))
    bad = world.name(paused, o.ROLLOUT_DEVICE_STATE_FAILED, "gw")
    good = world.name(paused, o.ROLLOUT_DEVICE_STATE_COMMITTED, "pi")
    out = squash(await world.ok("rollouts", "show", short))
    assert "▶1 - 2 failed" in out and "1 failed" in out, out

    # Retry: by device name; a committed member is refused, naming it.
    err = await world.refused("rollouts", "retry", short, good)
    assert err.startswith("error: FAILED_PRECONDITION: only failed, rejected or timed-out")
    assert f"{good}" not in err and "(committed)" in err
    out = squash(await world.ok("rollouts", "retry", short, bad, "--reason", "new cable"))
    assert out.startswith(f"retried 1 device(s) of rollout {short} (digits@2.0.0): now running")
    shown = await world.get(rollout_id)
    (retried,) = [d for d in shown.devices if d.device_name == bad]
    assert retried.state != o.ROLLOUT_DEVICE_STATE_FAILED or "golden" in retried.reason
    # 2.0.0 still fails there: paused again.
    await world.wait(
        rollout_id,
        lambda r: (
            r.state == o.ROLLOUT_STATE_PAUSED
            and any(
                d.device_name == bad and d.state == o.ROLLOUT_DEVICE_STATE_FAILED for d in r.devices
            )
        ),
    )

    # Skip: a reason is required (usage error before any call); a committed
    # member is refused; the failed one is skipped.
    result = await world.cli("rollouts", "skip", short, bad)
    assert result.exit_code == 2 and "Missing option '--reason'" in result.stderr
    err = await world.refused("rollouts", "skip", short, good, "--reason", "x")
    assert err.startswith("error: FAILED_PRECONDITION: ") and "(committed)" in err
    err = await world.refused("rollouts", "skip", short, "no-such-device", "--reason", "x")
    assert err.startswith("error: NOT_FOUND: not in rollout")
    # An empty device is refused as such, before any call (not "ambiguous").
    for args in (("skip", short, "", "--reason", "x"), ("retry", short, bad, " ")):
        result = await world.cli("rollouts", *args)
        assert result.exit_code == 2, result.output
        assert "a device id or name must not be empty" in result.stderr
        assert "ambiguous" not in result.stderr
    out = squash(await world.ok("rollouts", "skip", short, bad, "--reason", "bad board"))
    assert out.startswith(f"skipped 1 device(s) of rollout {short} (digits@2.0.0): now paused")
    out = squash(await world.ok("rollouts", "show", short))
    assert "1 skipped" in out and "skipped by bootstrap-admin: bad board" in out, out

    # Promote: the stage passes now; the second stage tolerates half failing,
    # so the rollout ends succeeded with failures (the other gateway).
    # --stage names the stage meant (from 1): another is refused, nothing done.
    err = await world.refused("rollouts", "promote", short, "--stage", "2")
    assert err.startswith(f"error: FAILED_PRECONDITION: rollout {rollout_id} is at stage 1, "
                          "not stage 2")  # fmt: skip
    assert (await world.get(rollout_id)).current_stage == 0
    out = squash(await world.ok("rollouts", "promote", short, "--stage", "1", "--reason",
                                "pis are fine"))  # fmt: skip
    assert out.startswith(f"promoted stage 1 of rollout {short} (digits@2.0.0): now running")
    # The same command again passes no second stage.
    err = await world.refused("rollouts", "promote", short, "--stage", "1")
    assert "is at stage 2, not stage 1" in err
    done = await world.wait(rollout_id, _state(o.ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES))
    assert done.stages[0].phase == o.STAGE_PHASE_PROMOTED
    assert done.stages[0].promoted_by == "bootstrap-admin"
    out = squash(await world.ok("rollouts", "show", short))
    assert "state succeeded-with-failures" in out
    assert "1 - 2 promoted by bootstrap-admin ██████░░░░░░ 1/2, 1 skipped" in out, out
    out = squash(await world.ok("rollouts", "ls"))
    assert f"{short} digits@2.0.0 succeeded-with-failures" in out
    listed = json.loads(await world.ok("rollouts", "ls", "--state", "succeeded-with-failures",
                                       "--json"))  # fmt: skip
    assert [r["id"] for r in listed] == [rollout_id]
    # Nothing is left to promote; `watch` sees an ended rollout and returns.
    err = await world.refused("rollouts", "promote", short)
    assert err.startswith(f"error: FAILED_PRECONDITION: rollout {rollout_id} is succeeded with")
    assert "succeeded-with-failures" in squash(await world.ok("rollouts", "watch", short))

    # Retry every failed member: the rollout runs again (and fails the same way).
    out = squash(await world.ok("rollouts", "retry", short))
    assert out.startswith(f"retried the failed devices of rollout {short} (digits@2.0.0): now")
    assert "running" in out
    await world.wait(rollout_id, _state(o.ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES))
    # A skipped member is not retried; an unknown rollout is NOT_FOUND.
    err = await world.refused("rollouts", "retry", "nope")
    assert err.startswith("error: NOT_FOUND: no rollout with id 'nope'")


async def test_approve_names_the_stage_it_passes(world: World) -> None:
    request = o.CreateRolloutRequest(
        spec=o.RolloutSpec(model_name="digits", model_version="2.0.0", class_names=["pi"],
                           stages=[parse_stage("1,approve"), parse_stage("100%")]),
        start=True,
    )  # fmt: skip
    rollout_id = (await world.setup.op.CreateRollout(request, metadata=ADMIN)).rollout.id
    short = rollout_id[:8]
    await world.wait(rollout_id, _state(o.ROLLOUT_STATE_WAITING_APPROVAL))
    err = await world.refused("rollouts", "approve", short, "--stage", "2")
    assert err.startswith(f"error: FAILED_PRECONDITION: rollout {rollout_id} is at stage 1, "
                          "not stage 2")  # fmt: skip
    out = squash(await world.ok("rollouts", "approve", short, "--stage", "1"))
    assert out.startswith(f"approved stage 1 of rollout {short} (digits@2.0.0): now "), out
    # A repeated approve (a retried script) passes no second stage.
    err = await world.refused("rollouts", "approve", short, "--stage", "1")
    assert "is at stage 2, not stage 1" in err
    result = await world.cli("rollouts", "approve", short, "--stage", "0")
    assert result.exit_code == 2
    await world.wait(rollout_id, _state(o.ROLLOUT_STATE_SUCCEEDED))


async def test_update_changes_only_what_was_given(world: World) -> None:
    rollout_id = await world.create("1,name=canary,approve", "100%", start=False)
    short = rollout_id[:8]
    out = await world.ok("rollouts", "update", short, "--stage", "2", "--errors", "20/3",
                         "--bake", "5m", "--max-per-minute", "50", "--reason", "tune")  # fmt: skip
    assert squash(out).startswith(f"updated rollout {short} (digits@2.0.0): now draft")
    # What the server stored: the default success threshold follows the errors.
    assert "stage 2: 100% -> 100%,success=80,errors=20/3,bake=5m" in out
    assert "pacing: unlimited, no device timeout, no retries -> <= 50/min" in out
    spec = (await world.get(rollout_id)).spec
    assert format_stage(spec.stages[0]) == "1,name=canary,approve"  # not given: unchanged
    assert (spec.stages[1].error_threshold_percent, spec.stages[1].bake_time.seconds) == (20, 300)
    assert spec.pacing.max_per_minute == 50
    out = await world.ok("rollouts", "update", short, "--no-approve", "--json")
    assert not any(s.get("require_approval") for s in json.loads(out)["spec"]["stages"])

    # Refusals: the same again (INVALID_ARGUMENT from the server), input that
    # does not parse (a usage error), a stage that is not there, nothing to
    # change, an ended rollout (FAILED_PRECONDITION), an unknown one.
    err = await world.refused("rollouts", "update", short, "--max-per-minute", "50")
    assert err.startswith("error: INVALID_ARGUMENT: the spec is the rollout's already")
    # Past the wire's uint32: protobuf's bare "Value out of range" before.
    too_many = "max-per-minute=99999999999: a count from 0 to 4,294,967,295"
    for args, message in ((["--latency", "0"], "latency=0: must be a finite number more than 0"),
                          (["--ramp", "1:inf"], "factor=inf: must be a finite number of at least"),
                          (["--stage", "3", "--bake", "1m"], "there is no stage 3"),
                          ([], "say what to change"),
                          (["--stage", "1", "--retries", "2"], "leave out --stage"),
                          (["--max-per-minute", "99999999999"], too_many)):  # fmt: skip
        result = await world.cli("rollouts", "update", short, *args)
        assert result.exit_code == 2 and message in result.stderr, result.output
    # create's count options too: a usage error naming the range, no traceback.
    result = await world.cli("rollouts", "create", "digits@2.0.0", "--class", "pi", "--stage",
                             "100%", "--max-per-minute", "99999999999", "--dry-run")  # fmt: skip
    assert result.exit_code == 2 and "0<=x<=4294967295" in result.stderr, result.output
    await world.setup.op.AbortRollout(o.AbortRolloutRequest(id=rollout_id), metadata=ADMIN)
    err = await world.refused("rollouts", "update", short, "--bake", "1m")
    assert err.startswith(f"error: FAILED_PRECONDITION: rollout {rollout_id} is aborted")
    err = await world.refused("rollouts", "update", "nope", "--bake", "1m")
    assert err.startswith("error: NOT_FOUND")
