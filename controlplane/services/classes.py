"""Device classes: constraint profiles and the rules that place devices."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from edgefleet.controlplane.db.models import DeviceClassRow, DeviceRow, utcnow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import rules, secrets
from edgefleet.controlplane.errors import AlreadyExists, InvalidArgument, NotFound
from edgefleet.controlplane.services import audit
from edgefleet.controlplane.services.devices import EventSink, reclassify_all
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


@dataclass(frozen=True)
class ClassSpec:
    name: str
    constraints: Constraints
    description: str = ""
    priority: int = 0
    rules: tuple[rules.Rule, ...] = ()


@dataclass(frozen=True)
class ClassUpdate:
    """Fields left None are kept."""

    description: str | None = None
    priority: int | None = None
    constraints: dict[str, Any] = field(default_factory=dict)
    rules: tuple[rules.Rule, ...] | None = None


@dataclass(frozen=True)
class ClassView:
    row: DeviceClassRow
    device_count: int


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
    )


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
    row.match_rules = rules.rules_to_json(spec.rules)
    row.updated_at = utcnow()


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
            view = ClassView(row, self._count(uow.session, row.id))
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
            )
            try:
                constraints = replace(current.constraints, **change.constraints)
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
            )
            spec.constraints.validate()
            _store(row, spec)
            uow.session.flush()
            moved = reclassify_all(uow.session)
            audit.record(uow, actor, "class.update", f"class:{name}")
            uow.commit()
            view = ClassView(row, self._count(uow.session, row.id))
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
