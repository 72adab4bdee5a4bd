"""A damaged blob is never served, and says so (issues 18 and 24).

The blob store (`<data-dir>/blobs/sha256/...`) holds the only copy of each
blob's bytes (since 0016 SQL holds only what a blob is). Shown against a real
`edgefleet server` process on SQLite and PostgreSQL, damaging the file on
disk as a failing disk or a careless hand would: a flipped byte (also with
its mtime put back), a truncation, a deletion. Each time the next real
DownloadArtifact fails DATA_LOSS naming the digest and what to do, never
sending a damaged byte; the damaged file is quarantined and logged once;
pushing the same bytes again puts them back and the download returns the
exact bytes, nothing left half-written; the same after a restart. A download
in flight when the file changes ends UNAVAILABLE having sent only good
bytes, and resuming it once the bytes are back completes it. Verification is
once per file version, not per request (the server's read counters say so).
A real agent installs the artifact once its bytes are back."""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.db.engine import make_engine
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.services.blobs import BlobStore
from edgefleet.controlplane.services.builds import BuildService
from edgefleet.update_state import of_status
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import operator_pb2 as o
from testkit.agent_harness import AgentProcess, wait_for
from testkit.builds import fake_result
from testkit.harness import ControlPlane
from testkit.models import model_parts, push_model

pytestmark = pytest.mark.timeout(300)

MODEL, VERSION, CLASS = "cached", "1.0.0", "cache-test"
# The artifact: a valid ONNX model (the agent runs it) whose random weights
# make it WEIGHT_COLUMNS * 64 * 4 bytes, many download chunks.
WEIGHT_COLUMNS = 32 * 1024  # 8 MiB
SMALL_CHUNK = 64 * 1024  # the smallest chunk the server sends
WARNING = "does not match its sha256"


def _model(path: Path) -> Path:
    weights = np.random.default_rng(11).standard_normal((64, WEIGHT_COLUMNS), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)],
        "cached",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                       ["batch", WEIGHT_COLUMNS])],
        [numpy_helper.from_array(weights, "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


class _NoEvents:
    def publish(self, event: object) -> None:
        pass


@dataclass
class World:
    cp: ControlPlane
    op: Any
    digest: str
    data: bytes
    token: str
    credentials: list[str]
    root: Path
    model: Path
    pushes: int = 0

    @property
    def cached(self) -> Path:
        """The server's cache file of the artifact."""
        return self.cp.data_dir / "blobs" / "sha256" / self.digest[:2] / self.digest

    @property
    def quarantined(self) -> Path:
        return self.cp.data_dir / "blobs" / "quarantine" / self.digest

    def download(self, device: int = 0, offset: int = 0, chunk: int = 0) -> bytes:
        out = bytearray()
        for piece in self.cp.device_stub().DownloadArtifact(
            d.DownloadArtifactRequest(digest=self.digest, offset=offset, chunk_size=chunk),
            metadata=bearer_metadata(self.credentials[device]),
            timeout=60,
        ):
            assert piece.offset == offset + len(out) and piece.total_size == len(self.data)
            out += piece.data
        return bytes(out)

    def data_loss(self, device: int = 0, offset: int = 0, chunk: int = 0) -> str:
        """A download that must fail DATA_LOSS; its details."""
        with pytest.raises(grpc.RpcError) as err:
            self.download(device, offset, chunk)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS, err.value
        details = err.value.details() or ""
        assert self.digest in details and "push the model version again" in details
        return details

    def push_again(self) -> None:
        """The same bytes pushed as a new version: the push puts them back."""
        self.pushes += 1
        push_model(self.op, MODEL, f"1.0.{self.pushes}", model_parts(model=self.model))

    def warnings(self) -> int:
        return self.cp.log().count(WARNING)

    def server_reads(self) -> int:
        """Bytes the server process has read from files (pread and read
        count; socket receives do not)."""
        assert self.cp.proc is not None
        io = Path(f"/proc/{self.cp.proc.pid}/io").read_text()
        return int(next(line for line in io.splitlines() if line.startswith("rchar:")).split()[1])


def _finish_build(db_url: str, root: Path, model: Path) -> None:
    """Answer the push's build with the pushed model as the artifact."""
    db = Database(make_engine(db_url))
    try:
        builds = BuildService(db, BlobStore(root / "cp" / "blobs"), _NoEvents())
        job = wait_for(lambda: builds.claim("test", 60), timeout=60)
        assert builds.finish(job, "test", fake_result(model), "")
    finally:
        db.dispose()


def _enroll(cp: ControlPlane, token: str, name: str) -> str:
    reply = cp.device_stub().Enroll(
        d.EnrollRequest(
            enrollment_token=token, hardware_id=f"blobs-{name}", name=name,
            hardware=c.HardwareProfile(os="Linux", arch=platform.machine(), cpu_cores=2,
                                       memory_mb=2048),
            runtime=c.RuntimeFingerprint(agent_version="0.1.0", onnxruntime_version="1.20.1"),
        ),
        timeout=30,
    )  # fmt: skip
    assert reply.state == c.DEVICE_STATE_ACCEPTED
    return str(reply.device_credential)


@pytest.fixture
def world(db_url: str, tmp_path: Path) -> Iterator[World]:
    cp = ControlPlane(tmp_path / "cp", db_url)
    cp.start()
    try:
        op = cp.operator()
        op.CreateDeviceClass(o.CreateDeviceClassRequest(
            name=CLASS, constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME),
            match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=[platform.machine()])],
        ))  # fmt: skip
        model = _model(tmp_path / "model.onnx")
        push_model(op, MODEL, VERSION, model_parts(model=model))
        _finish_build(db_url, tmp_path, model)
        (build,) = op.ListBuilds(o.ListBuildsRequest()).builds
        assert build.state == o.BUILD_STATE_SUCCEEDED, build.error
        data = model.read_bytes()
        assert build.artifact_digest == hashlib.sha256(data).hexdigest()
        token = op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="blobs")).secret
        credentials = [_enroll(cp, token, f"device-{i}") for i in range(2)]
        yield World(cp, op, build.artifact_digest, data, token, credentials, tmp_path, model)
    finally:
        cp.close()


