"""Bounded, crash-safe on-disk buffer of telemetry samples awaiting upload.

One SQLite file, `telemetry.db` in the state directory (WAL, synchronous=FULL),
chosen over JSON lines because assigning a seq, inserting the sample and
evicting the oldest must be one atomic step, and acking is a range delete.

- `append` gives each sample the next per-device `seq` (persisted in the same
  transaction as the row, so a seq is never reused, across restarts too), and
  stores it with the count of samples dropped since the previous kept one.
- Past `max_samples` rows the oldest are deleted and counted; the count (plus
  whatever drop counts those rows themselves carried) goes out in the
  `dropped_samples` of the next appended sample. A stored row never changes,
  so a resent sample is byte-for-byte the one the server may already hold.
- `ack(acked_seq)` deletes every row with seq <= acked_seq. The control plane
  stores each (device, seq) once and answers the highest seq it holds, and
  the uploader sends in seq order, so resending anything not yet acked (after
  a kill between upload and ack) stores nothing twice: at-least-once delivery
  with server dedup is exactly-once storage.

A full disk never makes a write fail (agent/disk.py). While the file cannot
be written, the buffer goes on in memory: new samples get their seqs and drop
counts as they would on disk and wait in a bounded list (past it the oldest
are dropped and counted, like the bound's evictions), acks and refusals are
remembered, and pending() serves both, so telemetry keeps flowing while the
control plane is reachable. The first write that lands stores everything
held back in one transaction, so seqs are never reused and no drop goes
uncounted. Only a restart while the disk is still full loses what was held
(the control plane's ack then moves next_seq past any seq it already has).
The condition goes to the agent's DiskCondition: logged once, and reported
in the device's status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.agent.disk import DiskCondition, disk_full_label, write_error
from edgefleet.agent.errors import DiskFull, StateError
from edgefleet.agent.telemetry import IntervalSample

FILE_NAME = "telemetry.db"
# ~300 bytes a row: about 6 MB, over a day of one model at the 10 s default.
DEFAULT_MAX_SAMPLES = 20_000
# While the disk is full, at most this many samples wait in memory (about
# 2.8 hours at the 10 s default; a few hundred bytes each).
MAX_HELD_SAMPLES = 1_000
# What DiskCondition calls this file.
WHAT = "the telemetry buffer"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY,
    dropped INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1), ('pending_drops', 0),
    ('dropped_total', 0);
"""


@dataclass(frozen=True)
class Pending:
    """A buffered sample with its seq and the drops it reports."""

    seq: int
    dropped_samples: int
    sample: IntervalSample


_SHADOW_FIELDS = tuple(
    f.name for f in dataclasses.fields(IntervalSample) if f.name.startswith("shadow_")
)


def _encode(sample: IntervalSample) -> str:
    body: dict[str, Any] = dataclasses.asdict(sample)
    body["at"] = sample.at.isoformat()
    if not sample.shadow_version:
        # Only shadow stages have these; leaving them out keeps every other
        # row its old size (_decode fills in the defaults).
        for name in _SHADOW_FIELDS:
            del body[name]
    return json.dumps(body, separators=(",", ":"))


def _decode(text: str) -> IntervalSample:
    body = json.loads(text)
    body["at"] = dt.datetime.fromisoformat(body["at"])
    known = {f.name for f in dataclasses.fields(IntervalSample)}
    return IntervalSample(**{k: v for k, v in body.items() if k in known})


