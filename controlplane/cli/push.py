"""The client side of OperatorService.PushModel: a header declaring every part
(size and sha256), then each part in 1 MiB chunks. No click, no rich: the TUI
can reuse it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgefleet.v1 import operator_pb2

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
