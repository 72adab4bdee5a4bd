"""Shadow stages on the agent: the candidate loaded beside the active model,
live requests mirrored to it, and its agreement reported in telemetry.

Real parts throughout: ONNX models trained here (two digits MLPs with
different seeds disagree on some inputs; one model against itself agrees on
every row), the real ModelHost, HostActivator, UpdateMachine, RequestStats
and telemetry buffer. The update machine's own tests use its fake ports
(tests/unit/test_update_machine.py) where the machine is what is tested."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.config import load_config
from edgefleet.agent.errors import ConfigError
from edgefleet.agent.runtimes import ONNXRUNTIME, Runner, TensorInfo, open_runner
from edgefleet.agent.serving import INCOMPARABLE, ActivationFailed, ModelHost, compare_outputs
from edgefleet.agent.telemetry import IntervalSample, RequestStats, Resources
from edgefleet.agent.telemetry_buffer import TelemetryBuffer
from edgefleet.agent.telemetry_uploader import to_proto
from edgefleet.agent.update.activation import ACTIVE_FILE, HostActivator
from edgefleet.agent.update.download import artifact_path
from edgefleet.agent.update.machine import UpdateMachine
from edgefleet.agent.update.ports import FatalUpdateError, Ports
from edgefleet.agent.update.store import Assignment, UpdateRecord, UpdateStore
from edgefleet.agent.update.verify import ManifestVerifier
from edgefleet.demo.models import build_digits_classifier
from edgefleet.v1 import common_pb2
from testkit.update_rig import (
    CLASS,
    DATA,
    HAPPY,
    IL,
    OLD,
    SIGNER,
    TRUSTED,
    A,
    F,
    FakeDownloader,
    FakeReporter,
    FakeValidator,
    Faults,
    R,
    Rig,
    fatal,
    install_artifact,
    make_assignment,
    sha,
)

NAME = "digits"
RES = Resources(memory_mb=40.0, cpu_percent=3.0, system_memory_used_percent=50.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shadow-models")
    built = {
        v: build_digits_classifier(root / v, hidden=16 + 8 * seed, seed=seed).model
        for seed, v in enumerate(("1.0", "2.0"))
    }
    built["narrow"] = _narrow_model(root / "narrow.onnx")
    return built


def _narrow_model(path: Path) -> Path:
    """A real model that takes 32 features: warms fine on its own inputs,
    but ONNX Runtime refuses every request mirrored from a 64-feature model."""
    weights = np.random.default_rng(3).normal(size=(32, 10)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probabilities"], axis=-1),
        ],
        "narrow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def _batch(rows: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    # Uniform noise, not digits: two differently trained MLPs disagree on a
    # good share of it, where on real digits they would agree almost always.
    x = np.random.default_rng(seed).random((rows, 64), dtype=np.float32)
    x.flags.writeable = False  # like a decoded request: kept without a copy
    return {"input": x}


@dataclasses.dataclass
class Collected:
    model: str
    active_version: str
    shadow_version: str
    agreed_rows: int
    total_rows: int
    max_diff: float
    latency_s: float


class Collector:
    """A recorder that keeps what it is told (the port, not the host)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []
        self.shadows: list[Collected] = []

    def record(self, model: str, version: str, latency_s: float, outcome: str) -> None:
        self.requests.append((model, version, outcome))

    def record_shadow(self, *args: Any) -> None:
        self.shadows.append(Collected(*args))


