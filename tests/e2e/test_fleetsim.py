"""The fleet simulator (fleetsim): profiles, the samples and update states a
simulated agent produces, and whole simulated fleets against a real
in-process control plane: enrolled and placed in classes by match rules,
installing what AssignModel gives them (or failing as their profile says,
keeping the old version), uploading telemetry, reconnecting, going silent."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.controlplane.api.convert import sample_from_pb
from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.client import bearer_metadata
from edgefleet.controlplane.server import ControlPlane
from edgefleet.controlplane.services.telemetry import validate_batch
from edgefleet.demo.models import mlp_graph
from edgefleet.sim import (
    Behaviour,
    Fleet,
    FleetError,
    ProfileError,
    SimAgent,
    default_profile,
    make_sample,
    parse_profile,
)
from edgefleet.sim.agent import FleetContext
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from tests.e2e.test_api import _parts, _push_requests
from tests.e2e.test_builds_service import _fake_result

ADMIN = bearer_metadata(ADMIN_TOKEN)
FAST = {"install_s": [0.05, 0.2]}
BAD_REASON = "golden outputs out of tolerance on gw"


# ------------------------------------------------------------------ profiles


def test_profile_overrides_apply_class_then_fleet_versions_then_class_versions() -> None:
    profile = parse_profile(
        {
            "versions": {"2.0.0": {"latency_factor": 2.0, "error_rate": 0.1}},
            "classes": [
                {
                    "name": "a",
                    "count": 2,
                    "latency_p95_ms": 10,
                    "versions": {"2.0.0": {"error_rate": 0.5, "fail_rate": 1.0}},
                },
                {"name": "b", "weight": 1, "hardware": {"arch": "x86_64"}},
            ],
        }
    )
    assert profile.behaviour("a", "1.0.0").p95_ms == 10
    two = profile.behaviour("a", "2.0.0")
    assert (two.p95_ms, two.p50_ms, two.error_rate, two.fail_rate) == (20, 10, 0.5, 1.0)
    assert two.reason.startswith("golden outputs")  # the default for "validating"
    assert profile.behaviour("b", "2.0.0").error_rate == 0.1
    b = profile.class_named("b")
    assert (b.hardware.arch, b.hardware.os, b.runtime.agent_version) == (
        "x86_64", "Linux", "0.1.0+fleetsim",
    )  # fmt: skip
    # Counts first, the rest by weight; classes interleave.
    assert [cls.name for cls in profile.allocate(5)] == ["b", "a", "b", "a", "b"]
    assert [cls.name for cls in profile.allocate(1)] == ["a"]
    # With weights only, a device keeps its class whatever the fleet's size.
    default = default_profile()
    small, large = default.allocate(12), default.allocate(600)
    assert [x.name for x in small] == [x.name for x in large[:12]]
    assert Counter(x.name for x in large) == {"pi": 300, "gateway": 200, "jetson": 100}
    # It round-trips through its JSON form.
    assert parse_profile(default.to_dict()).to_dict() == default.to_dict()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"classes": [{"name": "a", "latency_p95": 3}]}, "unknown key(s) latency_p95"),
        ({"classes": [{"name": "a", "fail_state": "exploding"}]}, "fail_state: one of"),
        ({"classes": [{"name": "a", "error_rate": 2}]}, "between 0 and 1"),
        ({"classes": [{"name": "a", "install_s": [5, 1]}]}, "low <= high"),
        ({"classes": [{"name": "a", "hardware": {"arc": "x"}}]}, "hardware"),
        ({"classes": [{"name": "a"}, {"name": "a"}]}, "duplicate name(s) a"),
        ({"classes": [{"name": "a", "weight": 1, "count": 3}]}, "not both"),
        ({"classes": [{"name": "a", "versions": {"2": {"agreement": -1}}}]}, "versions.2"),
        ({"versions": {"2": {"nope": 1}}, "classes": [{"name": "a"}]}, "versions.2"),
        ({"classes": []}, "non-empty list"),
    ],
)
def test_profile_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ProfileError, match=None) as info:
        parse_profile(data)
    assert message in str(info.value)


def test_only_counted_classes_cannot_hold_more_devices() -> None:
    profile = parse_profile({"classes": [{"name": "a", "count": 2}]})
    assert len(profile.allocate(2)) == 2
    with pytest.raises(ProfileError, match="no class has a weight"):
        profile.allocate(3)


def test_samples_pass_the_control_plane_validation() -> None:
    rng = random.Random(1)
    now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    good = Behaviour(latency_p95_ms=30, error_rate=0.3, requests_per_s=50, jitter=0.5)
    candidate = Behaviour(latency_p95_ms=60, agreement=0.6, shadow_sample=1.0)
    samples = [
        make_sample(rng, 1, 10.0, "", "", None, 4000),
        make_sample(rng, 2, 10.0, "m", "1.0.0", good, 4000),
        make_sample(rng, 3, 0.01, "m", "1.0.0", Behaviour(requests_per_s=0), 64),
        make_sample(rng, 4, 10.0, "m", "1.0.0", good, 4000, ("2.0.0", candidate)),
    ]
    for _ in range(200):
        samples.append(make_sample(rng, len(samples) + 1, 10.0, "m", "1", good, 512))
    validate_batch([sample_from_pb(s) for s in samples], now_ms)  # raises if invalid
    idle, busy, _, shadowed = samples[:4]
    assert idle.request_count == 0 and idle.memory_mb == 0 and idle.cpu_percent > 0
    assert 250 <= busy.request_count <= 750 and 0 < busy.error_count < busy.request_count
    assert busy.latency_p50_ms <= busy.latency_p95_ms <= busy.latency_p99_ms
    assert shadowed.shadow_version == "2.0.0" and shadowed.shadow_requests > 0
    assert 0.55 < shadowed.shadow_agreement < 0.65 and shadowed.shadow_max_diff > 0.5
    assert shadowed.shadow_latency_p95_ms > 30
    errors = sum(s.error_count for s in samples[4:])
    requests = sum(s.request_count for s in samples[4:])
    assert 0.27 < errors / requests < 0.33


# ------------------------------------------------------------------ one agent, no server


def _desired(revision: int, sequence: int, version: str, *, shadow: bool = False) -> Any:
    return d.DesiredState(
        revision=revision,
        device_state=c.DEVICE_STATE_ACCEPTED,
        class_name="pi",
        assignment=d.Assignment(
            model_name="m", model_version=version, artifact_digest=f"digest-{version}",
            artifact_size=1000, sequence=sequence, shadow=shadow, rollout_id="r1",
        ),
    )  # fmt: skip


async def _settled(agent: SimAgent, state: str, version: str) -> None:
    for _ in range(400):
        if (agent.update_state, agent.update_version) == (state, version):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"agent at {agent.update_state} {agent.update_version}")


async def test_shadow_keeps_the_active_version_and_a_newer_assignment_aborts_an_update() -> None:
    profile = parse_profile(
        {
            "classes": [
                {
                    "name": "pi",
                    "install_s": [0.05, 0.05],
                    "versions": {
                        "2.0.0": {"agreement": 0.6, "latency_p95_ms": 99},
                        "3.0.0": {"install_s": [30, 30]},
                    },
                }
            ]
        }
    )
    ctx = FleetContext(profile, "token", asyncio.Semaphore(1), random.Random(2))
    agent = SimAgent(0, "unit", profile.classes[0], ctx)
    try:
        assert agent.apply_desired(_desired(1, 1, "1.0.0"))
        await _settled(agent, "committed", "1.0.0")
        assert agent.states() == [
            "downloading", "verifying", "validating", "activating", "committed",
        ]  # fmt: skip
        assert (agent.status.active_model_version, agent.status.bytes_done) == ("1.0.0", 1000)
        assert (agent.status.sequence, agent.status.rollout_id) == (1, "r1")

        assert agent.apply_desired(_desired(2, 2, "2.0.0", shadow=True))
        await _settled(agent, "shadowing", "2.0.0")
        assert agent.states() == ["downloading", "verifying", "validating", "shadowing"]
        assert (agent.active_version, agent.shadow_version) == ("1.0.0", "2.0.0")
        assert agent.status.active_model_version == "1.0.0"
        sample = agent.next_sample(10.0)
        assert (sample.model_version, sample.shadow_version) == ("1.0.0", "2.0.0")
        assert 0.55 < sample.shadow_agreement < 0.65 and sample.shadow_latency_p95_ms > 80
        # A repeated desired state (a reconnect) changes nothing.
        assert not agent.apply_desired(_desired(2, 2, "2.0.0", shadow=True))

        # 3.0.0 takes 30 s; 4.0.0 arriving while it downloads aborts it.
        agent.apply_desired(_desired(3, 3, "3.0.0"))
        await _settled(agent, "downloading", "3.0.0")
        assert agent.shadow_version == ""  # the new assignment unloaded the shadow
        agent.apply_desired(_desired(4, 4, "1.0.0"))
        await _settled(agent, "committed", "1.0.0")
        assert agent.update_sequence == 4
        assert agent.active_version == "1.0.0"
        assert (3, "failed", "superseded by assignment 4") in agent.update_history
        assert agent.states(3) == ["downloading", "failed"]
    finally:
        if agent._update_task is not None:
            agent._update_task.cancel()


# ------------------------------------------------------------------ fleets against a server


@dataclass
class Setup:
    op: og.OperatorServiceAsyncStub
    channel: grpc.aio.Channel
    token: str


def _model(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=(64, 16)), rng.normal(size=(16, 10))]
    biases = [rng.normal(size=16), rng.normal(size=10)]
    onnx.save(mlp_graph(weights, biases, opset=17), path)
    return path


async def _publish_builds(
    cp: ControlPlane, op: og.OperatorServiceAsyncStub, models: dict[str, Path]
) -> None:
    """Play the build runner: finish every queued build with a hand-made
    result over the pushed model's file."""
    import hashlib

    by_digest = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in models.values()}
    builds = cp.builds
    assert builds is not None
    for _ in range(400):
        listed = await op.ListBuilds(o.ListBuildsRequest(), metadata=ADMIN)
        states = [b.state for b in listed.builds]
        if len(states) == 2 * len(models) and all(s == o.BUILD_STATE_SUCCEEDED for s in states):
            return
        job = await asyncio.to_thread(builds.claim, "test-runner", 60)
        if job is None:
            await asyncio.sleep(0.05)
            continue
        result = _fake_result(by_digest[job.model_digest])
        assert await asyncio.to_thread(builds.finish, job, "test-runner", result, "")
    raise AssertionError(f"builds did not finish: {listed}")


