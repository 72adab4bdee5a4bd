"""The models this device serves, by name: the one active version of each,
the previous one kept warm as a standby until the update commits, and a
shadow (a rollout's candidate, mirrored but never answering).

Swaps are atomic without a lock held during inference. Each name has a slot
holding an immutable `LoadedModel`; a request reads the slot once and runs
on that object to the end, so `activate` and `rollback` only replace the
reference: requests that started on the old model finish on it (they hold
it), new ones start on the new one. A model dropped from its slot is freed
when its last request lets go of it.

`activate` loads the new artifact and warms it (one run on golden inputs,
else zeros) *before* it is swapped in, so the first request never pays the
load, and a model that cannot run never becomes active.

Requests are validated against what the loaded artifact really accepts: the
manifest's spec, with any dimension the runner fixes filled in (a TFLite
artifact converted with a batch of 1 refuses a batch of 8 as InvalidInput,
naming the accepted shape, instead of failing inside the runtime).

Two entry points run a request, with the same validation, deadline,
concurrency limit and telemetry: `predict_sync` runs the model inline on the
caller's thread (the inference servers call it from their own threads: for
small models the hop to another thread costs more than the model), and
`predict`, a coroutine that runs it in the host's thread pool. ONNX Runtime
sessions are thread-safe, LiteRT interpreters and TensorRT contexts are not,
so runs on one of those are serialized per loaded model (never across models).

At most `workers` requests run inference at once, whatever thread they come
from; `set_concurrency_limit` lowers that at run time (the power policy does,
on a hot or flat device). A request waits for a free slot, and its deadline
runs while it waits.

numpy is imported where it is used, not at import time: the agent imports
this module at startup, and an idle agent with no model should not carry
numpy's ~12 MB (the runtimes import it when a model loads).

Shadow mirroring (a rollout's shadow stage, docs/agent-updates.md): a name
may have a shadow version loaded beside its active one. A request the active
version answered successfully (either entry point) is handed, with that
answer, to one background thread that runs the shadow on the same inputs
and compares (`compare_outputs`); the recorder's optional `record_shadow`
gets the figures. At most `shadow_max_per_s` requests a second are mirrored
(a token bucket; 0 turns mirroring off), the hand-over is a bounded queue
that drops when full, and the shadow run takes no inference slot: mirroring
never makes an app wait, and a shadow that fails or hangs cannot fail an
app's request. A device short of CPU sees the shadow compete for it, which
is why the rate is capped.

Fallback artifacts (docs/power.md): a version may come with a lighter
fallback artifact (e.g. int8 beside fp32). The host holds one preference for
every model, `set_variant(PRIMARY | FALLBACK)` (the power policy sets it);
each model whose active version has a fallback serves the preferred
artifact, the others their primary. Only the served artifact is loaded: a
switch loads and warms the other one first, then swaps it into the slot like
an activation (requests in flight finish on the one they hold, none fails),
and lets the old one go. Switching blocks while it loads, so it runs on the
caller's thread (the power policy's, never the event loop or a request's).
A version activated, or rolled back to, serves the current preference. A
fallback that fails to load at a switch is logged and the model keeps
serving its primary. Every LoadedModel says which `variant` it is, so answers
and telemetry say which artifact served each request. Changes to one model
(activate, rollback, a switch) are serialized per model name; they never
block requests or other models.

This module knows nothing of gRPC: errors are ServingError subclasses, and
agent/inference_server.py maps them to status codes in one place."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

from edgefleet.agent.errors import AgentError
from edgefleet.agent.runtimes import ONNXRUNTIME, Runner, TensorInfo, open_runner
from edgefleet.agent.runtimes.memory import LoadMeter, preload
from edgefleet.v1 import common_pb2

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

OK, ERROR, TIMEOUT = "ok", "error", "timeout"

# common_pb2.ArtifactVariant's values (ValueType is int at run time).
Variant: TypeAlias = common_pb2.ArtifactVariant.ValueType
PRIMARY: Variant = common_pb2.ARTIFACT_VARIANT_PRIMARY
FALLBACK: Variant = common_pb2.ARTIFACT_VARIANT_FALLBACK
VARIANT_NAMES: dict[int, str] = {PRIMARY: "primary", FALLBACK: "fallback"}


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


@runtime_checkable
class ShadowRecorder(Protocol):
    """What a Recorder may also have (checked once, not required, so
    recorders written before shadows existed keep working): told about
    every mirrored request, on the shadow thread. Must not raise."""

    def record_shadow(
        self,
        model: str,
        active_version: str,
        shadow_version: str,
        agreed_rows: int,
        total_rows: int,
        max_diff: float,
        latency_s: float,
    ) -> None: ...


@runtime_checkable
class VariantRecorder(Protocol):
    """What a Recorder may also have (checked once, like ShadowRecorder):
    called instead of `record`, with the variant of the artifact that ran
    the request (PRIMARY or FALLBACK). Must be cheap and not raise."""

    def record_variant(
        self, model: str, version: str, latency_s: float, outcome: str, variant: Variant
    ) -> None: ...


RunnerFactory = Callable[..., Runner]


@dataclass(frozen=True)
class ModelSpec:
    """The source ONNX model's inputs and outputs, as the manifest lists
    them: what requests are validated against and what metadata shows."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class Artifact:
    """One artifact file of a version, as the host loads it: a version's
    fallback (`ModelHost.activate`'s `fallback`), loaded when the host
    prefers it."""

    digest: str
    path: Path
    runtime: str
    # The manifest's inputs and outputs (None: the runner's own).
    spec: ModelSpec | None = None
    # Warm-up inputs (None: zeros of the inputs' shapes).
    golden_inputs: Mapping[str, np.ndarray] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class LoadedModel:
    """One loaded, warmed artifact of a version. Immutable: a swap replaces
    it whole."""

    name: str
    version: str
    digest: str
    runtime: str
    path: Path
    runner: Runner
    spec: ModelSpec
    # The inputs requests are checked against: spec.inputs with the
    # dimensions the runner fixes filled in (see accepted_inputs).
    accepts: tuple[TensorInfo, ...]
    # Serializes runs on runtimes whose sessions are not thread-safe.
    run_lock: AbstractContextManager[object] = field(compare=False, repr=False)
    # The memory it adds to the process (MB), measured as the build host
    # measures a candidate: the resident set's peak while loading and
    # warming it, minus the resident set before, its runtime's library
    # already loaded (agent.runtimes.memory). Telemetry reports it as the
    # model's model_memory_mb. 0: not measured (another model loaded at the
    # same time and would have blurred it, or no resident set to read).
    memory_mb: float = 0.0
    # Which of the version's artifacts this is (`digest` is its digest).
    variant: Variant = PRIMARY
    # The version's artifacts, whichever of them this is: what a switch
    # loads. `fallback` None: the version has none.
    primary: Artifact | None = field(default=None, compare=False, repr=False)
    fallback: Artifact | None = field(default=None, compare=False, repr=False)
    # Intra-op threads it was loaded with (None: the host's).
    threads: int | None = field(default=None, compare=False, repr=False)

    @property
    def primary_digest(self) -> str:
        """The digest of the version's primary artifact (what the update
        records name the version by), whichever artifact serves."""
        return self.primary.digest if self.primary is not None else self.digest

    @property
    def fallback_digest(self) -> str:
        """The digest of the version's fallback artifact; "" when it has none."""
        return self.fallback.digest if self.fallback is not None else ""

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
    # The candidate requests are mirrored to (never answers an app).
    shadow: LoadedModel | None = None


