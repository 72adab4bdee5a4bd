"""The ONNX Runtime optimization ladder: from one pushed ONNX model, the
candidates an `onnxruntime` device class may get. Every rung uses the field's
own tools (ORT's graph optimizer and quantizer, onnxconverter-common's fp16
converter) and writes a plain ONNX file; which rung ships is decided only
after each is measured (controlplane.build.measure / verdict), because none
of them is reliably better: fp16 halves the size but is not faster on x86
CPUs, dynamic int8 helps MatMul-heavy models but not CNNs, and a rung can
silently break a real model's outputs.

The TensorRT ladder reuses `convert_fp16` and `quantize_static_qdq`."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgefleet.controlplane.build.samples import Samples
from edgefleet.controlplane.build.types import BuildTarget, Candidate
from edgefleet.controlplane.domain.onnx_inspect import TensorInfo, inspect_model
from edgefleet.controlplane.errors import InvalidArgument

RUNTIME = "onnxruntime"
FP32_OPT, FP16 = "fp32-opt", "fp16"
INT8_DYNAMIC, INT8_STATIC_QDQ = "int8-dynamic", "int8-static-qdq"

# Per-channel weight scales live in DequantizeLinear's `axis` attribute,
# which only exists from opset 13 on.
PER_CHANNEL_MIN_OPSET = 13
# Calibration keeps every sample's intermediate activations in memory to
# build its histograms; past a few dozen representative samples the ranges
# barely move, while time and memory grow linearly.
CALIBRATION_LIMIT = 64

# The oldest ONNX Runtime release implementing each ai.onnx opset and each
# ONNX IR version (ORT's docs/Versioning.md matrix; where a release is in
# doubt the later one is named, since a floor that is too high only refuses
# a device that might have coped, while one too low ships a model it cannot load).
_ORT_FLOOR_BY_OPSET = {
    11: "1.0", 12: "1.3", 13: "1.6", 14: "1.8", 15: "1.9", 16: "1.12", 17: "1.13",
    18: "1.14", 19: "1.15", 20: "1.17", 21: "1.18", 22: "1.21", 23: "1.22",
}  # fmt: skip
_ORT_FLOOR_BY_IR = {7: "1.6", 8: "1.10", 9: "1.15", 10: "1.18", 11: "1.22"}

Log = Callable[[str], None]


# -- the rungs -------------------------------------------------------------------------------


def optimize_fp32(src: Path, dst: Path) -> Path:
    """Offline graph optimization at ORT's BASIC level (constant folding,
    redundant-node elimination, Conv+BatchNorm/Add/Mul fusion).

    BASIC, not EXTENDED or ALL: those levels write ORT contrib ops
    (com.microsoft FusedConv, FusedMatMul, ...) and, at ALL, NCHWc layout
    nodes for the build host's own SIMD width. Such a file only loads in ORT,
    only runs well on CPUs like the build host, and cannot be taken further
    by the fp16 converter, the quantizer's shape inference or TensorRT. The
    BASIC result is standard ONNX, and the device's ORT still applies the
    hardware-specific levels itself when it loads the model."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), sess_options=options, providers=["CPUExecutionProvider"])
    _prune_unused_opsets(dst)
    return dst


def convert_fp16(src: Path, dst: Path, *, log: Log | None = None) -> Path:
    """Optimize, then convert weights and activations to float16 while
    keeping float32 inputs and outputs (so callers and sample data stay
    unchanged). Optimizing first matters: converting a real OCR detector's
    raw graph broke its outputs; converting the optimized graph did not."""
    from onnxconverter_common import float16  # type: ignore[import-untyped]

    with tempfile.TemporaryDirectory(prefix="fp16-") as tmp:
        optimized = optimize_fp32(src, Path(tmp) / "optimized.onnx")
        model = onnx.load(str(optimized))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    if log is not None and caught:
        # The converter warns once per weight value it clamps to float16's
        # range (tiny values flushed to 1e-7, huge ones capped): one summary
        # line, since a flood of them is what would explain lost accuracy.
        first = str(caught[0].message).splitlines()[0]
        log(f"fp16: {len(caught)} converter warnings, e.g. {first}")
    onnx.save(converted, str(dst))
    return dst


