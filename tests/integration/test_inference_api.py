"""The on-device inference API: real inference over the unix socket on ONNX
and TFLite artifacts, the status codes of bad requests, deadlines, and an
atomic swap under concurrent load."""

from __future__ import annotations

import asyncio
import socket
import stat
import struct
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from edgefleet.agent.inference_client import InferenceClient, InferenceError
from edgefleet.agent.inference_server import (
    MAX_MESSAGE_BYTES,
    InferenceServer,
    start_inference_server,
)
from edgefleet.agent.runtimes import ONNXRUNTIME, TFLITE, TensorInfo
from edgefleet.agent.serving import ModelHost, ModelSpec, decode_tensor, encode_tensor
from edgefleet.controlplane.build.samples import load_samples
from edgefleet.controlplane.build.tflite_ladder import build_candidates
from edgefleet.controlplane.build.toolchain import default_toolchains_dir, find_tflite
from edgefleet.controlplane.build.types import BuildTarget
from edgefleet.controlplane.domain.onnx_inspect import inspect_model
from edgefleet.demo.models import BuiltModel
from edgefleet.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from testkit.models import adder_model

# ------------------------------------------------------------------ helpers


@dataclass
class Served:
    host: ModelHost
    server: InferenceServer
    stub: inference_pb2_grpc.InferenceServiceStub
    recorder: Recorded

    @property
    def fast(self) -> Path:
        assert self.server.fast_socket_path is not None
        return self.server.fast_socket_path


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


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    recorder = Recorded()
    host = ModelHost(workers=2, recorder=recorder)
    server = await start_inference_server(host, tmp_path)
    channel = grpc.aio.insecure_channel(server.unix_target)
    try:
        yield Served(host, server, inference_pb2_grpc.InferenceServiceStub(channel), recorder)
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


