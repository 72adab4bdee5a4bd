"""The on-device inference API: real inference over the unix socket on ONNX
and TFLite artifacts, the status codes of bad requests, deadlines, and an
atomic swap under concurrent load."""

from __future__ import annotations

import asyncio
import stat
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.inference_server import InferenceServer, start_inference_server
from agent.runtimes import ONNXRUNTIME, TFLITE, TensorInfo
from agent.serving import ModelHost, ModelSpec, decode_tensor, encode_tensor
from controlplane.build.samples import load_samples
from controlplane.build.tflite_ladder import build_candidates
from controlplane.build.toolchain import default_toolchains_dir, find_tflite
from controlplane.build.types import BuildTarget
from controlplane.domain.onnx_inspect import inspect_model
from demo.models import BuiltModel, build_digits_classifier
from edgefleet.v1 import common_pb2, inference_pb2, inference_pb2_grpc

# ------------------------------------------------------------------ helpers


@dataclass
class Served:
    host: ModelHost
    server: InferenceServer
    stub: inference_pb2_grpc.InferenceServiceStub


class Recorded:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, str]] = []

    def record(self, model: str, version: str, latency_s: float, outcome: str) -> None:
        self.calls.append((model, version, latency_s, outcome))


def tensor(name: str, array: np.ndarray) -> common_pb2.TensorData:
    dtype, shape, data = encode_tensor(array)
    return common_pb2.TensorData(name=name, dtype=dtype, shape=shape, data=data)


def outputs(response: inference_pb2.PredictResponse) -> list[np.ndarray]:
    return [decode_tensor(t.name, t.dtype, t.shape, t.data) for t in response.outputs]


def request(model: str, **inputs: np.ndarray) -> inference_pb2.PredictRequest:
    return inference_pb2.PredictRequest(
        model_name=model, inputs=[tensor(k, v) for k, v in inputs.items()]
    )


