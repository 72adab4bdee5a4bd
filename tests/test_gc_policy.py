"""The serving GC policy: start-up heap frozen, young generation large."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from controlplane import gc_policy


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restore_gc")
def test_tuning_freezes_the_heap_and_raises_the_thresholds() -> None:
    survivor = [object() for _ in range(10)]
    gc_policy.tune_for_serving()
    assert gc.get_threshold() == gc_policy.THRESHOLDS
    assert gc.get_freeze_count() > 0
    # What existed is frozen: no generation holds it for a collection to walk.
    assert not any(survivor is o for o in gc.get_objects())
    # Cycles made afterwards are still collected.
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1
