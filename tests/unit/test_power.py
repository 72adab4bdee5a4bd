"""The power/thermal policy (agent/power.py) on fake sensor readings, its
config keys, the temperature file sensor, and what it applies to the
ModelHost on real ONNX models: the concurrency limit (overlap measured by a
runner wrapper that records entries and exits, never by timing) and the
switch to a version's lighter fallback artifact."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.config import load_config
from edgefleet.agent.errors import ConfigError
from edgefleet.agent.power import (
    CRITICAL,
    FALLBACK,
    LIMITED,
    NEVER,
    NORMAL,
    PRIMARY,
    PowerPolicy,
    PowerThresholds,
    PsutilSensors,
    Readings,
    SensorError,
    decide,
    read_temperature_file,
)
from edgefleet.agent.runtimes import ONNXRUNTIME, Runner, TensorInfo, open_runner
from edgefleet.agent.serving import Artifact, DeadlineExceeded, ModelHost

T = PowerThresholds()  # battery 30/15 %, temperature 70/80 C, margins 5 and 5


def battery(percent: float, plugged: bool | None = False) -> Readings:
    return Readings(battery_percent=percent, power_plugged=plugged)


def hot(celsius: float) -> Readings:
    return Readings(temperature_c=celsius)


# ------------------------------------------------------------------ the pure policy


@pytest.mark.parametrize(
    ("current", "readings", "expected"),
    [
        # No sensors, or sensors far from any threshold: normal.
        (NORMAL, Readings(), NORMAL),
        (LIMITED, Readings(), NORMAL),
        (CRITICAL, Readings(), NORMAL),
        (NORMAL, battery(80), NORMAL),
        (NORMAL, hot(45), NORMAL),
        # Entering happens at the threshold itself.
        (NORMAL, battery(30.0), LIMITED),
        (NORMAL, battery(30.1), NORMAL),
        (NORMAL, battery(15), CRITICAL),
        (NORMAL, hot(70), LIMITED),
        (NORMAL, hot(69.9), NORMAL),
        (NORMAL, hot(80), CRITICAL),
        (LIMITED, battery(15), CRITICAL),
        # A low battery does not count while plugged in; unknown counts.
        (NORMAL, battery(5, plugged=True), NORMAL),
        (NORMAL, battery(5, plugged=None), CRITICAL),
        (CRITICAL, battery(5, plugged=True), NORMAL),
        # The worse of the two readings decides.
        (NORMAL, Readings(battery_percent=90, power_plugged=False, temperature_c=82), CRITICAL),
        (NORMAL, Readings(battery_percent=12, power_plugged=False, temperature_c=40), CRITICAL),
        (NORMAL, Readings(battery_percent=25, power_plugged=False, temperature_c=40), LIMITED),
        # Hysteresis: leaving needs the margin (5 % / 5 C) past the threshold.
        (LIMITED, battery(34), LIMITED),
        (LIMITED, battery(35), LIMITED),
        (LIMITED, battery(35.1), NORMAL),
        (LIMITED, hot(66), LIMITED),
        (LIMITED, hot(65), LIMITED),
        (LIMITED, hot(64.9), NORMAL),
        (CRITICAL, battery(19), CRITICAL),
        (CRITICAL, battery(21), LIMITED),
        (CRITICAL, battery(40), NORMAL),
        (CRITICAL, hot(76), CRITICAL),
        (CRITICAL, hot(74), LIMITED),
        (CRITICAL, hot(60), NORMAL),
        # An unknown current mode is taken as normal.
        ("unheard-of", battery(25), LIMITED),
    ],
)
def test_decide(current: str, readings: Readings, expected: str) -> None:
    assert decide(current, readings, T) == expected


def run_policy(readings: Sequence[Readings], start: str = NORMAL) -> list[str]:
    mode, modes = start, []
    for reading in readings:
        mode = decide(mode, reading, T)
        modes.append(mode)
    return modes


def test_hysteresis_keeps_a_hovering_reading_from_flapping() -> None:
    hovering = [battery(p) for p in (31, 30, 31, 29, 31, 32, 30, 34, 33)]
    assert run_policy(hovering) == [NORMAL] + [LIMITED] * 8
    temps = [hot(c) for c in (69, 70, 69, 71, 68, 66, 79, 81, 79, 77, 76, 74, 66, 64)]
    assert run_policy(temps) == [
        NORMAL, LIMITED, LIMITED, LIMITED, LIMITED, LIMITED, LIMITED,
        CRITICAL, CRITICAL, CRITICAL, CRITICAL, LIMITED, LIMITED, NORMAL,
    ]  # fmt: skip


def test_a_discharge_and_recharge_cycle() -> None:
    levels = [60, 40, 30, 20, 15, 10, 18, 20, 21, 30, 35, 36]
    modes = run_policy([battery(p) for p in levels])
    assert modes == [
        NORMAL, NORMAL, LIMITED, LIMITED, CRITICAL, CRITICAL,
        CRITICAL, CRITICAL, LIMITED, LIMITED, LIMITED, NORMAL,
    ]  # fmt: skip
    # Plugging in ends battery pressure at once, whatever the charge.
    assert run_policy([battery(10), battery(10, plugged=True)]) == [CRITICAL, NORMAL]


def test_concurrency_per_mode() -> None:
    assert [T.concurrency(m) for m in (NORMAL, LIMITED, CRITICAL)] == [0, 2, 1]


# ------------------------------------------------------------------ the policy object


class FakeSensors:
    def __init__(self, readings: Sequence[Readings | Exception]) -> None:
        self._readings: Iterator[Readings | Exception] = iter(readings)

    def read(self) -> Readings:
        reading = next(self._readings)
        if isinstance(reading, Exception):
            raise reading
        return reading


class FakeHost:
    def __init__(self) -> None:
        self.limits: list[int] = []
        self.variants: list[int] = []

    def set_concurrency_limit(self, limit: int) -> None:
        self.limits.append(limit)

    def set_variant(self, variant: int) -> None:
        self.variants.append(variant)


def test_policy_applies_limits_only_on_mode_changes() -> None:
    host = FakeHost()
    readings: list[Readings | Exception] = [
        battery(50),
        battery(28),
        battery(27),
        hot(85),
        OSError("i2c bus"),
        hot(76),
        Readings(),
    ]
    policy = PowerPolicy(host, T, sensors=FakeSensors(readings))
    assert policy.status() == (NORMAL, 0)
    statuses = []
    for _ in readings:
        policy.step()
        statuses.append(policy.status())
    assert statuses == [
        (NORMAL, 0), (LIMITED, 2), (LIMITED, 2), (CRITICAL, 1),
        (CRITICAL, 1),  # a failed read keeps the mode
        (CRITICAL, 1), (NORMAL, 0),  # sensors gone: nothing to act on
    ]  # fmt: skip
    assert host.limits == [2, 1, 0]
    # The variant goes with the mode (fallback from limited on, the default).
    assert host.variants == [FALLBACK, FALLBACK, PRIMARY]
    assert policy.variant() == PRIMARY


# ------------------------------------------------------------------ fallback artifacts


@pytest.mark.parametrize(
    ("fallback_mode", "expected"),
    [
        (LIMITED, {NORMAL: PRIMARY, LIMITED: FALLBACK, CRITICAL: FALLBACK}),
        (CRITICAL, {NORMAL: PRIMARY, LIMITED: PRIMARY, CRITICAL: FALLBACK}),
        (NEVER, {NORMAL: PRIMARY, LIMITED: PRIMARY, CRITICAL: PRIMARY}),
    ],
)
def test_the_variant_each_mode_prefers(fallback_mode: str, expected: dict[str, int]) -> None:
    thresholds = PowerThresholds(fallback_mode=fallback_mode)
    assert {mode: thresholds.variant(mode) for mode in expected} == expected


def test_an_unknown_fallback_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="fallback_mode must be one of"):
        PowerThresholds(fallback_mode="sometimes")


def _policy_variants(
    fallback_mode: str, readings: Sequence[Readings]
) -> tuple[list[int], list[int]]:
    """(the preferred variant after each step, what the host was told)."""
    host = FakeHost()
    policy = PowerPolicy(
        host, PowerThresholds(fallback_mode=fallback_mode), sensors=FakeSensors(readings)
    )
    preferred: list[int] = []
    for _ in readings:
        policy.step()
        preferred.append(policy.variant())
    return preferred, host.variants


def test_the_switch_has_the_modes_hysteresis_on_hovering_readings() -> None:
    # Around the limited threshold (70 C, leaving below 65): one switch to
    # the fallback, one back, however the reading wobbles in between.
    temps = [hot(c) for c in (69, 70, 69, 71, 68, 66, 65, 69, 64.9, 66, 69.9)]
    preferred, told = _policy_variants(LIMITED, temps)
    P, F = PRIMARY, FALLBACK
    assert preferred == [P, F, F, F, F, F, F, F, P, P, P]
    assert told == [FALLBACK, PRIMARY]
    # fallback_mode critical: limited changes the concurrency, not the
    # artifact; around the critical threshold (80 C, leaving below 75).
    temps = [hot(c) for c in (71, 79, 80, 77, 79, 75, 74.9, 79.9, 81)]
    preferred, told = _policy_variants(CRITICAL, temps)
    assert preferred == [P, P, F, F, F, F, P, P, F]
    assert told == [PRIMARY, FALLBACK, PRIMARY, FALLBACK]


def test_never_keeps_the_primary_in_every_mode() -> None:
    readings = [hot(c) for c in (71, 85, 60, 90)] + [battery(5), battery(50)]
    preferred, told = _policy_variants(NEVER, readings)
    assert preferred == [PRIMARY] * len(readings)
    assert set(told) == {PRIMARY}


def test_without_sensors_the_policy_never_switches() -> None:
    preferred, told = _policy_variants(LIMITED, [Readings()] * 5)
    assert preferred == [PRIMARY] * 5 and told == []


def test_a_host_that_cannot_switch_keeps_the_mode_and_the_limit() -> None:
    class Stuck(FakeHost):
        def set_variant(self, variant: int) -> None:
            raise RuntimeError("no memory for the other artifact")

    host = Stuck()
    policy = PowerPolicy(host, T, sensors=FakeSensors([hot(85)]))
    assert policy.step() == CRITICAL
    assert policy.status() == (CRITICAL, 1) and host.limits == [1]


# ------------------------------------------------------------------ the temperature file


@pytest.mark.parametrize(
    ("text", "celsius"),
    [("85000\n", 85.0), ("85000", 85.0), ("  42500 \n", 42.5), ("-5000\n", -5.0), ("0", 0.0)],
)
def test_the_temperature_file_holds_millidegrees(tmp_path: Path, text: str, celsius: float) -> None:
    path = tmp_path / "temp"
    path.write_text(text)
    assert read_temperature_file(path) == celsius
    assert PsutilSensors(temperature_file=path).read().temperature_c == celsius


@pytest.mark.parametrize("text", ["", "\n", "hot", "85.5", "85000 86000", "0x14c08", "nan"])
def test_a_temperature_file_that_does_not_parse_raises(tmp_path: Path, text: str) -> None:
    path = tmp_path / "temp"
    path.write_text(text)
    with pytest.raises(SensorError, match="not an integer number of millidegrees"):
        PsutilSensors(temperature_file=path).read()


def test_an_unreadable_temperature_file_raises(tmp_path: Path) -> None:
    with pytest.raises(SensorError, match="cannot read the temperature file"):
        PsutilSensors(temperature_file=tmp_path / "missing").read()
    with pytest.raises(SensorError, match="is not a regular file"):
        read_temperature_file(tmp_path)  # a directory


def test_a_failing_temperature_file_keeps_the_mode_and_is_logged_once_per_condition(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "temp"
    host = FakeHost()
    policy = PowerPolicy(host, T, sensors=PsutilSensors(temperature_file=path))
    caplog.set_level(logging.INFO, logger="edgefleet.agent.power")

    def step(content: str | None) -> str:
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(content)
        return policy.step()

    assert step("85000\n") == CRITICAL
    assert host.limits == [1] and host.variants == [FALLBACK]
    caplog.clear()
    # Garbage, over several intervals: the mode stays, one warning.
    assert [step(text) for text in ("garbage", "more garbage", "")] == [CRITICAL] * 3
    # Gone: another condition, one more warning.
    assert [step(None) for _ in range(3)] == [CRITICAL] * 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "holds 'garbage'" in warnings[0] and "keeping power mode critical" in warnings[0]
    assert "cannot read the temperature file" in warnings[1]
    assert host.limits == [1] and host.variants == [FALLBACK]  # nothing applied meanwhile
    # Readable again: said once, and the readings count again.
    caplog.clear()
    assert step("60000\n") == NORMAL
    assert [r.getMessage() for r in caplog.records].count("power sensors read again") == 1
    assert host.limits == [1, 0] and host.variants == [FALLBACK, PRIMARY]


async def test_without_sensors_the_loop_stays_normal_and_does_nothing() -> None:
    host = FakeHost()
    policy = PowerPolicy(host, T, sensors=FakeSensors([Readings()] * 100), interval_s=0.01)
    task = asyncio.create_task(policy.run())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert policy.status() == (NORMAL, 0) and host.limits == []


def test_psutil_sensors_read_what_this_machine_has() -> None:
    # No assertion on values (machines differ); a reading is a number or None.
    reading = PsutilSensors().read()
    for value in (reading.battery_percent, reading.temperature_c):
        assert value is None or isinstance(value, float)


# ------------------------------------------------------------------ config


def test_power_settings_from_file_and_environment(tmp_path: Path) -> None:
    defaults = load_config(None, environ={})
    assert PowerThresholds.from_config(defaults) == PowerThresholds()
    assert defaults.power_interval_s == 5.0
    path = tmp_path / "agent.toml"
    path.write_text(
        "power_battery_limited_percent = 40\npower_temperature_critical_c = 90\n"
        "power_limited_concurrency = 0\n"
    )
    config = load_config(
        path,
        environ={
            "EDGEFLEET_AGENT_POWER_TEMPERATURE_LIMITED_C": "65.5",
            "EDGEFLEET_AGENT_POWER_CRITICAL_CONCURRENCY": "3",
        },
    )
    thresholds = PowerThresholds.from_config(config)
    assert (
        thresholds.battery_limited_percent,
        thresholds.temperature_limited_c,
        thresholds.temperature_critical_c,
        thresholds.limited_concurrency,
        thresholds.critical_concurrency,
    ) == (40, 65.5, 90, 0, 3)


def test_fallback_and_temperature_file_settings(tmp_path: Path) -> None:
    defaults = load_config(None, environ={})
    assert defaults.power_fallback_mode == LIMITED and defaults.power_temperature_file is None
    assert PowerThresholds.from_config(defaults).fallback_mode == LIMITED
    path = tmp_path / "agent.toml"
    path.write_text(
        'power_fallback_mode = "critical"\n'
        'power_temperature_file = "/sys/class/thermal/thermal_zone0/temp"\n'
    )
    config = load_config(path, environ={})
    assert config.power_fallback_mode == CRITICAL
    assert config.power_temperature_file == Path("/sys/class/thermal/thermal_zone0/temp")
    assert PowerThresholds.from_config(config).fallback_mode == CRITICAL
    overridden = load_config(
        path,
        environ={
            "EDGEFLEET_AGENT_POWER_FALLBACK_MODE": " Never ",
            # Empty clears the file's setting: psutil's sensors again.
            "EDGEFLEET_AGENT_POWER_TEMPERATURE_FILE": "",
        },
    )
    assert overridden.power_fallback_mode == NEVER
    assert overridden.power_temperature_file is None


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        ({"EDGEFLEET_AGENT_POWER_FALLBACK_MODE": "sometimes"}, "one of 'limited', 'critical'"),
        ({"EDGEFLEET_AGENT_POWER_FALLBACK_MODE": "normal"}, "one of 'limited', 'critical'"),
        ({"EDGEFLEET_AGENT_POWER_TEMPERATURE_FILE": "thermal/temp"}, "an absolute path"),
        ({"EDGEFLEET_AGENT_POWER_BATTERY_LIMITED_PERCENT": "120"}, "percentage from 0 to 100"),
        ({"EDGEFLEET_AGENT_POWER_BATTERY_LIMITED_PERCENT": "low"}, "expected a number"),
        ({"EDGEFLEET_AGENT_POWER_TEMPERATURE_LIMITED_C": "nan"}, "temperature in degrees"),
        ({"EDGEFLEET_AGENT_POWER_LIMITED_CONCURRENCY": "-1"}, "non-negative integer"),
        ({"EDGEFLEET_AGENT_POWER_TEMPERATURE_HYSTERESIS_C": "-2"}, "non-negative number"),
        ({"EDGEFLEET_AGENT_POWER_INTERVAL_S": "0"}, "positive number of seconds"),
        ({"EDGEFLEET_AGENT_POWER_BATTERY_CRITICAL_PERCENT": "50"}, "must not be more than"),
        ({"EDGEFLEET_AGENT_POWER_TEMPERATURE_CRITICAL_C": "60"}, "must not be less than"),
    ],
)
def test_bad_power_settings_name_the_variable(environ: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as caught:
        load_config(None, environ=environ)
    if len(environ) == 1 and "must not be" not in needle:
        assert next(iter(environ)) in caught.value.message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("power_fallback_mode = 2", "key power_fallback_mode: expected one of"),
        ('power_fallback_mode = "always"', "key power_fallback_mode: expected one of"),
        ("power_temperature_file = 85000", "key power_temperature_file: expected a string"),
        ('power_temperature_file = "temp"', "key power_temperature_file: expected an absolute"),
    ],
)
def test_bad_fallback_settings_name_the_file_and_key(
    tmp_path: Path, text: str, needle: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=needle) as caught:
        load_config(path, environ={})
    assert str(path) in caught.value.message


# ------------------------------------------------------------------ the host's limit


def add_model(path: Path, constant: float = 1.0) -> Path:
    """y = x + constant over a [batch, 4] float input."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array([constant], dtype=np.float32), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


