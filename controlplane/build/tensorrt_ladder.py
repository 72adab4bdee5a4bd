"""The ladder for TensorRT classes: ONNX models that TensorRT builds well,
each with the spec a device builds its engine from.

A TensorRT engine only loads on the TensorRT version and GPU that built it,
so the artifact is never an engine. It is the ONNX TensorRT should start from
plus an engine-build spec (the TensorRTBuildSpec message: precision,
workspace, one optimization profile), and the agent builds and caches the
engine on the device (agent.runtimes.tensorrt). Two rungs:

- "trt-fp16": the model with fp16 weights and fp32 inputs/outputs, built with
  fp16 kernels allowed;
- "trt-int8-qdq": the model with QuantizeLinear/DequantizeLinear pairs
  calibrated on the samples (explicit quantization, which TensorRT honours
  as written), built with int8 and fp16 allowed.

Measuring these on the build host: the pipeline runs them with onnxruntime
on the CPU, as a proxy for correctness only (agreement with the fp32
reference, accuracy on labelled samples, size). A CPU latency says nothing
about a GPU engine, whose kernels are chosen on the device, so the verdict
for tensorrt classes rests on size and accuracy; latency is validated on the
device after its engine is built (issue 4)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantType

from edgefleet.agent.runtimes import TENSORRT
from edgefleet.controlplane.build.ort_ladder import convert_fp16, quantize_static_qdq
from edgefleet.controlplane.build.samples import Samples
from edgefleet.controlplane.build.types import BuildTarget, Candidate, ShapeRange, TensorRTSpec
from edgefleet.controlplane.domain.onnx_inspect import TensorInfo, inspect_model

# The engine's build profile for a dynamic batch axis. Devices serve one
# request at a time, so TensorRT tunes for batch 1; up to 8 leaves room for
# small bursts (several cameras) while keeping the activation memory TensorRT
# reserves for the largest shape bounded.
MAX_BATCH = 8
# Scratch memory the builder may use for tactics, and the engine at run
# time. TensorRT's default is the whole GPU, which on a Jetson is the whole
# (shared) RAM; 256 MiB covers the tactics of typical edge models.
DEFAULT_WORKSPACE_MB = 256
MIN_WORKSPACE_MB = 32
# The named-tensor API the agent's runner uses is TensorRT 10.
MIN_TENSORRT_VERSION = "10.0"

PRECISIONS = ("fp16", "int8")
RUNGS = (("trt-fp16", "fp16"), ("trt-int8-qdq", "int8"))

Log = Callable[[str], None]


def engine_build_spec(
    inputs: Sequence[TensorInfo],
    samples: Samples,
    precision: str,
    workspace_mb: int,
    *,
    max_batch: int = MAX_BATCH,
) -> TensorRTSpec:
    """The TensorRTBuildSpec for a model with `inputs`.

    Only inputs with a dynamic dimension get a shape range (a static input
    needs no profile). Per axis: a static size is min = opt = max; a dynamic
    batch axis (axis 0) is 1 / 1 / `max_batch`; any other dynamic axis is
    fixed at the size the sample data has there. The engine then accepts
    exactly the shapes the model was measured with; TensorRT rejects others,
    and the runner says which range it takes. A wider range would cost GPU
    memory for shapes nobody measured."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if workspace_mb <= 0:
        raise ValueError(f"workspace_mb must be positive, not {workspace_mb}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, not {max_batch}")
    profile: list[ShapeRange] = []
    for spec in inputs:
        if all(dim >= 0 for dim in spec.shape):
            continue
        # One sample as it is fed (a batch of one where the samples replace
        # the batch axis), so axis numbers agree with the model's.
        fed = samples.fed_shape(spec.name) if spec.name in samples.arrays else None
        as_is = spec.name in samples.as_is
        low: list[int] = []
        opt: list[int] = []
        high: list[int] = []
        for axis, dim in enumerate(spec.shape):
            if dim >= 0:
                sizes = (dim, dim, dim)
            elif axis == 0 and not as_is:
                sizes = (1, 1, max_batch)
            else:
                if fed is None or len(fed) != len(spec.shape):
                    raise ValueError(
                        f"input {spec.name!r} {list(spec.shape)} has a dynamic axis {axis}, "
                        "and no sample data of that rank gives it a size"
                    )
                size = fed[axis]
                sizes = (size, size, size)
            low.append(sizes[0])
            opt.append(sizes[1])
            high.append(sizes[2])
        profile.append(ShapeRange(spec.name, tuple(low), tuple(opt), tuple(high)))
    return TensorRTSpec(precision, int(workspace_mb), tuple(profile))