def quantize_dynamic_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8: weights quantized offline, activations at run time.

    Weights are QUInt8, not ORT's default QInt8: with int8 weights ORT runs
    Conv as ConvInteger, which is 6-10x slower on x86 than the uint8 path."""
    with tempfile.TemporaryDirectory(prefix="int8-dynamic-") as tmp:
        prepared = preprocess_for_quantization(src, Path(tmp) / "prepared.onnx")
        quantize_dynamic(prepared, dst, weight_type=QuantType.QUInt8)
    quantized = _quantized_ops(onnx.load(str(dst), load_external_data=False).graph)
    if not quantized:
        # quantize_dynamic leaves alone what it has no integer kernel for and
        # what sits inside If/Loop subgraphs (silero-vad's whole network):
        # an fp32 file under an int8 name would mislead every reader.
        raise ValueError(
            "dynamic quantization found nothing to quantize (no MatMul, Gemm, Conv, LSTM, GRU "
            "or Attention weights outside subgraphs): this model has no int8-dynamic form"
        )
    return dst


def _quantized_ops(graph: onnx.GraphProto) -> int:
    """How many nodes of the top-level graph run in integer arithmetic or
    quantize at run time."""
    integer = {
        "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QuantizeLinear",
        # ORT's contrib ops quantize_dynamic emits (com.microsoft).
        "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM", "QAttention",
        "QGemm",
    }  # fmt: skip
    return sum(1 for node in graph.node if node.op_type in integer)


def quantize_static_qdq(
    src: Path,
    dst: Path,
    samples: Samples,
    *,
    log: Log | None = None,
    activation_type: QuantType = QuantType.QUInt8,
    reduce_range: bool = True,
    symmetric_activations: bool = False,
    quantize_bias: bool = True,
    calibrate_method: CalibrationMethod = CalibrationMethod.Percentile,
) -> Path:
    """Static int8 in QDQ format (QuantizeLinear/DequantizeLinear pairs
    around float ops) with per-channel int8 weights, calibrated over
    `samples`. QDQ rather than QOperator because every consumer understands
    it: ORT fuses the pairs into integer kernels at load time, and TensorRT
    builds its int8 engine from the same file.

    The defaults suit ONNX Runtime on CPUs:
    - uint8 activations with int8 weights (U8S8), the combination ORT's x86
      and Arm integer kernels are fastest with;
    - `reduce_range` (7-bit weights): x86 CPUs with AVX2 or AVX-512 but no
      VNNI saturate U8S8 products. On the AVX2 build host it raised argmax
      agreement with fp32 from 0.73 to 0.88 on the PP-OCR direction
      classifier, and from 0.995 to 1.0 on the digits models; the bit it
      costs elsewhere is far smaller than what saturation loses;
    - Percentile calibration (99.999th percentile of |activation|), which
      ignores the rare outliers MinMax stretches the int8 range for: 0.96
      vs 0.88 agreement on the same classifier.
    TensorRT wants signed, symmetric activations, full-range weights and
    float biases (its ONNX parser rejects int32 bias tensors):
    activation_type=QuantType.QInt8, symmetric_activations=True,
    reduce_range=False, quantize_bias=False.

    Raises InvalidArgument when the samples cannot calibrate this model."""
    model_info = inspect_model(src)
    check_calibration_samples(samples, model_info.inputs)
    if samples.generated and log is not None:
        log(
            "int8-static-qdq: calibrating on generated inputs, not real data; push "
            "sample data with the model for a calibration that reflects real inputs"
        )
    with tempfile.TemporaryDirectory(prefix="int8-qdq-") as tmp:
        prepared = preprocess_for_quantization(src, Path(tmp) / "prepared.onnx")
        model = onnx.load(str(prepared))
        opset = _ai_onnx_opset(model)
        if opset < PER_CHANNEL_MIN_OPSET:
            model = version_converter.convert_version(model, PER_CHANNEL_MIN_OPSET)
            if log is not None:
                log(
                    f"int8-static-qdq: upgraded opset {opset} -> {PER_CHANNEL_MIN_OPSET} "
                    "for per-channel weight scales"
                )
            prepared = Path(tmp) / "prepared-opset13.onnx"
            onnx.save(model, str(prepared))
        # The calibrator print()s its progress; a build worker's stdout is
        # not the place for it.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                prepared,
                dst,
                _SamplesReader(samples.head(CALIBRATION_LIMIT)),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=activation_type,
                weight_type=QuantType.QInt8,
                calibrate_method=calibrate_method,
                extra_options={
                    "ActivationSymmetric": symmetric_activations,
                    "QuantizeBias": quantize_bias,
                },
            )
    return dst


def to_ort_format(src: Path, dst: Path) -> Path:
    """The model in ORT format (.ort), the only format ORT's minimal builds
    (for small devices) load. Same BASIC optimization level as
    `optimize_fp32`, for the same portability reason. An ORT-format file
    only loads in the ORT release that wrote it or a newer one: its floor is
    `host_ort_version()`."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(src), sess_options=options, providers=["CPUExecutionProvider"])
    return dst


