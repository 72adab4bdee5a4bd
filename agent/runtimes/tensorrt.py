"""TensorRT behind the Runner protocol, and the engine build that feeds it.

A serialized TensorRT engine only loads on the TensorRT version and the GPU
(compute capability) it was built for, so the control plane cannot ship one.
A TensorRT artifact is an ONNX model plus an engine-build spec (precision,
workspace, one optimization profile; the TensorRTBuildSpec message), and each
device turns them into an engine once: `build_engine` builds it and
`EngineCache` keeps it, keyed by everything that invalidates it.

Written against the documented TensorRT 10.x Python API (``trt.Builder``,
``trt.OnnxParser``, ``IBuilderConfig.set_memory_pool_limit``, optimization
profiles, ``build_serialized_network``; at run time ``trt.Runtime``, the
named-tensor I/O API and ``execute_async_v3``). Neither TensorRT nor a GPU is
available where this was written, so the paths that call TensorRT are covered
only by tests that skip there; see docs/tensorrt.md.

Device memory and streams come from cuda-python's runtime bindings
(``cuda.bindings.runtime``, formerly ``cuda.cudart``): it is NVIDIA's own thin
binding, the one TensorRT's Python samples use, and a few MB, where PyTorch
would add gigabytes to a device only to allocate buffers.

``tensorrt`` and the CUDA bindings are imported when first needed, never at
import time: a device without them must still import the agent, and asking
for this runtime there raises RuntimeUnavailable saying how to get it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import logging
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgefleet.agent.runtimes import RuntimeUnavailable, TensorInfo
from edgefleet.fsutil import atomic_write

log = logging.getLogger(__name__)

# The named-tensor API (set_input_shape, set_tensor_address,
# execute_async_v3) and build_serialized_network-only building are TensorRT 10.
MIN_TENSORRT_VERSION = (10, 0)
ENGINE_SUFFIX = ".engine"
_MIB = 1024 * 1024

TENSORRT_INSTALL_HINT = (
    "on a Jetson, install JetPack 6.2 or later (TensorRT 10 ships as the apt package "
    "python3-libnvinfer; create the agent's virtualenv with --system-site-packages so "
    "it can import it); on an x86_64 or SBSA machine with an NVIDIA GPU and driver, "
    "pip install 'tensorrt-cu12>=10' into the agent's environment"
)
CUDA_INSTALL_HINT = (
    "pip install cuda-python into the agent's environment, with the major version of "
    "the CUDA that TensorRT was built for (e.g. 'cuda-python>=12,<13' for tensorrt-cu12)"
)


class EngineBuildError(RuntimeError):
    """TensorRT could not turn an artifact into an engine (unsupported
    operator, shapes outside the profile, out of memory). The message carries
    TensorRT's own errors. Retrying the same artifact on the same device gives
    the same result, so callers treat it as a failed install, not a retry."""


class CudaError(RuntimeError):
    """A CUDA runtime call failed (out of device memory, a lost device)."""


# ------------------------------------------------------------------ imports


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def tensorrt_version() -> str | None:
    """The version of the importable ``tensorrt`` module, or None where it
    does not import (absent, or a broken native library)."""
    try:
        module = importlib.import_module("tensorrt")
    except Exception:  # ImportError, or OSError/RuntimeError from libnvinfer
        return None
    return str(getattr(module, "__version__", "")) or None


def import_tensorrt() -> ModuleType:
    """``tensorrt``, or RuntimeUnavailable saying what is missing and how to
    get it (absent, unloadable, or older than 10.0)."""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as exc:
        raise RuntimeUnavailable(
            f"TensorRT is not installed: `import tensorrt` failed "
            f"({type(exc).__name__}: {exc}); {TENSORRT_INSTALL_HINT}"
        ) from exc
    version = str(getattr(trt, "__version__", ""))
    if _version_tuple(version) < MIN_TENSORRT_VERSION:
        wanted = ".".join(map(str, MIN_TENSORRT_VERSION))
        raise RuntimeUnavailable(
            f"TensorRT {version or '(unknown version)'} is too old: EdgeFleet needs "
            f"{wanted} or later; {TENSORRT_INSTALL_HINT}"
        )
    return trt


def import_cudart() -> ModuleType:
    """cuda-python's CUDA runtime bindings, under either module name they
    have had, or RuntimeUnavailable."""
    failures = []
    # cuda.bindings.runtime since cuda-python 12.6; cuda.cudart before (and a
    # deprecated alias after), so the new name is tried first.
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    raise RuntimeUnavailable(
        "TensorRT needs the CUDA Python bindings, which are not installed "
        f"({'; '.join(failures)}); {CUDA_INSTALL_HINT}"
    )


def _cuda(cudart: ModuleType, call: str, *args: Any) -> Any:
    """Call `cudart.<call>(*args)`; the bindings return (error, *results)
    instead of raising, so check the error here. Returns the single result,
    a tuple of several, or None."""
    err, *results = getattr(cudart, call)(*args)
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        raise CudaError(f"{call} failed: {name}")
    if not results:
        return None
    return results[0] if len(results) == 1 else tuple(results)


# ------------------------------------------------------------ GPU identity


@dataclass(frozen=True)
class GpuIdentity:
    """What an engine is tied to on the hardware side."""

    name: str  # as CUDA reports it, e.g. "Orin (nvgpu)", "NVIDIA A100-SXM4-40GB"
    compute_capability: str  # "8.7"


def gpu_identity(device: int = 0) -> GpuIdentity:
    """The CUDA device's name and compute capability. RuntimeUnavailable when
    the bindings are missing or no GPU is visible."""
    cudart = import_cudart()
    try:
        count = _cuda(cudart, "cudaGetDeviceCount")
    except CudaError as exc:
        raise RuntimeUnavailable(
            f"no CUDA GPU is usable ({exc}); check the NVIDIA driver (nvidia-smi, or "
            "tegrastats on a Jetson) and that the agent's user may open /dev/nvidia*"
        ) from exc
    if not count or device >= count:
        raise RuntimeUnavailable(f"no CUDA GPU {device} (CUDA sees {count or 0} GPUs)")
    props = _cuda(cudart, "cudaGetDeviceProperties", device)
    raw = props.name
    name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return GpuIdentity(name.split("\x00", 1)[0].strip(), f"{props.major}.{props.minor}")


# ---------------------------------------------------------------- the cache


def normalize_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec with plain types: protobuf's JSON mapping (MessageToDict)
    writes 64-bit integers as strings, the ladder writes ints, and both must
    mean, and hash to, the same thing. Unknown keys are dropped."""
    return {
        "precision": str(spec.get("precision", "")),
        "workspace_mb": int(spec.get("workspace_mb") or 0),
        "profile": [
            {
                "input": str(entry["input"]),
                "min": [int(d) for d in entry.get("min", [])],
                "opt": [int(d) for d in entry.get("opt", [])],
                "max": [int(d) for d in entry.get("max", [])],
            }
            for entry in spec.get("profile", [])
        ],
    }