class Tracking:
    """Wraps a real runner: records each run's entry and exit in one ordered
    log and the most runs ever inside at once. `gate`, when set, holds each
    run inside until it is set (a run that is inside can be waited for)."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self._lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0
        self.log: list[str] = []
        self.entered = threading.Semaphore(0)
        self.gate: threading.Event | None = None
        self.barrier: threading.Barrier | None = None

    @property
    def inputs(self) -> Sequence[TensorInfo]:
        return self._runner.inputs

    @property
    def outputs(self) -> Sequence[TensorInfo]:
        return self._runner.outputs

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.log.append("enter")
        self.entered.release()
        try:
            if self.barrier is not None:
                self.barrier.wait()
            if self.gate is not None:
                self.gate.wait(10)
            return self._runner.run(inputs)
        finally:
            with self._lock:
                self.inside -= 1
                self.log.append("exit")


class Recorded:
    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def record(self, model: str, version: str, latency_s: float, outcome: str) -> None:
        self.outcomes.append(outcome)


@pytest.fixture
def tracked(tmp_path: Path) -> Iterator[tuple[ModelHost, Tracking, Recorded]]:
    wrappers: list[Tracking] = []

    def open_tracked(*args: Any, **kwargs: Any) -> Runner:
        wrappers.append(Tracking(open_runner(*args, **kwargs)))
        return wrappers[-1]

    recorded = Recorded()
    host = ModelHost(workers=4, recorder=recorded, open_model=open_tracked)
    host.activate("m", "1", "sha", add_model(tmp_path / "m.onnx"), ONNXRUNTIME)
    tracking = wrappers[0]
    tracking.log.clear()  # the warm-up run
    tracking.most_inside = 0
    while tracking.entered.acquire(blocking=False):
        pass
    recorded.outcomes.clear()
    try:
        yield host, tracking, recorded
    finally:
        if tracking.gate is not None:
            tracking.gate.set()
        host.close()


X = {"x": np.ones((2, 4), np.float32)}


def test_unlimited_runs_overlap(tracked: tuple[ModelHost, Tracking, Recorded]) -> None:
    # The control: without a limit, two requests are inside the model at
    # once (each waits at a barrier for the other, so this cannot pass by luck).
    host, tracking, _ = tracked
    tracking.barrier = threading.Barrier(2, timeout=10)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(host.predict_sync("m", X))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 2 and tracking.most_inside == 2


def test_limit_one_never_overlaps(tracked: tuple[ModelHost, Tracking, Recorded]) -> None:
    host, tracking, recorded = tracked
    host.set_concurrency_limit(1)
    assert host.concurrency_limit == 1
    tracking.gate = threading.Event()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            result = host.predict_sync("m", X, timeout_s=10)
            np.testing.assert_array_equal(result.outputs[0], X["x"] + 1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    # One request is inside the model; the others wait for the slot.
    assert tracking.entered.acquire(timeout=10)
    assert not tracking.entered.acquire(timeout=0.2)
    tracking.gate.set()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert tracking.most_inside == 1
    assert tracking.log == ["enter", "exit"] * 6
    assert recorded.outcomes == ["ok"] * 6


async def test_limit_applies_to_the_coroutine_too(
    tracked: tuple[ModelHost, Tracking, Recorded],
) -> None:
    host, tracking, _ = tracked
    host.set_concurrency_limit(1)
    results = await asyncio.gather(*(host.predict("m", X, timeout_s=10) for _ in range(8)))
    assert len(results) == 8
    assert tracking.most_inside == 1 and tracking.log == ["enter", "exit"] * 8


def test_deadline_runs_while_waiting_for_a_slot(
    tracked: tuple[ModelHost, Tracking, Recorded],
) -> None:
    host, tracking, recorded = tracked
    host.set_concurrency_limit(1)
    tracking.gate = threading.Event()
    holder = threading.Thread(target=host.predict_sync, args=("m", X))
    holder.start()
    assert tracking.entered.acquire(timeout=10)  # the slot is taken
    with pytest.raises(DeadlineExceeded, match="waited for an inference slot"):
        host.predict_sync("m", X, timeout_s=0.05)
    tracking.gate.set()
    holder.join(10)
    assert tracking.log == ["enter", "exit"]  # the late request never ran
    assert sorted(recorded.outcomes) == ["ok", "timeout"]


def test_raising_the_limit_lets_waiting_requests_in(
    tracked: tuple[ModelHost, Tracking, Recorded],
) -> None:
    host, tracking, _ = tracked
    host.set_concurrency_limit(1)
    tracking.gate = threading.Event()
    threads = [threading.Thread(target=host.predict_sync, args=("m", X)) for _ in range(3)]
    for thread in threads:
        thread.start()
    assert tracking.entered.acquire(timeout=10)
    assert not tracking.entered.acquire(timeout=0.2)  # two wait
    host.set_concurrency_limit(0)  # no limit: up to workers (4) at once
    assert tracking.entered.acquire(timeout=10) and tracking.entered.acquire(timeout=10)
    assert tracking.inside == 3
    tracking.gate.set()
    for thread in threads:
        thread.join(10)
    with pytest.raises(ValueError):
        host.set_concurrency_limit(-1)


def test_policy_drives_a_real_host(tracked: tuple[ModelHost, Tracking, Recorded]) -> None:
    host, _, _ = tracked
    policy = PowerPolicy(host, T, sensors=FakeSensors([hot(85), hot(50)]))
    policy.step()
    assert policy.status() == (CRITICAL, 1) and host.concurrency_limit == 1
    policy.step()
    assert policy.status() == (NORMAL, 0) and host.concurrency_limit == 0


def test_policy_switches_a_real_host_to_the_fallback_and_back(tmp_path: Path) -> None:
    """Two real artifacts of one version (y = x + 1, and a "fallback" that
    adds 2, so answers tell them apart): the policy's mode changes switch
    which one answers; a model without a fallback keeps its primary."""
    host = ModelHost(workers=2)
    primary, fallback = add_model(tmp_path / "p.onnx"), add_model(tmp_path / "f.onnx", 2.0)
    host.activate("m", "1", "p-digest", primary, ONNXRUNTIME,
                  fallback=Artifact("f-digest", fallback, ONNXRUNTIME))  # fmt: skip
    host.activate("plain", "1", "plain-digest", primary, ONNXRUNTIME)
    policy = PowerPolicy(host, T, sensors=FakeSensors([hot(75), hot(85), hot(66), hot(60)]))

    def answer(name: str) -> tuple[int, str, float]:
        prediction = host.predict_sync(name, X)
        model = prediction.model
        return model.variant, model.digest, float(prediction.outputs[0][0, 0] - X["x"][0, 0])

    assert answer("m") == (PRIMARY, "p-digest", 1.0)
    policy.step()  # limited: the fallback
    assert host.variant == FALLBACK and host.concurrency_limit == 2
    assert answer("m") == (FALLBACK, "f-digest", 2.0)
    assert answer("plain") == (PRIMARY, "plain-digest", 1.0)
    assert host.active("m").fallback_digest == "f-digest"
    assert host.active("m").primary_digest == "p-digest"
    policy.step()  # critical: still the fallback
    policy.step()  # 66 C: still limited (hysteresis)
    assert answer("m") == (FALLBACK, "f-digest", 2.0)
    policy.step()  # normal: back to the primary
    assert host.variant == PRIMARY and host.concurrency_limit == 0
    assert answer("m") == (PRIMARY, "p-digest", 1.0)
    host.close()


def test_a_temperature_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    # Opening a FIFO for reading would wait for a writer forever, freezing
    # the policy and the telemetry that read the same file.
    fifo = tmp_path / "temp"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(SensorError, match="not a regular file"):
        read_temperature_file(fifo)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("-300000\n", "outside -273.15..1000 C"),
        ("1500000\n", "outside -273.15..1000 C"),
        ("99999999999999999999\n", "outside -273.15..1000 C"),
        ("9" * 100, "not an integer number of millidegrees"),
    ],
)
def test_a_temperature_file_reading_no_real_temperature_is_a_sensor_fault(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "temp"
    path.write_text(text)
    with pytest.raises(SensorError, match=re.escape(says)):
        read_temperature_file(path)