@pytest.fixture
async def setup(server: ControlPlane, tmp_path: Path) -> AsyncIterator[Setup]:
    """Two classes placed by match rules (Raspberry Pis by board model,
    gateways by arch), digits 1.0.0 and 2.0.0 built for both, a token."""
    channel = grpc.aio.insecure_channel(server.address)
    op: og.OperatorServiceAsyncStub = og.OperatorServiceStub(channel)
    rules = {
        "pi": c.MatchRule(field="board_model", op=c.MATCH_OP_GLOB, values=["Raspberry Pi*"]),
        "gw": c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=["x86_64"]),
    }
    for name, rule in rules.items():
        await op.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name=name,
                constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME),
                match_rules=[rule],
            ),
            metadata=ADMIN,
        )
    models = {
        v: _model(tmp_path / f"digits-{v}.onnx", seed) for seed, v in enumerate(("1.0.0", "2.0.0"))
    }
    for version, path in models.items():
        await op.PushModel(_push_requests("digits", version, _parts(model=path)), metadata=ADMIN)
    await _publish_builds(server, op, models)
    token = await op.CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name="sim", policy=o.ENROLLMENT_POLICY_AUTO_ACCEPT),
        metadata=ADMIN,
    )
    try:
        yield Setup(op, channel, token.secret)
    finally:
        await channel.close(None)