def add_model(path: Path, constant: float) -> Path:
    """y = x + constant over a [batch, 4] float input: versions tell apart."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array([constant], dtype=np.float32), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> BuiltModel:
    return build_digits_classifier(tmp_path_factory.mktemp("digits"))


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    host = ModelHost(workers=2, recorder=Recorded())
    server = await start_inference_server(host, tmp_path)
    channel = grpc.aio.insecure_channel(server.unix_target)
    try:
        yield Served(host, server, inference_pb2_grpc.InferenceServiceStub(channel))
    finally:
        await channel.close()
        await server.stop(None)
        host.close()


def reference(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    result: np.ndarray = session.run(None, {"input": x})[0]
    return result


def digits_spec(model: Path) -> ModelSpec:
    info = inspect_model(model)
    return ModelSpec(
        tuple(TensorInfo(t.name, t.dtype, tuple(t.shape)) for t in info.inputs),
        tuple(TensorInfo(t.name, t.dtype, tuple(t.shape)) for t in info.outputs),
    )


# ------------------------------------------------------------------ real inference


async def test_onnx_predict_matches_bare_onnxruntime(served: Served, digits: BuiltModel) -> None:
    await asyncio.to_thread(
        served.host.activate, "digits", "1.0.0", "sha-onnx", digits.model, ONNXRUNTIME
    )
    x = np.load(digits.sample_data)["input"][:16]
    response = await served.stub.Predict(request("digits", input=x), timeout=10)
    assert response.model_version == "1.0.0"
    assert [t.name for t in response.outputs] == ["probabilities"]
    np.testing.assert_allclose(outputs(response)[0], reference(digits.model, x), atol=1e-6)

    meta = await served.stub.GetModelMetadata(
        inference_pb2.GetModelMetadataRequest(model_name="digits")
    )
    assert (meta.model_version, meta.artifact_digest, meta.runtime) == (
        "1.0.0",
        "sha-onnx",
        "onnxruntime",
    )
    assert [(t.name, t.dtype, list(t.shape)) for t in meta.inputs] == [
        ("input", "float32", [-1, 64])
    ]
    assert stat.S_IMODE(served.server.socket_path.stat().st_mode) == 0o660


async def test_tflite_predict_matches_bare_onnxruntime(
    served: Served, digits: BuiltModel, tmp_path: Path
) -> None:
    toolchain = find_tflite(default_toolchains_dir())
    if toolchain is None:
        pytest.skip("TFLite toolchain not installed (edgefleet toolchain install tflite)")
    samples = load_samples(digits.sample_data, inspect_model(digits.model).inputs)
    fp32 = (
        await asyncio.to_thread(
            build_candidates,
            digits.model,
            samples,
            tmp_path / "tflite",
            BuildTarget("pi", "tflite"),
            lambda line: None,
            toolchains_dir=toolchain.venv.parent,
        )
    )[0]
    assert fp32.path is not None, fp32.error
    await asyncio.to_thread(
        served.host.activate,
        "digits",
        "1.0.0",
        "sha-tflite",
        fp32.path,
        TFLITE,
        digits_spec(digits.model),
    )
    # onnx2tf converted with the samples' static batch of 1: one row per call,
    # sequentially and concurrently (the interpreter is not thread-safe).
    x = np.load(digits.sample_data)["input"][:8]
    single = await served.stub.Predict(request("digits", input=x[:1]), timeout=10)
    np.testing.assert_allclose(outputs(single)[0], reference(digits.model, x[:1]), atol=1e-4)
    rows = await asyncio.gather(
        *(served.stub.Predict(request("digits", input=x[i : i + 1]), timeout=10) for i in range(8))
    )
    assert {r.model_version for r in rows} == {"1.0.0"}
    got = np.concatenate([outputs(r)[0] for r in rows])
    np.testing.assert_allclose(got, reference(digits.model, x), atol=1e-4)


# ------------------------------------------------------------------ status codes


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value.code(), raised.value.details() or ""


async def test_unknown_and_inactive_models(served: Served) -> None:
    x = np.zeros((1, 64), np.float32)
    code, _ = await _code(served.stub.Predict(request("nope", input=x)))
    assert code == grpc.StatusCode.NOT_FOUND
    served.host.declare("digits")
    code, details = await _code(served.stub.Predict(request("digits", input=x)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no active version" in details
    code, _ = await _code(
        served.stub.GetModelMetadata(inference_pb2.GetModelMetadataRequest(model_name="digits"))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        ({"input": np.zeros((1, 63), np.float32)}, "'input': shape [1, 63]"),
        ({"input": np.zeros((1, 64), np.float64)}, "'input': dtype float64"),
        ({"input": np.zeros(64, np.float32)}, "'input': shape [64]"),
        ({"image": np.zeros((1, 64), np.float32)}, "'image' is not an input"),
        ({}, "'input' is missing"),
    ],
)
async def test_bad_tensors_are_invalid_argument(
    served: Served, digits: BuiltModel, inputs: dict[str, np.ndarray], needle: str
) -> None:
    await asyncio.to_thread(
        served.host.activate, "digits", "1.0.0", "sha", digits.model, ONNXRUNTIME
    )
    code, details = await _code(served.stub.Predict(request("digits", **inputs)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in details


async def test_malformed_tensor_data_is_invalid_argument(
    served: Served, digits: BuiltModel
) -> None:
    await asyncio.to_thread(
        served.host.activate, "digits", "1.0.0", "sha", digits.model, ONNXRUNTIME
    )
    short = common_pb2.TensorData(name="input", dtype="float32", shape=[1, 64], data=b"\0" * 8)
    for bad, needle in [
        (short, "8 bytes of data"),
        (common_pb2.TensorData(name="input", dtype="nonsense", shape=[1]), "dtype"),
    ]:
        call = served.stub.Predict(inference_pb2.PredictRequest(model_name="digits", inputs=[bad]))
        code, details = await _code(call)
        assert (
            code == grpc.StatusCode.INVALID_ARGUMENT and "'input'" in details and needle in details
        )
    twice = request("digits", input=np.zeros((1, 64), np.float32))
    twice.inputs.append(twice.inputs[0])
    code, details = await _code(served.stub.Predict(twice))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "twice" in details


class SlowRunner:
    """Sleeps before answering: a model too slow for the caller's deadline."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    @property
    def inputs(self) -> Sequence[TensorInfo]:
        return [TensorInfo("x", "float32", (-1, 4))]

    @property
    def outputs(self) -> Sequence[TensorInfo]:
        return [TensorInfo("y", "float32", (-1, 4))]

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        time.sleep(self.delay_s)
        return [inputs["x"]]


async def test_deadline_exceeded(tmp_path: Path) -> None:
    recorder = Recorded()
    slow = SlowRunner(0.0)
    host = ModelHost(workers=2, recorder=recorder, open_model=lambda *a, **k: slow)
    server = await start_inference_server(host, tmp_path, listen="127.0.0.1:0")
    try:
        host.activate("slow", "1", "sha", tmp_path / "slow.bin", ONNXRUNTIME)
        slow.delay_s = 1.0
        async with grpc.aio.insecure_channel(server.unix_target) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            x = np.ones((1, 4), np.float32)
            code, _ = await _code(stub.Predict(request("slow", x=x), timeout=0.1))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        # The loopback port serves the same API.
        slow.delay_s = 0.0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            response = await stub.Predict(request("slow", x=x), timeout=5)
            np.testing.assert_array_equal(outputs(response)[0], x)
        await asyncio.sleep(1.0)  # the slow run finishes and is recorded
        outcomes = [(m, v, o) for m, v, _, o in recorder.calls]
        assert outcomes == [("slow", "1", "timeout"), ("slow", "1", "ok")]
    finally:
        await server.stop(None)
        host.close()


