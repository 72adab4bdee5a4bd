"""Coalescing reads made by many coroutines in the same instant into one
blocking call. Lives on the event loop.

A rollout stage, a revert or a key rotation wakes hundreds or thousands of
sync streams at once, and each wants its device's desired state. One
executor hop and one query per stream kept the event loop and the GIL busy
for hundreds of milliseconds at a time, which every other stream's
heartbeat waited behind (bench/bench_soak.py); one hop and one IN (...)
query for all of them costs a fraction of that."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
# Callers waiting, by the key they asked for.
_Batch = dict[K, list["asyncio.Future[V | None]"]]


class Coalescer(Generic[K, V]):
    """`await get(key)` from many coroutines; one `fetch(keys)` answers them.

    Keys asked for while a fetch runs wait for the next one, so a burst is
    answered in as many fetches as it takes `max_batch` keys to cover it,
    one at a time: the loop gets to answer other streams between them.
    A fetch always starts after the get() calls it answers, so a caller
    woken by a committed change reads that change. A key `fetch` leaves out
    of its answer gets None; if `fetch` raises, every caller of that batch
    gets the error."""

    def __init__(
        self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], *, max_batch: int = 500
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._fetch = fetch
        self._max_batch = max_batch
        self._waiting: _Batch[K, V] = {}
        self._drainer: asyncio.Task[None] | None = None

    async def get(self, key: K) -> V | None:
        """The value for `key`, read with whatever else is asked for now."""
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._drainer is None:
            # Its first step runs after the coroutines already woken in this
            # loop iteration, so a whole wake burst joins the first fetch.
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        batch: _Batch[K, V] = {}
        try:
            while self._waiting:
                keys = list(itertools.islice(self._waiting, self._max_batch))
                batch = {key: self._waiting.pop(key) for key in keys}
                try:
                    found = await self._fetch(keys)
                except Exception as exc:
                    _answer(batch, {}, exc)
                else:
                    _answer(batch, found, None)
        except asyncio.CancelledError as cancelled:
            # The loop is shutting down: nobody is left to answer them.
            _answer(batch, {}, cancelled)
            _answer(self._waiting, {}, cancelled)
            raise
        finally:
            self._drainer = None


def _answer(batch: _Batch[K, V], found: dict[K, V], error: BaseException | None) -> None:
    for key, futures in batch.items():
        for future in futures:
            if future.done():  # its caller gave up (its stream ended)
                continue
            if error is None:
                future.set_result(found.get(key))
            elif isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)