PI = {"board_model": "Raspberry Pi 4 Model B Rev 1.4", "arch": "aarch64", "memory_mb": 3792}
GW = {"board_model": "Intel NUC11TNHi5", "arch": "x86_64", "memory_mb": 15700}


async def _assign(op: og.OperatorServiceAsyncStub, fleet: Fleet, version: str) -> None:
    await op.AssignModel(
        o.AssignModelRequest(device_ids=[a.device_id for a in fleet.agents], model_name="digits",
                             model_version=version, reason="fleetsim test"),
        metadata=ADMIN,
    )  # fmt: skip


async def _devices(op: og.OperatorServiceAsyncStub, prefix: str) -> list[c.Device]:
    listed = await op.ListDevices(o.ListDevicesRequest(labels={"fleetsim": prefix}), metadata=ADMIN)
    return list(listed.devices)


async def _wait_devices(
    op: og.OperatorServiceAsyncStub, prefix: str, expected: Counter[tuple[str, str, str]]
) -> list[c.Device]:
    """Until the control plane's view, (class, update state, active version)
    per device, is `expected`."""
    for _ in range(200):
        devices = await _devices(op, prefix)
        seen = Counter(
            (x.class_name, x.update.state, x.update.active_model_version) for x in devices
        )
        if seen == expected:
            return devices
        await asyncio.sleep(0.05)
    raise AssertionError(f"control plane sees {seen}, expected {expected}")


