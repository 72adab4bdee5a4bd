"""An in-process control plane made ready for simulated fleets (fleetsim):
two classes placed by match rules (Raspberry Pis by board model, gateways
by arch), digits 1.0.0 and 2.0.0 and vad 1.0.0 (a second model a device
holds beside digits) built for both by hand, and an auto-accept
enrollment token; the hardware of each kind of device; and reading back the
devices of one fleet."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import onnx

from edgefleet.controlplane.server import ControlPlane
from edgefleet.demo.models import mlp_graph
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import fake_result
from testkit.models import model_parts, push_requests
from testkit.rpc import ADMIN

PI = {"board_model": "Raspberry Pi 4 Model B Rev 1.4", "arch": "aarch64", "memory_mb": 3792}
GW = {"board_model": "Intel NUC11TNHi5", "arch": "x86_64", "memory_mb": 15700}
# Installs in a blink, so that tests wait for the control plane, not the profile.
FAST = {"install_s": [0.05, 0.2]}


@dataclass
class FleetSetup:
    op: og.OperatorServiceAsyncStub
    channel: grpc.aio.Channel
    token: str


def random_mlp(path: Path, seed: int) -> Path:
    """A digits-shaped MLP (64 -> 16 -> 10) with random weights from `seed`."""
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
        result = fake_result(by_digest[job.model_digest])
        assert await asyncio.to_thread(builds.finish, job, "test-runner", result, "")
    raise AssertionError(f"builds did not finish: {listed}")


async def prepare_for_fleets(server: ControlPlane, root: Path) -> FleetSetup:
    """`server` with the two classes, both versions built and a token; the
    caller closes the returned channel."""
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
    refs = (("digits", "1.0.0"), ("digits", "2.0.0"), ("vad", "1.0.0"))
    models = {
        f"{name}@{v}": random_mlp(root / f"{name}-{v}.onnx", seed)
        for seed, (name, v) in enumerate(refs)
    }
    for (name, version), path in zip(refs, models.values(), strict=True):
        await op.PushModel(push_requests(name, version, model_parts(model=path)), metadata=ADMIN)
    await _publish_builds(server, op, models)
    token = await op.CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name="sim", policy=o.ENROLLMENT_POLICY_AUTO_ACCEPT),
        metadata=ADMIN,
    )
    return FleetSetup(op, channel, token.secret)


async def fleet_devices(op: og.OperatorServiceAsyncStub, prefix: str) -> list[c.Device]:
    """The devices of the fleet started with `prefix` (its "fleetsim" label)."""
    listed = await op.ListDevices(o.ListDevicesRequest(labels={"fleetsim": prefix}), metadata=ADMIN)
    return list(listed.devices)
