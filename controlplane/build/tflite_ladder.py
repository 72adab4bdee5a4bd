"""The TFLite rung of the optimization ladder: fp32, fp16 and int8 models
from one onnx2tf run (controlplane.build.toolchain), for classes whose
runtime is `tflite`; for microcontroller classes, the int8 model also as C
source for TensorFlow Lite Micro.

TFLite runs at the shapes it was converted with: every dynamic input
dimension past the batch is fixed, to the class's input shape or the
samples' size, and a dynamic batch is kept where onnx2tf keeps it and the
result really serves another batch (else the model is converted again at
batch 1). Each candidate records the shapes it accepts and a note saying
what was fixed (docs/operators/builds.md#tflite-input-shapes)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.agent.runtimes import RuntimeUnavailable
from edgefleet.agent.runtimes import TensorInfo as RuntimeTensorInfo
from edgefleet.agent.runtimes.litert import LiteRtRunner
from edgefleet.controlplane.build.c_array import to_c_array
from edgefleet.controlplane.build.samples import Samples
from edgefleet.controlplane.build.shapes import fit_array
from edgefleet.controlplane.build.toolchain import (
    DEFAULT_CONVERT_TIMEOUT_S,
    ConversionFailed,
    ConvertInput,
    Onnx2TfResult,
    require_tflite,
    run_onnx2tf,
)
from edgefleet.controlplane.build.types import BuildTarget, Candidate, TensorShape
from edgefleet.controlplane.domain.input_shapes import check_against_model, unused
from edgefleet.controlplane.domain.onnx_inspect import TensorInfo, inspect_model

RUNTIME = "tflite"
MEDIA_TYPE = "application/vnd.tflite"
# The C identifier of the model array in the TFLite Micro companion source.
C_ARRAY_NAME = "edgefleet_model"
# Calibration sees at most this many samples: enough for stable activation
# ranges, few enough to keep a build of a big model to minutes.
CALIBRATION_SAMPLES = 100

# Which of onnx2tf's outputs each rung ships.
#
# int8 is `full_integer_quant` (int8 inputs and outputs), not
# `integer_quant` (int8 inside, float32 at the edges). The kernels in between
# are the same; the difference is who quantizes the I/O. TFLite Micro and
# integer-only accelerators (Edge TPU, Ethos-U, Hexagon) need the fully
# integer graph: the float Quantize/Dequantize ops at the edges of
# integer_quant would pull float kernels into the firmware or break the
# delegate. On other devices nothing is lost: LiteRtRunner quantizes inputs
# and dequantizes outputs with the tensors' own scale and zero point (the
# same arithmetic those ops do), so callers still see float. One int8
# artifact then serves every tflite class, MCU or not.
RUNGS: tuple[tuple[str, str, str], ...] = (
    ("tflite-fp32", "fp32", "float32"),
    ("tflite-fp16", "fp16", "float16"),
    ("tflite-int8", "int8", "full_integer_quant"),
)


@dataclass(frozen=True)
class ConversionShapes:
    """The shapes one conversion fixes, and what the build log and the
    candidates' notes say about them."""

    inputs: tuple[ConvertInput, ...]
    # Each input's accepted shape in ONNX terms (-1: any size).
    accepted: tuple[TensorShape, ...]
    notes: tuple[str, ...]

    @property
    def dynamic_batch(self) -> bool:
        return any(i.shape and i.shape[0] < 0 for i in self.inputs)


