"""The rollout stage syntax, both ways: `--stage` strings (the CLI's
option, the TUI wizard's fields) to StageSpec and back, and the `--ramp`
pacing. A stage is one compact string, SIZE[,OPTION]...:

    shadow:5,agreement=0.95
    10%,stratified,errors=20/3,bake=5m,latency=1.5,silence=2m,approve
    100%,error-rate=0.05,on-failure=abort

(the CLI's `rollouts create --help` lists every option). Pure functions;
parsers raise ValueError saying what to change."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from google.protobuf.duration_pb2 import Duration

from edgefleet.controlplane.client.syntax import (
    format_duration,
    is_zero_duration,
    parse_duration,
)
from edgefleet.v1 import operator_pb2

_FLAGS = frozenset({"stratified", "approve"})
_FAILURE_ACTIONS = {
    "pause": operator_pb2.FAILURE_ACTION_PAUSE,
    "abort": operator_pb2.FAILURE_ACTION_ABORT_REVERT,
}

# ------------------------------------------------------------------ parsing


def _number(key: str, text: str, *, low: float, high: float, low_open: bool = False) -> float:
    """A finite number within [low, high] (or (low, high]); ValueError naming
    the option otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{key}={text!r}: not a number") from None
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        raise ValueError(f"{key}={text}: must be {_range(low, high, low_open=low_open)}")
    return value


def _range(low: float, high: float, *, low_open: bool) -> str:
    """`within (0, 100]`; with no upper bound `a finite number of at least
    1` (or `more than 0`): `[1, inf]` reads as if infinity were allowed."""
    if math.isinf(high):
        return f"a finite number {'more than' if low_open else 'of at least'} {low:g}"
    return f"within {'(' if low_open else '['}{low:g}, {high:g}]"


def _ratio(key: str, text: str) -> float:
    """0..1, written as a fraction (0.95) or a percent (95%)."""
    if text.endswith("%"):
        return _number(key, text[:-1], low=0, high=100) / 100
    return _number(key, text, low=0, high=1)


def _percent(key: str, text: str, *, low_open: bool = False) -> float:
    """0..100, with or without a trailing %."""
    return _number(key, text.removesuffix("%"), low=0, high=100, low_open=low_open)


def _factor(key: str, text: str) -> float:
    return _number(key, text, low=0, high=math.inf, low_open=True)


def _duration(key: str, text: str) -> Duration:
    try:
        delta = parse_duration(text)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
    out = Duration()
    out.FromTimedelta(delta)
    return out


def _bake(text: str) -> Duration:
    """A bake may be zero (no bake, the default): `bake=0` or `0s` says so."""
    return Duration() if is_zero_duration(text) else _duration("bake", text)


def _set_size(stage: operator_pb2.StageSpec, text: str) -> None:
    if text.endswith("%"):
        stage.percent = _percent("size", text, low_open=True)
        return
    if text.isdigit() and int(text) >= 1:
        stage.count = int(text)
        return
    raise ValueError(
        f"stage size {text!r} must be a percent of the cohort (10%) or a device count (5)"
    )


def _set_errors(stage: operator_pb2.StageSpec, text: str) -> None:
    percent, sep, minimum = text.partition("/")
    stage.error_threshold_percent = _percent("errors", percent)
    if sep:
        if not minimum.isdigit() or int(minimum) < 1:
            raise ValueError(f"errors={text}: the minimum after / must be a count of at least 1")
        stage.min_finished_for_error_threshold = int(minimum)


def _set_on_failure(stage: operator_pb2.StageSpec, text: str) -> None:
    if text.lower() not in _FAILURE_ACTIONS:
        raise ValueError(f"on-failure={text}: write on-failure=pause or on-failure=abort")
    stage.on_failure = _FAILURE_ACTIONS[text.lower()]


def _set_name(stage: operator_pb2.StageSpec, text: str) -> None:
    if not text:
        raise ValueError("name= needs a name")
    stage.name = text


_SETTERS: dict[str, Callable[[operator_pb2.StageSpec, str], None]] = {
    "name": _set_name,
    "success": lambda s, v: setattr(
        s, "success_threshold_percent", _percent("success", v, low_open=True)
    ),
    "errors": _set_errors,
    "bake": lambda s, v: s.bake_time.CopyFrom(_bake(v)),
    "latency": lambda s, v: setattr(s.gates, "latency_budget_factor", _factor("latency", v)),
    "error-rate": lambda s, v: setattr(s.gates, "max_error_rate", _ratio("error-rate", v)),
    "memory": lambda s, v: setattr(s.gates, "memory_limit_factor", _factor("memory", v)),
    "agent-memory": lambda s, v: setattr(
        s.gates, "max_agent_memory_mb", _number("agent-memory", v, low=0, high=math.inf)
    ),
    "silence": lambda s, v: s.gates.max_silence.CopyFrom(_duration("silence", v)),
    "agreement": lambda s, v: setattr(s, "min_agreement", _ratio("agreement", v)),
    "on-failure": _set_on_failure,
}
_KNOWN = ", ".join(sorted([*_SETTERS, *_FLAGS]))


