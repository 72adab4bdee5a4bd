"""A version's lighter fallback artifact on the agent (issue 20, item 5):
the update machine installs it beside the primary, the ModelHost switches
between the two under load, and telemetry says which one served.

Real parts throughout: a small MLP built with onnx.helper (the primary,
fp32) and its onnxruntime quantize_dynamic QUInt8 copy (the fallback), real
ONNX Runtime, the agent's ModelUpdates over a real ModelHost and the real
HostActivator (testkit.update_rig's ModelsRig), the real manifest verifier,
and the real ManifestValidator (a measuring child process) where a test
looks at validation. Restarts are simulated as the crash tests do: the
update stops dead at a point (agent/update/faults.py's pause), and a new
rig over the same state directory plays the restarted agent."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.daemon import report_served
from edgefleet.agent.inference_server import metadata_into, predict_into
from edgefleet.agent.serving import FALLBACK, PRIMARY, ModelHost, ServingError, warm_inputs
from edgefleet.agent.telemetry import RequestStats, Resources
from edgefleet.agent.telemetry_buffer import Pending
from edgefleet.agent.telemetry_uploader import to_proto
from edgefleet.agent.update.download import artifact_path, part_path
from edgefleet.agent.update.faults import MARKER_FILE, pause_forever, with_pause
from edgefleet.agent.update.ports import Chunk, Downloader, Ports
from edgefleet.agent.update.store import Assignment
from edgefleet.agent.update.validate import ManifestValidator
from edgefleet.update_state import name_of
from edgefleet.v1 import common_pb2, inference_pb2
from testkit.update_rig import ModelsRig, manifest_for, model_assignment, sha

NAME = "mlp"
INPUTS, HIDDEN, CLASSES = 32, 384, 10
INT8 = common_pb2.QUANTIZATION_INT8
GOLDEN = 4


# ------------------------------------------------------------------ models


def mlp(path: Path, seed: int) -> Path:
    """x [batch, 32] -> relu(x W1 + b1) W2 + b2 = scores [batch, 10], fp32.
    Its first weight matrix (12 KB once quantized) makes the fallback
    larger than a write buffer, so a partial download reaches the disk."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {
        "w1": rng.normal(size=(INPUTS, HIDDEN)).astype(np.float32),
        "b1": rng.normal(size=HIDDEN).astype(np.float32),
        "w2": rng.normal(size=(HIDDEN, CLASSES)).astype(np.float32) / 10,
        "b2": rng.normal(size=CLASSES).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["features"]),
            helper.make_node("MatMul", ["features", "w2"], ["s"]),
            helper.make_node("Add", ["s", "b2"], ["scores"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", INPUTS])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@dataclasses.dataclass(frozen=True)
class Version:
    """One model version's two artifacts."""

    version: str
    fp32: Path
    int8: Path


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Version]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = tmp_path_factory.mktemp("fallback-models")
    built = {}
    for seed, version in enumerate(("1.0.0", "2.0.0")):
        fp32 = mlp(root / f"{version}-fp32.onnx", seed)
        int8 = root / f"{version}-int8.onnx"
        quantize_dynamic(fp32, int8, weight_type=QuantType.QUInt8)
        assert int8.stat().st_size < fp32.stat().st_size / 2
        built[version] = Version(version, fp32, int8)
    return built


def assignment(
    v: Version,
    sequence: int,
    *,
    golden: int = 0,
    fallback: dict[str, Any] | None = None,
    nested: bytes | None = None,
) -> tuple[Assignment, list[bytes]]:
    """A signed assignment of `v` whose manifest names its int8 fallback
    (`fallback`: manifest_for options for the nested manifest, on top;
    `nested`: those bytes as they are), and the artifacts to serve."""
    options: dict[str, Any] = {"golden": golden, "precision": INT8, "build_id": "b-" + v.version}
    options.update(fallback or {})
    if nested is None:
        name, version = options.pop("name", NAME), options.pop("version", v.version)
        nested = manifest_for(v.int8, name, version, **options)
    signed, data = model_assignment(
        v.fp32,
        NAME,
        v.version,
        sequence,
        golden=golden,
        fallback=nested,
        precision=common_pb2.QUANTIZATION_FP32,
        build_id="b-" + v.version,
    )
    return signed, [data, v.int8.read_bytes()]


def digests(v: Version) -> tuple[str, str]:
    """(the primary's digest, the fallback's)."""
    return sha(v.fp32.read_bytes()), sha(v.int8.read_bytes())


class Recording:
    """The real validator, recording what it validated (file names)."""

    def __init__(self, inner: ManifestValidator | None = None) -> None:
        self.inner = inner
        self.validated: list[str] = []

    def validate(self, path: Path, manifest: bytes) -> None:
        self.validated.append(path.name)
        if self.inner is not None:
            self.inner.validate(path, manifest)


def real_validator() -> Recording:
    # Few runs: the numbers are not what these tests look at, and 2 shared cores.
    return Recording(ManifestValidator(runs=3, warmup=1, timeout_s=120))


@pytest.fixture
def rigs() -> Iterator[list[ModelsRig]]:
    """Every rig a test made, stopped at its end."""
    made: list[ModelsRig] = []
    yield made
    for rig in made:
        rig.stop()


def new_rig(
    rigs: list[ModelsRig],
    state: Path,
    *,
    validator: Recording | None = None,
    host: ModelHost | None = None,
) -> ModelsRig:
    rig = ModelsRig(state, host, validator=validator or Recording())
    rigs.append(rig)
    return rig


def serve(rig: ModelsRig, blobs: list[bytes]) -> None:
    for data in blobs:
        rig.downloader.add(data)


def answer(host: ModelHost) -> tuple[str, int, str]:
    """(version, variant, digest) of what answers a request (it must)."""
    model = host.active(NAME)
    prediction = host.predict_sync(NAME, warm_inputs(model.accepts))
    assert prediction.outputs[0].shape == (1, CLASSES)
    return prediction.model.version, prediction.model.variant, prediction.model.digest


def record_of(state: Path, name: str = "active.json") -> dict[str, Any]:
    document = json.loads((state / "models" / NAME / name).read_text())
    assert isinstance(document, dict)
    return document


def reason(rig: ModelsRig) -> str:
    update = rig.updates.get(NAME)
    assert update is not None and update.machine.record.reason is not None
    return update.machine.record.reason


# ------------------------------------------------------------------ installing both


def test_an_update_installs_both_and_the_host_switches_under_load(
    tmp_path: Path, versions: dict[str, Version], rigs: list[ModelsRig]
) -> None:
    """Both artifacts downloaded, verified, validated (the real validator,
    each against its own manifest) and recorded; then the preference flips
    four times under a continuous predict loop: no request fails, answers
    say which artifact served, and telemetry counts them."""
    v1 = versions["1.0.0"]
    primary, fallback = digests(v1)
    stats = RequestStats(probe=lambda: Resources(memory_mb=100.0))
    host = ModelHost(workers=2, recorder=stats)
    report_served(stats, host)
    validator = real_validator()
    rig = new_rig(rigs, tmp_path, validator=validator, host=host)
    signed, blobs = assignment(v1, 1, golden=GOLDEN)
    serve(rig, blobs)
    rig.boot()
    rig.assign(signed)
    assert rig.settled(NAME, 1) == "committed", rig.published

    # Both downloaded (by digest), checked, validated, recorded.
    assert sorted(set(rig.downloader.fetched)) == sorted({primary, fallback})
    assert validator.validated == [primary, fallback]
    for digest in (primary, fallback):
        assert artifact_path(tmp_path, digest).exists()
        assert not part_path(tmp_path, digest).exists()
    active = record_of(tmp_path)["active"]
    assert (active["digest"], active["fallback_digest"]) == (primary, fallback)
    total = len(blobs[0]) + len(blobs[1])
    downloading = [s for s in rig.statuses(NAME) if name_of(s.state) == "downloading"]
    assert downloading and {s.bytes_total for s in downloading} == {total}
    assert downloading[-1].bytes_done == total

    # What GetModelMetadata says, before and after a switch.
    metadata = inference_pb2.ModelMetadata()
    metadata_into(host, NAME, metadata)
    assert (metadata.variant, metadata.artifact_digest, metadata.fallback_digest) == (
        PRIMARY, primary, fallback,
    )  # fmt: skip

    # A continuous predict loop (the inference server's path) while the
    # preference flips: every answer is a success and names its variant.
    stats.snapshot_and_reset(dt.datetime.now(dt.UTC))  # only the loop's requests below
    answers: list[int] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    x = np.random.default_rng(3).random((1, INPUTS), dtype=np.float32)
    request = inference_pb2.PredictRequest(model_name=NAME)
    request.inputs.add(name="x", dtype="float32", shape=[1, INPUTS], data=x.tobytes())

    def loop() -> None:
        while not stop.is_set():
            response = inference_pb2.PredictResponse()
            try:
                predict_into(host, request, response, 10.0)
            except BaseException as exc:
                failures.append(exc)
                return
            answers.append(response.variant)

    caller = threading.Thread(target=loop)
    caller.start()
    try:
        for variant in (FALLBACK, PRIMARY, FALLBACK, PRIMARY, FALLBACK):
            count = len(answers)
            host.set_variant(variant)
            # Requests reach the new artifact before the next switch.
            deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
            while not (len(answers) > count + 5 and answers[-1] == variant):
                assert dt.datetime.now(dt.UTC) < deadline and caller.is_alive(), failures
                threading.Event().wait(0.005)
    finally:
        stop.set()
        caller.join(30)
    assert failures == []
    assert set(answers) == {PRIMARY, FALLBACK}
    flips = sum(1 for a, b in itertools.pairwise(answers) if a != b)
    assert flips >= 5
    assert answer(host) == ("1.0.0", FALLBACK, fallback)
    metadata = inference_pb2.ModelMetadata()
    metadata_into(host, NAME, metadata)
    assert (metadata.variant, metadata.artifact_digest, metadata.fallback_digest) == (
        FALLBACK, fallback, fallback,
    )  # fmt: skip

    # Telemetry: the interval's requests, how many the fallback served, and
    # which artifact serves at its end; on the wire as well.
    (sample,) = stats.snapshot_and_reset(dt.datetime.now(dt.UTC))
    assert (sample.model_name, sample.model_version) == (NAME, "1.0.0")
    assert sample.request_count == len(answers) + 1  # and answer() above
    assert sample.fallback_request_count == answers.count(FALLBACK) + 1
    assert sample.variant == FALLBACK
    wire = to_proto(Pending(seq=1, dropped_samples=0, sample=sample))
    assert (wire.variant, wire.fallback_request_count) == (
        FALLBACK, sample.fallback_request_count,
    )  # fmt: skip
    # An interval without requests still says what serves.
    (idle,) = stats.snapshot_and_reset(dt.datetime.now(dt.UTC))
    assert (idle.request_count, idle.fallback_request_count, idle.variant) == (0, 0, FALLBACK)


def test_a_new_version_serves_the_preference_and_files_go_with_their_version(
    tmp_path: Path,
    versions: dict[str, Version],
    rigs: list[ModelsRig],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Preferring the fallback, version 2 serves its own fallback from its
    activation on; its commit deletes version 1's two files and keeps its
    own two; `edgefleet-agent predict` shows the variant."""
    from edgefleet.agent.inference_server import FAST_SOCKET_NAME, FramedServer
    from edgefleet.agent.main import main

    v1, v2 = versions["1.0.0"], versions["2.0.0"]
    rig = new_rig(rigs, tmp_path)
    a1, blobs1 = assignment(v1, 1)
    a2, blobs2 = assignment(v2, 2)
    serve(rig, blobs1 + blobs2)
    rig.boot()
    rig.assign(a1)
    assert rig.settled(NAME, 1) == "committed"
    rig.host.set_variant(FALLBACK)
    assert answer(rig.host) == ("1.0.0", FALLBACK, digests(v1)[1])
    rig.assign(a2)
    assert rig.settled(NAME, 2) == "committed"
    assert answer(rig.host) == ("2.0.0", FALLBACK, digests(v2)[1])
    for digest in digests(v1):
        assert not artifact_path(tmp_path, digest).exists()
    for digest in digests(v2):
        assert artifact_path(tmp_path, digest).exists()

    sample = tmp_path / "sample.npz"
    np.savez(sample, x=np.zeros((1, INPUTS), dtype=np.float32))
    server = FramedServer(rig.host, tmp_path / FAST_SOCKET_NAME)
    server.start()
    try:
        argv = ["predict", "--model", NAME, "--input", str(sample), "--state-dir", str(tmp_path)]
        assert main([*argv, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert (shown["model_version"], shown["variant"]) == ("2.0.0", "fallback")
        rig.host.set_variant(PRIMARY)
        assert main(argv) == 0
        assert capsys.readouterr().out.startswith(f"{NAME} 2.0.0 (primary)\n")
    finally:
        server.stop(0)


# ------------------------------------------------------------------ a bad fallback


def _corrupt_blob(rig: ModelsRig, v: Version) -> None:
    """Serve other bytes (of the right size) under the fallback's digest."""
    data = bytearray(v.int8.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rig.downloader.blobs[digests(v)[1]] = bytes(data)


BAD: dict[str, tuple[dict[str, Any], Callable[[ModelsRig, Version], None] | None, str]] = {
    # (nested manifest options, what else to do, what the reason says)
    "wrong digest": ({}, _corrupt_blob, "sha256 mismatch"),
    "another model": ({"name": "other"}, None, "model_name 'other'"),
    "another version": ({"version": "9.9.9"}, None, "model_version '9.9.9'"),
    "another class": ({"class_name": "jetson"}, None, "class_name 'jetson'"),
    "another build": ({"build_id": "b-other"}, None, "build_id 'b-other'"),
    "wrong size": ({"size_bytes": 999}, None, "999"),
    "fails its golden check": ({"golden": GOLDEN}, None, "outside the golden tolerance"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_fallback_fails_the_update_and_the_old_version_keeps_serving(
    tmp_path: Path, versions: dict[str, Version], rigs: list[ModelsRig], case: str
) -> None:
    options, tamper, says = BAD[case]
    golden = case == "fails its golden check"
    v1, v2 = versions["1.0.0"], versions["2.0.0"]
    rig = new_rig(rigs, tmp_path, validator=real_validator() if golden else None)
    a1, blobs1 = assignment(v1, 1, golden=GOLDEN if golden else 0)
    if golden:
        # The int8 artifact held to the fp32 model's outputs, at fp32's
        # tolerances: the quantization error fails it.
        options = {**options, "expected_from": v2.fp32}
    a2, blobs2 = assignment(v2, 2, golden=GOLDEN if golden else 0, fallback=options)
    serve(rig, blobs1 + blobs2)
    if tamper is not None:
        tamper(rig, v2)
    rig.boot()
    rig.assign(a1)
    assert rig.settled(NAME, 1) == "committed"
    rig.assign(a2)
    assert rig.settled(NAME, 2) == "failed"
    why = reason(rig)
    assert f"fallback artifact (int8, {digests(v2)[1][:12]})" in why, why
    assert says in why, why
    # The old version serves, with its fallback; the new one's files are gone.
    assert answer(rig.host)[:2] == ("1.0.0", PRIMARY)
    rig.host.set_variant(FALLBACK)
    assert answer(rig.host) == ("1.0.0", FALLBACK, digests(v1)[1])
    assert record_of(tmp_path)["active"]["fallback_digest"] == digests(v1)[1]
    for digest in digests(v1):
        assert artifact_path(tmp_path, digest).exists()
    for digest in digests(v2):
        assert not artifact_path(tmp_path, digest).exists()
        assert not part_path(tmp_path, digest).exists()


def test_a_nested_manifest_that_does_not_parse_fails_before_any_download(
    tmp_path: Path, versions: dict[str, Version], rigs: list[ModelsRig]
) -> None:
    rig = new_rig(rigs, tmp_path)
    signed, blobs = assignment(versions["1.0.0"], 1, nested=b"\x12\xff\x01")
    serve(rig, blobs)
    rig.boot()
    rig.assign(signed)
    assert rig.settled(NAME, 1) == "failed"
    assert "the fallback artifact's manifest does not parse" in reason(rig)
    assert rig.downloader.fetched == []
    with pytest.raises(ServingError):
        rig.host.active(NAME)


# ------------------------------------------------------------------ restarts


class PauseInFallback:
    """Passes downloads through, except the fallback's: its first 9,000
    bytes arrive as one chunk (a write larger than Python's buffer, so it is
    on disk), then the update stops dead there (faults.pause_forever)."""

    def __init__(self, inner: Downloader, digest: str, state_dir: Path) -> None:
        self.inner, self.digest, self.state_dir = inner, digest, state_dir

    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
        if digest != self.digest:
            yield from self.inner.fetch(digest, offset)
            return
        held: list[Chunk] = []
        for chunk in self.inner.fetch(digest, offset):
            held.append(chunk)
            if sum(len(c.data) for c in held) >= 9000:
                break
        yield Chunk(held[0].offset, b"".join(c.data for c in held), held[0].total_size)
        pause_forever(self.state_dir, "downloading")


@pytest.mark.parametrize("point", ["fallback download", "validating", "activating"])
def test_a_restart_in_the_middle_resumes_or_rolls_back_with_the_fallbacks(
    tmp_path: Path, versions: dict[str, Version], rigs: list[ModelsRig], point: str
) -> None:
    """Version 1 (with its fallback) serves; version 2's update stops dead at
    `point`; a new agent over the same directory resumes it (the fallback's
    download from the bytes on disk, the primary's not fetched again) or,
    restarted in Activating, rolls back to version 1 with its fallback."""
    v1, v2 = versions["1.0.0"], versions["2.0.0"]
    p2, f2 = digests(v2)
    a1, blobs1 = assignment(v1, 1)
    a2, blobs2 = assignment(v2, 2)
    first = new_rig(rigs, tmp_path)
    serve(first, blobs1 + blobs2)
    first.boot()
    first.assign(a1)
    assert first.settled(NAME, 1) == "committed"
    first.stop()

    # Not stopped at the end (its update thread is paused for good), like
    # a killed process's.
    crashed = ModelsRig(tmp_path, validator=Recording())
    crashed.downloader = first.downloader  # one source of bytes for every "process"
    if point == "fallback download":

        def wrap(ports: Ports) -> Ports:
            return dataclasses.replace(
                ports, downloader=PauseInFallback(ports.downloader, f2, tmp_path)
            )

        crashed.wrap[NAME] = wrap
    else:
        crashed.wrap[NAME] = lambda ports: with_pause(ports, point, tmp_path)
    crashed.boot()
    crashed.host.set_variant(FALLBACK)
    crashed.assign(a2)
    crashed.wait_for(lambda: (tmp_path / MARKER_FILE).exists())
    (tmp_path / MARKER_FILE).unlink()
    if point == "fallback download":
        assert artifact_path(tmp_path, p2).exists()
        assert part_path(tmp_path, f2).stat().st_size >= 9000
    before = list(first.downloader.offsets)

    # The restart: a new process (host, machines) over the same directory.
    restarted = new_rig(rigs, tmp_path)
    restarted.downloader = first.downloader
    restarted.boot()
    restarted.host.set_variant(FALLBACK)
    restarted.assign(a2)
    outcome = restarted.settled(NAME, 2)
    fetched_after = first.downloader.offsets[len(before) :]
    if point == "activating":
        # The machine's rule: a restart in Activating rolls back, here to
        # version 1 with its fallback (the host prefers it).
        assert outcome == "failed" and "restarted during activation" in reason(restarted)
        assert answer(restarted.host) == ("1.0.0", FALLBACK, digests(v1)[1])
        for digest in digests(v1):
            assert artifact_path(tmp_path, digest).exists()
        for digest in (p2, f2):
            assert not artifact_path(tmp_path, digest).exists()
        assert record_of(tmp_path)["active"]["fallback_digest"] == digests(v1)[1]
        return
    assert outcome == "committed", reason(restarted) if outcome == "failed" else ""
    assert answer(restarted.host) == ("2.0.0", FALLBACK, f2)
    restarted.host.set_variant(PRIMARY)
    assert answer(restarted.host) == ("2.0.0", PRIMARY, p2)
    assert record_of(tmp_path)["active"]["fallback_digest"] == f2
    for digest in (p2, f2):
        assert artifact_path(tmp_path, digest).exists()
        assert not part_path(tmp_path, digest).exists()
    for digest in digests(v1):
        assert not artifact_path(tmp_path, digest).exists()
    if point == "fallback download":
        # Only the fallback's rest was fetched, from where the disk left off.
        assert [d for d, _ in fetched_after] == [f2]
        assert fetched_after[0][1] >= 9000
    else:
        assert fetched_after == []  # both were on disk already
