"""ONNX Runtime behind the Runner protocol: what devices of `onnxruntime`
classes serve with, and what the build host measures ONNX candidates with.

Threading is pinned (intra-op = the class's thread count, one inter-op thread,
sequential execution) so a measured latency means the same thing on the
build host as on a device with that many cores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.runtimes import RuntimeUnavailable, TensorInfo
from edgefleet.extras import needs

try:
    import onnxruntime as ort
except ModuleNotFoundError as missing:
    # The base install is an agent without a runtime: loading an ONNX model
    # there fails as any unavailable runtime does, naming the extra.
    if missing.name != "onnxruntime":
        raise
    raise RuntimeUnavailable(
        needs("Serving ONNX models", "onnxruntime", ("onnxruntime",))
    ) from None

CPU = "CPUExecutionProvider"
AUTO = "auto"
# Preferred first: TensorRT builds fused engines, CUDA runs plain kernels.
ACCELERATED = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

# ORT reports element types as "tensor(float)"; the protocol speaks numpy names.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def _tensor_info(arg: Any) -> TensorInfo:
    dtype = _ORT_TYPES.get(arg.type, arg.type)
    # Symbolic ("batch") and unknown (None) dimensions are both dynamic.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorInfo(arg.name, dtype, shape)


def resolve_providers(requested: Sequence[str] | None) -> list[str]:
    """The execution providers to ask ORT for: the requested ones this
    installation has, in order, then the CPU provider as the fallback for
    nodes they do not take. Nothing requested means CPU only, which keeps
    measurements deterministic (ORT would otherwise pick a GPU provider
    whenever one is installed). ["auto"] means the accelerated providers this
    installation has (TensorRT, then CUDA), as a device serving a model
    wants. Raises RuntimeUnavailable when a requested accelerator provider
    is missing, rather than silently measuring on CPU."""
    if not requested:
        return [CPU]
    available = set(ort.get_available_providers())
    if list(requested) == [AUTO]:
        return [*[p for p in ACCELERATED if p in available], CPU]
    missing = [p for p in requested if p not in available]
    if missing:
        raise RuntimeUnavailable(
            f"onnxruntime {ort.__version__} lacks execution providers {missing} "
            f"(it has {sorted(available)}); install the onnxruntime build for that "
            "accelerator (e.g. onnxruntime-gpu)"
        )
    return [*[p for p in requested if p != CPU], CPU]


class OnnxRuntimeRunner:
    """A model loaded in an ORT InferenceSession."""

    def __init__(
        self, path: Path, threads: int = 1, *, providers: Sequence[str] | None = None
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        # One inter-op thread and sequential execution: parallel branches
        # would otherwise borrow cores the class does not have.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Load-time optimization stays at ORT's default (all levels): it runs
        # on the machine that serves, so hardware-specific layouts are right here.
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=resolve_providers(providers)
        )
        self._inputs = tuple(_tensor_info(a) for a in self._session.get_inputs())
        self._outputs = tuple(_tensor_info(a) for a in self._session.get_outputs())

    @property
    def inputs(self) -> Sequence[TensorInfo]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorInfo]:
        return self._outputs

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses, in priority order."""
        return list(self._session.get_providers())

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
        return [np.asarray(out) for out in self._session.run(None, feeds)]