@pytest.fixture(scope="module")
def digits_tflite(digits: BuiltModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits MLP as onnx2tf's fp32 TFLite model (the build ladder's
    first candidate), converted once per module."""
    toolchain = find_tflite(default_toolchains_dir())
    if toolchain is None:
        pytest.skip("TFLite toolchain not installed (edgefleet toolchain install tflite)")
    samples = load_samples(digits.sample_data, inspect_model(digits.model).inputs)
    fp32 = build_candidates(
        digits.model,
        samples,
        tmp_path_factory.mktemp("tflite"),
        BuildTarget("pi", "tflite"),
        lambda line: None,
        toolchains_dir=toolchain.venv.parent,
    )[0]
    assert fp32.path is not None, fp32.error
    return fp32.path


async def test_tflite_predict_matches_bare_onnxruntime(
    served: Served, digits: BuiltModel, digits_tflite: Path
) -> None:
    await asyncio.to_thread(
        served.host.activate,
        "digits",
        "1.0.0",
        "sha-tflite",
        digits_tflite,
        TFLITE,
        digits_spec(digits.model),
    )
    # One row per call, sequentially and concurrently (the interpreter is not
    # thread-safe).
    x = np.load(digits.sample_data)["input"][:8]
    single = await served.stub.Predict(request("digits", input=x[:1]), timeout=10)
    np.testing.assert_allclose(outputs(single)[0], reference(digits.model, x[:1]), atol=1e-4)
    rows = await asyncio.gather(
        *(served.stub.Predict(request("digits", input=x[i : i + 1]), timeout=10) for i in range(8))
    )
    assert {r.model_version for r in rows} == {"1.0.0"}
    got = np.concatenate([outputs(r)[0] for r in rows])
    np.testing.assert_allclose(got, reference(digits.model, x), atol=1e-4)


async def test_tflite_dynamic_batch_serves_rows_and_a_wrong_shape_is_invalid_argument(
    served: Served, digits: BuiltModel, digits_tflite: Path
) -> None:
    # The build kept the model's dynamic batch (issue 22): the runner resizes
    # the interpreter to each call's batch. Another row size is the caller's
    # error, said as such with the accepted shape.
    await asyncio.to_thread(
        served.host.activate,
        "digits",
        "1.0.0",
        "sha-tflite",
        digits_tflite,
        TFLITE,
        digits_spec(digits.model),
    )
    x = np.load(digits.sample_data)["input"][:8]
    response = await served.stub.Predict(request("digits", input=x), timeout=10)
    np.testing.assert_allclose(outputs(response)[0], reference(digits.model, x), atol=1e-4)
    code, details = await _code(served.stub.Predict(request("digits", input=x[:, :32]), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'input': shape [8, 32]" in details and "takes [-1, 64]" in details
    with InferenceClient(served.fast) as client:
        with pytest.raises(InferenceError) as raised:
            await asyncio.to_thread(client.predict, "digits", {"input": x[:, :32]}, timeout_s=10)
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "takes [-1, 64]" in raised.value.details
        # Metadata shows what this device accepts: any batch.
        meta = await asyncio.to_thread(client.metadata, "digits")
    assert [(t.name, list(t.shape)) for t in meta.inputs] == [("input", [-1, 64])]
    runner = served.host.active("digits").runner
    assert [(t.name, t.dtype, t.shape) for t in runner.inputs] == [("input", "float32", (-1, 64))]
    # One row after eight: resized back.
    response = await served.stub.Predict(request("digits", input=x[:1]), timeout=10)
    np.testing.assert_allclose(outputs(response)[0], reference(digits.model, x[:1]), atol=1e-4)


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


BAD_TENSORS = [
    ({"input": np.zeros((1, 63), np.float32)}, "'input': shape [1, 63]"),
    ({"input": np.zeros((1, 64), np.float64)}, "'input': dtype float64"),
    ({"input": np.zeros(64, np.float32)}, "'input': shape [64]"),
    ({"image": np.zeros((1, 64), np.float32)}, "'image' is not an input"),
    ({}, "'input' is missing"),
]


@pytest.mark.parametrize(("inputs", "needle"), BAD_TENSORS)
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
        # Runs are inline and cannot be interrupted: the timed-out one is
        # recorded when it finishes, after the quick one.
        outcomes = sorted((m, v, o) for m, v, _, o in recorder.calls)
        assert outcomes == [("slow", "1", "ok"), ("slow", "1", "timeout")]
    finally:
        await server.stop(None)
        host.close()


# ------------------------------------------------------------------ model changes


async def test_atomic_swap_under_load(served: Served, tmp_path: Path) -> None:
    v1, v2 = adder_model(tmp_path / "v1.onnx", 1.0), adder_model(tmp_path / "v2.onnx", 2.0)
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


# ------------------------------------------------------------------ the fast path


def fast_code(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(InferenceError) as raised:
        call(*args, **kwargs)
    return raised.value.code, raised.value.details


async def test_fast_path_predict_matches_bare_onnxruntime(
    served: Served, digits: BuiltModel
) -> None:
    await asyncio.to_thread(
        served.host.activate, "digits", "1.0.0", "sha-onnx", digits.model, ONNXRUNTIME
    )
    x = np.load(digits.sample_data)["input"][:16]

    def calls() -> None:
        with InferenceClient(served.fast) as client:
            result = client.predict("digits", {"input": x}, timeout_s=10)
            assert result.model_version == "1.0.0" and list(result.outputs) == ["probabilities"]
            np.testing.assert_allclose(
                result.outputs["probabilities"], reference(digits.model, x), atol=1e-6
            )
            # The same connection serves call after call, with or without deadline.
            for _ in range(20):
                client.predict("digits", {"input": x[:1]})
            meta = client.metadata("digits")
            assert (meta.model_version, meta.artifact_digest, meta.runtime) == (
                "1.0.0",
                "sha-onnx",
                "onnxruntime",
            )
            assert [(t.name, t.dtype, list(t.shape)) for t in meta.inputs] == [
                ("input", "float32", [-1, 64])
            ]

    await asyncio.to_thread(calls)
    assert stat.S_IMODE(served.fast.stat().st_mode) == 0o660
    # Telemetry counts fast-path requests like gRPC ones.
    assert [o for _, _, _, o in served.recorder.calls] == ["ok"] * 21


async def test_fast_path_status_codes_match_grpc(served: Served, digits: BuiltModel) -> None:
    x = np.zeros((1, 64), np.float32)

    def unknown_and_inactive() -> None:
        with InferenceClient(served.fast) as client:
            assert fast_code(client.predict, "nope", {"input": x})[0] == grpc.StatusCode.NOT_FOUND
            assert fast_code(client.metadata, "nope")[0] == grpc.StatusCode.NOT_FOUND
            served.host.declare("digits")
            code, details = fast_code(client.predict, "digits", {"input": x})
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "no active version" in details
            code, _ = fast_code(client.metadata, "digits")
            assert code == grpc.StatusCode.FAILED_PRECONDITION

    await asyncio.to_thread(unknown_and_inactive)
    await asyncio.to_thread(
        served.host.activate, "digits", "1.0.0", "sha", digits.model, ONNXRUNTIME
    )

    def bad_tensors() -> None:
        with InferenceClient(served.fast) as client:
            for inputs, needle in BAD_TENSORS:
                code, details = fast_code(client.predict, "digits", inputs)
                assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details
            short = common_pb2.TensorData(
                name="input", dtype="float32", shape=[1, 64], data=b"\0" * 8
            )
            bad = inference_pb2.PredictRequest(model_name="digits", inputs=[short])
            code, details = fast_code(client.predict_message, bad)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "8 bytes of data" in details
            twice = request("digits", input=x)
            twice.inputs.append(twice.inputs[0])
            code, details = fast_code(client.predict_message, twice)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "twice" in details
            # Errors leave the connection usable.
            assert client.predict("digits", {"input": x}).model_version == "1.0.0"

    await asyncio.to_thread(bad_tensors)


def _send(sock: socket.socket, body: bytes) -> None:
    sock.sendall(struct.pack("<I", len(body)) + body)


def _receive(sock: socket.socket) -> inference_pb2.FramedResponse | None:
    reader = sock.makefile("rb")
    with reader:
        header = reader.read(4)
        if len(header) < 4:
            return None
        (size,) = struct.unpack("<I", header)
        return inference_pb2.FramedResponse.FromString(reader.read(size))


async def test_fast_path_framing_by_hand(served: Served, digits: BuiltModel) -> None:
    """The documented framing, spoken without the Python client."""
    await asyncio.to_thread(
        served.host.activate, "digits", "1.0.0", "sha", digits.model, ONNXRUNTIME
    )
    x = np.load(digits.sample_data)["input"][:2]

    def talk() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(served.fast))
            call = inference_pb2.FramedRequest(predict=request("digits", input=x))
            _send(sock, call.SerializeToString())
            reply = _receive(sock)
            assert reply is not None and reply.WhichOneof("result") == "predict"
            out = reply.predict.outputs[0]
            got = decode_tensor("p", out.dtype, out.shape, out.data)
            np.testing.assert_allclose(got, reference(digits.model, x), atol=1e-6)
            # Bytes that are not a FramedRequest, and an empty request.
            for body, needle in [(b"\xff\xff\xff", "not a FramedRequest"), (b"", "empty")]:
                _send(sock, body)
                reply = _receive(sock)
                assert reply is not None and reply.WhichOneof("result") == "error"
                assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                assert needle in reply.error.message
            # The connection is still in step: a good request works, with
            # any deadline the field can carry.
            call.timeout_us = 2**64 - 1
            _send(sock, call.SerializeToString())
            reply = _receive(sock)
            assert reply is not None and reply.predict.model_version == "1.0.0"
            # A frame over the limit: RESOURCE_EXHAUSTED, then the agent hangs up.
            sock.sendall(struct.pack("<I", MAX_MESSAGE_BYTES + 1))
            reply = _receive(sock)
            assert reply is not None
            assert reply.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert _receive(sock) is None

    await asyncio.to_thread(talk)


async def test_fast_path_deadline_exceeded(tmp_path: Path) -> None:
    recorder = Recorded()
    slow = SlowRunner(0.0)
    host = ModelHost(workers=2, recorder=recorder, open_model=lambda *a, **k: slow)
    server = await start_inference_server(host, tmp_path)
    assert server.fast_socket_path is not None
    fast = server.fast_socket_path
    try:
        host.activate("slow", "1", "sha", tmp_path / "slow.bin", ONNXRUNTIME)
        x = np.ones((1, 4), np.float32)
        slow.delay_s = 0.5

        def calls() -> None:
            with InferenceClient(fast) as client:
                # The client stops waiting at its deadline...
                code, _ = fast_code(client.predict, "slow", {"x": x}, timeout_s=0.1)
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED
                # ...and the next call goes out on a fresh connection.
                slow.delay_s = 0.0
                result = client.predict("slow", {"x": x}, timeout_s=5)
                np.testing.assert_array_equal(result.outputs["y"], x)
            # The agent itself answers DEADLINE_EXCEEDED to a run that
            # overran the deadline the request carried.
            slow.delay_s = 0.3
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(fast))
                call = inference_pb2.FramedRequest(predict=request("slow", x=x), timeout_us=50_000)
                _send(sock, call.SerializeToString())
                reply = _receive(sock)
            assert reply is not None
            assert reply.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]

        await asyncio.to_thread(calls)
        await asyncio.sleep(0.6)  # the first slow run finishes and is recorded
        assert sorted(o for _, _, _, o in recorder.calls) == ["ok", "timeout", "timeout"]
    finally:
        await server.stop(None)
        host.close()


async def test_stop_lets_a_running_fast_path_request_finish(tmp_path: Path) -> None:
    slow = SlowRunner(0.0)
    host = ModelHost(workers=2, open_model=lambda *a, **k: slow)
    server = await start_inference_server(host, tmp_path)
    assert server.fast_socket_path is not None
    host.activate("slow", "1", "sha", tmp_path / "slow.bin", ONNXRUNTIME)
    slow.delay_s = 0.5
    x = np.ones((1, 4), np.float32)
    idle = InferenceClient(server.fast_socket_path)
    idle.metadata("slow")  # an idle connection, open while the server stops
    with InferenceClient(server.fast_socket_path) as client:
        running = asyncio.create_task(asyncio.to_thread(client.predict, "slow", {"x": x}))
        await asyncio.sleep(0.2)  # the request is inside the model
        await server.stop(2.0)
        result = await running
    np.testing.assert_array_equal(result.outputs["y"], x)
    assert not server.fast_socket_path.exists()
    code, _ = fast_code(idle.metadata, "slow")
    assert code == grpc.StatusCode.UNAVAILABLE
    idle.close()
    host.close()


async def test_atomic_swap_under_load_on_the_fast_path(served: Served, tmp_path: Path) -> None:
    v1, v2 = adder_model(tmp_path / "v1.onnx", 1.0), adder_model(tmp_path / "v2.onnx", 2.0)
    host = served.host
    await asyncio.to_thread(host.activate, "m", "1.0.0", "sha-1", v1, ONNXRUNTIME)
    host.commit("m")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    expected = {"1.0.0": x + 1.0, "2.0.0": x + 2.0}
    swapped = threading.Event()  # set once v2 is committed
    stop = threading.Event()
    seen: list[tuple[str, bool]] = []  # (version, sent after the commit)
    sent: list[int] = [0] * 4
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            with InferenceClient(served.fast) as connection:
                while not stop.is_set():
                    after = swapped.is_set()
                    sent[index] += 1
                    result = connection.predict("m", {"x": x}, timeout_s=10)
                    # Each answer comes whole from one version.
                    np.testing.assert_array_equal(
                        result.outputs["y"], expected[result.model_version]
                    )
                    seen.append((result.model_version, after))
        except BaseException as exc:
            errors.append(exc)

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

    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in clients:
        thread.start()
    await asyncio.to_thread(swaps)
    stop.set()
    for thread in clients:
        await asyncio.to_thread(thread.join, 10)
    assert errors == []
    assert len(seen) == sum(sent)  # every request sent was answered
    assert {v for v, _ in seen} == {"1.0.0", "2.0.0"}
    after = [v for v, later in seen if later]
    assert after and set(after) == {"2.0.0"}
    assert len(seen) > 100
