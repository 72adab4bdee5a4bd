"""`edgefleet builds`, `edgefleet artifacts` and the class options for builds
(threads, speed factor, microcontroller), without a control plane: the
renderings, and each command's requests and output against a small
in-process fake OperatorService on a real gRPC channel."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from concurrent import futures
from datetime import timedelta
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from rich.console import Console, RenderableType

from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.client.syntax import (
    constraint_profile,
    parse_model_ref,
)
from edgefleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc
from testkit.cli import NOW, invoke, text_of, ts

BUILD_ID = "b1d2e3f4" + "9" * 24
OTHER_BUILD_ID = "c5c5c5c5" + "8" * 24
DIGEST = "ab12" * 16
OTHER_DIGEST = "ab99" * 16
KEY_ID = "0123456789abcdef"
LATENCY_REASON = "latency p95 21.30 ms > budget 15.00 ms (+42.0%)"
SIZE_REASON = "size 3.81 MiB > max 2.00 MiB (+90.7%)"


def text_at(renderable: RenderableType, width: int) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def squash(text: str) -> str:
    return " ".join(text.split())


def candidate(
    name: str, precision: common_pb2.Quantization.ValueType, **fields: Any
) -> operator_pb2.BuildCandidate:
    return operator_pb2.BuildCandidate(
        name=name, quantization=precision, runtime=common_pb2.RUNTIME_ONNXRUNTIME, **fields
    )


LADDER = [
    candidate(
        "fp32-opt", common_pb2.QUANTIZATION_FP32, size_bytes=4_000_000, latency_p50_ms=18.2,
        latency_p95_ms=21.3, peak_memory_mb=88.4, agreement=1.0, accuracy=0.955,
        reasons=[LATENCY_REASON, SIZE_REASON],
    ),
    candidate(
        "fp16", common_pb2.QUANTIZATION_FP16, error="unsupported op Resize",
        reasons=["not built: unsupported op Resize"],
    ),
    candidate(
        "int8-dynamic", common_pb2.QUANTIZATION_INT8, size_bytes=1_100_000, latency_p50_ms=9.1,
        latency_p95_ms=11.0, peak_memory_mb=40.2, agreement=0.991, accuracy=0.953,
        max_abs_diff=0.0123, passed=True, chosen=True, artifact_digest=DIGEST,
    ),
    candidate(
        "int8-static-qdq", common_pb2.QUANTIZATION_INT8, size_bytes=1_000_000, latency_p50_ms=9.5,
        latency_p95_ms=12.0, peak_memory_mb=41.0, agreement=0.97, max_abs_diff=0.05, passed=True,
    ),
]  # fmt: skip


def sample_build(**overrides: Any) -> operator_pb2.Build:
    build = operator_pb2.Build(
        id=BUILD_ID,
        model_name="classifier",
        model_version="1.2.0",
        class_name="pi4",
        state=operator_pb2.BUILD_STATE_SUCCEEDED,
        progress=1.0,
        candidates=LADDER,
        artifact_digest=DIGEST,
        created_at=ts(NOW - timedelta(minutes=3)),
        dedup_key="d" * 64,
        duration_s=42.5,
        log="\n".join(f"log line {i}" for i in range(1, 31)),
    )
    for key, value in overrides.items():
        if key == "candidates":
            del build.candidates[:]
            build.candidates.extend(value)
        else:
            setattr(build, key, value)
    return build


def failed_build(**overrides: Any) -> operator_pb2.Build:
    fields: dict[str, Any] = {
        "id": OTHER_BUILD_ID,
        "class_name": "mcu",
        "state": operator_pb2.BUILD_STATE_FAILED,
        "artifact_digest": "",
        "candidates": [LADDER[0]],
        "error": "no candidate meets the constraints of class mcu",
    }
    return sample_build(**(fields | overrides))


def sample_artifact(digest: str = DIGEST) -> operator_pb2.Artifact:
    spec = common_pb2.TensorRTBuildSpec(
        precision="fp16",
        workspace_mb=1024,
        profile=[
            common_pb2.TensorRTBuildSpec.ShapeRange(
                input="features", min=[1, 64], opt=[8, 64], max=[32, 64]
            )
        ],
    )
    manifest = common_pb2.ArtifactManifest(
        format_version=1,
        model_name="classifier",
        model_version="1.2.0",
        class_name="jetson",
        runtime=common_pb2.RUNTIME_TENSORRT,
        precision=common_pb2.QUANTIZATION_FP16,
        candidate="trt-fp16",
        sha256=digest,
        size_bytes=1_234_567,
        media_type="application/onnx",
        inputs=[
            common_pb2.TensorSpec(
                name="features", dtype="float32", shape=[-1, 64], dim_names=["batch"]
            )
        ],
        outputs=[common_pb2.TensorSpec(name="probs", dtype="float32", shape=[-1, 10])],
        golden=[common_pb2.GoldenSample(), common_pb2.GoldenSample(), common_pb2.GoldenSample()],
        atol=1e-3,
        rtol=1e-2,
        min_agreement=0.99,
        min_runtime_versions={"tensorrt": "8.6", "onnxruntime": "1.17"},
        tensorrt=spec,
        build_id=BUILD_ID,
        companion_sha256="cd" * 32,
    )
    return operator_pb2.Artifact(
        digest=digest,
        size_bytes=1_234_567,
        media_type="application/onnx",
        manifest=manifest,
        signed_manifest=common_pb2.SignedManifest(
            manifest=manifest.SerializeToString(), signature=b"s" * 64, key_id=KEY_ID
        ),
        build_id=BUILD_ID,
        created_at=ts(NOW - timedelta(days=1)),
    )


# ------------------------------------------------------------------ pure helpers


def test_parse_model_ref() -> None:
    assert parse_model_ref("classifier@1.2.0") == ("classifier", "1.2.0")
    assert parse_model_ref(" kws @ 2 ") == ("kws", "2")
    for bad in ("classifier", "@1.0", "classifier@", ""):
        with pytest.raises(ValueError, match="MODEL@VERSION"):
            parse_model_ref(bad)


def test_constraint_profile_build_fields() -> None:
    profile = constraint_profile(threads=4, speed_factor=2.5, microcontroller=True)
    assert profile is not None
    assert (profile.threads, profile.speed_factor, profile.microcontroller) == (4, 2.5, True)
    only_threads = constraint_profile(threads=2)
    assert only_threads is not None
    assert only_threads.HasField("threads") and not only_threads.HasField("speed_factor")
    assert constraint_profile(threads=None, speed_factor=None, microcontroller=None) is None
    # The field has presence, so an update can turn it off.
    off = constraint_profile(microcontroller=False)
    assert off is not None and off.HasField("microcontroller") and not off.microcontroller


def test_class_rendering_shows_build_fields() -> None:
    cls = common_pb2.DeviceClass(
        name="mcu",
        constraints=common_pb2.ConstraintProfile(
            runtime=common_pb2.RUNTIME_TFLITE,
            quantization=common_pb2.QUANTIZATION_INT8,
            threads=4,
            speed_factor=12.5,
            microcontroller=True,
        ),
    )
    assert render.format_constraints(cls.constraints) == (
        "tflite, int8, threads=4, speed x12.5, microcontroller"
    )
    detail = squash(text_of(render.class_detail(cls)))
    assert "threads 4" in detail
    assert "speed factor 12.5" in detail
    assert "microcontroller yes" in detail
    assert "fallback -" in detail  # none asked for
    hot = common_pb2.ConstraintProfile(
        runtime=common_pb2.RUNTIME_ONNXRUNTIME,
        quantization=common_pb2.QUANTIZATION_FP32,
        fallback=common_pb2.QUANTIZATION_INT8,
    )
    assert render.format_constraints(hot) == "onnxruntime, fp32, fallback=int8"
    shown = squash(
        text_of(render.class_detail(common_pb2.DeviceClass(name="hot", constraints=hot)))
    )
    assert "fallback int8 (served while hot or low on battery)" in shown

    plain = squash(text_of(render.class_detail(common_pb2.DeviceClass(name="pi4"))))
    assert "threads 1 (default)" in plain
    assert "speed factor 1 (default)" in plain
    assert "microcontroller no" in plain


# ------------------------------------------------------------------ build rendering


def test_candidates_table_verdicts_and_reasons() -> None:
    lines = text_at(render.candidates_table(LADDER), 200).splitlines()
    header = squash(lines[0])  # one line: each column's name with its unit
    assert header == (
        "CANDIDATE RUNTIME PRECISION SIZE P50 MS P95 MS PEAK MB FIDELITY ACCURACY MAX |DIFF|"
        " VERDICT REASONS"
    )
    rows = {squash(line).split()[0]: squash(line) for line in lines[1:] if line.strip()}
    assert rows["fp32-opt"] == (
        f"fp32-opt onnxruntime fp32 3.8 MiB 18.20 21.30 88.4 100.0% 95.5% 0 fail {LATENCY_REASON}"
    )
    assert rows["size"] == SIZE_REASON  # the second reason wraps onto its own line
    assert rows["fp16"] == (
        "fp16 onnxruntime fp16 - - - - - - - fail not built: unsupported op Resize"
    )
    assert rows["int8-dynamic"] == (
        "int8-dynamic onnxruntime int8 1.0 MiB 9.10 11.00 40.2 99.1% 95.3% 0.0123 chosen -"
    )
    # No labels, no accuracy: `-`, not 0%.
    assert rows["int8-static-qdq"] == (
        "int8-static-qdq onnxruntime int8 976.6 KiB 9.50 12.00 41.0 97.0% - 0.05 pass -"
    )


def test_fidelity_is_shown_by_metric_and_output_by_output() -> None:
    """A report with output kinds: the table names the lowest judged
    output's metric, and `builds show` lists every output's figures."""
    map_iou = common_pb2.OutputFidelity(
        output="prob_map", kind=common_pb2.OUTPUT_KIND_DENSE_MAP, metric="mask IoU", value=0.9312,
        details={"PSNR dB": 41.5, "relative error": 0.012},
    )  # fmt: skip
    state = common_pb2.OutputFidelity(
        output="hn", kind=common_pb2.OUTPUT_KIND_STATE, metric="not judged", value=1.0
    )
    noted = candidate(
        "int8-static-qdq", common_pb2.QUANTIZATION_INT8, size_bytes=1000, latency_p50_ms=4.6,
        latency_p95_ms=4.85, agreement=0.9312, passed=True, fidelity=[map_iou, state],
        notes=["latency p95 4.85 ms is 3.0% under the budget 5.00 ms"],
    )  # fmt: skip
    assert render.fidelity_cell(noted) == "93.1% mask IoU"
    assert render.fidelity_cell(noted, compact=True) == "93.1%"
    two = common_pb2.OutputFidelity(
        output="boxes", kind=common_pb2.OUTPUT_KIND_REGRESSION, metric="cosine similarity",
        value=0.99,
    )  # fmt: skip
    both = candidate("fp16", common_pb2.QUANTIZATION_FP16, fidelity=[two, map_iou])
    assert render.fidelity_cell(both) == "93.1% prob_map mask IoU"
    assert render.candidate_reasons(noted) == [
        "note: latency p95 4.85 ms is 3.0% under the budget 5.00 ms"
    ]
    table = render.fidelity_table([noted])
    assert table is not None
    rows = squash(text_at(table, 200))
    judged = "prob_map dense-map mask IoU 0.9312 PSNR dB 41.5, relative error 0.012"
    assert f"int8-static-qdq {judged}" in rows
    assert "int8-static-qdq hn state not judged - -" in rows  # a state has no value
    assert render.fidelity_table(LADDER) is None  # reports from before output kinds


def test_format_ms() -> None:
    assert render.format_ms(21.3) == "21.30"
    assert render.format_ms(0.1) == "0.10"
    assert render.format_ms(0.0127) == "0.013"


def test_candidate_error_shown_once() -> None:
    unreported = candidate("tflite-int8", common_pb2.QUANTIZATION_INT8, error="converter crashed")
    assert render.candidate_reasons(unreported) == ["converter crashed"]
    assert render.candidate_reasons(LADDER[1]) == ["not built: unsupported op Resize"]
    assert render.candidate_reasons(LADDER[2]) == []


@pytest.mark.parametrize("width", [80, 100, 120])
def test_candidates_table_fits_narrow_consoles(width: int) -> None:
    text = text_at(render.candidates_table(LADDER), width)
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width
    assert "…" not in text  # nothing cut: numbers, verdicts and names stay whole
    assert "REASONS" not in text
    squashed = squash(text)
    assert f"reasons: fp32-opt {LATENCY_REASON} {SIZE_REASON} fp16 not built:" in squashed
    assert "int8-dynamic" in squashed and "chosen" in squashed
    assert ("RUNTIME" in text) is (width > 100)  # narrower, the names carry it
    header = squash(lines[0])
    if width == 80:
        assert header == "CANDIDATE SIZE P50 MS P95 MS PEAK MB FIDEL ACC VERDICT"
        assert squash(lines[2]) == "fp16 - - - - - - fail"
    else:
        assert "P50 MS P95 MS PEAK MB FIDELITY ACCURACY MAX |DIFF| VERDICT" in header


def test_build_detail() -> None:
    text = text_of(render.build_detail(sample_build(), NOW))
    detail = squash(text)
    for expected in (
        f"id {BUILD_ID}",
        "model classifier@1.2.0",
        "class pi4",
        "state succeeded",
        "progress 100%",
        "created 3m ago (2026-11-22 11:57:00Z)",
        "duration 42.5s",
        "chosen int8-dynamic",
        f"artifact {DIGEST}",
        f"dedup key {'d' * 64}",
        "reused from -",
        "error -",
        "VERDICT REASONS",
        "log (last 15 lines): log line 16 log line 17",
    ):
        assert expected in detail, expected
    assert detail.endswith("log line 30")
    assert "log line 15\n" not in text


def test_build_detail_failed_and_reused() -> None:
    failed = squash(text_of(render.build_detail(failed_build(log=""), NOW)))
    assert "state failed" in failed
    assert "error no candidate meets the constraints of class mcu" in failed
    assert "chosen - artifact -" in failed
    assert "log (last" not in failed

    reused = sample_build(reused_from=OTHER_BUILD_ID, duration_s=0.0)
    detail = squash(text_of(render.build_detail(reused, NOW)))
    assert "duration - (reused)" in detail
    assert f"reused from {OTHER_BUILD_ID}" in detail

    queued = sample_build(state=operator_pb2.BUILD_STATE_QUEUED, progress=0.0, candidates=[])
    assert "no candidates measured yet" in text_of(render.build_detail(queued, NOW))


def test_builds_table() -> None:
    builds = [
        sample_build(),
        sample_build(id=OTHER_BUILD_ID, class_name="jetson", reused_from=BUILD_ID),
        failed_build(id="e" * 32, progress=0.4),
        sample_build(
            id="f" * 32, state=operator_pb2.BUILD_STATE_RUNNING, progress=0.25,
            candidates=[], artifact_digest="",
        ),
    ]  # fmt: skip
    rows = [squash(line) for line in text_of(render.builds_table(builds, NOW)).splitlines()]
    assert rows[0] == "ID MODEL@VERSION CLASS STATE PROGRESS CHOSEN ARTIFACT CREATED REUSED"
    assert rows[1] == (
        "b1d2e3f4 classifier@1.2.0 pi4 succeeded 100% int8-dynamic ab12ab12ab12 3m ago -"
    )
    assert rows[2].endswith("succeeded 100% int8-dynamic ab12ab12ab12 3m ago b1d2e3f4")
    assert rows[3] == "eeeeeeee classifier@1.2.0 mcu failed 40% - - 3m ago -"
    assert rows[4] == "ffffffff classifier@1.2.0 pi4 running 25% - - 3m ago -"


def test_build_report() -> None:
    report = squash(text_of(render.build_report([sample_build(), failed_build()])))
    assert report.startswith(
        "classifier@1.2.0 for class pi4: succeeded (build b1d2e3f4)"
        " shipping int8-dynamic as ab12ab12ab12 CANDIDATE RUNTIME"  # the candidate table
    )
    assert (
        "classifier@1.2.0 for class mcu: failed (build c5c5c5c5)"
        " no candidate meets the constraints of class mcu CANDIDATE RUNTIME"
    ) in report


# ------------------------------------------------------------------ artifact rendering


def test_artifact_detail() -> None:
    detail = squash(text_of(render.artifact_detail(sample_artifact())))
    for expected in (
        f"digest {DIGEST}",
        "model classifier version 1.2.0 class jetson",
        "runtime tensorrt precision fp16 candidate trt-fp16",
        f"sha256 {DIGEST}",
        "size 1.2 MiB",
        "media type application/onnx",
        "inputs features[batch, 64] float32",
        "outputs probs[?, 10] float32",
        "golden samples 3",
        "atol 0.001 rtol 0.01 min agreement 99%",
        "min runtimes onnxruntime>=1.17, tensorrt>=8.6",
        "tensorrt fp16, workspace 1024 MiB features: min [1, 64] opt [8, 64] max [32, 64]",
        f"companion {'cd' * 32}",
        f"build {BUILD_ID}",
        f"signed by key {KEY_ID}",
    ):
        assert expected in detail, expected


def test_artifact_detail_without_tensorrt() -> None:
    artifact = sample_artifact()
    artifact.manifest.ClearField("tensorrt")
    artifact.manifest.companion_sha256 = ""
    detail = squash(text_of(render.artifact_detail(artifact)))
    assert "tensorrt - companion -" in detail


def test_artifacts_table() -> None:
    rows = text_of(render.artifacts_table([sample_artifact()], NOW)).splitlines()
    assert squash(rows[0]) == (
        "DIGEST MODEL@VERSION CLASS RUNTIME PRECISION CANDIDATE SIZE KEY ID CREATED"
    )
    assert squash(rows[1]) == (
        "ab12ab12ab12 classifier@1.2.0 jetson tensorrt fp16 trt-fp16 1.2 MiB 01234567 1d ago"
    )


# ------------------------------------------------------------------ click, no server

NEW_COMMANDS = [
    ("builds",),
    ("builds", "run"),
    ("builds", "ls"),
    ("builds", "show"),
    ("artifacts",),
    ("artifacts", "ls"),
    ("artifacts", "show"),
]


@pytest.mark.parametrize("path", NEW_COMMANDS, ids=" ".join)
def test_new_commands_have_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: cli {' '.join(path)}" in result.output


def test_class_options_in_help() -> None:
    for command in ("create", "update"):
        result = CliRunner().invoke(cli, ["classes", command, "--help"])
        for option in ("--threads", "--speed-factor", "--microcontroller / --no-microcontroller"):
            assert option in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["builds", "run", "classifier"], "must look like MODEL@VERSION"),
        (["builds", "ls", "--state", "done"], "'done' is not one of"),
        (["classes", "update", "c", "--threads", "0"], "0 is not in the range x>=1"),
        (["classes", "update", "c", "--speed-factor", "0"], "0 is not in the range x>0"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


# ------------------------------------------------------------------ against a fake server


class FakeOperator(operator_pb2_grpc.OperatorServiceServicer):
    """Records requests; RunBuild starts the builds in `started`, and each
    GetBuild answers the next state in that build's `script` (the last one
    repeats)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.started: list[operator_pb2.Build] = []
        self.script: dict[str, list[operator_pb2.Build]] = {}
        self.builds = [sample_build(), failed_build()]
        self.artifacts = [sample_artifact(), sample_artifact(OTHER_DIGEST)]

    def requests(self, name: str) -> list[Any]:
        return [req for n, req in self.calls if n == name]

    def CreateDeviceClass(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append(("CreateDeviceClass", request))
        return common_pb2.DeviceClass(name=request.name, constraints=request.constraints)

    def UpdateDeviceClass(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append(("UpdateDeviceClass", request))
        return common_pb2.DeviceClass(name=request.name, constraints=request.constraints)

    def RunBuild(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append(("RunBuild", request))
        return operator_pb2.RunBuildResponse(builds=self.started)

    def ListBuilds(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append(("ListBuilds", request))
        return operator_pb2.ListBuildsResponse(builds=self.builds)

    def GetBuild(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append(("GetBuild", request))
        script = self.script.get(request.id)
        if script:
            return script.pop(0) if len(script) > 1 else script[0]
        for build in self.builds:
            if build.id == request.id:
                return build
        context.abort(grpc.StatusCode.NOT_FOUND, f"no build {request.id!r}")
        raise AssertionError

    def ListArtifacts(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append(("ListArtifacts", request))
        return operator_pb2.ListArtifactsResponse(artifacts=self.artifacts)

    def GetArtifact(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append(("GetArtifact", request))
        for artifact in self.artifacts:
            if artifact.digest == request.digest:
                return artifact
        context.abort(grpc.StatusCode.NOT_FOUND, f"no artifact with digest {request.digest!r}")
        raise AssertionError


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeOperator, str]]:
    # The package re-exports the `builds` group under the module's name.
    monkeypatch.setattr(
        importlib.import_module("edgefleet.controlplane.cli.builds"), "POLL_INTERVAL_S", 0
    )
    servicer = FakeOperator()  # type: ignore[abstract]  # the rest answer UNIMPLEMENTED
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_classes_create_sends_build_fields(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    result = invoke(
        "classes", "create", "mcu", "--runtime", "tflite", "--threads", "2",
        "--speed-factor", "12.5", "--microcontroller", server=address,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (request,) = servicer.requests("CreateDeviceClass")
    c = request.constraints
    assert (c.threads, c.speed_factor, c.microcontroller) == (2, 12.5, True)
    assert "threads 2" in squash(result.stdout)


@pytest.mark.parametrize(
    ("args", "threads", "speed_factor", "microcontroller"),
    [
        (["--threads", "4"], 4, None, False),
        (["--speed-factor", "0.5"], None, 0.5, False),
        (["--microcontroller"], None, None, True),
    ],
)
def test_classes_update_sends_only_given_build_fields(
    fake: tuple[FakeOperator, str],
    args: list[str],
    threads: int | None,
    speed_factor: float | None,
    microcontroller: bool,
) -> None:
    servicer, address = fake
    result = invoke("classes", "update", "pi4", *args, server=address)
    assert result.exit_code == 0, result.output
    (request,) = servicer.requests("UpdateDeviceClass")
    c = request.constraints
    assert (c.threads if c.HasField("threads") else None) == threads
    assert (c.speed_factor if c.HasField("speed_factor") else None) == speed_factor
    assert c.microcontroller is microcontroller
    assert c.runtime == common_pb2.RUNTIME_UNSPECIFIED
    assert c.quantization == common_pb2.QUANTIZATION_UNSPECIFIED


def test_builds_run_no_wait(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    servicer.started = [sample_build(state=operator_pb2.BUILD_STATE_QUEUED, progress=0.0)]
    args = ["builds", "run", "classifier@1.2.0", "--class", "pi4", "--force", "--no-wait"]
    result = invoke(*args, server=address)
    assert result.exit_code == 0, result.output
    (request,) = servicer.requests("RunBuild")
    assert (request.model_name, request.model_version) == ("classifier", "1.2.0")
    assert (request.class_name, request.force) == ("pi4", True)
    assert not servicer.requests("GetBuild")
    assert "b1d2e3f4 classifier@1.2.0 pi4 queued 0%" in squash(result.stdout)


def test_builds_run_waits_until_done(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    queued = sample_build(state=operator_pb2.BUILD_STATE_QUEUED, progress=0.0, candidates=[])
    running = sample_build(state=operator_pb2.BUILD_STATE_RUNNING, progress=0.5, candidates=[])
    servicer.started = [queued]
    servicer.script[BUILD_ID] = [running, running, sample_build()]
    result = invoke("builds", "run", "classifier@1.2.0", server=address)
    assert result.exit_code == 0, result.output
    (request,) = servicer.requests("RunBuild")
    assert (request.class_name, request.force) == ("", False)
    assert len(servicer.requests("GetBuild")) == 3
    assert "pi4: succeeded" in result.stderr  # the progress bar
    report = squash(result.stdout)
    assert "classifier@1.2.0 for class pi4: succeeded" in report
    assert "shipping int8-dynamic as ab12ab12ab12" in report
    assert LATENCY_REASON in report


def test_builds_run_wait_fails_when_a_build_fails(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    servicer.started = [
        sample_build(state=operator_pb2.BUILD_STATE_QUEUED, progress=0.0),
        failed_build(state=operator_pb2.BUILD_STATE_RUNNING, progress=0.3, error=""),
    ]
    servicer.script[BUILD_ID] = [sample_build()]
    servicer.script[OTHER_BUILD_ID] = [failed_build()]
    result = invoke("builds", "run", "classifier@1.2.0", server=address)
    assert result.exit_code == 1, result.output
    assert result.stderr.endswith(
        "error: build for class mcu failed: no candidate meets the constraints of class mcu\n"
    )
    assert "mcu: failed" in result.stderr and "pi4: succeeded" in result.stderr
    assert "class mcu: failed" in squash(result.stdout)  # the report still comes first
    assert "Traceback" not in result.output


def test_builds_run_wait_json(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    servicer.started = [failed_build()]
    result = invoke("builds", "run", "classifier@1.2.0", "--json", server=address)
    assert result.exit_code == 1
    (data,) = json.loads(result.stdout)
    assert data["state"] == "BUILD_STATE_FAILED"
    assert data["candidates"][0]["reasons"] == [LATENCY_REASON, SIZE_REASON]
    assert not servicer.requests("GetBuild")  # already finished: no polling


def test_builds_ls_filters(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    args = ["--model", "classifier", "--version", "1.2.0", "--class", "pi4", "--state", "failed"]
    result = invoke("builds", "ls", *args, server=address)
    assert result.exit_code == 0, result.output
    (request,) = servicer.requests("ListBuilds")
    assert (request.model_name, request.model_version, request.class_name) == (
        "classifier", "1.2.0", "pi4",
    )  # fmt: skip
    assert request.state == operator_pb2.BUILD_STATE_FAILED
    assert "b1d2e3f4" in result.stdout and BUILD_ID not in result.stdout

    result = invoke("builds", "ls", "--json", server=address)
    assert [b["id"] for b in json.loads(result.stdout)] == [BUILD_ID, OTHER_BUILD_ID]
    assert servicer.requests("ListBuilds")[1].state == operator_pb2.BUILD_STATE_UNSPECIFIED


def test_builds_show_sends_the_id_as_given(fake: tuple[FakeOperator, str]) -> None:
    """The server resolves short ids (services/references.py): the CLI
    lists no builds to expand one."""
    servicer, address = fake
    result = invoke("builds", "show", "c5c5", server=address)
    assert result.exit_code == 1
    assert [r.id for r in servicer.requests("GetBuild")] == ["c5c5"]
    assert not servicer.requests("ListBuilds")
    result = invoke("builds", "show", OTHER_BUILD_ID, server=address)
    assert result.exit_code == 0, result.output
    assert "error no candidate meets the constraints of class mcu" in squash(result.stdout)

    result = invoke("builds", "show", BUILD_ID, "--json", server=address)
    assert json.loads(result.stdout)["dedup_key"] == "d" * 64

    result = invoke("builds", "show", "zzz", server=address)
    assert result.exit_code == 1
    assert result.stderr == "error: NOT_FOUND: no build 'zzz'\n"


def test_artifacts_ls_filters(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    args = ["--model", "classifier", "--version", "1.2.0", "--class", "jetson"]
    result = invoke("artifacts", "ls", *args, server=address)
    assert result.exit_code == 0, result.output
    (request,) = servicer.requests("ListArtifacts")
    assert (request.model_name, request.model_version, request.class_name) == (
        "classifier", "1.2.0", "jetson",
    )  # fmt: skip
    assert "ab12ab12ab12" in result.stdout and DIGEST not in result.stdout


def test_artifacts_show_digest_prefix(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    result = invoke("artifacts", "show", "AB12ab", server=address)
    assert result.exit_code == 0, result.output
    assert [r.digest for r in servicer.requests("GetArtifact")] == ["ab12ab", DIGEST]
    assert f"signed by key {KEY_ID}" in squash(result.stdout)

    result = invoke("artifacts", "show", f"sha256:{OTHER_DIGEST}", "--json", server=address)
    data = json.loads(result.stdout)
    assert data["digest"] == OTHER_DIGEST
    assert data["signed_manifest"]["key_id"] == KEY_ID
    assert data["manifest"]["tensorrt"]["precision"] == "fp16"

    result = invoke("artifacts", "show", "ab", server=address)
    assert result.exit_code == 1
    assert "ambiguous" in result.stderr
