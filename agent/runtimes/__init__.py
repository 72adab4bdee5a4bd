"""Inference runtimes behind one interface. The agent serves with them, and
the control plane's build host measures candidates with the very same
adapters, so a build measures what a device will run.

Each runtime module is imported lazily: a device without LiteRT or TensorRT
must still import this package, and an agent with no model loaded should not
pay for numpy or a runtime (about 12 MB and 20-35 MB of RSS)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

ONNXRUNTIME, TFLITE, TENSORRT = "onnxruntime", "tflite", "tensorrt"


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot be used on this machine (not installed, no GPU);
    the message says what is missing and how to get it."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]  # -1 for dynamic dimensions


class Runner(Protocol):
    """A loaded model. `run` takes inputs keyed by the ONNX model's input
    names, in the ONNX layout and dtype (a runner converts to its own layout,
    e.g. NCHW -> NHWC for onnx2tf's TFLite models, and (de)quantizes int8
    I/O), and returns the outputs in the ONNX model's output order and layout."""

    @property
    def inputs(self) -> Sequence[TensorInfo]: ...

    @property
    def outputs(self) -> Sequence[TensorInfo]: ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


def open_runner(
    path: Path,
    runtime: str,
    *,
    threads: int = 1,
    onnx_inputs: Sequence[TensorInfo] | None = None,
    onnx_outputs: Sequence[TensorInfo] | None = None,
    providers: Sequence[str] | None = None,
) -> Runner:
    """Load `path` in `runtime`. `onnx_inputs`/`onnx_outputs` describe the
    source ONNX model, for runtimes whose artifacts changed layout or names.
    `providers` are ONNX Runtime's execution providers (None: CPU only;
    ["auto"]: the accelerated ones installed, then CPU)."""
    if runtime == ONNXRUNTIME:
        from edgefleet.agent.runtimes.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, threads=threads, providers=providers)
    if runtime == TFLITE:
        from edgefleet.agent.runtimes.litert import LiteRtRunner

        return LiteRtRunner(
            path, threads=threads, onnx_inputs=onnx_inputs, onnx_outputs=onnx_outputs
        )
    if runtime == TENSORRT:
        from edgefleet.agent.runtimes.tensorrt import TensorRtRunner

        return TensorRtRunner(path, threads=threads)
    raise RuntimeUnavailable(f"unknown runtime {runtime!r}")
