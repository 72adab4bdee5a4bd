"""The agent's update machine over fake ports, for tests: the ports (source
of bytes, validator, activator, reporter, sleep) are fakes that record what
happened and raise injected faults; the machine, the store, the download and
the manifest verifier are real. A Rig is one state directory with its
machine; install_artifact puts a model where a finished download would.

Manifests of real ONNX models (`manifest_for`): class "cpu", onnxruntime, the
model's float32 inputs and outputs, optionally golden samples computed with
bare onnxruntime (for the real ManifestValidator) and a nested fallback
manifest (`fallback=`, a version's lighter fallback artifact:
agent/update/fallback.py). ModelsRig is the agent's ModelUpdates over a real
ModelHost; it takes the real validator when a test asks for one."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.identity import signing_key_id
from edgefleet.agent.serving import ModelHost, encode_tensor
from edgefleet.agent.update.activation import HostActivator
from edgefleet.agent.update.download import artifact_path, part_path
from edgefleet.agent.update.machine import UpdateMachine
from edgefleet.agent.update.models import ModelUpdate, ModelUpdates
from edgefleet.agent.update.ports import (
    Chunk,
    FatalUpdateError,
    Ports,
    RetryableUpdateError,
    Validator,
)
from edgefleet.agent.update.remote import StatusReporter
from edgefleet.agent.update.runner import UpdateRunner
from edgefleet.agent.update.states import State
from edgefleet.agent.update.store import Assignment, UpdateRecord, UpdateStore
from edgefleet.agent.update.verify import ManifestVerifier
from edgefleet.update_state import name_of
from edgefleet.v1 import common_pb2

CLASS = "jetson-orin"
OLD = "old-artifact"
DATA = bytes(range(256)) * 40  # 10240 bytes
# A lighter fallback artifact of the same version (make_assignment(fallback=...)).
FALLBACK_DATA = bytes(range(255, -1, -1)) * 24  # 6144 bytes
CHUNK = 1000

# Short names keep the expected chains readable.
IL, D, V, VA, A, C, R, F = (
    State.IDLE,
    State.DOWNLOADING,
    State.VERIFYING,
    State.VALIDATING,
    State.ACTIVATING,
    State.COMMITTED,
    State.ROLLING_BACK,
    State.FAILED,
)
HAPPY = [IL, D, V, VA, A, C, IL]


class Crash(BaseException):
    """The process dies here (kill -9): nothing after it runs."""


# ---------------------------------------------------------------- keys and artifacts


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


SIGNER = Ed25519PrivateKey.generate()
STRANGER = Ed25519PrivateKey.generate()
TRUSTED = {signing_key_id(_raw_public(SIGNER)): _raw_public(SIGNER)}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_assignment(
    data: bytes = DATA,
    *,
    class_name: str = CLASS,
    signer: Ed25519PrivateKey = SIGNER,
    size_bytes: int | None = None,
    manifest_model: str = "digits",
    fallback: bytes | None = None,
) -> Assignment:
    """A signed assignment of `data` as digits 2; with `fallback`, its
    manifest names that as the version's fallback artifact (fallback_nested)."""
    manifest = common_pb2.ArtifactManifest(
        model_name=manifest_model,
        model_version="2",
        class_name=class_name,
        sha256=sha(data),
        size_bytes=len(data) if size_bytes is None else size_bytes,
        fallback_manifest=b"" if fallback is None else fallback_nested(fallback, class_name),
    ).SerializeToString()
    return Assignment(
        model_name="digits",
        model_version="2",
        artifact_digest=sha(data),
        artifact_size=len(data),
        manifest=manifest,
        manifest_signature=signer.sign(manifest),
    )


def fallback_nested(data: bytes = FALLBACK_DATA, class_name: str = CLASS, **fields: Any) -> bytes:
    """The nested manifest of a fallback artifact `data` of digits 2
    (`fields` on top: another model_name, size_bytes, ...)."""
    manifest = common_pb2.ArtifactManifest(
        model_name="digits",
        model_version="2",
        class_name=class_name,
        precision=common_pb2.QUANTIZATION_INT8,
        sha256=sha(data),
        size_bytes=len(data),
    )
    for key, value in fields.items():
        setattr(manifest, key, value)
    return manifest.SerializeToString()


# ---------------------------------------------------------------- fake ports


