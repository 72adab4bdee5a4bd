"""Device classes: constraint profiles and the rules that place devices."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from edgefleet.controlplane.db.models import DeviceClassRow, DeviceRow, utcnow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import rules, secrets
from edgefleet.controlplane.domain.delivery import Delivery
from edgefleet.controlplane.domain.input_shapes import InputShapes, validate_input_shapes
from edgefleet.controlplane.errors import AlreadyExists, InvalidArgument, NotFound
from edgefleet.controlplane.services import audit
from edgefleet.controlplane.services.devices import DECOMMISSIONED, EventSink, reclassify_all
from edgefleet.controlplane.services.events import FleetEvent

RUNTIMES = ("onnxruntime", "tflite", "tensorrt")
QUANTIZATIONS = ("fp32", "fp16", "int8", "auto")
# A class's lighter fallback artifact ("": none); fp32 is never lighter.
FALLBACKS = ("", "fp16", "int8", "auto")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class Constraints:
    runtime: str
    quantization: str = "auto"
    max_model_size_mb: float | None = None
    latency_budget_p95_ms: float | None = None
    max_memory_mb: float | None = None
    accelerator: str = ""
    min_accuracy_retention: float | None = None
    threads: int = 1
    speed_factor: float = 1.0
    microcontroller: bool = False
    # The sum of the measured memory of every model a device of the class
    # holds (services/deployments.py refuses an assignment past it).
    device_memory_mb: float | None = None
    # Build a lighter fallback artifact in this precision too ("": none) for
    # the agent's power/thermal policy (docs/power.md).
    fallback: str = ""
    # The static shapes a TFLite build fixes the model's dynamic input
    # dimensions to, by input name (domain/input_shapes.py); sorted by name.
    input_shapes: InputShapes = ()

    def validate(self) -> None:
        if self.runtime not in RUNTIMES:
            raise InvalidArgument(f"runtime must be one of {', '.join(RUNTIMES)}")
        if self.quantization not in QUANTIZATIONS:
            raise InvalidArgument(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
        if self.fallback not in FALLBACKS:
            raise InvalidArgument(
                f"fallback must be one of {', '.join(f for f in FALLBACKS if f)} or none "
                f"(an fp32 artifact is never lighter), got {self.fallback!r}"
            )
        for label, value in (
            ("max model size (MB)", self.max_model_size_mb),
            ("latency budget (p95 ms)", self.latency_budget_p95_ms),
            ("max memory (MB)", self.max_memory_mb),
            ("device memory budget (MB)", self.device_memory_mb),
        ):
            # `not value > 0` is also true for NaN; infinity is no budget.
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise InvalidArgument(f"{label} must be positive and finite, got {value}")
        if self.min_accuracy_retention is not None and not 0 < self.min_accuracy_retention <= 1:
            raise InvalidArgument(
                "minimum accuracy retention is a fraction in (0, 1], e.g. 0.98 for 98%"
            )
        if self.threads < 1:
            raise InvalidArgument(f"threads must be at least 1, got {self.threads}")
        if not self.speed_factor > 0:
            raise InvalidArgument(f"speed factor must be positive, got {self.speed_factor}")
        if self.microcontroller and self.runtime != "tflite":
            raise InvalidArgument("microcontroller classes need the tflite runtime (TFLite Micro)")
        if self.runtime == "tensorrt" and self.accelerator not in ("", "nvidia-gpu", "jetson"):
            raise InvalidArgument("tensorrt classes need an nvidia-gpu or jetson accelerator")
        try:
            validate_input_shapes(self.input_shapes)
        except ValueError as exc:
            raise InvalidArgument(f"input shapes: {exc}") from None


@dataclass(frozen=True)
class ClassSpec:
    name: str
    constraints: Constraints
    description: str = ""
    priority: int = 0
    rules: tuple[rules.Rule, ...] = ()
    delivery: Delivery = field(default_factory=Delivery)


# What clearing a constraint sets it back to: its value in a class that never
# set it (no limit, no accelerator, one thread, ...). A class always has a runtime.
CLEARED = {f.name: f.default for f in dataclasses.fields(Constraints) if f.name != "runtime"}


@dataclass(frozen=True)
class ClassUpdate:
    """Fields left None are kept; constraints named in `clear` go back to
    their unset value (CLEARED)."""

    description: str | None = None
    priority: int | None = None
    constraints: dict[str, Any] = field(default_factory=dict)
    rules: tuple[rules.Rule, ...] | None = None
    clear: tuple[str, ...] = ()
    # Delivery: None keeps the class's; () removes its mirrors, 0 its cap.
    mirrors: tuple[str, ...] | None = None
    max_download_rate: int | None = None


@dataclass(frozen=True)
class RuleMiss:
    """A rule of the class that no device satisfies, and a few values its
    field has among the devices (most common first)."""

    rule: rules.Rule
    seen: tuple[str, ...]


@dataclass(frozen=True)
class MatchReport:
    """How a class's rules meet the fleet (decommissioned devices left out)
    right after a change, so a rule that matches nothing is noticed."""

    # Devices whose facts satisfy every rule of the class.
    matching: int
    # Of those, pinned to another class (rules do not move them) ...
    pinned_elsewhere: int
    # ... or in a higher-priority class whose rules also match.
    outranked: int
    fleet: int
    # Devices in no class after the change.
    unclassified: int
    misses: tuple[RuleMiss, ...] = ()


@dataclass(frozen=True)
class ClassView:
    row: DeviceClassRow
    device_count: int
    # Set by create and update only.
    report: MatchReport | None = None


# How many distinct values of a field a RuleMiss shows.
_SEEN_VALUES = 5


def match_report(session: Any, row: DeviceClassRow) -> MatchReport:
    """The class's rules against every device that is not decommissioned
    (call after reclassifying, so class ids are current)."""
    class_rules = rules.rules_from_json(row.match_rules)
    devices = list(session.scalars(select(DeviceRow).where(DeviceRow.state != DECOMMISSIONED)))
    facts = [rules.device_facts(d.hardware, d.runtime, d.labels) for d in devices]
    matching = pinned = outranked = 0
    for device, fact in zip(devices, facts, strict=True):
        if not class_rules or not all(rules.rule_matches(r, fact) for r in class_rules):
            continue
        matching += 1
        if device.class_id != row.id:
            if device.class_pinned:
                pinned += 1
            else:
                outranked += 1
    misses: list[RuleMiss] = []
    for rule in class_rules if devices else ():
        if any(rules.rule_matches(rule, fact) for fact in facts):
            continue
        seen: Counter[str] = Counter()
        for fact in facts:
            value = fact.get(rule.field)
            seen.update(str(v) for v in (value if isinstance(value, list) else [value]) if v)
        # Most common first, ties by value (devices come in no set order).
        ranked = sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))
        top = tuple(v for v, _ in ranked[:_SEEN_VALUES])
        misses.append(RuleMiss(rule, top))
    return MatchReport(
        matching=matching,
        pinned_elsewhere=pinned,
        outranked=outranked,
        fleet=len(devices),
        unclassified=sum(1 for d in devices if d.class_id is None),
        misses=tuple(misses),
    )


def _constraints_of(row: DeviceClassRow) -> Constraints:
    return Constraints(
        runtime=row.runtime,
        quantization=row.quantization,
        max_model_size_mb=row.max_model_size_mb,
        latency_budget_p95_ms=row.latency_budget_p95_ms,
        max_memory_mb=row.max_memory_mb,
        accelerator=row.accelerator,
        min_accuracy_retention=row.min_accuracy_retention,
        threads=row.threads,
        speed_factor=row.speed_factor,
        microcontroller=row.microcontroller,
        device_memory_mb=row.device_memory_mb,
        fallback=row.fallback,
        input_shapes=input_shapes_of(row),
    )


def input_shapes_of(row: DeviceClassRow) -> InputShapes:
    """The class's input shapes, sorted by name (JSONB keeps no key order)."""
    return tuple(sorted((name, tuple(dims)) for name, dims in (row.input_shapes or {}).items()))


