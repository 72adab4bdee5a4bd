"""IN (...) lists padded to few lengths (controlplane/db/in_list.py)."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, MetaData, String, Table, create_engine, event, select

from edgefleet.controlplane.db.in_list import STEP, padded


@pytest.mark.parametrize(
    ("n", "size"), [(0, 0), (1, 1), (2, 2), (3, 4), (500, 512), (1024, 1024), (1025, 2048),
                    (2049, 3072), (20_000, 20_480), (32_000, 32_766), (40_000, 40_000)],
)  # fmt: skip
def test_in_lists_are_padded_to_few_lengths(n: int, size: int) -> None:
    ids = [f"d{i}" for i in range(n)]
    out = padded(ids)
    assert len(out) == size
    assert out[:n] == ids and set(out) == set(ids)


def test_in_lists_of_every_length_make_a_dozen_texts_up_to_1024() -> None:
    assert len({len(padded(range(n))) for n in range(1, STEP + 1)}) == 11


def test_a_padded_list_keeps_the_statement_text_and_the_answer() -> None:
    """What the padding is for: SQLite compiles and keeps each distinct SQL text."""
    engine = create_engine("sqlite://")
    table = Table("t", MetaData(), Column("id", String, primary_key=True))
    table.create(engine)
    texts: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: texts.append(a[2]))
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": f"d{i}"} for i in range(10)])
        found = [
            sorted(conn.scalars(select(table.c.id).where(table.c.id.in_(padded(ids)))))
            for ids in (["d1", "d2", "d3"], ["d4", "d5", "d6", "d7"])
        ]
    assert found == [["d1", "d2", "d3"], ["d4", "d5", "d6", "d7"]]
    assert texts[-1] == texts[-2]
