"""The serving GC policy: start-up heap frozen, young generation large."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from edgefleet.controlplane import gc_policy


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


def test_collection_pauses_are_timed_by_generation() -> None:
    registry = CollectorRegistry()
    stop = gc_policy.observe_pauses(gc_policy.pause_histogram(registry))
    try:
        gc.collect()  # a full collection
        gc.collect(0)  # a young one
    finally:
        stop()

    def count(generation: str) -> float:
        value = registry.get_sample_value(
            "edgefleet_gc_pause_seconds_count", {"generation": generation}
        )
        return value or 0.0

    # Collections the interpreter ran on its own meanwhile may add to these.
    assert count("2") >= 1 and count("0") >= 1
    full = registry.get_sample_value("edgefleet_gc_pause_seconds_sum", {"generation": "2"})
    assert full is not None and full > 0
    before = count("2")
    gc.collect()
    assert count("2") == before  # stop() took the callback out


def test_the_thresholds_can_be_overridden_and_a_bad_override_is_named() -> None:
    assert gc_policy.thresholds({}) == gc_policy.THRESHOLDS
    assert gc_policy.thresholds({gc_policy.THRESHOLDS_ENV: " 10000,5,30 "}) == (10_000, 5, 30)
    for bad in ("10000,20", "a,b,c", "0,20,20", "1,2,3,4"):
        with pytest.raises(ValueError, match=gc_policy.THRESHOLDS_ENV):
            gc_policy.thresholds({gc_policy.THRESHOLDS_ENV: bad})


@pytest.mark.usefixtures("restore_gc")
def test_tuning_sets_the_thresholds_it_is_given() -> None:
    gc_policy.tune_for_serving((10_000, 5, 30))
    assert gc.get_threshold() == (10_000, 5, 30)
