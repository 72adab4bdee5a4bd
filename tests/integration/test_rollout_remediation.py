"""The rollout engine's operator scenarios end to end (issue 21): a real
control plane in process (SQLite; the field scenario and skip on PostgreSQL
too) and
simulated agents (fleetsim) speaking the real device protocol.

- a stage that meets its threshold advances, yet every member is still
  notified and the rollout ends only when every member settled;
- resume acknowledges the failures so far; the error threshold counts the
  later ones only;
- retry, skip, promote and update, with what each refuses.

Which device fails is chosen after the rollout is planned: a draft lists its
members in the order the orchestrator notifies them (by stage, then device
id), and the chosen agents are switched to a profile class whose installs of
the new version fail (or take a minute). The switch is the simulated device
being broken, or fixed, between attempts; its hardware stays a Pi's.

The harness (World, the fixtures) is copied from test_rollouts.py, with a
draft-then-start step and audit look-ups added."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import update

from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.db.models import DeviceRow, RolloutDeviceRow, RolloutRow, utcnow
from edgefleet.controlplane.domain import rollout_plan
from edgefleet.controlplane.domain.rollout_states import MemberState
from edgefleet.controlplane.server import ControlPlane, create_server
from edgefleet.controlplane.services.events import EventBus
from edgefleet.controlplane.services.orchestrator import Orchestrator, _Applier
from edgefleet.demo.models import BuiltModel, build_digits_classifier
from edgefleet.sim import Fleet, FleetProfile, SimAgent, parse_profile
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import finish_builds_by_hand
from testkit.harness import ADMIN_TOKEN
from testkit.models import model_parts, push_requests
from testkit.rpc import ADMIN, status_of

pytestmark = pytest.mark.timeout(120)

MODEL = "digits"
OLD, NEW = "1.0.0", "2.0.0"
PI = "pi"
# Profile classes an agent is switched to: the same Pi, whose installs of NEW
# fail (golden outputs out of tolerance), or take a minute, or whose installs
# of OLD fail (a revert that cannot succeed).
BROKEN, SLOW, NO_WAY_BACK = "pi-broken", "pi-slow", "pi-no-way-back"
# The admin token's name: the actor of its actions.
ACTOR = "bootstrap-admin"

UNSETTLED = (
    o.ROLLOUT_DEVICE_STATE_WAITING, o.ROLLOUT_DEVICE_STATE_NOTIFIED,
    o.ROLLOUT_DEVICE_STATE_IN_PROGRESS,
)  # fmt: skip
FINISHED = (
    o.ROLLOUT_STATE_SUCCEEDED, o.ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES, o.ROLLOUT_STATE_ABORTED,
)  # fmt: skip
# One device notified a second: the order of the members' installs is the
# order of their notifications.
ONE_PER_SECOND = o.Pacing(max_per_minute=60)


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite; PostgreSQL too where a test is marked `both_databases`."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return f"sqlite:///{tmp_path / 'edgefleet.db'}"
    return str(request.getfixturevalue("pg_url"))


both_databases = pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> BuiltModel:
    return build_digits_classifier(tmp_path_factory.mktemp("digits"))


@pytest.fixture
async def cp(tmp_path: Path, db_url: str) -> AsyncIterator[ControlPlane]:
    server = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN,
            build_workers=0, db_url=db_url, heartbeat_interval_s=1, telemetry_interval_s=1,
            rollout_tick_s=0.2,
        )
    )  # fmt: skip
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


def _profile() -> FleetProfile:
    """Every device a Pi that installs quickly; BROKEN, SLOW and NO_WAY_BACK
    have no devices of their own (count 0): agents are switched to them."""
    pi: dict[str, Any] = {
        "hardware": {"arch": "aarch64"}, "install_s": [0.05, 0.2], "latency_p95_ms": 10,
        "error_rate": 0.0,
    }  # fmt: skip
    return parse_profile({
        "heartbeat_interval_s": 1, "telemetry_interval_s": 0.5,
        "classes": [
            {"name": PI, **pi},
            {"name": BROKEN, "count": 0, **pi,
             "versions": {NEW: {"fail_rate": 1.0, "fail_state": "validating"}}},
            {"name": SLOW, "count": 0, **pi, "versions": {NEW: {"install_s": [60, 60]}}},
            {"name": NO_WAY_BACK, "count": 0, **pi,
             "versions": {OLD: {"fail_rate": 1.0, "fail_state": "validating"}}},
        ],
    })  # fmt: skip


@dataclass
class World:
    cp: ControlPlane
    op: og.OperatorServiceAsyncStub
    channel: grpc.aio.Channel
    token: str

    async def create(self, *stages: o.StageSpec, start: bool = False, **spec: Any) -> o.Rollout:
        """NEW to the Pis: a draft (its members planned, nobody notified)
        unless `start`."""
        request = o.CreateRolloutRequest(
            spec=o.RolloutSpec(model_name=MODEL, model_version=spec.pop("version", NEW),
                               class_names=[PI], stages=stages, **spec),
            start=start,
        )  # fmt: skip
        return (await self.op.CreateRollout(request, metadata=ADMIN)).rollout

    async def start(self, rollout_id: str) -> o.Rollout:
        return await self.op.StartRollout(o.RolloutActionRequest(id=rollout_id), metadata=ADMIN)

    async def resume(self, rollout_id: str) -> o.Rollout:
        return await self.op.ResumeRollout(o.RolloutActionRequest(id=rollout_id), metadata=ADMIN)

    async def get(self, rollout_id: str) -> o.Rollout:
        return await self.op.GetRollout(o.GetRolloutRequest(id=rollout_id), metadata=ADMIN)

    async def wait(
        self, rollout_id: str, done: Callable[[o.Rollout], bool], within_s: float = 30
    ) -> o.Rollout:
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            rollout = await self.get(rollout_id)
            if done(rollout):
                return rollout
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"rollout did not get there: {rollout}")
            await asyncio.sleep(0.1)

    async def assign_all(self, fleet: Fleet, version: str) -> None:
        ids = [a.device_id for a in fleet.agents]
        await self.op.AssignModel(
            o.AssignModelRequest(device_ids=ids, model_name=MODEL, model_version=version),
            metadata=ADMIN,
        )
        await fleet.wait_until(
            lambda f: all(a.active_version == version for a in f.agents), 30,
            what=f"every agent on {version}",
        )  # fmt: skip

    async def audit(self, rollout_id: str, action: str) -> list[tuple[str, dict[str, Any]]]:
        """The rollout's audit entries of `action`: (actor, details), newest first."""
        listed = await self.op.ListAuditLog(
            o.ListAuditLogRequest(action=action, target=f"rollout:{rollout_id}"), metadata=ADMIN
        )
        return [(e.actor, json.loads(e.details or "{}")) for e in listed.entries]