async def test_a_simulated_fleet_is_classified_installs_fails_as_profiled_and_reports(
    server: ControlPlane, setup: Setup
) -> None:
    profile = parse_profile(
        {
            "classes": [
                {"name": "pi", "count": 30, "hardware": PI, "labels": {"site": "lab"}, **FAST},
                {
                    "name": "gw",
                    "count": 20,
                    "hardware": GW,
                    **FAST,
                    "versions": {
                        "2.0.0": {
                            "fail_rate": 1.0,
                            "fail_state": "validating",
                            "fail_reason": BAD_REASON,
                            "latency_p95_ms": 80,
                        }
                    },
                },
            ]
        }
    )
    op = setup.op
    fleet = Fleet(server.address, setup.token, profile, 50, prefix="t1",
                  telemetry_interval_s=0.3, agents_per_channel=20, seed=1)  # fmt: skip
    await fleet.start(timeout_s=60)
    try:
        assert len(fleet._channels) == 3
        assert fleet.connections() == {"online": 50}
        assert fleet.counts() == {("idle", ""): 50}
        # The match rules placed them, and both sides agree on the class.
        devices = await _devices(op, "t1")
        assert Counter(x.class_name for x in devices) == {"pi": 30, "gw": 20}
        assert all(x.labels["site"] == "lab" for x in devices if x.class_name == "pi")
        assert Counter(a.class_name for a in fleet.agents) == {"pi": 30, "gw": 20}
        assert all(a.class_name == a.profile_class.name for a in fleet.agents)

        await _assign(op, fleet, "1.0.0")
        await fleet.wait_until(lambda f: f.counts() == {("committed", "1.0.0"): 50}, 30)
        assert fleet.active_versions() == {"1.0.0": 50}
        devices = await _wait_devices(
            op, "t1", Counter({("pi", "committed", "1.0.0"): 30, ("gw", "committed", "1.0.0"): 20})
        )
        listed = await op.ListDeployments(
            o.ListDeploymentsRequest(model_name="digits", model_version="1.0.0", limit=1000),
            metadata=ADMIN,
        )
        assert len(listed.assignments) == 50
        assert Counter(e.state for e in listed.events) == {
            s: 50 for s in ("downloading", "verifying", "validating", "activating", "committed")
        }
        assert {x.update.active_artifact_digest for x in devices} == {
            a.artifact_digest for a in listed.assignments
        }

        # 2.0.0 fails on every gateway, which keeps serving 1.0.0.
        await _assign(op, fleet, "2.0.0")
        await fleet.wait_until(
            lambda f: f.counts() == {("committed", "2.0.0"): 30, ("failed", "2.0.0"): 20}, 30
        )
        assert fleet.active_versions() == {"2.0.0": 30, "1.0.0": 20}
        gw = next(a for a in fleet.agents if a.profile_class.name == "gw")
        assert gw.states() == [
            "downloading", "verifying", "validating", "rolling_back", "failed",
        ]  # fmt: skip
        devices = await _wait_devices(
            op, "t1", Counter({("pi", "committed", "2.0.0"): 30, ("gw", "failed", "1.0.0"): 20})
        )
        failed = next(x for x in devices if x.id == gw.device_id)
        assert (failed.update.model_version, failed.update.reason) == ("2.0.0", BAD_REASON)
        history = await op.ListDeployments(
            o.ListDeploymentsRequest(device_id=gw.device_id), metadata=ADMIN
        )
        assert [e.state for e in history.events][:3] == ["failed", "rolling_back", "validating"]

        # Telemetry for both versions, from every device, the gateways'
        # latency of the version they never activated absent.
        await fleet.wait_until(lambda f: f.ctx.stats.telemetry_samples >= 200, 20)
        assert fleet.ctx.stats.telemetry_failures == 0
        by_version = await _query(
            op, o.TELEMETRY_METRIC_REQUEST_COUNT, o.TELEMETRY_GROUP_BY_MODEL_VERSION
        )
        assert {"digits@1.0.0", "digits@2.0.0"} <= set(by_version)
        assert all(sum(p.value for p in s.points) > 0 for s in by_version.values())
        by_device = await _query(op, o.TELEMETRY_METRIC_REQUEST_COUNT, o.TELEMETRY_GROUP_BY_DEVICE)
        assert {a.device_id for a in fleet.agents} <= set(by_device)
        p95 = await _query(op, o.TELEMETRY_METRIC_LATENCY_P95_MS, o.TELEMETRY_GROUP_BY_CLASS,
                           model_version="2.0.0")  # fmt: skip
        assert set(p95) == {"pi"}

        summary = fleet.summary()
        assert summary.updates == {"2.0.0": {"committed": 30, "failed": 20}}
        assert summary.classes == {"gw": 20, "pi": 30}
    finally:
        await fleet.stop()
    assert fleet.connections() == {"stopped": 50}
    assert not fleet.running
    await fleet.stop()  # idempotent


