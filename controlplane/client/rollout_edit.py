"""Changing a rollout under way (UpdateRollout), as the CLI's `rollouts
update` and the TUI's edit form write it: the server takes the whole spec,
so the client reads the rollout's spec, changes only what the operator
gave, and sends it back. Also the members an operator names by id, short
id or name (retry, skip).

Changes are written as in the `--stage` syntax (controlplane.client.stages):
a stage option's key and its value (`errors` -> `20/3`, `bake` -> `5m`,
`approve` -> `on`), or `off` to remove it (the server's default applies
again). Pure functions; ValueError says what to change."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from edgefleet.controlplane.client.format import format_pacing
from edgefleet.controlplane.client.stages import format_stage, parse_ramp, parse_stage
from edgefleet.controlplane.client.syntax import is_zero_duration, parse_duration
from edgefleet.v1 import operator_pb2

# What UpdateRollout may change per stage: the stage option and the
# StageSpec fields it sets ("gates." for the health gates). Size, kind and
# stratification plan the members, so they stay.
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "success": ("success_threshold_percent",),
    "errors": ("error_threshold_percent", "min_finished_for_error_threshold"),
    "bake": ("bake_time",),
    "latency": ("gates.latency_budget_factor",),
    "error-rate": ("gates.max_error_rate",),
    "memory": ("gates.memory_limit_factor",),
    "agent-memory": ("gates.max_agent_memory_mb",),
    "silence": ("gates.max_silence",),
    "agreement": ("min_agreement",),
    "approve": ("require_approval",),
    "on-failure": ("on_failure",),
}
PACING_KEYS = ("max-per-minute", "ramp", "device-timeout", "retries")
# The wire's counts are uint32: a larger one is a usage error here, not
# protobuf's "Value out of range" (the server bounds retries further).
MAX_COUNT = 2**32 - 1
# A value that removes the option (back to the server's default).
OFF = frozenset({"off", "none"})
_ON = frozenset({"on", "yes", "true"})


def _holder(stage: operator_pb2.StageSpec, path: str) -> tuple[object, str]:
    where, _, name = path.rpartition(".")
    return (stage.gates if where == "gates" else stage), name


def _parse_option(key: str, value: str, *, shadow: bool) -> operator_pb2.StageSpec:
    """The one option parsed by the `--stage` parser itself, so its checks
    and messages are the create command's."""
    if "," in value:
        raise ValueError(f"{key}={value}: one value, no commas")
    option = "approve" if key == "approve" else f"{key}={value}"
    # A shadow stage needs an agreement to parse; a normal one may not have one.
    extra = ",agreement=1" if shadow and key != "agreement" else ""
    return parse_stage(f"{'shadow:' if shadow else ''}1,{option}{extra}")


def edit_stage(stage: operator_pb2.StageSpec, changes: Mapping[str, str]) -> operator_pb2.StageSpec:
    """A copy of `stage` with `changes` (STAGE_FIELDS key -> value) applied.

    A success threshold left at its default (100 % less the error
    threshold, as the server stores it) follows a changed error threshold:
    errors=20 alone still means "every member but those tolerated"."""
    out = operator_pb2.StageSpec()
    out.CopyFrom(stage)
    unknown = sorted(set(changes) - set(STAGE_FIELDS))
    if unknown:
        raise ValueError(f"{unknown[0]!r} cannot be changed; these can: {', '.join(STAGE_FIELDS)}")
    if "errors" in changes and "success" not in changes:
        default = 100 - stage.error_threshold_percent
        if stage.success_threshold_percent in (0, default):
            out.success_threshold_percent = 0
    for key, raw in changes.items():
        value = raw.strip()
        for path in STAGE_FIELDS[key]:
            holder, name = _holder(out, path)
            holder.ClearField(name)  # type: ignore[attr-defined]
        if value.lower() in OFF or (key == "bake" and is_zero_duration(value)):
            continue
        if key == "approve":
            if value.lower() not in _ON:
                raise ValueError(f"approve={value}: write on or off")
            out.require_approval = True
            continue
        parsed = _parse_option(key, value, shadow=stage.shadow)
        for path in STAGE_FIELDS[key]:
            source, name = _holder(parsed, path)
            target, _ = _holder(out, path)
            for field, field_value in source.ListFields():  # type: ignore[attr-defined]
                if field.name != name:
                    continue
                if field.message_type is not None:
                    getattr(target, name).CopyFrom(field_value)
                else:
                    setattr(target, name, field_value)
    return out


