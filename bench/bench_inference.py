"""On-device inference API overhead: Predict through the agent's sockets vs a
bare ONNX Runtime session on the same model, in the same run.

The digits MLP (demo.models) is served by a ModelHost with the agent's real
telemetry recorder in a separate "agent" process (this file run with
--serve), as on a device, where apps are other processes. It serves the API
exactly as the daemon does (agent.inference_server): the framed fast path
(agent.inference_client is the client) and gRPC on a synchronous server,
both running requests inline with ModelHost.predict_sync.

A second "reference" process serves, for comparison:
- the previous implementation: a grpc.aio server whose Predict awaits the
  ModelHost.predict coroutine (thread-pool hop);
- two floors: a synchronous gRPC server whose Predict does nothing, and a
  framed echo server (threads and framing like the fast path's; no protobuf,
  no model): what a gRPC call and a unix-socket round trip cost here.

In this process, without any transport: bare ONNX Runtime (the baseline, an
OnnxRuntimeRunner with the same pinned threading), ModelHost.predict_sync
and ModelHost.predict (awaited on an event loop). Clients reuse one request
message, as an app calling in a loop would. Rows are interleaved in rounds so
drift hits all; each figure is the median of the rounds' per-call means.
Goal: overhead <= 10 % or <= 100 us per call.

    python bench/bench_inference.py                 # prints a table
    python bench/bench_inference.py --calls 5000 --markdown
    python bench/bench_inference.py --smoke        # CI: seconds, figures meaningless
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from edgefleet.agent.inference_client import InferenceClient
from edgefleet.agent.inference_server import start_inference_server, status_of
from edgefleet.agent.runtimes import ONNXRUNTIME
from edgefleet.agent.runtimes.onnxruntime import OnnxRuntimeRunner
from edgefleet.agent.serving import ModelHost, ServingError, decode_tensor, encode_tensor
from edgefleet.agent.telemetry import RequestStats
from edgefleet.demo.models import build_digits_classifier
from edgefleet.v1 import common_pb2, inference_pb2, inference_pb2_grpc

MODEL = "digits"
# --smoke: the run of seconds CI makes (tests/e2e/test_bench_smoke.py) so the
# benchmark cannot rot; every path, one short round. Figures meaningless.
SMOKE = {"calls": 50, "rounds": 1}
_HEADER = struct.Struct("<I")


# ------------------------------------------------------------------ the agent process


class _Empty(inference_pb2_grpc.InferenceServiceServicer):
    def Predict(self, request: object, context: object) -> inference_pb2.PredictResponse:
        return inference_pb2.PredictResponse()

    def GetModelMetadata(self, request: object, context: object) -> inference_pb2.ModelMetadata:
        return inference_pb2.ModelMetadata()


class _AioServicer(inference_pb2_grpc.InferenceServiceServicer):
    """The API as it was before: grpc.aio, awaiting ModelHost.predict."""

    def __init__(self, host: ModelHost) -> None:
        self._host = host

    async def Predict(
        self, request: inference_pb2.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.PredictResponse:
        inputs = {t.name: decode_tensor(t.name, t.dtype, t.shape, t.data) for t in request.inputs}
        try:
            prediction = await self._host.predict(
                request.model_name, inputs, timeout_s=context.time_remaining()
            )
        except ServingError as exc:
            await context.abort(status_of(exc), exc.message)
        response = inference_pb2.PredictResponse(
            model_name=request.model_name, model_version=prediction.model.version
        )
        for spec, array in zip(prediction.model.spec.outputs, prediction.outputs, strict=True):
            dtype, shape, data = encode_tensor(array)
            response.outputs.add(name=spec.name, dtype=dtype, shape=shape, data=data)
        return response

    async def GetModelMetadata(
        self, request: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.ModelMetadata:
        return inference_pb2.ModelMetadata()


def _echo_forever(listener: socket.socket) -> None:
    """Frames back as they came, one thread per connection."""

    def serve(conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with conn, reader:
            while len(header := reader.read(4)) == 4:
                body = reader.read(_HEADER.unpack(header)[0])
                conn.sendall(header + body)

    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


async def serve_agent(state_dir: Path, model: Path) -> None:
    """The agent: the inference API as the daemon serves it, until stdin closes."""
    host = ModelHost(workers=2, recorder=RequestStats())
    host.activate(MODEL, "1.0.0", "bench", model, ONNXRUNTIME)
    api = await start_inference_server(host, state_dir)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await api.stop(None)
    host.close()


async def serve_reference(state_dir: Path, model: Path) -> None:
    """The previous API and the floors, in a process of their own so their
    threads do not share the agent's GIL, until stdin closes."""
    host = ModelHost(workers=2, recorder=RequestStats())
    host.activate(MODEL, "1.0.0", "bench", model, ONNXRUNTIME)
    aio = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(_AioServicer(host), aio)
    aio.add_insecure_port(f"unix:{state_dir / 'aio.sock'}")
    await aio.start()

    floor = grpc.server(ThreadPoolExecutor(2))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(_Empty(), floor)
    floor.add_insecure_port(f"unix:{state_dir / 'floor.sock'}")
    floor.start()

    echo = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    echo.bind(str(state_dir / "echo.sock"))
    echo.listen()
    threading.Thread(target=_echo_forever, args=(echo,), daemon=True).start()

    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    echo.close()
    floor.stop(None)
    await aio.stop(None)
    host.close()