async def _query(
    op: og.OperatorServiceAsyncStub, metric: Any, group_by: Any, model_version: str = ""
) -> dict[str, o.TelemetrySeries]:
    now = dt.datetime.now(dt.UTC)
    start, end = Timestamp(), Timestamp()
    start.FromDatetime(now - dt.timedelta(minutes=10))
    end.FromDatetime(now + dt.timedelta(minutes=1))
    response = await op.QueryTelemetry(
        o.QueryTelemetryRequest(metric=metric, group_by=group_by, start=start, end=end,
                                model_name="digits", model_version=model_version),
        metadata=ADMIN,
    )  # fmt: skip
    return {s.group: s for s in response.series}


async def test_agents_reconnect_download_and_silent_devices_go_dark_after_committing(
    server: ControlPlane, setup: Setup
) -> None:
    profile = parse_profile(
        {
            "classes": [
                {"name": "pi", "count": 4, "hardware": PI, **FAST},
                {
                    "name": "gw",
                    "count": 2,
                    "hardware": GW,
                    **FAST,
                    "versions": {"1.0.0": {"silent_after_commit": True}},
                },
            ]
        }
    )
    fleet = Fleet(server.address, setup.token, profile, 6, prefix="t2", download=True,
                  telemetry_interval_s=0.2, backoff_initial_s=0.1)  # fmt: skip
    async with fleet:
        # The control plane ends every stream: all come back.
        server.hub.close_all("test restart")
        await fleet.wait_until(lambda f: all(a.connects == 2 for a in f.agents), 20)
        await fleet.wait_until(lambda f: f.connections() == {"online": 6}, 20)
        assert fleet.summary().stats["errors"] == {"Sync UNAVAILABLE": 6}

        await _assign(setup.op, fleet, "1.0.0")
        await fleet.wait_until(
            lambda f: (
                f.connections() == {"online": 4, "silent": 2}
                and f.counts() == {("committed", "1.0.0"): 6}
            ),
            20,
        )
        silent = [a for a in fleet.agents if a.connection == "silent"]
        assert {a.profile_class.name for a in silent} == {"gw"}
        # Each really downloaded its artifact (and checked its digest).
        stats = fleet.ctx.stats
        assert stats.downloads == 6
        assert stats.download_bytes == sum(a.status.bytes_total for a in fleet.agents) > 0
        # The committed report went out before the device went dark.
        await _wait_devices(setup.op, "t2", Counter(
            {("pi", "committed", "1.0.0"): 4, ("gw", "committed", "1.0.0"): 2}))  # fmt: skip
        seqs = [a.telemetry_seq for a in silent]
        beats = [a.heartbeat_seq for a in silent]
        await asyncio.sleep(1.0)
        assert [a.telemetry_seq for a in silent] == seqs
        assert [a.heartbeat_seq for a in silent] == beats
        assert not any(server.hub.is_connected(a.device_id) for a in silent)
        assert all(server.hub.is_connected(a.device_id) for a in fleet.agents if a.online)