def conversion_shapes(
    inputs: Sequence[TensorInfo],
    samples: Samples,
    target: BuildTarget,
    *,
    keep_batch: bool,
    why_fixed: str = "",
) -> ConversionShapes:
    """What each input is converted at: the class's input shape where it
    gives one, else the samples' (batch 1); a batch the model leaves dynamic
    stays dynamic when `keep_batch` (else it is 1, `why_fixed` says why).
    Only inputs with a dynamic dimension get a note."""
    fixed = dict(target.input_shapes)
    converted: list[ConvertInput] = []
    accepted: list[TensorShape] = []
    notes: list[str] = []
    for spec in inputs:
        given = fixed.get(spec.name)
        # An input fed as it is (no batch axis, or samples pushed on an axis
        # of their own) has no batch to keep: its first dim is fixed too.
        as_is = spec.name in samples.as_is
        dims = tuple(given) if given else samples.fed_shape(spec.name)
        # A fixed model dim keeps its size (the class's agrees: checked).
        dims = tuple(size if size >= 0 else d for size, d in zip(spec.shape, dims, strict=True))
        batch_free = bool(spec.shape) and spec.shape[0] < 0 and not as_is
        keep = keep_batch and batch_free
        batch = "batch kept dynamic" if keep else f"batch fixed to 1 ({why_fixed or 'static'})"
        shape = (-1, *dims[1:]) if keep else (1, *dims[1:]) if batch_free else dims
        calibration = samples.arrays[spec.name][:CALIBRATION_SAMPLES]
        per_sample = dims if as_is else dims[1:]
        if calibration.shape[1:] != per_sample:
            # The pipeline fitted the samples already (build.shapes); a
            # direct caller may not have, and int8 calibrates at this shape.
            calibration = fit_array(calibration, per_sample)
        converted.append(ConvertInput(spec.name, shape, calibration))
        accepted.append(
            TensorShape(
                spec.name,
                spec.dtype,
                shape,
                tuple(n if d < 0 else "" for n, d in zip(spec.dim_names, shape, strict=True)),
            )
        )
        if any(d < 0 for d in (spec.shape if as_is else spec.shape[1:])):
            shown = (1, *dims[1:]) if batch_free else dims
            source = "class input shape" if given else "the samples' shape"
            notes.append(
                f"input {spec.name} fixed to [{','.join(str(d) for d in shown)}] "
                f"({source})" + (f", {batch}" if batch_free else "")
            )
        elif batch_free:
            notes.append(f"input {spec.name}: {batch}")
    return ConversionShapes(tuple(converted), tuple(accepted), tuple(notes))


def batch_problem(
    path: Path,
    inputs: Sequence[TensorInfo],
    outputs: Sequence[TensorInfo],
    converted: Sequence[ConvertInput],
    as_is: frozenset[str] = frozenset(),
) -> str:
    """Why the TFLite model at `path` does not serve a batch of 2 as two
    batches of 1 ("" when it does, or when no interpreter is installed here
    to tell): a graph can convert with a dynamic batch and still have a
    batch of 1 baked into a Reshape."""
    try:
        runner = LiteRtRunner(
            path,
            onnx_inputs=[RuntimeTensorInfo(t.name, t.dtype, t.shape) for t in inputs],
            onnx_outputs=[RuntimeTensorInfo(t.name, t.dtype, t.shape) for t in outputs],
        )
    except RuntimeUnavailable:
        return ""
    # One sample as fed (Samples.one): a batch of one, or as it is; only
    # inputs whose batch stayed dynamic take two rows.
    first = {i.name: i.samples[0] if i.name in as_is else i.samples[:1] for i in converted}
    pair = {
        i.name: np.concatenate([first[i.name]] * 2) if i.shape and i.shape[0] < 0 else first[i.name]
        for i in converted
    }
    try:
        one = runner.run(first)
        two = runner.run(pair)
    except (RuntimeError, ValueError) as exc:
        return f"it does not run a batch of 2: {str(exc).splitlines()[0]}"
    for spec, a, b in zip(outputs, one, two, strict=True):
        if not spec.shape or spec.shape[0] >= 0:
            continue  # not batched in the ONNX model either: nothing to compare
        # Loose: kernels may tile a batch of 2 otherwise; a baked-in batch
        # of 1 shows as a wrong row count or a wrong second row, not as 1e-4.
        atol = 1e-4 * (1.0 + float(np.abs(a).max(initial=0.0)))
        if b.shape[:1] != (2,) or not all(
            np.allclose(a[0], b[i], rtol=1e-3, atol=atol) for i in range(2)
        ):
            return f"its output {spec.name!r} on a batch of 2 differs from a batch of 1"
    return ""


