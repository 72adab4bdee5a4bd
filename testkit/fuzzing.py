"""Fuzzing every RPC of the control plane (issue 7): messages generated from
the protobuf descriptors, sent with every kind of credential to a real
`edgefleet server` subprocess, and checked for three properties:

* no call ends INTERNAL, UNKNOWN, UNIMPLEMENTED or DATA_LOSS, and none hangs
  past its deadline;
* the server process stays alive and its health check serves;
* no partial writes: a call that fails leaves the database as it was;
* bounded memory: no single call grows the server's resident memory by
  RSS_GROWTH_LIMIT or more (its peak during the call, where Linux lets the
  fuzzer reset the high-water mark; what is left after it elsewhere);
* after the hostile writes, every list RPC still answers within the
  server's message limit (`list_sizes`, checked at the end of a run;
  `flood` makes such writes in bulk, each free-text field as long as the
  server takes).

With `tls=True` the server runs `--tls`: operator RPCs and Enroll go to the
main port trusting its CA, device RPCs to the mutual-TLS device port with
the certificate of the device principal, issued by enrolling it with a CSR.

Nothing here lists RPCs or fields by hand: every method of every service in
device.proto and operator.proto is fuzzed, so RPCs and fields added later are
covered the day they land. Generation has three modes per message: *wild*
(every field drawn from the whole type, edge values first: empty, huge,
negative, NaN/inf, unicode, very long strings, enum values out of range),
*plausible* (ids, names and versions of things that exist, small sane
numbers) and *mutated* (a real request the set-up made, or a plausible one,
with one or two fields replaced by wild values), so fuzzing reaches past the
first validation.

tests/e2e/test_fuzz.py runs a small derandomized run in CI; bench/bench_fuzz.py
the 100,000-message one (docs/reliability.md, "Fuzzing").

    python -m testkit.fuzzing serve --data-dir D --port-file P --admin-token T [--tls]
runs the server the fuzzer talks to (what `edgefleet server` runs, with the
background jobs that write on their own schedule slowed to once an hour, so a
write seen during a failing call is that call's)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import psutil
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from edgefleet.agent.transport import new_key_and_csr
from edgefleet.controlplane.db.models import Base
from edgefleet.controlplane.domain.roles import ADMIN
from edgefleet.controlplane.server import MAX_MESSAGE_BYTES
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import operator_pb2 as o
from testkit.builds import one_candidate_result

FORBIDDEN = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.DATA_LOSS,
    }
)
# A server stream still open after this long without a message is live and
# waiting (WatchFleet, a Sync the agent keeps open): cancelled, not a failure.
STREAM_IDLE_S = 0.1
# Nothing the fuzzer sends should take this long; longer is reported as a hang.
CALL_DEADLINE_S = 20.0
HEALTH_EVERY = 25
# No single call may grow the server's resident memory by this much (50 MB).
RSS_GROWTH_LIMIT = 50 * 10**6
# Free-text strings of this many characters in Fuzzer.flood's writes: 32 of
# them make a list of 8 MiB, the server's message limit.
FLOOD_STRING = 256 * 1024
# RPCs that read: not flooded.
_READS = ("List", "Get", "Query", "Watch", "Download")
# Refusals the server audits on purpose (the audit row is the point of
# them): the one write a failing call may make.
AUDITED_REFUSALS = frozenset({"device.reenroll.refused"})
# Every this many batches, what the set-up made is made again.
REPLENISH_EVERY = 40
# After a call that makes the server queue work for later (a push or a class
# change queues builds; a device's status reports are written in batches),
# writes to those tables within this window are that work's, not a failure's.
EXCUSE_S = 2.0
LONG_STRINGS = (201, 4096, 100_000)
EDGE_STRINGS = (
    "",
    " ",
    "  padded  ",
    "UPPER",
    "a b",
    "-",
    "--",
    "a-",
    "../../etc/passwd",
    "%s%n",
    "\x00",
    "' OR 1=1 --",
    "é",
    "名前",
    "🙂",
    "\u202e",
    "a" * 63,
    "a" * 64,
    "a" * 200,
    "1.0.0",
    "v1",
    "1.0.0-rc.1+build.5",
    "0.0.0",
    "999999999999999999999.0.0",
    "1.0",
    "-1.0.0",
)
GARBAGE_CREDENTIALS = (
    "Bearer",
    "Bearer ",
    "Bearer garbage",
    "Basic dXNlcjpwYXNz",
    "bearer efd_x.y",
    "Bearer efd_00000000000000000000000000000000.secret",
    "Bearer efo_nope.nope",
    "Bearer " + "A" * 4000,
    "Bearer efd_.",
    "Bearer ..",
)
SERVICES = (
    d.DESCRIPTOR.services_by_name["DeviceService"],
    o.DESCRIPTOR.services_by_name["OperatorService"],
)


# ---------------------------------------------------------------- what exists


@dataclasses.dataclass
class Pools:
    """Real values the plausible generator draws from. Lists are filled in
    place (strategies index into them), so a refresh reaches every strategy."""

    device_ids: list[str] = dataclasses.field(default_factory=list)
    hardware_ids: list[str] = dataclasses.field(default_factory=list)
    class_names: list[str] = dataclasses.field(default_factory=list)
    model_names: list[str] = dataclasses.field(default_factory=list)
    versions: list[str] = dataclasses.field(default_factory=list)
    digests: list[str] = dataclasses.field(default_factory=list)
    build_ids: list[str] = dataclasses.field(default_factory=list)
    rollout_ids: list[str] = dataclasses.field(default_factory=list)
    operator_token_ids: list[str] = dataclasses.field(default_factory=list)
    enrollment_token_ids: list[str] = dataclasses.field(default_factory=list)
    enrollment_secrets: list[str] = dataclasses.field(default_factory=list)
    audit_actions: list[str] = dataclasses.field(default_factory=list)
    event_kinds: list[str] = dataclasses.field(
        default_factory=lambda: [
            "device.enrolled",
            "device.updated",
            "class.updated",
            "model.pushed",
            "rollout.updated",
            "deployment.updated",
            "telemetry.updated",
            "alert",
        ]
    )
    label_keys: list[str] = dataclasses.field(default_factory=lambda: ["site", "env", "fuzz"])
    label_values: list[str] = dataclasses.field(default_factory=lambda: ["line-3", "prod", "x"])
    rule_fields: list[str] = dataclasses.field(
        default_factory=lambda: [
            "arch",
            "memory_mb",
            "cpu_cores",
            "os",
            "label.site",
            "accelerator.kind",
            "runtime.onnxruntime_version",
            "nope",
        ]
    )
    rule_values: list[str] = dataclasses.field(
        default_factory=lambda: [
            "aarch64",
            "x86_64",
            "2048",
            "4",
            "linux",
            "line-3",
            "1.17",
            "gpu",
        ]
    )
    names: list[str] = dataclasses.field(default_factory=lambda: ["fuzz", "pi", "gw", "line-3"])
    # Versions no push has used yet (until one does), and those with the
    # versions that exist: what a plausible version field holds.
    new_versions: tuple[str, ...] = ("2.0.0", "2.0.1-rc.1", "3.1.4", "10.0.0")
    version_candidates: list[str] = dataclasses.field(default_factory=list)

    def set_versions(self, existing: Iterable[str]) -> None:
        self.versions[:] = sorted(set(existing))
        self.version_candidates[:] = [*self.versions, *self.new_versions]

    def ids(self) -> list[str]:
        return [
            *self.device_ids,
            *self.build_ids,
            *self.rollout_ids,
            *self.operator_token_ids,
            *self.enrollment_token_ids,
        ]

    def pool_for(self, message: str, field: str) -> list[str]:
        """Which real values a string field of `message` plausibly holds."""
        if field == "hardware_id":
            return self.hardware_ids
        if field == "enrollment_token":
            return self.enrollment_secrets
        if "device_id" in field:
            return self.device_ids
        if field in ("class_name", "class_names"):
            return self.class_names
        if field == "model_name":
            return self.model_names
        if field in ("version", "model_version", "latest_version", "shadow_version"):
            return self.version_candidates
        if "digest" in field or field == "sha256":
            return self.digests
        if field == "rollout_id":
            return self.rollout_ids
        if field == "kinds":
            return self.event_kinds
        if field == "action":
            return self.audit_actions
        if field == "field":
            return self.rule_fields
        if field == "values":
            return self.rule_values
        if field in ("id", "name", "target"):
            for word, pool in (
                ("OperatorToken", self.operator_token_ids),
                ("EnrollmentToken", self.enrollment_token_ids),
                ("Build", self.build_ids),
                ("Rollout", self.rollout_ids),
                ("DeviceClass", self.class_names),
                ("Model", self.model_names),
                ("Device", self.device_ids),
            ):
                if word in message and pool:
                    return pool if field != "name" or word in ("DeviceClass", "Model") else []
            return self.ids() if field != "name" else self.names
        return self.names


def _live(pool: list[str], fallback: Sequence[str]) -> st.SearchStrategy[str]:
    """An element of `pool` as it is when drawn (it may be refilled)."""
    return st.integers(0, 1 << 16).map(
        lambda i: pool[i % len(pool)] if pool else fallback[i % len(fallback)]
    )


# ---------------------------------------------------------------- generation

# A message descriptor: the stubs tell the pure-Python class from upb's,
# and this module meets both.
Descriptor = Any
Field = Any

_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 1e-9)
MAX_DEPTH = 3
# Strings protobuf can carry: any code point but the surrogates.
_UTF8 = st.characters(codec="utf-8")


def _edge_ints(lo: int, hi: int) -> list[int]:
    return sorted({v for v in (0, 1, -1, 2, 100, lo, hi, lo + 1, hi - 1) if lo <= v <= hi})


class Generator:
    """Hypothesis strategies for any message type, from its descriptor."""

    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self._cache: dict[tuple[str, str, int], st.SearchStrategy[Message]] = {}

    # -- scalars

    def _wild_scalar(self, owner: Descriptor, f: Field) -> st.SearchStrategy[Any]:
        cpp = f.cpp_type
        if cpp in _INT_RANGES:
            lo, hi = _INT_RANGES[cpp]
            return st.one_of(st.sampled_from(_edge_ints(lo, hi)), st.integers(lo, hi))
        if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
            floats = st.floats(width=32 if cpp == FieldDescriptor.CPPTYPE_FLOAT else 64)
            return st.one_of(st.sampled_from(_FLOAT_EDGES), floats)
        if cpp == FieldDescriptor.CPPTYPE_BOOL:
            return st.booleans()
        if cpp == FieldDescriptor.CPPTYPE_ENUM:
            numbers = [v.number for v in f.enum_type.values]
            lo, hi = _INT_RANGES[FieldDescriptor.CPPTYPE_INT32]
            return st.one_of(
                st.sampled_from(numbers),
                st.sampled_from([max(numbers) + 1, -1, lo, hi]),
                st.integers(lo, hi),
            )
        if f.type == FieldDescriptor.TYPE_BYTES:
            return st.one_of(
                st.binary(max_size=64),
                st.sampled_from([b"", b"\x00" * 1024, b"\xff" * 70_000]),
                _live(self.pools.digests, ["0" * 64]).map(str.encode),
            )
        real = self.pools.pool_for(owner.name, f.name)
        return st.one_of(
            st.text(_UTF8, max_size=24),
            st.sampled_from(EDGE_STRINGS),
            st.tuples(_UTF8, st.sampled_from(LONG_STRINGS)).map(lambda p: p[0] * p[1]),
            _live(real, EDGE_STRINGS),
            # A real value, slightly wrong: padded, upper-cased, one more character.
            st.tuples(_live(real, EDGE_STRINGS), st.sampled_from([" {} ", "{}x", "{}\n"])).map(
                lambda p: p[1].format(p[0])
            ),
            _live(real, EDGE_STRINGS).map(str.upper),
        )

    def _plausible_scalar(self, owner: Descriptor, f: Field) -> st.SearchStrategy[Any]:
        cpp = f.cpp_type
        if cpp in _INT_RANGES:
            return st.sampled_from([0, 1, 2, 3, 10, 50])
        if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
            return st.sampled_from([0.0, 0.5, 1.0, 2.0, 10.0, 50.0, 100.0])
        if cpp == FieldDescriptor.CPPTYPE_BOOL:
            return st.booleans()
        if cpp == FieldDescriptor.CPPTYPE_ENUM:
            numbers = [v.number for v in f.enum_type.values]
            return st.sampled_from([n for n in numbers if n] or numbers)
        if f.type == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=16)
        return _live(self.pools.pool_for(owner.name, f.name), self.pools.names)

    # -- fields and messages

    def _value(self, owner: Descriptor, f: Field, wild: bool, depth: int) -> st.SearchStrategy[Any]:
        """One value of a singular field (a message value is a Message)."""
        if f.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            return self.message(f.message_type, wild=wild, depth=depth + 1)
        return self._wild_scalar(owner, f) if wild else self._plausible_scalar(owner, f)

    def field(
        self, owner: Descriptor, f: Field, wild: bool, depth: int = 0
    ) -> st.SearchStrategy[Any]:
        """The whole value of a field: a list for repeated, a dict for maps."""
        if f.is_repeated and f.message_type is not None and f.message_type.GetOptions().map_entry:
            key_f = f.message_type.fields_by_name["key"]
            val_f = f.message_type.fields_by_name["value"]
            keys = (
                self._wild_scalar(owner, key_f) if wild else _live(self.pools.label_keys, ["site"])
            )
            values = (
                self._value(owner, val_f, wild, depth)
                if wild or key_f.type != val_f.type
                else _live(self.pools.label_values, ["x"])
            )
            return st.dictionaries(keys, values, max_size=4 if wild else 2)
        if f.is_repeated:
            one = self._value(owner, f, wild, depth)
            if not wild:
                return st.lists(one, min_size=1, max_size=2)
            # Many copies of one plausible element (a real id a thousand
            # times): sizes a handler may not expect.
            many = self._value(owner, f, False, depth)
            return st.one_of(
                st.lists(one, max_size=4),
                st.tuples(many, st.sampled_from([100, 1000])).map(lambda p: [p[0]] * p[1]),
            )
        return self._value(owner, f, wild, depth)

    def message(
        self, desc: Descriptor, *, wild: bool, depth: int = 0
    ) -> st.SearchStrategy[Message]:
        """Messages of type `desc`: each field set or not, one member of each
        oneof at most, nested messages down to MAX_DEPTH."""
        key = (desc.full_name, "wild" if wild else "plausible", min(depth, MAX_DEPTH))
        if key not in self._cache:
            self._cache[key] = st.deferred(lambda: self._build(desc, wild, depth))
        return self._cache[key]

    def _build(self, desc: Descriptor, wild: bool, depth: int) -> st.SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(desc)
        if depth >= MAX_DEPTH:
            return st.just(cls())
        groups: list[list[Field]] = []
        for oneof in desc.oneofs:
            if len(oneof.fields) > 1:
                groups.append(list(oneof.fields))
        grouped = {f.name for g in groups for f in g}
        singles = [f for f in desc.fields if f.name not in grouped]
        if not singles and not groups:
            return st.just(cls())
        set_p = 50 if wild else 75

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            msg = cls()
            for f in singles:
                if draw(st.integers(0, 99)) < set_p:
                    _assign(msg, f, draw(self.field(desc, f, wild, depth)))
            for group in groups:
                pick = draw(st.integers(-1, len(group) - 1))
                if pick >= 0:
                    f = group[pick]
                    _assign(msg, f, draw(self.field(desc, f, wild, depth)))
            return msg

        return build()

    def mutated(self, seeds: Sequence[Message]) -> st.SearchStrategy[Message]:
        """A copy of one of `seeds` with one or two fields anywhere in it
        replaced by a wild value (or a plausible one, or cleared)."""

        @st.composite
        def mutate(draw: st.DrawFn) -> Message:
            base = seeds[draw(st.integers(0, len(seeds) - 1))]
            msg = type(base)()
            msg.CopyFrom(base)
            for _ in range(draw(st.integers(1, 2))):
                sites = list(_sites(msg))
                if not sites:
                    break  # a message with no fields: nothing to mutate
                node, f = sites[draw(st.integers(0, len(sites) - 1))]
                how = draw(st.integers(0, 9))
                if how == 0:
                    node.ClearField(f.name)
                else:
                    # Mostly wild; now and then another real value (a new
                    # version for a real push, another device's id).
                    wild = how > 3
                    _assign(node, f, draw(self.field(node.DESCRIPTOR, f, wild=wild)))
            return msg

        return mutate()

    def request(self, desc: Descriptor, seeds: Sequence[Message]) -> st.SearchStrategy[Message]:
        """Any of the three modes for one request message."""
        modes = [
            self.message(desc, wild=True),
            self.message(desc, wild=False),
            self.mutated([m for m in seeds if m.DESCRIPTOR is desc] or [_empty(desc)]),
        ]
        return st.one_of(modes)

    def stream(
        self, desc: Descriptor, seeds: Sequence[Sequence[Message]]
    ) -> st.SearchStrategy[list[Message]]:
        """A client stream: generated messages, or a real stream with one
        message mutated, dropped, repeated or moved."""
        flat = [m for s in seeds for m in s]
        fresh = st.lists(self.request(desc, flat), max_size=4)
        if not seeds:
            return fresh

        @st.composite
        def edited(draw: st.DrawFn) -> list[Message]:
            msgs = list(seeds[draw(st.integers(0, len(seeds) - 1))])
            if not msgs:
                return msgs
            at = draw(st.integers(0, len(msgs) - 1))
            how = draw(st.sampled_from(["mutate", "mutate", "drop", "repeat", "first", "keep"]))
            if how == "mutate":
                msgs[at] = draw(self.mutated([msgs[at]]))
            elif how == "drop":
                del msgs[at]
            elif how == "repeat":
                msgs.insert(at, msgs[at])
            elif how == "first":
                msgs.insert(0, msgs.pop(at))
            return msgs

        return st.one_of(fresh, edited())


def _empty(desc: Descriptor) -> Message:
    return message_factory.GetMessageClass(desc)()


def _assign(msg: Message, f: Field, value: Any) -> None:
    """Set a field to a generated value, replacing what it held."""
    msg.ClearField(f.name)
    target = getattr(msg, f.name) if f.is_repeated or f.message_type is not None else None
    if f.is_repeated and f.message_type is not None and f.message_type.GetOptions().map_entry:
        assert target is not None
        if f.message_type.fields_by_name["value"].message_type is not None:
            for k, v in value.items():
                target[k].CopyFrom(v)
        else:
            target.update(value)
    elif f.is_repeated:
        assert target is not None
        target.extend(value)
    elif f.message_type is not None:
        assert target is not None
        target.CopyFrom(value)
    else:
        setattr(msg, f.name, value)


def _sites(msg: Message) -> Iterable[tuple[Message, Field]]:
    """Every field of every message in the tree (set or not): where a
    mutation may land."""
    for f in msg.DESCRIPTOR.fields:
        yield msg, f
    for f, value in msg.ListFields():
        if f.message_type is None or f.message_type.GetOptions().map_entry:
            continue
        for child in value if f.is_repeated else [value]:
            yield from _sites(child)


# ---------------------------------------------------------------- the database


@dataclasses.dataclass(frozen=True)
class Group:
    """Columns a background job of the server writes, and the calls after
    which it may: writes there within EXCUSE_S of such a call are excused."""

    name: str
    columns: frozenset[tuple[str, str]]  # (table, column); column "*": the whole table
    after: Callable[[str, str, grpc.StatusCode | str], bool]


# Written on any authenticated call, failing ones too (at most once a minute
# per token / every few seconds per streaming device): never compared.
ALWAYS_SKIPPED = frozenset({("devices", "last_seen_at"), ("operator_tokens", "last_used_at")})
GROUPS = (
    Group(
        # A Sync that fails on a later message has recorded the Hello before.
        "hello",
        frozenset(
            {
                ("devices", "hardware"),
                ("devices", "runtime"),
                # Which protocol the agent speaks (one model or several).
                ("devices", "agent_protocol"),
                ("devices", "class_id"),
                ("devices", "desired_revision"),
            }
        ),
        lambda method, who, code: method == "Sync" and who == "device",
    ),
    Group(
        "status reports",
        frozenset(
            {
                ("devices", "applied_revision"),
                ("devices", "update_status"),
                ("deployment_events", "*"),
            }
        ),
        lambda method, who, code: method == "Sync" and who == "device",
    ),
    Group(
        "queued builds",
        frozenset({("builds", "*"), ("artifacts", "*")}),
        lambda method, who, code: (
            code == grpc.StatusCode.OK
            and method
            in ("PushModel", "CreateDeviceClass", "UpdateDeviceClass", "DeleteDeviceClass")
        ),
    ),
)
Snapshot = dict[tuple[str, str], tuple[int, str]]


class DbProbe:
    """Reads the server's database from outside: a snapshot of every table
    (row count and a hash of its rows, by column group), and invariants."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url)
        self._sqlite: sqlite3.Connection | None = None
        if url.startswith("sqlite:///"):
            self._sqlite = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        # Append-only tables (integer ids): rows hashed once, new ones after.
        self._appended: dict[str, tuple[int, str]] = {}

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        self.engine.dispose()

    def version(self) -> int | None:
        """SQLite's data_version: changes whenever another connection
        commits, so an unchanged one proves nothing was written. None on
        PostgreSQL (every check takes a snapshot)."""
        if self._sqlite is None:
            return None
        return int(self._sqlite.execute("PRAGMA data_version").fetchone()[0])

    def snapshot(self) -> Snapshot:
        out: Snapshot = {}
        with self.engine.connect() as conn:
            for table in Base.metadata.sorted_tables:
                cols = [
                    col for col in table.columns if (table.name, col.name) not in ALWAYS_SKIPPED
                ]
                pk = list(table.primary_key.columns)
                by_group: dict[str, list[Any]] = {"": []}
                for col in cols:
                    group = _group_of(table.name, col.name)
                    by_group.setdefault(group, []).append(col)
                count = int(conn.scalar(select(func.count()).select_from(table)) or 0)
                append_only = (
                    len(pk) == 1
                    and pk[0].name == "id"
                    and table.name
                    in (
                        "audit_log",
                        "telemetry",
                        "deployment_events",
                    )
                )
                for group, group_cols in by_group.items():
                    if not group_cols:
                        continue
                    stmt = select(*group_cols).order_by(*pk)
                    if append_only:
                        digest = self._append_hash(conn, table.name, group, stmt, pk[0], count)
                    else:
                        digest = _hash_rows(conn.execute(stmt))
                    out[(table.name, group)] = (count, digest)
            conn.rollback()
        return out

    def _append_hash(
        self, conn: Any, table: str, group: str, stmt: Any, pk: Any, count: int
    ) -> str:
        """A running hash over rows in id order: only rows past the last one
        hashed are read."""
        key = f"{table}/{group}"
        last_id, digest = self._appended.get(key, (0, ""))
        rows = conn.execute(stmt.add_columns(pk).where(pk > last_id)).all()
        if rows:
            h = hashlib.sha256(digest.encode())
            for row in rows:
                h.update(repr(tuple(row)[:-1]).encode())
            last_id, digest = max(int(r[-1]) for r in rows), h.hexdigest()
            self._appended[key] = (last_id, digest)
        # Deleted rows (a roll-up) show in the count, kept beside the hash.
        return f"{digest}:{count}"

    def appended_up_to(self, table: str) -> int:
        """The highest id of append-only `table` the last snapshot hashed."""
        return max(
            (last for key, (last, _) in self._appended.items() if key.startswith(f"{table}/")),
            default=0,
        )

    def audit_actions_after(self, last_id: int) -> list[str]:
        """The actions of audit entries past `last_id`."""
        with self.engine.connect() as conn:
            return [
                str(action)
                for action in conn.scalars(
                    text("SELECT action FROM audit_log WHERE id > :i ORDER BY id"), {"i": last_id}
                )
            ]

    def invariants(self) -> list[str]:
        """What must hold of the data whatever was called: foreign keys,
        models with versions, blobs whole, rollouts with stages, ..."""
        broken: list[str] = []
        with self.engine.connect() as conn:

            def check(what: str, sql: str) -> None:
                try:
                    n = int(conn.scalar(text(sql)) or 0)
                except SQLAlchemyError as exc:
                    broken.append(f"{what}: query failed: {exc}")
                    return
                if n:
                    broken.append(f"{what}: {n} row(s)")

            for table in Base.metadata.sorted_tables:
                for fk in table.foreign_keys:
                    child, parent = fk.parent, fk.column
                    check(
                        f"{table.name}.{child.name} -> {parent.table.name}.{parent.name}",
                        f"SELECT count(*) FROM {table.name} t WHERE t.{child.name} IS NOT NULL "
                        f"AND NOT EXISTS (SELECT 1 FROM {parent.table.name} p "
                        f"WHERE p.{parent.name} = t.{child.name})",
                    )
            check(
                "model without versions",
                "SELECT count(*) FROM models m WHERE NOT EXISTS "
                "(SELECT 1 FROM model_versions v WHERE v.model_id = m.id)",
            )
            check(
                "assignment newer than its device's sequence",
                "SELECT count(*) FROM device_assignments a JOIN devices d ON d.id = a.device_id "
                "WHERE a.sequence > d.assignment_seq OR a.sequence < 1",
            )
            check(
                "device in an unknown state",
                "SELECT count(*) FROM devices WHERE state NOT IN "
                "('pending', 'accepted', 'rejected', 'decommissioned')",
            )
            check(
                "device with a revision below 1",
                "SELECT count(*) FROM devices WHERE desired_revision < 1",
            )
            check(
                "enrollment token used past its limit",
                "SELECT count(*) FROM enrollment_tokens WHERE max_uses > 0 AND uses > max_uses",
            )
            check(
                "rollout in an unknown state",
                "SELECT count(*) FROM rollouts WHERE state NOT IN "
                "('draft', 'scheduled', 'running', 'waiting_approval', 'paused', 'succeeded', "
                "'aborted')",
            )
            check(
                "build in an unknown state",
                "SELECT count(*) FROM builds WHERE state NOT IN "
                "('queued', 'running', 'succeeded', 'failed')",
            )
            check(
                "artifact of a build that did not succeed",
                "SELECT count(*) FROM artifacts a JOIN builds b ON b.id = a.build_id "
                "WHERE b.state <> 'succeeded'",
            )
            rows = conn.execute(text("SELECT id, spec, current_stage FROM rollouts")).all()
            for rollout_id, spec, current in rows:
                if isinstance(spec, str):
                    spec = json.loads(spec)
                stages = (spec if isinstance(spec, dict) else {}).get("stages") or []
                if not stages:
                    broken.append(f"rollout {rollout_id} has no stages")
                elif not 0 <= current <= len(stages):
                    broken.append(f"rollout {rollout_id} is at stage {current} of {len(stages)}")
                n = conn.scalar(
                    text(
                        "SELECT count(*) FROM rollout_devices WHERE rollout_id = :r "
                        "AND (stage < 0 OR stage >= :n)"
                    ),
                    {"r": rollout_id, "n": len(stages)},
                )
                if n:
                    broken.append(f"rollout {rollout_id}: {n} device(s) in a stage it lacks")
            now = dt.datetime.now(dt.UTC)
            admins = [
                expires
                for expires, revoked in conn.execute(
                    text("SELECT expires_at, revoked_at FROM operator_tokens WHERE role = :r"),
                    {"r": ADMIN},
                )
                if revoked is None and (expires is None or _aware(expires) > now)
            ]
            if not admins:
                broken.append("no usable admin operator token is left")
        return broken


