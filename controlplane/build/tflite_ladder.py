"""The TFLite rung of the optimization ladder: fp32, fp16 and int8 models
from one onnx2tf run (controlplane.build.toolchain), for classes whose
runtime is `tflite`; for microcontroller classes, the int8 model also as C
source for TensorFlow Lite Micro."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgefleet.controlplane.build.c_array import to_c_array
from edgefleet.controlplane.build.samples import Samples
from edgefleet.controlplane.build.toolchain import (
    DEFAULT_CONVERT_TIMEOUT_S,
    ConversionFailed,
    ConvertInput,
    require_tflite,
    run_onnx2tf,
)
from edgefleet.controlplane.build.types import BuildTarget, Candidate
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


def _static_shape(spec: TensorInfo, samples: Samples) -> tuple[int, ...]:
    """The input's shape with batch 1 and every other dim as in the samples
    (already checked against the model at push time)."""
    return samples.fed_shape(spec.name)


def _failed(name: str, precision: str, error: str) -> Candidate:
    return Candidate(name, RUNTIME, precision, None, media_type=MEDIA_TYPE, error=error)


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
    # onnx2tf sees only the samples it calibrates with (its self-check
    # images come from the first of them): converting a copy of every sample
    # to float32 and to TF's layout would cost memory for nothing.
    inputs = [
        ConvertInput(
            spec.name,
            _static_shape(spec, samples),
            samples.arrays[spec.name][:CALIBRATION_SAMPLES],
        )
        for spec in info.inputs
    ]
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
    try:
        result = run_onnx2tf(
            toolchain,
            model,
            workdir / "onnx2tf",
            inputs,
            quantize=quantize,
            calibration_limit=CALIBRATION_SAMPLES,
            timeout_s=timeout_s,
            log=log,
        )
    except ConversionFailed as err:
        # One conversion makes every rung: its failure is said once, on the
        # first, and the others point at it.
        log(f"tflite: conversion failed: {err.message.splitlines()[0]}")
        first = RUNGS[0][0]
        return [
            _failed(
                name,
                precision,
                err.message if name == first else f"the conversion failed (see {first})",
            )
            for name, precision, _ in RUNGS
        ]

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
            Candidate(name, RUNTIME, precision, path, media_type=MEDIA_TYPE, companion=companion)
        )
    return candidates
