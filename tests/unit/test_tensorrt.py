"""TensorRT: the ladder and engine-build spec (control plane), the engine
cache and the runner (agent).

Most of this runs anywhere: the spec is a pure function, the cache is files,
the ladder only needs ONNX tooling, and a missing TensorRT must fail clearly.
The tests at the end need TensorRT 10 and a CUDA GPU; they skip elsewhere,
saying which is missing, and are meant to be run on a Jetson or GPU machine
(docs/tensorrt.md says how)."""

from __future__ import annotations

import os
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from google.protobuf import json_format
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.runtimes import RuntimeUnavailable, open_runner
from edgefleet.agent.runtimes import tensorrt as trt_runtime
from edgefleet.agent.runtimes.tensorrt import (
    EngineCache,
    EngineKey,
    GpuIdentity,
    gpu_identity,
    spec_digest,
    tensorrt_version,
)
from edgefleet.controlplane.build import tensorrt_ladder
from edgefleet.controlplane.build.samples import Samples, generate_samples
from edgefleet.controlplane.build.tensorrt_ladder import (
    DEFAULT_WORKSPACE_MB,
    MAX_BATCH,
    build_candidates,
    engine_build_spec,
    rungs_for,
    tensorrt_qdq_problems,
    workspace_mb_for,
)
from edgefleet.controlplane.build.types import BuildTarget, Candidate, ShapeRange, TensorRTSpec
from edgefleet.controlplane.domain.onnx_inspect import TensorInfo, inspect_model
from edgefleet.v1 import common_pb2

# ---------------------------------------------------------------- fixtures


