"""What operators type to name a thing, resolved to the thing.

Tables show names and 8-character ids, so every request that names a device,
rollout, build, class, model or token takes any of: its full id, its name, or
a unique prefix of its id. Exact id wins, then exact name, then id prefix.
Several matches are INVALID_ARGUMENT listing up to five candidates as
`id-prefix (name)`; none is NOT_FOUND naming what was looked up.

Each lookup is a few indexed queries of at most LOOKUP_LIMIT rows, so a fleet
of 10,000+ devices is never loaded to find one. The CLI, the TUI and any other
client get this at once because the API resolves request fields here before a
service sees them (api/operator_servicer.py); services keep taking full ids."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from edgefleet.controlplane.db import in_list
from edgefleet.controlplane.db.models import (
    BuildRow,
    DeviceClassRow,
    DeviceRow,
    EnrollmentTokenRow,
    ModelRow,
    OperatorTokenRow,
    RolloutRow,
)
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.errors import InvalidArgument, NotFound

# Shorter id prefixes than this are not looked up: 3 hex characters name one
# of 4,096 buckets, which at fleet scale is never one device.
MIN_PREFIX = 4
# One more than the candidates an ambiguity error lists, so it can say "and more".
SHOWN_CANDIDATES = 5
LOOKUP_LIMIT = SHOWN_CANDIDATES + 1
LIKE_ESCAPE = "\\"


class Returns(enum.Enum):
    """What a resolved reference is replaced with: what the service takes."""

    ID = "id"
    NAME = "name"


@dataclass(frozen=True)
class Kind:
    """One kind of thing operators name. `target` is how the audit log writes
    it (`device:<id>`, `class:<name>`); `returns` what services take."""

    word: str
    table: Any
    id_column: InstrumentedAttribute[str]
    name_column: InstrumentedAttribute[str] | None
    target: str
    returns: Returns = Returns.ID


DEVICE = Kind("device", DeviceRow, DeviceRow.id, DeviceRow.name, "device")
ROLLOUT = Kind("rollout", RolloutRow, RolloutRow.id, None, "rollout")
BUILD = Kind("build", BuildRow, BuildRow.id, None, "build")
DEVICE_CLASS = Kind(
    "device class", DeviceClassRow, DeviceClassRow.id, DeviceClassRow.name, "class", Returns.NAME
)
MODEL = Kind("model", ModelRow, ModelRow.id, ModelRow.name, "model", Returns.NAME)
ENROLLMENT_TOKEN = Kind(
    "enrollment token", EnrollmentTokenRow, EnrollmentTokenRow.id, EnrollmentTokenRow.name, "token"
)
OPERATOR_TOKEN = Kind(
    "operator token", OperatorTokenRow, OperatorTokenRow.id, OperatorTokenRow.name,
    "operator_token",
)  # fmt: skip

KINDS: tuple[Kind, ...] = (
    DEVICE,
    ROLLOUT,
    BUILD,
    DEVICE_CLASS,
    MODEL,
    ENROLLMENT_TOKEN,
    OPERATOR_TOKEN,
)


@dataclass(frozen=True)
class Candidate:
    id: str
    name: str

    def shown(self, width: int) -> str:
        short = self.id[:width]
        return f"{short} ({self.name})" if self.name else short


def escape_like(text: str) -> str:
    """`text` as a LIKE pattern's literal part: % and _ match only themselves."""
    return (
        text.replace(LIKE_ESCAPE, LIKE_ESCAPE * 2)
        .replace("%", LIKE_ESCAPE + "%")
        .replace("_", LIKE_ESCAPE + "_")
    )


def starts_with(column: Any, prefix: str) -> ColumnElement[bool]:
    """`column` starts with `prefix`, exactly (case and wildcards included).

    The range lets both databases walk the column's index (SQLite's LIKE
    never does on a BINARY column, nor PostgreSQL's outside the C
    collation); the escaped LIKE keeps the answer exact whatever the
    collation orders between the bounds."""
    condition = and_(column >= prefix, column.like(escape_like(prefix) + "%", escape=LIKE_ESCAPE))
    last = prefix[-1:]
    if last and ord(last) < 0x10FFFF:
        condition = and_(condition, column < prefix[:-1] + chr(ord(last) + 1))
    return condition


