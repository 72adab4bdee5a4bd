"""A small client for the agent's framed fast path, for Python apps on the
device: one connection, calls one at a time, blocking.

    with InferenceClient("/var/lib/edgefleet-agent/predict.sock") as client:
        result = client.predict("digits", {"input": x}, timeout_s=0.05)
        probabilities = result.outputs["probabilities"]

Errors raise InferenceError with the same status code the gRPC API gives
(NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT, DEADLINE_EXCEEDED, ...).
The framing is documented in proto/edgefleet/v1/inference.proto; other
languages speak it with their own protobuf library and a few lines of socket
code.

A client is not thread-safe: give each thread its own (connections are
cheap, and each one is served by its own thread in the agent)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path

import grpc
import numpy as np

from edgefleet.v1 import common_pb2, inference_pb2

DEFAULT_SOCKET = Path("/var/lib/edgefleet-agent/predict.sock")
_HEADER = struct.Struct("<I")
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class InferenceError(Exception):
    """A request the agent (or the connection to it) failed."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Result:
    """A Predict's answer: the version that ran it and its outputs by name,
    in the model's output order."""

    model_version: str
    outputs: dict[str, np.ndarray]
    # Which artifact of the version served it (ArtifactVariant: primary, or
    # the lighter fallback the power/thermal policy switched to).
    variant: int = common_pb2.ARTIFACT_VARIANT_UNSPECIFIED


def tensor_message(name: str, array: np.ndarray) -> common_pb2.TensorData:
    """`array` as a TensorData (row-major, little-endian)."""
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return common_pb2.TensorData(
        name=name, dtype=array.dtype.name, shape=list(array.shape), data=little.tobytes()
    )


def tensor_array(tensor: common_pb2.TensorData) -> np.ndarray:
    """A TensorData as a numpy array (read-only: it shares the message's bytes)."""
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))


class InferenceClient:
    """One connection to the fast path, opened on first use."""

    def __init__(self, socket_path: str | Path = DEFAULT_SOCKET) -> None:
        self.socket_path = Path(socket_path)
        self._sock: socket.socket | None = None
        self._reader: BufferedReader | None = None

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; the next call opens a new one."""
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None

    # ------------------------------------------------------------ calls

    def predict(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        timeout_s: float | None = None,
    ) -> Result:
        """Run the active version of `model` on `inputs` (keyed by the
        model's input names). `timeout_s` is the deadline (None: none)."""
        request = inference_pb2.PredictRequest(
            model_name=model, inputs=[tensor_message(k, v) for k, v in inputs.items()]
        )
        response = self.predict_message(request, timeout_s=timeout_s)
        return Result(
            response.model_version,
            {t.name: tensor_array(t) for t in response.outputs},
            response.variant,
        )

    def predict_message(
        self, request: inference_pb2.PredictRequest, *, timeout_s: float | None = None
    ) -> inference_pb2.PredictResponse:
        """Predict with ready-made messages (no numpy conversion), for
        callers that reuse one request."""
        envelope = inference_pb2.FramedRequest(predict=request)
        return self.call(envelope, timeout_s=timeout_s).predict

    def metadata(
        self, model: str, *, timeout_s: float | None = None
    ) -> inference_pb2.ModelMetadata:
        """The active version of `model` and its input/output spec."""
        envelope = inference_pb2.FramedRequest(
            metadata=inference_pb2.GetModelMetadataRequest(model_name=model)
        )
        return self.call(envelope, timeout_s=timeout_s).metadata

    def call(
        self, request: inference_pb2.FramedRequest, *, timeout_s: float | None = None
    ) -> inference_pb2.FramedResponse:
        """Send one FramedRequest (its timeout_us set from `timeout_s`) and
        read its answer; InferenceError unless it succeeded. Past `timeout_s`
        the connection is dropped (a late answer would be read as the next
        call's) and DEADLINE_EXCEEDED raised."""
        if timeout_s is not None and timeout_s <= 0:
            raise InferenceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline already passed")
        # At least 1 us: 0 on the wire means no deadline.
        request.timeout_us = 0 if timeout_s is None else max(1, int(timeout_s * 1e6))
        body = request.SerializeToString()
        sock, reader = self._connect()
        try:
            sock.settimeout(timeout_s)
            sock.sendall(_HEADER.pack(len(body)) + body)
            header = reader.read(_HEADER.size)
            if len(header) == _HEADER.size:
                (size,) = _HEADER.unpack(header)
                payload = reader.read(size)
                if len(payload) == size:
                    reply = inference_pb2.FramedResponse.FromString(payload)
                    if reply.WhichOneof("result") == "error":
                        self._raise(reply.error)
                    return reply
        except TimeoutError:
            self.close()
            raise InferenceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout_s:.3f} s"
            ) from None
        except OSError as exc:
            self.close()
            raise InferenceError(
                grpc.StatusCode.UNAVAILABLE, f"connection to {self.socket_path} failed: {exc}"
            ) from exc
        self.close()
        raise InferenceError(
            grpc.StatusCode.UNAVAILABLE, f"{self.socket_path}: the agent closed the connection"
        )

    # ------------------------------------------------------------ helpers

    def _connect(self) -> tuple[socket.socket, BufferedReader]:
        if self._sock is None or self._reader is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.socket_path))
            except OSError as exc:
                sock.close()
                raise InferenceError(
                    grpc.StatusCode.UNAVAILABLE, f"cannot connect to {self.socket_path}: {exc}"
                ) from exc
            self._sock, self._reader = sock, sock.makefile("rb")
        return self._sock, self._reader

    def _raise(self, error: inference_pb2.FramedError) -> None:
        code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # The agent closes the connection after this one.
            self.close()
        raise InferenceError(code, error.message)
