"""Batcher and Coalescer: many coroutines' writes or reads answered by one
call (pure logic; the call is a fake port that records what it was asked)."""

from __future__ import annotations

import asyncio

import pytest

from edgefleet.controlplane.services.batching import Batcher, Coalescer


class Store:
    """A fetch that records each call and can be held open."""

    def __init__(self, values: dict[str, int]) -> None:
        self.values = values
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: Exception | None = None

    async def fetch(self, keys: list[str]) -> dict[str, int]:
        self.calls.append(list(keys))
        # What the fetch reads is what the store holds when it starts.
        snapshot = {k: self.values[k] for k in keys if k in self.values}
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return snapshot


async def test_a_burst_of_reads_is_one_fetch() -> None:
    store = Store({f"d{i}": i for i in range(300)})
    coalescer = Coalescer(store.fetch)
    got = await asyncio.gather(*(coalescer.get(f"d{i}") for i in range(300)))
    assert got == list(range(300))
    assert len(store.calls) == 1
    assert sorted(store.calls[0]) == sorted(f"d{i}" for i in range(300))


async def test_the_same_key_twice_is_fetched_once_and_both_answered() -> None:
    store = Store({"a": 1})
    coalescer = Coalescer(store.fetch)
    assert await asyncio.gather(coalescer.get("a"), coalescer.get("a")) == [1, 1]
    assert store.calls == [["a"]]


async def test_batches_are_at_most_max_batch_and_run_one_at_a_time() -> None:
    store = Store({f"d{i}": i for i in range(25)})
    coalescer = Coalescer(store.fetch, max_batch=10)
    got = await asyncio.gather(*(coalescer.get(f"d{i}") for i in range(25)))
    assert got == list(range(25))
    assert [len(c) for c in store.calls] == [10, 10, 5]


async def test_a_batch_is_answered_a_slice_per_loop_iteration() -> None:
    """Other work (a heartbeat) runs between the slices, not after every
    caller of the batch has resumed."""
    runs: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        runs.append(items)
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(run, answer_slice=50)
    resumed: list[int] = []
    seen_by_other: list[int] = []

    async def caller(i: int) -> int:
        got = await batcher.submit(i)
        if not resumed:
            # Runs once the callers already woken have run.
            asyncio.get_running_loop().call_soon(lambda: seen_by_other.append(len(resumed)))
        resumed.append(i)
        return got

    got = await asyncio.gather(*(caller(i) for i in range(120)))
    assert got == [i * 10 for i in range(120)]
    assert len(runs) == 1  # still one run
    assert seen_by_other == [50]


def test_answer_slice_must_be_positive() -> None:
    async def run(items: list[int]) -> list[int]:
        return items

    with pytest.raises(ValueError, match="answer_slice"):
        Batcher(run, answer_slice=0)


async def test_a_key_asked_for_during_a_fetch_is_read_after_it() -> None:
    """A stream woken by a change must not be answered by a read that began
    before the change."""
    store = Store({"a": 1})
    coalescer = Coalescer(store.fetch)
    store.gate.clear()
    first = asyncio.create_task(coalescer.get("a"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert store.calls == [["a"]]  # in flight, holding the old value
    store.values["a"] = 2
    second = asyncio.create_task(coalescer.get("a"))
    await asyncio.sleep(0)
    store.gate.set()
    assert await first == 1
    assert await second == 2
    assert store.calls == [["a"], ["a"]]


async def test_a_key_the_fetch_leaves_out_is_none() -> None:
    coalescer = Coalescer(Store({"a": 1}).fetch)
    assert await asyncio.gather(coalescer.get("a"), coalescer.get("gone")) == [1, None]


async def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_works() -> None:
    store = Store({"a": 1, "b": 2})
    store.error = RuntimeError("database down")
    coalescer = Coalescer(store.fetch)
    results = await asyncio.gather(coalescer.get("a"), coalescer.get("b"), return_exceptions=True)
    assert [str(r) for r in results] == ["database down", "database down"]
    store.error = None
    assert await coalescer.get("b") == 2


async def test_a_caller_that_gives_up_leaves_the_others_answered() -> None:
    store = Store({"a": 1, "b": 2})
    coalescer = Coalescer(store.fetch)
    store.gate.clear()
    quitter = asyncio.create_task(coalescer.get("a"))
    stayer = asyncio.create_task(coalescer.get("b"))
    await asyncio.sleep(0)
    quitter.cancel()
    store.gate.set()
    assert await stayer == 2
    with pytest.raises(asyncio.CancelledError):
        await quitter


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        Coalescer(Store({}).fetch, max_batch=0)


# ---------------------------------------------------------------- Batcher


async def test_a_burst_of_submissions_is_one_run_in_order_with_errors_per_item() -> None:
    runs: list[list[int]] = []

    async def run(items: list[int]) -> list[int | Exception]:
        runs.append(items)
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    batcher = Batcher(run, max_batch=4)
    got = await asyncio.gather(*(batcher.submit(i) for i in range(6)), return_exceptions=True)
    assert runs == [[0, 1, 2, 3], [4, 5]]
    assert [r if isinstance(r, int) else str(r) for r in got] == [
        0, "odd 1", 20, "odd 3", 40, "odd 5",
    ]  # fmt: skip


async def test_a_run_that_answers_the_wrong_number_of_items_fails_its_batch() -> None:
    async def run(items: list[int]) -> list[int | Exception]:
        return items[1:]

    batcher = Batcher(run)
    got = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "2 got 1" in str(r) for r in got), got


async def test_a_submission_during_a_run_waits_for_the_next_and_shutdown_cancels_it() -> None:
    gate = asyncio.Event()
    runs: list[list[str]] = []

    async def run(items: list[str]) -> list[str | Exception]:
        runs.append(items)
        await gate.wait()
        return items

    batcher = Batcher(run)
    first = asyncio.create_task(batcher.submit("a"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    second = asyncio.create_task(batcher.submit("b"))
    await asyncio.sleep(0)
    assert runs == [["a"]]
    gate.set()
    assert (await first, await second) == ("a", "b")
    assert runs == [["a"], ["b"]]
    # The loop shutting down (the drainer cancelled) cancels who is waiting.
    gate.clear()
    third = asyncio.create_task(batcher.submit("c"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    drainer = batcher._drainer
    assert drainer is not None
    drainer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await third