def _aware(value: Any) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _group_of(table: str, column: str) -> str:
    for group in GROUPS:
        if (table, column) in group.columns or (table, "*") in group.columns:
            return group.name
    return ""


def _hash_rows(rows: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(repr(tuple(row)).encode())
    return h.hexdigest()


def diff(before: Snapshot, after: Snapshot) -> list[tuple[str, str]]:
    """(table, group) whose rows changed."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


# ---------------------------------------------------------------- the server


class FuzzServer:
    """`python -m testkit.fuzzing serve` as a subprocess on a loopback port
    (with `tls`: TLS there, and mutual TLS on a second port for devices)."""

    def __init__(
        self, data_dir: Path, admin_token: str, db_url: str | None = None, *, tls: bool = False
    ) -> None:
        self.data_dir = data_dir
        self.admin_token = admin_token
        self.db_url = db_url or f"sqlite:///{(data_dir / 'edgefleet.db').resolve()}"
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.device_port = 0
        self.log_path = data_dir / "server.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def device_address(self) -> str:
        """The mutual-TLS device port (with tls)."""
        return f"127.0.0.1:{self.device_port}"

    @property
    def ca_file(self) -> Path:
        """The CA certificate the server writes with tls."""
        return self.data_dir / "ca.pem"

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.data_dir / "port"
        port_file.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "testkit.fuzzing",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--port-file",
            str(port_file),
            "--admin-token",
            self.admin_token,
            "--db",
            self.db_url,
            *(["--tls"] if self.tls else []),
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"fuzz server exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"fuzz server did not start:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        if self.tls:
            # Written before the main port's file.
            self.device_port = int(port_file.with_name("device-port").read_text())

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def serve_main(argv: Sequence[str]) -> None:
    """The fuzzer's server: the real control plane, with the jobs that write
    on their own clock (rollout ticks, telemetry roll-ups) once an hour and no
    build workers (the fuzzer finishes the set-up's builds itself)."""
    import logging

    from edgefleet.controlplane.config import ServerConfig
    from edgefleet.controlplane.server import serve

    parser = argparse.ArgumentParser(prog="python -m testkit.fuzzing serve")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--admin-token", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--tls", action="store_true", help="TLS, mutual TLS for devices")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(
        serve(
            ServerConfig(
                data_dir=args.data_dir,
                db_url=args.db,
                listen="127.0.0.1:0",
                port_file=args.port_file,
                admin_token=args.admin_token,
                heartbeat_interval_s=2,
                max_upload_mb=4,
                build_workers=0,
                rollout_tick_s=3600.0,
                telemetry_rollup_every_s=3600.0,
                # The device port on another free port (device-port file).
                tls=args.tls,
            )
        )
    )


# ---------------------------------------------------------------- calls


@dataclasses.dataclass(frozen=True)
class Rpc:
    service: str
    method: MethodDescriptor
    request: type[Message]
    response: type[Message]

    @property
    def name(self) -> str:
        return str(self.method.name)

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method.name}"

    @property
    def codec(self) -> dict[str, Any]:
        """The (de)serializers a channel's multi-callable needs."""
        return {
            "request_serializer": self.request.SerializeToString,
            "response_deserializer": self.response.FromString,
        }


