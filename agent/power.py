"""Adaptive inference: a power/thermal policy that caps inference
concurrency, and switches models to their lighter fallback artifacts, on a
device running hot or low on battery.

Three parts, so the logic is testable without a battery or a heat gun:
- `Sensors`, the port: one `read()` giving battery charge, whether mains
  power is plugged in, and the temperature, each None where the platform
  has no such sensor. `PsutilSensors` reads them with psutil; given a
  temperature file (config power_temperature_file, the format of Linux
  /sys/class/thermal/thermal_zone*/temp: millidegrees Celsius), it reads the
  temperature from that file instead of psutil's hottest sensor, and a file
  that cannot be read or parsed makes `read()` raise.
- `decide`, pure: (current mode, readings, thresholds) -> the next mode,
  "normal", "limited" or "critical". Entering a mode happens at its
  threshold; leaving it needs the reading to get better by the hysteresis
  margin, so a reading hovering at a threshold does not flap.
- `PowerPolicy`: reads, decides and, when the mode changes, applies the
  mode's concurrency limit to the ModelHost (normal: no limit; requests wait
  for a slot, within their deadline) and the artifact variant it prefers:
  the fallback while the mode is at least as severe as `fallback_mode`
  (config power_fallback_mode: "limited", "critical" or "never"), the
  primary otherwise. Both change only with the mode, so the mode's
  hysteresis is the switch's. It tells telemetry `status()` = (mode, limit)
  and `variant()` = the variant it prefers.

A failed sensor read keeps the mode (and what it applied); the failure is
logged once per condition, not every interval, and its end once.

Where no sensor exists (most gateways, VMs, CI) every reading is None and the
mode stays "normal": the policy does nothing, and never switches to a
fallback. See docs/power.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psutil

from edgefleet.v1 import common_pb2

if TYPE_CHECKING:
    from edgefleet.agent.config import AgentConfig

log = logging.getLogger(__name__)

NORMAL, LIMITED, CRITICAL = "normal", "limited", "critical"
MODES = (NORMAL, LIMITED, CRITICAL)  # in order of severity
# power_fallback_mode: the mode from which on fallbacks serve, or never.
NEVER = "never"
FALLBACK_MODES = (LIMITED, CRITICAL, NEVER)
PRIMARY = common_pb2.ARTIFACT_VARIANT_PRIMARY
FALLBACK = common_pb2.ARTIFACT_VARIANT_FALLBACK


@dataclass(frozen=True)
class Readings:
    """One look at the sensors; None: the platform has no such sensor."""

    battery_percent: float | None = None
    # None: unknown, taken as running on battery.
    power_plugged: bool | None = None
    # The hottest of all temperature sensors (or the configured temperature
    # file), in degrees Celsius.
    temperature_c: float | None = None

    @property
    def empty(self) -> bool:
        """No battery and no temperature reading: nothing to act on."""
        return self.battery_percent is None and self.temperature_c is None


class Sensors(Protocol):
    """Where readings come from."""

    def read(self) -> Readings: ...


class SensorError(Exception):
    """A configured sensor could not be read. `condition` names what went
    wrong without the details that change from read to read, so the policy
    logs each condition once."""

    def __init__(self, message: str, condition: str) -> None:
        super().__init__(message)
        self.message = message
        self.condition = condition


# What a temperature file may hold: a few digits. Anything longer is not a
# thermal zone (and is not read whole into memory).
_TEMPERATURE_FILE_MAX_BYTES = 64
# Readings outside this range (the control plane's range for telemetry,
# api/limits.py) are a broken sensor, not a temperature to act on.
TEMPERATURE_RANGE_C = (-273.15, 1000.0)


def read_temperature_file(path: Path) -> float:
    """The temperature in `path`, degrees Celsius: the file holds an integer
    number of millidegrees (Linux thermal zones: "85000\n" is 85 C).
    SensorError when it cannot be read, is not a regular file (a FIFO or a
    device would block the reader), holds anything else, or reads outside
    TEMPERATURE_RANGE_C."""
    try:
        # Non-blocking: opening a FIFO for reading would otherwise wait for a
        # writer, and stall the policy (and telemetry) for good.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SensorError(
                    f"the temperature file {path} is not a regular file (a thermal zone's "
                    "temp file is)",
                    f"not-a-file:{path}",
                )
            data = os.read(fd, _TEMPERATURE_FILE_MAX_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SensorError(
            f"cannot read the temperature file {path}: {exc.strerror or exc}",
            f"unreadable:{path}:{type(exc).__name__}",
        ) from exc
    value = data.decode("ascii", errors="replace").strip()
    try:
        if len(data) > _TEMPERATURE_FILE_MAX_BYTES:
            raise ValueError("too long")
        millidegrees = int(value)
    except ValueError:
        raise SensorError(
            f"the temperature file {path} holds {value[:40]!r}, not an integer number of "
            "millidegrees Celsius (e.g. 85000)",
            f"unparsable:{path}",
        ) from None
    celsius = millidegrees / 1000.0
    low, high = TEMPERATURE_RANGE_C
    if not low <= celsius <= high:
        raise SensorError(
            f"the temperature file {path} reads {celsius:g} C, outside {low:g}..{high:g} C: "
            "a broken sensor, not a temperature (the file holds millidegrees: 85000 is 85 C)",
            f"out-of-range:{path}",
        )
    return celsius


class PsutilSensors:
    """Battery and temperatures from psutil (Linux sysfs: power_supply and
    hwmon/thermal zones). A psutil sensor that is missing or fails to read
    is None. With `temperature_file`, the temperature comes from that file
    instead (read_temperature_file); one that fails makes read() raise
    SensorError, so the policy keeps its mode."""

    def __init__(self, temperature_file: Path | None = None) -> None:
        self.temperature_file = temperature_file

    def read(self) -> Readings:
        """The current readings."""
        temperature = (
            hottest()
            if self.temperature_file is None
            else read_temperature_file(self.temperature_file)
        )
        battery = None
        with contextlib.suppress(OSError, RuntimeError, AttributeError):
            battery = psutil.sensors_battery()
        return Readings(
            battery_percent=None if battery is None else float(battery.percent),
            power_plugged=None if battery is None else battery.power_plugged,
            temperature_c=temperature,
        )


def hottest() -> float | None:
    """The hottest of psutil's temperature sensors (None: none, or none that
    reads inside TEMPERATURE_RANGE_C: a sensor reporting -300 C is broken)."""
    try:
        sensors = psutil.sensors_temperatures()
    except (OSError, RuntimeError, AttributeError):
        return None
    low, high = TEMPERATURE_RANGE_C
    values = [
        float(entry.current)
        for entries in sensors.values()
        for entry in entries
        if entry.current is not None
        and math.isfinite(entry.current)
        and low <= entry.current <= high
    ]
    return max(values) if values else None


@dataclass(frozen=True)
class PowerThresholds:
    """When each mode starts and ends, and what it allows. Battery levels
    count only while running on battery (not plugged in, or unknown)."""

    battery_limited_percent: float = 30.0
    battery_critical_percent: float = 15.0
    temperature_limited_c: float = 70.0
    temperature_critical_c: float = 80.0
    # Leaving a mode needs the reading this much better than its threshold.
    battery_hysteresis_percent: float = 5.0
    temperature_hysteresis_c: float = 5.0
    # Inference concurrency allowed in each mode (0: no limit).
    limited_concurrency: int = 2
    critical_concurrency: int = 1
    # The mode from which on fallback artifacts serve (LIMITED: in limited
    # and critical; CRITICAL: in critical only), or NEVER.
    fallback_mode: str = LIMITED

    def __post_init__(self) -> None:
        if self.fallback_mode not in FALLBACK_MODES:
            raise ValueError(
                f"fallback_mode must be one of {', '.join(FALLBACK_MODES)}, "
                f"not {self.fallback_mode!r}"
            )

    @classmethod
    def from_config(cls, config: AgentConfig) -> PowerThresholds:
        """The thresholds from the agent config's power_* keys."""
        return cls(
            battery_limited_percent=config.power_battery_limited_percent,
            battery_critical_percent=config.power_battery_critical_percent,
            temperature_limited_c=config.power_temperature_limited_c,
            temperature_critical_c=config.power_temperature_critical_c,
            battery_hysteresis_percent=config.power_battery_hysteresis_percent,
            temperature_hysteresis_c=config.power_temperature_hysteresis_c,
            limited_concurrency=config.power_limited_concurrency,
            critical_concurrency=config.power_critical_concurrency,
            fallback_mode=config.power_fallback_mode,
        )

    def concurrency(self, mode: str) -> int:
        """The concurrency limit of `mode` (0: none)."""
        if mode == CRITICAL:
            return self.critical_concurrency
        if mode == LIMITED:
            return self.limited_concurrency
        return 0

    def variant(self, mode: str) -> common_pb2.ArtifactVariant.ValueType:
        """The artifact variant `mode` prefers: FALLBACK when it is at least
        as severe as `fallback_mode`, else PRIMARY."""
        if self.fallback_mode == NEVER or mode not in MODES:
            return PRIMARY
        return FALLBACK if MODES.index(mode) >= MODES.index(self.fallback_mode) else PRIMARY


