"""On-device inference API overhead: Predict through the agent's unix socket
vs a bare ONNX Runtime session on the same model, in the same run.

The digits MLP (demo.models) is served by a ModelHost behind the real gRPC
server (agent.inference_server) on a unix socket; the server runs its own
event loop in a thread, the client is a plain synchronous gRPC stub, as an
app on the device would use. The baseline is an InferenceSession with the
same pinned threading (agent.runtimes.onnxruntime.OnnxRuntimeRunner) called
directly. Both run batch 1 and batch 64 sequentially, interleaved in rounds
so drift hits both. Goal: overhead <= 10 % or <= 100 us per call.

    python bench/bench_inference.py                 # prints a table
    python bench/bench_inference.py --calls 5000 --markdown
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from agent.inference_server import InferenceServer, start_inference_server
from agent.runtimes import ONNXRUNTIME
from agent.runtimes.onnxruntime import OnnxRuntimeRunner
from agent.serving import ModelHost, encode_tensor
from demo.models import build_digits_classifier
from edgefleet.v1 import common_pb2, inference_pb2, inference_pb2_grpc


class ServerThread:
    """The inference server on its own event loop in a daemon thread."""

    def __init__(self, host: ModelHost, state_dir: Path) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server: InferenceServer = asyncio.run_coroutine_threadsafe(
            start_inference_server(host, state_dir), self._loop
        ).result()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


class _Empty(inference_pb2_grpc.InferenceServiceServicer):
    def Predict(self, request: object, context: object) -> inference_pb2.PredictResponse:
        return inference_pb2.PredictResponse()

    def GetModelMetadata(self, request: object, context: object) -> inference_pb2.ModelMetadata:
        return inference_pb2.ModelMetadata()


def grpc_floor_us(state_dir: Path, request: inference_pb2.PredictRequest, calls: int) -> float:
    """A synchronous gRPC server whose Predict does nothing, on a unix socket:
    what any Python gRPC call costs on this machine."""
    server = grpc.server(ThreadPoolExecutor(2))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(_Empty(), server)
    target = f"unix:{state_dir / 'floor.sock'}"
    server.add_insecure_port(target)
    server.start()
    try:
        with grpc.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            stub.Predict(request, timeout=10)
            return per_call_us(lambda: stub.Predict(request, timeout=10), calls)
    finally:
        server.stop(None)


def per_call_us(call: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round and batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true", help="print markdown table rows")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        built = build_digits_classifier(Path(tmp) / "digits")
        samples = np.load(built.sample_data)["input"]
        host = ModelHost(workers=2)
        host.activate("digits", "1.0.0", "bench", built.model, ONNXRUNTIME)
        server = ServerThread(host, Path(tmp))
        channel = grpc.insecure_channel(server.server.unix_target)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        bare = OnnxRuntimeRunner(built.model, threads=1)
        rows = []
        try:
            for batch in (1, 64):
                x = np.ascontiguousarray(samples[:batch])
                dtype, shape, data = encode_tensor(x)
                request = inference_pb2.PredictRequest(
                    model_name="digits",
                    inputs=[
                        common_pb2.TensorData(name="input", dtype=dtype, shape=shape, data=data)
                    ],
                )
                api_result = stub.Predict(request, timeout=10)
                got = np.frombuffer(api_result.outputs[0].data, np.float32).reshape(batch, 10)
                np.testing.assert_allclose(got, bare.run({"input": x})[0], atol=1e-6)
                api: list[float] = []
                direct: list[float] = []
                for _ in range(args.rounds):
                    direct.append(
                        per_call_us(functools.partial(bare.run, {"input": x}), args.calls)
                    )
                    api.append(
                        per_call_us(
                            functools.partial(stub.Predict, request, timeout=10), args.calls
                        )
                    )
                rows.append((batch, statistics.median(direct), statistics.median(api)))
            floor = grpc_floor_us(Path(tmp), request, args.calls)
        finally:
            channel.close()
            server.stop()
            host.close()

    print(
        f"# {platform.machine()} {platform.processor() or ''}, Python {platform.python_version()}, "
        f"onnxruntime {ort.__version__}, grpcio {grpc.__version__}; "
        f"{args.rounds} rounds x {args.calls} calls, median per-call"
    )
    print(f"# gRPC floor (sync server, empty Predict, unix socket, batch 64): {floor:.1f} us/call")
    header = "| batch | bare ORT µs/call | Predict API µs/call | overhead µs | ratio | goal met |"
    if args.markdown:
        print(header)
        print("|---|---|---|---|---|---|")
    for batch, direct_us, api_us in rows:
        overhead = api_us - direct_us
        ratio = api_us / direct_us
        met = "yes" if overhead <= 100 or ratio <= 1.10 else "no"
        if args.markdown:
            print(
                f"| {batch} | {direct_us:.1f} | {api_us:.1f} | {overhead:.1f} | "
                f"{ratio:.2f} | {met} |"
            )
        else:
            print(
                f"batch {batch:3d}: bare {direct_us:8.1f} us  api {api_us:8.1f} us  "
                f"overhead {overhead:7.1f} us  ratio {ratio:5.2f}  goal met: {met}"
            )


if __name__ == "__main__":
    main()