@dataclass(frozen=True)
class ShadowComparison:
    """How a shadow's answer to one request compared with the active one's."""

    agreed_rows: int
    total_rows: int
    # Largest |active - shadow| over every output; INCOMPARABLE when the
    # outputs' shapes differ or a difference is not finite (NaN, inf).
    max_diff: float


@dataclass(frozen=True)
class _ShadowJob:
    active: LoadedModel
    shadow: LoadedModel
    inputs: Mapping[str, np.ndarray]
    expected: list[np.ndarray]


# ---------------------------------------------------------------- tensors


@functools.lru_cache(maxsize=64)
def _wire_dtype(name: str) -> np.dtype[Any] | None:
    """The little-endian numpy dtype a wire dtype name stands for; None
    when the name is not a plain numeric numpy name. Cached: parsing a dtype
    costs more than decoding a small tensor."""
    import numpy as np

    try:
        parsed = np.dtype(name)
    except TypeError:
        return None
    if parsed.hasobject or parsed.kind in "OUSV" or str(parsed) != name:
        return None
    return parsed.newbyteorder("<")


@functools.lru_cache(maxsize=64)
def dtype_name(dtype: np.dtype[Any]) -> str:
    """`dtype.name`, cached: numpy builds that string anew on every access
    (about 1.5 us, as much as the rest of validating a small request)."""
    return dtype.name


def decode_tensor(name: str, dtype: str, shape: Sequence[int], data: bytes) -> np.ndarray:
    """A row-major little-endian tensor as a numpy array (no copy); raises
    InvalidInput naming the tensor when dtype, shape and size disagree."""
    import numpy as np

    parsed = _wire_dtype(dtype)
    if parsed is None:
        try:
            np.dtype(dtype)
        except TypeError:
            raise InvalidInput(f"input {name!r}: unknown dtype {dtype!r}") from None
        raise InvalidInput(
            f"input {name!r}: unsupported dtype {dtype!r} (use a numpy name, e.g. float32)"
        )
    dims = tuple(shape)
    if any(d < 0 for d in dims):
        raise InvalidInput(f"input {name!r}: negative dimension in shape {list(dims)}")
    expected = math.prod(dims) * parsed.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"input {name!r}: {len(data)} bytes of data, but {dtype} {list(dims)} needs {expected}"
        )
    return np.frombuffer(data, dtype=parsed).reshape(dims)


