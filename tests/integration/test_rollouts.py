"""Rollouts through a real control plane (in process, SQLite and PostgreSQL)
with simulated agents (fleetsim) speaking the real device protocol: stages,
thresholds, health gates, shadow agreement, abort with revert, pause/resume,
approval, late joiners, conflicts, timeouts and retries. Builds are hand-made
results over a real file (as in test_builds_service.py), so the test is about
orchestration, not the ladder."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import event, select, update

from edgefleet.controlplane.api import convert
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.db.models import RolloutDeviceRow, RolloutRow, utcnow
from edgefleet.controlplane.domain import rollout_plan
from edgefleet.controlplane.domain.rollout_states import MemberState
from edgefleet.controlplane.server import ControlPlane, create_server
from edgefleet.controlplane.services.events import EventBus
from edgefleet.controlplane.services.orchestrator import Orchestrator, _Applier
from edgefleet.demo.models import BuiltModel, build_digits_classifier
from edgefleet.sim import Fleet, parse_profile
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import finish_builds_by_hand
from testkit.harness import ADMIN_TOKEN
from testkit.models import model_parts, push_requests
from testkit.rpc import ADMIN

pytestmark = pytest.mark.timeout(300)

MODEL = "digits"
PI, GW = "pi", "gw"


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


def _profile(**versions: dict[str, Any]) -> Any:
    """Two kinds of device; per-version behaviour overrides for both."""
    return parse_profile(
        {
            "heartbeat_interval_s": 1,
            "telemetry_interval_s": 0.5,
            "versions": versions,
            "classes": [
                {"name": PI, "weight": 1, "hardware": {"arch": "aarch64"},
                 "install_s": [0.05, 0.2], "latency_p95_ms": 10, "error_rate": 0.0},
                {"name": GW, "weight": 1, "hardware": {"arch": "x86_64"},
                 "install_s": [0.05, 0.2], "latency_p95_ms": 10, "error_rate": 0.0},
            ],
        }
    )  # fmt: skip


@dataclass
class World:
    cp: ControlPlane
    op: og.OperatorServiceStub
    channel: grpc.aio.Channel
    token: str

    async def rollout(self, *stages: o.StageSpec, **spec: Any) -> o.Rollout:
        request = o.CreateRolloutRequest(
            spec=o.RolloutSpec(model_name=MODEL, model_version=spec.pop("version", "2.0.0"),
                               class_names=spec.pop("classes", [PI, GW]), stages=stages, **spec),
            start=True,
        )  # fmt: skip
        return (await self.op.CreateRollout(request, metadata=ADMIN)).rollout

    async def draft(self) -> o.Rollout:
        """2.0.0 to every class in one stage, created but not started."""
        request = o.CreateRolloutRequest(spec=o.RolloutSpec(
            model_name=MODEL, model_version="2.0.0", class_names=[PI, GW], stages=[_stage(100.0)],
        ))  # fmt: skip
        return (await self.op.CreateRollout(request, metadata=ADMIN)).rollout

    async def get(self, rollout_id: str) -> o.Rollout:
        return await self.op.GetRollout(o.GetRolloutRequest(id=rollout_id), metadata=ADMIN)

    async def wait(
        self, rollout_id: str, done: Callable[[o.Rollout], bool], within_s: float = 60
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


def _stage(size: float | int, **kw: Any) -> o.StageSpec:
    stage = o.StageSpec(**kw)
    if isinstance(size, float):
        stage.percent = size
    else:
        stage.count = size
    return stage


def _seconds(s: float) -> Duration:
    d = Duration()
    d.FromMilliseconds(int(s * 1000))
    return d


@pytest.fixture
async def world(cp: ControlPlane, digits: BuiltModel) -> AsyncIterator[World]:
    channel = grpc.aio.insecure_channel(cp.address)
    op = og.OperatorServiceStub(channel)
    for name, arch, budget in ((PI, "aarch64", 30.0), (GW, "x86_64", 30.0)):
        await op.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name=name,
                constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME,
                                                latency_budget_p95_ms=budget),
                match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=[arch])],
            ),
            metadata=ADMIN,
        )  # fmt: skip
    parts = model_parts(model=digits.model, sample_data=digits.sample_data)
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        await op.PushModel(push_requests(MODEL, version, parts), metadata=ADMIN)
    # One real job: the versions share their bytes and the classes their
    # profile, so the other five reuse its result.
    await finish_builds_by_hand(cp, op, digits.model, 6)
    token = (await op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="sim"),
                                            metadata=ADMIN)).secret  # fmt: skip
    try:
        yield World(cp, op, channel, token)
    finally:
        await channel.close()


def _fleet(world: World, n: int, profile: Any, prefix: str = "sim") -> Fleet:
    return Fleet(world.cp.address, world.token, profile, n=n, prefix=prefix, seed=1,
                 heartbeat_interval_s=1, telemetry_interval_s=0.5)  # fmt: skip


def _states(rollout: o.Rollout) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in rollout.devices:
        name = o.RolloutDeviceState.Name(d.state).removeprefix("ROLLOUT_DEVICE_STATE_").lower()
        out[name] = out.get(name, 0) + 1
    return out


# ---------------------------------------------------------------- tests


async def test_a_staged_rollout_completes_stage_by_stage(world: World) -> None:
    async with _fleet(world, 6, _profile()) as fleet:
        await world.assign_all(fleet, "1.0.0")
        rollout = await world.rollout(
            _stage(1, name="canary", stratified=True), _stage(50.0), _stage(100.0)
        )
        # Stratified: the 1-device canary stage holds one device of each class.
        first = [d for d in rollout.devices if d.stage == 0]
        assert sorted(d.class_name for d in first) == [GW, PI]
        done = await world.wait(rollout.id, lambda r: r.state == o.ROLLOUT_STATE_SUCCEEDED)
        assert _states(done) == {"committed": 6}
        assert all(a.active_version == "2.0.0" for a in fleet.agents)
        assert [s.state for s in done.stages] == ["passed"] * 3
        summary = await world.op.GetRollout(
            o.GetRolloutRequest(id=rollout.id, summary_only=True), metadata=ADMIN
        )
        # The same rollout and counts, without the rows.
        assert not summary.devices and summary.state == done.state
        assert list(summary.stages) == list(done.stages)
        # ListRollouts: the same counts, by state too.
        for state in (o.ROLLOUT_STATE_UNSPECIFIED, o.ROLLOUT_STATE_SUCCEEDED):
            listed = await world.op.ListRollouts(o.ListRolloutsRequest(state=state),
                                                 metadata=ADMIN)  # fmt: skip
            (mine,) = [r for r in listed.rollouts if r.id == rollout.id]
            assert list(mine.stages) == list(done.stages) and not mine.devices
        running = await world.op.ListRollouts(
            o.ListRolloutsRequest(state=o.ROLLOUT_STATE_RUNNING), metadata=ADMIN
        )
        assert rollout.id not in {r.id for r in running.rollouts}
    audit = await world.op.ListAuditLog(o.ListAuditLogRequest(), metadata=ADMIN)
    actions = [e.action for e in audit.entries if e.target == f"rollout:{rollout.id}"]
    assert "rollout.succeeded" in actions and actions.count("rollout.stage") == 2

    def stages_in(action: str) -> list[int]:
        mine = (e for e in audit.entries if e.target == f"rollout:{rollout.id}")
        return sorted({json.loads(e.details)["stage"] for e in mine if e.action == action})

    # Stages counted from 1, as the CLI and the TUI show them.
    assert stages_in("rollout.stage_passed") == [1, 2, 3]
    assert stages_in("rollout.stage") == [2, 3]


async def test_failures_trip_the_error_threshold_and_abort_reverts_every_device(
    world: World,
) -> None:
    # 3.0.0 fails validation on every gateway.
    profile = parse_profile({
        "heartbeat_interval_s": 1, "telemetry_interval_s": 0.5,
        "classes": [
            {"name": PI, "hardware": {"arch": "aarch64"}, "install_s": [0.05, 0.2]},
            {"name": GW, "hardware": {"arch": "x86_64"}, "install_s": [0.05, 0.2],
             "versions": {"3.0.0": {"fail_rate": 1.0, "fail_state": "validating"}}},
        ],
    })  # fmt: skip
    async with _fleet(world, 6, profile) as fleet:
        await world.assign_all(fleet, "1.0.0")
        rollout = await world.rollout(
            _stage(100.0, error_threshold_percent=20, min_finished_for_error_threshold=2,
                   on_failure=o.FAILURE_ACTION_ABORT_REVERT),
            version="3.0.0",
        )  # fmt: skip
        done = await world.wait(rollout.id, lambda r: r.state == o.ROLLOUT_STATE_ABORTED and all(
            d.state not in (o.ROLLOUT_DEVICE_STATE_IN_PROGRESS, o.ROLLOUT_DEVICE_STATE_NOTIFIED)
            for d in r.devices))  # fmt: skip
        assert "failed" in done.reason and "%" in done.reason, done.reason
        failed = [d for d in done.devices if d.state == o.ROLLOUT_DEVICE_STATE_FAILED]
        assert failed and all(d.class_name == GW and "golden" in d.reason for d in failed)
        # A live view's read: the failed devices first, then one more; the
        # stage counts still of all six.
        limited = await world.op.GetRollout(
            o.GetRolloutRequest(id=rollout.id, device_limit=len(failed) + 1), metadata=ADMIN
        )
        assert len(limited.devices) == len(failed) + 1 < len(done.devices)
        *first, last = limited.devices
        assert {d.device_id for d in first} == {d.device_id for d in failed}
        assert last.state != o.ROLLOUT_DEVICE_STATE_FAILED and last.device_name
        assert list(limited.stages) == list(done.stages)
        await fleet.wait_until(lambda f: all(a.active_version == "1.0.0" for a in f.agents), 30,
                               what="every device back on 1.0.0")  # fmt: skip


async def test_a_revert_goes_out_in_chunks_and_holds_its_devices_until_it_is_done(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like notifications: one step assigning thousands of reverts held
    SQLite's writer for seconds and woke every device at once. Until the
    revert is done no other rollout may take its devices: it would assign
    them over the revert, which would then wait for their report forever."""
    monkeypatch.setattr(rollout_plan, "NOTIFY_CHUNK", 2)
    # Installing 1.0.0 takes seconds: the revert is still under way when
    # the next rollout is tried.
    async with _fleet(world, 5, _profile(**{"1.0.0": {"install_s": [2.5, 3.0]}})) as fleet:
        await world.assign_all(fleet, "1.0.0")
        # Notified in chunks of 2 as well; then all baking on 2.0.0.
        rollout = await world.rollout(_stage(100.0, bake_time=_seconds(600)))
        await world.wait(rollout.id, lambda r: all(
            d.state == o.ROLLOUT_DEVICE_STATE_COMMITTED for d in r.devices))  # fmt: skip
        await world.op.AbortRollout(o.AbortRolloutRequest(id=rollout.id, revert=True),
                                    metadata=ADMIN)  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await world.rollout(_stage(100.0), version="3.0.0")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "still reverting" in (err.value.details() or ""), err.value.details()
        done = await world.wait(rollout.id, lambda r: all(
            d.state == o.ROLLOUT_DEVICE_STATE_REVERTED for d in r.devices))  # fmt: skip
        assert done.state == o.ROLLOUT_STATE_ABORTED and len(done.devices) == 5
        assert done.HasField("finished_at")
        # Once it is done the devices are free again.
        draft = await world.draft()
        assert not (await world.get(draft.id)).excluded
        await fleet.wait_until(lambda f: all(a.active_version == "1.0.0" for a in f.agents), 30,
                               what="every device back on 1.0.0")  # fmt: skip

    def revert_steps() -> list[int]:
        # A member's notified_at is its last assignment's step: the revert.
        with world.cp.db.unit_of_work(readonly=True) as uow:
            stamps = list(uow.session.scalars(
                select(RolloutDeviceRow.notified_at)
                .where(RolloutDeviceRow.rollout_id == rollout.id)
            ))  # fmt: skip
        return sorted(Counter(stamps).values())

    assert await asyncio.to_thread(revert_steps) == [1, 2, 2]


