"""Operator text to protobuf and back: durations ("24h"), labels ("k=v"),
enum names ("auto-accept" <-> ENROLLMENT_POLICY_AUTO_ACCEPT), match rules
("arch == aarch64" <-> MatchRule), constraint profiles, model references
("name@1.0.0"), short ids and addresses ("127.0.0.1:9464"). What a
`format_*` writes, the matching `parse_*` reads back.

Pure functions with no I/O. Each parser raises ValueError with a message a
person can act on; the CLI turns it into a usage error, the TUI into a
notification."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from edgefleet.controlplane.domain.rules import Rule, parse_rule
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.controlplane.wire import MATCH_OP_NAMES, rule_to_pb
from edgefleet.v1 import common_pb2

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

_V = TypeVar("_V", bound=int)

# ------------------------------------------------------------------ durations

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> timedelta:
    """`30m`, `24h`, `7d`, `1h30m`, `2w`, `90s` -> timedelta. Must be positive."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION_RE.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"{text!r} is not a duration; write e.g. 30m, 24h, 7d or 1h30m")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be longer than zero")
    return timedelta(seconds=seconds)


_ZERO_RE = re.compile(r"0+(\.0*)?[smhdw]?")


def is_zero_duration(text: str) -> bool:
    """`0`, `0s`, `0m`, ...: what an option whose default is none (a bake,
    a device timeout) takes to say "none"; parse_duration refuses them."""
    return _ZERO_RE.fullmatch(text.strip().lower()) is not None


def format_duration(delta: timedelta) -> str:
    """The largest two units: `1d2h`, `5m`, `45s`; `0s` for nothing."""
    seconds = int(delta.total_seconds())
    if seconds <= 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(out[:2])


# ------------------------------------------------------------------ addresses

_HOST_RE = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+")


def parse_address(text: str, *, any_host: bool = False) -> str:
    """`host:port` a server listens on or is reached at (`0.0.0.0:7443`,
    `[::1]:9464`, `cp.example.com:7444`; port 0 picks a free one); with
    `any_host`, `:7444` too (an advertised port on whatever host the agent
    reached). Checked before the server starts, so a typo is a usage error,
    not a traceback from whichever listener reads it first."""
    host, sep, port = text.rpartition(":")
    good_host = _HOST_RE.fullmatch(host) is not None or (any_host and not host)
    good_port = re.fullmatch(r"[0-9]{1,5}", port) is not None and int(port) <= 65535
    if not sep or not good_host or not good_port:
        raise ValueError(
            f"{text!r} is not host:port with a port from 0 to 65535; write e.g. 127.0.0.1:9464"
        )
    return text


# ------------------------------------------------------------------ labels


def parse_label(text: str) -> tuple[str, str]:
    """`key=value` -> (key, value). The value may be empty or contain `=`."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"label {text!r} must look like key=value")
    return key, value.strip()


def format_labels(labels: Mapping[str, str]) -> str:
    """`a=1,b=2`, keys sorted; empty string for no labels."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


# ------------------------------------------------------------------ enums


def _prefix(wrapper: _EnumTypeWrapper[_V]) -> str:
    # Every enum in the contract starts with FOO_UNSPECIFIED = 0.
    return wrapper.Name(wrapper.values()[0]).removesuffix("UNSPECIFIED")


def enum_choices(wrapper: _EnumTypeWrapper[_V]) -> dict[str, _V]:
    """CLI names of an enum's values, UNSPECIFIED left out:
    EnrollmentPolicy -> {"auto-accept": 1, "pending": 2}."""
    prefix = _prefix(wrapper)
    return {
        name.removeprefix(prefix).lower().replace("_", "-"): value
        for name, value in wrapper.items()
        if value != 0
    }


def enum_value(wrapper: _EnumTypeWrapper[_V], text: str) -> _V:
    """CLI name -> enum value (case-insensitive, `_` or `-`)."""
    choices = enum_choices(wrapper)
    key = text.strip().lower().replace("_", "-")
    if key not in choices:
        raise ValueError(f"{text!r} is not one of: {', '.join(choices)}")
    return choices[key]


def enum_name(wrapper: _EnumTypeWrapper[_V], value: int) -> str:
    """Enum value -> CLI name; `-` for UNSPECIFIED, the number if unknown."""
    if value == 0:
        return "-"
    for name, number in enum_choices(wrapper).items():
        if number == value:
            return name
    return str(value)


# ------------------------------------------------------------------ match rules


def parse_match(text: str) -> common_pb2.MatchRule:
    """`arch == aarch64` -> MatchRule; ValueError with the parser's message."""
    try:
        return rule_to_pb(parse_rule(text))
    except InvalidArgument as err:
        raise ValueError(err.message) from None


