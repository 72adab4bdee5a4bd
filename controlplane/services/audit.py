"""The audit log: who did what, when. Written in the same transaction as the
change it records, so the log never claims a change that was rolled back.

Searched in SQL (by actor, action, what it is about and a time range), so a
search covers the whole log, not the page a client loaded; each page comes
with the current names of what its entries are about, read in one query per
kind of target."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, false, or_, select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db import in_list
from edgefleet.controlplane.db.models import (
    AuditRow,
    DeviceClassRow,
    DeviceRow,
    EnrollmentTokenRow,
    ModelRow,
    ModelVersionRow,
    OperatorTokenRow,
    RolloutRow,
)
from edgefleet.controlplane.db.uow import Database, UnitOfWork
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.controlplane.services import references as ref


def record(uow: UnitOfWork, actor: str, action: str, target: str, **details: Any) -> None:
    uow.session.add(AuditRow(actor=actor, action=action, target=target, details=details))


MAX_ID = 2**63 - 1
# How targets are written (`kind:...`, see the audit.record calls): the
# kinds a search looks among when the text names none.
TARGET_KINDS = ("device", "rollout", "class", "model", "token", "operator_token", "signing_key")
# Entities one name may stand for in a search (devices' names are not unique).
NAMED_LIMIT = 50


@dataclass(frozen=True)
class AuditSearch:
    """What to find; every field empty or None means no condition.

    `action`: one action or a dotted group ("rollout" finds "rollout.start").
    `target`: what entries are about, as ref.lookup reads it (a full id, a
    name, an id prefix) for every kind, or `kind:text` for one kind.
    `actor`: the actor, or the start of it ("device:", an operator's name).
    `since`/`until`: at or after, before."""

    before_id: int = 0
    limit: int = 100
    action: str = ""
    target: str = ""
    actor: str = ""
    since: dt.datetime | None = None
    until: dt.datetime | None = None


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditRow]
    # target -> the current name of what it names (absent: none, or gone).
    target_names: dict[str, str] = field(default_factory=dict)


def search(db: Database, query: AuditSearch) -> AuditPage:
    """Newest first, with the targets' names."""
    if query.since and query.until and query.until <= query.since:
        raise InvalidArgument("the time range is empty: 'until' must be after 'since'")
    limit = max(1, min(query.limit or 100, 1000))
    stmt = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
    # Ids are signed 64-bit; the wire's before_id is uint64. One past every
    # id means no bound (as a bound, the database refuses it).
    if 0 < query.before_id <= MAX_ID:
        stmt = stmt.where(AuditRow.id < query.before_id)
    if query.action:
        stmt = stmt.where(
            or_(
                AuditRow.action == query.action,
                ref.starts_with(AuditRow.action, query.action.rstrip(".") + "."),
            )
        )
    if query.actor:
        stmt = stmt.where(ref.starts_with(AuditRow.actor, query.actor))
    if query.since is not None:
        stmt = stmt.where(AuditRow.at >= query.since)
    if query.until is not None:
        stmt = stmt.where(AuditRow.at < query.until)
    with db.unit_of_work(readonly=True) as uow:
        if query.target:
            stmt = stmt.where(_about(uow.session, query.target))
        rows = list(uow.session.scalars(stmt))
        return AuditPage(rows, target_names(uow.session, [r.target for r in rows]))


def list_entries(
    db: Database, *, before_id: int = 0, limit: int = 100, action: str = "", target: str = ""
) -> list[AuditRow]:
    """Newest first (search, without the names)."""
    query = AuditSearch(before_id=before_id, limit=limit, action=action, target=target)
    return search(db, query).entries


def _about(session: Session, text: str) -> ColumnElement[bool]:
    """Entries about whatever `text` names: the target as written; for each
    kind (or the one `kind:` names), the target with that id or name and,
    from ref.MIN_PREFIX characters, those starting with it (gone entities
    too); and the targets of the entities ref.lookup finds (by name, or a
    class's id prefix)."""
    kind_word, sep, rest = text.partition(":")
    kinds: Sequence[str] = TARGET_KINDS
    wanted = text
    if sep and kind_word in TARGET_KINDS and rest:
        kinds, wanted = (kind_word,), rest
    conditions: list[ColumnElement[bool]] = [AuditRow.target == text]
    conditions += [AuditRow.target == f"{k}:{wanted}" for k in kinds]
    if len(wanted) >= ref.MIN_PREFIX:
        conditions += [ref.starts_with(AuditRow.target, f"{k}:{wanted}") for k in kinds]
    named: set[str] = set()
    for kind in ref.KINDS:
        if kind.target in kinds and kind.name_column is not None:
            for found in ref.lookup(session, kind, wanted, limit=NAMED_LIMIT):
                named.add(_target_of(kind, found))
    conditions += [AuditRow.target == t for t in named if not t.endswith("@")]
    conditions += [ref.starts_with(AuditRow.target, t) for t in named if t.endswith("@")]
    return or_(false(), *conditions)


def _target_of(kind: ref.Kind, found: ref.Candidate) -> str:
    """How the audit log writes `found`: by id, or by name for classes;
    a model by `name@version` (so: that start)."""
    if kind is ref.MODEL:
        return f"model:{found.name}@"
    if kind.returns is ref.Returns.NAME:
        return f"{kind.target}:{found.name}"
    return f"{kind.target}:{found.id}"


def target_names(session: Session, targets: Iterable[str]) -> dict[str, str]:
    """target -> the current name of what it names, one query per kind: a
    device's or token's name, a class's name while it exists, a model
    version's `name@version` while it exists, a rollout's model@version."""
    by_kind: dict[str, set[str]] = defaultdict(set)
    for target in targets:
        kind, sep, rest = target.partition(":")
        if sep and rest:
            by_kind[kind].add(rest)
    names: dict[str, str] = {}
    for kind, table in (
        ("device", DeviceRow),
        ("token", EnrollmentTokenRow),
        ("operator_token", OperatorTokenRow),
    ):
        if by_kind[kind]:
            ids = in_list.padded(sorted(by_kind[kind]))
            rows = session.execute(select(table.id, table.name).where(table.id.in_(ids)))
            names.update({f"{kind}:{i}": name for i, name in rows})
    if by_kind["class"]:
        classes = in_list.padded(sorted(by_kind["class"]))
        found = session.scalars(select(DeviceClassRow.name).where(DeviceClassRow.name.in_(classes)))
        names.update({f"class:{name}": name for name in found})
    if by_kind["rollout"]:
        names.update({f"rollout:{i}": mv for i, mv in _rollout_refs(session, by_kind["rollout"])})
    if by_kind["model"]:
        names.update({f"model:{mv}": mv for mv in _model_refs(session, by_kind["model"])})
    return names


def _rollout_refs(session: Session, rollout_ids: Iterable[str]) -> list[tuple[str, str]]:
    """(rollout id, the model@version it rolls out)."""
    stmt = (
        select(RolloutRow.id, ModelRow.name, ModelVersionRow.version)
        .join(ModelVersionRow, ModelVersionRow.id == RolloutRow.model_version_id)
        .join(ModelRow, ModelRow.id == ModelVersionRow.model_id)
        .where(RolloutRow.id.in_(in_list.padded(sorted(rollout_ids))))
    )
    return [(i, f"{model}@{version}") for i, model, version in session.execute(stmt)]


def _model_refs(session: Session, refs: Iterable[str]) -> set[str]:
    """Those of `refs` (`name@version`) that are model versions now."""
    wanted = {mv for mv in refs if "@" in mv}
    models = sorted({mv.rsplit("@", 1)[0] for mv in wanted})
    stmt = (
        select(ModelRow.name, ModelVersionRow.version)
        .join(ModelVersionRow, ModelVersionRow.model_id == ModelRow.id)
        .where(ModelRow.name.in_(in_list.padded(models)))
    )
    return {f"{m}@{v}" for m, v in session.execute(stmt)} & wanted
