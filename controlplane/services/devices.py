"""Device inventory: listing, operator actions, classification, and what each
device's desired state is."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.orm import Session

from edgefleet.controlplane.db.in_list import padded
from edgefleet.controlplane.db.models import (
    DeviceAssignmentRow,
    DeviceClassRow,
    DeviceRow,
    ModelRow,
    ModelVersionRow,
    utcnow,
)
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import rules
from edgefleet.controlplane.domain.delivery import Delivery
from edgefleet.controlplane.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.controlplane.services import audit
from edgefleet.controlplane.services.events import FleetEvent

PENDING, ACCEPTED, REJECTED, DECOMMISSIONED = "pending", "accepted", "rejected", "decommissioned"
DEVICE_STATES = (PENDING, ACCEPTED, REJECTED, DECOMMISSIONED)

_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
MAX_LABEL_VALUE = 256
MAX_LABELS = 64
# Rows read per query while a label filter fills a page.
_LIST_BATCH = 500
_IN_CHUNK = 1000


class EventSink(Protocol):
    def publish(self, event: FleetEvent) -> None: ...


class Presence(Protocol):
    """Which devices hold a sync stream to this replica right now."""

    def is_connected(self, device_id: str) -> bool: ...


@dataclass(frozen=True)
class HeldModel:
    """One model assigned to a device, as its view shows it."""

    model_name: str
    model_version: str
    sequence: int
    rollout_id: str
    shadow: bool


@dataclass(frozen=True)
class DeviceView:
    row: DeviceRow
    class_name: str
    online: bool
    # Its assignments, by model name.
    assignments: tuple[HeldModel, ...] = ()


# Where a page of ListDevices ends: the last device's (name, id).
DeviceCursor = tuple[str, str]


@dataclass(frozen=True)
class DevicePage:
    devices: list[DeviceView]
    # Set when more devices match: the cursor for the next page.
    next_after: DeviceCursor | None


@dataclass(frozen=True)
class DesiredView:
    revision: int
    device_state: str
    class_name: str
    labels: dict[str, str]
    # Every signing-key rotation, oldest first: (statement, signature).
    key_rotations: tuple[tuple[bytes, bytes], ...] = ()
    # Changes when the device enrolls again (its credential's hash; the view
    # never leaves the process): a sync stream opened before ends itself
    # (api/device_servicer).
    credential_epoch: str = ""
    # The class's mirrors and download rate cap (domain/delivery.py).
    delivery: Delivery = field(default_factory=Delivery)


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Raise InvalidArgument for keys or values a selector could not express."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels ({len(labels)}); at most {MAX_LABELS}")
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            raise InvalidArgument(
                f"label key {key!r} is invalid: use letters, digits and . _ / - "
                "(1-63 characters, starting with a letter or digit)"
            )
        if len(value) > MAX_LABEL_VALUE or not value.isprintable():
            raise InvalidArgument(
                f"label {key!r} value must be printable and at most {MAX_LABEL_VALUE} characters"
            )
    return dict(labels)


def class_candidates(session: Session) -> list[rules.ClassCandidate]:
    rows = session.scalars(select(DeviceClassRow))
    return [
        rules.ClassCandidate(r.id, r.name, r.priority, rules.rules_from_json(r.match_rules))
        for r in rows
    ]


def classify_row(row: DeviceRow, candidates: Sequence[rules.ClassCandidate]) -> bool:
    """Place an unpinned device in its class by rules; True if it moved (and
    its desired revision was bumped)."""
    if row.class_pinned:
        return False
    facts = rules.device_facts(row.hardware, row.runtime, row.labels)
    chosen = rules.classify(facts, candidates)
    new_id = chosen.id if chosen else None
    if new_id == row.class_id:
        return False
    row.class_id = new_id
    row.desired_revision += 1
    return True


def reclassify_all(session: Session) -> list[str]:
    """Re-run classification for every unpinned device; ids of those that moved."""
    candidates = class_candidates(session)
    moved = []
    for row in session.scalars(select(DeviceRow).where(DeviceRow.class_pinned.is_(False))):
        if classify_row(row, candidates):
            moved.append(row.id)
    return moved


# The newest sync protocol this control plane knows; a newer agent's is kept
# as this (it speaks at least this much).
NEWEST_PROTOCOL = 2


def agent_protocol_of(hello_protocol: int) -> int:
    """devices.agent_protocol for a Hello's protocol: 1 for the one-model
    agents (which send 0 or 1), so 0 keeps meaning "never connected"."""
    return min(max(hello_protocol, 1), NEWEST_PROTOCOL)


def held_models(session: Session, device_ids: Sequence[str]) -> dict[str, tuple[HeldModel, ...]]:
    """Each device's assignments by model name, one query per _IN_CHUNK ids."""
    a = DeviceAssignmentRow
    found: dict[str, list[HeldModel]] = {}
    ids = list(device_ids)
    for start in range(0, len(ids), _IN_CHUNK):
        rows = session.execute(
            select(a.device_id, ModelRow.name, ModelVersionRow.version, a.sequence,
                   a.rollout_id, a.shadow)
            .join(ModelVersionRow, ModelVersionRow.id == a.model_version_id)
            .join(ModelRow, ModelRow.id == a.model_id)
            .where(a.device_id.in_(padded(ids[start : start + _IN_CHUNK])))
            .order_by(a.device_id, ModelRow.name)
        )  # fmt: skip
        for device_id, name, version, sequence, rollout_id, shadow in rows:
            found.setdefault(device_id, []).append(
                HeldModel(name, version, sequence, rollout_id or "", bool(shadow))
            )
    return {k: tuple(v) for k, v in found.items()}


