"""Waiting until something holds, by asking again: the one `wait_for` the
tests, the benchmarks and the demo share (and its twin for code that runs on
an event loop). Standard library only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal, TypeVar

T = TypeVar("T")

Predicate = Callable[[], T | Literal[False] | None]


class WaitTimeout(AssertionError):
    """The condition did not hold in time. An AssertionError, so that a test
    that gave up waiting reads as a failed check, with the last value seen."""


def _gave_up(what: str, timeout: float, last: object) -> WaitTimeout:
    return WaitTimeout(f"gave up waiting for {what} after {timeout:g} s (last value: {last!r})")


def wait_for(
    predicate: Predicate[T],
    timeout: float = 30.0,
    *,
    what: str = "a condition",
    interval: float = 0.05,
) -> T:
    """Call `predicate` every `interval` seconds until it returns something
    truthy, and return that. Raises WaitTimeout, naming `what` and the last
    value, after `timeout` seconds; whatever `predicate` raises goes through
    (a predicate gives up early that way, e.g. when a process it waits on
    exited)."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise _gave_up(what, timeout, last)
        time.sleep(interval)


async def wait_for_async(
    predicate: Predicate[T],
    # Not asyncio.timeout: a deadline could not report the last value seen.
    timeout: float = 30.0,  # noqa: ASYNC109
    *,
    what: str = "a condition",
    interval: float = 0.05,
) -> T:
    """wait_for on an event loop: sleeps without blocking the loop, so what
    `predicate` waits for (a task on the same loop) can make progress."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise _gave_up(what, timeout, last)
        await asyncio.sleep(interval)