def _store(row: DeviceClassRow, spec: ClassSpec) -> None:
    c = spec.constraints
    row.description = spec.description
    row.priority = spec.priority
    row.runtime = c.runtime
    row.quantization = c.quantization
    row.max_model_size_mb = c.max_model_size_mb
    row.latency_budget_p95_ms = c.latency_budget_p95_ms
    row.max_memory_mb = c.max_memory_mb
    row.accelerator = c.accelerator
    row.min_accuracy_retention = c.min_accuracy_retention
    row.threads = c.threads
    row.speed_factor = c.speed_factor
    row.microcontroller = c.microcontroller
    row.device_memory_mb = c.device_memory_mb
    row.fallback = c.fallback
    row.input_shapes = {name: list(dims) for name, dims in c.input_shapes}
    row.match_rules = rules.rules_to_json(spec.rules)
    row.artifact_mirrors = list(spec.delivery.mirrors)
    row.max_download_rate = spec.delivery.max_download_rate
    row.updated_at = utcnow()


def delivery_of(row: DeviceClassRow) -> Delivery:
    return Delivery(tuple(row.artifact_mirrors or ()), row.max_download_rate or 0)


def _valid(delivery: Delivery) -> Delivery:
    try:
        return delivery.validated()
    except ValueError as exc:
        raise InvalidArgument(f"delivery: {exc}") from None