def every_rpc() -> list[Rpc]:
    """Every method of every service the control plane serves."""
    return [
        Rpc(
            service.full_name,
            method,
            message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type),
        )
        for service in SERVICES
        for method in service.methods
    ]


@dataclasses.dataclass(frozen=True)
class Case:
    rpc: Rpc
    who: str
    messages: tuple[Message, ...]  # one for unary requests


@dataclasses.dataclass
class Failure:
    rpc: str
    who: str
    prop: str
    detail: str
    request: str

    def __str__(self) -> str:
        return f"{self.rpc} as {self.who}: {self.prop}: {self.detail}\n  request: {self.request}"


@dataclasses.dataclass
class Report:
    calls: int = 0
    messages: int = 0
    seconds: float = 0.0
    codes: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)
    call_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    principals: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)
    # (principal kind, status code): what each credential got.
    by_who: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)
    failures: list[Failure] = dataclasses.field(default_factory=list)
    invariants: list[str] = dataclasses.field(default_factory=list)
    health_checks: int = 0
    snapshots: int = 0
    # The largest growth of the server's resident memory one call caused, per RPC.
    rss_growth: dict[str, int] = dataclasses.field(default_factory=dict)
    # Whether that was the peak during the call (else: what was left after it).
    rss_peaks: bool = False
    # List RPCs after the hostile writes: the largest answer (bytes), and
    # those over the message limit (or that could not be sent at all).
    list_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    oversized: list[str] = dataclasses.field(default_factory=list)

    def table(self) -> str:
        """Counts per status code per RPC, one line per RPC."""
        by_rpc: dict[str, Counter[str]] = {}
        for (rpc, code), n in self.codes.items():
            by_rpc.setdefault(rpc, Counter())[code] = n
        lines = []
        for rpc in sorted(by_rpc):
            parts = ", ".join(f"{code} {n}" for code, n in by_rpc[rpc].most_common())
            lines.append(f"{rpc:24} {sum(by_rpc[rpc].values()):6}  {parts}")
        return "\n".join(lines)


