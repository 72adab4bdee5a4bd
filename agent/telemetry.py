"""Per-interval request statistics and resource figures for telemetry.

The inference server calls `RequestStats.record` once per request; every
interval the telemetry loop calls `snapshot_and_reset`, which returns one
`IntervalSample` per (model, version) that saw requests in the interval (or a
single device-level sample, with no model, when none did, so the resource
figures still flow).

Latency goes into a fixed histogram per (model, version): log-spaced bucket
bounds from 50 µs to 60 s, each bound `GROWTH` times the previous one, plus an
underflow and an overflow bucket. A percentile is the nearest-rank value
(the ceil(q * n)-th smallest latency) estimated as the geometric middle of the
bucket that holds it, clamped to the exact minimum and maximum seen. Within
50 µs .. 60 s the estimate is off by at most a factor of sqrt(GROWTH), that is
a relative error of at most `PERCENTILE_ERROR` (~4.9 %). Below 50 µs the
estimate is the minimum seen (off by less than 50 µs); above 60 s it is the
maximum seen (an overestimate). The maximum and the 100th percentile are exact. Latency is
recorded for every outcome (a timeout shows up as tail latency), recording is
O(log buckets) under one lock, and the memory per model version is fixed.

Shadow stages: `record_shadow` (called by the ModelHost's shadow thread for
each mirrored request) accumulates, per (model, active version), the
shadow's version, the mirrored requests, agreed and total rows, the largest
output difference and the shadow's own latency histogram; the sample of
that (model, version) carries them (shadow_agreement = agreed rows / total
rows). A shadow result can land in an interval in which its model version
served no request (the comparison runs after the request returned), so
such an interval still gets a sample for it, with no requests.

Several models per device: when the daemon passes `served` (the ModelHost's
active versions), every served model gets one sample per interval, with or
without requests, so a rollout's gates hear from a version that apps call
rarely. Every sample's memory_mb is the agent process's RSS, whatever model
it is about: the models share one process, and most of it is the agent
itself. Each model's own figure is its model_memory_mb: what loading it
added to the process, measured at load as the build host measures a
candidate (agent.runtimes.memory: the peak while loading and warming it,
minus the resident set before, its runtime's library already loaded; loads
take turns so one does not count in another's figure). That is the figure
comparable with a class's max_memory_mb, which rollout memory gates check;
the daemon's `model_memory` callable says it per served model version (0:
not measured, and on the device-level sample).

Fallback artifacts (agent/serving.py, docs/power.md): the host tells
`record_variant` which artifact of the version served each request; a
sample counts the requests the fallback served (fallback_request_count, of
request_count) and says which artifact served at the end of the interval
(`variant`): what the daemon's `variants` callable says the host serves,
else the artifact of the interval's last request, else unspecified (the
device-level sample).

Each sample also carries the resource figures (process RSS and CPU, system
memory, the hottest temperature sensor and the battery where the platform
has them) and, when the daemon passes a `power_status` callable, the
power/thermal policy's mode and concurrency limit.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import datetime as dt
import logging
import math
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil

from edgefleet.agent.power import SensorError, hottest, read_temperature_file
from edgefleet.v1 import common_pb2

Outcome = Literal["ok", "error", "timeout"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "error", "timeout")

MIN_LATENCY_S = 50e-6
MAX_LATENCY_S = 60.0
GROWTH = 1.1
PERCENTILE_ERROR = math.sqrt(GROWTH) - 1.0

# BOUNDS[i] is the upper (exclusive) bound of bucket i; bucket 0 is the
# underflow [0, MIN_LATENCY_S) and bucket len(BOUNDS) the overflow.
_N = math.ceil(math.log(MAX_LATENCY_S / MIN_LATENCY_S) / math.log(GROWTH))
BOUNDS: tuple[float, ...] = tuple(MIN_LATENCY_S * GROWTH**i for i in range(_N + 1))
_MIB = 1024 * 1024

# What a power/thermal policy reports: (mode, inference concurrency limit,
# 0 meaning unlimited), e.g. ("normal", 0) or ("limited", 2).
PowerStatus = Callable[[], tuple[str, int]]
NORMAL_POWER = ("normal", 0)
UNKNOWN_POWER = ("unknown", 0)

UNSPECIFIED_VARIANT = common_pb2.ARTIFACT_VARIANT_UNSPECIFIED
PRIMARY_VARIANT = common_pb2.ARTIFACT_VARIANT_PRIMARY
FALLBACK_VARIANT = common_pb2.ARTIFACT_VARIANT_FALLBACK
_VARIANTS = frozenset((UNSPECIFIED_VARIANT, PRIMARY_VARIANT, FALLBACK_VARIANT))

log = logging.getLogger(__name__)


class LatencyHistogram:
    """Fixed log-spaced latency histogram (seconds). Not thread-safe by itself."""

    __slots__ = ("counts", "max_s", "min_s", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.total = 0
        self.min_s = math.inf
        self.max_s = 0.0

    def add(self, latency_s: float) -> None:
        # A NaN or infinite latency (a broken clock) counts at the top of the
        # range instead of poisoning min and max.
        latency_s = max(0.0, latency_s) if math.isfinite(latency_s) else MAX_LATENCY_S
        self.counts[bisect.bisect_right(BOUNDS, latency_s)] += 1
        self.total += 1
        self.min_s = min(self.min_s, latency_s)
        self.max_s = max(self.max_s, latency_s)

    def percentile(self, q: float) -> float:
        """The q-quantile (0 < q <= 1) in seconds; 0.0 when empty."""
        if self.total == 0:
            return 0.0
        rank = max(1, math.ceil(q * self.total))
        if rank >= self.total:
            return self.max_s
        index, seen = 0, self.counts[0]
        while seen < rank:
            index += 1
            seen += self.counts[index]
        if index == 0:
            estimate = self.min_s
        elif index == len(BOUNDS):
            estimate = self.max_s
        else:
            estimate = math.sqrt(BOUNDS[index - 1] * BOUNDS[index])
        return min(max(estimate, self.min_s), self.max_s)


@dataclass(frozen=True)
class Resources:
    """Process and system figures at one moment. None: not exposed here."""

    memory_mb: float = 0.0  # process RSS
    cpu_percent: float = 0.0  # process, since the previous probe (100 = one core)
    system_memory_used_percent: float = 0.0
    system_memory_available_mb: float = 0.0
    temperature_c: float | None = None  # hottest sensor reading
    battery_percent: float | None = None
    power_plugged: bool | None = None


class ResourceProbe:
    """Reads `Resources` with psutil. Sensors the platform lacks read as None.
    With `temperature_file` (config power_temperature_file), the temperature
    is that file's, as the power policy reads it (None while it cannot be
    read: the policy logs that)."""

    def __init__(self, temperature_file: Path | None = None) -> None:
        self._process = psutil.Process()
        self._process.cpu_percent(interval=None)  # primes the CPU counter
        self._temperature_file = temperature_file

    def __call__(self) -> Resources:
        vm = psutil.virtual_memory()
        battery = _battery()
        return Resources(
            memory_mb=self._process.memory_info().rss / _MIB,
            cpu_percent=self._process.cpu_percent(interval=None),
            system_memory_used_percent=float(vm.percent),
            system_memory_available_mb=vm.available / _MIB,
            temperature_c=self._temperature(),
            battery_percent=None if battery is None else float(battery.percent),
            power_plugged=None if battery is None else battery.power_plugged,
        )

    def _temperature(self) -> float | None:
        if self._temperature_file is None:
            return hottest()
        try:
            return read_temperature_file(self._temperature_file)
        except SensorError:
            return None


def _battery() -> psutil._common.sbattery | None:
    read = getattr(psutil, "sensors_battery", None)
    if read is None:
        return None
    with contextlib.suppress(OSError, RuntimeError):
        return read()
    return None


@dataclass(frozen=True)
class IntervalSample:
    """One interval of one model version (or of the device, model ""). All
    but system_memory_available_mb and power_plugged go on the wire
    (TelemetrySample); those two are local (Prometheus). temperature_c and
    battery_percent are None where the platform has no such sensor."""

    at: dt.datetime
    model_name: str = ""
    model_version: str = ""
    request_count: int = 0
    error_count: int = 0
    timeout_count: int = 0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    latency_p99_ms: float = 0.0
    latency_max_ms: float = 0.0
    memory_mb: float = 0.0
    cpu_percent: float = 0.0
    system_memory_used_percent: float = 0.0
    system_memory_available_mb: float = 0.0
    temperature_c: float | None = None
    battery_percent: float | None = None
    power_plugged: bool | None = None
    # The power/thermal policy during the interval: its mode and the inference
    # concurrency it allowed (0: unlimited).
    power_mode: str = NORMAL_POWER[0]
    concurrency_limit: int = NORMAL_POWER[1]
    # The shadow this model version's requests were mirrored to in the
    # interval ("" and zeros when none): mirrored requests, the share of
    # their rows where it agreed with this version, the largest |output
    # difference|, and its own p95 latency.
    shadow_version: str = ""
    shadow_requests: int = 0
    shadow_agreement: float = 0.0
    shadow_max_diff: float = 0.0
    shadow_latency_p95_ms: float = 0.0
    # Which artifact of the version served at the end of the interval
    # (common_pb2.ArtifactVariant; unspecified on the device-level sample),
    # and how many of request_count its fallback artifact served.
    variant: int = UNSPECIFIED_VARIANT
    fallback_request_count: int = 0
    # The memory this model version adds to the agent, MB (module
    # docstring); 0: not measured, or the device-level sample.
    model_memory_mb: float = 0.0


@dataclass
class _Window:
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)
    errors: int = 0
    timeouts: int = 0
    # Requests the fallback artifact served, and the last request's artifact.
    fallback: int = 0
    variant: int = UNSPECIFIED_VARIANT


@dataclass
class _ShadowWindow:
    version: str
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)
    agreed_rows: int = 0
    total_rows: int = 0
    max_diff: float = 0.0


class RequestStats:
    """Thread-safe per-(model, version) recorder for one interval at a time.

    `probe` reads the resource figures (default: psutil). `power_status`, when
    given, is the power/thermal policy's state, called once per interval:
    (mode, concurrency limit), e.g. ("limited", 2); without one every sample
    says ("normal", 0), unlimited. It may also be set later, as the
    attribute, for a policy built after the stats (it needs the model host,
    which needs the stats). So are `served`, `variants` and `model_memory`:
    which model versions the host serves, which artifact of each, and the
    memory each adds (module docstring)."""

    def __init__(
        self,
        probe: Callable[[], Resources] | None = None,
        *,
        power_status: PowerStatus | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], _Window] = {}
        self._shadows: dict[tuple[str, str], _ShadowWindow] = {}
        self._probe = probe if probe is not None else ResourceProbe()
        self.power_status = power_status
        # (model, version) of every served model; set by the daemon once the
        # model host exists (module docstring).
        self.served: Callable[[], Sequence[tuple[str, str]]] | None = None
        # (model, version) -> the artifact variant it serves now; likewise.
        self.variants: Callable[[], Mapping[tuple[str, str], int]] | None = None
        # (model, version) -> the memory it adds, MB; likewise.
        self.model_memory: Callable[[], Mapping[tuple[str, str], float]] | None = None

    def _served(self) -> set[tuple[str, str]]:
        if self.served is None:
            return set()
        try:
            return set(self.served())
        except Exception:
            log.exception("cannot list the served models for telemetry")
            return set()

    def _variants(self) -> Mapping[tuple[str, str], int]:
        if self.variants is None:
            return {}
        try:
            return dict(self.variants())
        except Exception:
            log.exception("cannot tell which artifacts the served models serve")
            return {}

    def _model_memory(self) -> Mapping[tuple[str, str], float]:
        if self.model_memory is None:
            return {}
        try:
            figures = dict(self.model_memory())
        except Exception:
            log.exception("cannot tell the memory the served models add for telemetry")
            return {}
        # Finite and non-negative, as the control plane accepts.
        return {k: v for k, v in figures.items() if math.isfinite(v) and v >= 0}

    def _power(self) -> tuple[str, int]:
        if self.power_status is None:
            return NORMAL_POWER
        try:
            mode, limit = self.power_status()
        except Exception:
            # A broken policy must not stop telemetry; the interval says so.
            log.exception("the power/thermal policy failed to report its state")
            return UNKNOWN_POWER
        # Within what the control plane accepts, so one odd report cannot get
        # a whole batch refused.
        return str(mode)[:32], min(max(0, int(limit)), 2**31 - 1)

    def record(self, model: str, version: str, latency_s: float, outcome: str) -> None:
        """Count one finished request. outcome: "ok", "error" or "timeout"
        (a timeout is also an error)."""
        self.record_variant(model, version, latency_s, outcome, UNSPECIFIED_VARIANT)

    def record_variant(
        self, model: str, version: str, latency_s: float, outcome: str, variant: int
    ) -> None:
        """`record`, saying which artifact of the version served the request
        (common_pb2.ArtifactVariant; unspecified: not said)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be an ArtifactVariant, not {variant!r}")
        with self._lock:
            window = self._windows.get((model, version))
            if window is None:
                window = self._windows[(model, version)] = _Window()
            window.histogram.add(latency_s)
            if outcome != "ok":
                window.errors += 1
                if outcome == "timeout":
                    window.timeouts += 1
            if variant == FALLBACK_VARIANT:
                window.fallback += 1
            if variant != UNSPECIFIED_VARIANT:
                window.variant = variant

    def record_shadow(
        self,
        model: str,
        active_version: str,
        shadow_version: str,
        agreed_rows: int,
        total_rows: int,
        max_diff: float,
        latency_s: float,
    ) -> None:
        """Count one request mirrored from `active_version` of `model` to
        `shadow_version`: how many of its rows agreed, the largest output
        difference, the shadow's latency. A new shadow version restarts the
        interval's shadow figures (they describe one candidate)."""
        if not 0 <= agreed_rows <= total_rows:
            raise ValueError(f"agreed_rows {agreed_rows} not within 0..{total_rows}")
        # Telemetry must stay finite and non-negative (the control plane
        # refuses anything else); a NaN difference is as bad as it gets.
        diff = max_diff if math.isfinite(max_diff) else sys.float_info.max
        with self._lock:
            window = self._shadows.get((model, active_version))
            if window is None or window.version != shadow_version:
                window = self._shadows[(model, active_version)] = _ShadowWindow(shadow_version)
            window.histogram.add(latency_s)
            window.agreed_rows += agreed_rows
            window.total_rows += total_rows
            window.max_diff = max(window.max_diff, max(0.0, diff))

    def snapshot_and_reset(self, now: dt.datetime) -> list[IntervalSample]:
        """The interval ending `now`, one sample per model version (sorted), and
        start a new interval."""
        with self._lock:
            windows, self._windows = self._windows, {}
            shadows, self._shadows = self._shadows, {}
        served = self._served()
        variants = self._variants()
        model_memory = self._model_memory()
        res = self._probe()
        power_mode, concurrency_limit = self._power()
        device = IntervalSample(
            at=now,
            memory_mb=res.memory_mb,
            cpu_percent=res.cpu_percent,
            system_memory_used_percent=res.system_memory_used_percent,
            system_memory_available_mb=res.system_memory_available_mb,
            temperature_c=res.temperature_c,
            battery_percent=res.battery_percent,
            power_plugged=res.power_plugged,
            power_mode=power_mode,
            concurrency_limit=concurrency_limit,
        )
        if not windows and not shadows and not served:
            return [device]
        samples = []
        for key in sorted(windows.keys() | shadows.keys() | served):
            window = windows.get(key)
            sample = dataclasses.replace(
                device,
                model_name=key[0],
                model_version=key[1],
                variant=variants.get(key, window.variant if window else UNSPECIFIED_VARIANT),
                model_memory_mb=model_memory.get(key, 0.0),
            )
            if window is not None:
                hist = window.histogram
                sample = dataclasses.replace(
                    sample,
                    request_count=hist.total,
                    fallback_request_count=window.fallback,
                    error_count=window.errors,
                    timeout_count=window.timeouts,
                    latency_p50_ms=hist.percentile(0.50) * 1000,
                    latency_p95_ms=hist.percentile(0.95) * 1000,
                    latency_p99_ms=hist.percentile(0.99) * 1000,
                    latency_max_ms=hist.max_s * 1000,
                )
            shadow = shadows.get(key)
            if shadow is not None:
                sample = dataclasses.replace(
                    sample,
                    shadow_version=shadow.version,
                    shadow_requests=shadow.histogram.total,
                    # No rows compared (cannot happen: the host skips empty
                    # batches) would be no evidence either way: 0.
                    shadow_agreement=(
                        shadow.agreed_rows / shadow.total_rows if shadow.total_rows else 0.0
                    ),
                    shadow_max_diff=shadow.max_diff,
                    shadow_latency_p95_ms=shadow.histogram.percentile(0.95) * 1000,
                )
            samples.append(sample)
        return samples