def _cleared(change: ClassUpdate) -> dict[str, Any]:
    """The constraint values `change.clear` asks for; InvalidArgument for a
    name that is no clearable constraint or that the update also sets."""
    for name in change.clear:
        if name == "runtime":
            raise InvalidArgument("the runtime cannot be cleared: every class has one")
        if name not in CLEARED:
            raise InvalidArgument(
                f"cannot clear {name!r}: no such constraint; one of {', '.join(CLEARED)}"
            )
        if name in change.constraints:
            raise InvalidArgument(f"{name} is both set and cleared; do one or the other")
    return {name: CLEARED[name] for name in change.clear}


class ClassService:
    def __init__(self, db: Database, events: EventSink) -> None:
        self._db = db
        self._events = events

    def _announce(self, name: str, moved: list[str]) -> None:
        self._events.publish(
            FleetEvent("class.updated", tuple(moved), desired_changed=bool(moved), subject=name)
        )

    def create(self, actor: str, spec: ClassSpec) -> ClassView:
        if not _NAME.match(spec.name):
            raise InvalidArgument(
                f"class name {spec.name!r} is invalid: lowercase letters, digits and '-', "
                "at most 63 characters"
            )
        spec.constraints.validate()
        spec = replace(spec, delivery=_valid(spec.delivery))
        with self._db.unit_of_work() as uow:
            if uow.session.scalar(select(DeviceClassRow).where(DeviceClassRow.name == spec.name)):
                raise AlreadyExists(f"a device class named {spec.name!r} already exists")
            row = DeviceClassRow(id=secrets.new_id(), name=spec.name, created_at=utcnow())
            _store(row, spec)
            uow.session.add(row)
            uow.session.flush()
            moved = reclassify_all(uow.session)
            audit.record(uow, actor, "class.create", f"class:{spec.name}")
            try:
                uow.commit()
            except IntegrityError as exc:
                raise AlreadyExists(f"a device class named {spec.name!r} already exists") from exc
            view = ClassView(row, self._count(uow.session, row.id), match_report(uow.session, row))
        self._announce(spec.name, moved)
        return view

    def update(self, actor: str, name: str, change: ClassUpdate) -> ClassView:
        with self._db.unit_of_work() as uow:
            row = self._require(uow.session, name)
            current = ClassSpec(
                name=row.name,
                constraints=_constraints_of(row),
                description=row.description,
                priority=row.priority,
                rules=rules.rules_from_json(row.match_rules),
                delivery=delivery_of(row),
            )
            cleared = _cleared(change)
            try:
                constraints = replace(current.constraints, **change.constraints, **cleared)
            except TypeError as exc:
                raise InvalidArgument(f"unknown constraint in update: {exc}") from exc
            spec = replace(
                current,
                constraints=constraints,
                description=(
                    change.description if change.description is not None else current.description
                ),
                priority=change.priority if change.priority is not None else current.priority,
                rules=change.rules if change.rules is not None else current.rules,
                delivery=_valid(
                    Delivery(
                        current.delivery.mirrors if change.mirrors is None else change.mirrors,
                        current.delivery.max_download_rate
                        if change.max_download_rate is None
                        else change.max_download_rate,
                    )
                ),
            )
            spec.constraints.validate()
            _store(row, spec)
            uow.session.flush()
            moved = reclassify_all(uow.session)
            # The constraints this update removed, by name or by a limit of 0
            # (what it set is in the row).
            asked = set(cleared) | {k for k, v in change.constraints.items() if v is None}
            removed = sorted(
                k for k in asked if getattr(current.constraints, k) != getattr(constraints, k)
            )
            details: dict[str, Any] = {"cleared": removed} if removed else {}
            if spec.delivery != current.delivery:
                details["mirrors"] = list(spec.delivery.mirrors)
                details["max_download_rate"] = spec.delivery.max_download_rate
            audit.record(uow, actor, "class.update", f"class:{name}", **details)
            uow.commit()
            view = ClassView(row, self._count(uow.session, row.id), match_report(uow.session, row))
        self._announce(name, moved)
        return view

    def delete(self, actor: str, name: str) -> int:
        """Delete a class; its devices are unpinned and reclassified. Returns
        how many devices were in it."""
        with self._db.unit_of_work() as uow:
            row = self._require(uow.session, name)
            members = list(
                uow.session.scalars(select(DeviceRow.id).where(DeviceRow.class_id == row.id))
            )
            uow.session.execute(
                update(DeviceRow)
                .where(DeviceRow.class_id == row.id)
                .values(
                    class_id=None,
                    class_pinned=False,
                    desired_revision=DeviceRow.desired_revision + 1,
                )
                .execution_options(synchronize_session=False)
            )
            uow.session.delete(row)
            uow.session.flush()
            uow.session.expire_all()
            moved = reclassify_all(uow.session)
            audit.record(uow, actor, "class.delete", f"class:{name}", devices=len(members))
            uow.commit()
        self._announce(name, sorted(set(members) | set(moved)))
        return len(members)

    def list(self) -> list[ClassView]:
        with self._db.unit_of_work(readonly=True) as uow:
            counts = {
                class_id: int(n)
                for class_id, n in uow.session.execute(
                    select(DeviceRow.class_id, func.count()).group_by(DeviceRow.class_id)
                )
            }
            rows = uow.session.scalars(
                select(DeviceClassRow).order_by(DeviceClassRow.priority.desc(), DeviceClassRow.name)
            )
            return [ClassView(r, counts.get(r.id, 0)) for r in rows]

    def get(self, name: str) -> ClassView:
        with self._db.unit_of_work(readonly=True) as uow:
            row = self._require(uow.session, name)
            return ClassView(row, self._count(uow.session, row.id))

    @staticmethod
    def _require(session: Any, name: str) -> DeviceClassRow:
        row = session.scalar(select(DeviceClassRow).where(DeviceClassRow.name == name))
        if row is None:
            raise NotFound(f"no device class named {name!r}")
        return row  # type: ignore[no-any-return]

    @staticmethod
    def _count(session: Any, class_id: str) -> int:
        return int(session.scalar(select(func.count()).where(DeviceRow.class_id == class_id)) or 0)