def _short(messages: Sequence[Message], limit: int = 600) -> str:
    text_ = " | ".join(f"{type(m).__name__}({m!s})".replace("\n", " ") for m in messages)
    return text_ if len(text_) <= limit else text_[:limit] + f"... ({len(text_)} chars)"


async def _aiter(messages: Sequence[Message]) -> AsyncIterator[Message]:
    for m in messages:
        yield m


LOST = "STATUS_LOST"


def _status(code: grpc.StatusCode, details: str | None) -> grpc.StatusCode | str:
    """The call's status; STATUS_LOST where the client never got the
    server's (its trailer was past the client's metadata limit)."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size exceeds" in (details or ""):
        return LOST
    return code


async def _read_stream(call: Any) -> grpc.StatusCode | str:
    """Read a server stream to its end; one still open and silent after
    STREAM_IDLE_S is cancelled and reported as STREAM_OPEN."""
    while True:
        try:
            msg = await asyncio.wait_for(call.read(), STREAM_IDLE_S)
        except TimeoutError:
            call.cancel()
            return "STREAM_OPEN"
        except grpc.aio.AioRpcError as err:
            return _status(err.code(), err.details())
        if msg is grpc.aio.EOF:  # type: ignore[attr-defined]
            return await call.code()  # type: ignore[no-any-return]


# ---------------------------------------------------------------- the server's memory


class ServerMemory:
    """The server process's resident memory (psutil) and, on Linux, its peak
    during a call: /proc/PID/clear_refs resets the high-water mark (VmHWM)
    to the current RSS before the call, so a call that allocates and frees
    again is still seen. Where that is not allowed, what is left after the
    call is all there is to go by."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self._clear_refs = Path(f"/proc/{pid}/clear_refs")
        self._status = Path(f"/proc/{pid}/status")
        self.peaks = self._reset_peak()

    def _reset_peak(self) -> bool:
        try:
            self._clear_refs.write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        except OSError:
            return False
        return self._peak() is not None

    def _peak(self) -> int | None:
        try:
            for line in self._status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # in kB
        except (OSError, ValueError, IndexError):
            pass
        return None

    def before_call(self) -> int:
        """The RSS now, with the peak reset to it."""
        rss = int(self.process.memory_info().rss)
        if self.peaks:
            self._reset_peak()
        return rss

    def growth(self, before: int) -> int:
        """How far the RSS rose above `before` (the peak since before_call)."""
        peak = self._peak() if self.peaks else None
        return (peak if peak is not None else int(self.process.memory_info().rss)) - before


@dataclasses.dataclass
class _Channels:
    """An aio channel (unary and server-streaming calls) and a blocking one
    (client streams) to one port with one set of credentials."""

    aio: grpc.aio.Channel
    sync: grpc.Channel


# Large list answers must reach the fuzzer whole, to be measured.
_CLIENT_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def _bearer(metadata: Sequence[tuple[str, str]]) -> str:
    return next((v for k, v in metadata if k == "authorization"), "")