# ------------------------------------------------------------------ model changes


def test_rollback_and_commit_are_idempotent(tmp_path: Path) -> None:
    host = ModelHost()
    try:
        v1, v2 = add_model(tmp_path / "v1.onnx", 1.0), add_model(tmp_path / "v2.onnx", 2.0)
        host.activate("m", "1", "a", v1, ONNXRUNTIME)
        assert host.rollback("m") is None  # a first activation undone: nothing active
        assert host.rollback("m") is None
        host.activate("m", "1", "a", v1, ONNXRUNTIME)
        host.commit("m")
        host.activate("m", "2", "b", v2, ONNXRUNTIME)
        standby = host.standby("m")
        assert host.active("m").version == "2" and standby is not None and standby.version == "1"
        restored = host.rollback("m")
        assert restored is not None and restored.version == "1"
        assert host.rollback("m") is restored  # no uncommitted activation left: no change
        host.activate("m", "2", "b", v2, ONNXRUNTIME)
        host.commit("m")
        host.commit("m")
        assert host.active("m").version == "2" and host.standby("m") is None
        assert host.rollback("m") is not None and host.active("m").version == "2"
    finally:
        host.close()


def test_a_model_that_fails_to_warm_never_becomes_active(tmp_path: Path) -> None:
    from agent.serving import ActivationFailed

    host = ModelHost()
    try:
        host.activate("m", "1", "a", add_model(tmp_path / "v1.onnx", 1.0), ONNXRUNTIME)
        host.commit("m")
        broken = tmp_path / "broken.onnx"
        broken.write_bytes(b"not a model")
        with pytest.raises(ActivationFailed, match="cannot load"):
            host.activate("m", "2", "b", broken, ONNXRUNTIME)
        assert host.active("m").version == "1" and host.standby("m") is None
    finally:
        host.close()


async def test_atomic_swap_under_load(served: Served, tmp_path: Path) -> None:
    v1, v2 = add_model(tmp_path / "v1.onnx", 1.0), add_model(tmp_path / "v2.onnx", 2.0)
    host = served.host
    await asyncio.to_thread(host.activate, "m", "1.0.0", "sha-1", v1, ONNXRUNTIME)
    host.commit("m")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    expected = {"1.0.0": x + 1.0, "2.0.0": x + 2.0}
    swapped = threading.Event()  # set once v2 is committed
    stop = asyncio.Event()
    seen: list[tuple[str, bool]] = []  # (version, sent after the commit)

    async def client() -> None:
        while not stop.is_set():
            after = swapped.is_set()
            response = await served.stub.Predict(request("m", x=x), timeout=10)
            got = outputs(response)[0]
            # Each response comes whole from one version: its output and its
            # reported version agree.
            np.testing.assert_array_equal(got, expected[response.model_version])
            seen.append((response.model_version, after))

    def swaps() -> None:
        time.sleep(0.2)
        for _ in range(3):
            host.activate("m", "2.0.0", "sha-2", v2, ONNXRUNTIME)
            time.sleep(0.1)
            host.rollback("m")
            time.sleep(0.1)
        host.activate("m", "2.0.0", "sha-2", v2, ONNXRUNTIME)
        time.sleep(0.1)
        host.commit("m")
        swapped.set()
        time.sleep(0.3)

    clients = [asyncio.create_task(client()) for _ in range(4)]
    await asyncio.to_thread(swaps)
    stop.set()
    await asyncio.gather(*clients)  # any failed request fails the test here

    versions = {v for v, _ in seen}
    assert versions == {"1.0.0", "2.0.0"}
    after = [v for v, later in seen if later]
    assert after and set(after) == {"2.0.0"}
    assert len(seen) > 100


def test_inference_settings_from_config(tmp_path: Path) -> None:
    from agent.config import load_config
    from agent.errors import ConfigError

    path = tmp_path / "agent.toml"
    path.write_text('inference_workers = 4\ninference_listen = "127.0.0.1:7450"\n')
    config = load_config(path, environ={})
    assert (config.inference_workers, config.inference_listen) == (4, "127.0.0.1:7450")
    assert load_config(None, environ={}).inference_listen is None
    with pytest.raises(ConfigError, match="loopback"):
        load_config(None, environ={"EDGEFLEET_AGENT_INFERENCE_LISTEN": "0.0.0.0:7450"})
    with pytest.raises(ConfigError, match="positive integer"):
        load_config(None, environ={"EDGEFLEET_AGENT_INFERENCE_WORKERS": "0"})