class TelemetryBuffer:
    """See the module docstring. Thread-safe; one process per state dir."""

    def __init__(
        self,
        state_dir: Path,
        *,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        disk: DiskCondition | None = None,
    ) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        self.path = state_dir / FILE_NAME
        self.max_samples = max_samples
        self._disk = disk if disk is not None else DiskCondition()
        # Reentrant: an operation holds it across its transaction and its
        # in-memory fallback, so no other thread writes in between.
        self._lock = threading.RLock()
        # What a full disk keeps off the file until the next write lands:
        # the highest acked seq (kept after: pending() filters by it), seqs
        # the control plane refused, samples not stored yet (seq order, all
        # above the stored ones) and the meta values as they would be.
        self._acked = 0
        self._refused: set[int] = set()
        self._held: list[Pending] = []
        self._held_meta: dict[str, int] | None = None
        # Rows of seq <= acked the last transaction deleted.
        self._deleted = 0
        try:
            # Private like every other state file (SQLite gives its -wal and
            # -shm the database file's mode).
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(self.path, 0o600)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        except sqlite3.Error as exc:
            label = disk_full_label(exc)
            if label is not None:
                raise DiskFull(f"{label}: cannot open {WHAT} {self.path} ({exc})") from exc
            raise StateError(f"cannot open the telemetry buffer {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def _value(self, key: str) -> int:
        """A meta value as it stands, held back or stored."""
        if self._held_meta is not None:
            return self._held_meta[key]
        return self._meta(key)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE .. COMMIT under the lock, storing what a full disk
        held back first; ROLLBACK on any error. DiskFull when there is no
        room (what was held back stays held back), StateError otherwise."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._deleted = self._store_held_back()
                    yield
                    self._db.execute("COMMIT")
                except BaseException:
                    # SQLite may have rolled back already (it does on
                    # SQLITE_FULL at COMMIT); a transaction left open would
                    # make every later BEGIN fail.
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                label = disk_full_label(exc)
                if label is not None:
                    raise DiskFull(f"{label}: cannot write {WHAT} {self.path} ({exc})") from exc
                raise StateError(f"cannot write the telemetry buffer {self.path}: {exc}") from exc
            # Committed: nothing is held back any more.
            self._refused.clear()
            self._held, self._held_meta = [], None
        self._disk.recovered(WHAT)

    def _store_held_back(self) -> int:
        """Inside a transaction: store what a full disk held back; how many
        acked rows were deleted."""
        if self._held_meta is not None:
            for p in self._held:
                self._db.execute(
                    "INSERT INTO samples (seq, dropped, body) VALUES (?, ?, ?)",
                    (p.seq, p.dropped_samples, _encode(p.sample)),
                )
            for key, value in self._held_meta.items():
                self._set_meta(key, value)
        deleted = 0
        if self._acked:
            deleted = self._db.execute(
                "DELETE FROM samples WHERE seq <= ?", (self._acked,)
            ).rowcount
            if self._acked >= self._meta("next_seq"):
                # A control plane ahead of us (our buffer file was lost)
                # would ignore those seqs as already stored.
                self._set_meta("next_seq", self._acked + 1)
        for seq in sorted(self._refused):
            row = self._db.execute("SELECT dropped FROM samples WHERE seq = ?", (seq,)).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM samples WHERE seq = ?", (seq,))
                # Counted like an evicted one, with the drops it carried.
                self._set_meta("pending_drops", self._meta("pending_drops") + 1 + int(row[0]))
                self._set_meta("dropped_total", self._meta("dropped_total") + 1)
        return int(deleted)

    def _hold(self, exc: DiskFull) -> dict[str, int]:
        """Go on in memory (the disk is full): the meta values to carry on from."""
        self._disk.failed(WHAT, exc.message)  # logged once
        if self._held_meta is None:
            # Reading needs no room.
            self._held_meta = {
                key: self._meta(key) for key in ("next_seq", "pending_drops", "dropped_total")
            }
        return self._held_meta

    # ------------------------------------------------------------ writes

    def append(self, samples: Iterable[IntervalSample]) -> list[int]:
        """Store samples (one transaction), oldest evicted past the bound; their
        seqs. On a full disk they wait in memory instead (module docstring)."""
        batch = list(samples)
        with self._lock:
            try:
                return self._append(batch)
            except DiskFull as exc:
                meta = self._hold(exc)
            seqs: list[int] = []
            for sample in batch:
                self._held.append(Pending(meta["next_seq"], meta["pending_drops"], sample))
                seqs.append(meta["next_seq"])
                meta["next_seq"] += 1
                meta["pending_drops"] = 0
            over = len(self._held) - min(self.max_samples, MAX_HELD_SAMPLES)
            if over > 0:
                gone, self._held = self._held[:over], self._held[over:]
                meta["pending_drops"] += over + sum(p.dropped_samples for p in gone)
                meta["dropped_total"] += over
            return seqs

    def _append(self, batch: list[IntervalSample]) -> list[int]:
        seqs: list[int] = []
        with self._transaction():
            seq, drops = self._meta("next_seq"), self._meta("pending_drops")
            for sample in batch:
                self._db.execute(
                    "INSERT INTO samples (seq, dropped, body) VALUES (?, ?, ?)",
                    (seq, drops, _encode(sample)),
                )
                seqs.append(seq)
                seq, drops = seq + 1, 0
            over = self._count() - self.max_samples
            if over > 0:
                cutoff, carried = self._db.execute(
                    "SELECT MAX(seq), SUM(dropped) FROM "
                    "(SELECT seq, dropped FROM samples ORDER BY seq LIMIT ?)",
                    (over,),
                ).fetchone()
                self._db.execute("DELETE FROM samples WHERE seq <= ?", (cutoff,))
                drops += over + int(carried)
                self._set_meta("dropped_total", self._meta("dropped_total") + over)
            self._set_meta("next_seq", seq)
            self._set_meta("pending_drops", drops)
        return seqs

    def ack(self, acked_seq: int) -> int:
        """Forget samples the control plane holds (seq <= acked_seq); how many.
        A server ahead of us (our buffer file was lost) moves next_seq past it,
        since it would ignore those seqs as already stored."""
        with self._lock:
            before, self._acked = self._acked, max(self._acked, acked_seq)
            held = len(self._held)
            self._held = [p for p in self._held if p.seq > acked_seq]
            forgotten = held - len(self._held)
            if self._held_meta is not None and acked_seq >= self._held_meta["next_seq"]:
                self._held_meta["next_seq"] = acked_seq + 1
            try:
                with self._transaction():
                    pass  # it deletes the acked rows
            except DiskFull as exc:
                self._hold(exc)
                # Stored rows stay until a write lands; pending() skips them.
                return forgotten + int(self._db.execute(
                    "SELECT COUNT(*) FROM samples WHERE seq > ? AND seq <= ?", (before, acked_seq)
                ).fetchone()[0])  # fmt: skip
            return forgotten + self._deleted

    def discard(self, seq: int) -> None:
        """Drop one sample the control plane refuses (e.g. a broken clock made
        it too old); it is counted like an evicted one."""
        with self._lock:
            self._refused.add(seq)
            try:
                with self._transaction():
                    pass  # it deletes the refused row
            except DiskFull as exc:
                meta = self._hold(exc)
                held = next((p for p in self._held if p.seq == seq), None)
                if held is not None:  # never stored: nothing to delete later
                    self._held.remove(held)
                    self._refused.discard(seq)
                    meta["pending_drops"] += 1 + held.dropped_samples
                    meta["dropped_total"] += 1

    # ------------------------------------------------------------ reads

    def pending(self, limit: int) -> list[Pending]:
        """The oldest `limit` samples not yet acked, in seq order."""
        with self._lock:
            refused = set(self._refused)
            rows = self._db.execute(
                "SELECT seq, dropped, body FROM samples WHERE seq > ? ORDER BY seq LIMIT ?",
                (self._acked, limit + len(refused)),
            ).fetchall()
            held = list(self._held)
        stored = [Pending(seq, dropped, _decode(body)) for seq, dropped, body in rows]
        return [p for p in stored + held if p.seq not in refused][:limit]

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def __len__(self) -> int:
        with self._lock:
            query = "SELECT COUNT(*) FROM samples WHERE seq > ?"
            stored = int(self._db.execute(query, (self._acked,)).fetchone()[0])
            if self._refused:
                refused = sorted(self._refused)
                marks = ",".join("?" * len(refused))
                stored -= int(self._db.execute(
                    f"{query} AND seq IN ({marks})", (self._acked, *refused)
                ).fetchone()[0])  # fmt: skip
            return stored + len(self._held)

    @property
    def held(self) -> int:
        """Samples waiting in memory for room on the disk."""
        with self._lock:
            return len(self._held)

    @property
    def pending_drops(self) -> int:
        """Drops not yet attached to a sample."""
        with self._lock:
            return self._value("pending_drops")

    @property
    def dropped_total(self) -> int:
        """Samples ever dropped from this buffer (evicted, refused, or not
        kept in memory while the disk was full)."""
        with self._lock:
            return self._value("dropped_total")

    @property
    def next_seq(self) -> int:
        with self._lock:
            return max(self._value("next_seq"), self._acked + 1)