# "<field path> is N characters long; at most M": what the server's
# INVALID_ARGUMENT says of a string over its limit (the path as in
# "samples[0].power_mode").
_LIMIT = re.compile(r"(?P<path>[\w.\[\]]+) is [\d,]+ characters long; at most (?P<limit>[\d,]+)")
_PATH_PART = re.compile(r"(\w+)(?:\[(\d+)\])?")
# A request has this many free-text fields at most that may each be over a limit.
_FIT_TRIES = 32


def _int(text_: str) -> int:
    return int(text_.replace(",", ""))


def _truncate(messages: Sequence[Message], path: str, limit: int) -> bool:
    """Cut the string at `path` in whichever of `messages` holds one longer
    than `limit` down to it; whether one did."""
    for message in messages:
        node: Any = message
        parts = path.split(".")
        for depth, part in enumerate(parts):
            match = _PATH_PART.fullmatch(part)
            if match is None or match[1] not in node.DESCRIPTOR.fields_by_name:
                break
            value = getattr(node, match[1])
            if match[2] is not None:
                if int(match[2]) >= len(value):
                    break
                value = value[int(match[2])]
            if depth == len(parts) - 1:
                if isinstance(value, str) and len(value) > limit and match[2] is None:
                    setattr(node, match[1], value[:limit])
                    return True
                break
            if not isinstance(value, Message):
                break
            node = value
    return False


# ---------------------------------------------------------------- the fuzzer


