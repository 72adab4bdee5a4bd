"""Rollouts survive the control plane: SIGKILL mid-rollout and restart, and
two replicas on PostgreSQL where the one driving the rollout is killed.
Real control-plane processes with real builds (the digits MLP), simulated
agents (fleetsim) on the real protocol."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from edgefleet.demo.models import build_digits_classifier
from edgefleet.sim import Fleet, parse_profile
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from testkit.harness import ADMIN_TOKEN, ControlPlane, env_without_proxy
from testkit.models import model_parts, push_model, wait_builds

pytestmark = pytest.mark.timeout(600)

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")

MODEL = "digits"
PROFILE = {
    "heartbeat_interval_s": 1,
    "telemetry_interval_s": 1,
    "classes": [
        {"name": "pi", "hardware": {"arch": "aarch64"}, "install_s": [0.5, 1.5]},
        {"name": "gw", "hardware": {"arch": "x86_64"}, "install_s": [0.5, 1.5]},
    ],
}


def _setup(cp: ControlPlane, root: Path) -> str:
    """Classes, two real versions built, an enrollment token."""
    op = cp.operator()
    for name, arch in (("pi", "aarch64"), ("gw", "x86_64")):
        op.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name=name, constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME),
                match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=[arch])],
            )
        )  # fmt: skip
    for seed, version in enumerate(("1.0.0", "2.0.0")):
        built = build_digits_classifier(root / version, seed=seed)
        push_model(
            op, MODEL, version, model_parts(model=built.model, sample_data=built.sample_data)
        )
    builds = wait_builds(op, 4, timeout=300)
    assert all(b.state == o.BUILD_STATE_SUCCEEDED for b in builds), builds
    return str(op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="sim")).secret)


def _fleet(address: str, token: str, n: int, prefix: str) -> Fleet:
    return Fleet(address, token, parse_profile(PROFILE), n=n, prefix=prefix, seed=prefix,
                 backoff_initial_s=0.2, backoff_max_s=1.0)  # fmt: skip


async def _assign(op: Any, fleets: list[Fleet], version: str) -> None:
    agents = [a for f in fleets for a in f.agents]
    op.AssignModel(o.AssignModelRequest(device_ids=[a.device_id for a in agents],
                                        model_name=MODEL, model_version=version))  # fmt: skip
    for fleet in fleets:
        await fleet.wait_until(lambda f: all(a.active_version == version for a in f.agents), 60)


def _create(op: Any, stages: int = 3, bake_s: int = 2) -> str:
    spec = o.RolloutSpec(model_name=MODEL, model_version="2.0.0", class_names=["pi", "gw"])
    for i in range(stages):
        stage = spec.stages.add(name=f"s{i + 1}")
        stage.percent = [10.0, 50.0, 100.0][i] if stages == 3 else 100.0 / (stages - i)
        stage.bake_time.FromSeconds(bake_s)
    return str(op.CreateRollout(o.CreateRolloutRequest(spec=spec, start=True)).rollout.id)


async def _until(op_of: Any, rollout_id: str, done: Any, within_s: float = 120) -> o.Rollout:
    deadline = time.monotonic() + within_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = op_of().GetRollout(o.GetRolloutRequest(id=rollout_id), timeout=5)
            if done(last):
                return last
        except Exception:  # the control plane is restarting
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"rollout did not get there: {last}")


def _sequences(op: Any, device_ids: list[str]) -> dict[str, int]:
    listed = op.ListDeployments(o.ListDeploymentsRequest(model_name=MODEL))
    return {a.device_id: a.sequence for a in listed.assignments if a.device_id in device_ids}


@pytest.fixture
def control_plane_1(tmp_path: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path / "cp", None, "--build-workers", "1", "--heartbeat-interval", "1")
    cp.start()
    try:
        yield cp
    finally:
        cp.close()


async def test_sigkill_mid_rollout_then_restart_completes_it_assigning_each_device_once(
    control_plane_1: ControlPlane, tmp_path: Path
) -> None:
    cp = control_plane_1
    token = _setup(cp, tmp_path)
    fleet = _fleet(cp.address, token, 20, "kill")
    await fleet.start()
    watch: asyncio.subprocess.Process | None = None
    try:
        await _assign(cp.operator(), [fleet], "1.0.0")
        rollout_id = _create(cp.operator())
        # An operator watches it, into a pipe: the watch outlives the restart.
        watch = await asyncio.create_subprocess_exec(
            EDGEFLEET, "--server", cp.address, "--token", ADMIN_TOKEN,
            "rollouts", "watch", rollout_id,
            stdout=PIPE, stderr=PIPE, env=env_without_proxy(),
        )  # fmt: skip
        # Mid-rollout: the first stage has committed devices, later ones wait.
        await _until(cp.operator, rollout_id, lambda r: r.stages[0].committed >= 1)
        cp.kill()
        await asyncio.sleep(3)  # the watch polls a dead port a few times
        cp.start()
        done = await _until(cp.operator, rollout_id,
                            lambda r: r.state == o.ROLLOUT_STATE_SUCCEEDED)  # fmt: skip
        # It saw the control plane go and come back, said so on stderr, and
        # followed the rollout to its end.
        out, err = (b.decode() for b in await asyncio.wait_for(watch.communicate(), 60))
        assert watch.returncode == 0, err
        assert "lost the control plane (UNAVAILABLE); still watching" in err, err
        assert err.rstrip().endswith("reconnected"), err
        assert "succeeded" in out.splitlines()[-1], out
        ids = [a.device_id for a in fleet.agents]
        assert len(done.devices) == 20
        assert all(d.state == o.ROLLOUT_DEVICE_STATE_COMMITTED for d in done.devices)
        assert all(d.attempts == 1 for d in done.devices), "a device was notified twice"
        # One assignment for 1.0.0, one for 2.0.0: nothing assigned twice.
        assert set(_sequences(cp.operator(), ids).values()) == {2}
        await fleet.wait_until(lambda f: all(a.active_version == "2.0.0" for a in f.agents), 30)
    finally:
        if watch is not None and watch.returncode is None:
            watch.kill()  # a watch waits out a lost control plane for ever
            await watch.wait()
        await fleet.stop()


async def test_two_replicas_on_postgresql_the_survivor_finishes_the_rollout(
    tmp_path: Path, pg_url: str
) -> None:
    replicas = [
        ControlPlane(tmp_path / f"cp{i}", pg_url, "--build-workers", str(1 - i),
                     "--heartbeat-interval", "1")
        for i in range(2)
    ]  # fmt: skip
    for cp in replicas:
        cp.start()
    fleets: list[Fleet] = []
    try:
        token = _setup(replicas[0], tmp_path)
        fleets = [_fleet(cp.address, token, 10, f"r{i}") for i, cp in enumerate(replicas)]
        for fleet in fleets:
            await fleet.start()
        await _assign(replicas[0].operator(), fleets, "1.0.0")
        rollout_id = _create(replicas[0].operator(), bake_s=3)
        engine = create_engine(pg_url)

        def owner() -> str:
            with engine.connect() as conn:
                return str(conn.execute(text("SELECT lease_owner FROM rollouts")).scalar() or "")

        await _until(replicas[0].operator, rollout_id, lambda r: r.stages[0].committed >= 1)
        driver = next(cp for cp in replicas if f":{cp.proc.pid}:" in owner())  # type: ignore[union-attr]
        survivor = next(cp for cp in replicas if cp is not driver)
        killed = f":{driver.proc.pid}:"  # type: ignore[union-attr]
        driver.kill()
        # The survivor takes the lease over once it expires.
        deadline = time.monotonic() + 30
        while f":{survivor.proc.pid}:" not in owner():  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"lease still held by {owner()}"
            await asyncio.sleep(0.2)
        driver.start()  # its devices reconnect; the survivor keeps driving
        done = await _until(survivor.operator, rollout_id,
                            lambda r: r.state == o.ROLLOUT_STATE_SUCCEEDED)  # fmt: skip
        assert all(d.state == o.ROLLOUT_DEVICE_STATE_COMMITTED for d in done.devices)
        assert all(d.attempts == 1 for d in done.devices)
        # Free, or held by a live replica: the survivor, or the restarted
        # driver if the survivor (on a loaded machine) let a renewal lapse,
        # which is how leases are meant to fail over. Never the dead one.
        assert killed not in owner()
        engine.dispose()
    finally:
        for fleet in fleets:
            await fleet.stop()
        for cp in replicas:
            cp.close()
