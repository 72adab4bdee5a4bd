"""Simulated fleets (fleetsim) against an in-process control plane: devices
classified, installing and failing as profiled and reporting it; agents
reconnecting and downloading, silent ones going dark after committing; a
refused token failing the start, and a rerun being the same devices."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.server import ControlPlane
from edgefleet.sim import (
    Fleet,
    FleetError,
    SimAgent,
    parse_profile,
)
from edgefleet.update_state import name_of, of_status
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.fleet import FAST, GW, PI, FleetSetup, fleet_devices
from testkit.harness import ADMIN_TOKEN

ADMIN = bearer_metadata(ADMIN_TOKEN)
BAD_REASON = "golden outputs out of tolerance on gw"


async def _assign(
    op: og.OperatorServiceAsyncStub, fleet: Fleet, version: str, model: str = "digits"
) -> None:
    await op.AssignModel(
        o.AssignModelRequest(device_ids=[a.device_id for a in fleet.agents], model_name=model,
                             model_version=version, reason="fleetsim test"),
        metadata=ADMIN,
    )  # fmt: skip


async def _wait_devices(
    op: og.OperatorServiceAsyncStub, prefix: str, expected: Counter[tuple[str, str, str]]
) -> list[c.Device]:
    """Until the control plane's view, (class, update state, active version)
    per device, is `expected`."""
    for _ in range(200):
        devices = await fleet_devices(op, prefix)
        seen = Counter(
            (x.class_name, of_status(x.update), x.update.active_model_version) for x in devices
        )
        if seen == expected:
            return devices
        await asyncio.sleep(0.05)
    raise AssertionError(f"control plane sees {seen}, expected {expected}")


async def test_a_simulated_fleet_is_classified_installs_fails_as_profiled_and_reports(
    server: ControlPlane, fleet_setup: FleetSetup
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
    op = fleet_setup.op
    fleet = Fleet(server.address, fleet_setup.token, profile, 50, prefix="t1",
                  telemetry_interval_s=0.3, agents_per_channel=20, seed=1)  # fmt: skip
    await fleet.start(timeout_s=60)
    try:
        assert len(fleet._channels) == 3
        assert fleet.connections() == {"online": 50}
        assert fleet.counts() == {("idle", ""): 50}
        # The match rules placed them, and both sides agree on the class.
        devices = await fleet_devices(op, "t1")
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
        assert Counter(name_of(e.state) for e in listed.events) == {
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
        assert [name_of(e.state) for e in history.events][:3] == [
            "failed", "rolling_back", "validating",
        ]  # fmt: skip

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
        assert summary.models == {"digits@2.0.0": {"committed": 30, "failed": 20}}
        assert summary.serving == {"digits@2.0.0": 30, "digits@1.0.0": 20}
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


def _models(device: c.Device) -> dict[str, tuple[str, str, str]]:
    """name -> (assigned version, state, version served) of each model the
    control plane lists for the device."""
    return {
        m.model_name: (m.assigned_version, of_status(m.status), m.status.active_model_version)
        for m in device.models
    }


async def test_protocol_2_agents_hold_two_models_and_drop_an_unassigned_one(
    server: ControlPlane, fleet_setup: FleetSetup
) -> None:
    profile = parse_profile({"classes": [{"name": "pi", "hardware": PI, **FAST}]})
    op = fleet_setup.op
    async with Fleet(server.address, fleet_setup.token, profile, 3, prefix="m2",
                     telemetry_interval_s=0.2) as fleet:  # fmt: skip
        await _assign(op, fleet, "1.0.0")
        await _assign(op, fleet, "1.0.0", model="vad")
        both = {"digits": "1.0.0", "vad": "1.0.0"}
        await fleet.wait_until(lambda f: all(a.serving() == both for a in f.agents), 30)
        assert fleet.model_counts() == {
            ("digits", "committed", "1.0.0"): 3, ("vad", "committed", "1.0.0"): 3,
        }  # fmt: skip
        committed = ("1.0.0", "committed", "1.0.0")
        for _ in range(200):
            devices = await fleet_devices(op, "m2")
            if all(_models(x) == {"digits": committed, "vad": committed} for x in devices):
                break
            await asyncio.sleep(0.05)
        assert [_models(x) for x in devices] == [{"digits": committed, "vad": committed}] * 3
        assert {x.agent_protocol for x in devices} == {2}

        removed = await op.UnassignModel(
            o.UnassignModelRequest(device_ids=[a.device_id for a in fleet.agents],
                                   model_name="vad", reason="test"),
            metadata=ADMIN,
        )  # fmt: skip
        assert sorted(removed.removed) == sorted(a.device_id for a in fleet.agents)
        await fleet.wait_until(
            lambda f: all(a.serving() == {"digits": "1.0.0"} for a in f.agents), 30
        )
        for _ in range(200):
            devices = await fleet_devices(op, "m2")
            if all(_models(x).get("vad", ("", "idle", ""))[2] == "" for x in devices):
                break
            await asyncio.sleep(0.05)
        assert all(_models(x)["digits"] == committed for x in devices)
        assert all(_models(x).get("vad", ("", "idle", "")) == ("", "idle", "") for x in devices)


async def test_a_protocol_1_agent_gets_one_model_and_a_second_is_refused(
    server: ControlPlane, fleet_setup: FleetSetup
) -> None:
    profile = parse_profile({"classes": [{"name": "pi", "hardware": PI, **FAST}]})
    op = fleet_setup.op
    async with Fleet(server.address, fleet_setup.token, profile, 2, prefix="p1",
                     protocol=1) as fleet:  # fmt: skip
        await _assign(op, fleet, "1.0.0")
        await fleet.wait_until(lambda f: f.counts() == {("committed", "1.0.0"): 2}, 30)
        devices = await _wait_devices(op, "p1", Counter({("pi", "committed", "1.0.0"): 2}))
        assert {x.agent_protocol for x in devices} <= {0, 1}
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _assign(op, fleet, "1.0.0", model="vad")
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert fleet.agents[0].device_id in (refused.value.details() or "")
        assert all(a.serving() == {"digits": "1.0.0"} for a in fleet.agents)


async def test_agents_reconnect_download_and_silent_devices_go_dark_after_committing(
    server: ControlPlane, fleet_setup: FleetSetup
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
    fleet = Fleet(server.address, fleet_setup.token, profile, 6, prefix="t2", download=True,
                  telemetry_interval_s=0.2, backoff_initial_s=0.1)  # fmt: skip
    async with fleet:
        # The control plane ends every stream: all come back.
        server.hub.close_all("test restart")
        await fleet.wait_until(lambda f: all(a.connects == 2 for a in f.agents), 20)
        await fleet.wait_until(lambda f: f.connections() == {"online": 6}, 20)
        assert fleet.summary().stats["errors"] == {"Sync UNAVAILABLE": 6}

        await _assign(fleet_setup.op, fleet, "1.0.0")
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
        # Over HTTP from the control plane, the source its assignments name.
        assert stats.download_sources == {"control plane (HTTP)": 6}
        # The committed report went out before the device went dark.
        await _wait_devices(fleet_setup.op, "t2", Counter(
            {("pi", "committed", "1.0.0"): 4, ("gw", "committed", "1.0.0"): 2}))  # fmt: skip
        seqs = [a.telemetry_seq for a in silent]
        beats = [a.heartbeat_seq for a in silent]
        await asyncio.sleep(1.0)
        assert [a.telemetry_seq for a in silent] == seqs
        assert [a.heartbeat_seq for a in silent] == beats
        assert not any(server.hub.is_connected(a.device_id) for a in silent)
        assert all(server.hub.is_connected(a.device_id) for a in fleet.agents if a.online)


async def test_a_refused_token_fails_start_and_a_rerun_is_the_same_devices(
    server: ControlPlane, fleet_setup: FleetSetup
) -> None:
    profile = parse_profile({"classes": [{"name": "pi", "hardware": PI, **FAST}]})
    with pytest.raises(FleetError, match="3 agent\\(s\\) refused: Enroll UNAUTHENTICATED"):
        await Fleet(server.address, "wrong-token", profile, 3, prefix="t3").start(timeout_s=20)

    identities: dict[str, tuple[str, str]] = {}
    async with Fleet(server.address, fleet_setup.token, profile, 3, prefix="t3",
                     telemetry_interval_s=0.1, identities=identities) as first:  # fmt: skip
        ids = [a.device_id for a in first.agents]
        await first.wait_until(lambda f: all(a.telemetry_seq >= 3 for a in f.agents), 20)
    stored = [await _telemetry_mark(fleet_setup, a) for a in first.agents]
    # A second run with the same prefix: the same devices, and telemetry
    # numbered past what the first run stored (none dropped as redelivered).
    # Without the first run's credentials it could not prove to be them.
    with pytest.raises(FleetError, match="3 agent\\(s\\) refused: Enroll PERMISSION_DENIED"):
        await Fleet(server.address, fleet_setup.token, profile, 3, prefix="t3").start(timeout_s=20)
    async with Fleet(server.address, fleet_setup.token, profile, 3, prefix="t3",
                     telemetry_interval_s=0.1, identities=identities) as second:  # fmt: skip
        assert [a.device_id for a in second.agents] == ids
        await second.wait_until(lambda f: all(a.telemetry_seq >= 3 for a in f.agents), 20)
        await asyncio.sleep(0.5)
        marks = [await _telemetry_mark(fleet_setup, a) for a in second.agents]
    assert all(mark >= before + 3 for mark, before in zip(marks, stored, strict=True))
    assert len(await fleet_devices(fleet_setup.op, "t3")) == 3


async def _telemetry_mark(fleet_setup: FleetSetup, agent: SimAgent) -> int:
    """The highest telemetry seq the control plane stored for the device."""
    response = await dg.DeviceServiceStub(fleet_setup.channel).UploadTelemetry(
        d.UploadTelemetryRequest(), metadata=bearer_metadata(agent.credential)
    )
    return int(response.acked_seq)
