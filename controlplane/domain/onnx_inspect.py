"""Reading what a pushed model is: checking an ONNX file, its input/output spec,
and whether sample data and labels fit it. Pure functions over files."""

# ruff: noqa: E402 - the extra is checked before the imports it installs
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.extras import require

# The CLI's client commands import the domain's pure modules; this one alone
# reads ONNX graphs, which the server extra installs.
require("server", "onnx", part=__name__)

import onnx
from onnx import helper

from edgefleet import fidelity
from edgefleet.controlplane.domain import sample_archive
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.fidelity import OutputSpec


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]  # -1 for dynamic
    dim_names: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "dim_names": list(self.dim_names),
        }


@dataclass(frozen=True)
class ModelInfo:
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    opset: int
    producer: str


@dataclass(frozen=True)
class SampleInfo:
    num_samples: int
    has_labels: bool
    # A plain .npy (the only input's samples) rather than an .npz.
    is_npy: bool = False


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise InvalidArgument(f"model input/output {value.name!r} is not a tensor")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
    shape: list[int] = []
    names: list[str] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
            names.append("")
        else:
            shape.append(-1)
            names.append(dim.dim_param)
    return TensorInfo(value.name, dtype, tuple(shape), tuple(names))


def _without_paths(message: str, path: Path) -> str:
    """onnx names the file it read ("Unable to parse proto from file:
    /data/blobs/tmp/upload-…/model") and resolves external data beside it:
    the client learns what is wrong, not where the server keeps uploads."""
    for shown in {path, path.resolve()}:
        message = message.replace(str(shown), "the uploaded model")
        message = message.replace(f"{shown.parent}{os.sep}", "")
        message = message.replace(str(shown.parent), "the upload")
    return message


def inspect_model(path: Path) -> ModelInfo:
    """Check the model with onnx.checker and read its spec. Raises
    InvalidArgument with the checker's message when the file is not valid ONNX."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several unrelated types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = _without_paths(first_line, path)
        raise InvalidArgument(f"not a valid ONNX model: {reason}") from exc
    initializers = {init.name for init in model.graph.initializer}
    inputs = tuple(_tensor_info(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_tensor_info(v) for v in model.graph.output)
    if not inputs or not outputs:
        raise InvalidArgument("model has no graph inputs or no outputs")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    producer = f"{model.producer_name} {model.producer_version}".strip()
    return ModelInfo(inputs, outputs, opset, producer)


def inspect_sample_data(path: Path, model: ModelInfo) -> SampleInfo:
    """Check an .npz holds one array per model input, shaped like that input
    with a leading sample axis matching the model's batch dim, plus optional
    `labels` with one entry per sample; or that a plain .npy fits a model's
    only input. Checks the arrays' headers first, then streams their data
    through with bounded memory (sample_archive); no array is loaded."""
    headers_in_file = sample_archive.read_headers(path)
    headers = sample_archive.by_input_name(headers_in_file, [t.name for t in model.inputs])
    expected = {t.name for t in model.inputs}
    missing = sorted(expected - headers.keys())
    if missing:
        raise InvalidArgument(
            f"sample data lacks arrays for model inputs {missing}; "
            f"it has {sorted(headers)} (name each array after a model input)"
        )
    extra = sorted(headers.keys() - expected - {"labels"})
    if extra:
        raise InvalidArgument(
            f"sample data has arrays {extra} that are not model inputs "
            f"({sorted(expected)}) or 'labels'"
        )
    counts: set[int] = set()
    for spec in model.inputs:
        header = headers[spec.name]
        if len(header.shape) != len(spec.shape):
            raise InvalidArgument(
                f"sample data {spec.name!r} has shape {list(header.shape)} but the model "
                f"input is {list(spec.shape)} (rank {len(spec.shape)})"
            )
        for axis, (got, want) in enumerate(zip(header.shape, spec.shape, strict=True)):
            if want != -1 and got != want and not (axis == 0 and want == 1):
                raise InvalidArgument(
                    f"sample data {spec.name!r} has shape {list(header.shape)}; the model "
                    f"input is {list(spec.shape)} (axis {axis}: {got} != {want})"
                )
        if header.dtype.name != spec.dtype:
            raise InvalidArgument(
                f"sample data {spec.name!r} is {header.dtype.name}; the model input is {spec.dtype}"
            )
        counts.add(int(header.shape[0]) if header.shape else 1)
    if len(counts) != 1:
        raise InvalidArgument(f"sample data inputs disagree on the sample count: {sorted(counts)}")
    (count,) = counts
    if count == 0:
        raise InvalidArgument("sample data holds no samples")
    labels = headers.get("labels")
    if labels is not None and (not labels.shape or labels.shape[0] != count):
        raise InvalidArgument(
            f"sample data 'labels' has shape {list(labels.shape)}; expected {count} entries, "
            "one per sample"
        )
    # Only now read the data: a truncated or corrupted member is refused at
    # push time, not when a build loads it.
    sample_archive.verify(path)
    is_npy = set(headers_in_file) == {sample_archive.SINGLE_ARRAY}
    return SampleInfo(num_samples=count, has_labels=labels is not None, is_npy=is_npy)


def count_labels(path: Path) -> int:
    """Number of non-empty lines in a UTF-8 labels file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"labels file is not UTF-8 text: {exc}") from exc
    labels = [line for line in text.splitlines() if line.strip()]
    if not labels:
        raise InvalidArgument("labels file is empty; write one class label per line")
    return len(labels)


def output_specs(info: ModelInfo, declared: Sequence[OutputSpec]) -> list[OutputSpec]:
    """Every output's kind, in the model's order: the declared ones checked
    against the model, the rest inferred from their shapes and names
    (edgefleet.fidelity.resolve). Raises InvalidArgument naming the output."""
    try:
        return fidelity.resolve(
            [fidelity.Tensor(t.name, tuple(t.shape)) for t in info.outputs],
            [fidelity.Tensor(t.name, tuple(t.shape)) for t in info.inputs],
            declared,
        )
    except fidelity.SpecError as exc:
        raise InvalidArgument(str(exc)) from exc