@pytest.fixture
async def world(cp: ControlPlane, digits: BuiltModel) -> AsyncIterator[World]:
    channel = grpc.aio.insecure_channel(cp.address)
    op: og.OperatorServiceAsyncStub = og.OperatorServiceStub(channel)
    await op.CreateDeviceClass(
        o.CreateDeviceClassRequest(
            name=PI,
            constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME,
                                            latency_budget_p95_ms=30.0),
            match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=["aarch64"])],
        ),
        metadata=ADMIN,
    )  # fmt: skip
    parts = model_parts(model=digits.model, sample_data=digits.sample_data)
    for version in (OLD, NEW, "3.0.0"):
        await op.PushModel(push_requests(MODEL, version, parts), metadata=ADMIN)
    # One real job: the versions share their bytes, so the others reuse its result.
    await finish_builds_by_hand(cp, op, digits.model, 3)
    token = (await op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="sim"),
                                            metadata=ADMIN)).secret  # fmt: skip
    try:
        yield World(cp, op, channel, token)
    finally:
        await channel.close(None)


def _fleet(world: World, n: int, notified: dict[str, dt.datetime] | None = None) -> Fleet:
    """`n` Pis; `notified` gets, per device id, when the agent first saw an
    assignment of NEW."""

    def on_desired(agent: SimAgent, desired: d.DesiredState) -> None:
        if notified is not None and any(a.model_version == NEW for a in desired.assignments):
            notified.setdefault(agent.device_id, dt.datetime.now(dt.UTC))

    return Fleet(world.cp.address, world.token, _profile(), n=n, prefix="sim", seed=1,
                 heartbeat_interval_s=1, telemetry_interval_s=0.5,
                 on_desired=on_desired)  # fmt: skip


