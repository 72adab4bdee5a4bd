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
from edgefleet.controlplane.domain import sample_archive, sample_shapes
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
    # Steps per sequence, for a model with state pushed with sequences
    # (num_samples counts every step).
    steps: int = 1


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


def state_pairs(
    model: ModelInfo, declared: Sequence[fidelity.OutputSpec] = ()
) -> tuple[tuple[str, str], ...]:
    """The model's state: (output, input) pairs of an output fed back into
    an input at the next step (silero-vad's stateN -> state, a GRU's
    hn -> h0), as edgefleet.fidelity resolves output kinds: declared, or
    inferred from names and shapes."""
    return fidelity.state_pairs(output_specs(model, declared))


def sample_specs(inputs: Sequence[TensorInfo]) -> list[sample_shapes.Spec]:
    return [sample_shapes.Spec(t.name, t.dtype, t.shape) for t in inputs]


def inspect_sample_data(
    path: Path,
    model: ModelInfo,
    *,
    state: Sequence[tuple[str, str]] | None = None,
    classes: int | None = None,
) -> SampleInfo:
    """Check an .npz holds an array per model input shaped by the rules of
    sample_shapes (docs/operators/models.md#sample-data: samples replacing
    the batch axis, samples on a new axis 0, one constant, or sequences of
    steps for a model with state), plus optional `labels` with one entry per
    sample; or that a plain .npy fits a model's only input. `state`: the
    model's (output, input) state pairs; None: `state_pairs(model)`.
    `classes`: how many classes the labels index (the first class-scores
    output's last axis), where the model fixes it. Checks
    the arrays' headers first, then streams their data through with bounded
    memory (sample_archive); no array is loaded."""
    headers_in_file = sample_archive.read_headers(path)
    headers = sample_archive.by_input_name(headers_in_file, [t.name for t in model.inputs])
    pairs = state_pairs(model) if state is None else tuple(state)
    plan = sample_shapes.plan(
        sample_specs(model.inputs),
        {name: (h.shape, h.dtype) for name, h in headers.items()},
        pairs,
    )
    # Only now read the data: a truncated or corrupted member is refused at
    # push time, not when a build loads it.
    is_npy = set(headers_in_file) == {sample_archive.SINGLE_ARRAY}
    ranges: dict[str, tuple[int, int]] = {"labels": (2**63, -(2**63))}
    sample_archive.verify(path, single_name=model.inputs[0].name if is_npy else "", ranges=ranges)
    if plan.has_labels:
        _check_labels(headers_in_file["labels"], ranges["labels"], classes)
    return SampleInfo(
        num_samples=plan.num_samples,
        has_labels=plan.has_labels,
        is_npy=is_npy,
        steps=plan.steps,
    )


def _check_labels(
    header: sample_archive.ArrayHeader, seen: tuple[int, int], classes: int | None
) -> None:
    """`labels` hold class indices: integers, at least 0, below the class
    count where the model fixes it. Anything else measured an accuracy of
    nothing (a 0% that every candidate shared, so every one passed)."""
    if header.dtype.kind not in "iu":
        raise InvalidArgument(
            f"sample data array 'labels' is {header.dtype}: labels are class indices, "
            "integers from 0 (write them with .astype(np.int64))"
        )
    low, high = seen
    if low > high:
        return  # no labels at all: the count check refuses that
    if low < 0:
        raise InvalidArgument(f"sample data 'labels' hold {low}: class indices start at 0")
    if classes is not None and high >= classes:
        raise InvalidArgument(
            f"sample data 'labels' hold {high}, but the model scores {classes} classes "
            f"(0-{classes - 1})"
        )


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


def label_classes(info: ModelInfo, specs: Sequence[OutputSpec]) -> int | None:
    """How many classes sample labels index: the last axis of the first
    class-scores output, where the model fixes it (and it is above 1)."""
    shapes = {t.name: t.shape for t in info.outputs}
    for spec in specs:
        if spec.kind is fidelity.OutputKind.CLASS_SCORES:
            shape = shapes.get(spec.name, ())
            return shape[-1] if shape and shape[-1] > 1 else None
    return None