# ---------------------------------------------------------------- damage


def _flip(path: Path, at: int, *, keep_mtime: bool = False) -> None:
    """Flip one bit in place, as a failing disk or a stray write would."""
    before = path.stat()
    with path.open("r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x01]))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 3)


def _delete(path: Path) -> None:
    path.unlink()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _assert_healed(w: World) -> None:
    """The store holds the right bytes and nothing half-written is left."""
    assert _sha(w.cached.read_bytes()) == w.digest
    assert not any((w.cp.data_dir / "blobs" / "tmp").iterdir())


# ---------------------------------------------------------------- the tests


def test_a_flipped_truncated_or_deleted_file_is_never_served_and_the_same_bytes_heal_it(
    world: World,
) -> None:
    w = world
    assert _sha(w.download()) == w.digest
    size = len(w.data)
    damages = [
        ("a flipped byte", lambda p: _flip(p, size // 2), True),
        ("a flipped byte, mtime put back", lambda p: _flip(p, 7, keep_mtime=True), True),
        ("a truncation", _truncate, True),
        ("a deletion", _delete, False),
    ]
    for what, damage, quarantined in damages:
        warnings = w.warnings()
        w.quarantined.unlink(missing_ok=True)
        damage(w.cached)
        # The next download, and the other device's, fail and say why.
        w.data_loss()
        w.data_loss(device=1, chunk=SMALL_CHUNK)
        if quarantined:
            # Logged once (not per request), the bad copy kept for a look.
            assert w.warnings() == warnings + 1, what
            bad = w.quarantined.read_bytes()
            assert _sha(bad) != w.digest and len(bad) in (size, size // 3), what
        else:
            assert w.warnings() == warnings and not w.quarantined.exists(), what
        w.push_again()
        assert _sha(w.download()) == w.digest, what
        assert _sha(w.download(device=1, chunk=SMALL_CHUNK)) == w.digest, what
        _assert_healed(w)

    # After a restart: damage done while the server was down (the mtime put
    # back, so only hashing can tell) is found before the first download.
    for what, damage in [
        ("a flipped byte", lambda p: _flip(p, size - 1, keep_mtime=True)),
        ("a truncation", _truncate),
        ("a deletion", _delete),
    ]:
        w.cp.stop()
        damage(w.cached)
        w.cp.start()
        w.data_loss(chunk=SMALL_CHUNK)
        w.push_again()
        assert _sha(w.download(chunk=SMALL_CHUNK)) == w.digest, what
        _assert_healed(w)


def test_verification_is_once_per_file_version_not_per_download(world: World) -> None:
    w = world
    size = len(w.data)
    w.cp.restart()
    # The first download of this process verifies: it reads the file twice.
    before = w.server_reads()
    assert _sha(w.download()) == w.digest
    first = w.server_reads() - before
    assert first >= 2 * size, first
    # The next ones only read what they send.
    for _ in range(3):
        before = w.server_reads()
        assert _sha(w.download()) == w.digest
        assert w.server_reads() - before < 1.25 * size
    # A new version of the file (same bytes, another mtime) is hashed again,
    # once, and kept.
    past = w.cached.stat().st_mtime_ns - 10**10
    os.utime(w.cached, ns=(past, past))
    before = w.server_reads()
    assert _sha(w.download()) == w.digest
    assert w.server_reads() - before >= 2 * size
    before = w.server_reads()
    assert _sha(w.download()) == w.digest
    assert w.server_reads() - before < 1.25 * size
    assert w.warnings() == 0


def test_a_download_in_flight_when_the_file_changes_ends_cleanly_and_resumes(
    world: World,
) -> None:
    w = world
    size = len(w.data)
    assert _sha(w.download()) == w.digest  # verified: the next one streams at once
    received = bytearray()
    stream = w.cp.device_stub().DownloadArtifact(
        d.DownloadArtifactRequest(digest=w.digest, chunk_size=SMALL_CHUNK),
        metadata=bearer_metadata(w.credentials[0]),
        timeout=60,
    )
    pieces = iter(stream)
    received += next(pieces).data
    # The last byte goes bad while the stream is open and far from it.
    _flip(w.cached, size - 1)
    with pytest.raises(grpc.RpcError) as err:
        for piece in pieces:
            received += piece.data
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert "resume from offset" in (err.value.details() or "")
    # Only good bytes were sent before it ended.
    assert 0 < len(received) < size and bytes(received) == w.data[: len(received)]
    # Resumed from where it stopped, as the agent does: refused until the
    # bytes are back, then the rest is right.
    w.data_loss(offset=len(received))
    w.push_again()
    rest = w.download(offset=len(received))
    assert _sha(bytes(received) + rest) == w.digest
    _assert_healed(w)
    assert w.warnings() == 1


def test_an_agent_installs_the_artifact_once_its_damaged_bytes_are_back(world: World) -> None:
    w = world
    assert _sha(w.download()) == w.digest
    _flip(w.cached, len(w.data) // 4)
    w.data_loss()
    w.push_again()
    agent = AgentProcess(w.root / "agent", w.cp.address, w.token, telemetry_interval_s=60,
                         download_chunk_size=SMALL_CHUNK)  # fmt: skip
    try:
        agent.start()
        device_id = str(wait_for(agent.identity)["device_id"])
        wait_for(lambda: w.op.GetDevice(o.GetDeviceRequest(id=device_id)).class_name == CLASS)
        (assignment,) = w.op.AssignModel(
            o.AssignModelRequest(device_ids=[device_id], model_name=MODEL, model_version=VERSION)
        ).assignments

        def settled() -> c.UpdateStatus | None:
            update = w.op.GetDevice(o.GetDeviceRequest(id=device_id)).update
            settled = of_status(update) in ("committed", "failed")
            return update if update.sequence == assignment.sequence and settled else None

        status = wait_for(settled, timeout=120)
        assert of_status(status) == "committed", (status, agent.log())
        assert status.active_artifact_digest == w.digest
        installed = agent.state_dir / "downloads" / w.digest
        assert _sha(installed.read_bytes()) == w.digest
        _assert_healed(w)
        assert w.warnings() == 1
    finally:
        agent.close()


def test_concurrent_downloads_of_a_damaged_file_all_fail_and_report_it_once(
    world: World,
) -> None:
    """Downloads racing for a damaged file: none gets a damaged byte, the
    damage is logged once."""
    w = world
    _flip(w.cached, 3)
    results: list[str] = []

    def one(device: int) -> None:
        results.append(w.data_loss(device=device % 2, chunk=SMALL_CHUNK))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 6
    assert w.warnings() == 1
    w.push_again()
    assert _sha(w.download()) == w.digest
    _assert_healed(w)