class Fuzzer:
    """Sets up a small real fleet on `server`, then fuzzes every RPC with
    every principal and checks the properties after each call."""

    def __init__(self, server: FuzzServer, work_dir: Path) -> None:
        self.server = server
        self.work_dir = work_dir
        self.pools = Pools()
        self.gen = Generator(self.pools)
        self.rpcs = every_rpc()
        self.principals: dict[str, tuple[tuple[str, str], ...]] = {}
        self.seeds: dict[str, list[list[Message]]] = {}
        self.probe = DbProbe(server.db_url)
        self._loop = asyncio.new_event_loop()
        self._main: _Channels | None = None
        # With TLS: the mutual-TLS channels of each device the fuzzer holds
        # a key and certificate of, by its "Bearer <credential>".
        self._device_tls: dict[str, tuple[bytes, bytes]] = {}
        self._device_channels: dict[str, _Channels] = {}
        self.memory = ServerMemory(server.pid)
        self._snap: Snapshot | None = None
        self._snap_version: int | None = None
        self._excused_until: dict[str, float] = {}
        self._own_ids: set[str] = set()
        self._batches = 0
        # Called every 10,000 calls or so (the benchmark prints how far it is).
        self.progress: Callable[[Report], None] | None = None
        self._device_rpcs = {
            r.name for r in self.rpcs if r.service.endswith("DeviceService") and r.name != "Enroll"
        }
        self._device_serial = 0
        self._enroll_secret = ""
        self.report = Report()

    # -- plumbing

    def close(self) -> None:
        for channels in [*self._device_channels.values(), *filter(None, [self._main])]:
            self._close_channels(channels)
        self._device_channels.clear()
        self._main = None
        self._loop.close()
        self.probe.close()

    @property
    def channel(self) -> grpc.aio.Channel:
        """The main port (aio)."""
        return self._main_channels().aio

    def _main_channels(self) -> _Channels:
        if self._main is None:
            raise RuntimeError("the fuzzer's channel is closed")
        return self._main

    def _make_channels(self, target: str, credentials: grpc.ChannelCredentials | None) -> _Channels:
        def aio() -> grpc.aio.Channel:
            if credentials is None:
                return grpc.aio.insecure_channel(target, options=_CLIENT_OPTIONS)
            return grpc.aio.secure_channel(target, credentials, options=_CLIENT_OPTIONS)

        async def make() -> grpc.aio.Channel:
            return aio()

        # An aio channel belongs to the loop it is made on: the fuzzer's own.
        made = aio() if self._loop.is_running() else self._loop.run_until_complete(make())
        if credentials is None:
            return _Channels(made, grpc.insecure_channel(target, options=_CLIENT_OPTIONS))
        return _Channels(made, grpc.secure_channel(target, credentials, options=_CLIENT_OPTIONS))

    def _close_channels(self, channels: _Channels) -> None:
        """Close both (between calls: never from inside the fuzzer's loop)."""
        channels.sync.close()
        self._loop.run_until_complete(channels.aio.close(None))

    def _open(self) -> None:
        credentials = None
        if self.server.tls:
            credentials = grpc.ssl_channel_credentials(self.server.ca_file.read_bytes())
        self._main = self._make_channels(self.server.address, credentials)

    def _channels(self, rpc: str, metadata: Sequence[tuple[str, str]]) -> _Channels:
        """Where a call goes: with TLS, a device RPC (Enroll aside) goes to
        the device port with the certificate of the device whose credential
        it carries, or, for any other credential, the device principal's;
        everything else (and everything in plain text) to the main port."""
        if not self.server.tls or rpc not in self._device_rpcs:
            return self._main_channels()
        credential = _bearer(metadata)
        if credential not in self._device_tls:
            credential = _bearer(self.principals["device"])
        channels = self._device_channels.get(credential)
        if channels is None:
            key_pem, cert_pem = self._device_tls[credential]
            channels = self._make_channels(
                self.server.device_address,
                grpc.ssl_channel_credentials(self.server.ca_file.read_bytes(), key_pem, cert_pem),
            )
            self._device_channels[credential] = channels
        return channels

    def _enroll_request(self, **fields: Any) -> tuple[d.EnrollRequest, bytes]:
        """An EnrollRequest, with a CSR for a new key under TLS; the key."""
        request = d.EnrollRequest(**fields)
        key_pem = b""
        if self.server.tls:
            key_pem, request.csr = new_key_and_csr(request.hardware_id)
        return request, key_pem

    def _hold(self, enrolled: d.EnrollResponse, key_pem: bytes) -> str:
        """Keep an enrolled device's key and certificate; its bearer metadata value."""
        credential = f"Bearer {enrolled.device_credential}"
        if self.server.tls:
            self._device_tls[credential] = (key_pem, enrolled.certificate.certificate_pem)
        return credential

    def _forget(self, credential: str) -> None:
        self._device_tls.pop(credential, None)
        channels = self._device_channels.pop(credential, None)
        if channels is not None:
            self._close_channels(channels)

    def _admin(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.server.admin_token}"),)

    def call(
        self,
        name: str,
        request: Message | Sequence[Message],
        who: tuple[tuple[str, str], ...] | None = None,
        seed: bool = True,
    ) -> Any:
        """A set-up call that must succeed (recorded as a seed for mutation)."""
        rpc = next(r for r in self.rpcs if r.name == name)
        msgs = list(request) if isinstance(request, Sequence) else [request]
        if seed:
            self.seeds.setdefault(name, []).append(msgs)
        metadata = self._admin() if who is None else who
        m = rpc.method
        channels = self._channels(name, metadata)
        if m.client_streaming:
            sync = channels.sync
            if m.server_streaming:
                return list(
                    sync.stream_stream(rpc.path, **rpc.codec)(
                        iter(msgs), metadata=metadata, timeout=CALL_DEADLINE_S
                    )
                )
            return sync.stream_unary(rpc.path, **rpc.codec)(
                iter(msgs), metadata=metadata, timeout=CALL_DEADLINE_S
            )

        async def go() -> Any:
            if m.server_streaming:
                stream = channels.aio.unary_stream(rpc.path, **rpc.codec)(
                    msgs[0], metadata=metadata, timeout=CALL_DEADLINE_S
                )
                return [r async for r in stream]
            return await channels.aio.unary_unary(rpc.path, **rpc.codec)(
                msgs[0], metadata=metadata, timeout=CALL_DEADLINE_S
            )

        return self._loop.run_until_complete(go())

    async def _invoke(self, case: Case) -> grpc.StatusCode | str:
        rpc, m, kw = case.rpc, case.rpc.method, case.rpc.codec
        metadata = self.principals[case.who]
        channel = self._channels(rpc.name, metadata).aio
        try:
            if m.server_streaming:
                call = channel.unary_stream(rpc.path, **kw)(
                    case.messages[0], metadata=metadata, timeout=CALL_DEADLINE_S
                )
                return await _read_stream(call)
            await channel.unary_unary(rpc.path, **kw)(
                case.messages[0], metadata=metadata, timeout=CALL_DEADLINE_S
            )
        except grpc.aio.AioRpcError as err:
            return _status(err.code(), err.details())
        return grpc.StatusCode.OK

    def _invoke_streaming(self, case: Case) -> grpc.StatusCode | str:
        """Client streams go over the sync API: grpc.aio reports INTERNAL
        ("Internal error from Core") for a write that races the server's
        early status, hiding that status (grpc/grpc#36066)."""
        rpc, m, kw = case.rpc, case.rpc.method, case.rpc.codec
        metadata = self.principals[case.who]
        channel = self._channels(rpc.name, metadata).sync
        try:
            if m.server_streaming:
                # The server ends Sync when the client half-closes (the
                # iterator runs out); a stream it keeps open is a hang.
                for _ in channel.stream_stream(rpc.path, **kw)(
                    iter(case.messages), metadata=metadata, timeout=CALL_DEADLINE_S
                ):
                    pass
            else:
                channel.stream_unary(rpc.path, **kw)(
                    iter(case.messages), metadata=metadata, timeout=CALL_DEADLINE_S
                )
        except grpc.RpcError as err:
            return _status(err.code(), err.details())
        return grpc.StatusCode.OK

    def healthy(self) -> bool:
        async def check() -> bool:
            stub = health_pb2_grpc.HealthStub(self.channel)
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            except grpc.aio.AioRpcError:
                return False
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

        self.report.health_checks += 1
        return self.server.alive() and self._loop.run_until_complete(check())

    def health_calls(self, n: int) -> float:
        """The baseline: n sequential health checks; seconds taken."""
        stub = health_pb2_grpc.HealthStub(self.channel)

        async def go() -> None:
            for _ in range(n):
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)

        started = time.perf_counter()
        self._loop.run_until_complete(go())
        return time.perf_counter() - started

    # -- the world the fuzzer starts from

    def setup(self) -> None:
        """A small real fleet through the API: classes, enrollment tokens,
        devices in every state, two model versions with built artifacts, an
        assignment, telemetry, rollouts, operator tokens of each role."""
        from edgefleet.controlplane.db.engine import make_engine
        from edgefleet.controlplane.db.uow import Database
        from edgefleet.controlplane.services.blobs import BlobStore
        from edgefleet.controlplane.services.builds import BuildService

        self._open()
        admin = self._admin()
        self.principals = {"none": (), "admin": admin}
        # The fuzzer's own tokens are never in the pools: revoked, every
        # later call as that principal would stop at authentication.
        existing = self.call("ListOperatorTokens", o.ListOperatorTokensRequest(), seed=False)
        self._own_ids.update(t.id for t in existing.tokens)
        for i, garbage in enumerate(GARBAGE_CREDENTIALS):
            self.principals[f"garbage-{i}"] = (("authorization", garbage),)
        for role, number in (
            ("viewer", o.OPERATOR_ROLE_VIEWER),
            ("operator", o.OPERATOR_ROLE_OPERATOR),
        ):
            resp = self.call(
                "CreateOperatorToken",
                o.CreateOperatorTokenRequest(name=f"fuzz-{role}", role=number),
                seed=False,
            )
            self.principals[role] = (("authorization", f"Bearer {resp.secret}"),)
            self._own_ids.add(resp.token.id)
        # Tokens the fuzzer may revoke.
        for i in range(2):
            resp = self.call(
                "CreateOperatorToken",
                o.CreateOperatorTokenRequest(name=f"spare-{i}", role=o.OPERATOR_ROLE_VIEWER),
            )
        for name, arch, runtime in (
            ("pi", "aarch64", c.RUNTIME_TFLITE),
            ("gw", "x86_64", c.RUNTIME_ONNXRUNTIME),
        ):
            self.call(
                "CreateDeviceClass",
                o.CreateDeviceClassRequest(
                    name=name,
                    description=f"{name} class",
                    priority=1,
                    constraints=c.ConstraintProfile(
                        runtime=runtime, max_model_size_mb=4, quantization=c.QUANTIZATION_AUTO
                    ),
                    match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=[arch])],
                ),
            )
        self.call(
            "UpdateDeviceClass",
            o.UpdateDeviceClassRequest(name="gw", description="gateways", priority=2),
            seed=True,
        )
        secrets: dict[str, str] = {}
        for policy, policy_number in (
            ("auto", o.ENROLLMENT_POLICY_AUTO_ACCEPT),
            ("pending", o.ENROLLMENT_POLICY_PENDING),
        ):
            resp = self.call(
                "CreateEnrollmentToken",
                o.CreateEnrollmentTokenRequest(
                    name=f"fuzz-{policy}", policy=policy_number, labels={"site": "line-3"}
                ),
            )
            secrets[policy] = resp.secret
            self._own_ids.add(resp.token.id)
        self._enroll_secret = secrets["auto"]
        spare = self.call(
            "CreateEnrollmentToken", o.CreateEnrollmentTokenRequest(name="spare", max_uses=1)
        )
        self.pools.enrollment_secrets[:] = [secrets["auto"], secrets["pending"], spare.secret]
        devices: dict[str, d.EnrollResponse] = {}
        credentials: dict[str, str] = {}
        for hw, arch, policy in (
            ("pi-1", "aarch64", "auto"),
            ("pi-2", "aarch64", "auto"),
            ("gw-1", "x86_64", "auto"),
            ("new-1", "armv7l", "pending"),
            ("bad-1", "x86_64", "pending"),
        ):
            request, key_pem = self._enroll_request(
                enrollment_token=secrets[policy],
                hardware_id=hw,
                name=hw,
                labels={"env": "test"},
                hardware=c.HardwareProfile(arch=arch, memory_mb=2048, cpu_cores=4, os="linux"),
                runtime=c.RuntimeFingerprint(onnxruntime_version="1.20.0", agent_version="0.1"),
            )
            devices[hw] = self.call("Enroll", request)
            credentials[hw] = self._hold(devices[hw], key_pem)
        self.call(
            "RejectDevice", o.RejectDeviceRequest(id=devices["bad-1"].device_id, reason="fuzz")
        )
        self.call(
            "UpdateDeviceLabels",
            o.UpdateDeviceLabelsRequest(
                id=devices["pi-2"].device_id, set={"site": "line-4"}, remove=["env"]
            ),
        )
        model = _tiny_model(self.work_dir)
        for version in ("1.0.0", "1.1.0"):
            self.call("PushModel", _push("digits", version, model))
        engine = make_engine(self.server.db_url)
        try:
            builds = BuildService(
                Database(engine), BlobStore(self.server.data_dir / "blobs"), _NoEvents()
            )
            artifact = self.work_dir / "model.onnx"
            # The pushes queue builds as they return; finish them until
            # none has been queued for a while.
            idle_since = time.monotonic()
            while time.monotonic() - idle_since < 1.0:
                job = builds.claim("fuzz-setup", 60)
                if job is None:
                    time.sleep(0.05)
                    continue
                builds.finish(job, "fuzz-setup", one_candidate_result(artifact, "fuzz"), "")
                idle_since = time.monotonic()
        finally:
            engine.dispose()
        gw = devices["gw-1"].device_id
        pi = devices["pi-1"].device_id
        self.call(
            "AssignModel",
            o.AssignModelRequest(
                device_ids=[gw], model_name="digits", model_version="1.0.0", reason="fuzz"
            ),
        )
        self.principals["device"] = (("authorization", credentials["pi-1"]),)
        now = int(time.time())
        sample = d.TelemetrySample(
            seq=1,
            model_name="digits",
            model_version="1.0.0",
            request_count=10,
            error_count=1,
            latency_p50_ms=1.0,
            latency_p95_ms=2.0,
            latency_p99_ms=3.0,
            latency_max_ms=4.0,
            memory_mb=20.0,
            cpu_percent=5.0,
            system_memory_percent=40.0,
            temperature_c=50.0,
        )
        sample.at.FromSeconds(now - 60)
        self.call(
            "UploadTelemetry",
            d.UploadTelemetryRequest(samples=[sample]),
            who=self.principals["device"],
        )
        hello = d.AgentMessage(
            hello=d.Hello(
                hardware=c.HardwareProfile(arch="aarch64", memory_mb=2048),
                applied_revision=1,
                runtime=c.RuntimeFingerprint(onnxruntime_version="1.20.0"),
            )
        )
        beat = d.AgentMessage(heartbeat=d.Heartbeat(seq=1))
        status = d.AgentMessage(
            status=d.StatusReport(
                applied_revision=1,
                update=c.UpdateStatus(
                    legacy_state="downloading",
                    model_name="digits",
                    model_version="1.0.0",
                    bytes_done=1,
                    bytes_total=2,
                    sequence=1,
                ),
            )
        )
        self.call("Sync", [hello, beat, status], who=self.principals["device"])
        gw_credential = (("authorization", credentials["gw-1"]),)
        listed = self.call("ListArtifacts", o.ListArtifactsRequest(), seed=False)
        for art in listed.artifacts:
            self.pools.digests.append(art.digest)
        assigned = [
            a
            for a in self.call(
                "ListDeployments", o.ListDeploymentsRequest(device_id=gw), seed=False
            ).assignments
        ]
        if assigned:
            self.call(
                "DownloadArtifact",
                d.DownloadArtifactRequest(digest=assigned[0].artifact_digest, chunk_size=65536),
                who=gw_credential,
            )
        spec = o.RolloutSpec(
            model_name="digits",
            model_version="1.1.0",
            class_names=["gw", "pi"],
            stages=[
                o.StageSpec(name="canary", percent=50, bake_time=_seconds(1)),
                o.StageSpec(name="all", percent=100, require_approval=True),
            ],
            pacing=o.Pacing(max_per_minute=60, device_timeout=_seconds(60), device_retries=1),
        )
        self.call("CreateRollout", o.CreateRolloutRequest(spec=spec, dry_run=True))
        self.call("CreateRollout", o.CreateRolloutRequest(spec=spec))
        self.call(
            "QueryTelemetry",
            o.QueryTelemetryRequest(
                metric=o.TELEMETRY_METRIC_LATENCY_P95_MS,
                group_by=o.TELEMETRY_GROUP_BY_DEVICE,
                step=_seconds(60),
                model_name="digits",
            ),
        )
        self.call(
            "RunBuild",
            o.RunBuildRequest(model_name="digits", model_version="1.1.0", class_name="gw"),
        )
        self.call("SetDeviceClass", o.SetDeviceClassRequest(id=pi, class_name="pi"))
        if self.server.tls:
            self._renew_device()
        for hw, credential in credentials.items():
            if hw != "pi-1":
                self._forget(credential)  # only the device principal's channel stays open
        self.refresh()

    def _renew_device(self) -> None:
        """Renew the device principal's certificate (a seed for fuzzing
        RenewCertificate past its checks), and use the new one."""
        credential = _bearer(self.principals["device"])
        key_pem, csr = new_key_and_csr("fuzz-renewal")
        renewed = self.call(
            "RenewCertificate", d.RenewCertificateRequest(csr=csr), who=self.principals["device"]
        )
        self._forget(credential)
        self._device_tls[credential] = (key_pem, renewed.certificate.certificate_pem)

    def refresh(self) -> None:
        """Refill the pools from the database (what exists now), and make
        sure the device principal's credential still works."""
        with self.probe.engine.connect() as conn:

            def col(sql: str) -> list[str]:
                return [str(v) for v in conn.scalars(text(sql)) if v is not None]

            self.pools.device_ids[:] = col("SELECT id FROM devices ORDER BY enrolled_at LIMIT 40")
            self.pools.hardware_ids[:] = col(
                "SELECT hardware_id FROM devices ORDER BY enrolled_at LIMIT 40"
            )
            self.pools.class_names[:] = col("SELECT name FROM device_classes LIMIT 40")
            self.pools.model_names[:] = col("SELECT name FROM models LIMIT 20")
            self.pools.set_versions(col("SELECT version FROM model_versions LIMIT 40"))
            self.pools.digests[:] = sorted(
                set(col("SELECT digest FROM artifacts LIMIT 20"))
                | set(col("SELECT digest FROM blobs LIMIT 20"))
            )
            self.pools.build_ids[:] = col("SELECT id FROM builds LIMIT 40")
            self.pools.rollout_ids[:] = col("SELECT id FROM rollouts LIMIT 40")
            self.pools.operator_token_ids[:] = [
                i for i in col("SELECT id FROM operator_tokens LIMIT 40") if i not in self._own_ids
            ]
            self.pools.enrollment_token_ids[:] = [
                i
                for i in col("SELECT id FROM enrollment_tokens LIMIT 40")
                if i not in self._own_ids
            ]
            self.pools.audit_actions[:] = sorted(set(col("SELECT action FROM audit_log LIMIT 200")))
            conn.rollback()

    def _replenish(self) -> None:
        """Make again what the set-up made (what fuzzing deleted comes back,
        what exists answers ALREADY_EXISTS): the set-up's own calls, as
        admin, not counted as fuzzing."""
        for name, streams in list(self.seeds.items()):
            for messages in list(streams):
                who = self.principals["device"] if name in self._device_rpcs else None
                with contextlib.suppress(grpc.RpcError):
                    self.call(name, messages, who=who, seed=False)
        # What it set going (status reports, builds) lands later.
        for group in GROUPS:
            self._excused_until[group.name] = time.monotonic() + EXCUSE_S

    def _reenroll_device(self) -> None:
        """A fresh accepted device for the device principal: fuzzing may
        have rejected, re-enrolled or decommissioned the last one."""
        self._device_serial += 1
        request, key_pem = self._enroll_request(
            enrollment_token=self._enroll_secret,
            hardware_id=f"fuzz-agent-{self._device_serial}",
            hardware=c.HardwareProfile(arch="aarch64"),
        )
        resp = self.call("Enroll", request, who=(), seed=False)
        self._forget(_bearer(self.principals["device"]))
        self.principals["device"] = (("authorization", self._hold(resp, key_pem)),)

    # -- fuzzing

    def cases(self) -> list[st.SearchStrategy[Case]]:
        """(rpc, principal, messages), one strategy per RPC."""
        garbage = [p for p in self.principals if p.startswith("garbage")]

        def principal(*names: str) -> st.SearchStrategy[str]:
            # "garbage" stands for one of the garbage credentials.
            return st.tuples(st.sampled_from(names), st.sampled_from(garbage)).map(
                lambda p: p[1] if p[0] == "garbage" else p[0]
            )

        operator_who = principal(
            "admin",
            "admin",
            "admin",
            "admin",
            "operator",
            "operator",
            "viewer",
            "device",
            "none",
            "garbage",
        )
        device_who = principal(
            "device", "device", "device", "device", "device", "device", "admin", "none", "garbage"
        )
        per_rpc = []
        for rpc in self.rpcs:
            who = device_who if rpc.service.endswith("DeviceService") else operator_who
            seeds = self.seeds.get(rpc.name, [])
            if rpc.method.client_streaming:
                messages = self.gen.stream(rpc.request.DESCRIPTOR, seeds).map(tuple)
            else:
                messages = self.gen.request(rpc.request.DESCRIPTOR, [s[0] for s in seeds]).map(
                    lambda m: (m,)
                )
            per_rpc.append(st.builds(Case, st.just(rpc), who, messages))
        return per_rpc

    def run(self, calls: int, seed: int, *, per_example: int = 8) -> Report:
        """Fuzz `calls` calls: hypothesis runs with a fixed seed, each example
        `per_example` calls (the engine's cost per example is then shared),
        no shrinking: a failure is recorded with its request, not raised, and
        the run goes on. The first example calls every RPC once, so that even
        a short run covers them all; the rest pick RPCs at random."""
        per_rpc = self.cases()
        started = time.perf_counter()
        target = self.report.calls + calls
        self._examples(st.tuples(*per_rpc).map(list), 1, seed, target)
        self._examples(
            st.lists(st.one_of(per_rpc), min_size=per_example, max_size=per_example),
            -(-(target - self.report.calls) // per_example),
            seed,
            target,
        )
        self._between_batches()
        self.report.seconds += time.perf_counter() - started
        self.report.invariants = self.probe.invariants()
        self.report.oversized = self.list_sizes()
        return self.report

    def _memory_bound(self, rpc: str, who: str, rss: int, outcome: str, request: str) -> None:
        """Record how far the server's RSS rose during a call that started at
        `rss` (ServerMemory.before_call); a failure at RSS_GROWTH_LIMIT."""
        growth = self.memory.growth(rss)
        self.report.rss_growth[rpc] = max(self.report.rss_growth.get(rpc, 0), growth)
        self.report.rss_peaks = self.memory.peaks
        if growth >= RSS_GROWTH_LIMIT:
            self.report.failures.append(
                Failure(
                    rpc,
                    who,
                    "bounded memory",
                    f"the server's RSS grew by {growth / 10**6:.0f} MB during one call "
                    f"(ended {outcome}); the bound is {RSS_GROWTH_LIMIT / 10**6:.0f} MB",
                    request,
                )
            )

    def flood(self, copies: int, size: int = FLOOD_STRING) -> Counter[tuple[str, str]]:
        """Hostile writes in bulk, for the list invariant: `copies` copies of
        each of the set-up's writes with every free-text string in it (a
        field no pool of real values holds: names shown to people, host
        names, descriptions, reasons; set in the set-up's call or not) as
        long as the server takes, from `size` characters down to the limit
        its INVALID_ARGUMENT names; and the name, hardware id or version of
        what a Create, Push or Enroll makes suffixed, so that each copy
        makes a new one. Status codes per RPC."""
        codes: Counter[tuple[str, str]] = Counter()
        for name, streams in list(self.seeds.items()):
            if name.startswith(_READS):
                continue
            makes = name.startswith(("Create", "Push", "Enroll"))
            who = self.principals["device"] if name in self._device_rpcs else None
            for j, messages in enumerate(streams):
                if [self._hostile(m, size, "") for m in messages] == messages:
                    continue  # nothing to make long (ids and bytes only)
                limits: dict[str, int] = {}  # field path -> the limit the server named
                for i in range(copies):
                    unique = f"flood-{j}-{i}" if makes else ""
                    for _ in range(_FIT_TRIES):
                        hostile = [self._hostile(m, size, unique) for m in messages]
                        for path, limit in limits.items():
                            _truncate(hostile, path, limit)
                        rss = self.memory.before_call()
                        try:
                            self.call(name, hostile, who=who, seed=False)
                        except grpc.RpcError as err:
                            self._memory_bound(name, "flood", rss, err.code().name, _short(hostile))
                            named = _LIMIT.search(err.details() or "")
                            if (
                                err.code() == grpc.StatusCode.INVALID_ARGUMENT
                                and named is not None
                                and _truncate(hostile, named["path"], _int(named["limit"]))
                            ):
                                limits[named["path"]] = _int(named["limit"])
                                continue  # down to the limit it named; again
                            codes[(name, err.code().name)] += 1
                        else:
                            self._memory_bound(name, "flood", rss, "OK", _short(hostile))
                            codes[(name, "OK")] += 1
                        break
        for group in GROUPS:  # what the writes queued lands later
            self._excused_until[group.name] = time.monotonic() + EXCUSE_S
        return codes

    def _hostile(self, message: Message, size: int, unique: str) -> Message:
        """A copy of `message` with every free-text string `size` long, and
        with `unique`, the name, hardware id or version it keys suffixed
        (a version as a semver pre-release)."""
        out = type(message)()
        out.CopyFrom(message)
        for node, f in list(_sites(out)):
            if f.type != FieldDescriptor.TYPE_STRING or f.is_repeated:
                continue
            pool = self.pools.pool_for(node.DESCRIPTOR.name, f.name)
            value = getattr(node, f.name)
            if pool is self.pools.names or not pool:
                long = (value or f.name)[:1] * size
                # A name shown to people may still have to be unique: the
                # copy's mark goes first, where cutting to a limit keeps it.
                setattr(node, f.name, f"{unique}-{long}" if unique and f.name == "name" else long)
            elif unique and value and f.name in ("name", "hardware_id"):
                setattr(node, f.name, f"{value}-{unique}")
            elif unique and value and f.name == "version":
                setattr(node, f.name, f"{value}-{unique.replace('-', '.')}")
        return out

    def list_sizes(self, limit: int = MAX_MESSAGE_BYTES) -> list[str]:
        """Every list RPC, as admin, with an empty request and with each of
        the set-up's: the largest answer of each in report.list_bytes; what
        is wrong (an answer over `limit`, the server's message limit, or
        one it could not send) in the list returned."""
        wrong: list[str] = []
        lists = [
            r
            for r in self.rpcs
            if r.name.startswith("List")
            and not r.method.client_streaming
            and not r.method.server_streaming
        ]

        async def size(rpc: Rpc, request: Message) -> int | grpc.aio.AioRpcError:
            try:
                response = await self.channel.unary_unary(rpc.path, **rpc.codec)(
                    request, metadata=self._admin(), timeout=CALL_DEADLINE_S
                )
            except grpc.aio.AioRpcError as err:
                return err
            return int(response.ByteSize())

        for rpc in lists:
            requests = [rpc.request(), *(s[0] for s in self.seeds.get(rpc.name, []))]
            for request in requests:
                rss = self.memory.before_call()
                got = self._loop.run_until_complete(size(rpc, request))
                outcome = "OK" if isinstance(got, int) else got.code().name
                self._memory_bound(rpc.name, "admin", rss, outcome, _short([request]))
                if isinstance(got, int):
                    self.report.list_bytes[rpc.name] = max(
                        self.report.list_bytes.get(rpc.name, 0), got
                    )
                    if got > limit:
                        wrong.append(f"{rpc.name}: {got} bytes, over the {limit}-byte limit")
                elif got.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # Over the server's send limit: nobody can list these at all.
                    wrong.append(f"{rpc.name}: not sent: {got.details()}")
        return wrong

    def _examples(
        self, strategy: st.SearchStrategy[list[Case]], examples: int, seed: int, target: int
    ) -> None:
        if examples <= 0:
            return

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=False,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )
        @hypothesis_seed(seed)
        @given(batch=strategy)
        def one(batch: list[Case]) -> None:
            for case in batch:
                if self.report.calls >= target:
                    return
                self.execute(case)
                if self.report.calls % HEALTH_EVERY == 0:
                    self._between_batches()

        one()

    def _between_batches(self) -> None:
        if not self.healthy():
            self.report.failures.append(
                Failure(
                    "-",
                    "-",
                    "server alive",
                    f"health check failed after {self.report.calls} calls;"
                    f" log tail:\n{self.server.log()[-3000:]}",
                    "",
                )
            )
            raise AssertionError(str(self.report.failures[-1]))
        self._batches += 1
        if self.progress is not None and self._batches % 400 == 0:
            self.progress(self.report)
        if self._batches % REPLENISH_EVERY == 0:
            self._replenish()
        if self._batches % 4 == 0:
            with contextlib.suppress(grpc.aio.AioRpcError):
                self._reenroll_device()
        self.refresh()

    def execute(self, case: Case) -> None:
        """One call, then the properties."""
        name = case.rpc.name
        before_version = self.probe.version()
        if self._snap is None or before_version is None or before_version != self._snap_version:
            self._snap = self.probe.snapshot()
            self._snap_version = before_version
            self.report.snapshots += 1
        before = self._snap
        rss = self.memory.before_call()
        sent = time.monotonic()
        if case.rpc.method.client_streaming:
            code = self._invoke_streaming(case)
        else:
            code = self._loop.run_until_complete(self._invoke(case))
        ended = time.monotonic()
        self.report.call_seconds[name] = self.report.call_seconds.get(name, 0.0) + ended - sent
        label = code if isinstance(code, str) else code.name
        self.report.calls += 1
        self.report.messages += len(case.messages)
        self.report.codes[(name, label)] += 1
        self.report.principals[(name, case.who)] += 1
        kind = "garbage" if case.who.startswith("garbage") else case.who
        self.report.by_who[(kind, label)] += 1
        for group in GROUPS:
            if group.after(name, case.who, code):
                self._excused_until[group.name] = ended + EXCUSE_S
        request = _short(case.messages)
        self._memory_bound(name, case.who, rss, label, request)
        if code in FORBIDDEN or code == LOST:
            self.report.failures.append(Failure(name, case.who, "status", label, request))
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.report.failures.append(
                Failure(
                    name, case.who, "no hang", f"no answer within {CALL_DEADLINE_S:.0f} s", request
                )
            )
        if code in (grpc.StatusCode.OK, "STREAM_OPEN", grpc.StatusCode.CANCELLED):
            return
        after_version = self.probe.version()
        if after_version is not None and after_version == before_version:
            return  # nothing committed since `before`
        audited_up_to = self.probe.appended_up_to("audit_log")
        after = self.probe.snapshot()
        self.report.snapshots += 1
        self._snap, self._snap_version = after, after_version
        now = time.monotonic()
        changed = [
            (table, group)
            for table, group in diff(before, after)
            if not (group and self._excused_until.get(group, 0.0) > now)
        ]
        if ("audit_log", "") in changed and set(
            self.probe.audit_actions_after(audited_up_to)
        ) <= AUDITED_REFUSALS:
            changed.remove(("audit_log", ""))  # the refusal's own audit entry, on purpose
        if changed:
            self.report.failures.append(
                Failure(
                    name,
                    case.who,
                    "no partial write",
                    f"failed with {label} yet changed "
                    + ", ".join(
                        f"{t}{f' ({g})' if g else ''}: {before.get((t, g), (0,))[0]} -> "
                        f"{after.get((t, g), (0,))[0]} rows"
                        for t, g in changed
                    ),
                    request,
                )
            )


