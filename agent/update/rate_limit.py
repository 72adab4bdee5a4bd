"""A cap on download speed for metered links: the Downloader port, paced."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from .ports import Chunk, Downloader, MirroredDownloader

# The bucket: a quarter second of the cap, and at least one HTTP read (a
# source slower than the cap, whose reads bring what arrived, is never
# slowed further). A stall, or a switch to the next source, earns no more.
BURST_S = 0.25
MIN_BURST_BYTES = 64 * 1024


class RateLimitedDownloader:
    """`inner` at most `bytes_per_s()` (read at each fetch: the device
    class's cap comes with the assignment; 0: no cap), give or take a
    bucketful (BURST_S): it sleeps after a chunk that got ahead. The pace is
    kept per chunk, so a gRPC source's 1 MiB chunks arrive in bursts (set
    download_chunk_size smaller on a slow link); HTTP sources hand over what
    each read got."""

    def __init__(
        self,
        inner: Downloader,
        bytes_per_s: Callable[[], float],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._inner = inner
        self._rate = bytes_per_s
        self._clock = clock
        self._sleep = sleep

    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
        rate = self._rate()
        if rate <= 0:
            yield from self._inner.fetch(digest, offset)
            return
        # A token bucket: bytes may go as the cap earns them, at most a
        # bucketful ahead.
        capacity = max(rate * BURST_S, MIN_BURST_BYTES)
        tokens, last = capacity, self._clock()
        for chunk in self._inner.fetch(digest, offset):
            yield chunk
            now = self._clock()
            tokens = min(capacity, tokens + (now - last) * rate) - len(chunk.data)
            last = now
            if tokens < 0:
                self._sleep(-tokens / rate)
                tokens, last = 0.0, self._clock()

    def distrust(self, digest: str) -> list[str]:
        inner = self._inner
        return inner.distrust(digest) if isinstance(inner, MirroredDownloader) else []


def effective_rate(own: int, assigned: int) -> int:
    """The cap a download keeps to: the lower of the agent's own and the one
    its assignment carries (the device class's); 0 (none) where neither
    sets one. A class cannot lift a cap the device's owner set."""
    return min((cap for cap in (own, assigned) if cap > 0), default=0)