def edit_pacing(pacing: operator_pb2.Pacing, changes: Mapping[str, str]) -> operator_pb2.Pacing:
    """A copy of `pacing` with `changes` (PACING_KEYS key -> value, as the
    create command's options take them; `off` for no ramp or no timeout)."""
    out = operator_pb2.Pacing()
    out.CopyFrom(pacing)
    for key, raw in changes.items():
        value = raw.strip().lower()
        if key in ("max-per-minute", "retries"):
            if not value.isdigit() or int(value) > MAX_COUNT:
                raise ValueError(f"{key}={raw}: a count from 0 to {MAX_COUNT:,}")
            if key == "max-per-minute":
                out.max_per_minute = int(value)
            else:
                out.device_retries = int(value)
        elif key == "ramp":
            out.ClearField("ramp_base_per_minute")
            out.ClearField("ramp_factor")
            if value not in OFF:
                out.ramp_base_per_minute, out.ramp_factor = parse_ramp(value)
        elif key == "device-timeout":
            out.ClearField("device_timeout")
            if value not in OFF and not is_zero_duration(value):
                try:
                    out.device_timeout.FromTimedelta(parse_duration(value))
                except ValueError as err:
                    raise ValueError(f"device-timeout: {err}") from None
        else:
            raise ValueError(
                f"{key!r} is not a pacing setting; these are: {', '.join(PACING_KEYS)}"
            )
    return out


def edit_spec(
    spec: operator_pb2.RolloutSpec,
    *,
    stage: int | None = None,
    stage_changes: Mapping[str, str] | None = None,
    pacing_changes: Mapping[str, str] | None = None,
) -> operator_pb2.RolloutSpec:
    """The whole spec UpdateRollout takes: `spec` with `stage_changes`
    applied to stage `stage` (counted from 1, as shown) or to every stage
    when None, and `pacing_changes` to the pacing."""
    out = operator_pb2.RolloutSpec()
    out.CopyFrom(spec)
    count = len(spec.stages)
    if stage is not None and not 1 <= stage <= count:
        raise ValueError(f"there is no stage {stage}: the rollout has {count} (1-{count})")
    if stage_changes:
        for index in [stage - 1] if stage is not None else range(count):
            try:
                out.stages[index].CopyFrom(edit_stage(spec.stages[index], stage_changes))
            except ValueError as err:
                raise ValueError(f"stage {index + 1}: {err}") from None
    if pacing_changes:
        out.pacing.CopyFrom(edit_pacing(spec.pacing, pacing_changes))
    return out


def describe_changes(old: operator_pb2.RolloutSpec, new: operator_pb2.RolloutSpec) -> list[str]:
    """What differs, a line each, in the `--stage` syntax:
    `stage 2: 100% -> 100%,errors=20/3,bake=5m`, `pacing: ... -> ...`."""
    lines = []
    for index, (a, b) in enumerate(zip(old.stages, new.stages, strict=False)):
        if a != b:
            name = f" ({b.name})" if b.name else ""
            lines.append(f"stage {index + 1}{name}: {format_stage(a)} -> {format_stage(b)}")
    if old.pacing != new.pacing:
        lines.append(f"pacing: {format_pacing(old.pacing)} -> {format_pacing(new.pacing)}")
    return lines


def resolve_members(
    texts: Iterable[str], members: Sequence[operator_pb2.RolloutDevice]
) -> list[str]:
    """Member device ids for what an operator typed: a device id, the short
    id tables show, or a device name. Unknown ones pass through for the
    server to answer NOT_FOUND naming them; an ambiguous one is a
    ValueError."""
    ids = [m.device_id for m in members]
    by_name: dict[str, list[str]] = {}
    for m in members:
        if m.device_name:
            by_name.setdefault(m.device_name, []).append(m.device_id)
    out: list[str] = []
    for text in texts:
        if not text.strip():
            # "" is a prefix of every id: it would read as "ambiguous".
            raise ValueError("a device id or name must not be empty")
        if text in ids:
            out.append(text)
        elif len(by_name.get(text, [])) == 1:
            out.append(by_name[text][0])
        elif text in by_name:
            raise ValueError(f"device name {text!r} is ambiguous in this rollout: use one of "
                             f"its ids: {_some(sorted(by_name[text]))}")  # fmt: skip
        else:
            starting = sorted({i for i in ids if i.startswith(text)})
            if len(starting) > 1:
                raise ValueError(f"device id {text!r} is ambiguous in this rollout: it starts "
                                 f"{_some(starting)}")  # fmt: skip
            out.append(starting[0] if starting else text)
    return list(dict.fromkeys(out))


# Candidates an ambiguity lists: a 10,000-device rollout must not print them all.
MAX_CANDIDATES = 5


def _some(candidates: Sequence[str]) -> str:
    """`a, b, c, d, e and 55 more`."""
    shown = ", ".join(candidates[:MAX_CANDIDATES])
    rest = len(candidates) - MAX_CANDIDATES
    return f"{shown} and {rest} more" if rest > 0 else shown