@dataclass
class Faults:
    """Per state, exceptions to raise on the next handler calls (in order)."""

    queued: dict[State, list[BaseException]] = field(default_factory=dict)
    forever: dict[State, BaseException] = field(default_factory=dict)

    def check(self, state: State) -> None:
        if state in self.forever:
            raise self.forever[state]
        pending = self.queued.get(state)
        if pending:
            raise pending.pop(0)


class FakeDownloader:
    """Serves `data` from the requested offset (or, for a digest in
    `others`, those bytes). `cuts`: one stop position per call (None: serve
    to the end); `ignore_offset`: always start at 0; `corrupt_at`: flip that
    byte; `bad_offset`: claim a wrong chunk offset. `offsets` lists each
    call's offset, `digests` each call's digest."""

    def __init__(
        self,
        data: bytes = DATA,
        *,
        faults: Faults | None = None,
        cuts: list[int | None] | None = None,
        ignore_offset: bool = False,
        corrupt_at: int | None = None,
        bad_offset: bool = False,
        total_size: int | None = None,
        others: Mapping[str, bytes] | None = None,
    ) -> None:
        self.data = data
        self.others = dict(others or {})
        self.digests: list[str] = []
        self.faults = faults or Faults()
        self.cuts = list(cuts or [])
        self.ignore_offset = ignore_offset
        self.corrupt_at = corrupt_at
        self.bad_offset = bad_offset
        self.total_size = len(data) if total_size is None else total_size
        self.offsets: list[int] = []
        self.bytes_served = 0

    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
        self.offsets.append(offset)
        self.digests.append(digest)
        self.faults.check(D)
        source = self.others.get(digest, self.data)
        total_size = len(source) if digest in self.others else self.total_size
        cut = self.cuts.pop(0) if self.cuts else None
        position = 0 if self.ignore_offset else offset
        end = len(source) if cut is None else cut
        while position < end:
            data = bytearray(source[position : min(end, position + CHUNK)])
            if self.corrupt_at is not None and position <= self.corrupt_at < position + len(data):
                data[self.corrupt_at - position] ^= 0xFF
            claimed = position + 1 if self.bad_offset else position
            self.bytes_served += len(data)
            yield Chunk(offset=claimed, data=bytes(data), total_size=total_size)
            position += len(data)


class FaultyVerifier:
    """The real ManifestVerifier behind an injected-fault check."""

    def __init__(self, faults: Faults, inner: ManifestVerifier) -> None:
        self.faults, self.inner = faults, inner

    def verify(
        self,
        path: Path,
        *,
        digest: str,
        manifest: bytes,
        signature: bytes,
        trusted_keys: Mapping[str, bytes] | None = None,
    ) -> None:
        self.faults.check(V)
        self.inner.verify(
            path, digest=digest, manifest=manifest, signature=signature, trusted_keys=trusted_keys
        )


