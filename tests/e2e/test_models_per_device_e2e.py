"""Several models on one device, end to end: a real control plane process and
real agent processes. Updating, crashing inside and removing model A never
disturbs model B: B's calls never fail, its version never changes, and after
a kill -9 anywhere in A's update the agent serves B again and A old or new,
never partial.

Builds are answered by hand (the pushed file is the artifact): what is under
test is what the agent does with two assignments, not the build ladder."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest

from edgefleet.agent.inference_client import InferenceClient
from edgefleet.agent.update.faults import MARKER_FILE
from edgefleet.controlplane.db.engine import make_engine, sqlite_url
from edgefleet.controlplane.db.uow import Database
from edgefleet.demo.models import build_digits_classifier, build_small_cnn
from edgefleet.polling import wait_for
from edgefleet.update_state import of_status
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from testkit.agent_harness import AgentProcess
from testkit.builds import answer_builds
from testkit.harness import ControlPlane
from testkit.models import model_parts, push_model

pytestmark = pytest.mark.timeout(900)

A, B = "digits", "digits-cnn"
CLASS = "multi"
B_INPUT = {"image": np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)}
A_INPUT = {"input": np.random.default_rng(0).random((1, 64), dtype=np.float32)}


@dataclass
class Fleet:
    cp: ControlPlane
    op: Any
    token: str
    root: Path
    # (model, version) -> artifact digest
    digests: dict[tuple[str, str], str]
    agents: list[AgentProcess] = field(default_factory=list)
    count: int = 0

    def agent(self, **config: Any) -> tuple[AgentProcess, str]:
        self.count += 1  # a fresh state directory (and device) per agent
        agent = AgentProcess(
            self.root / f"agent-{self.count}", self.cp.address, self.token,
            labels={"tier": CLASS}, telemetry_interval_s=60, download_chunk_size=65536, **config,
        )  # fmt: skip
        self.agents.append(agent.start())
        device_id = str(wait_for(agent.identity, timeout=60)["device_id"])
        wait_for(lambda: self.op.GetDevice(o.GetDeviceRequest(id=device_id)).class_name)
        return agent, device_id

    def assign(self, device_id: str, model: str, version: str) -> int:
        (assignment,) = self.op.AssignModel(
            o.AssignModelRequest(device_ids=[device_id], model_name=model, model_version=version)
        ).assignments
        return int(assignment.sequence)

    def model(self, device_id: str, model: str) -> c.DeviceModel | None:
        device = self.op.GetDevice(o.GetDeviceRequest(id=device_id))
        return next((m for m in device.models if m.model_name == model), None)

    def settled(self, device_id: str, model: str, sequence: int) -> c.UpdateStatus:
        def done() -> c.UpdateStatus | None:
            held = self.model(device_id, model)
            if held is None or held.status.sequence != sequence:
                return None
            return held.status if of_status(held.status) in ("committed", "failed") else None

        return wait_for(done, timeout=120)

    def install(self, device_id: str, model: str, version: str) -> None:
        status = self.settled(device_id, model, self.assign(device_id, model, version))
        assert of_status(status) == "committed", status


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("models")
    cp = ControlPlane(root / "cp", None, "--build-workers", "0")
    cp.start()
    try:
        op = cp.operator()
        op.CreateDeviceClass(o.CreateDeviceClassRequest(
            name=CLASS, constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME),
            match_rules=[c.MatchRule(field="label.tier", op=c.MATCH_OP_EQ, values=[CLASS])],
        ))  # fmt: skip
        # hidden=1024: A's artifact takes many 64 KiB chunks to download.
        digits = build_digits_classifier(root / "digits", hidden=1024)
        cnn = build_small_cnn(root / "cnn")
        files: dict[str, Path] = {}
        pushed: dict[tuple[str, str], str] = {}
        for (model, version), built in {
            (A, "1.0.0"): digits, (A, "2.0.0"): digits, (B, "1.0.0"): cnn,
        }.items():  # fmt: skip
            proto = onnx.load(built.model)
            proto.doc_string = f"{model} {version}"  # each version its own bytes
            path = root / f"{model}-{version}.onnx"
            onnx.save(proto, path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            files[digest] = path
            pushed[model, version] = digest
            push_model(op, model, version, model_parts(model=path, sample_data=built.sample_data))
        engine = make_engine(sqlite_url(cp.data_dir), pool_size=2)
        answer_builds(Database(engine), cp.data_dir / "blobs", files, op)
        engine.dispose()
        token = op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="models")).secret
        yield Fleet(cp, op, token, root, pushed)
    finally:
        cp.close()


@pytest.fixture
def fleet_agents(fleet: Fleet) -> Iterator[Fleet]:
    yield fleet
    for agent in fleet.agents:
        agent.close()
    fleet.agents.clear()


class Caller:
    """An app calling a model in a loop until stopped: every failure and the
    versions that answered."""

    def __init__(self, agent: AgentProcess, model: str, inputs: dict[str, np.ndarray]) -> None:
        self.socket = agent.state_dir / "predict.sock"
        self.model, self.inputs = model, inputs
        self.failures: list[str] = []
        self.versions: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Caller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with InferenceClient(self.socket) as client:
            while not self._stop.is_set():
                try:
                    reply = client.predict(self.model, self.inputs, timeout_s=5)
                except Exception as exc:  # every failure is a finding
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    time.sleep(0.01)
                    continue
                self.versions[reply.model_version] += 1


def serving(agent: AgentProcess, model: str, inputs: dict[str, np.ndarray]) -> str | None:
    """The version of `model` the agent answers a real prediction with; None
    when it has no such model (or is still starting)."""
    try:
        with InferenceClient(agent.state_dir / "predict.sock") as client:
            return str(client.predict(model, inputs, timeout_s=10).model_version)
    except Exception:
        return None


def test_updating_and_removing_a_never_disturbs_b(fleet_agents: Fleet) -> None:
    fleet = fleet_agents
    agent, device_id = fleet.agent()
    fleet.install(device_id, A, "1.0.0")
    fleet.install(device_id, B, "1.0.0")
    held = fleet.op.GetDevice(o.GetDeviceRequest(id=device_id)).models
    assert sorted(m.model_name for m in held) == [A, B]
    with Caller(agent, B, B_INPUT) as calls:
        wait_for(lambda: calls.versions.total() > 20)
        fleet.install(device_id, A, "2.0.0")
        assert serving(agent, A, A_INPUT) == "2.0.0"
        fleet.install(device_id, A, "1.0.0")  # back down: the control plane signs the rollback
        assert serving(agent, A, A_INPUT) == "1.0.0"
        seen = calls.versions.total()
        # Removing A: B keeps answering while A is unloaded.
        removed = fleet.op.UnassignModel(
            o.UnassignModelRequest(device_ids=[device_id], model_name=A, reason="e2e")
        )
        assert list(removed.removed) == [device_id]
        wait_for(lambda: serving(agent, A, A_INPUT) is None, timeout=60)
        wait_for(lambda: fleet.model(device_id, A) is None, timeout=60)
        wait_for(lambda: calls.versions.total() > seen + 20)
    assert calls.failures == []
    assert set(calls.versions) == {"1.0.0"}
    # A's artifacts are gone from the device; B's stays.
    downloads = {p.name for p in (agent.state_dir / "downloads").iterdir()}
    assert downloads == {fleet.digests[B, "1.0.0"]}, downloads
    # Nothing changed B's side of the control plane either.
    b = fleet.model(device_id, B)
    assert b is not None and b.assigned_version == "1.0.0"
    assert b.status.active_model_version == "1.0.0"


@pytest.mark.parametrize(
    ("state", "ends_on"),
    [
        ("downloading", "2.0.0"),  # resumes the partial file
        ("verifying", "2.0.0"),
        ("validating", "2.0.0"),
        ("activating", "1.0.0"),  # a restart before commit rolls back
        ("committed", "2.0.0"),
    ],
)
def test_kill_9_inside_each_state_of_a_leaves_b_serving_and_a_whole(
    fleet_agents: Fleet, state: str, ends_on: str
) -> None:
    fleet = fleet_agents
    agent, device_id = fleet.agent()
    fleet.install(device_id, A, "1.0.0")
    fleet.install(device_id, B, "1.0.0")
    assert agent.stop() == 0
    agent.start(fault_pause=state)
    sequence = fleet.assign(device_id, A, "2.0.0")
    markers = lambda: list(agent.state_dir.rglob(MARKER_FILE))  # noqa: E731
    wait_for(lambda: markers() and markers()[0].read_text() == state, timeout=60)
    # B answers while A's update is stopped inside `state`.
    assert serving(agent, B, B_INPUT) == "1.0.0"
    agent.kill()
    for marker in markers():
        marker.unlink()
    agent.start()
    status = fleet.settled(device_id, A, sequence)
    assert of_status(status) == ("committed" if ends_on == "2.0.0" else "failed"), status
    assert wait_for(lambda: serving(agent, B, B_INPUT), timeout=60) == "1.0.0"
    assert wait_for(lambda: serving(agent, A, A_INPUT), timeout=60) == ends_on
    assert status.active_model_version == ends_on
    assert status.active_artifact_digest == fleet.digests[A, ends_on]
    downloads = agent.state_dir / "downloads"
    assert not list(downloads.glob("*.part"))
    for digest in (fleet.digests[A, ends_on], fleet.digests[B, "1.0.0"]):
        assert hashlib.sha256((downloads / digest).read_bytes()).hexdigest() == digest
    b = fleet.model(device_id, B)
    assert b is not None and b.status.active_model_version == "1.0.0"


def test_a_budget_over_the_class_memory_is_refused_naming_the_models(
    fleet_agents: Fleet,
) -> None:
    fleet = fleet_agents
    agent, device_id = fleet.agent()
    fleet.install(device_id, A, "1.0.0")
    # Each hand-answered build measured 1 MB: a 1.5 MB budget holds one model.
    fleet.op.UpdateDeviceClass(o.UpdateDeviceClassRequest(
        name=CLASS, constraints=c.ConstraintProfile(
            runtime=c.RUNTIME_ONNXRUNTIME, device_memory_mb=1.5),
    ))  # fmt: skip
    try:
        with pytest.raises(grpc.RpcError) as refused:
            fleet.assign(device_id, B, "1.0.0")
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        message = refused.value.details() or ""
        for part in (device_id, f"{A}@1.0.0", f"{B}@1.0.0", "1.5"):
            assert part in message, message
        assert fleet.model(device_id, B) is None  # nothing assigned, nothing downloaded
        assert serving(agent, A, A_INPUT) == "1.0.0"
    finally:
        fleet.op.UpdateDeviceClass(o.UpdateDeviceClassRequest(
            name=CLASS, constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME),
        ))  # fmt: skip