def _select(kind: Kind) -> Any:
    name = kind.name_column if kind.name_column is not None else kind.id_column
    return select(kind.id_column, name)


def _candidates(session: Session, stmt: Any, kind: Kind, limit: int) -> list[Candidate]:
    rows = session.execute(stmt.order_by(kind.id_column).limit(limit)).all()
    return [Candidate(str(r[0]), str(r[1]) if kind.name_column is not None else "") for r in rows]


def lookup(
    session: Session, kind: Kind, text: str, *, limit: int = LOOKUP_LIMIT
) -> list[Candidate]:
    """What `text` names among `kind`, by precedence: the one with that id;
    else those with that name; else those whose id starts with it (at least
    MIN_PREFIX characters). At most `limit`; empty when nothing matches."""
    if not text:
        return []
    exact = _candidates(session, _select(kind).where(kind.id_column == text), kind, 1)
    if exact:
        return exact
    if kind.name_column is not None:
        named = _candidates(session, _select(kind).where(kind.name_column == text), kind, limit)
        if named:
            return named
    if len(text) < MIN_PREFIX:
        return []
    prefixed = _select(kind).where(starts_with(kind.id_column, text))
    # Case-sensitive on both databases: SQLite's LIKE ignores ASCII case.
    return [c for c in _candidates(session, prefixed, kind, limit) if c.id.startswith(text)]


def resolve(session: Session, kind: Kind, text: str) -> str:
    """The full id (or, for classes and models, the name) of the one thing of
    `kind` that `text` names. Empty text stays empty: the service says what
    is required."""
    if not text:
        return text
    found = lookup(session, kind, text)
    if not found:
        raise NotFound(_not_found(kind, text))
    if len(found) > 1:
        raise InvalidArgument(_ambiguous(kind, text, found))
    return found[0].name if kind.returns is Returns.NAME else found[0].id


def _not_found(kind: Kind, text: str) -> str:
    what = "id or name" if kind.name_column is not None else "id"
    if len(text) < MIN_PREFIX:
        return (
            f"no {kind.word} with {what} {text!r} "
            f"(an id prefix needs at least {MIN_PREFIX} characters)"
        )
    return f"no {kind.word} with {what} {text!r}, nor an id starting with it"


def _ambiguous(kind: Kind, text: str, found: Sequence[Candidate]) -> str:
    width = max(8, len(text) + 4)
    shown = ", ".join(c.shown(width) for c in found[:SHOWN_CANDIDATES])
    more = " and more" if len(found) > SHOWN_CANDIDATES else ""
    if kind.name_column is not None and all(c.name == text for c in found):
        return (
            f"{len(found) if not more else 'more than 5'} {kind.word}s are named {text!r}: "
            f"{shown}{more}; give the id (or a unique start of it)"
        )
    return (
        f"{kind.word} {text!r} is ambiguous: it could be {shown}{more}; "
        "give more characters or the full id"
    )


class References:
    """Resolves references in one read-only transaction per call."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def resolve(self, kind: Kind, text: str) -> str:
        with self._db.unit_of_work(readonly=True) as uow:
            return resolve(uow.session, kind, text)

    def resolve_all(
        self, kind: Kind, texts: Iterable[str], *, keep_unknown: bool = False
    ) -> list[str]:
        """Each of `texts` resolved, in order; the first that names nothing,
        or several things, is the error (`keep_unknown`: one that names
        nothing stays as it is, for the service to name in its own error).
        Full ids (what scripts and the TUI send, up to 10,000 at a time) are
        found in chunks; only the rest are looked up one by one."""
        wanted = list(texts)
        with self._db.unit_of_work(readonly=True) as uow:
            known = (
                _existing_ids(uow.session, kind, wanted) if kind.returns is Returns.ID else set()
            )

            def one(text: str) -> str:
                if text in known:
                    return text
                try:
                    return resolve(uow.session, kind, text)
                except NotFound:
                    if keep_unknown:
                        return text
                    raise

            return [one(t) for t in wanted]


def _existing_ids(session: Session, kind: Kind, texts: Sequence[str]) -> set[str]:
    distinct = sorted(set(texts))
    found: set[str] = set()
    for start in range(0, len(distinct), in_list.STEP):
        chunk = in_list.padded(distinct[start : start + in_list.STEP])
        found.update(session.scalars(select(kind.id_column).where(kind.id_column.in_(chunk))))
    return found
