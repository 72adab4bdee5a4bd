"""Signed updates end to end: a real control-plane process, real agent
processes, and between them a man in the middle (a gRPC server that relays
every device RPC to the control plane, records what it sees and injects
messages of its own into the agents' Sync streams) playing the attacker.

Shown here: a replayed signed assignment, a tampered statement, one signed by
an untrusted key and a field swapped outside the signature are refused (and
reported) while the agent keeps serving the version it had; a downgrade
needs the control plane's signed rollback flag (AssignModel of an older
version, a rollout's abort with revert); after a key rotation the agent walks
the chain and installs an artifact signed only by the new key, and refuses a
forged rotation; a kill -9 between verification and persisting the trusted
state leaves the old trusted state, and the restart finishes the update.

Builds are answered by hand (as in test_rollouts.py) by a second process
role on the same SQLite database: the test is about what happens after."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from edgefleet.agent.update.faults import MARKER_FILE, VERIFIED
from edgefleet.controlplane.db.engine import make_engine, sqlite_url
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import signing
from edgefleet.controlplane.services import statements
from edgefleet.update_state import of_status
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from testkit.agent_harness import AgentProcess, wait_for
from testkit.builds import publish_digits_versions
from testkit.cli import edgefleet, edgefleet_json
from testkit.deployments import served, settled
from testkit.harness import ControlPlane

pytestmark = pytest.mark.timeout(300)

MODEL = "digits"
CLASS = "cpu"
VERSIONS = ("1.0.0", "2.0.0", "3.0.0")


# ---------------------------------------------------------------- the man in the middle


def _auth(context: grpc.ServicerContext) -> list[tuple[str, str]]:
    return [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]


class Mitm(dg.DeviceServiceServicer):
    """Relays the device service to `target`. Desired states going to agents
    are recorded; `inject` sends one of its own down every open stream. Like
    a real attacker it keeps the agents in step: revisions it forwards are
    shifted past the ones it injected."""

    def __init__(self, target: str) -> None:
        self.stub = dg.DeviceServiceStub(grpc.insecure_channel(target))
        self.recorded: list[d.DesiredState] = []
        self._streams: list[queue.Queue[Any]] = []
        self._offset = 0
        self._highest = 0
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        dg.add_DeviceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def Enroll(self, request: d.EnrollRequest, context: Any) -> d.EnrollResponse:
        return self.stub.Enroll(request, metadata=_auth(context))  # type: ignore[no-any-return]

    def UploadTelemetry(self, request: Any, context: Any) -> Any:
        return self.stub.UploadTelemetry(request, metadata=_auth(context))

    def DownloadArtifact(self, request: Any, context: Any) -> Iterator[Any]:
        yield from self.stub.DownloadArtifact(request, metadata=_auth(context))

    def Sync(self, requests: Iterator[d.AgentMessage], context: Any) -> Iterator[d.ControlMessage]:
        out: queue.Queue[Any] = queue.Queue()
        upstream = self.stub.Sync(self._upward(requests), metadata=_auth(context))

        def pump() -> None:
            try:
                for message in upstream:
                    if message.HasField("desired"):
                        with self._lock:
                            self.recorded.append(d.DesiredState.FromString(
                                message.desired.SerializeToString()
                            ))  # fmt: skip
                            message.desired.revision += self._offset
                            self._highest = max(self._highest, message.desired.revision)
                    out.put(message)
            except grpc.RpcError as exc:
                out.put(exc)
            out.put(None)

        threading.Thread(target=pump, daemon=True).start()
        context.add_callback(upstream.cancel)
        with self._lock:
            self._streams.append(out)
        while (message := out.get()) is not None:
            if isinstance(message, grpc.RpcError):
                context.abort(message.code(), message.details() or "")
            yield message

    def _upward(self, requests: Iterator[d.AgentMessage]) -> Iterator[d.AgentMessage]:
        # Revisions reported back are shifted back, so the control plane
        # sees its own numbers.
        for message in requests:
            kind = message.WhichOneof("kind")
            with self._lock:
                if kind in ("hello", "status"):
                    inner = getattr(message, kind)
                    inner.applied_revision = max(0, inner.applied_revision - self._offset)
            yield message

    def inject(self, desired: d.DesiredState) -> None:
        """Send `desired` (with the next revision) down every open stream."""
        with self._lock:
            self._offset += 1
            self._highest += 1
            message = d.DesiredState.FromString(desired.SerializeToString())
            message.revision = self._highest
            for out in self._streams:
                out.put(d.ControlMessage(desired=message))

    def pushed(self, device_id: str, sequence: int) -> d.DesiredState:
        """The last recorded desired state that carried assignment `sequence`."""
        with self._lock:
            found = [
                s for s in self.recorded
                if sequence in {a.sequence for a in s.assignments}
                and _statement(s).device_id == device_id
            ]  # fmt: skip
        assert found, f"no desired state with assignment {sequence} for {device_id}"
        return found[-1]

    def stop(self) -> None:
        self.server.stop(grace=None)


def _assignment(desired: d.DesiredState) -> d.Assignment:
    """The device's one assignment, where an agent of protocol 2 reads it
    (DesiredState.assignments). The control plane copies a device's only
    assignment into the singular `assignment` too (for one-model agents):
    the tests edit this one and copy it there (World.refused)."""
    (only,) = desired.assignments
    return only


def _statement(desired: d.DesiredState) -> c.AssignmentStatement:
    return c.AssignmentStatement.FromString(_assignment(desired).statement)


# ---------------------------------------------------------------- the world


@dataclass
class World:
    cp: ControlPlane
    op: Any
    token: str
    root: Path
    mitm: Mitm
    db: Database
    digests: dict[str, str]
    agents: list[AgentProcess] = field(default_factory=list)
    count: int = 0

    def agent(self, **config: Any) -> AgentProcess:
        # Its own "run" label: a rollout selects it alone.
        self.count += 1
        number = self.count
        return AgentProcess(
            self.root / f"agent-{number}", self.mitm.address, self.token,
            labels={"tier": CLASS, "run": str(number)}, telemetry_interval_s=60, **config,
        )  # fmt: skip

    def start(self, agent: AgentProcess, **kw: Any) -> str:
        self.agents.append(agent.start(**kw))
        device_id = str(wait_for(agent.identity)["device_id"])
        wait_for(lambda: self.op.GetDevice(o.GetDeviceRequest(id=device_id)).class_name)
        return device_id

    def assign(self, device_id: str, version: str) -> int:
        (done,) = self.op.AssignModel(
            o.AssignModelRequest(device_ids=[device_id], model_name=MODEL, model_version=version)
        ).assignments
        return int(done.sequence)

    def install(self, agent: AgentProcess, device_id: str, version: str) -> int:
        sequence = self.assign(device_id, version)
        status = settled(self.op, device_id, sequence, model=MODEL)
        assert of_status(status) == "committed", status
        assert served(agent) == (version, self.digests[version])
        return sequence

    def refused(self, agent: AgentProcess, device_id: str, desired: d.DesiredState) -> str:
        """Inject `desired`; the reason the agent reports for refusing it.
        It keeps serving what it served, and its trusted state is unchanged."""
        serving, trusted = served(agent), _trust(agent)
        # The one-model copy made alike: the message is as consistent as
        # the control plane's own.
        injected = d.DesiredState.FromString(desired.SerializeToString())
        injected.assignment.CopyFrom(_assignment(injected))
        self.mitm.inject(injected)
        status = settled(self.op, device_id, _assignment(injected).sequence, model=MODEL)
        assert of_status(status) == "failed", status
        assert served(agent) == serving and _trust(agent) == trusted
        return status.reason

    def signing_key(self) -> tuple[str, bytes]:
        """The control plane's current key (id, private key): what a
        control plane that got it wrong would sign with."""
        with self.db.engine.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT id, private_key FROM signing_keys WHERE retired_at IS NULL"
            ).one()
        return str(row[0]), bytes(row[1])


def _json(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    assert isinstance(document, dict), path
    return document


def _trust(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    """What the agent trusts: "device", the signing keys (state_dir/trust.json),
    and "model", the model's own facts (models/<model>/trust.json: the
    highest sequence verified for it, that statement's digest, the version
    committed)."""
    return {
        "device": _json(agent.state_dir / "trust.json"),
        "model": _json(agent.state_dir / "models" / MODEL / "trust.json"),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("signed")
    cp = ControlPlane(root / "cp")
    cp.start()
    mitm = Mitm(cp.address)
    db = Database(make_engine(sqlite_url(cp.data_dir)))
    try:
        op = cp.operator()
        digests = publish_digits_versions(op, db, root, blob_dir=cp.data_dir / "blobs")
        token = op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="signed")).secret
        yield World(cp, op, token, root, mitm, db, digests)
    finally:
        mitm.stop()
        db.dispose()
        cp.close()


@pytest.fixture
def w(world: World) -> Iterator[World]:
    yield world
    for agent in world.agents:
        agent.close()
    world.agents.clear()


# ---------------------------------------------------------------- the tests


def test_replays_tampering_untrusted_keys_and_swapped_fields_are_refused(w: World) -> None:
    agent = w.agent()
    device_id = w.start(agent)
    w.install(agent, device_id, "1.0.0")
    w.install(agent, device_id, "2.0.0")
    assert _trust(agent)["model"]["sequence"] == 2
    # (a) The signed assignment of 1.0.0, captured on the wire, fed back.
    old = w.mitm.pushed(device_id, 1)
    assert "replayed assignment: sequence 1 is not newer than 2" in w.refused(agent, device_id, old)

    # (b) The statement edited (a newer sequence), its signature kept.
    tampered = d.DesiredState.FromString(w.mitm.pushed(device_id, 2).SerializeToString())
    edited, t = _statement(tampered), _assignment(tampered)
    edited.sequence = t.sequence = 7
    t.statement = edited.SerializeToString()
    assert "not signed by a trusted key" in w.refused(agent, device_id, tampered)

    # Signed, correctly, by a key the device never trusted.
    kid, private, _ = signing.generate()
    edited.sequence = t.sequence = 8
    edited.key_id = kid
    t.statement = edited.SerializeToString()
    t.statement_signature = signing.sign(private, t.statement)
    assert "not signed by a trusted key" in w.refused(agent, device_id, tampered)

    # Mix and match: a genuine statement (of assignment 2) with another
    # sequence outside it.
    swapped = d.DesiredState.FromString(w.mitm.pushed(device_id, 2).SerializeToString())
    _assignment(swapped).sequence = 9
    reason = w.refused(agent, device_id, swapped)
    assert "does not match its signed statement: sequence 9" in reason
    assert _trust(agent)["model"]["sequence"] == 2


def test_a_downgrade_needs_the_signed_rollback_flag(w: World) -> None:
    agent = w.agent()
    device_id = w.start(agent)
    w.install(agent, device_id, "1.0.0")
    w.install(agent, device_id, "2.0.0")
    # A control plane that got it wrong: a correctly signed, newer assignment
    # back to 1.0.0 without the rollback flag.
    forged = d.DesiredState.FromString(w.mitm.pushed(device_id, 1).SerializeToString())
    kid, private = w.signing_key()
    a = _assignment(forged)
    a.sequence = 50
    a.statement = statements.assignment_statement(
        device_id=device_id, sequence=50, model_name=MODEL, model_version="1.0.0",
        artifact_sha256=a.artifact_digest, manifest_digest=hashlib.sha256(a.manifest).hexdigest(),
        shadow=False, rollback=False, key_id=kid, issued_at=dt.datetime.now(dt.UTC),
        rollout_id=a.rollout_id, artifact_size=a.artifact_size,
    )  # fmt: skip
    a.statement_signature = signing.sign(private, a.statement)
    reason = w.refused(agent, device_id, forged)
    assert "downgrade without a signed rollback instruction" in reason and "2.0.0" in reason

    # An operator's AssignModel of the older version carries the flag.
    sequence = w.install(agent, device_id, "1.0.0")
    pushed = w.mitm.pushed(device_id, sequence)
    assert _assignment(pushed).rollback and _statement(pushed).rollback
    assert _trust(agent)["model"]["committed"] == "1.0.0"

    # A rollout to 2.0.0, aborted with revert once the device committed.
    labels = w.op.GetDevice(o.GetDeviceRequest(id=device_id)).labels
    spec = o.RolloutSpec(model_name=MODEL, model_version="2.0.0", class_names=[CLASS],
                         label_selector={"run": labels["run"]})  # fmt: skip
    stage = spec.stages.add(name="all", percent=100.0)
    stage.bake_time.FromSeconds(600)
    rollout = w.op.CreateRollout(o.CreateRolloutRequest(spec=spec, start=True)).rollout

    def member() -> o.RolloutDevice:
        (m,) = w.op.GetRollout(o.GetRolloutRequest(id=rollout.id)).devices
        return m

    wait_for(lambda: member().state == o.ROLLOUT_DEVICE_STATE_COMMITTED, timeout=60)
    assert served(agent) == ("2.0.0", w.digests["2.0.0"])
    w.op.AbortRollout(o.AbortRolloutRequest(id=rollout.id, revert=True, reason="test"))
    wait_for(lambda: member().state == o.ROLLOUT_DEVICE_STATE_REVERTED, timeout=60)
    (current,) = w.op.ListDeployments(o.ListDeploymentsRequest(device_id=device_id)).assignments
    revert = current.sequence
    status = settled(w.op, device_id, revert)
    assert of_status(status) == "committed", status
    assert served(agent) == ("1.0.0", w.digests["1.0.0"])
    assert _statement(w.mitm.pushed(device_id, revert)).rollback


def test_after_a_rotation_the_agent_takes_the_new_key_and_refuses_a_forged_one(w: World) -> None:
    agent = w.agent()
    device_id = w.start(agent)
    w.install(agent, device_id, "1.0.0")
    (k1,) = _trust(agent)["device"]["keys"]
    rotated = w.op.RotateSigningKey(o.RotateSigningKeyRequest(reason="drill"))
    assert rotated.previous_key.key_id == k1
    k2 = rotated.new_key
    sequence = w.install(agent, device_id, "2.0.0")
    pushed = _assignment(w.mitm.pushed(device_id, sequence))
    # Installed an artifact whose manifest and statement only the new key
    # signed; the old key is no longer trusted.
    assert signing.verify(k2.public_key, pushed.manifest, pushed.manifest_signature)
    assert signing.verify(k2.public_key, pushed.statement, pushed.statement_signature)
    assert set(_trust(agent)["device"]["keys"]) == {k2.key_id}

    # A forged link: "k2 was replaced by evil", signed by evil itself, and
    # an assignment signed by evil.
    forged = d.DesiredState.FromString(w.mitm.pushed(device_id, sequence).SerializeToString())
    evil_id, evil, evil_public = signing.generate()
    link = statements.rotation_statement(
        previous_key_id=k2.key_id, key_id=evil_id, public_key=evil_public,
        rotated_at=dt.datetime.now(dt.UTC),
    )  # fmt: skip
    forged.key_rotations.add(statement=link, signature=signing.sign(evil, link))
    statement, f = _statement(forged), _assignment(forged)
    statement.sequence = f.sequence = 60
    statement.key_id = evil_id
    f.statement = statement.SerializeToString()
    f.statement_signature = signing.sign(evil, f.statement)
    f.manifest_signature = signing.sign(evil, f.manifest)
    reason = w.refused(agent, device_id, forged)
    assert f"names trusted key {k2.key_id} but is not signed by a trusted key" in reason


def test_a_kill_between_verification_and_persisting_keeps_the_old_trusted_state(
    w: World,
) -> None:
    agent = w.agent()
    device_id = w.start(agent)
    w.install(agent, device_id, "1.0.0")
    before = _trust(agent)
    assert agent.stop() == 0
    agent.start(fault_pause=VERIFIED)
    sequence = w.assign(device_id, "3.0.0")
    marker = agent.state_dir / MARKER_FILE
    assert wait_for(lambda: marker.exists() and marker.read_text(), timeout=60) == VERIFIED
    # Every check passed; nothing of it is trusted yet.
    assert _trust(agent) == before
    agent.kill()
    assert _trust(agent) == before
    marker.unlink()
    agent.start()
    status = settled(w.op, device_id, sequence)
    assert of_status(status) == "committed", status
    assert served(agent) == ("3.0.0", w.digests["3.0.0"])
    after = _trust(agent)
    assert after["model"]["sequence"] == sequence and after["model"]["committed"] == "3.0.0"


def test_signing_keys_ls_and_rotate_from_the_cli(w: World) -> None:
    before = edgefleet_json(w.cp, "signing-keys", "ls")
    current = [k["key_id"] for k in before if not k.get("retired_at")]
    assert len(current) == 1
    rotated = edgefleet(w.cp, "signing-keys", "rotate", "--yes", "--reason", "from the cli")
    assert current[0] in rotated.stdout
    after = edgefleet_json(w.cp, "signing-keys", "ls")
    assert [k["key_id"] for k in after][: len(before)] == [k["key_id"] for k in before]
    (new,) = [k for k in after if not k.get("retired_at")]
    assert new["key_id"] not in {k["key_id"] for k in before}
    table = edgefleet(w.cp, "signing-keys", "ls").stdout
    assert "current" in table and "retired" in table
    # Asking first, unless --yes.
    refused = edgefleet(w.cp, "signing-keys", "rotate", check=False)
    assert refused.returncode != 0 and len(edgefleet_json(w.cp, "signing-keys", "ls")) == len(after)