def encode_tensor(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """(dtype name, shape, little-endian bytes) of an array."""
    import numpy as np

    order = array.dtype.byteorder
    big = order == ">" or (order == "=" and sys.byteorder == "big")
    if big or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return dtype_name(array.dtype), list(array.shape), array.tobytes()


def check_inputs(
    spec: Sequence[TensorInfo],
    inputs: Mapping[str, np.ndarray],
    *,
    declared: Sequence[TensorInfo] | None = None,
) -> None:
    """Raise InvalidInput, naming the tensor, unless `inputs` has exactly
    the spec's tensors with its dtypes and shapes (-1 dimensions free).
    `declared` is the model's own spec when `spec` is stricter (the
    artifact fixes a dimension the model leaves free): the message then
    says so, since the caller read the model's spec, not the artifact's."""
    names = {t.name for t in spec}
    unknown = sorted(set(inputs) - names)
    if unknown:
        raise InvalidInput(
            f"input {unknown[0]!r} is not an input of the model "
            f"(inputs: {', '.join(sorted(names))})"
        )
    loose = {t.name: t.shape for t in declared} if declared is not None else {}
    for tensor in spec:
        array = inputs.get(tensor.name)
        if array is None:
            raise InvalidInput(f"input {tensor.name!r} is missing")
        if dtype_name(array.dtype) != tensor.dtype:
            raise InvalidInput(
                f"input {tensor.name!r}: dtype {array.dtype.name}, the model takes {tensor.dtype}"
            )
        fits = len(array.shape) == len(tensor.shape) and all(
            want < 0 or got == want for got, want in zip(array.shape, tensor.shape, strict=True)
        )
        if not fits:
            model_shape = loose.get(tensor.name, tensor.shape)
            if model_shape != tensor.shape:
                raise InvalidInput(
                    f"input {tensor.name!r}: shape {list(array.shape)}, the artifact on this "
                    f"device takes {list(tensor.shape)} (-1: any size; the model's spec "
                    f"allows {list(model_shape)}, but this artifact fixes the rest)"
                )
            raise InvalidInput(
                f"input {tensor.name!r}: shape {list(array.shape)}, the model takes "
                f"{list(tensor.shape)} (-1: any size)"
            )


def accepted_inputs(
    declared: Sequence[TensorInfo], actual: Sequence[TensorInfo]
) -> tuple[TensorInfo, ...]:
    """`declared` (the manifest's inputs) with every dimension it leaves free
    (-1) that the runner's input of the same name and rank fixes set to the
    runner's size. Where the two disagree otherwise, `declared` stands: the
    runner would refuse such a request itself."""
    by_name = {t.name: t for t in actual}
    accepted = []
    for tensor in declared:
        real = by_name.get(tensor.name)
        if real is None or len(real.shape) != len(tensor.shape):
            accepted.append(tensor)
            continue
        shape = tuple(
            have if want < 0 and have >= 0 else want
            for want, have in zip(tensor.shape, real.shape, strict=True)
        )
        accepted.append(replace(tensor, shape=shape))
    return tuple(accepted)


def warm_inputs(spec: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    """Zeros of each input's shape, dynamic dimensions taken as 1."""
    import numpy as np

    return {
        t.name: np.zeros(tuple(d if d >= 0 else 1 for d in t.shape), dtype=np.dtype(t.dtype))
        for t in spec
    }


# ---------------------------------------------------------------- shadow comparison

# A finite stand-in for "cannot be compared": telemetry must stay finite.
INCOMPARABLE = sys.float_info.max
# Rows of outputs that are not class scores agree when every value is this
# close (numpy.isclose) or, for integer and boolean outputs, equal.
SHADOW_RTOL = 1e-3
SHADOW_ATOL = 1e-5
# Mirrored requests waiting for the shadow thread; more are dropped.
SHADOW_QUEUE = 8
DEFAULT_SHADOW_MAX_PER_S = 20.0


def compare_outputs(
    active: Sequence[np.ndarray], shadow: Sequence[np.ndarray]
) -> ShadowComparison | None:
    """Compare a shadow's outputs with the active model's on one request.

    Rows are the first dimension of the first output (a 0-d output is one
    row); None when it has none (an empty batch: nothing to compare).

    - Class scores: a float first output of shape (rows, classes), classes
      > 1: a row agrees when both models pick the same class (argmax).
    - Any other first output (labels, regression values, maps): each row
      flattened; it agrees when every value is equal (integer, bool) or
      within SHADOW_RTOL/SHADOW_ATOL (float).
    - A first output of another shape, or a missing one: no row agrees.

    max_diff is the largest |active - shadow| over all outputs, in float64;
    INCOMPARABLE when any output's shape differs (or is missing) or a
    difference is NaN or infinite."""
    import numpy as np

    first: np.ndarray = np.asarray(active[0]) if active else np.zeros((0,))
    rows = int(first.shape[0]) if first.ndim else 1
    if rows == 0:
        return None
    max_diff = 0.0
    for index, expected in enumerate(active):
        if index >= len(shadow) or np.shape(shadow[index]) != np.shape(expected):
            max_diff = INCOMPARABLE
            continue
        if np.size(expected) == 0:
            continue
        diff = np.abs(
            np.asarray(expected, dtype=np.float64) - np.asarray(shadow[index], dtype=np.float64)
        )
        top = float(np.max(diff))
        max_diff = max(max_diff, top if math.isfinite(top) else INCOMPARABLE)
    if not shadow or np.shape(shadow[0]) != first.shape:
        return ShadowComparison(0, rows, max_diff)
    other = np.asarray(shadow[0])
    if first.ndim == 2 and first.shape[1] > 1 and first.dtype.kind == "f":
        agreed = int(np.count_nonzero(first.argmax(axis=1) == other.argmax(axis=1)))
    else:
        mine, theirs = first.reshape(rows, -1), other.reshape(rows, -1)
        if first.dtype.kind == "f" or other.dtype.kind == "f":
            same = np.isclose(mine, theirs, rtol=SHADOW_RTOL, atol=SHADOW_ATOL)
        else:
            same = mine == theirs
        agreed = int(np.count_nonzero(same.all(axis=1)))
    return ShadowComparison(agreed, rows, max_diff)


def _owned(arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> Any:
    """`arrays` safe to keep after the request returned: writable arrays are
    copied (a caller may reuse its buffers), read-only ones (decoded from a
    request's immutable bytes) are kept as they are."""
    if isinstance(arrays, Mapping):
        return {k: v.copy() if v.flags.writeable else v for k, v in arrays.items()}
    return [v.copy() if v.flags.writeable else v for v in arrays]


class _RateLimit:
    """A token bucket: at most `per_s` takes a second on average, bursts of
    up to max(1, per_s). per_s <= 0: never."""

    def __init__(self, per_s: float, clock: Callable[[], float]) -> None:
        self.per_s = per_s
        self._capacity = max(1.0, per_s)
        self._tokens = self._capacity
        self._clock = clock
        self._last: float | None = None
        self._lock = threading.Lock()

    def take(self) -> bool:
        if self.per_s <= 0:
            return False
        with self._lock:
            now = self._clock()
            if self._last is not None:
                self._tokens = min(
                    self._capacity, self._tokens + max(0.0, now - self._last) * self.per_s
                )
            self._last = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True


# ---------------------------------------------------------------- slots


class _Slots:
    """Counts requests running inference and makes new ones wait while
    `limit` of them are running. A condition variable, not a semaphore,
    because the limit changes at run time: lowering it lets the runs in
    progress finish and holds new ones until fewer than the new limit run."""

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._limit = limit
        self._running = 0

    def set_limit(self, limit: int) -> None:
        with self._cond:
            self._limit = limit
            # A higher limit may free several waiters at once.
            self._cond.notify_all()

    def acquire(self, deadline: float | None, clock: Callable[[], float]) -> bool:
        """Take a slot; False when `deadline` (on `clock`) passed first."""
        with self._cond:
            while self._running >= self._limit:
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - clock()
                if remaining <= 0:
                    return False
                # Lock waits refuse timeouts past TIMEOUT_MAX (~292 years).
                self._cond.wait(min(remaining, threading.TIMEOUT_MAX))
            self._running += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify()


# ---------------------------------------------------------------- the host


# What each load adds to this process's memory; one for the process, since
# every host in it shares the resident set.
_LOAD_METER = LoadMeter()


class ModelHost:
    """Per model name: the active version, a warm standby and a shadow.

    Model changes (`declare`, `activate`, `rollback`, `commit`,
    `load_shadow`, `drop_shadow`) are blocking calls meant for the update
    machine's thread, `set_variant` for the power policy's; `predict_sync`
    is for the inference servers' threads and `predict` for an event loop.
    A short lock guards slot changes only; inference never holds it.
    `shadow_max_per_s` caps the requests mirrored to shadows (0: none; see
    the module docstring)."""

    def __init__(
        self,
        *,
        workers: int = 2,
        threads: int = 1,
        recorder: Recorder | None = None,
        open_model: RunnerFactory = open_runner,
        clock: Callable[[], float] = time.perf_counter,
        providers: Sequence[str] | None = None,
        shadow_max_per_s: float = DEFAULT_SHADOW_MAX_PER_S,
    ) -> None:
        self._workers = max(1, workers)
        # ONNX Runtime execution providers for every model loaded here.
        self._providers = list(providers) if providers else None
        # Threads start on first use: a host that only serves predict_sync
        # never starts one.
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="infer")
        self._threads = threads
        self._recorder = recorder
        # The same recorder, when it also records shadow comparisons and
        # which artifact served.
        self._shadow_recorder = recorder if isinstance(recorder, ShadowRecorder) else None
        self._variant_recorder = recorder if isinstance(recorder, VariantRecorder) else None
        self._open = open_model
        self._clock = clock
        self._models: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        # Per model name: held while its slot changes in ways that load a
        # model (activate, rollback, a variant switch), so a switch never
        # swaps a variant of a version that was replaced meanwhile.
        self._changing: dict[str, threading.Lock] = {}
        self._preferred: Variant = PRIMARY
        self._concurrency_limit = 0
        self._slots = _Slots(self._workers)
        self._shadow_rate = _RateLimit(shadow_max_per_s, clock)
        self._shadow_jobs: queue.Queue[_ShadowJob | None] = queue.Queue(SHADOW_QUEUE)
        # Started with the first mirrored request: a host never given a
        # shadow never runs the thread.
        self._shadow_thread: threading.Thread | None = None
        self._shadow_closed = False
        self._shadow_dropped = 0
        self._shadow_failing: LoadedModel | None = None  # logged already

    # ------------------------------------------------------------ changes

    def declare(self, name: str) -> None:
        """Make `name` known with nothing active yet: until a version is
        activated, requests for it fail with NoActiveModel, not ModelNotFound."""
        with self._lock:
            self._models.setdefault(name, _Slot())

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
        threads: int | None = None,
        fallback: Artifact | None = None,
    ) -> LoadedModel:
        """Load `path` in `runtime`, warm it, then make it the active version
        of `name` (with `threads` intra-op threads, default the host's); the
        committed version it replaces becomes the standby
        (a version activated but never committed is dropped instead). With
        a `fallback` artifact, the version serves the one the host prefers
        (`set_variant`), and only that one is loaded. Raises
        ActivationFailed, leaving the slot as it was, when the artifact does
        not load or its warm-up run fails."""
        primary = Artifact(digest, path, runtime, manifest_specs, golden_inputs)
        with self._change_lock(name):
            variant = self._preferred if fallback is not None else PRIMARY
            model = self._load_variant(name, version, primary, fallback, variant, threads)
            with self._lock:
                slot = self._models.setdefault(name, _Slot())
                # Activating twice before a commit keeps the committed version
                # as the standby: that is what a rollback must go back to.
                if not slot.pending:
                    slot.standby = slot.active
                slot.active, slot.pending = model, True
        log.info("model %s %s (%s, %s artifact) active", name, version, model.runtime,
                 VARIANT_NAMES[model.variant])  # fmt: skip
        return model

    def load_shadow(
        self,
        name: str,
        version: str,
        digest: str,
        path: Path,
        runtime: str,
        manifest_specs: ModelSpec | None = None,
        *,
        golden_inputs: Mapping[str, np.ndarray] | None = None,
        threads: int | None = None,
    ) -> LoadedModel:
        """Load and warm `path` like `activate`, as the shadow of `name`:
        requests the active version answers are mirrored to it (module
        docstring), nothing else changes. Replaces any shadow `name` had.
        Raises ActivationFailed, leaving the slot as it was."""
        model = self._load(name, version, digest, path, runtime, manifest_specs,
                           golden_inputs, threads)  # fmt: skip
        with self._lock:
            self._models.setdefault(name, _Slot()).shadow = model
        log.info("model %s %s (%s) loaded as a shadow", name, version, runtime)
        return model

    def drop_shadow(self, name: str) -> None:
        """Stop mirroring `name` and let its shadow go; idempotent. Requests
        already handed to the shadow thread still run."""
        with self._lock:
            slot = self._models.get(name)
            dropped = slot.shadow if slot is not None else None
            if slot is not None:
                slot.shadow = None
        if dropped is not None:
            log.info("shadow %s %s dropped", name, dropped.version)

    def _change_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._changing.setdefault(name, threading.Lock())

    def _load_variant(
        self,
        name: str,
        version: str,
        primary: Artifact,
        fallback: Artifact | None,
        variant: Variant,
        threads: int | None,
    ) -> LoadedModel:
        """Load and warm `variant` of a version (its primary when it has no
        fallback); ActivationFailed naming the fallback when that fails."""
        chosen = fallback if variant == FALLBACK and fallback is not None else primary
        label = f"{name} {version}" + (" (fallback artifact)" if chosen is fallback else "")
        model = self._load(name, version, chosen.digest, chosen.path, chosen.runtime,
                           chosen.spec, chosen.golden_inputs, threads, label=label)  # fmt: skip
        return dataclasses.replace(
            model,
            variant=FALLBACK if chosen is fallback else PRIMARY,
            primary=primary,
            fallback=fallback,
            threads=threads,
        )

    def _load(
        self,
        name: str,
        version: str,
        digest: str,
        path: Path,
        runtime: str,
        manifest_specs: ModelSpec | None,
        golden_inputs: Mapping[str, np.ndarray] | None,
        threads: int | None,
        *,
        label: str | None = None,
    ) -> LoadedModel:
        """Open `path` and warm it; ActivationFailed when either fails.
        `label` names it in errors and logs (default: name and version)."""
        label = label or f"{name} {version}"
        spec = manifest_specs
        # The runtime's library first, outside the figure, as the build
        # host measures (agent.runtimes.memory); a missing runtime fails
        # the open below, with its message.
        with contextlib.suppress(Exception):
            preload(runtime)
        with _LOAD_METER.measure() as reading:
            try:
                runner = self._open(
                    path,
                    runtime,
                    threads=threads or self._threads,
                    onnx_inputs=spec.inputs if spec else None,
                    onnx_outputs=spec.outputs if spec else None,
                    providers=self._providers,
                )
            except Exception as exc:
                raise ActivationFailed(
                    f"{label}: cannot load {path.name} in {runtime}: {exc}"
                ) from exc
            if spec is None:
                spec = ModelSpec(tuple(runner.inputs), tuple(runner.outputs))
            accepts = accepted_inputs(spec.inputs, runner.inputs)
            lock: AbstractContextManager[object] = (
                nullcontext() if runtime == ONNXRUNTIME else threading.Lock()
            )
            model = LoadedModel(name, version, digest, runtime, path, runner, spec, accepts, lock)
            warm = dict(golden_inputs) if golden_inputs is not None else warm_inputs(accepts)
            try:
                model.run(warm)
            except Exception as exc:
                raise ActivationFailed(f"{label}: warm-up run failed: {exc}") from exc
        if reading.why:
            log.info("model %s loaded; its memory was not measured: %s", label, reading.why)
        else:
            log.info("model %s adds %.1f MB of memory (loaded and warmed)", label,
                     reading.added_mb)  # fmt: skip
        return dataclasses.replace(model, memory_mb=reading.added_mb)

    def rollback(self, name: str) -> LoadedModel | None:
        """Undo the last uncommitted activation of `name`: the standby
        becomes active again (after a first activation: nothing is active),
        serving the preferred variant (a switch while it stood by loads it
        now). Returns what is active now. Idempotent: with no uncommitted
        activation it changes nothing."""
        with self._change_lock(name):
            with self._lock:
                slot = self._models.get(name)
                if slot is None:
                    return None
                if slot.pending:
                    slot.active, slot.standby, slot.pending = slot.standby, None, False
                restored = slot.active
            log.info("model %s rolled back to %s", name,
                     restored.version if restored else "nothing")  # fmt: skip
            return self._follow_preference(name) or restored

    def commit(self, name: str) -> None:
        """Drop the standby of `name`; idempotent."""
        with self._lock:
            slot = self._models.get(name)
            if slot is not None:
                slot.standby, slot.pending = None, False

    def remove(self, name: str) -> None:
        """Forget `name`: further requests fail with ModelNotFound. Requests
        in flight hold the LoadedModel they started on and finish on it (its
        runner is released with the last reference); the other models are
        untouched."""
        with self._lock:
            self._models.pop(name, None)

    # ------------------------------------------------------------ variants

    @property
    def variant(self) -> Variant:
        """The preferred artifact variant (`set_variant`); PRIMARY at first."""
        return self._preferred

    def set_variant(self, variant: Variant) -> None:
        """Prefer `variant` (PRIMARY or FALLBACK) for every model: each model
        whose active version has a fallback is switched to that artifact
        (loaded and warmed first, then swapped in; requests in flight finish
        on the old one), one model at a time; the others keep their primary.
        Blocking: call it off the event loop and off request threads. A
        fallback that does not load is logged and its model keeps its
        primary; nothing raises but a `variant` that is neither."""
        if variant not in (PRIMARY, FALLBACK):
            raise ValueError(f"variant must be PRIMARY or FALLBACK, not {variant}")
        # Set first: an activation that starts from here on loads it, and
        # one already under way is followed up below (the per-model lock).
        self._preferred = variant
        for name in self.names():
            with self._change_lock(name):
                self._follow_preference(name)

    def _follow_preference(self, name: str) -> LoadedModel | None:
        """With `name`'s change lock held: swap the preferred variant of its
        active version in, if it has a fallback and serves the other one.
        Returns the new LoadedModel, None when nothing changed."""
        slot = self._models.get(name)
        current = slot.active if slot is not None else None
        want = self._preferred
        if current is None or current.fallback is None or current.variant == want:
            return None
        primary = current.primary or Artifact(current.digest, current.path, current.runtime,
                                              current.spec)  # fmt: skip
        try:
            model = self._load_variant(name, current.version, primary, current.fallback, want,
                                       current.threads)  # fmt: skip
        except ActivationFailed as exc:
            log.error("model %s keeps serving its %s artifact: %s", name,
                      VARIANT_NAMES[current.variant], exc.message)  # fmt: skip
            return None
        with self._lock:
            slot = self._models.get(name)
            if slot is None or slot.active is not current:
                return None  # removed meanwhile
            slot.active = model
        log.info("model %s %s now serves its %s artifact (%s)", name, model.version,
                 VARIANT_NAMES[model.variant], model.digest[:12])  # fmt: skip
        return model

    # ------------------------------------------------------------ concurrency

    @property
    def workers(self) -> int:
        """The most requests that ever run inference at once."""
        return self._workers

    @property
    def concurrency_limit(self) -> int:
        """The limit set by `set_concurrency_limit`; 0: none (`workers` still caps)."""
        return self._concurrency_limit

    def set_concurrency_limit(self, limit: int) -> None:
        """Let at most `limit` requests run inference at once (0: no limit
        beyond `workers`). Runs in progress finish; new requests wait for a
        slot, within their deadline."""
        if limit < 0:
            raise ValueError(f"concurrency limit must be >= 0, not {limit}")
        self._concurrency_limit = limit
        self._slots.set_limit(min(limit, self._workers) if limit else self._workers)

    # ------------------------------------------------------------ queries

    def active(self, name: str) -> LoadedModel:
        """The active version of `name`; ModelNotFound or NoActiveModel."""
        slot = self._models.get(name)
        if slot is None:
            # The names served: a device holds several models, and the
            # inference API has no call that lists them.
            served = ", ".join(self.names()) or "none"
            if not name:
                raise InvalidInput(f"model_name is required; this device serves: {served}")
            raise ModelNotFound(f"no model named {name!r} on this device; it serves: {served}")
        model = slot.active
        if model is None:
            raise NoActiveModel(f"model {name!r} has no active version on this device yet")
        return model

    def standby(self, name: str) -> LoadedModel | None:
        """The version a rollback of `name` would go back to, if any."""
        slot = self._models.get(name)
        return slot.standby if slot else None

    def shadow(self, name: str) -> LoadedModel | None:
        """The shadow version of `name` requests are mirrored to, if any."""
        slot = self._models.get(name)
        return slot.shadow if slot else None

    @property
    def shadow_dropped(self) -> int:
        """Mirrored requests dropped because the shadow thread was behind."""
        return self._shadow_dropped

    def names(self) -> list[str]:
        """The model names this host knows, sorted."""
        return sorted(self._models)

    def served(self) -> list[LoadedModel]:
        """The active version of every model, by name (telemetry reports
        each, with or without requests)."""
        with self._lock:
            slots = sorted(self._models.items())
        return [slot.active for _, slot in slots if slot.active is not None]

    # ------------------------------------------------------------ inference

    def predict_sync(
        self, name: str, inputs: Mapping[str, np.ndarray], *, timeout_s: float | None = None
    ) -> Prediction:
        """Run the active version of `name` on `inputs` on this thread,
        within `timeout_s` (None: no deadline). A run cannot be interrupted:
        one that finishes after the deadline is DeadlineExceeded all the
        same. A swap during the call does not affect it."""
        model = self.active(name)  # read once: this request stays on it
        started = self._clock()
        deadline = None if timeout_s is None else started + timeout_s
        outcome = ERROR
        try:
            check_inputs(model.accepts, inputs, declared=model.spec.inputs)
            outputs = self._run(model, inputs, deadline)
            if deadline is not None and self._clock() > deadline:
                raise DeadlineExceeded(
                    f"{name} {model.version} did not finish within {timeout_s:.3f} s"
                )
            outcome = OK
            self._mirror(model, inputs, outputs)
            return Prediction(model, outputs)
        except DeadlineExceeded:
            outcome = TIMEOUT
            raise
        finally:
            self._record(model, self._clock() - started, outcome)

    async def predict(
        self, name: str, inputs: Mapping[str, np.ndarray], *, timeout_s: float | None = None
    ) -> Prediction:
        """Run the active version of `name` on `inputs` in the host's thread
        pool within `timeout_s` (None: no deadline); past the deadline the
        caller gets DeadlineExceeded at once while the run, if it started,
        finishes in the pool. A swap during the call does not affect it."""
        model = self.active(name)  # read once: this request stays on it
        started = self._clock()
        deadline = None if timeout_s is None else started + timeout_s
        outcome = ERROR
        try:
            check_inputs(model.accepts, inputs, declared=model.spec.inputs)
            loop = asyncio.get_running_loop()
            job = loop.run_in_executor(self._pool, self._run, model, inputs, deadline)
            try:
                outputs = await asyncio.wait_for(job, timeout_s)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"{name} {model.version} did not finish within {timeout_s:.3f} s"
                ) from None
            outcome = OK
            self._mirror(model, inputs, outputs)
            return Prediction(model, outputs)
        except DeadlineExceeded:
            outcome = TIMEOUT
            raise
        finally:
            self._record(model, self._clock() - started, outcome)

    def _run(
        self, model: LoadedModel, inputs: Mapping[str, np.ndarray], deadline: float | None
    ) -> list[np.ndarray]:
        """Take an inference slot (waiting at most until `deadline`), run."""
        if deadline is not None and self._clock() >= deadline:
            raise DeadlineExceeded(f"deadline passed before {model.name} {model.version} ran")
        if not self._slots.acquire(deadline, self._clock):
            raise DeadlineExceeded(
                f"deadline passed while {model.name} {model.version} waited for an inference "
                f"slot (concurrency limit {self._concurrency_limit or self._workers})"
            )
        try:
            return model.run(inputs)
        except Exception as exc:
            raise InferenceFailed(f"{model.name} {model.version}: {exc}") from exc
        finally:
            self._slots.release()

    def _record(self, model: LoadedModel, latency_s: float, outcome: str) -> None:
        if self._recorder is None:
            return
        try:
            if self._variant_recorder is not None:
                self._variant_recorder.record_variant(
                    model.name, model.version, latency_s, outcome, model.variant
                )
            else:
                self._recorder.record(model.name, model.version, latency_s, outcome)
        except Exception:
            log.exception("telemetry recorder failed")

    # ------------------------------------------------------------ shadows

    def _mirror(
        self, model: LoadedModel, inputs: Mapping[str, np.ndarray], outputs: list[np.ndarray]
    ) -> None:
        """Hand a request the active version answered to the shadow thread,
        if `model`'s name has a shadow and the rate allows. Never raises and
        never blocks: this runs on the app's request path."""
        slot = self._models.get(model.name)
        shadow = slot.shadow if slot is not None else None
        if shadow is None or self._shadow_closed or not self._shadow_rate.take():
            return
        try:
            job = _ShadowJob(model, shadow, _owned(inputs), _owned(outputs))
            self._shadow_jobs.put_nowait(job)
        except queue.Full:
            self._shadow_dropped += 1
            return
        except Exception:
            log.exception("cannot mirror a request to the shadow of %s", model.name)
            return
        if self._shadow_thread is None:
            with self._lock:
                if self._shadow_thread is None and not self._shadow_closed:
                    self._shadow_thread = threading.Thread(
                        target=self._shadow_loop, name="shadow", daemon=True
                    )
                    self._shadow_thread.start()

    def _shadow_loop(self) -> None:
        while (job := self._shadow_jobs.get()) is not None:
            try:
                self._run_shadow(job)
            except Exception:
                # A bug here must not end mirroring for the rest of the stage.
                log.exception("shadow comparison failed")

    def _run_shadow(self, job: _ShadowJob) -> None:
        started = self._clock()
        try:
            outputs = job.shadow.run(job.inputs)
        except Exception as exc:
            latency_s = self._clock() - started
            if self._shadow_failing is not job.shadow:  # once per shadow, not per request
                self._shadow_failing = job.shadow
                log.warning("shadow %s %s failed on a mirrored request: %s",
                            job.shadow.name, job.shadow.version, exc)  # fmt: skip
            # A shadow that cannot answer agrees with nothing: it counts,
            # as every row disagreeing, rather than vanishing from the figures.
            empty = compare_outputs(job.expected, [])
            if empty is None:
                return
            comparison = ShadowComparison(0, empty.total_rows, 0.0)
        else:
            latency_s = self._clock() - started
            found = compare_outputs(job.expected, outputs)
            if found is None:
                return
            comparison = found
        recorder = self._shadow_recorder
        if recorder is None:
            return
        try:
            recorder.record_shadow(job.active.name, job.active.version, job.shadow.version,
                                   comparison.agreed_rows, comparison.total_rows,
                                   comparison.max_diff, latency_s)  # fmt: skip
        except Exception:
            log.exception("telemetry recorder failed on a shadow comparison")

    def close(self) -> None:
        """Stop the thread pool (waiting for runs in progress) and the
        shadow thread (mirrored requests not yet run are dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._shadow_closed = True
            thread = self._shadow_thread
        if thread is None:
            return
        while True:
            try:
                self._shadow_jobs.get_nowait()
            except queue.Empty:
                break
        # The queue was just emptied and nothing is added after closing, so
        # the stop marker fits.
        with contextlib.suppress(queue.Full):
            self._shadow_jobs.put_nowait(None)
        thread.join(timeout=5.0)