def parse_stage(text: str) -> operator_pb2.StageSpec:
    """`10%,stratified,errors=20/3,bake=5m` -> StageSpec (syntax in the
    module docstring). Options left out stay unset, so the server's defaults apply:
    success 100 %, no failure tolerated, pause on failure. Raises ValueError
    saying what to change."""
    head, *options = [part.strip() for part in text.split(",")]
    if not head:
        raise ValueError("empty stage; write e.g. --stage 10% or --stage 5,approve")
    stage = operator_pb2.StageSpec()
    if head.lower().startswith("shadow:"):
        stage.shadow = True
        head = head[len("shadow:") :].strip()
    _set_size(stage, head)
    seen: set[str] = set()
    for option in options:
        key, sep, value = (p.strip() for p in option.partition("="))
        key = key.lower()
        if not key:
            raise ValueError(f"stage {text!r} has an empty option (two commas?)")
        if key in seen:
            raise ValueError(f"stage {text!r} gives {key} twice")
        seen.add(key)
        if key in _FLAGS:
            if sep:
                raise ValueError(f"{key} takes no value; write just {key}")
            setattr(stage, "require_approval" if key == "approve" else key, True)
        elif key in _SETTERS:
            if not sep or not value:
                raise ValueError(f"{key} needs a value: {key}=...")
            _SETTERS[key](stage, value)
        else:
            raise ValueError(f"unknown stage option {key!r}; known: {_KNOWN}")
    if stage.shadow and not stage.HasField("min_agreement"):
        raise ValueError(f"shadow stage {text!r} needs agreement=RATIO (e.g. agreement=0.95)")
    if not stage.shadow and stage.HasField("min_agreement"):
        raise ValueError("agreement= applies to shadow stages only (shadow:SIZE,...)")
    return stage


def parse_ramp(text: str) -> tuple[int, float]:
    """`10:2` -> (10 devices in the first minute, x2 every minute after)."""
    base, sep, factor = text.strip().partition(":")
    if not sep or not base.strip().isdigit() or int(base) < 1:
        raise ValueError(f"{text!r} must look like BASE:FACTOR, e.g. 10:2 (BASE >= 1)")
    value = _number("factor", factor.strip(), low=1, high=math.inf)
    return int(base), value


# ------------------------------------------------------------------ writing


def format_stage_size(s: operator_pb2.StageSpec) -> str:
    """`10%`, `5`, `shadow:5`: the head of the `--stage` syntax."""
    size = f"{s.percent:g}%" if s.WhichOneof("size") == "percent" else str(s.count)
    return f"shadow:{size}" if s.shadow else size


def stage_options(s: operator_pb2.StageSpec) -> list[str]:
    """A stage's options in the `--stage` syntax, defaults left out (the
    server's: success 100 %, no failure tolerated, pause on failure)."""
    out = [f"name={s.name}"] if s.name else []
    if s.stratified:
        out.append("stratified")
    if s.success_threshold_percent and s.success_threshold_percent != 100:
        out.append(f"success={s.success_threshold_percent:g}")
    if s.error_threshold_percent or s.min_finished_for_error_threshold > 1:
        errors = f"errors={s.error_threshold_percent:g}"
        minimum = s.min_finished_for_error_threshold
        out.append(f"{errors}/{minimum}" if minimum > 1 else errors)
    if s.bake_time.ToTimedelta():
        out.append(f"bake={format_duration(s.bake_time.ToTimedelta())}")
    g = s.gates
    if g.HasField("latency_budget_factor"):
        out.append(f"latency={g.latency_budget_factor:g}")
    if g.HasField("max_error_rate"):
        out.append(f"error-rate={g.max_error_rate:g}")
    if g.HasField("memory_limit_factor"):
        out.append(f"memory={g.memory_limit_factor:g}")
    if g.HasField("max_agent_memory_mb"):
        out.append(f"agent-memory={g.max_agent_memory_mb:g}")
    if g.HasField("max_silence"):
        out.append(f"silence={format_duration(g.max_silence.ToTimedelta())}")
    if s.HasField("min_agreement"):
        out.append(f"agreement={s.min_agreement:g}")
    if s.require_approval:
        out.append("approve")
    if s.on_failure == operator_pb2.FAILURE_ACTION_ABORT_REVERT:
        out.append("on-failure=abort")
    return out


def format_stage(s: operator_pb2.StageSpec) -> str:
    """The stage in the syntax parse_stage (`edgefleet rollouts create
    --stage`) reads, so a shown rollout can be typed again:
    `10%,stratified,errors=20/3,bake=5m,approve`."""
    return ",".join([format_stage_size(s), *stage_options(s)])


# ------------------------------------------------------------------ plans


def empty_stage_warnings(devices_per_stage: Sequence[int]) -> list[str]:
    """What to tell an operator whose earlier stages take the whole cohort
    (a stage of 5 devices in a cohort of 3): one line per stage left with no
    device. Such a stage passes at once with nothing to judge."""
    cohort = sum(devices_per_stage)
    return [
        f"stage {index + 1} has no device: the stages before it take the whole cohort "
        f"({cohort} device{'' if cohort == 1 else 's'}); make them smaller or drop it"
        for index, count in enumerate(devices_per_stage)
        if count == 0 and cohort > 0
    ]
