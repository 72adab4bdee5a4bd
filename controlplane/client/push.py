"""The client side of OperatorService.PushModel: a header declaring every part
(size and sha256), then each part in 1 MiB chunks, with progress told to a
callback (the CLI draws a bar with it, the TUI a progress widget)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgefleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc

CHUNK_SIZE = 1024 * 1024


@dataclass(frozen=True)
class PartFile:
    """One file to upload and what the header declares about it."""

    part: operator_pb2.ModelPart.ValueType
    path: Path
    size_bytes: int
    sha256: str

    def declaration(self) -> operator_pb2.PartDeclaration:
        return operator_pb2.PartDeclaration(
            part=self.part, size_bytes=self.size_bytes, sha256=self.sha256
        )


def describe_part(
    part: operator_pb2.ModelPart.ValueType, path: Path, *, chunk_size: int = CHUNK_SIZE
) -> PartFile:
    """Size and sha256 of a part's file (read once, in chunks)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
            size += len(block)
    return PartFile(part=part, path=path, size_bytes=size, sha256=digest.hexdigest())


def model_parts(
    model: Path, *, sample_data: Path | None = None, labels: Path | None = None
) -> list[PartFile]:
    """The parts of a model version, described: the model, then the sample
    data and the labels where given. OSError (with the file name) for a file
    that cannot be read."""
    files = [
        (operator_pb2.MODEL_PART_MODEL, model),
        (operator_pb2.MODEL_PART_SAMPLE_DATA, sample_data),
        (operator_pb2.MODEL_PART_LABELS, labels),
    ]
    return [describe_part(part, path) for part, path in files if path is not None]


def push_requests(
    header: operator_pb2.PushModelHeader,
    parts: Sequence[PartFile],
    *,
    chunk_size: int = CHUNK_SIZE,
    on_chunk: Callable[[int], None] | None = None,
) -> Iterator[operator_pb2.PushModelRequest]:
    """The request stream: `header` with every part declared, then each part's
    chunks. `on_chunk(n)` is told the size of each chunk as it is handed to
    gRPC (from gRPC's sending thread)."""
    full = operator_pb2.PushModelHeader()
    full.CopyFrom(header)
    del full.parts[:]
    full.parts.extend(p.declaration() for p in parts)
    yield operator_pb2.PushModelRequest(header=full)
    for p in parts:
        with p.path.open("rb") as f:
            while block := f.read(chunk_size):
                yield operator_pb2.PushModelRequest(
                    chunk=operator_pb2.PushModelChunk(part=p.part, data=block)
                )
                if on_chunk is not None:
                    on_chunk(len(block))


def push_model(
    stub: operator_pb2_grpc.OperatorServiceStub,
    header: operator_pb2.PushModelHeader,
    parts: Sequence[PartFile],
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> common_pb2.ModelVersion:
    """Upload `parts` as the version `header` names, on a blocking stub (grpc.aio
    can misreport a client stream the server rejects early, grpc/grpc#36066;
    the blocking stack reports the real status). `on_progress(sent, total)`
    is told the bytes handed to gRPC so far after each chunk, from gRPC's
    sending thread."""
    total = sum(p.size_bytes for p in parts)
    sent = 0

    def chunk(n: int) -> None:
        nonlocal sent
        sent += n
        if on_progress is not None:
            on_progress(sent, total)

    pushed: common_pb2.ModelVersion = stub.PushModel(push_requests(header, parts, on_chunk=chunk))
    return pushed