async def test_rollout_replies_are_converted_off_the_event_loop(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rollout's reply names every device; converted on the event loop,
    # each action stopped every device stream (at 10,000 devices for
    # 0.1-0.2 s). Record where each conversion with devices runs.
    calls: list[tuple[str, bool]] = []
    real = convert.rollout_to_pb

    def spy(view: Any, *, with_devices: bool = True) -> o.Rollout:
        if with_devices:
            try:
                asyncio.get_running_loop()
                on_loop = True
            except RuntimeError:
                on_loop = False
            calls.append((view.row.state, on_loop))
        return real(view, with_devices=with_devices)

    monkeypatch.setattr(convert, "rollout_to_pb", spy)
    async with _fleet(world, 4, _profile()) as fleet:
        await world.assign_all(fleet, "1.0.0")
        draft = await world.draft()
        ids = {d.device_id for d in draft.devices}
        assert len(ids) == 4
        act = o.RolloutActionRequest(id=draft.id)
        replies = [
            await world.op.StartRollout(act, metadata=ADMIN),
            # Paused at once, so it cannot finish before the abort.
            await world.op.PauseRollout(act, metadata=ADMIN),
            await world.get(draft.id),
            await world.op.AbortRollout(o.AbortRolloutRequest(id=draft.id), metadata=ADMIN),
        ]
    # Every reply still carries every device...
    assert all({d.device_id for d in r.devices} == ids for r in replies)
    assert [r.state for r in replies][-1] == o.ROLLOUT_STATE_ABORTED
    # ...and was converted in a worker thread: create, three actions, get.
    assert len(calls) >= 5
    assert not [c for c in calls if c[1]], calls


async def test_a_health_gate_pauses_and_resume_acknowledges(world: World) -> None:
    profile = _profile(**{"2.0.0": {"latency_p95_ms": 90}})  # over the 30 ms budget
    async with _fleet(world, 4, profile) as fleet:
        await world.assign_all(fleet, "1.0.0")
        rollout = await world.rollout(
            _stage(2, bake_time=_seconds(3), gates=o.HealthGates(latency_budget_factor=1.0)),
            _stage(100.0),
        )
        paused = await world.wait(rollout.id, lambda r: r.state == o.ROLLOUT_STATE_PAUSED)
        assert "latency" in paused.reason and "health gate" in paused.reason, paused.reason
        (gate,) = [g for g in paused.stages[0].gates if g.name.startswith("latency")]
        assert not gate.passing and gate.value > gate.limit
        # Stage 2 devices were never notified.
        assert all(
            d.state == o.ROLLOUT_DEVICE_STATE_WAITING for d in paused.devices if d.stage == 1
        )
        resumed = await world.op.ResumeRollout(o.RolloutActionRequest(id=rollout.id),
                                               metadata=ADMIN)  # fmt: skip
        assert resumed.state == o.ROLLOUT_STATE_RUNNING
        await world.op.AbortRollout(o.AbortRolloutRequest(id=rollout.id, revert=False),
                                    metadata=ADMIN)  # fmt: skip
        kept = await world.get(rollout.id)
        assert kept.state == o.ROLLOUT_STATE_ABORTED and "aborted by" in kept.reason
        # Nothing goes back, nothing more is notified: stage 2 is dropped.
        later = [d for d in kept.devices if d.stage == 1]
        assert later and all(d.state == o.ROLLOUT_DEVICE_STATE_DROPPED for d in later), later
        assert all(d.reason == "never notified" for d in later)
        assert kept.reason.endswith(f"; {len(later)} dropped (never notified)"), kept.reason
        # The stage it was in says it was aborted there, not that it rolls on.
        assert kept.stages[kept.current_stage].phase == o.STAGE_PHASE_ABORTED


async def test_dry_run_conflicts_and_approval(world: World) -> None:
    async with _fleet(world, 4, _profile()) as fleet:
        await world.assign_all(fleet, "1.0.0")
        plan = await world.op.CreateRollout(
            o.CreateRolloutRequest(
                spec=o.RolloutSpec(model_name=MODEL, model_version="2.0.0", class_names=[PI],
                                   stages=[_stage(1), _stage(100.0)]),
                dry_run=True,
            ),
            metadata=ADMIN,
        )  # fmt: skip
        assert not plan.HasField("rollout")
        assert sorted(d.stage for d in plan.planned) == [0, 1]
        assert {d.class_name for d in plan.planned} == {PI}
        rollout = await world.rollout(_stage(1, require_approval=True), _stage(100.0), classes=[PI])
        waiting = await world.wait(
            rollout.id, lambda r: r.state == o.ROLLOUT_STATE_WAITING_APPROVAL
        )
        assert "approval" in waiting.reason
        # The same devices cannot join a second active rollout.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await world.rollout(_stage(100.0), classes=[PI], version="3.0.0")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already in another active rollout" in (err.value.details() or "")
        # As a draft it may be created: the busy devices are excluded, and
        # the rollout remembers which and why.
        draft = await world.draft()
        shown = await world.get(draft.id)
        assert {e.device_id for e in shown.excluded} == {d.device_id for d in rollout.devices}
        assert all(f"already in active rollout {rollout.id}" in e.reason for e in shown.excluded)
        assert {d.class_name for d in shown.devices} == {GW}
        await world.op.ApproveRolloutStage(o.RolloutActionRequest(id=rollout.id), metadata=ADMIN)
        done = await world.wait(rollout.id, lambda r: r.state == o.ROLLOUT_STATE_SUCCEEDED)
        assert _states(done) == {"committed": 2}


async def test_shadow_agreement_gates_promotion(world: World) -> None:
    profile = _profile(**{"2.0.0": {"agreement": 0.99}, "3.0.0": {"agreement": 0.5}})
    async with _fleet(world, 4, profile) as fleet:
        await world.assign_all(fleet, "1.0.0")
        low = await world.rollout(
            _stage(2, shadow=True, min_agreement=0.9), _stage(100.0), version="3.0.0"
        )
        paused = await world.wait(low.id, lambda r: r.state == o.ROLLOUT_STATE_PAUSED)
        assert "shadow agreement" in paused.reason, paused.reason
        # Nothing was activated anywhere.
        assert all(a.active_version == "1.0.0" for a in fleet.agents)
        await world.op.AbortRollout(o.AbortRolloutRequest(id=low.id, revert=True), metadata=ADMIN)
        # Its devices are free once the revert is done.
        await world.wait(low.id, lambda r: r.state == o.ROLLOUT_STATE_ABORTED
                         and r.HasField("finished_at"))  # fmt: skip
        high = await world.rollout(
            _stage(2, shadow=True, min_agreement=0.9), _stage(100.0), version="2.0.0"
        )
        done = await world.wait(
            high.id, lambda r: r.state == o.ROLLOUT_STATE_SUCCEEDED, within_s=90
        )
        assert _states(done) == {"committed": 4}
        assert all(a.active_version == "2.0.0" for a in fleet.agents)


async def test_late_devices_join_a_dynamic_rollout(world: World) -> None:
    async with _fleet(world, 2, _profile(), prefix="early") as early:
        await world.assign_all(early, "1.0.0")
        # The first stage bakes for a while: the rollout is running when the
        # late devices appear.
        rollout = await world.rollout(_stage(1, bake_time=_seconds(4)), _stage(100.0), dynamic=True)
        async with _fleet(world, 2, _profile(), prefix="late") as late:
            done = await world.wait(rollout.id, lambda r: r.state == o.ROLLOUT_STATE_SUCCEEDED)
            late_ids = {a.device_id for a in late.agents}
            joined = [d for d in done.devices if d.device_id in late_ids]
            assert len(joined) == 2 and all("joined" in d.reason or d.reason == "" for d in joined)
            assert _states(done) == {"committed": 4}
            assert all(a.active_version == "2.0.0" for a in [*early.agents, *late.agents])


async def test_devices_past_their_timeout_are_retried_then_timed_out(world: World) -> None:
    profile = _profile(**{"2.0.0": {"install_s": [30, 30]}})  # never within the timeout
    async with _fleet(world, 2, profile) as fleet:
        await world.assign_all(fleet, "1.0.0")
        # Every failure tolerated by the error threshold, none by success:
        # timed-out devices fail the stage once all finished.
        rollout = await world.rollout(
            _stage(100.0, error_threshold_percent=100, success_threshold_percent=100),
            pacing=o.Pacing(device_timeout=_seconds(1), device_retries=1),
        )
        done = await world.wait(
            rollout.id,
            lambda r: all(d.state == o.ROLLOUT_DEVICE_STATE_TIMED_OUT for d in r.devices),
            within_s=60,
        )
        assert all(d.attempts == 2 for d in done.devices), done.devices
        assert all("no result within 1 s" in d.reason for d in done.devices)
        assert done.state in (o.ROLLOUT_STATE_PAUSED, o.ROLLOUT_STATE_ABORTED)


async def test_a_class_failing_a_gate_is_dropped_and_reverted_while_the_others_complete(
    world: World,
) -> None:
    profile = parse_profile({
        "heartbeat_interval_s": 1, "telemetry_interval_s": 0.5,
        "classes": [
            {"name": PI, "hardware": {"arch": "aarch64"}, "install_s": [0.05, 0.2],
             "latency_p95_ms": 10, "error_rate": 0.0},
            # Over the class's 30 ms budget with this version only.
            {"name": GW, "hardware": {"arch": "x86_64"}, "install_s": [0.05, 0.2],
             "latency_p95_ms": 10, "error_rate": 0.0,
             "versions": {"2.0.0": {"latency_p95_ms": 90}}},
        ],
    })  # fmt: skip
    async with _fleet(world, 6, profile) as fleet:
        await world.assign_all(fleet, "1.0.0")
        rollout = await world.rollout(
            _stage(100.0, bake_time=_seconds(3), on_failure=o.FAILURE_ACTION_ABORT_REVERT,
                   gates=o.HealthGates(latency_budget_factor=1.0)),
        )  # fmt: skip
        done = await world.wait(
            rollout.id, lambda r: r.state == o.ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES
        )
        assert "dropped and reverted: gw" in done.reason, done.reason
        by_class = {(d.class_name, d.state) for d in done.devices}
        assert by_class == {(PI, o.ROLLOUT_DEVICE_STATE_COMMITTED),
                            (GW, o.ROLLOUT_DEVICE_STATE_REVERTED)}  # fmt: skip
        assert all("latency" in d.reason for d in done.devices if d.class_name == GW)
        await fleet.wait_until(
            lambda f: all(a.active_version == ("2.0.0" if a.profile_class.name == PI else "1.0.0")
                          for a in f.agents), 30, what="pi on 2.0.0, gw back on 1.0.0",
        )  # fmt: skip


async def test_a_replica_reuses_its_copy_of_the_members_only_while_its_lease_is_unbroken(
    world: World,
) -> None:
    """Only the lease holder writes a rollout's members, so a replica may keep
    them between its steps, but not once another replica held the lease."""
    async with _fleet(world, 2, _profile()) as fleet:
        await world.assign_all(fleet, "1.0.0")
        draft = await world.draft()
        rollout_id = draft.id  # a draft: the server's own orchestrator leaves it
        now = [dt.datetime(2026, 12, 1, tzinfo=dt.UTC)]

        def replica(owner: str) -> Orchestrator:
            return Orchestrator(world.cp.db, EventBus(), owner=owner, offline_after_s=60,
                                lease_s=10, clock=lambda: now[0])  # fmt: skip

        a, b = replica("replica-a"), replica("replica-b")
        assert await asyncio.to_thread(a._take_lease, rollout_id)
        a._members[rollout_id] = []  # what a step would leave
        now[0] += dt.timedelta(seconds=5)
        assert not await asyncio.to_thread(b._take_lease, rollout_id)  # a still holds it
        assert await asyncio.to_thread(a._take_lease, rollout_id)  # renewed: copy kept
        assert rollout_id in a._members
        now[0] += dt.timedelta(seconds=11)  # a's lease lapsed; b takes over
        assert await asyncio.to_thread(b._take_lease, rollout_id)
        now[0] += dt.timedelta(seconds=11)  # and b's lapses too; a takes it back
        assert await asyncio.to_thread(a._take_lease, rollout_id)
        assert rollout_id not in a._members  # b may have written them: reload


async def test_a_lease_is_renewed_once_half_of_it_is_used_up(world: World) -> None:
    """Renewing every tick was a write transaction per rollout per tick;
    with half the lease left the holder drives on without one, and nobody
    else can take the lease meanwhile."""
    async with _fleet(world, 2, _profile()) as fleet:
        await world.assign_all(fleet, "1.0.0")
        draft = await world.draft()  # not started: the server's orchestrator leaves it
    now = [dt.datetime(2026, 12, 1, tzinfo=dt.UTC)]

    def replica(owner: str) -> Orchestrator:
        return Orchestrator(world.cp.db, EventBus(), owner=owner, offline_after_s=60,
                            lease_s=10, clock=lambda: now[0])  # fmt: skip

    def expiry() -> dt.datetime:
        with world.cp.db.unit_of_work(readonly=True) as uow:
            row = uow.session.get_one(RolloutRow, draft.id)
            value = row.lease_expires_at
        assert value is not None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value

    a, b = replica("replica-a"), replica("replica-b")
    t0 = now[0]
    assert await asyncio.to_thread(a._take_lease, draft.id)
    assert await asyncio.to_thread(expiry) == t0 + dt.timedelta(seconds=10)
    now[0] = t0 + dt.timedelta(seconds=4)
    assert await asyncio.to_thread(a._take_lease, draft.id)
    assert await asyncio.to_thread(expiry) == t0 + dt.timedelta(seconds=10)  # not written
    now[0] = t0 + dt.timedelta(seconds=6)
    assert await asyncio.to_thread(a._take_lease, draft.id)
    assert await asyncio.to_thread(expiry) == t0 + dt.timedelta(seconds=16)  # renewed
    now[0] = t0 + dt.timedelta(seconds=12)
    assert not await asyncio.to_thread(b._take_lease, draft.id)


async def test_the_orchestrator_forgets_rollouts_that_need_no_more_work(world: World) -> None:
    """What the orchestrator keeps per rollout (its copy of the members, its
    lease mark) goes once the rollout is finished, also when an operator
    finished it: otherwise it grows with every rollout the server runs."""
    orchestrator = world.cp.orchestrator
    assert orchestrator is not None
    async with _fleet(world, 2, _profile()) as fleet:
        await world.assign_all(fleet, "1.0.0")
        rollout = await world.rollout(_stage(1, require_approval=True), _stage(100.0))
        await world.wait(rollout.id, lambda r: r.state == o.ROLLOUT_STATE_WAITING_APPROVAL)
        assert rollout.id in orchestrator._members and rollout.id in orchestrator._lease_marks
        # Without revert the abort finishes it at once: no step drives it again.
        await world.op.AbortRollout(o.AbortRolloutRequest(id=rollout.id, revert=False),
                                    metadata=ADMIN)  # fmt: skip
        deadline = asyncio.get_running_loop().time() + 10
        while rollout.id in orchestrator._members or rollout.id in orchestrator._lease_marks:
            assert asyncio.get_running_loop().time() < deadline, "kept after the abort"
            await asyncio.sleep(0.1)


async def test_a_step_reads_its_devices_with_the_same_statements_whatever_their_number(
    world: World,
) -> None:
    """SQLite keeps every statement text it prepared (128 per connection, at
    about 200 bytes per parameter): a step whose queries name its devices
    in IN (?, ?, ...) left a new one nearly every tick, and RSS grew."""
    async with _fleet(world, 4, _profile()) as fleet:
        await world.assign_all(fleet, "1.0.0")
        draft = await world.draft()  # not started: the server's orchestrator leaves it
    orchestrator = Orchestrator(world.cp.db, EventBus(), owner="test", offline_after_s=60)

    def statements(in_flight: int) -> list[str]:
        """What reading the reports and the health runs with `in_flight` of the
        members notified and as many committed (rolled back after)."""
        me, seen = threading.get_ident(), []

        def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if threading.get_ident() == me:
                seen.append(statement)

        with world.cp.db.unit_of_work() as uow:
            row = uow.session.get_one(RolloutRow, draft.id)
            step = _Applier(orchestrator, uow, row, utcnow(), None)
            members = sorted(step.snapshot.members.values(), key=lambda m: m.device_id)
            chosen = members[:in_flight]
            uow.session.execute(
                update(RolloutDeviceRow)
                .where(RolloutDeviceRow.rollout_id == draft.id,
                       RolloutDeviceRow.device_id.in_([d.device_id for d in chosen]))
                .values(state=MemberState.NOTIFIED)
            )  # fmt: skip
            for d in chosen:
                d.state = MemberState.NOTIFIED
            event.listen(world.cp.db.engine, "before_cursor_execute", record)
            try:
                step.reports(step.snapshot.members)
                for d in chosen:
                    d.state, d.finished_at = MemberState.COMMITTED, utcnow()
                step.health(members, None)
            finally:
                event.remove(world.cp.db.engine, "before_cursor_execute", record)
        return seen

    one = await asyncio.to_thread(statements, 1)
    every = await asyncio.to_thread(statements, len(draft.devices))
    assert len(one) == 2 and one == every
