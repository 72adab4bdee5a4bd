"""The on-device inference API (edgefleet.v1.InferenceService), served two
ways from one ModelHost:

- gRPC on a unix socket in the state directory (mode 0660, so apps in the
  agent's group may call it) and optionally on a loopback port;
- the framed fast path on a second unix socket beside it: 4-byte
  little-endian length + a FramedRequest, answered with a FramedResponse
  (framing documented in proto/edgefleet/v1/inference.proto), for apps whose
  models run in microseconds: a Python gRPC call alone costs several hundred.

Both are thin: a request becomes arrays, `ModelHost.predict_sync` runs it
inline on the server's thread (no second thread hop: for small models the
hop costs more than the model; the host bounds concurrency), and the result
becomes a message. ServingErrors become status codes in one place
(`status_of`): gRPC aborts with it, the fast path puts its number in a
FramedError. Handlers never pick codes themselves.

The gRPC server is the synchronous one (grpc.server with a thread pool):
measured on the 2-core reference machine it costs about half of what
grpc.aio does per call (docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from edgefleet.agent.errors import StateError
from edgefleet.agent.runtimes import TensorInfo
from edgefleet.agent.serving import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    ModelHost,
    ModelNotFound,
    NoActiveModel,
    ServingError,
    decode_tensor,
    encode_tensor,
)
from edgefleet.v1 import common_pb2, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SOCKET_NAME = "inference.sock"
FAST_SOCKET_NAME = "predict.sock"
SOCKET_MODE = 0o660
# Camera frames and batches are bigger than gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Each fast-path connection has a thread; this bounds what a runaway app can
# make the agent start.
MAX_FAST_CONNECTIONS = 64
# gRPC reports a call without a deadline as one far in the future; past this
# many seconds a deadline is taken as none (lock waits refuse huge timeouts).
NO_DEADLINE_S = 365 * 24 * 3600.0

FRAME_HEADER = struct.Struct("<I")
# Below this a frame goes out as one send (header + body copied together);
# above it, two sends, so a large tensor is not copied once more.
_COALESCE_BYTES = 64 * 1024

_STATUS_OF: dict[type[ServingError], grpc.StatusCode] = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    NoActiveModel: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    InferenceFailed: grpc.StatusCode.INTERNAL,
}


def status_of(exc: ServingError) -> grpc.StatusCode:
    """The status code a ServingError is reported with, on both transports."""
    for kind in type(exc).__mro__:
        code = _STATUS_OF.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def code_number(code: grpc.StatusCode) -> int:
    """The wire number of a gRPC status code (INVALID_ARGUMENT -> 3)."""
    number: int = code.value[0]
    return number


# ---------------------------------------------------------------- requests


def predict_into(
    host: ModelHost,
    request: inference_pb2.PredictRequest,
    response: inference_pb2.PredictResponse,
    timeout_s: float | None,
) -> None:
    """Run `request` on this thread and fill `response` (filled in place so
    the fast path builds it inside its envelope without a copy)."""
    inputs = {}
    for tensor in request.inputs:
        if tensor.name in inputs:
            raise InvalidInput(f"input {tensor.name!r} is given twice")
        inputs[tensor.name] = decode_tensor(tensor.name, tensor.dtype, tensor.shape, tensor.data)
    prediction = host.predict_sync(request.model_name, inputs, timeout_s=timeout_s)
    names = [t.name for t in prediction.model.spec.outputs]
    response.model_name = request.model_name
    response.model_version = prediction.model.version
    response.variant = prediction.model.variant
    for index, array in enumerate(prediction.outputs):
        dtype, shape, data = encode_tensor(array)
        name = names[index] if index < len(names) else f"output_{index}"
        response.outputs.add(name=name, dtype=dtype, shape=shape, data=data)


def _spec(tensor: TensorInfo) -> common_pb2.TensorSpec:
    return common_pb2.TensorSpec(name=tensor.name, dtype=tensor.dtype, shape=list(tensor.shape))


def metadata_into(host: ModelHost, name: str, metadata: inference_pb2.ModelMetadata) -> None:
    """Fill `metadata` with the active version of `name`: the artifact that
    serves it now (its variant and digest), the version's fallback digest
    if it has one, and its inputs as this device accepts them."""
    model = host.active(name)
    metadata.model_name = model.name
    metadata.model_version = model.version
    metadata.artifact_digest = model.digest
    metadata.variant = model.variant
    metadata.fallback_digest = model.fallback_digest
    metadata.runtime = model.runtime
    metadata.inputs.extend(_spec(t) for t in model.accepts)
    metadata.outputs.extend(_spec(t) for t in model.spec.outputs)


# ---------------------------------------------------------------- gRPC

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.ServicerContext
Handler = Callable[[Any, Req, Context], Resp]


def _mapped(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn what `method` raises into its status code."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Req, context: Context) -> Resp:
        try:
            return method(self, request, context)
        except ServingError as exc:
            context.abort(status_of(exc), exc.message)
        except Exception:
            log.exception("inference RPC failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the agent log")
        raise AssertionError("unreachable: abort raises")

    return wrapper


def _timeout(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > NO_DEADLINE_S else remaining


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """InferenceService over a ModelHost; runs on the gRPC server's threads."""

    def __init__(self, host: ModelHost) -> None:
        self._host = host

    @_mapped
    def Predict(
        self, request: inference_pb2.PredictRequest, context: Context
    ) -> inference_pb2.PredictResponse:
        """Run the active version of the requested model."""
        response = inference_pb2.PredictResponse()
        predict_into(self._host, request, response, _timeout(context))
        return response

    @_mapped
    def GetModelMetadata(
        self, request: inference_pb2.GetModelMetadataRequest, context: Context
    ) -> inference_pb2.ModelMetadata:
        """The active version of a model and its input/output spec."""
        metadata = inference_pb2.ModelMetadata()
        metadata_into(self._host, request.model_name, metadata)
        return metadata


