"""Batching what many coroutines ask for in the same instant into one
blocking call. Lives on the event loop.

A rollout stage, a revert or a key rotation wakes hundreds or thousands of
sync streams at once, and each wants its device's desired state. One
executor hop and one query per stream kept the event loop and the GIL busy
for hundreds of milliseconds at a time, which every other stream's
heartbeat waited behind (bench/bench_soak.py); one hop and one IN (...)
query for all of them costs a fraction of that. Writes are the same: 10,000
devices' telemetry uploads, each its own transaction, queued on SQLite's one
writer and held a database thread each while they waited; one transaction
for every upload that arrived meanwhile (a group commit) does not."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Callers a batch wakes per event-loop iteration (see Batcher).
ANSWER_SLICE = 50


class Batcher(Generic[T, R]):
    """`await submit(item)` from many coroutines; one `run(items)` answers
    every item submitted before it started, in order.

    Items submitted while a run is in progress wait for the next one, so a
    burst is answered in as many runs as it takes `max_batch` items to cover
    it, one at a time: the loop gets to answer others between them, and at
    most one run (one database thread) is busy at a time. A run always
    starts after the submissions it answers, so an item submitted after a
    committed change sees that change. `run` returns one result per item, in
    the items' order; an Exception among them is raised to that item's
    caller alone. If `run` itself raises, every caller of that batch gets
    the error.

    A batch is answered `answer_slice` callers per loop iteration. Answered
    at once, all of them would resume in the same iteration, and a
    heartbeat arriving meanwhile would wait behind every one of them (500
    sync streams writing their DesiredState, or 500 upload replies)."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R | Exception]]],
        *,
        max_batch: int = 500,
        answer_slice: int = ANSWER_SLICE,
    ) -> None:
        if max_batch < 1 or answer_slice < 1:
            raise ValueError("max_batch and answer_slice must be at least 1")
        self._run = run
        self._max_batch = max_batch
        self._answer_slice = answer_slice
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """The result for `item`, from a run shared with whatever else is
        submitted now."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._drainer is None:
            # Its first step runs after the coroutines already woken in this
            # loop iteration, so a whole burst joins the first run.
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                results: Sequence[R | Exception]
                try:
                    results = await self._run([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"a batch of {len(batch)} got {len(results)} results")
                except Exception as exc:
                    results = [exc] * len(batch)
                step = self._answer_slice
                for start in range(0, len(batch), step):
                    if start:
                        await asyncio.sleep(0)  # let the last slice's callers run first
                    _answer(batch[start : start + step], results[start : start + step])
        except asyncio.CancelledError:
            # The loop is shutting down: nobody is left to answer them.
            for _, future in batch + self._waiting:
                future.cancel()
            self._waiting.clear()
            raise
        finally:
            self._drainer = None


def _answer(batch: list[tuple[T, asyncio.Future[R]]], results: Sequence[R | Exception]) -> None:
    for (_, future), result in zip(batch, results, strict=True):
        if future.done():  # its caller gave up (its stream ended)
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)


class Coalescer(Generic[K, V]):
    """`await get(key)` from many coroutines; one `fetch(keys)` answers
    them, each key fetched once however many ask for it (a Batcher of
    reads). A key `fetch` leaves out of its answer gets None."""

    def __init__(
        self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], *, max_batch: int = 500
    ) -> None:
        async def run(keys: list[K]) -> list[V | None]:
            found = await fetch(list(dict.fromkeys(keys)))
            return [found.get(key) for key in keys]

        self._batcher: Batcher[K, V | None] = Batcher(run, max_batch=max_batch)

    async def get(self, key: K) -> V | None:
        """The value for `key`, read with whatever else is asked for now."""
        return await self._batcher.submit(key)
