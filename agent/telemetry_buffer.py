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
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import StateError
from agent.telemetry import IntervalSample

FILE_NAME = "telemetry.db"
# ~300 bytes a row: about 6 MB, over a day of one model at the 10 s default.
DEFAULT_MAX_SAMPLES = 20_000

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

    def __init__(self, state_dir: Path, *, max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        self.path = state_dir / FILE_NAME
        self.max_samples = max_samples
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the telemetry buffer {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE .. COMMIT under the lock; ROLLBACK on any error."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StateError(f"cannot write the telemetry buffer {self.path}: {exc}") from exc

    # ------------------------------------------------------------ writes

    def append(self, samples: Iterable[IntervalSample]) -> list[int]:
        """Store samples (one transaction), oldest evicted past the bound; their seqs."""
        seqs: list[int] = []
        with self._transaction():
            seq, drops = self._meta("next_seq"), self._meta("pending_drops")
            for sample in samples:
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
        with self._transaction():
            deleted = self._db.execute("DELETE FROM samples WHERE seq <= ?", (acked_seq,)).rowcount
            if acked_seq >= self._meta("next_seq"):
                self._set_meta("next_seq", acked_seq + 1)
        return int(deleted)

    def discard(self, seq: int) -> None:
        """Drop one sample the control plane refuses (e.g. a broken clock made
        it too old); it is counted like an evicted one."""
        with self._transaction():
            row = self._db.execute("SELECT dropped FROM samples WHERE seq = ?", (seq,)).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM samples WHERE seq = ?", (seq,))
                self._set_meta("pending_drops", self._meta("pending_drops") + 1 + int(row[0]))
                self._set_meta("dropped_total", self._meta("dropped_total") + 1)

    # ------------------------------------------------------------ reads

    def pending(self, limit: int) -> list[Pending]:
        """The oldest `limit` samples not yet acked, in seq order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, dropped, body FROM samples ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [Pending(seq, dropped, _decode(body)) for seq, dropped, body in rows]

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    @property
    def pending_drops(self) -> int:
        """Drops not yet attached to a sample."""
        with self._lock:
            return self._meta("pending_drops")

    @property
    def dropped_total(self) -> int:
        """Samples ever dropped from this buffer (evicted or refused)."""
        with self._lock:
            return self._meta("dropped_total")

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._meta("next_seq")