class _NoEvents:
    """The set-up's build finisher runs outside the server: nobody listens."""

    def publish(self, event: Any) -> None:
        pass


def _seconds(n: float) -> Any:
    from google.protobuf.duration_pb2 import Duration

    out = Duration()
    out.FromTimedelta(dt.timedelta(seconds=n))
    return out


def _tiny_model(work_dir: Path) -> bytes:
    """A real ONNX MLP (the digits shape: 64 inputs, 10 classes), no training: small and fast."""
    from edgefleet.demo.models import mlp_graph

    work_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(64, 4)), rng.normal(size=(4, 10))]
    biases = [rng.normal(size=4), rng.normal(size=10)]
    model = mlp_graph(weights, biases, opset=17)
    path = work_dir / "model.onnx"
    onnx.save(model, path)
    return path.read_bytes()


def _push(name: str, version: str, model: bytes) -> list[o.PushModelRequest]:
    header = o.PushModelRequest(
        header=o.PushModelHeader(
            model_name=name,
            version=version,
            description="fuzz seed",
            parts=[
                o.PartDeclaration(
                    part=o.MODEL_PART_MODEL,
                    size_bytes=len(model),
                    sha256=hashlib.sha256(model).hexdigest(),
                )
            ],
        )
    )
    half = len(model) // 2
    return [header] + [
        o.PushModelRequest(chunk=o.PushModelChunk(part=o.MODEL_PART_MODEL, data=part))
        for part in (model[:half], model[half:])
    ]


def start(
    work_dir: Path, admin_token: str, db_url: str | None = None, *, tls: bool = False
) -> Fuzzer:
    """A server on a fresh data dir (`--tls` with tls) and a fuzzer set up against it."""
    server = FuzzServer(work_dir / "cp", admin_token, db_url, tls=tls)
    server.start()
    fuzzer = Fuzzer(server, work_dir / "fuzzer")
    try:
        fuzzer.setup()
    except BaseException:
        fuzzer.close()
        server.stop()
        raise
    return fuzzer


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve_main(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m testkit.fuzzing serve --data-dir D --port-file P ...")
