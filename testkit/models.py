"""Models for tests and pushing them to a control plane: small ONNX models
built here, the parts of a push, the PushModel request stream (grpc.aio,
with declarations that may lie), a whole push over a blocking stub, and
waiting for the builds a push queued."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.v1 import operator_pb2 as o

# Bytes per PushModelChunk: the async stream's, and the blocking push's.
CHUNK = 256 * 1024
BLOCKING_CHUNK = 1 << 20
TERMINAL_BUILD_STATES = (o.BUILD_STATE_SUCCEEDED, o.BUILD_STATE_FAILED, o.BUILD_STATE_CANCELLED)
# A push's files by part kind (o.MODEL_PART_*).
Parts = dict["o.ModelPart.ValueType", bytes]


def model_parts(**files: Path | bytes) -> Parts:
    """model=, sample_data=, labels=: a file or its bytes, by part kind."""
    kinds = {"model": o.MODEL_PART_MODEL, "sample_data": o.MODEL_PART_SAMPLE_DATA,
             "labels": o.MODEL_PART_LABELS}  # fmt: skip
    return {kinds[k]: (v if isinstance(v, bytes) else v.read_bytes()) for k, v in files.items()}


def _header(
    name: str, version: str, parts: Parts, declared: dict[o.ModelPart.ValueType, int]
) -> o.PushModelHeader:
    return o.PushModelHeader(
        model_name=name,
        version=version,
        parts=[
            o.PartDeclaration(
                part=part,
                size_bytes=declared.get(part, len(data)),
                sha256=hashlib.sha256(data).hexdigest(),
            )
            for part, data in parts.items()
        ],
    )


def _chunks(parts: Parts, size: int) -> Iterator[o.PushModelRequest]:
    for part, data in parts.items():
        for start in range(0, len(data), size):
            yield o.PushModelRequest(
                chunk=o.PushModelChunk(part=part, data=data[start : start + size])
            )


async def push_requests(
    name: str,
    version: str,
    parts: Parts,
    *,
    declared: dict[o.ModelPart.ValueType, int] | None = None,
    send: Parts | None = None,
) -> AsyncIterator[o.PushModelRequest]:
    """PushModel's request stream: the header declaring `parts` (sizes from
    `declared` where given), then the bytes of `send` (default: `parts`)."""
    yield o.PushModelRequest(header=_header(name, version, parts, declared or {}))
    for request in _chunks(send or parts, CHUNK):
        yield request


def push_model(op: Any, name: str, version: str, parts: Parts) -> None:
    """Push `parts` over a blocking OperatorService stub."""

    def requests() -> Iterator[o.PushModelRequest]:
        yield o.PushModelRequest(header=_header(name, version, parts, {}))
        yield from _chunks(parts, BLOCKING_CHUNK)

    op.PushModel(requests())


def wait_builds(op: Any, count: int, timeout: float) -> list[o.Build]:
    """At least `count` builds, every one finished (succeeded or failed)."""
    deadline = time.monotonic() + timeout
    builds: list[o.Build] = []
    while time.monotonic() < deadline:
        builds = list(op.ListBuilds(o.ListBuildsRequest()).builds)
        if len(builds) >= count and all(b.state in TERMINAL_BUILD_STATES for b in builds):
            return builds
        time.sleep(0.5)
    raise AssertionError(f"builds did not finish: {[(b.class_name, b.state) for b in builds]}")


def adder_model(path: Path, constant: float) -> Path:
    """An ONNX model y = x + constant over a [batch, 4] float input: versions
    made with different constants tell apart by their outputs."""
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
