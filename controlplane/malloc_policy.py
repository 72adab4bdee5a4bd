"""Handing the heap that bursts freed back to the operating system.

A rollout stage wakes thousands of sync streams and downloads at once; the
memory their requests took is freed when the burst is over, but glibc's
malloc keeps freed memory inside its arenas unless it lies at the very top
of one, so the control plane's RSS stepped up with every burst and stayed
there. In a 10,000-device soak (bench/bench_soak.py, docs/benchmarks.md
"Soak") the memory in use was flat while the free memory malloc held grew
from 57 to 134 MB in ten minutes, which read as a leak. malloc_trim(0)
returns the free pages anywhere in the arenas (madvise), in a few
milliseconds, without holding the GIL.

The same soak showed the free memory scattered in pages still partly in
use, which no trim can return: glibc gives each thread that allocates
concurrently an arena of its own (up to 8 per core), and a burst spread
over the database, gRPC and executor threads left all of them fragmented.
limit_arenas() caps them (as MALLOC_ARENA_MAX would) before the server
starts its threads.

Only on Linux with glibc; elsewhere (musl, macOS) this does nothing."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_EVERY_S = 60.0
ARENAS = 2
# mallopt's parameter number for the arena cap (glibc's malloc.h).
_M_ARENA_MAX = -8


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap malloc's arenas at `arenas` unless MALLOC_ARENA_MAX already says
    otherwise; call before starting threads. True if the cap was set."""
    libc = _libc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ or not hasattr(libc, "mallopt"):
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return bool(libc.mallopt(_M_ARENA_MAX, arenas))


def malloc_trim() -> Callable[[], bool] | None:
    """glibc's malloc_trim(0) (True if it returned memory), or None where
    the C library has none."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: bool(trim(0))


async def trim_periodically(every_s: float = TRIM_EVERY_S) -> None:
    """Run malloc_trim every `every_s` seconds until cancelled (a thread
    call: ctypes releases the GIL while it runs)."""
    trim = malloc_trim()
    if trim is None:
        log.info("no malloc_trim in this C library: freed heap stays with the process")
        return
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(trim)