# -- the ladder ------------------------------------------------------------------------------


def build_candidates(
    model: Path, samples: Samples, workdir: Path, target: BuildTarget, log: Log
) -> list[Candidate]:
    """Every rung of the ladder for `model`, written under `workdir`. A rung
    that fails to build is returned with path=None and its error; the other
    rungs still run. `target` is part of the ladder interface shared with
    the TFLite and TensorRT ladders; ORT builds the same rungs for every
    class, since the verdict (not the ladder) matches them to the class."""
    out = workdir / "onnxruntime"
    out.mkdir(parents=True, exist_ok=True)
    rungs: list[tuple[str, str, Callable[[Path], Path]]] = [
        (FP32_OPT, "fp32", lambda dst: optimize_fp32(model, dst)),
        (FP16, "fp16", lambda dst: convert_fp16(model, dst, log=log)),
        (INT8_DYNAMIC, "int8", lambda dst: quantize_dynamic_int8(model, dst)),
        (INT8_STATIC_QDQ, "int8", lambda dst: quantize_static_qdq(model, dst, samples, log=log)),
    ]
    log(f"onnxruntime ladder for class {target.class_name!r}: {', '.join(r[0] for r in rungs)}")
    candidates: list[Candidate] = []
    for name, precision, build in rungs:
        dst = out / f"{name}.onnx"
        try:
            build(dst)
            onnx.checker.check_model(str(dst))
        except Exception as exc:  # any library failure makes this one rung fail
            reason = _first_line(exc)
            log(f"{name}: not built: {reason}")
            candidates.append(Candidate(name, RUNTIME, precision, None, error=reason))
            continue
        versions = {RUNTIME: ort_version_floor(dst)}
        log(f"{name}: built, {dst.stat().st_size:,} bytes, needs onnxruntime>={versions[RUNTIME]}")
        candidates.append(Candidate(name, RUNTIME, precision, dst, min_runtime_versions=versions))
    return candidates


# -- helpers ---------------------------------------------------------------------------------


def preprocess_for_quantization(src: Path, dst: Path) -> Path:
    """ORT's recommended step before quantizing: graph optimization (so
    BatchNorm is folded before weights are quantized) and shape inference
    (the quantizer needs every tensor's type). Symbolic shape inference needs
    sympy; without it ONNX's own inference still runs, which suffices for
    models whose shapes are static or follow simply from the inputs."""
    have_sympy = importlib.util.find_spec("sympy") is not None
    quant_pre_process(src, dst, skip_symbolic_shape=not have_sympy)
    _prune_unused_opsets(dst)
    return dst


