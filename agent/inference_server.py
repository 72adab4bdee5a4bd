"""The on-device inference API (edgefleet.v1.InferenceService) over gRPC, on
a unix socket in the state directory (mode 0660, so apps in the agent's
group may call it) and optionally on a loopback port.

Thin: each RPC turns the request into arrays, calls the ModelHost and turns
the result back into a message. ServingErrors become status codes in one
place (`_status_of`, applied by `_mapped`); methods never abort themselves.
The deadline of a Predict is the call's gRPC deadline."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from agent.runtimes import TensorInfo
from agent.serving import (
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
SOCKET_MODE = 0o660
# Camera frames and batches are bigger than gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_STATUS_OF: dict[type[ServingError], grpc.StatusCode] = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    NoActiveModel: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    InferenceFailed: grpc.StatusCode.INTERNAL,
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]


def _status_of(exc: ServingError) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        code = _STATUS_OF.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def _mapped(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn what `method` raises into its status code."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        try:
            return await method(self, request, context)
        except ServingError as exc:
            await context.abort(_status_of(exc), exc.message)
        except Exception:
            log.exception("inference RPC failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the agent log")
        raise AssertionError("unreachable: abort raises")

    return wrapper


def _spec(tensor: TensorInfo) -> common_pb2.TensorSpec:
    return common_pb2.TensorSpec(name=tensor.name, dtype=tensor.dtype, shape=list(tensor.shape))


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, host: ModelHost) -> None:
        self._host = host

    @_mapped
    async def Predict(
        self, request: inference_pb2.PredictRequest, context: Context
    ) -> inference_pb2.PredictResponse:
        inputs = {}
        for tensor in request.inputs:
            if tensor.name in inputs:
                raise InvalidInput(f"input {tensor.name!r} is given twice")
            inputs[tensor.name] = decode_tensor(
                tensor.name, tensor.dtype, tensor.shape, tensor.data
            )
        prediction = await self._host.predict(
            request.model_name, inputs, timeout_s=context.time_remaining()
        )
        names = [t.name for t in prediction.model.spec.outputs]
        outputs = []
        for index, array in enumerate(prediction.outputs):
            dtype, shape, data = encode_tensor(array)
            name = names[index] if index < len(names) else f"output_{index}"
            outputs.append(common_pb2.TensorData(name=name, dtype=dtype, shape=shape, data=data))
        return inference_pb2.PredictResponse(
            model_name=request.model_name,
            model_version=prediction.model.version,
            outputs=outputs,
        )

    @_mapped
    async def GetModelMetadata(
        self, request: inference_pb2.GetModelMetadataRequest, context: Context
    ) -> inference_pb2.ModelMetadata:
        model = self._host.active(request.model_name)
        return inference_pb2.ModelMetadata(
            model_name=model.name,
            model_version=model.version,
            artifact_digest=model.digest,
            runtime=model.runtime,
            inputs=[_spec(t) for t in model.spec.inputs],
            outputs=[_spec(t) for t in model.spec.outputs],
        )


@dataclass
class InferenceServer:
    server: grpc.aio.Server
    socket_path: Path
    # The loopback port, when one was asked for; else None.
    port: int | None

    @property
    def unix_target(self) -> str:
        return f"unix:{self.socket_path}"

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.server.stop(grace)
        self.socket_path.unlink(missing_ok=True)


def _fresh_socket_path(state_dir: Path) -> Path:
    socket_path = state_dir.absolute() / SOCKET_NAME
    # A socket left by a killed agent would make the bind fail.
    socket_path.unlink(missing_ok=True)
    return socket_path


async def start_inference_server(
    host: ModelHost, state_dir: Path, *, listen: str | None = None
) -> InferenceServer:
    """Serve `host` on `<state_dir>/inference.sock` and, when `listen` is
    given ("127.0.0.1:0" picks a port), on that loopback address."""
    socket_path = _fresh_socket_path(state_dir)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(host), server)
    server.add_insecure_port(f"unix:{socket_path}")
    port = None
    if listen is not None:
        port = server.add_insecure_port(listen)
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
    await server.start()
    os.chmod(socket_path, SOCKET_MODE)
    return InferenceServer(server, socket_path, port)