class FakeValidator:
    """Records what it validated (file names) and the manifests' digests;
    `refuse` names digests whose validation fails (fatal)."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.validated: list[str] = []
        self.refuse: set[str] = set()

    def validate(self, path: Path, manifest: bytes) -> None:
        self.faults.check(VA)
        self.validated.append(path.name)
        if self.refuse and common_pb2.ArtifactManifest.FromString(manifest).sha256 in self.refuse:
            raise FatalUpdateError("output 'y' is outside the golden tolerance")


class FakeActivator:
    """Which artifact serves, and which is loaded as a shadow. `active` and
    the shadow survive a restart (the real one persists both); the warm
    standby does not. A fault in Activating strikes after the switch (the
    worst moment). An activation or a rollback drops the shadow."""

    def __init__(self, faults: Faults, active: str | None = OLD) -> None:
        self.faults = faults
        self.current = active
        self.standby: str | None = None
        self.shadowed: str | None = None
        self.paths: list[Path] = []

    def active(self) -> str | None:
        return self.current

    def activate(self, path: Path, manifest: bytes) -> None:
        assert not path.name.endswith(".part") and path.read_bytes()
        self.paths.append(path)
        self.standby, self.current, self.shadowed = self.current, path.name, None
        self.faults.check(A)

    def shadow(self, path: Path, manifest: bytes) -> None:
        assert not path.name.endswith(".part") and path.read_bytes()
        self.paths.append(path)
        self.shadowed = path.name
        self.faults.check(A)

    def rollback(self, previous: str | None) -> None:
        self.faults.check(R)
        self.current, self.standby, self.shadowed = previous, None, None

    def commit(self) -> None:
        self.faults.check(C)
        self.standby = None

    def restart(self) -> None:
        self.standby = None


class FakeReporter:
    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.reports: list[tuple[State, int, int, str | None]] = []
        # State -> raise Crash when that state is first reported (just persisted).
        self.crash_on_enter: set[State] = set()

    def report(self, state: State, bytes_done: int, bytes_total: int, reason: str | None) -> None:
        self.reports.append((state, bytes_done, bytes_total, reason))
        if state in self.crash_on_enter:
            self.crash_on_enter.discard(state)
            raise Crash(f"killed after entering {state}")

    def transitions(self) -> list[State]:
        """Reported states without repeats (progress, retries)."""
        states: list[State] = []
        for state, _, _, _ in self.reports:
            if not states or states[-1] is not state:
                states.append(state)
        return states


class CountingHasher:
    def __init__(self, counter: list[int]) -> None:
        self.inner = hashlib.sha256()
        self.counter = counter

    def update(self, data: bytes, /) -> None:
        self.counter[0] += len(data)
        self.inner.update(data)

    def hexdigest(self) -> str:
        return self.inner.hexdigest()


@dataclass
class Free:
    free: int


class Rig:
    """A state directory, fake ports and a machine over them."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        downloader: FakeDownloader | None = None,
        class_name: str = CLASS,
        max_attempts: int = 3,
        max_loops: int = 50,
        free: int = 10**12,
    ) -> None:
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir(exist_ok=True)
        self.faults = Faults()
        self.downloader = downloader or FakeDownloader()
        self.downloader.faults = self.faults
        self.activator = FakeActivator(self.faults)
        self.validator = FakeValidator(self.faults)
        self.reporter = FakeReporter(self.faults)
        self.verifier = FaultyVerifier(
            self.faults, ManifestVerifier(trusted_keys=TRUSTED, class_name=class_name)
        )
        self.sleeps: list[float] = []
        self.crash_on_sleep = False
        self.hashed = [0]
        self.free = free
        self.max_attempts, self.max_loops = max_attempts, max_loops
        # What Ports.kept says this model's own records still name.
        self.kept: set[str] = set()
        self.machine = self.new_machine()

    def new_machine(self) -> UpdateMachine:
        """A machine as a freshly started agent builds it: from the store."""
        ports = Ports(
            downloader=self.downloader,
            verifier=self.verifier,
            validator=self.validator,
            activator=self.activator,
            reporter=self.reporter,
            sleep=self._sleep,
            kept=lambda: set(self.kept),
        )
        return UpdateMachine(
            UpdateStore(self.state_dir),
            ports,
            max_attempts=self.max_attempts,
            max_loops=self.max_loops,
            hash_factory=lambda: CountingHasher(self.hashed),
            disk_usage=lambda _path: Free(self.free),
            disk_margin=100,
        )

    def _sleep(self, seconds: float) -> None:
        if self.crash_on_sleep:
            self.crash_on_sleep = False
            raise Crash("killed while backing off")
        self.sleeps.append(seconds)

    def restart(self) -> UpdateMachine:
        self.activator.restart()
        self.machine = self.new_machine()
        return self.machine

    def settle_through_crashes(self, limit: int = 20) -> UpdateRecord:
        for _ in range(limit):
            try:
                return self.machine.run_until_settled()
            except Crash:
                self.restart()
        raise AssertionError("did not settle")

    def assert_consistent(self, record: UpdateRecord, assignment: Assignment) -> None:
        """Old or new model, matching the outcome; no partial file in use.
        A fallback the manifest names (FALLBACK_DATA) goes with its version."""
        fallback = common_pb2.ArtifactManifest.FromString(assignment.manifest).fallback_manifest
        fallback_digest = common_pb2.ArtifactManifest.FromString(fallback).sha256
        if record.outcome == "committed":
            assert self.activator.current == assignment.artifact_digest
            assert artifact_path(self.state_dir, assignment.artifact_digest).read_bytes() == DATA
            if fallback_digest:
                path = artifact_path(self.state_dir, fallback_digest)
                assert path.read_bytes() == FALLBACK_DATA
        else:
            assert record.outcome == "failed"
            assert self.activator.current == OLD
            assert not artifact_path(self.state_dir, assignment.artifact_digest).exists()
            if fallback_digest:
                assert not artifact_path(self.state_dir, fallback_digest).exists()
        assert not part_path(self.state_dir, assignment.artifact_digest).exists()
        if fallback_digest:
            assert not part_path(self.state_dir, fallback_digest).exists()
        assert all(not p.name.endswith(".part") for p in self.activator.paths)
        assert self.activator.standby is None
        # What it reported last is what it did.
        last = [s for s in self.reporter.transitions() if s is not IL][-1]
        assert last is (C if record.outcome == "committed" else F)