def check_calibration_samples(samples: Samples, inputs: Sequence[TensorInfo]) -> None:
    """Raise InvalidArgument, saying what to fix, unless `samples` holds at
    least one finite sample per model input with the input's dtype and shape."""
    specs = {spec.name: spec for spec in inputs}
    if not samples.arrays or len(samples) == 0:
        raise InvalidArgument(
            "calibration needs at least one sample, and the sample data holds none; "
            "push sample data with a few hundred representative inputs"
        )
    missing = sorted(specs.keys() - samples.arrays.keys())
    if missing:
        raise InvalidArgument(
            f"calibration data lacks arrays for model inputs {missing}; it has "
            f"{sorted(samples.arrays)} (name each array after a model input)"
        )
    extra = sorted(samples.arrays.keys() - specs.keys())
    if extra:
        raise InvalidArgument(
            f"calibration data has arrays {extra} that are not model inputs ({sorted(specs)})"
        )
    for name, spec in specs.items():
        array = samples.arrays[name]
        dtype, shape = spec.dtype, spec.shape
        if array.dtype.name != dtype:
            raise InvalidArgument(
                f"calibration data {name!r} is {array.dtype.name}; the model input is {dtype} "
                f"(convert it, e.g. array.astype('{dtype}'))"
            )
        # One sample as it is fed: a batch of one where the samples replace
        # the batch axis, the entry itself where they do not.
        fed = samples.fed_shape(name)
        if len(fed) != len(shape):
            raise InvalidArgument(
                f"calibration data {name!r} has shape {list(array.shape)}; the model input is "
                f"{list(shape)} (rank {len(shape)}, with a leading sample axis)"
            )
        for axis, (got, want) in enumerate(zip(fed, shape, strict=True)):
            if want > 0 and got != want and not (axis == 0 and name not in samples.as_is):
                raise InvalidArgument(
                    f"calibration data {name!r} has shape {list(array.shape)}; the model input "
                    f"is {list(shape)} (axis {axis}: {got} != {want})"
                )
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise InvalidArgument(
                f"calibration data {name!r} holds {bad} NaN or infinite values; "
                "calibration ranges would be meaningless: clean or drop those samples"
            )


class _SamplesReader(CalibrationDataReader):  # type: ignore[misc]  # ORT is untyped
    """Feeds the quantizer's calibration session one sample at a time, as a
    batch of one: models exported with a fixed batch of 1 accept nothing else."""

    def __init__(self, samples: Samples) -> None:
        self._samples = samples
        self._iter: Iterator[dict[str, np.ndarray]] = samples.each()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = self._samples.each()


def ort_version_floor(path: Path) -> str:
    """The oldest ONNX Runtime release that can load the model at `path`,
    from its ai.onnx opset and IR version. Versions newer than the table
    know map to the build host's ORT (the only release known to load it)."""
    model = onnx.load(str(path), load_external_data=False)
    host = host_ort_version()
    opset_floor = _ORT_FLOOR_BY_OPSET.get(_ai_onnx_opset(model), "1.0")
    if _ai_onnx_opset(model) > max(_ORT_FLOOR_BY_OPSET):
        opset_floor = host
    ir_floor = _ORT_FLOOR_BY_IR.get(model.ir_version, "1.0")
    if model.ir_version > max(_ORT_FLOOR_BY_IR):
        ir_floor = host
    return max(opset_floor, ir_floor, key=_version_key)


def host_ort_version() -> str:
    """major.minor of the ONNX Runtime on the build host."""
    return ".".join(ort.__version__.split(".")[:2])


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _ai_onnx_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _prune_unused_opsets(path: Path) -> None:
    """ORT stamps every domain it knows into a model it saves (training,
    experimental, NCHWc, ...). Keep only the ones the graph uses: an older
    runtime or another tool may refuse a domain it does not know."""
    model = onnx.load(str(path))
    used = {"", "ai.onnx"} | {node.domain for node in _all_nodes(model.graph.node)}
    for function in model.functions:
        used |= {node.domain for node in _all_nodes(function.node)}
    keep = [o for o in model.opset_import if o.domain in used]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
        onnx.save(model, str(path))


def _all_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """Nodes, including those in If/Loop/Scan subgraphs."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g.node)
            for graph in attr.graphs:
                yield from _all_nodes(graph.node)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