def _wait(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def _host_with(
    models: dict[str, Path],
    active: str,
    shadow: str | None,
    *,
    recorder: Any = None,
    **kw: Any,
) -> ModelHost:
    host = ModelHost(recorder=recorder, **kw)
    host.activate(NAME, active, sha(active.encode()), models[active], ONNXRUNTIME)
    host.commit(NAME)
    if shadow is not None:
        host.load_shadow(NAME, f"{shadow}-shadow", sha(shadow.encode()), models[shadow],
                         ONNXRUNTIME)  # fmt: skip
    return host


def _direct(model: Path, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """What the model answers on its own, outside any host."""
    return open_runner(model, ONNXRUNTIME).run(inputs)


# ---------------------------------------------------------------- ModelHost


def test_a_shadow_of_the_same_model_agrees_on_every_row(models: dict[str, Path]) -> None:
    collector = Collector()
    host = _host_with(models, "1.0", "1.0", recorder=collector)
    try:
        assert host.shadow(NAME) is not None and host.active(NAME).version == "1.0"
        for seed in range(5):
            prediction = host.predict_sync(NAME, _batch(seed=seed))
            assert prediction.model.version == "1.0"
        _wait(lambda: len(collector.shadows) == 5)
    finally:
        host.close()
    for seen in collector.shadows:
        assert (seen.model, seen.active_version, seen.shadow_version) == (NAME, "1.0", "1.0-shadow")
        assert seen.agreed_rows == seen.total_rows == 16
        assert seen.max_diff <= 1e-6 and seen.latency_s > 0
    # The app's requests are recorded as usual, once each.
    assert collector.requests == [(NAME, "1.0", "ok")] * 5


def test_a_different_shadow_disagrees_and_apps_still_get_the_active_answer(
    models: dict[str, Path],
) -> None:
    collector = Collector()
    host = _host_with(models, "1.0", "2.0", recorder=collector)
    batches = [_batch(64, seed) for seed in range(4)]

    async def serve() -> list[list[np.ndarray]]:
        # The coroutine path this time (predict), the thread path above.
        return [(await host.predict(NAME, batch)).outputs for batch in batches]

    try:
        answers = asyncio.run(serve())
        _wait(lambda: len(collector.shadows) == len(batches))
    finally:
        host.close()
    for batch, answer in zip(batches, answers, strict=True):
        np.testing.assert_array_equal(answer[0], _direct(models["1.0"], batch)[0])
    agreed = sum(s.agreed_rows for s in collector.shadows)
    total = sum(s.total_rows for s in collector.shadows)
    assert total == 4 * 64
    assert 0 < agreed < total, (agreed, total)
    # The same figure, computed here from the two models' own answers.
    expected = sum(
        int(np.count_nonzero(
            _direct(models["1.0"], b)[0].argmax(1) == _direct(models["2.0"], b)[0].argmax(1)
        ))
        for b in batches
    )  # fmt: skip
    assert agreed == expected
    assert all(0 < s.max_diff <= 1.0 for s in collector.shadows)  # softmax outputs


def test_a_shadow_that_fails_never_fails_an_app_request(models: dict[str, Path]) -> None:
    collector = Collector()
    host = _host_with(models, "1.0", "narrow", recorder=collector)
    try:
        for seed in range(3):
            batch = _batch(8, seed)
            answer = host.predict_sync(NAME, batch).outputs[0]
            np.testing.assert_array_equal(answer, _direct(models["1.0"], batch)[0])
        _wait(lambda: len(collector.shadows) == 3)
        # It keeps mirroring (and the app keeps being answered) after failures.
        host.predict_sync(NAME, _batch(8, 9))
        _wait(lambda: len(collector.shadows) == 4)
    finally:
        host.close()
    assert collector.requests == [(NAME, "1.0", "ok")] * 4
    # A shadow that cannot answer agrees with no row.
    assert [(s.agreed_rows, s.total_rows) for s in collector.shadows] == [(0, 8)] * 4


class GatedRunner:
    """A real ONNX Runtime session that, once `gate` is cleared, waits for
    it before each run: a shadow stuck on a slow device."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()

    @property
    def inputs(self) -> Sequence[TensorInfo]:
        return self.inner.inputs

    @property
    def outputs(self) -> Sequence[TensorInfo]:
        return self.inner.outputs

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self.gate.wait(30)
        return self.inner.run(inputs)


def test_a_stuck_shadow_drops_mirrored_requests_and_never_slows_the_app(
    models: dict[str, Path],
) -> None:
    gated: list[GatedRunner] = []

    def open_model(path: Path, runtime: str, **kw: Any) -> Runner:
        runner = open_runner(path, runtime, **kw)
        if path == models["2.0"]:
            gated.append(GatedRunner(runner))
            return gated[-1]
        return runner

    collector = Collector()
    host = _host_with(models, "1.0", "2.0", recorder=collector, open_model=open_model,
                      shadow_max_per_s=1000)  # fmt: skip
    try:
        gated[0].gate.clear()  # loaded and warmed; now it hangs
        started = time.monotonic()
        for seed in range(40):
            host.predict_sync(NAME, _batch(4, seed))
        elapsed = time.monotonic() - started
        assert elapsed < 5, elapsed  # nothing waited for the stuck shadow
        assert host.shadow_dropped > 0  # the bounded queue filled up
        assert collector.shadows == []
        gated[0].gate.set()
        _wait(lambda: len(collector.shadows) + host.shadow_dropped == 40)
    finally:
        host.close()
    assert all(s.agreed_rows <= s.total_rows == 4 for s in collector.shadows)


def test_mirroring_is_capped_per_second_and_can_be_turned_off(models: dict[str, Path]) -> None:
    now = [100.0]
    capped, off = Collector(), Collector()
    host = _host_with(models, "1.0", "1.0", recorder=capped, clock=lambda: now[0],
                      shadow_max_per_s=3)  # fmt: skip
    silent = _host_with(models, "1.0", "1.0", recorder=off, shadow_max_per_s=0)
    try:
        for seed in range(10):  # all within one instant of the clock
            host.predict_sync(NAME, _batch(2, seed))
            silent.predict_sync(NAME, _batch(2, seed))
        now[0] += 1.0  # a second later: three more
        for seed in range(10):
            host.predict_sync(NAME, _batch(2, seed))
        _wait(lambda: len(capped.shadows) == 6)
        time.sleep(0.2)  # nothing more arrives
    finally:
        host.close()
        silent.close()
    assert len(capped.shadows) == 6 and off.shadows == []


def test_drop_shadow_stops_mirroring_and_a_failed_shadow_load_changes_nothing(
    models: dict[str, Path], tmp_path: Path
) -> None:
    collector = Collector()
    host = _host_with(models, "1.0", "2.0", recorder=collector)
    try:
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"not a model")
        with pytest.raises(ActivationFailed, match="cannot load"):
            host.load_shadow(NAME, "3.0", "x", bad, ONNXRUNTIME)
        assert host.shadow(NAME).version == "2.0-shadow"  # type: ignore[union-attr]
        host.drop_shadow(NAME)
        host.drop_shadow(NAME)  # idempotent
        assert host.shadow(NAME) is None
        host.predict_sync(NAME, _batch())
        time.sleep(0.2)
        assert collector.shadows == []
    finally:
        host.close()


def test_a_recorder_without_record_shadow_still_works(models: dict[str, Path]) -> None:
    class OldRecorder:
        def __init__(self) -> None:
            self.count = 0

        def record(self, model: str, version: str, latency_s: float, outcome: str) -> None:
            self.count += 1

    old = OldRecorder()
    host = _host_with(models, "1.0", "2.0", recorder=old)
    try:
        for seed in range(3):
            host.predict_sync(NAME, _batch(seed=seed))
    finally:
        host.close()
    assert old.count == 3


# ---------------------------------------------------------------- comparing outputs


def test_compare_outputs_for_scores_labels_values_and_mismatches() -> None:
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.4]], dtype=np.float32)
    other = np.array([[0.2, 0.8], [0.3, 0.7], [0.6, 0.4]], dtype=np.float32)
    found = compare_outputs([scores], [other])
    assert found is not None
    assert (found.agreed_rows, found.total_rows) == (2, 3)
    assert found.max_diff == pytest.approx(0.5)
    # Integer labels (argmax baked into the model): equal or not, per row.
    labels = compare_outputs([np.array([1, 2, 3])], [np.array([1, 0, 3])])
    assert labels is not None and (labels.agreed_rows, labels.total_rows) == (2, 3)
    # Regression values: within tolerance per row; a second output counts
    # towards max_diff only.
    values = np.array([[1.0], [2.0]], dtype=np.float32)
    near = compare_outputs([values, np.zeros(3)], [values + 1e-7, np.ones(3)])
    assert near is not None and (near.agreed_rows, near.max_diff) == (2, 1.0)
    far = compare_outputs([values], [values + 0.5])
    assert far is not None and far.agreed_rows == 0
    # Shapes that differ cannot be compared; NaN is as far as it gets.
    assert compare_outputs([scores], [scores[:2]]) == type(found)(0, 3, INCOMPARABLE)
    assert compare_outputs([scores], []) == type(found)(0, 3, INCOMPARABLE)
    nan = scores.copy()
    nan[0, 0] = np.nan
    assert compare_outputs([scores], [nan]).max_diff == INCOMPARABLE  # type: ignore[union-attr]
    # An empty batch has nothing to compare.
    assert compare_outputs([np.zeros((0, 10), dtype=np.float32)], [np.zeros((0, 10))]) is None


# ---------------------------------------------------------------- HostActivator


def _record(state_dir: Path) -> dict[str, Any]:
    document = json.loads((state_dir / ACTIVE_FILE).read_text())
    assert isinstance(document, dict)
    return document


def _serving_v1(state_dir: Path, models: dict[str, Path]) -> tuple[ModelHost, HostActivator, Path]:
    host = ModelHost()
    activator = HostActivator(host, state_dir)
    path1, manifest1 = install_artifact(state_dir, models["1.0"], "1.0")
    activator.activate(path1, manifest1)
    activator.commit()
    return host, activator, path1


def test_activator_shadow_survives_commit_and_restart_then_rollback_drops_it(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    host, activator, path1 = _serving_v1(tmp_path, models)
    serving = host.active(NAME)
    path2, manifest2 = install_artifact(tmp_path, models["2.0"], "2.0")
    activator.shadow(path2, manifest2)
    activator.commit()
    activator.commit()  # idempotent
    # The active model is the same loaded object; the shadow sits beside it.
    assert host.active(NAME) is serving and activator.active() == path1.name
    assert host.shadow(NAME).version == "2.0"  # type: ignore[union-attr]
    assert _record(tmp_path)["shadow"]["digest"] == path2.name
    assert path1.exists() and path2.exists()  # the commit kept the shadow's file
    host.close()
    # A restart serves 1.0 and loads 2.0 as the shadow again.
    host = ModelHost()
    restarted = HostActivator(host, tmp_path)
    served = restarted.restore()
    assert served is not None and served.model_version == "1.0"
    assert host.active(NAME).version == "1.0" and host.shadow(NAME).version == "2.0"  # type: ignore[union-attr]
    # The rollout gave up: the shadow goes, 1.0 stays.
    restarted.rollback(path1.name)
    assert host.shadow(NAME) is None and host.active(NAME).version == "1.0"
    assert "shadow" not in _record(tmp_path) and restarted.active() == path1.name
    host.close()


def test_activating_the_shadowed_artifact_drops_the_shadow_and_commit_cleans_up(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    host, activator, path1 = _serving_v1(tmp_path, models)
    path2, manifest2 = install_artifact(tmp_path, models["2.0"], "2.0")
    activator.shadow(path2, manifest2)
    activator.commit()
    activator.activate(path2, manifest2)
    assert host.shadow(NAME) is None and host.active(NAME).version == "2.0"
    assert "shadow" not in _record(tmp_path)
    activator.commit()
    assert not path1.exists() and path2.exists()
    host.close()


def test_a_shadow_that_does_not_load_is_fatal_and_changes_nothing(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    host, activator, _ = _serving_v1(tmp_path, models)
    before = (tmp_path / ACTIVE_FILE).read_bytes()
    path2, manifest2 = install_artifact(tmp_path, models["2.0"], "2.0")
    path2.write_bytes(b"not a model")
    with pytest.raises(FatalUpdateError, match="cannot load"):
        activator.shadow(path2, manifest2)
    assert host.shadow(NAME) is None and host.active(NAME).version == "1.0"
    assert (tmp_path / ACTIVE_FILE).read_bytes() == before
    host.close()


def test_restore_forgets_a_shadow_whose_file_is_gone(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    host, activator, _ = _serving_v1(tmp_path, models)
    path2, manifest2 = install_artifact(tmp_path, models["2.0"], "2.0")
    activator.shadow(path2, manifest2)
    activator.commit()
    host.close()
    path2.unlink()
    host = ModelHost()
    served = HostActivator(host, tmp_path).restore()
    assert served is not None and served.model_version == "1.0"
    assert host.shadow(NAME) is None and "shadow" not in _record(tmp_path)
    host.close()


# ---------------------------------------------------------------- the update machine


def _shadow_assignment(sequence: int = 1, *, shadow: bool = True) -> Assignment:
    return dataclasses.replace(make_assignment(), sequence=sequence, shadow=shadow)


def test_machine_takes_a_shadow_to_committed_without_touching_the_active_model(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    assignment = _shadow_assignment()
    rig.machine.assign(assignment)
    record = rig.machine.run_until_settled()
    assert record.history == [s.value for s in HAPPY] and record.outcome == "committed"
    assert rig.activator.current == OLD and rig.activator.shadowed == assignment.artifact_digest
    assert artifact_path(rig.state_dir, assignment.artifact_digest).read_bytes() == DATA
    # Then the rollout promotes it: the same artifact, no longer a shadow.
    served = rig.downloader.bytes_served
    promoted = _shadow_assignment(2, shadow=False)
    rig.machine.assign(promoted)
    record = rig.machine.run_until_settled()
    assert record.outcome == "committed"
    assert rig.downloader.bytes_served == served  # already on disk: not fetched again
    assert rig.activator.current == promoted.artifact_digest and rig.activator.shadowed is None


def test_machine_rolls_a_failed_shadow_back_and_keeps_the_active_model(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.faults.queued = {A: [fatal("shadow does not warm")]}
    assignment = _shadow_assignment()
    rig.machine.assign(assignment)
    record = rig.machine.run_until_settled()
    assert record.history == [s.value for s in (*HAPPY[:5], R, F, IL)]
    assert record.outcome == "failed" and "shadow does not warm" in (record.reason or "")
    assert rig.activator.current == OLD and rig.activator.shadowed is None
    assert not artifact_path(rig.state_dir, assignment.artifact_digest).exists()


def test_machine_restarted_while_loading_a_shadow_rolls_it_back(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.reporter.crash_on_enter = {A}
    rig.machine.assign(_shadow_assignment())
    record = rig.settle_through_crashes()
    assert record.outcome == "failed" and "restarted during activation" in (record.reason or "")
    assert rig.activator.current == OLD and rig.activator.shadowed is None


def test_a_failed_assignment_of_the_active_artifact_keeps_its_file(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    assignment = _shadow_assignment()
    rig.activator.current = assignment.artifact_digest  # it serves this very artifact
    path = artifact_path(rig.state_dir, assignment.artifact_digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(DATA)
    rig.faults.queued = {A: [fatal("shadow does not warm")]}
    rig.machine.assign(assignment)
    assert rig.machine.run_until_settled().outcome == "failed"
    assert path.read_bytes() == DATA


def _signed(
    state_dir: Path, model: Path, version: str, sequence: int, *, shadow: bool
) -> Assignment:
    """An assignment of a real model, its manifest signed for this class."""
    scratch = state_dir.parent / f"scratch-{version}-{sequence}"
    _, raw = install_artifact(scratch, model, version)
    manifest = common_pb2.ArtifactManifest()
    manifest.ParseFromString(raw)
    manifest.class_name = CLASS
    data = manifest.SerializeToString()
    return Assignment(
        model_name=NAME, model_version=version, artifact_digest=manifest.sha256,
        artifact_size=manifest.size_bytes, manifest=data, manifest_signature=SIGNER.sign(data),
        sequence=sequence, shadow=shadow,
    )  # fmt: skip


def test_machine_with_a_real_activator_shadows_then_promotes(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    stats = RequestStats(probe=lambda: RES)
    host = ModelHost(recorder=stats)
    activator = HostActivator(host, state_dir)
    path1, manifest1 = install_artifact(state_dir, models["1.0"], "1.0")
    activator.activate(path1, manifest1)
    activator.commit()
    faults = Faults()
    machine = UpdateMachine(
        UpdateStore(state_dir),
        Ports(
            downloader=FakeDownloader(models["2.0"].read_bytes()),
            verifier=ManifestVerifier(trusted_keys=TRUSTED, class_name=CLASS),
            # Validation runs in a child process and has its own tests.
            validator=FakeValidator(faults),
            activator=activator,
            reporter=FakeReporter(faults),
            sleep=lambda _s: None,
        ),
    )
    try:
        machine.assign(_signed(state_dir, models["2.0"], "2.0", 1, shadow=True))
        record = machine.run_until_settled()
        assert record.outcome == "committed", record.reason
        assert host.active(NAME).version == "1.0" and activator.active() == path1.name
        assert host.shadow(NAME).version == "2.0"  # type: ignore[union-attr]
        for seed in range(3):
            assert host.predict_sync(NAME, _batch(32, seed)).model.version == "1.0"

        # Intervals as the telemetry loop takes them, until every mirrored
        # request is in (the comparisons finish after the requests did).
        samples: list[IntervalSample] = []

        def mirrored() -> bool:
            samples.extend(stats.snapshot_and_reset(dt.datetime.now(dt.UTC)))
            return sum(s.shadow_requests for s in samples) == 3

        _wait(mirrored)
        assert {(s.model_name, s.model_version) for s in samples if s.model_name} == {(NAME, "1.0")}
        assert sum(s.request_count for s in samples) == 3
        shadowed = [s for s in samples if s.shadow_requests]
        assert {s.shadow_version for s in shadowed} == {"2.0"}
        agreement = sum(s.shadow_agreement * s.shadow_requests for s in shadowed) / 3
        assert 0 < agreement < 1
        # The next stage: the same version for real.
        machine.assign(_signed(state_dir, models["2.0"], "2.0", 2, shadow=False))
        record = machine.run_until_settled()
        assert record.outcome == "committed", record.reason
        assert host.active(NAME).version == "2.0" and host.shadow(NAME) is None
        assert not path1.exists()
    finally:
        host.close()


# ---------------------------------------------------------------- telemetry


def test_request_stats_put_shadow_figures_into_the_sample_of_the_active_version() -> None:
    stats = RequestStats(probe=lambda: RES)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for _ in range(4):
        stats.record(NAME, "1.0", 0.002, "ok")
    stats.record_shadow(NAME, "1.0", "2.0", 7, 8, 0.25, 0.004)
    stats.record_shadow(NAME, "1.0", "2.0", 5, 8, 0.5, 0.010)
    stats.record("other", "3.0", 0.001, "ok")
    digits, other = stats.snapshot_and_reset(now)  # sorted by model
    assert (other.model_name, other.shadow_version, other.shadow_requests) == ("other", "", 0)
    assert (digits.model_version, digits.request_count) == ("1.0", 4)
    assert (digits.shadow_version, digits.shadow_requests) == ("2.0", 2)
    assert digits.shadow_agreement == pytest.approx(12 / 16)
    assert digits.shadow_max_diff == 0.5
    assert digits.shadow_latency_p95_ms == pytest.approx(10.0)
    # A result that lands after its request's interval still makes a
    # sample; a new shadow version starts its figures afresh; a NaN
    # difference stays finite for the wire.
    stats.record_shadow(NAME, "1.0", "2.0", 1, 1, 0.1, 0.004)
    stats.record_shadow(NAME, "1.0", "2.1", 0, 2, float("nan"), 0.004)
    (late,) = stats.snapshot_and_reset(now)
    assert (late.request_count, late.shadow_version, late.shadow_requests) == (0, "2.1", 1)
    assert (late.shadow_agreement, late.shadow_max_diff) == (0.0, sys.float_info.max)
    (quiet,) = stats.snapshot_and_reset(now)
    assert quiet.model_name == "" and quiet.shadow_requests == 0
    with pytest.raises(ValueError, match="agreed_rows"):
        stats.record_shadow(NAME, "1.0", "2.0", 3, 2, 0.0, 0.001)


def test_shadow_figures_survive_the_buffer_and_reach_the_wire(tmp_path: Path) -> None:
    stats = RequestStats(probe=lambda: RES)
    stats.record(NAME, "1.0", 0.002, "ok")
    stats.record_shadow(NAME, "1.0", "2.0", 3, 4, 0.125, 0.003)
    stats.record("plain", "1.0", 0.002, "ok")
    samples = stats.snapshot_and_reset(dt.datetime.now(dt.UTC))
    buffer = TelemetryBuffer(tmp_path)
    try:
        buffer.append(samples)
        pending = buffer.pending(10)
    finally:
        buffer.close()
    assert [p.sample for p in pending] == samples
    wire = to_proto(next(p for p in pending if p.sample.model_name == NAME))
    assert (wire.shadow_version, wire.shadow_requests) == ("2.0", 1)
    assert (wire.shadow_agreement, wire.shadow_max_diff) == (0.75, 0.125)
    assert wire.shadow_latency_p95_ms == pytest.approx(3.0)
    plain = to_proto(next(p for p in pending if p.sample.model_name == "plain"))
    assert (plain.shadow_version, plain.shadow_requests) == ("", 0)


# ---------------------------------------------------------------- records and config


def test_a_shadow_assignment_is_persisted_and_old_records_load_as_normal(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path)
    record = UpdateRecord(assignment=_shadow_assignment(4))
    store.save(record)
    assert store.load() == record and store.load().assignment.shadow  # type: ignore[union-attr]
    document = json.loads(store.path.read_text())
    del document["assignment"]["shadow"]  # written before shadows existed
    store.path.write_text(json.dumps(document))
    assert store.load().assignment.shadow is False  # type: ignore[union-attr]


def test_shadow_max_per_s_is_configurable(tmp_path: Path) -> None:
    assert load_config(None, {}).shadow_max_per_s == 20.0
    assert load_config(None, {"EDGEFLEET_AGENT_SHADOW_MAX_PER_S": "0"}).shadow_max_per_s == 0.0
    config = tmp_path / "agent.toml"
    config.write_text("shadow_max_per_s = -1\n")
    with pytest.raises(ConfigError, match="shadow_max_per_s"):
        load_config(config, {})