def fatal(reason: str) -> FatalUpdateError:
    return FatalUpdateError(reason)


def retry(reason: str) -> RetryableUpdateError:
    return RetryableUpdateError(reason)


def install_artifact(
    state_dir: Path, model: Path, version: str, model_name: str = "digits"
) -> tuple[Path, bytes]:
    """Put the ONNX `model` where a finished download would be; its manifest
    (manifest_for: class "cpu", onnxruntime, its inputs and outputs)."""
    data = model.read_bytes()
    path = artifact_path(state_dir, sha(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, path)
    return path, manifest_for(model, model_name, version, data=data)


# ---------------------------------------------------------------- manifests of real models


def _specs(values: list[onnx.ValueInfoProto]) -> list[common_pb2.TensorSpec]:
    return [
        common_pb2.TensorSpec(
            name=v.name,
            dtype="float32",
            shape=[d.dim_value or -1 for d in v.type.tensor_type.shape.dim],
        )
        for v in values
    ]


def golden_samples(
    model: Path, count: int, *, seed: int = 0, expected_from: Path | None = None
) -> list[common_pb2.GoldenSample]:
    """`count` golden samples for the float32 ONNX `model`: random inputs
    (free dimensions taken as 1) and the outputs bare onnxruntime computes
    for them with `expected_from` (default: `model` itself, which then
    passes validation; another model's outputs make it fail as far as the
    two differ)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(expected_from or model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    inputs = onnx.load(model).graph.input
    names = [o.name for o in session.get_outputs()]
    samples = []
    for _ in range(count):
        feed = {
            v.name: rng.random(
                tuple(d.dim_value or 1 for d in v.type.tensor_type.shape.dim), dtype=np.float32
            )
            for v in inputs
        }
        outputs = dict(zip(names, session.run(None, feed), strict=True))
        samples.append(
            common_pb2.GoldenSample(
                inputs=[_tensor(k, v) for k, v in feed.items()],
                expected_outputs=[_tensor(k, np.asarray(v)) for k, v in outputs.items()],
            )
        )
    return samples


def _tensor(name: str, array: np.ndarray) -> common_pb2.TensorData:
    dtype, shape, data = encode_tensor(array)
    return common_pb2.TensorData(name=name, dtype=dtype, shape=shape, data=data)


def manifest_for(
    model: Path,
    name: str,
    version: str,
    *,
    data: bytes | None = None,
    golden: int = 0,
    expected_from: Path | None = None,
    fallback: bytes = b"",
    **fields: Any,
) -> bytes:
    """The serialized manifest of the ONNX `model` as `name` `version`:
    class "cpu", onnxruntime, its float32 inputs and outputs, its sha256
    and size (of `data`, default the file's bytes); with `golden`, that many
    golden samples (golden_samples) and tolerances a correct device meets;
    `fallback`, a nested fallback manifest (itself made by manifest_for);
    `fields` on top (precision, build_id, budgets, ...)."""
    data = model.read_bytes() if data is None else data
    graph = onnx.load(model).graph
    manifest = common_pb2.ArtifactManifest(
        model_name=name,
        model_version=version,
        class_name="cpu",
        runtime=common_pb2.RUNTIME_ONNXRUNTIME,
        sha256=sha(data),
        size_bytes=len(data),
        inputs=_specs(list(graph.input)),
        outputs=_specs(list(graph.output)),
        fallback_manifest=fallback,
    )
    if golden:
        manifest.golden.extend(golden_samples(model, golden, expected_from=expected_from))
        manifest.atol, manifest.rtol, manifest.min_agreement = 1e-4, 1e-3, 1.0
    for key, value in fields.items():
        setattr(manifest, key, value)
    return manifest.SerializeToString()


# ---------------------------------------------------------------- several models


def model_assignment(
    model: Path,
    name: str,
    version: str,
    sequence: int,
    *,
    shadow: bool = False,
    **manifest: Any,
) -> tuple[Assignment, bytes]:
    """A signed assignment of the ONNX `model` as `name` `version` (class
    "cpu", onnxruntime; `manifest`: manifest_for's options, e.g. golden
    samples or a fallback) and the artifact's bytes, for a downloader to
    serve."""
    data = model.read_bytes()
    signed = manifest_for(model, name, version, data=data, **manifest)
    return (
        Assignment(
            model_name=name,
            model_version=version,
            artifact_digest=sha(data),
            artifact_size=len(data),
            manifest=signed,
            manifest_signature=SIGNER.sign(signed),
            sequence=sequence,
            shadow=shadow,
        ),
        data,
    )


class BlobDownloader:
    """Serves any artifact it was given, by digest, in CHUNK-sized chunks.
    `gates[digest]`, while clear, holds that download after its first chunk
    (a slow link), so tests can run another model's update meanwhile.
    `fetched` lists the digests asked for, `offsets` each (digest, offset)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.gates: dict[str, threading.Event] = {}
        self.fetched: list[str] = []
        self.offsets: list[tuple[str, int]] = []

    def add(self, data: bytes) -> str:
        digest = sha(data)
        self.blobs[digest] = data
        return digest

    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
        self.fetched.append(digest)
        self.offsets.append((digest, offset))
        data = self.blobs[digest]
        for index, start in enumerate(range(offset, len(data), CHUNK)):
            gate = self.gates.get(digest)
            if index == 1 and gate is not None:
                gate.wait(30)
            yield Chunk(start, data[start : start + CHUNK], len(data))


class ModelsRig:
    """The agent's ModelUpdates over a real ModelHost and the real
    HostActivator, TrustStore-less ports with a BlobDownloader, a fake
    validator (or `validator`, e.g. the real ManifestValidator) and the real
    manifest verifier: what the daemon builds, minus gRPC. Statuses every
    model's reporter published land in `published`."""

    def __init__(
        self,
        state_dir: Path,
        host: ModelHost | None = None,
        *,
        validator: Validator | None = None,
    ) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.host = host or ModelHost()
        self.downloader = BlobDownloader()
        self.faults = Faults()
        self.validator: Validator = validator or FakeValidator(self.faults)
        self.published: list[common_pb2.UpdateStatus] = []
        self._lock = threading.Lock()
        # Per model name: wraps its ports (fault injection), like UpdateFaults.
        self.wrap: dict[str, Callable[[Ports], Ports]] = {}
        self.updates = ModelUpdates(state_dir, self._build)

    def _publish(self, status: common_pb2.UpdateStatus) -> None:
        with self._lock:
            self.published.append(status)

    def _build(self, name: str, remove: Callable[[str], None]) -> ModelUpdate:
        updates = self.updates

        def shared() -> set[str]:
            return updates.in_use(exclude=name)

        activator = HostActivator(self.host, self.state_dir, name, in_use=shared)
        machine: UpdateMachine | None = None

        def record() -> UpdateRecord:
            assert machine is not None
            return machine.record

        def active() -> tuple[str, str]:
            current = activator.current()
            return (current.model_version, current.digest) if current else ("", "")

        reporter = StatusReporter(self._publish, record, active, model_name=name)
        ports = Ports(
            downloader=self.downloader,
            verifier=ManifestVerifier(trusted_keys=TRUSTED, class_name="cpu"),
            validator=self.validator,
            activator=activator,
            reporter=reporter,
            sleep=lambda seconds: None,
            shared=shared,
            kept=activator.store.digests,
        )
        if name in self.wrap:
            ports = self.wrap[name](ports)
        machine = UpdateMachine(UpdateStore(self.state_dir, name), ports, disk_margin=0)
        runner = UpdateRunner(machine, name=f"update-{name}", remove=remove)
        return ModelUpdate(name, machine, runner, reporter, activator, None)

    def boot(self) -> None:
        """What the daemon does at start: migrate, restore, start runners."""
        self.updates.load()
        self.updates.start()

    def assign(self, *assignments: Assignment, remove_others: bool = True) -> None:
        self.updates.apply(assignments, remove_others=remove_others)

    def statuses(self, name: str) -> list[common_pb2.UpdateStatus]:
        with self._lock:
            return [s for s in self.published if s.model_name == name]

    def wait_for(self, check: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; published: {self.published}")
            time.sleep(0.02)

    def settled(self, name: str, sequence: int, timeout: float = 30.0) -> str:
        """Wait for model `name`'s update `sequence` to settle; its outcome."""
        outcome: list[str] = []

        def done() -> bool:
            for status in self.statuses(name):
                state = name_of(status.state)
                if status.sequence == sequence and state in ("committed", "failed"):
                    update = self.updates.get(name)
                    if update is not None and not update.machine.record.pending:
                        outcome.append(state)
                        return True
            return False

        self.wait_for(done, timeout)
        return outcome[0]

    def stop(self) -> None:
        self.updates.stop(timeout=5.0)