# ---------------------------------------------------------------- fast path


def send_frame(sock: socket.socket, body: bytes) -> None:
    """Write one frame: the 4-byte little-endian length, then `body`."""
    if len(body) < _COALESCE_BYTES:
        sock.sendall(FRAME_HEADER.pack(len(body)) + body)
    else:
        sock.sendall(FRAME_HEADER.pack(len(body)))
        sock.sendall(body)


class FramedServer:
    """The fast path: FramedRequest frames on a unix socket, one thread per
    connection, each request run inline on its connection's thread."""

    def __init__(self, host: ModelHost, socket_path: Path) -> None:
        self._host = host
        self.socket_path = socket_path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._acceptor = threading.Thread(
            target=self._accept_forever, name="infer-fast-accept", daemon=True
        )

    def start(self) -> None:
        """Bind (mode 0660) and start accepting."""
        self._listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, SOCKET_MODE)
        self._listener.listen(MAX_FAST_CONNECTIONS)
        self._acceptor.start()

    def stop(self, grace: float | None) -> None:
        """Stop accepting; let each connection finish the request it is
        running (for up to `grace` seconds; None: none), then end them all."""
        self._stopping = True
        with contextlib.suppress(OSError):
            # Wakes the acceptor's accept(); close alone would not.
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join()
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            # Idle connections read end-of-file and end; one running a
            # request still sends its answer, then reads end-of-file.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD if grace else socket.SHUT_RDWR)
        until = time.monotonic() + (grace or 0.0)
        for conn, thread in connections.items():
            thread.join(max(0.0, until - time.monotonic()))
            if thread.is_alive():
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self.socket_path.unlink(missing_ok=True)

    def _accept_forever(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # the listener was shut down
            with self._lock:
                refuse = self._stopping or len(self._connections) >= MAX_FAST_CONNECTIONS
                if not refuse:
                    thread = threading.Thread(
                        target=self._serve, args=(conn,), name="infer-fast", daemon=True
                    )
                    self._connections[conn] = thread
            if refuse:
                self._refuse(conn)
                continue
            thread.start()

    def _refuse(self, conn: socket.socket) -> None:
        reply = inference_pb2.FramedResponse()
        reply.error.code = code_number(grpc.StatusCode.RESOURCE_EXHAUSTED)
        reply.error.message = (
            f"the agent has {MAX_FAST_CONNECTIONS} fast-path connections open; "
            "close idle ones or share them"
        )
        with contextlib.suppress(OSError):
            send_frame(conn, reply.SerializeToString())
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                header = reader.read(FRAME_HEADER.size)
                if len(header) < FRAME_HEADER.size:
                    return  # the client closed (or the server is stopping)
                (size,) = FRAME_HEADER.unpack(header)
                if size > MAX_MESSAGE_BYTES:
                    reply = inference_pb2.FramedResponse()
                    reply.error.code = code_number(grpc.StatusCode.RESOURCE_EXHAUSTED)
                    reply.error.message = f"frame of {size} bytes; the limit is {MAX_MESSAGE_BYTES}"
                    send_frame(conn, reply.SerializeToString())
                    return  # the rest of that frame cannot be skipped safely
                body = reader.read(size)
                if len(body) < size:
                    return
                send_frame(conn, self.handle(body).SerializeToString())
        except OSError:
            return  # the client went away mid-frame, or the server stopped
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            reader.close()
            conn.close()

    def handle(self, body: bytes) -> inference_pb2.FramedResponse:
        """The answer to one serialized FramedRequest."""
        reply = inference_pb2.FramedResponse()
        try:
            request = inference_pb2.FramedRequest.FromString(body)
        except DecodeError as exc:
            reply.error.code = code_number(grpc.StatusCode.INVALID_ARGUMENT)
            reply.error.message = f"not a FramedRequest: {exc}"
            return reply
        timeout_s = request.timeout_us / 1e6 if request.timeout_us else None
        try:
            call = request.WhichOneof("call")
            if call == "predict":
                predict_into(self._host, request.predict, reply.predict, timeout_s)
            elif call == "metadata":
                metadata_into(self._host, request.metadata.model_name, reply.metadata)
            else:
                raise InvalidInput("empty FramedRequest: set predict or metadata")
        except ServingError as exc:
            # Setting the error clears a half-filled answer (one oneof).
            reply.error.code = code_number(status_of(exc))
            reply.error.message = exc.message
        except Exception:
            log.exception("fast-path inference request failed")
            reply.error.code = code_number(grpc.StatusCode.INTERNAL)
            reply.error.message = "internal error; see the agent log"
        return reply


# ---------------------------------------------------------------- assembly


@dataclass
class InferenceServer:
    """The running API: the gRPC server and, unless turned off, the fast path."""

    server: grpc.Server
    socket_path: Path
    # The loopback port, when one was asked for; else None.
    port: int | None
    fast_path: FramedServer | None

    @property
    def unix_target(self) -> str:
        """The gRPC target of the unix socket (for grpc channels)."""
        return f"unix:{self.socket_path}"

    @property
    def fast_socket_path(self) -> Path | None:
        """The fast path's socket, or None when it is not served."""
        return self.fast_path.socket_path if self.fast_path else None

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop both; requests under way get `grace` seconds to finish."""
        stopped = self.server.stop(grace)
        if self.fast_path is not None:
            await asyncio.to_thread(self.fast_path.stop, grace)
        await asyncio.to_thread(stopped.wait)
        self.socket_path.unlink(missing_ok=True)


# sockaddr_un.sun_path holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107


def _fresh_socket_path(state_dir: Path, name: str) -> Path:
    socket_path = state_dir.absolute() / name
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise StateError(
            f"{socket_path}: too long for a unix socket ({len(os.fsencode(socket_path))} "
            f"bytes, at most {MAX_SOCKET_PATH}); use a shorter state_dir"
        )
    # A socket left by a killed agent would make the bind fail.
    socket_path.unlink(missing_ok=True)
    return socket_path


async def start_inference_server(
    host: ModelHost, state_dir: Path, *, listen: str | None = None, fast_path: bool = True
) -> InferenceServer:
    """Serve `host` over gRPC on `<state_dir>/inference.sock` and, when
    `listen` is given ("127.0.0.1:0" picks a port), on that loopback
    address; and, unless `fast_path` is False, the framed fast path on
    `<state_dir>/predict.sock`. gRPC runs requests on `host.workers`
    threads; the fast path on one thread per connection (the host caps how
    many run inference at once either way)."""
    socket_path = _fresh_socket_path(state_dir, SOCKET_NAME)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=host.workers, thread_name_prefix="infer-grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(host), server)
    server.add_insecure_port(f"unix:{socket_path}")
    port = None
    if listen is not None:
        port = server.add_insecure_port(listen)
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
    server.start()
    os.chmod(socket_path, SOCKET_MODE)
    framed = None
    if fast_path:
        framed = FramedServer(host, _fresh_socket_path(state_dir, FAST_SOCKET_NAME))
        try:
            framed.start()
        except OSError:
            server.stop(None)
            raise
    return InferenceServer(server, socket_path, port, framed)
