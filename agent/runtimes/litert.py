"""LiteRT (TensorFlow Lite) behind the Runner protocol: what devices of
`tflite` classes serve with, and what the build host measures TFLite
candidates with.

A TFLite artifact is onnx2tf's translation of an ONNX model, and callers keep
speaking ONNX: inputs keyed by the ONNX names, in the ONNX layout and dtype.
The runner bridges three differences:
- layout: onnx2tf makes rank 3-5 tensors channel-last (NCHW -> NHWC), inputs
  and outputs alike. Shapes tell which tensors moved;
- names: onnx2tf keeps input names, but outputs come out as `Identity_1`,
  `output_2` or the ONNX names depending on how the model was exported, and
  TFLite's tensor order is not the ONNX order;
- int8 I/O: full-integer models take and give int8; float inputs are
  quantized with each tensor's own scale and zero point, outputs dequantized.

`inputs` reports what the interpreter really accepts, in ONNX terms: the
ONNX names, dtypes and layout, with the dimensions the artifact fixes filled
in. A build fixes every dynamic dimension but the batch to the class's input
shape or the samples' (controlplane/build/tflite_ladder.py); a dynamic batch
stays dynamic where onnx2tf can keep it (shape_signature -1), and `run`
resizes the interpreter's inputs when a call's batch differs from the one
allocated. Where the batch could not be kept the artifact takes one row. The
ModelHost validates requests against these shapes.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.runtimes import RuntimeUnavailable, TensorInfo
from edgefleet.extras import install_command

# Preferred first: LiteRT is tflite-runtime's successor.
_INTERPRETER_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def load_interpreter_class() -> Any:
    """LiteRT's Interpreter class, else tflite_runtime's; RuntimeUnavailable
    when neither imports."""
    errors = []
    for module in _INTERPRETER_MODULES:
        try:
            return importlib.import_module(module).Interpreter
        except ImportError as exc:
            errors.append(f"{module}: {exc}")
    raise RuntimeUnavailable(
        "no TFLite interpreter: TFLite models need the 'litert' extra, "
        f"{install_command('litert')}, or where ai-edge-litert has no wheel (32-bit ARM) "
        f"the 'tflite-runtime' one, {install_command('tflite-runtime')} ({'; '.join(errors)})"
    )


# ------------------------------------------------------------------ layout


def channel_last_perm(rank: int) -> tuple[int, ...]:
    """(0, 2, 3, 1) for rank 4: the axes of an NCHW array in NHWC order."""
    return (0, *range(2, rank), 1)


def channel_first_perm(rank: int) -> tuple[int, ...]:
    """The inverse of channel_last_perm: (0, 3, 1, 2) for rank 4."""
    return (0, rank - 1, *range(1, rank - 1))


def _fits(shape: Sequence[int], want: Sequence[int]) -> bool:
    """`shape` matches `want`, where -1 in either is any size."""
    return len(shape) == len(want) and all(
        a == b or a < 0 or b < 0 for a, b in zip(shape, want, strict=True)
    )


def layout_perm(onnx_shape: Sequence[int], tflite_shape: Sequence[int]) -> tuple[int, ...] | None:
    """The transpose taking an ONNX-layout array to the TFLite tensor's
    layout: None when the layouts agree, channel_last_perm when onnx2tf
    moved the channels last. When both fit (1x8x8x8) the tensor is taken to
    be channel-last, which is what onnx2tf does with rank 3-5 tensors.
    ValueError when the shapes are unrelated."""
    rank = len(onnx_shape)
    if rank == 0 and len(tflite_shape) == 1 and tflite_shape[0] in (1, -1):
        return None  # a scalar, which onnx2tf makes a tensor of one element
    if 3 <= rank <= 5 and len(tflite_shape) == rank:
        perm = channel_last_perm(rank)
        if _fits([onnx_shape[i] for i in perm], tflite_shape):
            return perm
    if _fits(onnx_shape, tflite_shape):
        return None
    raise ValueError(
        f"TFLite tensor shape {list(tflite_shape)} matches neither the ONNX shape "
        f"{list(onnx_shape)} nor its channel-last form"
    )


# ------------------------------------------------------------------ quantization


def quantize(values: np.ndarray, scale: float, zero_point: int, dtype: np.dtype[Any]) -> np.ndarray:
    """Float -> integer with a tensor's affine params: round(x / scale) + zp,
    saturated to the dtype's range."""
    info = np.iinfo(dtype)
    scaled = np.round(np.asarray(values, dtype=np.float32) / np.float32(scale)) + zero_point
    quantized: np.ndarray = np.clip(scaled, info.min, info.max).astype(dtype)
    return quantized


def dequantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Integer -> float32: (q - zp) * scale."""
    dequantized: np.ndarray = (values.astype(np.float32) - np.float32(zero_point)) * np.float32(
        scale
    )
    return dequantized


# ------------------------------------------------------------------ naming


@dataclass(frozen=True)
class TfliteTensor:
    """A model input or output as the interpreter shows it."""

    index: int  # interpreter tensor index
    name: str  # signature key when the model has a signature, else the tensor name
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and np.issubdtype(self.dtype, np.integer)


def plain_name(name: str) -> str:
    """`serving_default_x:0` -> `x`: a TFLite tensor name without the
    signature prefix and the output index TensorFlow adds."""
    return re.sub(r":\d+$", "", name.removeprefix("serving_default_"))


def converter_name(name: str) -> str:
    """The name onnx2tf gives an ONNX tensor in TensorFlow (`:` and a
    leading `/` are not allowed there)."""
    return re.sub(r"^/", "wa/", name.replace(":", "__"))


_POSITIONAL = re.compile(r"^(?:output_|Identity_?)(\d*)$")


def _position(name: str) -> int | None:
    """`output_2` / `Identity_2` -> 2, `Identity` -> 0: names TensorFlow
    gives a model's outputs by position."""
    match = _POSITIONAL.match(name)
    if match is None:
        return None
    return int(match.group(1) or 0)


def match_tensors(onnx: Sequence[TensorInfo], tflite: Sequence[TfliteTensor]) -> list[int]:
    """For each ONNX tensor, the position in `tflite` of its counterpart:
    by name first, then by the positional name TensorFlow gave it, then by a
    shape only one remaining tensor has, then in order."""
    if len(onnx) != len(tflite):
        raise ValueError(
            f"the ONNX model has {len(onnx)} tensors here, the TFLite model {len(tflite)}"
        )
    remaining = list(range(len(tflite)))
    chosen: dict[int, int] = {}
    by_name = {plain_name(t.name): i for i, t in enumerate(tflite)}
    for k, spec in enumerate(onnx):
        for candidate in (spec.name, converter_name(spec.name)):
            i = by_name.get(candidate)
            if i is not None and i in remaining:
                chosen[k] = i
                remaining.remove(i)
                break
    positions = {i: _position(plain_name(tflite[i].name)) for i in remaining}
    if all(p is not None for p in positions.values()) and len(set(positions.values())) == len(
        positions
    ):
        # Positional names count over all outputs, so they index the ONNX list.
        for i, position in positions.items():
            if position is not None and position < len(onnx) and position not in chosen:
                chosen[position] = i
                remaining.remove(i)

    def compatible(spec: TensorInfo, tensor: TfliteTensor) -> bool:
        try:
            layout_perm(spec.shape, tensor.shape)
        except ValueError:
            return False
        return True

    for k, spec in enumerate(onnx):
        if k in chosen:
            continue
        fits = [i for i in remaining if compatible(spec, tflite[i])]
        if len(fits) == 1:
            chosen[k] = fits[0]
            remaining.remove(fits[0])
    for k in range(len(onnx)):
        if k not in chosen:
            chosen[k] = remaining.pop(0)
    return [chosen[k] for k in range(len(onnx))]


# ------------------------------------------------------------------ runner


def _tensors(details: Sequence[Mapping[str, Any]], names: Mapping[int, str]) -> list[TfliteTensor]:
    out = []
    for d in details:
        scale, zero_point = d.get("quantization", (0.0, 0))
        out.append(
            TfliteTensor(
                index=int(d["index"]),
                name=names.get(int(d["index"]), str(d["name"])),
                dtype=np.dtype(d["dtype"]),
                shape=tuple(int(x) for x in d.get("shape_signature", d["shape"])),
                scale=float(scale),
                zero_point=int(zero_point),
            )
        )
    return out


def _signature_names(interpreter: Any) -> dict[int, str]:
    """Tensor index -> its key in the model's signature (`x`, `output_0`,
    or the ONNX output names): steadier names than the tensors' own
    (`PartitionedCall:1`). Empty when the model has no single signature."""
    try:
        signatures = interpreter.get_signature_list()
        if len(signatures) != 1:
            return {}
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        details = {**runner.get_input_details(), **runner.get_output_details()}
    except (AttributeError, ValueError, KeyError):
        return {}
    return {int(detail["index"]): key for key, detail in details.items()}