class DeviceService:
    def __init__(
        self, db: Database, events: EventSink, presence: Presence, offline_after_s: float
    ) -> None:
        self._db = db
        self._events = events
        self._presence = presence
        self._offline_after = dt.timedelta(seconds=offline_after_s)

    # ------------------------------------------------------------ queries

    def _view(
        self,
        session: Session,
        row: DeviceRow,
        names: Mapping[str, str],
        held: Mapping[str, tuple[HeldModel, ...]] | None = None,
    ) -> DeviceView:
        online = self._presence.is_connected(row.id) or (
            row.last_seen_at is not None and utcnow() - row.last_seen_at < self._offline_after
        )
        if held is None:
            held = held_models(session, [row.id])
        return DeviceView(
            row=row, class_name=names.get(row.class_id or "", ""), online=online,
            assignments=held.get(row.id, ()),
        )  # fmt: skip

    @staticmethod
    def _class_names(session: Session) -> dict[str, str]:
        return {k: v for k, v in session.execute(select(DeviceClassRow.id, DeviceClassRow.name))}

    def list(
        self,
        *,
        state: str = "",
        class_name: str = "",
        labels: Mapping[str, str] | None = None,
        unclassified: bool = False,
        include_decommissioned: bool = False,
        page_size: int | None = None,
        after: DeviceCursor | None = None,
    ) -> DevicePage:
        """The devices that match every filter, by name then id: all of them,
        or `page_size` after the cursor `after` (keyset paging, so a page is
        one index range however deep into the fleet it is)."""
        if page_size is not None and page_size < 1:
            raise InvalidArgument(f"page size must be at least 1, not {page_size}")
        with self._db.unit_of_work(readonly=True) as uow:
            session = uow.session
            names = self._class_names(session)
            stmt = select(DeviceRow).order_by(DeviceRow.name, DeviceRow.id)
            if state:
                stmt = stmt.where(DeviceRow.state == state)
            elif not include_decommissioned:
                stmt = stmt.where(DeviceRow.state != DECOMMISSIONED)
            if class_name:
                by_name = {v: k for k, v in names.items()}
                if class_name not in by_name:
                    raise NotFound(f"no device class named {class_name!r}")
                stmt = stmt.where(DeviceRow.class_id == by_name[class_name])
            if unclassified:
                stmt = stmt.where(DeviceRow.class_id.is_(None))
            wanted = dict(labels or {})
            matched: list[DeviceRow] = []
            # Labels are matched here, not in SQL, so a page's rows are read
            # in batches until it is full; one more match tells whether
            # there is a next page.
            limit = None if page_size is None else page_size + 1
            batch = None if limit is None else max(limit, _LIST_BATCH) if wanted else limit
            cursor = after
            while limit is None or len(matched) < limit:
                batch_stmt = stmt
                if cursor is not None:
                    batch_stmt = batch_stmt.where(tuple_(DeviceRow.name, DeviceRow.id) > cursor)
                if batch is not None:
                    batch_stmt = batch_stmt.limit(batch)
                rows = list(session.scalars(batch_stmt))
                matched += (r for r in rows if all(r.labels.get(k) == v for k, v in wanted.items()))
                if batch is None or len(rows) < batch:
                    break
                cursor = (rows[-1].name, rows[-1].id)
            more = limit is not None and len(matched) >= limit
            page = matched[:page_size] if page_size is not None else matched
            held = held_models(session, [row.id for row in page])
            return DevicePage(
                devices=[self._view(session, row, names, held) for row in page],
                next_after=(page[-1].name, page[-1].id) if more else None,
            )

    def get(self, device_id: str) -> DeviceView:
        with self._db.unit_of_work(readonly=True) as uow:
            row = self._require(uow.session, device_id)
            return self._view(uow.session, row, self._class_names(uow.session))

    @staticmethod
    def _require(session: Session, device_id: str) -> DeviceRow:
        if not device_id:
            raise InvalidArgument("device id is required")
        row = session.get(DeviceRow, device_id)
        if row is None:
            raise NotFound(f"no device with id {device_id!r}")
        return row

    # ------------------------------------------------------------ operator actions

    def _apply(
        self,
        actor: str,
        action: str,
        device_id: str,
        change: Any,
        details: dict[str, Any],
    ) -> DeviceView:
        with self._db.unit_of_work() as uow:
            row = self._require(uow.session, device_id)
            change(uow.session, row)
            row.desired_revision += 1
            audit.record(uow, actor, action, f"device:{row.id}", **details)
            uow.commit()
            view = self._view(uow.session, row, self._class_names(uow.session))
        self._events.publish(
            FleetEvent("device.updated", (device_id,), desired_changed=True, subject=action)
        )
        return view

    def accept(self, actor: str, device_id: str) -> DeviceView:
        def change(_: Session, row: DeviceRow) -> None:
            if row.state == DECOMMISSIONED:
                raise FailedPrecondition(f"device {row.id} is decommissioned; enroll it again")
            row.state = ACCEPTED
            row.state_reason = ""

        return self._apply(actor, "device.accept", device_id, change, {})

    def reject(self, actor: str, device_id: str, reason: str) -> DeviceView:
        def change(_: Session, row: DeviceRow) -> None:
            row.state = REJECTED
            row.state_reason = reason

        return self._apply(actor, "device.reject", device_id, change, {"reason": reason})

    def decommission(self, actor: str, device_id: str, reason: str) -> DeviceView:
        """Retire a device: every RPC of its credential and certificates is
        refused from now on, and its hardware id may enroll afresh without
        proof (a device that lost its identity, or a board reused)."""

        def change(_: Session, row: DeviceRow) -> None:
            if row.state == REJECTED:
                raise FailedPrecondition(
                    f"device {row.id} was rejected; a rejected device stays rejected"
                )
            row.state = DECOMMISSIONED
            row.state_reason = reason
            row.credential_hash = ""
            row.cert_serial = row.cert_previous_serial = None

        return self._apply(actor, "device.decommission", device_id, change, {"reason": reason})

    def update_labels(
        self, actor: str, device_id: str, set_: Mapping[str, str], remove: Iterable[str]
    ) -> DeviceView:
        set_ = validate_labels(set_)
        remove = list(remove)

        def change(session: Session, row: DeviceRow) -> None:
            labels = {k: v for k, v in row.labels.items() if k not in remove}
            labels.update(set_)
            row.labels = validate_labels(labels)
            classify_row(row, class_candidates(session))

        return self._apply(
            actor, "device.label", device_id, change, {"set": dict(set_), "remove": remove}
        )

    def set_class(self, actor: str, device_id: str, class_name: str) -> DeviceView:
        def change(session: Session, row: DeviceRow) -> None:
            if not class_name:
                row.class_pinned = False
                classify_row(row, class_candidates(session))
                return
            cls = session.scalar(select(DeviceClassRow).where(DeviceClassRow.name == class_name))
            if cls is None:
                raise NotFound(f"no device class named {class_name!r}")
            row.class_id = cls.id
            row.class_pinned = True

        action = "device.pin" if class_name else "device.unpin"
        return self._apply(actor, action, device_id, change, {"class": class_name})

    # ------------------------------------------------------------ agent reports

    def record_hello(
        self,
        device_id: str,
        hardware: dict[str, Any],
        runtime: dict[str, Any],
        protocol: int | None = None,
    ) -> bool:
        """Store the profile an agent reports on connect, and the sync
        protocol it speaks (Hello.protocol; None: leave it); reclassify if
        the profile changed. True if the desired state changed."""
        stored = None if protocol is None else agent_protocol_of(protocol)
        with self._db.unit_of_work() as uow:
            row = self._require(uow.session, device_id)
            same_protocol = stored is None or row.agent_protocol == stored
            if row.hardware == hardware and row.runtime == runtime and same_protocol:
                return False
            if stored is not None:
                row.agent_protocol = stored
            moved = False
            if row.hardware != hardware or row.runtime != runtime:
                row.hardware = hardware
                row.runtime = runtime
                moved = classify_row(row, class_candidates(uow.session))
            uow.commit()
        self._events.publish(FleetEvent("device.updated", (device_id,), desired_changed=moved))
        return moved

    def touch(self, seen: Mapping[str, dt.datetime]) -> None:
        """Record when devices were last heard from, in one batch."""
        if not seen:
            return
        with self._db.unit_of_work() as uow:
            # In id order, as every multi-device write: rows locked in
            # different orders by two transactions deadlock on PostgreSQL.
            uow.session.execute(
                update(DeviceRow),
                [{"id": device_id, "last_seen_at": seen[device_id]} for device_id in sorted(seen)],
            )
            uow.commit()

    def count_by_state(self) -> dict[str, int]:
        with self._db.unit_of_work(readonly=True) as uow:
            rows = uow.session.execute(
                select(DeviceRow.state, func.count()).group_by(DeviceRow.state)
            )
            return {state: int(n) for state, n in rows}
