"""The models this device serves, by name: the one active version of each,
and the previous one kept warm as a standby until the update commits.

Swaps are atomic without a lock held during inference. Each name has a slot
holding an immutable `LoadedModel`; a request reads the slot once and runs
on that object to the end, so `activate` and `rollback` only replace the
reference: requests that started on the old model finish on it (they hold
it), new ones start on the new one. A model dropped from its slot is freed
when its last request lets go of it.

`activate` loads the new artifact and warms it (one run on golden inputs,
else zeros) *before* it is swapped in, so the first request never pays the
load, and a model that cannot run never becomes active.

Runtimes block, so inference runs in a thread pool; ONNX Runtime sessions
are thread-safe, LiteRT interpreters and TensorRT contexts are not, so runs
on one of those are serialized per loaded model (never across models).

This module knows nothing of gRPC: errors are ServingError subclasses, and
agent/inference_server.py maps them to status codes in one place."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from agent.errors import AgentError
from agent.runtimes import ONNXRUNTIME, Runner, TensorInfo, open_runner

log = logging.getLogger(__name__)

OK, ERROR, TIMEOUT = "ok", "error", "timeout"


# ---------------------------------------------------------------- errors


class ServingError(AgentError):
    """A request or a model change the host refused."""

    title = "Inference error"


class ModelNotFound(ServingError):
    """No model of that name is assigned to this device."""

    title = "Unknown model"


class NoActiveModel(ServingError):
    """The model is known but no version of it is active (not yet
    downloaded, or its only version was rolled back)."""

    title = "No active model"


class InvalidInput(ServingError):
    """A request's tensors do not match the model's inputs."""

    title = "Invalid input"


class DeadlineExceeded(ServingError):
    """The request's deadline passed before inference finished."""

    title = "Deadline exceeded"


class InferenceFailed(ServingError):
    """The runtime raised while running a valid request."""

    title = "Inference failed"


class ActivationFailed(ServingError):
    """A new version could not be loaded or warmed; the old one still serves."""

    title = "Activation failed"


# ---------------------------------------------------------------- ports


class Recorder(Protocol):
    """Told about every request that reached a model version (telemetry).
    `outcome` is "ok", "error" or "timeout". Must be cheap and not raise."""

    def record(self, model: str, version: str, latency_s: float, outcome: str) -> None: ...


RunnerFactory = Callable[..., Runner]


@dataclass(frozen=True)
class ModelSpec:
    """The source ONNX model's inputs and outputs, as the manifest lists
    them: what requests are validated against and what metadata shows."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class LoadedModel:
    """One loaded, warmed version. Immutable: a swap replaces it whole."""

    name: str
    version: str
    digest: str
    runtime: str
    path: Path
    runner: Runner
    spec: ModelSpec
    # Serializes runs on runtimes whose sessions are not thread-safe.
    run_lock: AbstractContextManager[object] = field(compare=False, repr=False)

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with self.run_lock:
            return self.runner.run(inputs)


@dataclass(frozen=True)
class Prediction:
    # The version that ran the request (it may no longer be active).
    model: LoadedModel
    outputs: list[np.ndarray]


@dataclass
class _Slot:
    active: LoadedModel | None = None
    standby: LoadedModel | None = None
    # An activation not yet committed or rolled back.
    pending: bool = False


# ---------------------------------------------------------------- tensors


def decode_tensor(name: str, dtype: str, shape: Sequence[int], data: bytes) -> np.ndarray:
    """A row-major little-endian tensor as a numpy array (no copy); raises
    InvalidInput naming the tensor when dtype, shape and size disagree."""
    try:
        parsed = np.dtype(dtype)
    except TypeError:
        raise InvalidInput(f"input {name!r}: unknown dtype {dtype!r}") from None
    if parsed.hasobject or parsed.kind in "OUSV" or str(parsed) != dtype:
        raise InvalidInput(
            f"input {name!r}: unsupported dtype {dtype!r} (use a numpy name, e.g. float32)"
        )
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r}: negative dimension in shape {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    expected = count * parsed.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"input {name!r}: {len(data)} bytes of data, but {dtype} {list(shape)} needs {expected}"
        )
    return np.frombuffer(data, dtype=parsed.newbyteorder("<")).reshape(tuple(shape))


def encode_tensor(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """(dtype name, shape, little-endian bytes) of an array."""
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return array.dtype.name, list(array.shape), little.tobytes()


def check_inputs(spec: Sequence[TensorInfo], inputs: Mapping[str, np.ndarray]) -> None:
    """Raise InvalidInput, naming the tensor, unless `inputs` has exactly
    the spec's tensors with its dtypes and shapes (-1 dimensions free)."""
    names = {t.name for t in spec}
    unknown = sorted(set(inputs) - names)
    if unknown:
        raise InvalidInput(
            f"input {unknown[0]!r} is not an input of the model "
            f"(inputs: {', '.join(sorted(names))})"
        )
    for tensor in spec:
        array = inputs.get(tensor.name)
        if array is None:
            raise InvalidInput(f"input {tensor.name!r} is missing")
        if array.dtype.name != tensor.dtype:
            raise InvalidInput(
                f"input {tensor.name!r}: dtype {array.dtype.name}, the model takes {tensor.dtype}"
            )
        fits = len(array.shape) == len(tensor.shape) and all(
            want < 0 or got == want for got, want in zip(array.shape, tensor.shape, strict=True)
        )
        if not fits:
            raise InvalidInput(
                f"input {tensor.name!r}: shape {list(array.shape)}, the model takes "
                f"{list(tensor.shape)} (-1: any size)"
            )