async def test_a_refused_token_fails_start_and_a_rerun_is_the_same_devices(
    server: ControlPlane, setup: Setup
) -> None:
    profile = parse_profile({"classes": [{"name": "pi", "hardware": PI, **FAST}]})
    with pytest.raises(FleetError, match="3 agent\\(s\\) refused: Enroll UNAUTHENTICATED"):
        await Fleet(server.address, "wrong-token", profile, 3, prefix="t3").start(timeout_s=20)

    identities: dict[str, tuple[str, str]] = {}
    async with Fleet(server.address, setup.token, profile, 3, prefix="t3",
                     telemetry_interval_s=0.1, identities=identities) as first:  # fmt: skip
        ids = [a.device_id for a in first.agents]
        await first.wait_until(lambda f: all(a.telemetry_seq >= 3 for a in f.agents), 20)
    stored = [await _telemetry_mark(setup, a) for a in first.agents]
    # A second run with the same prefix: the same devices, and telemetry
    # numbered past what the first run stored (none dropped as redelivered).
    # Without the first run's credentials it could not prove to be them.
    with pytest.raises(FleetError, match="3 agent\\(s\\) refused: Enroll PERMISSION_DENIED"):
        await Fleet(server.address, setup.token, profile, 3, prefix="t3").start(timeout_s=20)
    async with Fleet(server.address, setup.token, profile, 3, prefix="t3",
                     telemetry_interval_s=0.1, identities=identities) as second:  # fmt: skip
        assert [a.device_id for a in second.agents] == ids
        await second.wait_until(lambda f: all(a.telemetry_seq >= 3 for a in f.agents), 20)
        await asyncio.sleep(0.5)
        marks = [await _telemetry_mark(setup, a) for a in second.agents]
    assert all(mark >= before + 3 for mark, before in zip(marks, stored, strict=True))
    assert len(await _devices(setup.op, "t3")) == 3


async def _telemetry_mark(setup: Setup, agent: SimAgent) -> int:
    """The highest telemetry seq the control plane stored for the device."""
    response = await dg.DeviceServiceStub(setup.channel).UploadTelemetry(
        d.UploadTelemetryRequest(), metadata=bearer_metadata(agent.credential)
    )
    return int(response.acked_seq)


# ------------------------------------------------------------------ the CLI


async def test_the_cli_runs_a_fleet_until_sigterm_and_prints_json(
    server: ControlPlane, setup: Setup, tmp_path: Path
) -> None:
    profile = tmp_path / "fleet.json"
    profile.write_text(json.dumps({"classes": [{"name": "gw", "hardware": GW, **FAST}]}))
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "edgefleet"), "--server", server.address, "simulate",
        "-n", "5", "--token", setup.token, "--profile", str(profile), "--prefix", "cli",
        "--refresh", "0.2", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        # The live summary, a line per refresh on a non-terminal stderr.
        assert proc.stderr is not None
        lines = []
        while not lines or "online=5 |" not in lines[-1]:
            lines.append((await asyncio.wait_for(proc.stderr.readline(), 20)).decode())
            assert lines[-1], "".join(lines)
        devices = await _devices(setup.op, "cli")
        assert len(devices) == 5 and all(x.online and x.class_name == "gw" for x in devices)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    summary = json.loads(stdout)
    assert summary["agents"] == 5
    assert summary["connection"] == {"stopped": 5}
    assert summary["classes"] == {"gw": 5}
    assert summary["updates"] == {"": {"idle": 5}}
    assert summary["stats"]["enrollments"] == 5


