"""IN (...) lists whose length does not make a new statement.

SQLAlchemy renders `col.in_(ids)` with one parameter per id, so the SQL
text depends on how many there are, and every distinct text is a statement
the database driver keeps compiled: SQLite's per-connection cache holds the
last 128 (about 200 bytes per parameter each, so a 1,000-id list is 220 KB),
psycopg prepares a query used five times on the server. Lists of every
length up to a chunk, from rollout steps and sync batches, filled those
caches on every connection: the soak's steady RSS growth
(docs/benchmarks.md). Padded to a power of two up to 1,024 and to a
multiple of 1,024 above (a power of two would pass SQLite's 32,766
parameters at 16,384 ids), a query site has a dozen texts below 1,024 ids
and one more per 1,024."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


# Above this many ids lists grow by steps of it.
STEP = 1024
# SQLite's default limit of parameters per statement: padding never takes a
# list that fits past it.
MAX_PARAMETERS = 32_766


def padded(values: Sequence[T]) -> list[T]:
    """`values` with the last repeated up to the next power of two, or the
    next multiple of STEP past it (a repeat changes nothing inside IN)."""
    n = len(values)
    if n <= 1:
        return list(values)
    size = 1 << (n - 1).bit_length() if n <= STEP else -(-n // STEP) * STEP
    size = max(n, min(size, MAX_PARAMETERS))
    return [*values, *itertools.repeat(values[-1], size - n)]