def spawn(role: str, state_dir: Path, model: Path) -> subprocess.Popen[str]:
    """This file run as `role`'s server process; returns once it serves."""
    state_dir.mkdir()
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve", role, str(state_dir), str(model)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise SystemExit(f"the {role} process did not start")
    return process


def stop(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    with contextlib.suppress(OSError):
        process.stdin.close()
    process.wait(timeout=30)


# ------------------------------------------------------------------ clients


def per_call_us(call: Callable[[], object], calls: int) -> float:
    """Mean wall time of `calls` sequential calls, in microseconds."""
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1e6


class EchoClient:
    def __init__(self, path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(path))
        self._reader = self._sock.makefile("rb")

    def call(self, body: bytes) -> bytes:
        self._sock.sendall(_HEADER.pack(len(body)) + body)
        size = _HEADER.unpack(self._reader.read(4))[0]
        return self._reader.read(size)

    def close(self) -> None:
        self._reader.close()
        self._sock.close()


def host_predict_us(host: ModelHost, x: np.ndarray, calls: int) -> float:
    """ModelHost.predict awaited in a loop on an event loop of this thread."""

    async def loop() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            await host.predict(MODEL, {"input": x})
        return (time.perf_counter() - started) / calls * 1e6

    return asyncio.run(loop())


def request_for(x: np.ndarray) -> inference_pb2.PredictRequest:
    dtype, shape, data = encode_tensor(x)
    return inference_pb2.PredictRequest(
        model_name=MODEL,
        inputs=[common_pb2.TensorData(name="input", dtype=dtype, shape=shape, data=data)],
    )


ROWS = [
    ("bare", "bare ONNX Runtime (baseline)"),
    ("predict_sync", "ModelHost.predict_sync, in process"),
    ("predict", "ModelHost.predict (coroutine, pool hop), in process"),
    ("fast", "fast path (framed, unix socket)"),
    ("grpc", "gRPC, sync server (the API now)"),
    ("aio", "gRPC, grpc.aio server (before)"),
    ("echo", "floor: framed echo, no model"),
    ("floor", "floor: empty sync gRPC Predict"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round, row and batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true", help="print markdown table rows")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)  # ROLE STATE_DIR MODEL
    parser.add_argument("--smoke", action="store_true", help="CI's run of seconds (SMOKE)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    if args.serve:
        role, state_dir, model = args.serve
        serve = serve_agent if role == "agent" else serve_reference
        asyncio.run(serve(Path(state_dir), Path(model)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        built = build_digits_classifier(state / "digits")
        samples = np.load(built.sample_data)["input"]
        agent = spawn("agent", state / "agent", built.model)
        reference = spawn("reference", state / "reference", built.model)
        host = ModelHost(workers=2, recorder=RequestStats())
        host.activate(MODEL, "1.0.0", "bench", built.model, ONNXRUNTIME)
        bare = OnnxRuntimeRunner(built.model, threads=1)
        fast = InferenceClient(state / "agent" / "predict.sock")
        echo = EchoClient(state / "reference" / "echo.sock")
        channels = {
            name: grpc.insecure_channel(f"unix:{path}")
            for name, path in [
                ("grpc", state / "agent" / "inference.sock"),
                ("aio", state / "reference" / "aio.sock"),
                ("floor", state / "reference" / "floor.sock"),
            ]
        }
        stubs = {k: inference_pb2_grpc.InferenceServiceStub(c) for k, c in channels.items()}
        results: dict[tuple[int, str], list[float]] = {}
        try:
            for batch in (1, 64):
                x = np.ascontiguousarray(samples[:batch])
                request = request_for(x)
                body = inference_pb2.FramedRequest(predict=request).SerializeToString()
                expected = bare.run({"input": x})[0]
                for name in ("grpc", "aio"):
                    got = stubs[name].Predict(request, timeout=10).outputs[0]
                    np.testing.assert_allclose(decode_tensor("p", got.dtype, got.shape, got.data),
                                               expected, atol=1e-6)  # fmt: skip
                got = fast.predict_message(request, timeout_s=10).outputs[0]
                np.testing.assert_allclose(
                    decode_tensor("p", got.dtype, got.shape, got.data), expected, atol=1e-6
                )
                calls: dict[str, Callable[[], object]] = {
                    "bare": functools.partial(bare.run, {"input": x}),
                    "predict_sync": functools.partial(host.predict_sync, MODEL, {"input": x}),
                    "fast": functools.partial(fast.predict_message, request, timeout_s=10),
                    "grpc": functools.partial(stubs["grpc"].Predict, request, timeout=10),
                    "aio": functools.partial(stubs["aio"].Predict, request, timeout=10),
                    "echo": functools.partial(echo.call, body),
                    "floor": functools.partial(stubs["floor"].Predict, request, timeout=10),
                }
                for call in calls.values():  # warm every path up
                    per_call_us(call, 200)
                for _ in range(args.rounds):
                    for name, _label in ROWS:
                        if name == "predict":
                            us = host_predict_us(host, x, args.calls)
                        else:
                            us = per_call_us(calls[name], args.calls)
                        results.setdefault((batch, name), []).append(us)
        finally:
            fast.close()
            echo.close()
            for channel in channels.values():
                channel.close()
            host.close()
            stop(agent)
            stop(reference)

    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, "
        f"onnxruntime {ort.__version__}, grpcio {grpc.__version__}; "
        f"{args.rounds} rounds x {args.calls} calls; median of the rounds' per-call means"
    )
    if args.markdown:
        print("| batch | path | µs/call | min-max | overhead µs | ratio | goal met |")
        print("|---|---|---|---|---|---|---|")
    for batch in (1, 64):
        base = statistics.median(results[(batch, "bare")])
        for name, label in ROWS:
            runs = results[(batch, name)]
            us = statistics.median(runs)
            spread = f"{min(runs):.1f}-{max(runs):.1f}"
            if name == "bare":
                overhead, ratio, met = "", "1.00", ""
            elif name in ("echo", "floor"):
                overhead, ratio, met = "", "", ""
            else:
                extra = us - base
                overhead = f"{extra:.1f}"
                ratio = f"{us / base:.2f}"
                met = "yes" if extra <= 100 or us / base <= 1.10 else "no"
            if args.markdown:
                print(f"| {batch} | {label} | {us:.1f} | {spread} | {overhead} | {ratio} | {met} |")
            else:
                goal = f"goal met: {met}" if met else ""
                print(
                    f"batch {batch:2d}  {label:52s} {us:8.1f} us  ({spread:>15s})  "
                    f"overhead {overhead:>7s}  ratio {ratio:>6s}  {goal}"
                )


if __name__ == "__main__":
    main()
