"""malloc_policy: glibc's malloc_trim hands freed heap back to the OS (a real
call on this Linux machine; the RSS is the process's own, read by psutil)."""

from __future__ import annotations

import asyncio
import sys
import threading

import psutil
import pytest

from edgefleet.controlplane import malloc_policy


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_trim_returns_memory_that_free_kept() -> None:
    trim = malloc_policy.malloc_trim()
    assert trim is not None
    trim()
    process = psutil.Process()
    before = process.memory_info().rss
    # 1 KB objects come from malloc's heap; keeping the last one pins the
    # top of it, so free() alone gives nothing back.
    blocks = [bytes(1000) + bytes([i % 256]) for i in range(150_000)]
    last = blocks[-1]
    del blocks
    kept = process.memory_info().rss
    assert kept - before > 100e6, "free() returned the memory itself: nothing to show"
    assert trim()
    assert kept - process.memory_info().rss > 100e6
    assert last


async def test_the_periodic_trim_runs_until_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    thrice = threading.Event()

    def fake_trim() -> bool:
        calls.append(1)
        if len(calls) == 3:
            thrice.set()
        return True

    monkeypatch.setattr(malloc_policy, "malloc_trim", lambda: fake_trim)
    task = asyncio.create_task(malloc_policy.trim_periodically(every_s=0.01))
    assert await asyncio.to_thread(thrice.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_the_arena_cap_is_set_unless_the_environment_sets_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    # Capping this test process's arenas is harmless: new threads share them.
    assert malloc_policy.limit_arenas(8)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not malloc_policy.limit_arenas(8)