class LiteRtRunner:
    """A .tflite model in a LiteRT interpreter, served in ONNX terms."""

    def __init__(
        self,
        path: Path,
        threads: int = 1,
        *,
        onnx_inputs: Sequence[TensorInfo] | None = None,
        onnx_outputs: Sequence[TensorInfo] | None = None,
    ) -> None:
        interpreter_class = load_interpreter_class()
        try:
            self._interpreter = interpreter_class(model_path=str(path), num_threads=max(1, threads))
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise RuntimeError(f"LiteRT cannot load {path.name}: {exc}") from exc
        names = _signature_names(self._interpreter)
        tfl_inputs = _tensors(self._interpreter.get_input_details(), names)
        tfl_outputs = _tensors(self._interpreter.get_output_details(), names)
        # The ONNX model's inputs: names to match and layouts to bridge.
        self._onnx_inputs = (
            tuple(onnx_inputs) if onnx_inputs else tuple(_info(t) for t in tfl_inputs)
        )
        self._outputs = (
            tuple(onnx_outputs) if onnx_outputs else tuple(_info(t) for t in tfl_outputs)
        )
        self._in = [tfl_inputs[i] for i in match_tensors(self._onnx_inputs, tfl_inputs)]
        self._out = [tfl_outputs[i] for i in match_tensors(self._outputs, tfl_outputs)]
        self._in_perm = [
            layout_perm(spec.shape, t.shape)
            for spec, t in zip(self._onnx_inputs, self._in, strict=True)
        ]
        self._inputs = tuple(
            accepted_shape(spec, t.shape, perm)
            for spec, t, perm in zip(self._onnx_inputs, self._in, self._in_perm, strict=True)
        )
        self._out_perm = [
            layout_perm(spec.shape, t.shape)
            for spec, t in zip(self._outputs, self._out, strict=True)
        ]
        # The shapes allocated now; a dynamic input is resized when it changes.
        self._shapes = {
            int(d["index"]): tuple(int(x) for x in d["shape"])
            for d in self._interpreter.get_input_details()
        }

    @property
    def inputs(self) -> Sequence[TensorInfo]:
        """The inputs in ONNX terms, with the shapes the artifact accepts:
        a dimension the ONNX model leaves free (-1) but the TFLite tensor
        fixes (onnx2tf's static batch of 1) has the fixed size."""
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorInfo]:
        return self._outputs

    @property
    def int8_io(self) -> bool:
        """Whether the model takes quantized inputs (a full-integer model)."""
        return any(t.quantized for t in self._in)

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        missing = [spec.name for spec in self._onnx_inputs if spec.name not in inputs]
        if missing:
            raise ValueError(
                f"missing inputs {missing}; the model takes {[s.name for s in self._onnx_inputs]}"
            )
        for spec, tensor, perm in zip(self._onnx_inputs, self._in, self._in_perm, strict=True):
            array = np.asarray(inputs[spec.name])
            if not spec.shape and array.ndim == 0 and len(tensor.shape) == 1:
                array = array.reshape(1)  # ONNX's scalar, TFLite's one element
            if perm is not None:
                array = array.transpose(perm)
            if tensor.quantized and not np.issubdtype(array.dtype, np.integer):
                array = quantize(array, tensor.scale, tensor.zero_point, tensor.dtype)
            else:
                array = array.astype(tensor.dtype, copy=False)
            self._set(tensor, np.ascontiguousarray(array))
        self._interpreter.invoke()
        results = []
        for spec, tensor, perm in zip(self._outputs, self._out, self._out_perm, strict=True):
            value = self._interpreter.get_tensor(tensor.index)
            if tensor.quantized:
                value = dequantize(value, tensor.scale, tensor.zero_point)
            if perm is not None:
                value = value.transpose(channel_first_perm(value.ndim))
            if not spec.shape and value.shape == (1,):
                value = value.reshape(())
            results.append(np.ascontiguousarray(value))
        return results

    def _set(self, tensor: TfliteTensor, array: np.ndarray) -> None:
        if array.shape != self._shapes[tensor.index]:
            # Only dims the model leaves dynamic (-1) may change; strict
            # resizing refuses the others.
            try:
                self._interpreter.resize_tensor_input(tensor.index, list(array.shape), strict=True)
            except (RuntimeError, ValueError) as exc:
                raise ValueError(
                    f"input {tensor.name!r}: shape {list(array.shape)} (TFLite layout), the "
                    f"artifact takes {list(tensor.shape)} (-1: any size): {exc}"
                ) from None
            self._interpreter.allocate_tensors()
            self._shapes[tensor.index] = array.shape
        self._interpreter.set_tensor(tensor.index, array)


def accepted_shape(
    onnx: TensorInfo, tflite_shape: Sequence[int], perm: tuple[int, ...] | None
) -> TensorInfo:
    """`onnx` with each dimension it leaves free (-1) set to the TFLite
    tensor's size for it, where that is fixed. `perm` is the tensor's
    layout_perm: the TFLite tensor's axis i is the ONNX axis perm[i]."""
    if not onnx.shape:
        return onnx  # a scalar (one element in TFLite)
    in_onnx_layout = list(tflite_shape)
    if perm is not None:
        for axis, onnx_axis in enumerate(perm):
            in_onnx_layout[onnx_axis] = tflite_shape[axis]
    shape = tuple(
        fixed if want < 0 and fixed >= 0 else want
        for want, fixed in zip(onnx.shape, in_onnx_layout, strict=True)
    )
    return TensorInfo(onnx.name, onnx.dtype, shape)


def _info(tensor: TfliteTensor) -> TensorInfo:
    return TensorInfo(plain_name(tensor.name), tensor.dtype.name, tensor.shape)