def spec_digest(spec: Mapping[str, Any]) -> str:
    """SHA-256 of the normalized spec's canonical JSON: two specs that mean
    the same thing share engines, any real change does not."""
    canonical = json.dumps(normalize_spec(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _slug(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._") or "unknown"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. TensorRT refuses to deserialize an
    engine from another version, and an engine tuned for one GPU is invalid
    (or slow) on another, so both are in the key; the artifact digest and the
    spec digest say which model and which profile it was built from."""

    tensorrt_version: str
    gpu: GpuIdentity
    artifact_sha256: str
    spec_sha256: str

    def relative_path(self) -> Path:
        """<tensorrt version>/<gpu>-sm<cc>/<artifact>-<spec>.engine: grouping
        by version and GPU lets a whole generation be dropped after an
        upgrade; the file name is unique per artifact and spec."""
        cc = self.gpu.compute_capability.replace(".", "")
        return (
            Path(_slug(self.tensorrt_version))
            / f"{_slug(self.gpu.name)}-sm{_slug(cc)}"
            / f"{self.artifact_sha256}-{self.spec_sha256[:16]}{ENGINE_SUFFIX}"
        )


class EngineCache:
    """Built engines on disk, one file per EngineKey. Writes are atomic (temp
    file, fsync, rename, directory fsync), so a power cut mid-write leaves no
    engine rather than a torn one; a torn engine would fail to deserialize at
    every start until removed by hand."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: EngineKey) -> Path:
        return self.root / key.relative_path()

    def get(self, key: EngineKey) -> Path | None:
        """The cached engine for `key`, or None."""
        path = self.path(key)
        try:
            return path if path.stat().st_size > 0 else None
        except FileNotFoundError:
            return None

    def put(self, key: EngineKey, engine: bytes) -> Path:
        """Store `engine` under `key` atomically; returns its path."""
        if not engine:
            raise ValueError("refusing to cache an empty engine")
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, engine, mode=0o644)
        return path

    @contextlib.contextmanager
    def lock(self, key: EngineKey) -> Iterator[None]:
        """Hold an exclusive lock for `key` across processes, so two that
        need the same engine build it once (a build takes minutes on a
        Jetson). The lock file is left in place; it is empty and reused."""
        lock_path = self.path(key).with_suffix(".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def prune(self, keep: Collection[EngineKey]) -> list[Path]:
        """Delete every cached engine not in `keep` (old artifacts, engines of
        a TensorRT version or GPU this device no longer has) and leftover temp
        and lock files; returns what was removed. Engines are large, and an
        edge device's disk is small."""
        wanted = {self.path(key) for key in keep}
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for path in sorted(self.root.rglob("*"), reverse=True):
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()  # only succeeds once empty
                continue
            if path in wanted:
                continue
            if path.suffix == ".lock" and path.with_suffix(ENGINE_SUFFIX) in wanted:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        return removed


# ------------------------------------------------------------ engine build


def _make_logger(trt: ModuleType, sink: list[str]) -> Any:
    """A trt.ILogger (the documented subclassing pattern) that forwards to
    Python logging and keeps warnings and errors, so a failed build raises
    with TensorRT's own words instead of leaving them on stderr."""
    warning = int(trt.ILogger.Severity.WARNING)

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            # Lower is more severe: INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE.
            level = int(severity)
            if level < warning:
                sink.append(msg)
                log.error("TensorRT: %s", msg)
            elif level == warning:
                sink.append(msg)
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _parse_onnx(trt: ModuleType, network: Any, logger: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so external weight files next to
    # the model resolve.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(
            f"TensorRT cannot parse {onnx_path.name}: " + ("; ".join(errors) or "no details")
        )
    return parser


def _set_precision(trt: ModuleType, config: Any, precision: str) -> None:
    """Precision flags for TensorRT 10's weakly typed networks. fp16: allow
    fp16 kernels. int8: the ONNX carries Q/DQ (explicit quantization), which
    TensorRT 10 only honours with INT8 enabled; FP16 too so the layers left
    unquantized need not fall back to fp32."""
    flags = {"fp16": ("FP16",), "int8": ("INT8", "FP16")}.get(precision)
    if flags is None:
        raise EngineBuildError(f"unknown precision {precision!r} (expected fp16 or int8)")
    for flag in flags:
        # TensorRT 11 removed these flags: its networks are strongly typed and
        # take precision from the ONNX itself, which ours already carries.
        member = getattr(trt.BuilderFlag, flag, None)
        if member is not None:
            config.set_flag(member)


def _add_profile(builder: Any, network: Any, config: Any, spec: Mapping[str, Any]) -> None:
    """One optimization profile from the spec's shape ranges. Every network
    input with a dynamic dimension must have a range, or the build fails
    later with a less helpful message."""
    ranges = {entry["input"]: entry for entry in spec["profile"]}
    profile = builder.create_optimization_profile()
    missing = []
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        entry = ranges.get(tensor.name)
        if entry is None:
            if any(int(d) < 0 for d in tensor.shape):
                missing.append(f"{tensor.name} {list(tensor.shape)}")
            continue
        profile.set_shape(tensor.name, entry["min"], entry["opt"], entry["max"])
    if missing:
        raise EngineBuildError(
            "the engine-build spec has no shape range for dynamic inputs " + ", ".join(missing)
        )
    names = {network.get_input(index).name for index in range(network.num_inputs)}
    unknown = sorted(set(ranges) - names)
    if unknown:
        # A spec for another model (or a renamed input): building anyway
        # would tune the engine for shapes nobody asked for.
        raise EngineBuildError(
            f"the engine-build spec has shape ranges for {unknown}, which are not inputs "
            f"of the model (it has {sorted(names)})"
        )
    if ranges:
        config.add_optimization_profile(profile)


def build_engine(
    onnx_path: Path,
    spec: Mapping[str, Any],
    cache: EngineCache,
    *,
    artifact_sha256: str | None = None,
) -> Path:
    """The engine for `onnx_path` built per `spec`, from `cache` when this
    TensorRT, this GPU, this artifact and this spec were built before.

    `spec` holds the TensorRTBuildSpec fields: precision ("fp16" | "int8"),
    workspace_mb, and profile [{input, min, opt, max}]. `artifact_sha256` is
    the manifest's digest, when the caller has it (saves hashing the file).
    Raises RuntimeUnavailable (no TensorRT, no CUDA bindings, no GPU) or
    EngineBuildError (TensorRT's errors)."""
    trt = import_tensorrt()
    gpu = gpu_identity()
    spec = normalize_spec(spec)
    key = EngineKey(
        tensorrt_version=str(trt.__version__),
        gpu=gpu,
        artifact_sha256=artifact_sha256 or file_sha256(onnx_path),
        spec_sha256=spec_digest(spec),
    )
    cached = cache.get(key)
    if cached is not None:
        return cached
    with cache.lock(key):
        cached = cache.get(key)  # another process may have built it meanwhile
        if cached is not None:
            return cached
        log.info(
            "building a TensorRT %s engine for %s on %s (sm %s); this can take minutes",
            spec.get("precision"),
            onnx_path.name,
            gpu.name,
            gpu.compute_capability,
        )
        serialized = _build_serialized(trt, onnx_path, spec)
        return cache.put(key, serialized)


def _build_serialized(trt: ModuleType, onnx_path: Path, spec: Mapping[str, Any]) -> bytes:
    messages: list[str] = []
    logger = _make_logger(trt, messages)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; the EXPLICIT_BATCH flag
    # is deprecated and ignored, so no creation flags are passed.
    network = builder.create_network(0)
    parser = _parse_onnx(trt, network, logger, onnx_path)
    config = builder.create_builder_config()
    workspace_mb = spec["workspace_mb"]
    if workspace_mb > 0:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb * _MIB)
    _set_precision(trt, config, spec["precision"])
    _add_profile(builder, network, config, spec)
    serialized = builder.build_serialized_network(network, config)
    del parser  # the network refers to the parser's weights until the build is done
    if serialized is None:
        detail = "; ".join(messages[-5:]) or "TensorRT gave no reason"
        raise EngineBuildError(f"TensorRT could not build an engine for {onnx_path.name}: {detail}")
    return bytes(serialized)


# ------------------------------------------------------------------ runner


@dataclass
class _DeviceBuffer:
    pointer: int = 0
    nbytes: int = 0


class TensorRtRunner:
    """A serialized engine, loaded for inference on CUDA device 0.

    `path` is an engine file (from build_engine). When it is the artifact's
    ONNX instead, pass `spec` and `cache` and the engine is built or taken
    from the cache first. `threads` is accepted for the Runner interface and
    ignored: TensorRT runs on the GPU.

    Inputs and outputs are host numpy arrays; each `run` copies inputs to the
    GPU, executes on the runner's own stream and copies outputs back. Device
    buffers are kept between runs and grown when a larger shape arrives. One
    runner serves one thread at a time (an execution context is not
    re-entrant)."""

    def __init__(
        self,
        path: Path,
        threads: int = 1,
        *,
        spec: Mapping[str, Any] | None = None,
        cache: EngineCache | None = None,
    ) -> None:
        del threads  # the GPU schedules itself
        self._closed = True  # until everything below exists; see close()
        trt = import_tensorrt()
        cudart = import_cudart()
        gpu_identity()  # a clear RuntimeUnavailable when no GPU is visible
        if path.suffix.lower() == ".onnx":
            if spec is None or cache is None:
                raise ValueError(
                    f"{path.name} is an ONNX model: pass its engine-build spec and an "
                    "EngineCache (or build_engine() first and open the engine)"
                )
            path = build_engine(path, spec, cache)
        self._trt, self._cudart = trt, cudart
        messages: list[str] = []
        self._logger = _make_logger(trt, messages)  # TensorRT keeps a reference
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            detail = "; ".join(messages[-3:]) or "no details"
            raise EngineBuildError(
                f"TensorRT {trt.__version__} cannot load engine {path.name} ({detail}); an "
                "engine only loads on the TensorRT version and GPU that built it, so "
                "rebuild it from the artifact's ONNX on this device"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise CudaError("TensorRT could not create an execution context (out of GPU memory?)")
        self._stream = _cuda(cudart, "cudaStreamCreate")
        self._buffers: dict[str, _DeviceBuffer] = {}
        self._closed = False
        inputs, outputs = [], []
        for index in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(index)
            info = TensorInfo(
                name,
                np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))).name,
                tuple(int(d) for d in self._engine.get_tensor_shape(name)),
            )
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(info)
            else:
                outputs.append(info)
        # The ONNX parser adds network inputs and outputs in the graph's
        # order, and the engine keeps it, so this is the ONNX output order.
        self._inputs, self._outputs = tuple(inputs), tuple(outputs)

    @property
    def inputs(self) -> Sequence[TensorInfo]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorInfo]:
        return self._outputs

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device allocation of at least `nbytes` for tensor `name`."""
        buffer = self._buffers.setdefault(name, _DeviceBuffer())
        if buffer.nbytes < nbytes:
            if buffer.pointer:
                _cuda(self._cudart, "cudaFree", buffer.pointer)
                buffer.pointer, buffer.nbytes = 0, 0
            # Never a zero-byte allocation: an empty tensor still needs a
            # valid address to bind.
            buffer.pointer = int(_cuda(self._cudart, "cudaMalloc", max(nbytes, 1)))
            buffer.nbytes = max(nbytes, 1)
        return buffer.pointer

    def _profile_range(self, name: str) -> str:
        try:
            low, _, high = self._engine.get_tensor_profile_shape(name, 0)
            return f"between {list(low)} and {list(high)}"
        except Exception:  # no profile (static engine): the shape is fixed
            return f"exactly {list(self._engine.get_tensor_shape(name))}"

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self._closed:
            raise RuntimeError("the TensorRT runner is closed")
        cudart, context = self._cudart, self._context
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        missing = [t.name for t in self._inputs if t.name not in inputs]
        if missing:
            raise ValueError(f"missing inputs {missing}")
        # Host arrays must outlive the async copies, so they are kept here
        # until the stream is synchronized.
        staged: list[np.ndarray] = []
        for spec in self._inputs:
            array = np.ascontiguousarray(inputs[spec.name], dtype=np.dtype(spec.dtype))
            if not context.set_input_shape(spec.name, array.shape):
                raise ValueError(
                    f"input {spec.name!r} has shape {list(array.shape)}; this engine takes "
                    f"shapes {self._profile_range(spec.name)} (its build profile)"
                )
            pointer = self._buffer(spec.name, array.nbytes)
            _cuda(
                cudart,
                "cudaMemcpyAsync",
                pointer,
                array.ctypes.data,
                array.nbytes,
                to_device,
                self._stream,
            )
            context.set_tensor_address(spec.name, pointer)
            staged.append(array)
        results: list[np.ndarray] = []
        for spec in self._outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                # Data-dependent output shapes (NonZero, NMS) need an
                # IOutputAllocator; not supported yet.
                raise EngineBuildError(
                    f"output {spec.name!r} has a data-dependent shape {list(shape)}, which "
                    "this runner does not support"
                )
            host = np.empty(shape, dtype=np.dtype(spec.dtype))
            context.set_tensor_address(spec.name, self._buffer(spec.name, host.nbytes))
            results.append(host)
        if not context.execute_async_v3(self._stream):
            raise CudaError("TensorRT execute_async_v3 failed; see the TensorRT log")
        for spec, host in zip(self._outputs, results, strict=True):
            _cuda(
                cudart,
                "cudaMemcpyAsync",
                host.ctypes.data,
                self._buffers[spec.name].pointer,
                host.nbytes,
                to_host,
                self._stream,
            )
        _cuda(cudart, "cudaStreamSynchronize", self._stream)
        del staged
        return results

    def close(self) -> None:
        """Free device buffers and the stream. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for buffer in self._buffers.values():
            if buffer.pointer:
                with contextlib.suppress(CudaError):
                    _cuda(self._cudart, "cudaFree", buffer.pointer)
        self._buffers.clear()
        with contextlib.suppress(CudaError):
            _cuda(self._cudart, "cudaStreamDestroy", self._stream)
        # Context before engine before runtime: TensorRT's documented
        # destruction order.
        self._context = None
        self._engine = None
        self._runtime = None

    def __enter__(self) -> TensorRtRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