def decide(current: str, readings: Readings, thresholds: PowerThresholds) -> str:
    """The mode for `readings` when the mode is `current` now. A mode is
    entered when the battery is at or below its level or the temperature at
    or above its level; a mode already in force stays until both are better
    than its levels by the hysteresis margin. Missing readings never count."""
    t = thresholds
    on_battery = readings.battery_percent is not None and readings.power_plugged is not True

    def pressed(battery_level: float, temperature_level: float, staying: bool) -> bool:
        if staying:
            battery_level += t.battery_hysteresis_percent
            temperature_level -= t.temperature_hysteresis_c
        low = (
            on_battery
            and readings.battery_percent is not None
            and readings.battery_percent <= battery_level
        )
        hot = readings.temperature_c is not None and readings.temperature_c >= temperature_level
        return low or hot

    severity = MODES.index(current) if current in MODES else 0
    if pressed(t.battery_critical_percent, t.temperature_critical_c, severity >= 2):
        return CRITICAL
    if pressed(t.battery_limited_percent, t.temperature_limited_c, severity >= 1):
        return LIMITED
    return NORMAL


class ConcurrencyControl(Protocol):
    """What the policy acts on: ModelHost."""

    def set_concurrency_limit(self, limit: int) -> None: ...

    def set_variant(self, variant: common_pb2.ArtifactVariant.ValueType) -> None: ...