def workspace_mb_for(target: BuildTarget) -> int:
    """The builder workspace for a class: the default, but at most half the
    class's memory budget when it has one, since the engine may keep that
    much scratch memory at run time."""
    if target.max_memory_mb is None:
        return DEFAULT_WORKSPACE_MB
    half = int(target.max_memory_mb // 2)
    return max(MIN_WORKSPACE_MB, min(DEFAULT_WORKSPACE_MB, half))


def rungs_for(quantization: str) -> list[tuple[str, str]]:
    """The rungs a class asks for: its precision when it names fp16 or int8,
    both when it leaves the choice to the build (auto, or fp32, which
    TensorRT classes do not ship: fp16 is lossless in practice on GPUs and
    half the download)."""
    if quantization in PRECISIONS:
        return [rung for rung in RUNGS if rung[1] == quantization]
    return list(RUNGS)


def tensorrt_qdq_problems(path: Path) -> list[str]:
    """Why TensorRT would reject the Q/DQ nodes of the ONNX at `path`, if it
    would. TensorRT supports only symmetric int8 quantization: every zero
    point must be an int8 zero (its ONNX parser fails with "TRT only supports
    symmetric quantization - zeroPt must be all zeros" otherwise, and uint8
    activations would be read with the wrong range), and it rejects
    DequantizeLinear on int32 quantized biases ("only activation types
    allowed as input to this layer"). Empty when fine."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name: init for init in model.graph.initializer}
    problems: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in (
            "",
            "ai.onnx",
        ):
            continue
        if len(node.input) < 3 or not node.input[2]:
            # ONNX's default zero point is a uint8 zero.
            problems["no zero point (ONNX defaults to uint8)"] += 1
            continue
        init = initializers.get(node.input[2])
        if init is None:
            problems["a zero point that is not a constant"] += 1
            continue
        zero_point = numpy_helper.to_array(init)
        if zero_point.dtype == np.int32:
            problems["int32 zero points (quantized biases; TensorRT takes float biases)"] += 1
        elif zero_point.dtype != np.int8:
            problems[f"{zero_point.dtype.name} zero points"] += 1
        elif np.any(zero_point != 0):
            problems["non-zero (asymmetric) zero points"] += 1
    return [f"{count} Q/DQ nodes have {what}" for what, count in sorted(problems.items())]


def build_candidates(
    model: Path, samples: Samples, workdir: Path, target: BuildTarget, log: Log
) -> list[Candidate]:
    """Build the TensorRT rungs `target` asks for into `workdir`. A rung that
    cannot be built comes back with `path=None` and the reason in `error`,
    so the verdict can say why it is missing."""
    out = workdir / TENSORRT
    out.mkdir(parents=True, exist_ok=True)
    inputs = inspect_model(model).inputs
    workspace_mb = workspace_mb_for(target)
    rungs = rungs_for(target.quantization)
    log(f"tensorrt ladder for class {target.class_name!r}: {', '.join(r[0] for r in rungs)}")
    candidates: list[Candidate] = []
    for name, precision in rungs:
        destination = out / f"{name}.onnx"
        try:
            spec = engine_build_spec(inputs, samples, precision, workspace_mb)
            if precision == "fp16":
                convert_fp16(model, destination, log=log)
            else:
                # TensorRT takes only signed, symmetric int8 activations, and
                # its int8 kernels have no saturation problem to reduce range for.
                quantize_static_qdq(
                    model,
                    destination,
                    samples,
                    log=log,
                    activation_type=QuantType.QInt8,
                    symmetric_activations=True,
                    reduce_range=False,
                    quantize_bias=False,
                )
                # A model TensorRT's parser rejects would fail on every
                # device of the class; refuse it here, where it is cheap.
                problems = tensorrt_qdq_problems(destination)
                if problems:
                    rejected = "; ".join(problems)
                    raise ValueError(f"the quantized model has Q/DQ TensorRT rejects: {rejected}")
            onnx.checker.check_model(str(destination))
        except Exception as exc:  # converters and quantizers raise many unrelated types
            text = str(exc).strip()
            reason = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
            log(f"{name}: not built: {reason}")
            candidates.append(Candidate(name, TENSORRT, precision, None, error=reason))
            continue
        log(f"{name}: built ({destination.stat().st_size / 1e6:.2f} MB), {_describe(spec)}")
        candidates.append(
            Candidate(
                name,
                TENSORRT,
                precision,
                destination,
                tensorrt_spec=spec,
                min_runtime_versions={TENSORRT: MIN_TENSORRT_VERSION},
            )
        )
    return candidates


def _describe(spec: TensorRTSpec) -> str:
    # Lists, as the log has always printed them.
    ranges = [f"{r.input} {list(r.min)}..{list(r.max)} (opt {list(r.opt)})" for r in spec.profile]
    shapes = "; ".join(ranges) if ranges else "static shapes"
    return f"engine spec {spec.precision}, workspace {spec.workspace_mb} MiB, {shapes}"
