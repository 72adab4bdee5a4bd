"""The memory a model adds to a process: one definition for the build host,
a device's validation and the agent's own telemetry.

A model's figure is the process's resident set at its peak while the model
is loaded and run, minus the resident set just before loading, with the
runtime's code already in memory (`preload`): the library is every model's
cost on a device, paid once, not this model's. The build host measures each
candidate that way in a child process (agent.runtimes.measure), a device
validates an artifact that way, and the agent measures each model it loads
into its own process that way (agent.serving, through `LoadMeter`), so a
class's max_memory_mb, a build's peak_memory_mb and a telemetry sample's
model_memory_mb are the same kind of number. In a process that ran other
loads (the agent's), a load may reuse memory they freed, which the resident
set does not show; there the figure is at least what malloc holds more
after the load than before it (heap_in_use_mib).

Linux reads /proc/self/status and resets the kernel's high-water mark
(VmHWM) before loading; elsewhere psutil gives the resident set, and the
peak is only known as the lifetime peak (which a child process may use: it
loads nothing else) or not at all (the agent then uses the resident set
after loading).
"""

from __future__ import annotations

import importlib
import resource
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgefleet.agent.runtimes import ONNXRUNTIME, TENSORRT, TFLITE

MIB = 1024 * 1024

# The adapter module of each runtime. ONNX Runtime's imports the library at
# its top; LiteRT's imports its interpreter when a model is opened, so
# `preload` asks for it.
_RUNNER_MODULES = {
    ONNXRUNTIME: "edgefleet.agent.runtimes.onnxruntime",
    TFLITE: "edgefleet.agent.runtimes.litert",
    TENSORRT: "edgefleet.agent.runtimes.tensorrt",
}

# How long a load waits for another model's load to finish before it runs
# anyway, unmeasured (module docstring of agent.serving: a TensorRT engine
# build can take minutes, and no load should wait that long for a figure).
DEFAULT_WAIT_S = 60.0


def preload(runtime: str) -> None:
    """Import `runtime`'s adapter and library, so that what follows counts
    the model alone. Raises ImportError or RuntimeUnavailable when the
    runtime is missing (opening a model then fails the same way)."""
    module = _RUNNER_MODULES.get(runtime)
    if module is None:
        return
    adapter = importlib.import_module(module)
    if runtime == TFLITE:
        adapter.load_interpreter_class()


def _status_mib(field: str) -> float | None:
    """A VmRSS/VmHWM line of /proc/self/status in MiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MIB  # the value is in kB
    except OSError:
        pass
    return None


def current_rss_mib() -> float:
    """This process's resident set now, MiB (0 where it cannot be read)."""
    rss = _status_mib("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil  # only off Linux: /proc is cheaper

        return float(psutil.Process().memory_info().rss) / MIB
    except Exception:
        return 0.0


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the
    current RSS, so the peak read later covers only what follows. Linux
    only; False when unavailable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib(reset_ok: bool, *, lifetime: bool = True) -> float | None:
    """The resident set's peak since `reset_peak_rss` (when it returned
    True), MiB. Otherwise the lifetime peak with `lifetime` (which can only
    over-state a child's figure), else None."""
    hwm = _status_mib("VmHWM") if reset_ok else None
    if hwm is not None:
        return hwm
    if not lifetime:
        return None
    # ru_maxrss is kB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak * 1024 / MIB


def trim_heap() -> bool:
    """Hand the free memory malloc keeps back to the operating system
    (glibc's malloc_trim; elsewhere nothing). Before a baseline in a
    process that ran other loads: a model that reuses memory an earlier
    load freed would otherwise add nothing to the resident set, and its
    figure would miss what it really takes. False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes  # only when a model loads: an idle agent never imports it

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl, or no glibc
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


def heap_in_use_mib() -> float | None:
    """Bytes malloc has handed out and not had back, over every arena and
    its mmapped blocks (glibc's mallinfo2, 2.33 and later; None elsewhere).
    A load that reuses memory an earlier load freed, which malloc_trim could
    not give back (a page still partly used), adds that memory to this
    figure but not to the resident set: loaded second, a model with 4 MB of
    weights added 0.5 MB of resident set."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    class _MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                         "fsmblks", "uordblks", "fordblks", "keepcost")
        ]  # fmt: skip

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # musl, or glibc before 2.33
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return float(info.uordblks + info.hblkhd) / MIB


class Reading:
    """One load's figure: `added_mb`, the memory it added (module
    docstring); 0 when it could not be measured (`why` says why)."""

    def __init__(self) -> None:
        self.added_mb = 0.0
        self.why = ""
        self._baseline = 0.0
        self._heap_baseline: float | None = None
        self._reset_ok = False

    def _start(self) -> None:
        trim_heap()
        self._heap_baseline = heap_in_use_mib()
        self._baseline = current_rss_mib()
        self._reset_ok = reset_peak_rss()

    def _stop(self) -> None:
        current = current_rss_mib()
        peak = peak_rss_mib(self._reset_ok, lifetime=False)
        heap = heap_in_use_mib()
        top = current if peak is None else max(peak, current)
        if self._baseline <= 0 or current <= 0:
            self.why = "the resident set cannot be read here"
            return
        added = top - self._baseline
        if heap is not None and self._heap_baseline is not None:
            # What the model holds on the heap after loading, where reused
            # memory hid it from the resident set (heap_in_use_mib).
            added = max(added, heap - self._heap_baseline)
        self.added_mb = max(0.0, added)


class LoadMeter:
    """Measures, in this process, what each model load adds (module
    docstring). The agent loads models on several threads (each model's
    update runs on its own, the power policy switches artifacts on its), and
    one load's allocations would count in another's figure: measured loads
    take turns here. A load that waited `wait_s` for its turn runs anyway,
    unmeasured, and so is the load it overlapped: their figures are 0."""

    def __init__(self, wait_s: float = DEFAULT_WAIT_S) -> None:
        self._wait_s = wait_s
        self._turn = threading.Lock()
        self._state = threading.Lock()
        self._loading: set[Reading] = set()

    @contextmanager
    def measure(self) -> Iterator[Reading]:
        """Measure the load in the `with` block; the Reading has its figure
        once the block ends without an exception."""
        reading = Reading()
        turn = self._turn.acquire(timeout=self._wait_s)
        with self._state:
            self._loading.add(reading)
            if len(self._loading) > 1:
                for other in self._loading:
                    other.why = "another model loaded at the same time"
        try:
            if turn:
                reading._start()
            yield reading
            if turn and not reading.why:
                reading._stop()
            if not turn and not reading.why:
                reading.why = "another model's load took its turn too long"
            if reading.why:
                reading.added_mb = 0.0
        finally:
            with self._state:
                self._loading.discard(reading)
            if turn:
                self._turn.release()
