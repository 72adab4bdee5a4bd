"""Deployments end to end: a real control-plane process builds real models
(the digits MLP, trained here), an operator assigns versions to real agent
processes, and the agents download, verify, validate on the device, activate
and serve them through the on-device inference API.

Failure paths: corrupted and truncated downloads, a wrong signature, a
manifest for another device class, a model that misses the latency budget on
the device, and kill -9 inside every state of an update. Whatever happens, the
agent ends up serving exactly one complete version (old or new), and what it
reports to the control plane matches what it serves."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import platform
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edgefleet.agent.update.faults import MARKER_FILE
from edgefleet.controlplane.domain import signing
from edgefleet.controlplane.services import statements
from edgefleet.controlplane.services.blobstore import DirectoryStore
from edgefleet.demo.models import build_digits_classifier
from edgefleet.update_state import name_of, of_status
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import inference_pb2, inference_pb2_grpc
from edgefleet.v1 import operator_pb2 as o
from testkit.agent_harness import AgentProcess, wait_for
from testkit.deployments import served, settled
from testkit.harness import ControlPlane
from testkit.models import model_parts, push_model, wait_builds

pytestmark = pytest.mark.timeout(900)

MODEL = "digits"
VERSIONS = ("1.0.0", "2.0.0", "3.0.0", "4.0.0")
CPU, TWIN, FAST = "cpu", "cpu-twin", "claims-fast"


@dataclass
class Fleet:
    cp: ControlPlane
    op: Any
    token: str
    root: Path
    # version -> digest of the artifact the "cpu" class got.
    digests: dict[str, str]
    count: int = 0

    def agent(self, class_name: str = CPU, **config: Any) -> AgentProcess:
        """A new agent process (not started) that lands in `class_name`
        (its "tier" label), with `labels` added."""
        self.count += 1
        labels = {"tier": class_name, **config.pop("labels", {})}
        return AgentProcess(
            self.root / f"agent-{self.count}",
            self.cp.address,
            self.token,
            labels=labels,
            **{"telemetry_interval_s": 60, **config},
        )


def _class(op: Any, name: str, **limits: Any) -> None:
    op.CreateDeviceClass(
        o.CreateDeviceClassRequest(
            name=name,
            constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME, **limits),
            match_rules=[
                c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=[platform.machine()]),
                c.MatchRule(field="label.tier", op=c.MATCH_OP_EQ, values=[name]),
            ],
        )
    )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("deployments")
    cp = ControlPlane(root / "cp", None, "--build-workers", "2")
    cp.start()
    try:
        op = cp.operator()
        # A generous budget the real devices meet (rollout gates scale it).
        _class(op, CPU, latency_budget_p95_ms=50)
        _class(op, TWIN, latency_budget_p95_ms=50)  # same profile: same bytes, own manifest
        # Claims its devices are 1000x faster than the build host, so builds
        # pass a budget no real device here can meet.
        _class(op, FAST, latency_budget_p95_ms=0.005, speed_factor=0.001)
        # Each push queues a build per class.
        for seed, version in enumerate(VERSIONS):
            # hidden=1024: even the int8 artifact is > 64 KiB, so a download
            # takes several chunks whichever candidate the build picks.
            built = build_digits_classifier(root / f"model-{version}", hidden=1024, seed=seed)
            push_model(
                op, MODEL, version, model_parts(model=built.model, sample_data=built.sample_data)
            )
        builds = wait_builds(op, 3 * len(VERSIONS), timeout=400)
        failed = [(b.class_name, b.error) for b in builds if b.state != o.BUILD_STATE_SUCCEEDED]
        assert not failed, failed
        digests = {b.model_version: b.artifact_digest for b in builds if b.class_name == CPU}
        token = op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="e2e")).secret
        yield Fleet(cp, op, token, root, digests)
    finally:
        cp.close()


@pytest.fixture
def agents(fleet: Fleet) -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.close()


# ---------------------------------------------------------------- helpers


def _start(fleet: Fleet, agents: list[AgentProcess], agent: AgentProcess, **kw: Any) -> str:
    agents.append(agent.start(**kw))
    identity = wait_for(agent.identity)
    device_id = str(identity["device_id"])
    wait_for(lambda: fleet.op.GetDevice(o.GetDeviceRequest(id=device_id)).class_name)
    return device_id


def _assign(fleet: Fleet, device_id: str, version: str) -> int:
    (assignment,) = fleet.op.AssignModel(
        o.AssignModelRequest(device_ids=[device_id], model_name=MODEL, model_version=version)
    ).assignments
    return int(assignment.sequence)


def _history(fleet: Fleet, device_id: str, sequence: int) -> list[str]:
    events = fleet.op.ListDeployments(o.ListDeploymentsRequest(device_id=device_id)).events
    return [name_of(e.state) for e in reversed(events) if e.sequence == sequence]


def _assert_consistent(agent: AgentProcess, status: c.UpdateStatus) -> tuple[str, str]:
    """What the agent serves is what it reports, and a complete, verified file."""

    def answered() -> tuple[str, str] | grpc.StatusCode | None:
        serving = served(agent)
        return None if serving == grpc.StatusCode.UNAVAILABLE else serving  # still starting

    serving = wait_for(answered)
    assert isinstance(serving, tuple), serving
    assert serving == (status.active_model_version, status.active_artifact_digest)
    artifact = agent.state_dir / "downloads" / serving[1]
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() == serving[1]
    return serving


def _install(fleet: Fleet, agents: list[AgentProcess], version: str = "1.0.0",
             **config: Any) -> tuple[AgentProcess, str]:  # fmt: skip
    """A running agent serving `version`."""
    agent = fleet.agent(**config)
    device_id = _start(fleet, agents, agent)
    status = settled(fleet.op, device_id, _assign(fleet, device_id, version))
    assert of_status(status) == "committed", status
    assert _assert_consistent(agent, status) == (version, fleet.digests[version])
    return agent, device_id


# ---------------------------------------------------------------- the happy path


def test_assign_installs_and_serves_a_version_then_upgrades_keeping_history(
    fleet: Fleet, agents: list[AgentProcess]
) -> None:
    agent, device_id = _install(fleet, agents, "1.0.0", download_chunk_size=65536)
    sequence = _assign(fleet, device_id, "2.0.0")
    status = settled(fleet.op, device_id, sequence)
    assert of_status(status) == "committed", status
    assert _assert_consistent(agent, status) == ("2.0.0", fleet.digests["2.0.0"])
    assert _history(fleet, device_id, sequence) == [
        "downloading", "verifying", "validating", "activating", "committed",
    ]  # fmt: skip
    # Committed: the old artifact is gone from the device, the new one stays.
    assert sorted(p.name for p in (agent.state_dir / "downloads").iterdir()) == [
        fleet.digests["2.0.0"]
    ]
    # A restart serves the committed version at once, without an update.
    assert agent.stop() == 0
    agent.start()
    assert _served_eventually(agent) == ("2.0.0", fleet.digests["2.0.0"])
    assert _history(fleet, device_id, sequence)[-1] == "committed"


def _served_eventually(agent: AgentProcess) -> tuple[str, str]:
    result = wait_for(lambda: s if isinstance(s := served(agent), tuple) else None)
    return result


def test_assign_refuses_devices_that_cannot_take_the_version(
    fleet: Fleet, agents: list[AgentProcess]
) -> None:
    agent = fleet.agent(class_name="nobody")  # matches no class
    device_id = _start_unclassified(fleet, agents, agent)
    with pytest.raises(grpc.RpcError) as err:
        _assign(fleet, device_id, "1.0.0")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert device_id in err.value.details() and "no device class" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _assign(fleet, device_id, "9.9.9")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        _assign(fleet, "no-such-device", "1.0.0")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Nothing was assigned.
    listed = fleet.op.ListDeployments(o.ListDeploymentsRequest(device_id=device_id))
    assert not listed.assignments and not listed.events


def _start_unclassified(fleet: Fleet, agents: list[AgentProcess], agent: AgentProcess) -> str:
    agents.append(agent.start())
    return str(wait_for(agent.identity)["device_id"])


# ---------------------------------------------------------------- rejections


def _blob_cache_file(fleet: Fleet, digest: str) -> Path:
    (path,) = [p for p in (fleet.cp.data_dir).rglob(digest) if p.is_file()]
    return path


def test_a_damaged_blob_is_never_sent_and_installs_once_its_bytes_are_back(
    fleet: Fleet, agents: list[AgentProcess]
) -> None:
    """The control plane's stored artifact (the blob store holds its only
    copy) flipped, then truncated: the server checks it before serving and
    refuses it (DATA_LOSS), so the agent's update fails and it keeps serving
    what it had; once the same bytes are back (what pushing or building
    them again does: BlobStore.add puts them), the agent installs them.
    (Bytes that reach the agent wrong anyway are refused by its own sha256
    check: test_update_machine's corrupted-chunk and truncated-file cases.)"""
    agent, device_id = _install(fleet, agents, "1.0.0")
    digest = fleet.digests["3.0.0"]
    stored = _blob_cache_file(fleet, digest)
    original = stored.read_bytes()
    again = fleet.root / "artifact-3.0.0"
    again.write_bytes(original)
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    for bad in (bytes(damaged), original[: len(original) // 2]):
        stored.write_bytes(bad)
        status = settled(fleet.op, device_id, _assign(fleet, device_id, "3.0.0"))
        assert of_status(status) == "failed", status
        assert _assert_consistent(agent, status) == ("1.0.0", fleet.digests["1.0.0"])
        settled(fleet.op, device_id, _assign(fleet, device_id, "1.0.0"))
        DirectoryStore(fleet.cp.data_dir / "blobs").put(again, digest)
        status = settled(fleet.op, device_id, _assign(fleet, device_id, "3.0.0"))
        assert of_status(status) == "committed", status
        assert _assert_consistent(agent, status) == ("3.0.0", digest)
        assert stored.read_bytes() == original
        settled(fleet.op, device_id, _assign(fleet, device_id, "1.0.0"))
        (agent.state_dir / "downloads" / digest).unlink(missing_ok=True)


def _tamper(fleet: Fleet, sql: str, *params: Any) -> None:
    with sqlite3.connect(fleet.cp.data_dir / "edgefleet.db") as db:
        assert db.execute(sql, params).rowcount >= 1


@contextlib.contextmanager
def _forged_signature(fleet: Fleet, version: str) -> Iterator[None]:
    """The "cpu" class's artifact of `version` carries a wrong manifest
    signature for the block."""
    digest = fleet.digests[version]
    with sqlite3.connect(fleet.cp.data_dir / "edgefleet.db") as db:
        (signature,) = db.execute(
            "SELECT signature FROM artifacts WHERE digest = ? AND class_name = ?", (digest, CPU)
        ).fetchone()
    forged = bytes([signature[0] ^ 1]) + signature[1:]
    _tamper(fleet, "UPDATE artifacts SET signature = ? WHERE digest = ? AND class_name = ?",
            forged, digest, CPU)  # fmt: skip
    try:
        yield
    finally:
        _tamper(fleet, "UPDATE artifacts SET signature = ? WHERE digest = ? AND class_name = ?",
                signature, digest, CPU)  # fmt: skip


def test_a_wrong_signature_is_rejected_and_reported(
    fleet: Fleet, agents: list[AgentProcess]
) -> None:
    agent, device_id = _install(fleet, agents, "1.0.0")
    with _forged_signature(fleet, "4.0.0"):
        sequence = _assign(fleet, device_id, "4.0.0")
        status = settled(fleet.op, device_id, sequence)
    assert of_status(status) == "failed" and "signature" in status.reason, status
    assert _history(fleet, device_id, sequence) == [
        "downloading", "verifying", "rolling_back", "failed",
    ]  # fmt: skip
    assert _assert_consistent(agent, status) == ("1.0.0", fleet.digests["1.0.0"])


def test_a_manifest_for_another_class_is_rejected(fleet: Fleet, agents: list[AgentProcess]) -> None:
    agent, device_id = _install(fleet, agents, "1.0.0")
    # A control plane that got it wrong: the device's next assignment points
    # at the twin class's artifact of 2.0.0 (the same bytes, which this device
    # may download, with the twin's own correctly signed manifest).
    with sqlite3.connect(fleet.cp.data_dir / "edgefleet.db") as db:
        (twin_artifact,) = db.execute(
            "SELECT id FROM artifacts WHERE digest = ? AND class_name = ?",
            (fleet.digests["2.0.0"], TWIN),
        ).fetchone()
    _tamper(fleet, "UPDATE device_assignments SET artifact_id = ?, sequence = sequence + 1 "
            "WHERE device_id = ?", twin_artifact, device_id)  # fmt: skip
    _tamper(fleet, "UPDATE devices SET assignment_seq = assignment_seq + 1, "
            "desired_revision = desired_revision + 1 WHERE id = ?", device_id)  # fmt: skip
    _sign_statement(fleet, device_id)
    # The database was changed behind the control plane's back: the agent
    # gets the new desired state when it next connects.
    assert agent.stop() == 0
    agent.start()
    status = settled(fleet.op, device_id, 2)
    assert of_status(status) == "failed" and "another device class" in status.reason, status
    assert _assert_consistent(agent, status) == ("1.0.0", fleet.digests["1.0.0"])


def _sign_statement(fleet: Fleet, device_id: str) -> None:
    """Sign the device's assignment row as it now is, with the control
    plane's key: it got the artifact wrong, not the signature, so the agent's
    manifest checks (not its statement checks) are what must refuse it."""
    with sqlite3.connect(fleet.cp.data_dir / "edgefleet.db") as db:
        sequence, digest, manifest, version, size, rollout = db.execute(
            "SELECT a.sequence, f.digest, f.manifest, v.version, f.size_bytes, a.rollout_id "
            "FROM device_assignments a "
            "JOIN artifacts f ON f.id = a.artifact_id "
            "JOIN model_versions v ON v.id = a.model_version_id WHERE a.device_id = ?",
            (device_id,),
        ).fetchone()
        key_id, private = db.execute(
            "SELECT id, private_key FROM signing_keys WHERE retired_at IS NULL"
        ).fetchone()
    statement = statements.assignment_statement(
        device_id=device_id, sequence=sequence, model_name=MODEL, model_version=version,
        artifact_sha256=digest, manifest_digest=statements.manifest_sha256(manifest),
        shadow=False, rollback=False, key_id=key_id, issued_at=dt.datetime.now(dt.UTC),
        rollout_id=rollout or "", artifact_size=size,
    )  # fmt: skip
    _tamper(fleet, "UPDATE device_assignments SET statement = ?, statement_signature = ?, "
            "key_id = ? WHERE device_id = ?", statement, signing.sign(private, statement), key_id,
            device_id)  # fmt: skip


def test_a_model_over_the_latency_budget_on_the_device_is_rolled_back(
    fleet: Fleet, agents: list[AgentProcess]
) -> None:
    agent = fleet.agent(class_name=FAST)
    device_id = _start(fleet, agents, agent)
    sequence = _assign(fleet, device_id, "1.0.0")
    status = settled(fleet.op, device_id, sequence)
    assert of_status(status) == "failed" and "p95" in status.reason, status
    assert "validating" in _history(fleet, device_id, sequence)
    assert "activating" not in _history(fleet, device_id, sequence)
    # Nothing was active before, so nothing is now.
    assert served(agent) in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
    assert not status.active_artifact_digest


# ---------------------------------------------------------------- kill -9


@pytest.mark.parametrize(
    ("state", "ends_on"),
    [
        ("downloading", "2.0.0"),  # resumes the partial file
        ("verifying", "2.0.0"),
        ("validating", "2.0.0"),
        ("activating", "1.0.0"),  # restart before commit: roll back
        ("committed", "2.0.0"),
    ],
)
def test_kill_9_inside_each_state_ends_on_one_complete_version(
    fleet: Fleet, agents: list[AgentProcess], state: str, ends_on: str
) -> None:
    agent, device_id = _install(fleet, agents, "1.0.0", download_chunk_size=65536)
    assert agent.stop() == 0
    agent.start(fault_pause=state)
    sequence = _assign(fleet, device_id, "2.0.0")
    marker = agent.state_dir / MARKER_FILE
    assert wait_for(lambda: marker.exists() and marker.read_text(), timeout=60) == state
    if state == "downloading":
        parts = list((agent.state_dir / "downloads").glob("*.part"))
        assert parts and parts[0].stat().st_size > 0
    agent.kill()
    marker.unlink()
    agent.start()
    status = settled(fleet.op, device_id, sequence)
    assert of_status(status) == ("committed" if ends_on == "2.0.0" else "failed"), status
    if state == "activating":
        assert "restarted during activation" in status.reason
    assert _assert_consistent(agent, status) == (ends_on, fleet.digests[ends_on])
    assert not list((agent.state_dir / "downloads").glob("*.part"))


def test_kill_9_while_rolling_back_ends_on_the_old_version(
    fleet: Fleet, agents: list[AgentProcess]
) -> None:
    agent, device_id = _install(fleet, agents, "1.0.0")
    assert agent.stop() == 0
    agent.start(fault_pause="rolling_back")
    marker = agent.state_dir / MARKER_FILE
    with _forged_signature(fleet, "4.0.0"):  # Verifying fails: roll back
        sequence = _assign(fleet, device_id, "4.0.0")
        assert wait_for(lambda: marker.exists() and marker.read_text(), timeout=60) == (
            "rolling_back"
        )
        agent.kill()
        marker.unlink()
        agent.start()
        status = settled(fleet.op, device_id, sequence)
    assert of_status(status) == "failed" and "signature" in status.reason, status
    assert _history(fleet, device_id, sequence)[-2:] == ["rolling_back", "failed"]
    assert _assert_consistent(agent, status) == ("1.0.0", fleet.digests["1.0.0"])
    assert sorted(p.name for p in (agent.state_dir / "downloads").iterdir()) == [
        fleet.digests["1.0.0"]
    ]


# ---------------------------------------------------------------- rollouts


def test_a_rollout_on_real_agents_trips_a_health_gate_and_reverts_every_device(
    fleet: Fleet, agents: list[AgentProcess]
) -> None:
    # Its own label: agents of earlier tests may still count as online.
    installed = [
        _install(fleet, agents, "1.0.0", telemetry_interval_s=1, labels={"run": "gate"})
        for _ in range(2)
    ]
    spec = o.RolloutSpec(model_name=MODEL, model_version="2.0.0", class_names=[CPU],
                         label_selector={"tier": CPU, "run": "gate"})  # fmt: skip
    stage = spec.stages.add(name="all", percent=100.0, on_failure=o.FAILURE_ACTION_ABORT_REVERT)
    stage.bake_time.FromSeconds(60)
    # 50 ms x 1e-5: real inference here cannot meet it, so the gate trips on
    # the telemetry the devices report while they serve.
    stage.gates.latency_budget_factor = 1e-5
    rollout = fleet.op.CreateRollout(o.CreateRolloutRequest(spec=spec, start=True)).rollout
    assert sorted(d.device_id for d in rollout.devices) == sorted(d for _, d in installed)
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            for agent, _ in installed:
                with contextlib.suppress(Exception):
                    served(agent)
            time.sleep(0.05)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:

        def reverted() -> o.Rollout | None:
            r = fleet.op.GetRollout(o.GetRolloutRequest(id=rollout.id))
            finished = all(d.state == o.ROLLOUT_DEVICE_STATE_REVERTED for d in r.devices)
            return r if r.state == o.ROLLOUT_STATE_ABORTED and finished else None

        done = wait_for(reverted, timeout=120)
    finally:
        stop.set()
        worker.join()
    assert "health gate" in done.reason and "latency" in done.reason, done.reason
    assert all("reverted to 1.0.0" in d.reason for d in done.devices), done.devices
    for agent, device_id in installed:

        def back_on_v1(device_id: str = device_id) -> c.UpdateStatus | None:
            u = fleet.op.GetDevice(o.GetDeviceRequest(id=device_id)).update
            return u if u.active_model_version == "1.0.0" and of_status(u) == "committed" else None

        status = wait_for(back_on_v1)
        assert _assert_consistent(agent, status) == ("1.0.0", fleet.digests["1.0.0"])


def test_a_shadow_stage_on_a_real_agent_mirrors_traffic_then_promotes(
    fleet: Fleet, agents: list[AgentProcess]
) -> None:
    agent, device_id = _install(
        fleet, agents, "1.0.0", telemetry_interval_s=1, labels={"run": "shadow"}
    )
    spec = o.RolloutSpec(model_name=MODEL, model_version="2.0.0", class_names=[CPU],
                         label_selector={"tier": CPU, "run": "shadow"})  # fmt: skip
    spec.stages.add(name="shadow", count=1, shadow=True, min_agreement=0.5)
    spec.stages.add(name="all", percent=100.0)
    rollout = fleet.op.CreateRollout(o.CreateRolloutRequest(spec=spec, start=True)).rollout
    assert [d.device_id for d in rollout.devices] == [device_id]
    # Real digits (the held-out split): the two versions, trained with other
    # seeds, agree on most of them, so the stage's 0.5 minimum is met.
    digits = np.load(fleet.root / "model-1.0.0" / "samples.npz")["input"].astype(np.float32)
    # (what the control plane says the update is, then the version that answered)
    seen: list[tuple[str, str, str, str]] = []
    stop = threading.Event()

    def traffic() -> None:
        target = f"unix:{agent.state_dir / 'inference.sock'}"
        with grpc.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for index in range(10**6):
                if stop.is_set():
                    return
                with contextlib.suppress(grpc.RpcError):
                    u = fleet.op.GetDevice(o.GetDeviceRequest(id=device_id)).update
                    x = np.ascontiguousarray(digits[(8 * index) % 192 :][:8])
                    reply = stub.Predict(
                        inference_pb2.PredictRequest(model_name=MODEL, inputs=[c.TensorData(
                            name="input", dtype="float32", shape=[8, 64], data=x.tobytes(),
                        )]),
                        timeout=10,
                    )  # fmt: skip
                    seen.append((u.model_version, of_status(u), u.active_model_version,
                                 reply.model_version))  # fmt: skip
                time.sleep(0.05)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:

        def succeeded() -> o.Rollout | None:
            r = fleet.op.GetRollout(o.GetRolloutRequest(id=rollout.id))
            assert r.state not in (o.ROLLOUT_STATE_PAUSED, o.ROLLOUT_STATE_ABORTED), r.reason
            return r if r.state == o.ROLLOUT_STATE_SUCCEEDED else None

        done = wait_for(succeeded, timeout=180)
        # Serving 2.0.0 now, and what it reports.
        status = wait_for(
            lambda: u if (u := fleet.op.GetDevice(o.GetDeviceRequest(id=device_id)).update)
            .active_model_version == "2.0.0" and of_status(u) == "committed" else None
        )  # fmt: skip
        assert _assert_consistent(agent, status) == ("2.0.0", fleet.digests["2.0.0"])
    finally:
        stop.set()
        worker.join()
    assert [d.state for d in done.devices] == [o.ROLLOUT_DEVICE_STATE_COMMITTED]
    # While the shadow stage held (2.0.0 loaded as the shadow and reported
    # settled, 1.0.0 active), apps got 1.0.0's answers.
    shadowing = [s for s in seen if s[:3] == ("2.0.0", "committed", "1.0.0")]
    assert shadowing and {s[3] for s in shadowing} == {"1.0.0"}, seen
    # Once 2.0.0 answered, 1.0.0 never did again.
    answered = [s[3] for s in seen]
    assert "2.0.0" in answered
    assert "1.0.0" not in answered[answered.index("2.0.0") :]
    # What the agent measured reached the control plane: mirrored requests
    # and agreement of the candidate, on samples of the version it served.
    with sqlite3.connect(fleet.cp.data_dir / "edgefleet.db") as db:
        rows = db.execute(
            "SELECT model_version, shadow_requests, shadow_agreement, shadow_latency_p95_ms "
            "FROM telemetry WHERE device_id = ? AND shadow_version = '2.0.0'",
            (device_id,),
        ).fetchall()
    assert rows and {r[0] for r in rows} == {"1.0.0"}, rows
    mirrored = sum(r[1] for r in rows)
    assert mirrored > 0 and all(r[3] > 0 for r in rows)
    assert sum(r[1] * r[2] for r in rows) / mirrored >= 0.5