class _BatchNotKept(Exception):
    """A conversion with a dynamic batch that does not serve another batch."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _failed(name: str, precision: str, error: str) -> Candidate:
    return Candidate(name, RUNTIME, precision, None, media_type=MEDIA_TYPE, error=error)


def _all_failed(message: str) -> list[Candidate]:
    """Every rung failed for one reason (one conversion makes them all): it
    is said once, on the first, and the others point at it."""
    first = RUNGS[0][0]
    return [
        _failed(
            name, precision, message if name == first else f"the conversion failed (see {first})"
        )
        for name, precision, _ in RUNGS
    ]


def build_candidates(
    model: Path,
    samples: Samples,
    workdir: Path,
    target: BuildTarget,
    log: Callable[[str], None],
    *,
    toolchains_dir: Path | None = None,
    timeout_s: float = DEFAULT_CONVERT_TIMEOUT_S,
) -> list[Candidate]:
    """tflite-fp32, tflite-fp16 and tflite-int8 (calibrated on `samples`) in
    `workdir`. A rung that could not be made comes back with path None and
    the reason. Raises ToolchainMissing when onnx2tf is not installed."""
    toolchain = require_tflite(toolchains_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = inspect_model(model)
    model_inputs = [(t.name, t.shape) for t in info.inputs]
    for name in unused(target.input_shapes, model_inputs):
        log(f"tflite: the class's input shape for {name!r} is not used: no such model input")
    problems = check_against_model(target.input_shapes, model_inputs)
    if problems:
        reason = "the class's input shapes do not fit the model: " + "; ".join(problems)
        log(f"tflite: {reason}")
        return _all_failed(reason)
    not_float = [
        f"{spec.name!r} is {spec.dtype}"
        for spec in info.inputs
        if not np.issubdtype(np.dtype(spec.dtype), np.floating)
    ]
    quantize = not not_float
    count = min(len(samples), CALIBRATION_SAMPLES)
    log(
        f"tflite: converting with onnx2tf {toolchain.onnx2tf_version} "
        f"(TensorFlow {toolchain.tensorflow_version})"
        + (f", int8 calibrated on {count} samples" if quantize else "")
        + (" (generated inputs)" if quantize and samples.generated else "")
    )

    def convert(shapes: ConversionShapes, where: Path) -> Onnx2TfResult:
        # onnx2tf sees only the samples it calibrates with (its self-check
        # images come from the first of them).
        return run_onnx2tf(
            toolchain,
            model,
            where,
            shapes.inputs,
            quantize=quantize,
            calibration_limit=CALIBRATION_SAMPLES,
            timeout_s=timeout_s,
            log=log,
        )

    # A dynamic batch is kept where onnx2tf can keep it (a device may then
    # serve several rows in one call); where it cannot, or the result does
    # not really take another batch, the model is converted again at batch 1.
    # TensorFlow Lite Micro plans every tensor at build time: no resizing.
    shapes = conversion_shapes(
        info.inputs,
        samples,
        target,
        keep_batch=not target.microcontroller,
        why_fixed="TensorFlow Lite Micro takes static shapes only",
    )
    try:
        result = convert(shapes, workdir / "onnx2tf")
        if shapes.dynamic_batch:
            problem = batch_problem(
                result.files["float32"], info.inputs, info.outputs, shapes.inputs, samples.as_is
            )
            if problem:
                raise _BatchNotKept(problem)
    except (ConversionFailed, _BatchNotKept) as err:
        if not shapes.dynamic_batch:
            assert isinstance(err, ConversionFailed)
            log(f"tflite: conversion failed: {err.message.splitlines()[0]}")
            return _all_failed(err.message)
        why = (
            f"onnx2tf could not keep it dynamic: {err.message.splitlines()[0]}"
            if isinstance(err, ConversionFailed)
            else f"with a dynamic batch {err}"
        )
        log(f"tflite: batch not kept dynamic ({why}); converting again at batch 1")
        shapes = conversion_shapes(
            info.inputs, samples, target, keep_batch=False, why_fixed="could not keep it dynamic"
        )
        try:
            result = convert(shapes, workdir / "onnx2tf-batch1")
        except ConversionFailed as again:
            log(f"tflite: conversion failed: {again.message.splitlines()[0]}")
            return _all_failed(again.message)
    for note in shapes.notes:
        log(f"tflite: {note}")

    candidates: list[Candidate] = []
    for name, precision, kind in RUNGS:
        if target.microcontroller and precision != "int8":
            candidates.append(
                _failed(
                    name,
                    precision,
                    "microcontroller classes take full-integer int8 models only "
                    "(TensorFlow Lite Micro)",
                )
            )
            continue
        source = result.files.get(kind)
        if source is None:
            if kind == "full_integer_quant" and not quantize:
                error = (
                    "int8 needs float inputs to calibrate (onnx2tf quantizes float32 "
                    f"inputs only): {', '.join(not_float)}"
                )
            else:
                note = result.failures.get(kind, "")
                error = f"onnx2tf made no {kind} model; log: {result.log_path}" + (
                    f"\n{note}" if note else ""
                )
            log(f"tflite: {name} not built: {error.splitlines()[0]}")
            candidates.append(_failed(name, precision, error))
            continue
        path = workdir / f"{name}.tflite"
        shutil.copyfile(source, path)
        companion = None
        if target.microcontroller:
            companion = workdir / f"{name}.c"
            companion.write_text(to_c_array(path.read_bytes(), C_ARRAY_NAME))
            log(f"tflite: {name} as C source for TensorFlow Lite Micro: {companion.name}")
        log(f"tflite: built {name} ({path.stat().st_size} bytes)")
        candidates.append(
            Candidate(
                name,
                RUNTIME,
                precision,
                path,
                media_type=MEDIA_TYPE,
                companion=companion,
                accepted_inputs=shapes.accepted,
                notes=shapes.notes,
            )
        )
    return candidates