class PowerPolicy:
    """Reads the sensors every `interval_s`, and applies the mode's
    concurrency limit and artifact variant to `host` when the mode changes.
    `step` blocks while the host loads the variant (run() calls it in a
    thread)."""

    def __init__(
        self,
        host: ConcurrencyControl,
        thresholds: PowerThresholds | None = None,
        *,
        sensors: Sensors | None = None,
        interval_s: float = 5.0,
    ) -> None:
        self._host = host
        self._thresholds = thresholds or PowerThresholds()
        self._sensors: Sensors = sensors if sensors is not None else PsutilSensors()
        self._interval_s = interval_s
        # One tuple, replaced whole: status() may be read from any thread.
        self._status: tuple[str, int] = (NORMAL, 0)
        self._variant: common_pb2.ArtifactVariant.ValueType = PRIMARY
        self._told_no_sensors = False
        # The condition of the failing sensor read last logged; None: reads work.
        self._failing: str | None = None

    def status(self) -> tuple[str, int]:
        """(mode, inference concurrency limit; 0: none), for telemetry."""
        return self._status

    def variant(self) -> common_pb2.ArtifactVariant.ValueType:
        """The artifact variant the mode prefers (PRIMARY or FALLBACK); what
        each model serves is the host's (models without a fallback always
        serve their primary)."""
        return self._variant

    def step(self) -> str:
        """Read the sensors once, switch mode if the readings call for it,
        and return the mode. A sensor read that raises keeps the mode (and
        is logged once per condition)."""
        mode = self._status[0]
        try:
            readings = self._sensors.read()
        except Exception as exc:
            self._read_failed(exc, mode)
            return mode
        if self._failing is not None:
            self._failing = None
            log.info("power sensors read again")
        if readings.empty and not self._told_no_sensors:
            self._told_no_sensors = True
            log.info("no battery or temperature sensor: the power policy stays %s", NORMAL)
        new = decide(mode, readings, self._thresholds)
        if new != mode:
            limit = self._thresholds.concurrency(new)
            variant = self._thresholds.variant(new)
            self._host.set_concurrency_limit(limit)
            self._status = (new, limit)
            log.log(
                logging.INFO if new == NORMAL else logging.WARNING,
                "power mode %s -> %s (battery %s%%, plugged %s, hottest %s C): "
                "inference concurrency %s, %s artifacts",
                mode,
                new,
                _show(readings.battery_percent),
                readings.power_plugged,
                _show(readings.temperature_c),
                limit or "unlimited",
                "fallback" if variant == FALLBACK else "primary",
            )
            self._variant = variant
            try:
                # Loads (blocking) the models' other artifacts and swaps them
                # in; a model whose artifact does not load keeps serving.
                self._host.set_variant(variant)
            except Exception:
                log.exception("cannot switch the models to their %s artifacts",
                              "fallback" if variant == FALLBACK else "primary")  # fmt: skip
        return new

    def _read_failed(self, exc: Exception, mode: str) -> None:
        condition = (
            exc.condition if isinstance(exc, SensorError) else f"{type(exc).__name__}: {exc}"
        )
        if condition == self._failing:
            return  # logged already
        self._failing = condition
        if isinstance(exc, SensorError):
            log.warning("%s; keeping power mode %s until it reads again", exc.message, mode)
        else:
            log.exception("power sensors could not be read; keeping mode %s", mode)

    async def run(self) -> None:
        """Step every interval until cancelled (sensor reads run in a
        thread: sysfs reads can be slow on small boards)."""
        while True:
            await asyncio.to_thread(self.step)
            await asyncio.sleep(self._interval_s)


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"
