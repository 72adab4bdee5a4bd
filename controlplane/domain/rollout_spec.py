"""What an operator asks of a rollout, validated: the version, the cohort,
the stages with their thresholds and gates, the pacing. Stored as plain JSON
on the rollout row (to_dict / from_dict), so a rollout reads the same after
a restart or on another replica."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from edgefleet.controlplane.domain.rollouts import (
    Gates,
    Pacing,
    StageRule,
    StageSize,
    validate_sizes,
)

PAUSE, ABORT_REVERT = "pause", "abort_revert"
# Bounds on what a spec may say: beyond them a value is a typo, and a bake
# of 99,999 days would hold the rollout's devices for ever.
MAX_DURATION_S = 30 * 86400.0
MAX_RETRIES = 100
MAX_MIN_FINISHED = 1_000_000
FAILURE_ACTIONS = (PAUSE, ABORT_REVERT)
MAX_STAGES = 20


class SpecError(ValueError):
    """The spec cannot be run; the message says what to change."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    percent: float | None = None
    count: int | None = None
    stratified: bool = False
    shadow: bool = False
    # Shadow stages: minimum argmax agreement with the active model (0..1).
    min_agreement: float | None = None
    success_threshold_percent: float = 100.0
    error_threshold_percent: float = 0.0
    min_finished_for_error_threshold: int = 1
    bake_time_s: float = 0.0
    gates: Gates = field(default_factory=Gates)
    require_approval: bool = False
    on_failure: str = PAUSE

    @property
    def size(self) -> StageSize:
        return StageSize(percent=self.percent, count=self.count, stratified=self.stratified)

    @property
    def rule(self) -> StageRule:
        return StageRule(
            success_threshold_percent=self.success_threshold_percent,
            error_threshold_percent=self.error_threshold_percent,
            min_finished_for_error_threshold=self.min_finished_for_error_threshold,
        )


@dataclass(frozen=True)
class PacingSpec:
    max_per_minute: int = 0
    ramp_base_per_minute: int = 0
    ramp_factor: float = 1.0
    device_timeout_s: float = 0.0  # 0: no timeout
    device_retries: int = 0

    @property
    def pacing(self) -> Pacing:
        return Pacing(self.max_per_minute, self.ramp_base_per_minute, self.ramp_factor)


@dataclass(frozen=True)
class RolloutSpec:
    model_name: str
    model_version: str
    class_names: tuple[str, ...] = ()
    label_selector: dict[str, str] = field(default_factory=dict)
    stages: tuple[StageSpec, ...] = ()
    pacing: PacingSpec = field(default_factory=PacingSpec)
    # Admit devices that start matching while the rollout runs.
    dynamic: bool = False
    start_at: dt.datetime | None = None

    def validate(self) -> None:
        """Raise SpecError naming the first thing to fix."""
        if not self.model_name or not self.model_version:
            raise SpecError("a rollout needs a model name and version (MODEL@VERSION)")
        if not self.class_names and not self.label_selector:
            raise SpecError("name the cohort: device classes and/or a label selector")
        if not self.stages:
            raise SpecError("a rollout needs at least one stage")
        if len(self.stages) > MAX_STAGES:
            raise SpecError(f"at most {MAX_STAGES} stages")
        try:
            validate_sizes([s.size for s in self.stages])
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        for index, stage in enumerate(self.stages):
            where = f"stage {index + 1} ({stage.name or 'unnamed'})"
            for name in ("success_threshold_percent", "error_threshold_percent"):
                value = getattr(stage, name)
                if not 0 <= value <= 100:
                    raise SpecError(f"{where}: {name} must be within 0..100, not {value:g}")
            if stage.success_threshold_percent <= 0:
                # Only errors=100 without success= gets here (its derived
                # success is 100 - 100): a stage that passes with every
                # device failed is no gate. promote passes a stage on purpose.
                raise SpecError(
                    f"{where}: the success threshold must be more than 0; errors=100 alone "
                    "would pass the stage with every device failed: give success= as well, "
                    "or pass a stage with `rollouts promote`"
                )
            if not 0 <= stage.min_finished_for_error_threshold <= MAX_MIN_FINISHED:
                raise SpecError(
                    f"{where}: the error threshold's minimum of finished devices must be "
                    f"within 0..{MAX_MIN_FINISHED:,}"
                )
            if not 0 <= stage.bake_time_s <= MAX_DURATION_S:
                raise SpecError(f"{where}: the bake time must be within 0 s and 30 days")
            if stage.on_failure not in FAILURE_ACTIONS:
                raise SpecError(f"{where}: on_failure must be one of {', '.join(FAILURE_ACTIONS)}")
            if stage.min_agreement is not None and not 0 <= stage.min_agreement <= 1:
                raise SpecError(f"{where}: min_agreement must be within 0..1")
            if stage.shadow and stage.min_agreement is None:
                raise SpecError(f"{where}: a shadow stage needs min_agreement")
            if stage.shadow and index == len(self.stages) - 1:
                raise SpecError(f"{where}: the last stage cannot be a shadow stage")
            for gate in ("latency_budget_factor", "max_error_rate", "memory_limit_factor",
                         "max_silence_s", "max_agent_memory_mb"):  # fmt: skip
                value = getattr(stage.gates, gate)
                if value is not None and not 0 <= value < math.inf:
                    raise SpecError(f"{where}: gate {gate} must be a finite number, at least 0")
            agent_memory = stage.gates.max_agent_memory_mb
            if agent_memory is not None and agent_memory <= 0:
                raise SpecError(
                    f"{where}: gate max_agent_memory_mb must be more than 0 (0 would fail "
                    "every device); leave it out to turn the gate off"
                )
        pacing = self.pacing
        if min(pacing.max_per_minute, pacing.ramp_base_per_minute, pacing.device_retries) < 0:
            raise SpecError("pacing values must not be negative")
        if pacing.device_retries > MAX_RETRIES:
            raise SpecError(f"at most {MAX_RETRIES} retries per device")
        # `not x >= 1` also refuses NaN; a ramp's factor must be finite, or
        # the allowance cannot be computed.
        if pacing.ramp_base_per_minute and not 1 <= pacing.ramp_factor < math.inf:
            raise SpecError("an exponential ramp needs a finite factor of at least 1")
        if not 0 <= pacing.device_timeout_s <= MAX_DURATION_S:
            raise SpecError("the device timeout must be within 0 s (none) and 30 days")

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["class_names"] = list(self.class_names)
        document["start_at"] = self.start_at.isoformat() if self.start_at else None
        return document

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> RolloutSpec:
        stages = tuple(
            StageSpec(**{**s, "gates": Gates(**s.get("gates", {}))}) for s in document["stages"]
        )
        start_at = document.get("start_at")
        return cls(
            model_name=document["model_name"],
            model_version=document["model_version"],
            class_names=tuple(document.get("class_names", ())),
            label_selector=dict(document.get("label_selector", {})),
            stages=stages,
            pacing=PacingSpec(**document.get("pacing", {})),
            dynamic=bool(document.get("dynamic", False)),
            start_at=dt.datetime.fromisoformat(start_at) if start_at else None,
        )