def test_the_cli_checks_its_profile_and_prints_the_default(tmp_path: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(cli, ["simulate", "--print-profile"])
    assert shown.exit_code == 0, shown.output
    assert [c["name"] for c in json.loads(shown.output)["classes"]] == ["pi", "jetson", "gateway"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"classes": [{"name": "a", "fail_rate": 3}]}))
    refused = runner.invoke(cli, ["simulate", "-n", "1", "--token", "t", "--profile", str(bad)])
    assert refused.exit_code == 2
    assert "fail_rate: must be between 0 and 1" in refused.output
    missing = runner.invoke(cli, ["simulate", "--token", "t"])
    assert missing.exit_code == 2 and "--agents is required" in missing.output


def test_fleetsim_is_a_client_and_imports_no_control_plane_or_agent_code() -> None:
    code = (
        "import sys, fleetsim, fleetsim.fleet, fleetsim.agent, fleetsim.profiles\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'controlplane', 'agent'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_agents_time_heartbeat_acks_and_account_for_every_sample_they_made() -> None:
    """Against the bare echo server (acks heartbeats, refuses every upload
    with UNIMPLEMENTED): round trips reach the hook, refused samples are kept
    up to the buffer bound and the ones pushed out are counted, and a drained
    fleet makes no new samples but keeps resending."""
    from bench.echo_server import EchoDeviceService
    from edgefleet.sim.agent import MAX_PENDING_SAMPLES

    echo = grpc.aio.server()
    dg.add_DeviceServiceServicer_to_server(EchoDeviceService(), echo)
    port = echo.add_insecure_port("127.0.0.1:0")
    await echo.start()
    rtts: list[tuple[int, float]] = []
    desired: list[int] = []
    fleet = Fleet(
        f"127.0.0.1:{port}", "token", parse_profile({"classes": [{"name": "pi"}]}), 3,
        prefix="hooks", heartbeat_interval_s=0.05, telemetry_interval_s=0.01,
        on_heartbeat_ack=lambda agent, rtt: rtts.append((agent.index, rtt)),
        on_desired=lambda agent, _: desired.append(agent.index),
    )  # fmt: skip
    try:
        await fleet.start(timeout_s=30)
        assert sorted(desired) == [0, 1, 2]  # each stream's first DesiredState
        await fleet.wait_until(
            lambda f: (
                all(a.telemetry_dropped > 0 for a in f.agents) and {i for i, _ in rtts} == {0, 1, 2}
            ),
            30,
        )
        assert all(rtt > 0 for _, rtt in rtts)
        stats = fleet.ctx.stats
        for agent in fleet.agents:
            assert agent.pending_samples == MAX_PENDING_SAMPLES
            assert agent.telemetry_produced == agent.telemetry_dropped + agent.pending_samples
        assert stats.telemetry_produced == sum(a.telemetry_produced for a in fleet.agents)
        assert stats.telemetry_dropped == sum(a.telemetry_dropped for a in fleet.agents)
        assert stats.telemetry_refused == 0 and stats.telemetry_samples == 0
        assert stats.telemetry_resends > 0  # what a failed upload held went again

        fleet.drain_telemetry()
        produced, failures = stats.telemetry_produced, stats.telemetry_failures
        await fleet.wait_until(lambda f: f.ctx.stats.telemetry_failures >= failures + 9, 30)
        assert stats.telemetry_produced == produced
        assert fleet.pending_samples() == 3 * MAX_PENDING_SAMPLES  # still held, still resent
    finally:
        await fleet.stop()
        await echo.stop(None)