def _small_cnn(path: Path) -> Path:
    """Conv -> Relu -> Reshape -> Gemm on x[N, 3, 8, 8] -> y[N, 10], with a
    dynamic batch: small, but with the ops quantizers and TensorRT treat
    specially (Conv and Gemm weights, a Reshape between them)."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array((rng.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
        numpy_helper.from_array((rng.normal(size=(8,)) * 0.1).astype(np.float32), "b"),
        numpy_helper.from_array((rng.normal(size=(128, 10)) * 0.1).astype(np.float32), "fw"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fb"),
        numpy_helper.from_array(np.array([-1, 128], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "flat"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "small-cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def cnn(tmp_path: Path) -> Path:
    return _small_cnn(tmp_path / "cnn.onnx")


@pytest.fixture
def cnn_samples() -> Samples:
    # Zero-mean inputs, like normalised images; generated samples are [0, 1).
    rng = np.random.default_rng(1)
    return Samples({"x": rng.normal(size=(64, 3, 8, 8)).astype(np.float32)}, None, False)


def _info(name: str, dtype: str, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name, dtype, shape, tuple("" for _ in shape))


class _Log(list[str]):
    def __call__(self, message: str) -> None:
        self.append(message)


# ------------------------------------------------------- engine_build_spec


def test_spec_dynamic_batch_tunes_for_one_and_allows_max_batch() -> None:
    inputs = [_info("x", "float32", (-1, 3, 224, 224))]
    spec = engine_build_spec(inputs, generate_samples(inputs), "fp16", 256)
    assert spec == TensorRTSpec(
        precision="fp16",
        workspace_mb=256,
        profile=(
            ShapeRange(
                input="x",
                min=(1, 3, 224, 224),
                opt=(1, 3, 224, 224),
                max=(MAX_BATCH, 3, 224, 224),
            ),
        ),
    )


def test_spec_other_dynamic_axes_take_the_sample_size() -> None:
    inputs = [_info("ids", "int64", (-1, -1)), _info("mask", "int64", (1, -1))]
    samples = Samples(
        {"ids": np.zeros((5, 40), np.int64), "mask": np.ones((5, 40), np.int64)}, None, False
    )
    spec = engine_build_spec(inputs, samples, "int8", 64, max_batch=4)
    assert spec.profile == (
        ShapeRange("ids", min=(1, 40), opt=(1, 40), max=(4, 40)),
        ShapeRange("mask", min=(1, 40), opt=(1, 40), max=(1, 40)),
    )


def test_spec_leaves_static_inputs_out_of_the_profile() -> None:
    inputs = [_info("x", "float32", (1, 3, 32, 32)), _info("scale", "float32", ())]
    spec = engine_build_spec(inputs, generate_samples(inputs[:1]), "fp16", 128)
    assert spec.profile == ()


@pytest.mark.parametrize(
    ("precision", "workspace_mb", "max_batch", "message"),
    [
        ("fp32", 256, 8, "precision"),
        ("int8", 0, 8, "workspace_mb"),
        ("fp16", 256, 0, "max_batch"),
    ],
)
def test_spec_rejects_bad_arguments(
    precision: str, workspace_mb: int, max_batch: int, message: str
) -> None:
    inputs = [_info("x", "float32", (-1, 4))]
    with pytest.raises(ValueError, match=message):
        engine_build_spec(
            inputs, generate_samples(inputs), precision, workspace_mb, max_batch=max_batch
        )


def test_spec_needs_samples_for_a_dynamic_non_batch_axis() -> None:
    inputs = [_info("x", "float32", (-1, -1))]
    empty = Samples({"other": np.zeros((2, 3), np.float32)}, None, False)
    with pytest.raises(ValueError, match="dynamic axis 1"):
        engine_build_spec(inputs, empty, "fp16", 256)


def test_spec_is_a_valid_tensorrt_build_spec_message() -> None:
    """The JSON form's keys and types are the proto's (the manifest carries
    the spec; the agent's engine builder takes this form)."""
    inputs = [_info("x", "float32", (-1, 3, 8, 8))]
    spec = engine_build_spec(inputs, generate_samples(inputs), "int8", 96)
    message = json_format.ParseDict(spec.to_json(), common_pb2.TensorRTBuildSpec())
    assert message.precision == "int8"
    assert message.workspace_mb == 96
    assert list(message.profile[0].max) == [MAX_BATCH, 3, 8, 8]
    assert json_format.MessageToDict(message, preserving_proto_field_name=True)["profile"][0][
        "input"
    ] == ("x")


@pytest.mark.parametrize(
    ("max_memory_mb", "expected"),
    [(None, DEFAULT_WORKSPACE_MB), (4096, DEFAULT_WORKSPACE_MB), (200, 100), (10, 32)],
)
def test_workspace_is_bounded_by_the_class_memory(
    max_memory_mb: float | None, expected: int
) -> None:
    target = BuildTarget("jetson", "tensorrt", max_memory_mb=max_memory_mb)
    assert workspace_mb_for(target) == expected


@pytest.mark.parametrize(
    ("quantization", "names"),
    [
        ("auto", ["trt-fp16", "trt-int8-qdq"]),
        ("fp32", ["trt-fp16", "trt-int8-qdq"]),
        ("fp16", ["trt-fp16"]),
        ("int8", ["trt-int8-qdq"]),
    ],
)
def test_rungs_follow_the_class_quantization(quantization: str, names: list[str]) -> None:
    assert [name for name, _ in rungs_for(quantization)] == names


# ------------------------------------------------------------- Q/DQ checks


def _qdq_model(path: Path, zero_point: np.ndarray | None) -> Path:
    inputs = ["x", "scale"] + (["zp"] if zero_point is not None else [])
    initializers = [numpy_helper.from_array(np.array(0.1, np.float32), "scale")]
    if zero_point is not None:
        initializers.append(numpy_helper.from_array(zero_point, "zp"))
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", inputs, ["q"]),
            helper.make_node("DequantizeLinear", ["q", *inputs[1:]], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(
    ("zero_point", "problem"),
    [
        (np.array(0, np.int8), None),
        (np.array(3, np.int8), "2 Q/DQ nodes have non-zero (asymmetric) zero points"),
        (np.array(128, np.uint8), "2 Q/DQ nodes have uint8 zero points"),
        (None, "2 Q/DQ nodes have no zero point (ONNX defaults to uint8)"),
        (
            np.array(0, np.int32),
            "2 Q/DQ nodes have int32 zero points (quantized biases; TensorRT takes float biases)",
        ),
    ],
)
def test_qdq_problems_name_what_tensorrt_rejects(
    tmp_path: Path, zero_point: np.ndarray | None, problem: str | None
) -> None:
    problems = tensorrt_qdq_problems(_qdq_model(tmp_path / "q.onnx", zero_point))
    assert problems == ([] if problem is None else [problem])


# ------------------------------------------------------------------ ladder


def test_ladder_builds_an_fp16_onnx_with_fp32_io_and_its_spec(
    tmp_path: Path, cnn: Path, cnn_samples: Samples
) -> None:
    log = _Log()
    target = BuildTarget("orin", "tensorrt", quantization="fp16", max_memory_mb=1024)
    (candidate,) = build_candidates(cnn, cnn_samples, tmp_path / "work", target, log)

    assert candidate.error == ""
    assert (candidate.name, candidate.runtime, candidate.precision) == (
        "trt-fp16",
        "tensorrt",
        "fp16",
    )
    assert candidate.path is not None and candidate.path.is_file()
    assert candidate.min_runtime_versions == {"tensorrt": "10.0"}
    assert candidate.tensorrt_spec == TensorRTSpec(
        "fp16", 256, (ShapeRange("x", min=(1, 3, 8, 8), opt=(1, 3, 8, 8), max=(8, 3, 8, 8)),)
    )
    built = onnx.load(str(candidate.path))
    weights = {init.data_type for init in built.graph.initializer if init.name.startswith("w")}
    assert TensorProto.FLOAT16 in weights
    info = inspect_model(candidate.path)
    assert [(t.name, t.dtype) for t in info.inputs] == [("x", "float32")]
    assert [(t.name, t.dtype) for t in info.outputs] == [("y", "float32")]
    # What the build host measures it with: onnxruntime on the CPU, as a
    # correctness proxy. fp16 weights keep this model's outputs close.
    from edgefleet.agent.runtimes.onnxruntime import OnnxRuntimeRunner

    batch = {"x": cnn_samples.arrays["x"][:8]}
    reference = OnnxRuntimeRunner(cnn).run(batch)[0]
    proxy = OnnxRuntimeRunner(candidate.path).run(batch)[0]
    np.testing.assert_allclose(proxy, reference, atol=2e-2, rtol=2e-2)
    assert any("trt-fp16: built" in line for line in log)


def test_ladder_builds_a_tensorrt_compatible_int8_qdq_onnx(
    tmp_path: Path, cnn: Path, cnn_samples: Samples
) -> None:
    target = BuildTarget("orin", "tensorrt", quantization="int8")
    (candidate,) = build_candidates(cnn, cnn_samples, tmp_path / "work", target, _Log())
    assert candidate.error == ""
    assert candidate.path is not None
    assert candidate.tensorrt_spec is not None
    assert candidate.tensorrt_spec.precision == "int8"
    ops = {node.op_type for node in onnx.load(str(candidate.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert tensorrt_qdq_problems(candidate.path) == []


def test_ladder_builds_both_rungs_for_auto_and_reports_a_failed_one(
    tmp_path: Path, cnn: Path, cnn_samples: Samples
) -> None:
    log = _Log()
    candidates = build_candidates(
        cnn, cnn_samples, tmp_path / "work", BuildTarget("gpu", "tensorrt"), log
    )
    assert [c.name for c in candidates] == ["trt-fp16", "trt-int8-qdq"]
    fp16, int8 = candidates
    assert fp16.path is not None and fp16.tensorrt_spec is not None
    # The quantizer now leaves biases in float, as TensorRT's parser needs.
    assert int8.path is not None, int8.error
    assert int8.tensorrt_spec is not None and int8.tensorrt_spec.precision == "int8"
    assert tensorrt_qdq_problems(int8.path) == []


def test_ladder_turns_a_quantizer_failure_into_a_candidate_error(
    tmp_path: Path, cnn: Path, cnn_samples: Samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args: Any, **kwargs: Any) -> Path:
        raise RuntimeError("calibration exploded\nwith a traceback-ish second line")

    monkeypatch.setattr(tensorrt_ladder, "quantize_static_qdq", failing)
    log = _Log()
    (candidate,) = build_candidates(
        cnn, cnn_samples, tmp_path / "w", BuildTarget("c", "tensorrt", quantization="int8"), log
    )
    assert candidate == Candidate(
        "trt-int8-qdq", "tensorrt", "int8", None, error="RuntimeError: calibration exploded"
    )
    assert log[-1] == "trt-int8-qdq: not built: RuntimeError: calibration exploded"


# ------------------------------------------------------------- engine cache

_GPU = GpuIdentity("Orin (nvgpu)", "8.7")


def _key(**changes: Any) -> EngineKey:
    fields: dict[str, Any] = {
        "tensorrt_version": "10.3.0",
        "gpu": _GPU,
        "artifact_sha256": "a" * 64,
        "spec_sha256": "b" * 64,
    }
    fields.update(changes)
    return EngineKey(**fields)


def test_cache_path_is_readable_and_safe() -> None:
    assert _key().relative_path() == Path(
        "10.3.0", "Orin_nvgpu-sm87", f"{'a' * 64}-{'b' * 16}.engine"
    )


@pytest.mark.parametrize(
    "change",
    [
        {"tensorrt_version": "10.4.0"},
        {"gpu": GpuIdentity("Orin (nvgpu)", "8.6")},
        {"gpu": GpuIdentity("NVIDIA A100-SXM4-40GB", "8.7")},
        {"artifact_sha256": "c" * 64},
        {"spec_sha256": "d" * 64},
    ],
)
def test_cache_key_separates_everything_an_engine_depends_on(change: dict[str, Any]) -> None:
    assert _key(**change).relative_path() != _key().relative_path()


def test_spec_digest_ignores_form_but_not_content() -> None:
    spec = {
        "precision": "fp16",
        "workspace_mb": 256,
        "profile": [{"input": "x", "min": [1, 3], "opt": [1, 3], "max": [8, 3]}],
    }
    reordered = {"profile": spec["profile"], "workspace_mb": 256, "precision": "fp16"}
    # What an agent gets from the manifest: protobuf's JSON mapping writes
    # 64-bit integers as strings.
    from_manifest = json_format.MessageToDict(
        json_format.ParseDict(spec, common_pb2.TensorRTBuildSpec()),
        preserving_proto_field_name=True,
    )
    assert from_manifest["workspace_mb"] == "256"
    assert spec_digest(spec) == spec_digest(reordered) == spec_digest(from_manifest)
    assert spec_digest(spec) != spec_digest({**spec, "workspace_mb": 512})
    assert spec_digest(spec) != spec_digest({**spec, "precision": "int8"})


def test_cache_put_then_get(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    assert cache.get(_key()) is None
    path = cache.put(_key(), b"engine-bytes")
    assert cache.get(_key()) == path
    assert path.read_bytes() == b"engine-bytes"
    assert cache.get(_key(tensorrt_version="10.4.0")) is None
    with pytest.raises(ValueError, match="empty"):
        cache.put(_key(), b"")


def test_cache_write_is_atomic_when_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure mid-write (power cut, full disk) leaves the previous engine
    whole and no partial file that a later start would try to load."""
    cache = EngineCache(tmp_path)
    path = cache.put(_key(), b"old engine")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        cache.put(_key(), b"new engine, never completely written")
    with pytest.raises(OSError, match="No space"):
        cache.put(_key(spec_sha256="e" * 64), b"another engine")
    monkeypatch.undo()
    assert path.read_bytes() == b"old engine"
    assert cache.get(_key(spec_sha256="e" * 64)) is None
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files


def test_cache_lock_serialises_builders(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    acquired = threading.Event()

    def second_builder() -> None:
        with cache.lock(_key()):
            acquired.set()

    with cache.lock(_key()):
        thread = threading.Thread(target=second_builder)
        thread.start()
        assert not acquired.wait(0.2), "a second builder got the lock while it was held"
    assert acquired.wait(5)
    thread.join(5)


def test_cache_prune_keeps_only_wanted_engines(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    keep = cache.put(_key(), b"current")
    with cache.lock(_key()):
        pass
    old_version = cache.put(_key(tensorrt_version="10.0.1"), b"before the upgrade")
    old_artifact = cache.put(_key(artifact_sha256="f" * 64), b"previous model")
    removed = cache.prune([_key()])
    assert set(removed) == {old_version, old_artifact}
    assert keep.is_file() and keep.with_suffix(".lock").is_file()
    assert not old_version.parent.exists()  # empty directories go too
    assert EngineCache(tmp_path / "missing").prune([]) == []


# ----------------------------------------------- when TensorRT is missing


def _fake_module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    for attribute, value in attributes.items():
        setattr(module, attribute, value)
    return module


def test_open_runner_says_tensorrt_is_missing_and_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as when absent
    assert tensorrt_version() is None
    with pytest.raises(RuntimeUnavailable) as caught:
        open_runner(tmp_path / "model.engine", "tensorrt")
    message = str(caught.value)
    assert message.startswith("TensorRT is not installed")
    assert "JetPack" in message and "pip install" in message


def test_build_engine_says_tensorrt_is_missing(
    tmp_path: Path, cnn: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RuntimeUnavailable, match="TensorRT is not installed"):
        trt_runtime.build_engine(cnn, {"precision": "fp16"}, EngineCache(tmp_path))


def test_tensorrt_older_than_10_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_module("tensorrt", __version__="8.6.1"))
    assert tensorrt_version() == "8.6.1"
    with pytest.raises(RuntimeUnavailable, match=r"TensorRT 8\.6\.1 is too old.*10\.0"):
        trt_runtime.import_tensorrt()


def test_missing_cuda_bindings_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_module("tensorrt", __version__="10.3.0"))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    with pytest.raises(RuntimeUnavailable, match="pip install cuda-python"):
        open_runner(tmp_path / "model.engine", "tensorrt")


class _FakeCudart:
    """Just enough of cuda-python's runtime bindings to identify a GPU: the
    calls return (error, *results), as the real ones do."""

    class cudaError_t:
        cudaSuccess = 0
        cudaErrorNoDevice = 100

    def __init__(self, count: int, name: bytes = b"", major: int = 0, minor: int = 0) -> None:
        self._count = count
        self._props = types.SimpleNamespace(name=name, major=major, minor=minor)

    def cudaGetDeviceCount(self) -> tuple[int, int]:
        if self._count < 0:
            return (self.cudaError_t.cudaErrorNoDevice, 0)
        return (self.cudaError_t.cudaSuccess, self._count)

    def cudaGetDeviceProperties(self, device: int) -> tuple[int, Any]:
        return (self.cudaError_t.cudaSuccess, self._props)


def _use_cudart(monkeypatch: pytest.MonkeyPatch, fake: _FakeCudart) -> None:
    monkeypatch.setattr(trt_runtime, "import_cudart", lambda: fake)


def test_gpu_identity_reads_name_and_compute_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    _use_cudart(monkeypatch, _FakeCudart(1, b"Orin (nvgpu)\x00\x00\x00", 8, 7))
    assert gpu_identity() == GpuIdentity("Orin (nvgpu)", "8.7")


@pytest.mark.parametrize(("count", "message"), [(0, "sees 0 GPUs"), (-1, "no CUDA GPU is usable")])
def test_no_gpu_is_runtime_unavailable(
    monkeypatch: pytest.MonkeyPatch, count: int, message: str
) -> None:
    _use_cudart(monkeypatch, _FakeCudart(count))
    with pytest.raises(RuntimeUnavailable, match=message):
        gpu_identity()


# ------------------------------------------- with TensorRT and a CUDA GPU


def _tensorrt_skip_reason() -> str | None:
    if tensorrt_version() is None:
        return "TensorRT not installed"
    try:
        gpu_identity()
    except RuntimeUnavailable as exc:
        return f"no CUDA GPU ({exc})"
    return None


_SKIP_REASON = _tensorrt_skip_reason()
needs_tensorrt_gpu = pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")


def _candidate(tmp_path: Path, model: Path, samples: Samples, quantization: str) -> Candidate:
    target = BuildTarget("gpu", "tensorrt", quantization=quantization)
    (candidate,) = build_candidates(model, samples, tmp_path / "work", target, _Log())
    assert candidate.path is not None, candidate.error
    assert candidate.tensorrt_spec is not None
    return candidate


def _reference(model: Path) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    from edgefleet.agent.runtimes.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(model)
    return lambda inputs: runner.run(inputs)[0]


@needs_tensorrt_gpu
def test_fp16_engine_matches_onnxruntime(tmp_path: Path, cnn: Path, cnn_samples: Samples) -> None:
    candidate = _candidate(tmp_path, cnn, cnn_samples, "fp16")
    assert candidate.path is not None and candidate.tensorrt_spec is not None
    engine = trt_runtime.build_engine(
        candidate.path, candidate.tensorrt_spec.to_json(), EngineCache(tmp_path / "engines")
    )
    runner = open_runner(engine, "tensorrt")
    assert [(t.name, t.dtype) for t in runner.inputs] == [("x", "float32")]
    assert [(t.name, t.dtype) for t in runner.outputs] == [("y", "float32")]
    reference = _reference(cnn)
    for inputs in cnn_samples.head(16).each():  # batch 1, as devices serve
        np.testing.assert_allclose(runner.run(inputs)[0], reference(inputs), atol=3e-2, rtol=3e-2)
    batch = {"x": cnn_samples.arrays["x"][:MAX_BATCH]}  # the largest batch the profile takes
    np.testing.assert_allclose(runner.run(batch)[0], reference(batch), atol=3e-2, rtol=3e-2)


@needs_tensorrt_gpu
def test_engine_is_built_once_and_cached_by_version_and_gpu(
    tmp_path: Path, cnn: Path, cnn_samples: Samples
) -> None:
    candidate = _candidate(tmp_path, cnn, cnn_samples, "fp16")
    assert candidate.path is not None and candidate.tensorrt_spec is not None
    cache = EngineCache(tmp_path / "engines")
    first = trt_runtime.build_engine(candidate.path, candidate.tensorrt_spec.to_json(), cache)
    built_at = first.stat().st_mtime_ns
    second = trt_runtime.build_engine(candidate.path, candidate.tensorrt_spec.to_json(), cache)
    assert second == first and second.stat().st_mtime_ns == built_at
    gpu = gpu_identity()
    assert first.relative_to(cache.root).parts[0] == tensorrt_version()
    assert first.parent.name.endswith("-sm" + gpu.compute_capability.replace(".", ""))


@needs_tensorrt_gpu
def test_runner_builds_from_the_onnx_artifact_and_rejects_shapes_outside_the_profile(
    tmp_path: Path, cnn: Path, cnn_samples: Samples
) -> None:
    candidate = _candidate(tmp_path, cnn, cnn_samples, "fp16")
    assert candidate.path is not None and candidate.tensorrt_spec is not None
    spec = candidate.tensorrt_spec.to_json()
    with trt_runtime.TensorRtRunner(
        candidate.path, spec=spec, cache=EngineCache(tmp_path / "engines")
    ) as runner:
        too_big = {"x": np.zeros((MAX_BATCH + 1, 3, 8, 8), np.float32)}
        with pytest.raises(ValueError, match="between"):
            runner.run(too_big)
        assert runner.run(cnn_samples.one(0))[0].shape == (1, 10)


@needs_tensorrt_gpu
def test_int8_qdq_engine_agrees_with_fp32(tmp_path: Path, cnn: Path, cnn_samples: Samples) -> None:
    candidate = _candidate(tmp_path, cnn, cnn_samples, "int8")
    assert candidate.path is not None and candidate.tensorrt_spec is not None
    engine = trt_runtime.build_engine(
        candidate.path, candidate.tensorrt_spec.to_json(), EngineCache(tmp_path / "engines")
    )
    runner = open_runner(engine, "tensorrt")
    reference = _reference(cnn)
    batch = {"x": cnn_samples.arrays["x"][:MAX_BATCH]}
    got, want = runner.run(batch)[0], reference(batch)
    assert float(np.mean(got.argmax(1) == want.argmax(1))) >= 0.75


@needs_tensorrt_gpu
def test_unparseable_onnx_reports_the_parser_errors(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")],
        "bogus",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    path = tmp_path / "bogus.onnx"
    onnx.save(model, str(path))
    with pytest.raises(trt_runtime.EngineBuildError, match=r"cannot parse bogus\.onnx"):
        trt_runtime.build_engine(
            path, {"precision": "fp16", "workspace_mb": 64, "profile": []}, EngineCache(tmp_path)
        )