def _stage(size: float | int, **kw: Any) -> o.StageSpec:
    stage = o.StageSpec(**kw)
    if isinstance(size, float):
        stage.percent = size
    else:
        stage.count = size
    return stage


def _timestamp(at: dt.datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(at)
    return out


def _seconds(s: float) -> Duration:
    out = Duration()
    out.FromMilliseconds(int(s * 1000))
    return out


def _order(rollout: o.Rollout) -> list[str]:
    """The members' device ids in the order they are notified."""
    return [m.device_id for m in sorted(rollout.devices, key=lambda m: (m.stage, m.device_id))]


def _members(rollout: o.Rollout) -> dict[str, o.RolloutDevice]:
    return {m.device_id: m for m in rollout.devices}


def _agent(fleet: Fleet, device_id: str) -> SimAgent:
    (agent,) = [a for a in fleet.agents if a.device_id == device_id]
    return agent


def _switch(fleet: Fleet, device_id: str, class_name: str) -> None:
    """The device behaves as `class_name` from its next install on."""
    _agent(fleet, device_id).profile_class = fleet.profile.class_named(class_name)


def _finished(rollout: o.Rollout) -> bool:
    return rollout.state in FINISHED


def _paused(rollout: o.Rollout) -> bool:
    return rollout.state == o.ROLLOUT_STATE_PAUSED


def _states(rollout: o.Rollout) -> dict[str, str]:
    """Device id -> member state's short name (for assertion messages)."""
    return {
        m.device_id: o.RolloutDeviceState.Name(m.state).removeprefix("ROLLOUT_DEVICE_STATE_")
        for m in rollout.devices
    }


# ---------------------------------------------------------------- thresholds


# On both databases ("succeeded_with_failures" is 23 characters: the state
# column is 32 since migration 0012; SQLite does not check lengths).
_ENDS_WITH_FAILURES_ON_BOTH = pytest.mark.parametrize(
    "db_url", ["sqlite", "postgresql"], indirect=True
)


@_ENDS_WITH_FAILURES_ON_BOTH
async def test_a_stage_meeting_its_threshold_advances_and_every_member_is_still_notified(
    world: World,
) -> None:
    """The field report: success threshold 80 %, pacing 30 a minute, some
    devices failing. The old engine ended SUCCEEDED with members never
    notified; now each stage passes at its threshold while its last member
    still waits, that member is notified all the same, and the rollout ends
    once every member settled, with the failures counted."""
    notified: dict[str, dt.datetime] = {}
    rule: dict[str, Any] = {"error_threshold_percent": 20, "min_finished_for_error_threshold": 5}
    async with _fleet(world, 7, notified) as fleet:
        await world.assign_all(fleet, OLD)
        draft = await world.create(
            _stage(2, success_threshold_percent=50, **rule),
            _stage(100.0, success_threshold_percent=80, **rule),
            pacing=o.Pacing(max_per_minute=30),
        )
        order = _order(draft)
        assert sorted(m.stage for m in draft.devices) == [0] * 2 + [1] * 5
        # The last of each stage fails: the stage has met its threshold (1 of
        # 2, 4 of 5) 2 s before that member is notified.
        lasts = {0: order[1], 1: order[6]}
        failing = set(lasts.values())
        for device_id in failing:
            _switch(fleet, device_id, BROKEN)
        await world.start(draft.id)
        done = await world.wait(draft.id, _finished, within_s=20)
        members = _members(done)
        assert done.state == o.ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES, (done.reason, _states(done))
        assert not [m for m in done.devices if m.state in UNSETTLED], _states(done)
        assert _states(done) == {i: "FAILED" if i in failing else "COMMITTED" for i in order}
        assert all("golden outputs" in members[i].reason for i in failing), _states(done)
        assert "5 committed" in done.reason and "2 failed" in done.reason, done.reason
        assert all(m.attempts == 1 for m in done.devices)
        assert set(notified) == set(order)
        # Each stage passed (started baking) before its last member was
        # notified; the rollout finished after every member was.
        for index, last in lasts.items():
            stage = done.stages[index]
            assert stage.phase == o.STAGE_PHASE_PASSED and stage.failed == 1
            assert stage.bake_started_at.ToDatetime(tzinfo=dt.UTC) < notified[last]
        assert done.finished_at.ToDatetime(tzinfo=dt.UTC) > max(notified.values())
        for agent in fleet.agents:
            expected = OLD if agent.device_id in failing else NEW
            assert agent.active_version == expected, (agent.name, agent.update_state)


async def test_resume_acknowledges_the_failures_so_far_and_judges_only_later_ones(
    world: World,
) -> None:
    """Every member must commit, no failure tolerated (the defaults). The
    first failure pauses; resume acknowledges it (out of the denominator,
    out of the error threshold), so it does not pause the stage again; a
    new failure does, counted since the resume; after a second resume the
    stage passes once the others committed."""
    async with _fleet(world, 5) as fleet:
        await world.assign_all(fleet, OLD)
        draft = await world.create(_stage(100.0), pacing=ONE_PER_SECOND)
        order = _order(draft)
        first_bad, second_bad = order[1], order[3]
        for device_id in (first_bad, second_bad):
            _switch(fleet, device_id, BROKEN)
        await world.start(draft.id)

        paused = await world.wait(draft.id, _paused)
        stage = paused.stages[0]
        assert stage.phase == o.STAGE_PHASE_FAILED, stage
        assert "1 of" in paused.reason and "error threshold" in paused.reason, paused.reason
        assert "since resume" not in paused.reason, paused.reason
        assert _members(paused)[first_bad].state == o.ROLLOUT_DEVICE_STATE_FAILED

        resumed = await world.resume(draft.id)
        assert resumed.state == o.ROLLOUT_STATE_RUNNING and not resumed.reason
        assert resumed.stages[0].acknowledged_failed == 1
        assert resumed.stages[0].phase == o.STAGE_PHASE_ROLLING

        # Paused again, by the second failure only.
        again = await world.wait(draft.id, _paused)
        assert _members(again)[second_bad].state == o.ROLLOUT_DEVICE_STATE_FAILED, _states(again)
        assert "since resume" in again.reason and "1 of" in again.reason, again.reason
        assert again.stages[0].phase == o.STAGE_PHASE_FAILED
        assert again.stages[0].acknowledged_failed == 1 and again.stages[0].failed == 2

        resumed = await world.resume(draft.id)
        assert resumed.stages[0].acknowledged_failed == 2
        done = await world.wait(draft.id, _finished)
        assert done.state == o.ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES, (done.reason, _states(done))
        assert done.stages[0].phase == o.STAGE_PHASE_PASSED
        assert "3 committed" in done.reason and "2 failed" in done.reason, done.reason
        assert _states(done) == {
            i: "FAILED" if i in (first_bad, second_bad) else "COMMITTED" for i in order
        }


async def test_a_failure_after_resume_is_counted_since_the_resume(world: World) -> None:
    """As above, but the first failure comes before any member committed:
    the resume acknowledges a failure only."""
    async with _fleet(world, 3) as fleet:
        await world.assign_all(fleet, OLD)
        draft = await world.create(_stage(100.0), pacing=ONE_PER_SECOND)
        order = _order(draft)
        for device_id in (order[0], order[2]):
            _switch(fleet, device_id, BROKEN)
        await world.start(draft.id)
        await world.wait(draft.id, _paused)
        await world.resume(draft.id)
        again = await world.wait(draft.id, _paused)
        assert _members(again)[order[2]].state == o.ROLLOUT_DEVICE_STATE_FAILED, _states(again)
        assert "since resume" in again.reason, again.reason
        assert "1 earlier failed acknowledged" in again.reason, again.reason


# ---------------------------------------------------------------- operator actions


async def test_retry_reopens_a_rollout_that_succeeded_with_failures(world: World) -> None:
    async with _fleet(world, 3) as fleet:
        await world.assign_all(fleet, OLD)
        # 2 of 3 pass the stage; the failure rate never fails it.
        draft = await world.create(
            _stage(100.0, success_threshold_percent=60, error_threshold_percent=100)
        )
        bad = _order(draft)[1]
        _switch(fleet, bad, BROKEN)
        await world.start(draft.id)
        first = await world.wait(draft.id, _finished)
        assert first.state == o.ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES, (
            first.reason,
            _states(first),
        )
        assert "1 failed" in first.reason, first.reason
        assert _members(first)[bad].state == o.ROLLOUT_DEVICE_STATE_FAILED
        assert _members(first)[bad].attempts == 1

        # While another rollout of the model holds the device (one scheduled
        # for later), it is not retried here: the refusal names it.
        later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        other = await world.create(_stage(100.0), start=True, start_at=_timestamp(later))
        assert other.state == o.ROLLOUT_STATE_SCHEDULED
        code, details = await status_of(
            world.op.RetryRollout(o.RetryRolloutRequest(id=draft.id), metadata=ADMIN)
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        name = _members(first)[bad].device_name
        assert f"{name} ({bad}): already in active rollout {other.id}" in details, details
        await world.op.AbortRollout(o.AbortRolloutRequest(id=other.id), metadata=ADMIN)

        _switch(fleet, bad, PI)  # the device is fixed
        reopened = await world.op.RetryRollout(
            o.RetryRolloutRequest(id=draft.id, reason="reflashed"), metadata=ADMIN
        )
        assert reopened.state == o.ROLLOUT_STATE_RUNNING and not reopened.HasField("finished_at")
        member = _members(reopened)[bad]
        assert member.state == o.ROLLOUT_DEVICE_STATE_WAITING and member.attempts == 0
        assert f"retried by {ACTOR}: reflashed" in member.reason, member.reason

        done = await world.wait(draft.id, _finished)
        assert done.state == o.ROLLOUT_STATE_SUCCEEDED, (done.reason, _states(done))
        assert set(_states(done).values()) == {"COMMITTED"}
        assert _members(done)[bad].attempts == 1  # notified again, once
        assert "failed" not in done.reason, done.reason
        assert all(a.active_version == NEW for a in fleet.agents)
        # Nothing failed is left to retry.
        code, details = await status_of(
            world.op.RetryRollout(o.RetryRolloutRequest(id=draft.id), metadata=ADMIN)
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    (entry,) = await world.audit(draft.id, "rollout.retry")
    assert entry[0] == ACTOR and entry[1]["reason"] == "reflashed", entry


@both_databases
async def test_an_abort_says_which_reverts_failed_and_which_members_were_dropped(
    world: World,
) -> None:
    async with _fleet(world, 4) as fleet:
        await world.assign_all(fleet, OLD)
        # Two in a first stage that bakes long; two waiting in the second.
        draft = await world.create(_stage(2, bake_time=_seconds(600)), _stage(100.0))
        order = _order(draft)
        stuck, back, waiting = order[0], order[1], order[2:]
        await world.start(draft.id)
        await world.wait(draft.id, lambda r: all(
            _members(r)[d].state == o.ROLLOUT_DEVICE_STATE_COMMITTED for d in (stuck, back)
        ))  # fmt: skip
        _switch(fleet, stuck, NO_WAY_BACK)  # its revert to OLD will fail
        await world.op.AbortRollout(
            o.AbortRolloutRequest(id=draft.id, revert=True, reason="bad"), metadata=ADMIN
        )
        done = await world.wait(draft.id, lambda r: r.HasField("finished_at"))
        members = _members(done)
        assert done.state == o.ROLLOUT_STATE_ABORTED
        assert done.reason == (
            f"aborted by {ACTOR}: bad; 1 reverted, 1 revert failed, 2 dropped (never notified)"
        ), done.reason
        assert [s.phase for s in done.stages] == [o.STAGE_PHASE_ABORTED, o.STAGE_PHASE_PENDING]
        assert members[stuck].state == o.ROLLOUT_DEVICE_STATE_REVERT_FAILED, _states(done)
        assert members[stuck].reason.startswith("revert failed: "), members[stuck].reason
        assert members[back].state == o.ROLLOUT_DEVICE_STATE_REVERTED, _states(done)
        for device_id in waiting:
            assert members[device_id].state == o.ROLLOUT_DEVICE_STATE_DROPPED, _states(done)
            assert members[device_id].reason == "never notified"
        # Each says what it runs: the stuck one still NEW, the others OLD.
        assert _agent(fleet, stuck).active_version == NEW
        assert all(_agent(fleet, d).active_version == OLD for d in (back, *waiting))


@both_databases
async def test_skipped_members_leave_the_denominator_and_are_never_notified(
    world: World,
) -> None:
    notified: dict[str, dt.datetime] = {}
    async with _fleet(world, 6, notified) as fleet:
        await world.assign_all(fleet, OLD)
        draft = await world.create(_stage(3), _stage(100.0), pacing=ONE_PER_SECOND)
        order = _order(draft)
        first, bad, later = order[0], order[1], order[5]  # `later`: in stage 2
        _switch(fleet, bad, BROKEN)
        await world.start(draft.id)
        paused = await world.wait(draft.id, lambda r: _paused(r) and _members(r)[first].state
                                  == o.ROLLOUT_DEVICE_STATE_COMMITTED)  # fmt: skip
        assert paused.stages[0].phase == o.STAGE_PHASE_FAILED

        def skip(ids: list[str], reason: str) -> Any:
            request = o.SkipRolloutDevicesRequest(id=draft.id, device_ids=ids, reason=reason)
            return world.op.SkipRolloutDevices(request, metadata=ADMIN)

        code, details = await status_of(skip([bad], ""))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "reason" in details, details
        code, details = await status_of(skip([first], "no need"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert first in details and "committed" in details, details

        skipped = await skip([bad, later], "flash worn out")
        assert skipped.state == o.ROLLOUT_STATE_PAUSED
        members = _members(skipped)
        for device_id in (bad, later):
            assert members[device_id].state == o.ROLLOUT_DEVICE_STATE_SKIPPED
            assert f"skipped by {ACTOR}: flash worn out" in members[device_id].reason
        assert [s.skipped for s in skipped.stages] == [1, 1]

        await world.resume(draft.id)
        done = await world.wait(draft.id, _finished)
        assert done.state == o.ROLLOUT_STATE_SUCCEEDED, (done.reason, _states(done))
        assert "4 committed" in done.reason and "2 skipped" in done.reason, done.reason
        assert "failed" not in done.reason, done.reason
        assert [s.phase for s in done.stages] == [o.STAGE_PHASE_PASSED] * 2
        assert _states(done) == {i: "SKIPPED" if i in (bad, later) else "COMMITTED" for i in order}
        assert _members(done)[later].attempts == 0 and later not in notified
        for agent in fleet.agents:
            expected = OLD if agent.device_id in (bad, later) else NEW
            assert agent.active_version == expected, (agent.name, agent.update_state)
    (entry,) = await world.audit(draft.id, "rollout.skip")  # the refused ones left none
    assert sorted(entry[1]["devices"]) == sorted([bad, later]), entry


async def test_promote_passes_a_baking_stage_now(world: World) -> None:
    async with _fleet(world, 3) as fleet:
        await world.assign_all(fleet, OLD)
        rollout = await world.create(_stage(1, bake_time=_seconds(600)), _stage(100.0), start=True)
        baking = await world.wait(rollout.id, lambda r: r.stages[0].phase == o.STAGE_PHASE_BAKING)
        assert baking.current_stage == 0 and baking.state == o.ROLLOUT_STATE_RUNNING
        assert all(m.state == o.ROLLOUT_DEVICE_STATE_WAITING for m in baking.devices if m.stage)

        promoted = await world.op.PromoteRollout(
            o.RolloutActionRequest(id=rollout.id, reason="canary looks fine"), metadata=ADMIN
        )
        assert promoted.state == o.ROLLOUT_STATE_RUNNING and promoted.current_stage == 1
        assert promoted.stages[0].phase == o.STAGE_PHASE_PROMOTED
        assert promoted.stages[0].promoted_by == ACTOR
        assert promoted.stages[1].phase == o.STAGE_PHASE_ROLLING

        done = await world.wait(rollout.id, _finished)
        assert done.state == o.ROLLOUT_STATE_SUCCEEDED, (done.reason, _states(done))
        assert [s.phase for s in done.stages] == [o.STAGE_PHASE_PROMOTED, o.STAGE_PHASE_PASSED]
        assert set(_states(done).values()) == {"COMMITTED"}
        code, details = await status_of(
            world.op.PromoteRollout(o.RolloutActionRequest(id=rollout.id), metadata=ADMIN)
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "succeeded" in details, details
    (entry,) = await world.audit(rollout.id, "rollout.promote")
    assert entry[0] == ACTOR and entry[1]["reason"] == "canary looks fine", entry


async def test_update_lowers_a_paused_stage_threshold_and_refuses_what_cannot_change(
    world: World,
) -> None:
    async with _fleet(world, 4) as fleet:
        await world.assign_all(fleet, OLD)
        # Every member of stage 1 must commit; the failure rate alone never
        # fails it (it fails once all finished short of 100 %).
        draft = await world.create(
            _stage(2, success_threshold_percent=100, error_threshold_percent=100), _stage(100.0)
        )
        bad = _order(draft)[1]
        _switch(fleet, bad, BROKEN)
        await world.start(draft.id)
        paused = await world.wait(draft.id, _paused)
        assert "only 1 committed" in paused.reason, paused.reason
        assert paused.stages[0].phase == o.STAGE_PHASE_FAILED

        async def update(change: Callable[[o.RolloutSpec], None], reason: str = "") -> o.Rollout:
            spec = o.RolloutSpec()
            spec.CopyFrom(paused.spec)
            change(spec)
            request = o.UpdateRolloutRequest(id=draft.id, spec=spec, reason=reason)
            return await world.op.UpdateRollout(request, metadata=ADMIN)

        def lower(spec: o.RolloutSpec) -> None:
            spec.stages[0].success_threshold_percent = 50

        def resize(spec: o.RolloutSpec) -> None:
            spec.stages[0].count = 3

        def remodel(spec: o.RolloutSpec) -> None:
            spec.model_version = "3.0.0"

        code, details = await status_of(update(resize))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "stage 1" in details, details
        assert "size" in details, details
        code, details = await status_of(update(remodel))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "model" in details, details

        updated = await update(lower, reason="one board is known bad")
        assert updated.state == o.ROLLOUT_STATE_PAUSED
        assert updated.spec.stages[0].success_threshold_percent == 50
        assert updated.spec.stages[0].count == 2

        await world.resume(draft.id)
        done = await world.wait(draft.id, _finished)
        assert done.state == o.ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES, (done.reason, _states(done))
        assert [s.phase for s in done.stages] == [o.STAGE_PHASE_PASSED] * 2
        assert "1 failed" in done.reason, done.reason
    (entry,) = await world.audit(draft.id, "rollout.update")  # the refused ones left none
    actor, audited = entry
    assert actor == ACTOR and audited["reason"] == "one board is known bad", entry
    # Whatever the shape of `changes` (see test_an_update_audits_each_changed_field),
    # it holds the new threshold.
    assert "50.0" in json.dumps(audited["changes"]), audited


async def test_an_update_reaches_a_running_stage_at_its_next_judgement(world: World) -> None:
    """What the paused case cannot show (a resume alone passes a stage whose
    only failure it acknowledged): the new threshold is what the stage is
    judged by. A stage held at 100 % by a slow member passes at 50 %."""
    async with _fleet(world, 3) as fleet:
        await world.assign_all(fleet, OLD)
        draft = await world.create(_stage(2), _stage(100.0))
        slow = _order(draft)[1]
        _switch(fleet, slow, SLOW)
        rollout = await world.start(draft.id)
        moving = (o.ROLLOUT_DEVICE_STATE_NOTIFIED, o.ROLLOUT_DEVICE_STATE_IN_PROGRESS)
        await world.wait(draft.id, lambda r: r.stages[0].committed == 1
                         and _members(r)[slow].state in moving)  # fmt: skip
        await asyncio.sleep(0.5)  # a few ticks: the stage stays where it is
        held = await world.get(draft.id)
        assert held.current_stage == 0 and held.stages[0].phase == o.STAGE_PHASE_ROLLING

        spec = o.RolloutSpec()
        spec.CopyFrom(rollout.spec)
        spec.stages[0].success_threshold_percent = 50
        updated = await world.op.UpdateRollout(
            o.UpdateRolloutRequest(id=draft.id, spec=spec), metadata=ADMIN
        )
        assert updated.state == o.ROLLOUT_STATE_RUNNING
        passed = await world.wait(draft.id, lambda r: r.current_stage == 1)
        assert passed.stages[0].phase == o.STAGE_PHASE_PASSED
        assert _members(passed)[slow].state in moving  # still installing
        await world.op.AbortRollout(o.AbortRolloutRequest(id=draft.id), metadata=ADMIN)


async def test_an_update_audits_each_changed_field(world: World) -> None:
    async with _fleet(world, 2) as fleet:
        await world.assign_all(fleet, OLD)
        draft = await world.create(_stage(1), _stage(100.0))
        spec = o.RolloutSpec()
        spec.CopyFrom(draft.spec)
        spec.stages[0].success_threshold_percent = 50
        spec.stages[1].bake_time.CopyFrom(_seconds(30))
        await world.op.UpdateRollout(o.UpdateRolloutRequest(id=draft.id, spec=spec),
                                     metadata=ADMIN)  # fmt: skip
    ((_, details),) = await world.audit(draft.id, "rollout.update")
    assert details["changes"] == {
        "stage 1.success_threshold_percent": [100.0, 50.0],
        "stage 2.bake_time_s": [0.0, 30.0],
    }, details


# ---------------------------------------------------------------- reports


@both_databases
async def test_a_step_takes_only_well_formed_reports_of_its_model_at_the_members_sequence(
    world: World,
) -> None:
    """A step reads three fields of each device's status document in SQL
    (decoding the whole documents in Python cost a 10,000-device rollout's
    step up to a second). What an agent stored is the agent's to choose:
    none of these may fail the step, and only the first is a report."""
    async with _fleet(world, 6) as fleet:
        await world.assign_all(fleet, OLD)
        draft = await world.create(_stage(100.0))  # a draft: nobody notified, no step
    orchestrator = Orchestrator(world.cp.db, EventBus(), owner="test", offline_after_s=60)
    ids = sorted(m.device_id for m in draft.devices)
    documents: list[dict[str, Any]] = [
        {MODEL: {"sequence": 7, "state": "committed", "reason": 'ok "quoted" é'}},
        {MODEL: {"sequence": 2**62, "state": "committed"}},  # another assignment's
        {MODEL: {"sequence": "7", "state": "failed"}},  # text where a number belongs
        {MODEL: "committed"},  # not an object
        {"other-model": {"sequence": 7, "state": "failed"}},  # another model's
        {},  # nothing reported yet
    ]

    def reports() -> dict[str, rollout_plan.Report]:
        with world.cp.db.unit_of_work() as uow:  # rolled back: never committed
            row = uow.session.get_one(RolloutRow, draft.id)
            uow.session.execute(
                update(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == draft.id)
                .values(state=MemberState.NOTIFIED, sequence=7)
            )  # fmt: skip
            for device_id, document in zip(ids, documents, strict=True):
                uow.session.execute(
                    update(DeviceRow).where(DeviceRow.id == device_id)
                    .values(update_status=document)
                )  # fmt: skip
            step = _Applier(orchestrator, uow, row, utcnow(), None)
            return step.reports(step.snapshot.members)

    got = await asyncio.to_thread(reports)
    assert got == {ids[0]: rollout_plan.Report("committed", 'ok "quoted" é')}