def warm_inputs(spec: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    """Zeros of each input's shape, dynamic dimensions taken as 1."""
    return {
        t.name: np.zeros(tuple(d if d >= 0 else 1 for d in t.shape), dtype=np.dtype(t.dtype))
        for t in spec
    }


# ---------------------------------------------------------------- the host


class ModelHost:
    """Per model name: the active version and a warm standby.

    Model changes (`declare`, `activate`, `rollback`, `commit`) are blocking
    calls meant for the update machine's thread; `predict` is a coroutine for
    the inference server's event loop. A short lock guards slot changes only;
    inference never holds it."""

    def __init__(
        self,
        *,
        workers: int = 2,
        threads: int = 1,
        recorder: Recorder | None = None,
        open_model: RunnerFactory = open_runner,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="infer")
        self._threads = threads
        self._recorder = recorder
        self._open = open_model
        self._clock = clock
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ changes

    def declare(self, name: str) -> None:
        """Make `name` known with nothing active yet: until a version is
        activated, requests for it fail with NoActiveModel, not ModelNotFound."""
        with self._lock:
            self._slots.setdefault(name, _Slot())

    def activate(
        self,
        name: str,
        version: str,
        digest: str,
        path: Path,
        runtime: str,
        manifest_specs: ModelSpec | None = None,
        *,
        golden_inputs: Mapping[str, np.ndarray] | None = None,
    ) -> LoadedModel:
        """Load `path` in `runtime`, warm it, then make it the active version
        of `name`; the committed version it replaces becomes the standby
        (a version activated but never committed is dropped instead). Raises
        ActivationFailed, leaving the slot as it was, when the artifact does
        not load or its warm-up run fails."""
        spec = manifest_specs
        try:
            runner = self._open(
                path,
                runtime,
                threads=self._threads,
                onnx_inputs=spec.inputs if spec else None,
                onnx_outputs=spec.outputs if spec else None,
            )
        except Exception as exc:
            raise ActivationFailed(
                f"{name} {version}: cannot load {path.name} in {runtime}: {exc}"
            ) from exc
        if spec is None:
            spec = ModelSpec(tuple(runner.inputs), tuple(runner.outputs))
        lock: AbstractContextManager[object] = (
            nullcontext() if runtime == ONNXRUNTIME else threading.Lock()
        )
        model = LoadedModel(name, version, digest, runtime, path, runner, spec, lock)
        warm = dict(golden_inputs) if golden_inputs is not None else warm_inputs(spec.inputs)
        try:
            model.run(warm)
        except Exception as exc:
            raise ActivationFailed(f"{name} {version}: warm-up run failed: {exc}") from exc
        with self._lock:
            slot = self._slots.setdefault(name, _Slot())
            # Activating twice before a commit keeps the committed version
            # as the standby: that is what a rollback must go back to.
            if not slot.pending:
                slot.standby = slot.active
            slot.active, slot.pending = model, True
        log.info("model %s %s (%s) active", name, version, runtime)
        return model

    def rollback(self, name: str) -> LoadedModel | None:
        """Undo the last uncommitted activation of `name`: the standby
        becomes active again (after a first activation: nothing is active).
        Returns what is active now. Idempotent: with no uncommitted
        activation it changes nothing."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                return None
            if slot.pending:
                slot.active, slot.standby, slot.pending = slot.standby, None, False
            restored = slot.active
        log.info("model %s rolled back to %s", name, restored.version if restored else "nothing")
        return restored

    def commit(self, name: str) -> None:
        """Drop the standby of `name`; idempotent."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None:
                slot.standby, slot.pending = None, False

    def remove(self, name: str) -> None:
        """Forget `name`: further requests fail with ModelNotFound."""
        with self._lock:
            self._slots.pop(name, None)

    # ------------------------------------------------------------ queries

    def active(self, name: str) -> LoadedModel:
        """The active version of `name`; ModelNotFound or NoActiveModel."""
        slot = self._slots.get(name)
        if slot is None:
            raise ModelNotFound(f"no model named {name!r} on this device")
        model = slot.active
        if model is None:
            raise NoActiveModel(f"model {name!r} has no active version on this device yet")
        return model

    def standby(self, name: str) -> LoadedModel | None:
        slot = self._slots.get(name)
        return slot.standby if slot else None

    def names(self) -> list[str]:
        return sorted(self._slots)

    # ------------------------------------------------------------ inference

    async def predict(
        self, name: str, inputs: Mapping[str, np.ndarray], *, timeout_s: float | None = None
    ) -> Prediction:
        """Run the active version of `name` on `inputs` within `timeout_s`
        (None: no deadline). A swap during the call does not affect it."""
        model = self.active(name)  # read once: this request stays on it
        started = self._clock()
        outcome = ERROR
        try:
            check_inputs(model.spec.inputs, inputs)
            if timeout_s is not None and timeout_s <= 0:
                outcome = TIMEOUT
                raise DeadlineExceeded(f"deadline passed before {name} {model.version} ran")
            loop = asyncio.get_running_loop()
            job = loop.run_in_executor(self._pool, model.run, inputs)
            try:
                outputs = await asyncio.wait_for(job, timeout_s)
            except TimeoutError:
                outcome = TIMEOUT
                raise DeadlineExceeded(
                    f"{name} {model.version} did not finish within {timeout_s:.3f} s"
                ) from None
            except Exception as exc:
                raise InferenceFailed(f"{name} {model.version}: {exc}") from exc
            outcome = OK
            return Prediction(model, outputs)
        finally:
            self._record(model, self._clock() - started, outcome)

    def _record(self, model: LoadedModel, latency_s: float, outcome: str) -> None:
        if self._recorder is None:
            return
        try:
            self._recorder.record(model.name, model.version, latency_s, outcome)
        except Exception:
            log.exception("telemetry recorder failed")

    def close(self) -> None:
        """Stop the thread pool (waiting for runs in progress)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