def format_rule(rule: common_pb2.MatchRule) -> str:
    """MatchRule -> the text `parse_match` reads back."""
    op = MATCH_OP_NAMES.get(rule.op)
    if op is None:
        return f"{rule.field} ? {','.join(rule.values)}"
    return str(Rule(rule.field, op, tuple(rule.values)))


# ------------------------------------------------------------------ constraints


# What --fallback (and the TUI's class form) take; "none" drops a fallback.
FALLBACK_CHOICES = ("fp16", "int8", "auto", "none")

# constraint_profile's options -> the ConstraintProfile fields they set: what
# `classes update --clear` (`-` for `_`) and the TUI's emptied fields remove
# (UpdateDeviceClassRequest.clear_constraints). The runtime stays.
CONSTRAINT_FIELDS = {
    "quantization": "quantization",
    "max_size_mb": "max_model_size_mb",
    "latency_budget_ms": "latency_budget_p95_ms",
    "max_memory_mb": "max_memory_mb",
    "device_memory_mb": "device_memory_mb",
    "fallback": "fallback",
    "min_accuracy_retention": "min_accuracy_retention",
    "accelerator": "accelerator",
    "threads": "threads",
    "speed_factor": "speed_factor",
    "microcontroller": "microcontroller",
}


def constraint_profile(
    *,
    runtime: common_pb2.Runtime.ValueType | None = None,
    quantization: common_pb2.Quantization.ValueType | None = None,
    max_size_mb: float | None = None,
    latency_budget_ms: float | None = None,
    max_memory_mb: float | None = None,
    device_memory_mb: float | None = None,
    accelerator: str | None = None,
    min_accuracy_retention: float | None = None,
    threads: int | None = None,
    speed_factor: float | None = None,
    microcontroller: bool | None = None,
    fallback: str | None = None,
    input_shapes: Sequence[tuple[str, Sequence[int]]] = (),
) -> common_pb2.ConstraintProfile | None:
    """The constraints given as options (None: not given); None when no
    option was given, so an update leaves the stored profile alone."""
    # Set only when given: were the field ever to gain presence, an unset
    # flag must not read as "turn it off".
    flags: dict[str, Any] = {} if microcontroller is None else {"microcontroller": microcontroller}
    if fallback is not None:
        # "none" is sent as UNSPECIFIED, set: the class drops its fallback.
        flags["fallback"] = (
            common_pb2.QUANTIZATION_UNSPECIFIED
            if fallback == "none"
            else common_pb2.Quantization.Value(f"QUANTIZATION_{fallback.upper()}")
        )
    profile = common_pb2.ConstraintProfile(
        runtime=runtime or common_pb2.RUNTIME_UNSPECIFIED,
        quantization=quantization or common_pb2.QUANTIZATION_UNSPECIFIED,
        accelerator=accelerator or "",
        max_model_size_mb=max_size_mb,
        latency_budget_p95_ms=latency_budget_ms,
        max_memory_mb=max_memory_mb,
        device_memory_mb=device_memory_mb,
        min_accuracy_retention=min_accuracy_retention,
        threads=threads,
        speed_factor=speed_factor,
        input_shapes=[common_pb2.InputShape(name=n, dims=d) for n, d in input_shapes or ()],
        **flags,
    )
    return profile if profile.ListFields() else None


# ------------------------------------------------------------------ model references


def parse_model_ref(text: str) -> tuple[str, str]:
    """`classifier@1.2.0` -> ("classifier", "1.2.0"). Both parts required."""
    name, sep, version = text.strip().partition("@")
    if not sep or not name.strip() or not version.strip():
        raise ValueError(f"{text!r} must look like MODEL@VERSION, e.g. classifier@1.2.0")
    return name.strip(), version.strip()


# ------------------------------------------------------------------ ids


def resolve_prefix(text: str, ids: Iterable[str], what: str) -> str:
    """Expand a short id (as `ls` shows) to the one full id it starts;
    unknown prefixes pass through for the server to answer NOT_FOUND."""
    matches = sorted({i for i in ids if i.startswith(text)})
    if len(matches) > 1:
        raise ValueError(f"{what} id {text!r} is ambiguous: {', '.join(matches)}")
    return matches[0] if matches else text


# ------------------------------------------------------------------ times


def parse_iso_time(text: str) -> datetime:
    """An ISO 8601 time (`2026-11-23T02:00Z`, `2026-11-23 03:00+01:00`);
    without an offset it is UTC."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 time; write e.g. 2026-11-23T02:00Z"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def parse_when(text: str, at: datetime) -> datetime:
    """`2h`, `7d` (that long before `at`), or an ISO 8601 time (UTC when it
    has no offset)."""
    try:
        return at - parse_duration(text)
    except ValueError:
        pass
    try:
        return parse_iso_time(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a time ago (2h, 7d) nor an ISO 8601 time (2026-11-23T02:00Z)"
        ) from None
