"""Healing a stored blob from the artifact mirrors: when the blob store's
copy of a blob that has a row is gone or damaged, the mirrors agents
download from (`edgefleet server --artifact-mirror URL`, serving
`<URL>/<sha256>`) may still hold the bytes. They are fetched into the
store's tmp/, checked against the row's size and the digest, and put into
the store (DirectoryStore.put verifies them again and renames them into
place), so the store serves them as if they had been pushed again.

A mirror is not trusted: whatever it sends is counted (never more than the
row's size is read) and hashed before it is stored; no credential is ever
sent to one (the control plane holds none for mirrors, and a user:password
in a mirror's URL is dropped, as agents drop it). One heal of a digest runs
at a time (others wait for its result), and a digest no mirror could heal
is not asked for again until `backoff_s` has passed: a fleet downloading a
lost artifact must not become a download storm on the mirrors."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import urllib3

from edgefleet.httputil import failure_reason, without_credentials

log = logging.getLogger(__name__)

Mirrors = Callable[[], Sequence[str]]
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 10.0  # between two reads: a mirror that stops sending fails
MAX_REDIRECTS = 5  # a bucket's signed URL, a CDN edge; as agents follow
HEAL_BACKOFF_S = 60.0
# A whole fetch: at least 2 minutes, and at least 256 KiB/s. A mirror that
# trickles a byte just inside each read timeout would otherwise hold the
# digest's lock, and every download waiting on it, for hours.
MIN_FETCH_S = 120.0
MIN_FETCH_RATE = 256 * 1024
_READ_BYTES = 64 * 1024
_REASON_CHARS = 200


def no_mirrors() -> Sequence[str]:
    return ()


class MirrorFailed(Exception):
    """One mirror could not heal the blob; the message says why, briefly."""


@dataclass(frozen=True)
class HealFailure:
    """Every mirror failed to heal a digest, at `at` (the healer's clock)."""

    at: float
    tried: tuple[tuple[str, str], ...]  # (mirror URL without credentials, reason)

    def describe(self) -> str:
        return "; ".join(f"{url}: {reason}" for url, reason in self.tried)


class MirrorHealer:
    """Fetches lost blobs from the mirrors `mirrors()` names, in order, and
    hands a verified copy to `put(path, digest)`."""

    def __init__(
        self,
        mirrors: Mirrors,
        put: Callable[[Path, str], None],
        tmp: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff_s: float = HEAL_BACKOFF_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        """`tmp` is the store's directory for temporary files (what a crash
        leaves there is swept by garbage collection)."""
        self._mirrors = mirrors
        self._put = put
        self._tmp = tmp
        self._clock = clock
        self._backoff_s = backoff_s
        self._timeout = urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s)
        self._lock = threading.Lock()  # guards the two dicts below
        # Per digest being healed: its lock and how many threads hold or
        # wait for it (the entry goes when the last one leaves).
        self._locks: dict[str, tuple[threading.Lock, int]] = {}
        self._failed: dict[str, HealFailure] = {}

    def explain(self, failure: HealFailure) -> str:
        """For a DataLoss message: which mirrors were tried, and why each failed."""
        ago = max(0.0, self._clock() - failure.at)
        return (
            f"The artifact mirrors could not heal it either (asked {ago:.0f} s ago; asked again "
            f"{self._backoff_s:.0f} s after that): {failure.describe()}"
        )

    def mirrors(self) -> list[str]:
        return [m for m in self._mirrors() if m]

    @contextlib.contextmanager
    def exclusive(self, digest: str) -> Iterator[None]:
        """Held while a digest is healed: the threads that wait for it then
        find the healed copy (or the failure) rather than fetch it again."""
        with self._lock:
            lock, users = self._locks.get(digest, (threading.Lock(), 0))
            self._locks[digest] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._locks[digest]
                if users == 1:
                    del self._locks[digest]
                else:
                    self._locks[digest] = (lock, users - 1)

    def heal(self, digest: str, size: int, mirrors: Sequence[str]) -> HealFailure | None:
        """Put the blob back from the first of `mirrors` with its bytes; None once
        it is back, else how each mirror failed (the earlier failure, without
        asking any mirror, within `backoff_s` of it). Call under
        `exclusive(digest)`."""
        now = self._clock()
        with self._lock:
            # Forget failures past their back-off: the dict holds only recent ones.
            for gone in [d for d, f in self._failed.items() if now - f.at >= self._backoff_s]:
                del self._failed[gone]
            earlier = self._failed.get(digest)
        if earlier is not None:
            return earlier
        tried: list[tuple[str, str]] = []
        retries = urllib3.Retry(
            total=None, connect=0, read=0, status=0, other=0,
            redirect=MAX_REDIRECTS, raise_on_redirect=True,
        )  # fmt: skip
        # No ssl_context: the system's CAs verify an https mirror.
        pool = urllib3.PoolManager(timeout=self._timeout, retries=retries)
        try:
            for base in mirrors:
                try:
                    url = without_credentials(f"{base.rstrip('/')}/{digest}")
                except urllib3.exceptions.LocationParseError:
                    # Not echoed: it may hold a password.
                    url, reason = "a mirror URL", "does not parse as a URL"
                else:
                    failed = self._try(pool, url, digest, size)
                    if failed is None:
                        log.warning("blob store: blob %s healed from the mirror %s", digest, url)
                        return None
                    reason = failed
                log.warning("blob store: the mirror %s could not heal blob %s: %s",
                            url, digest, reason)  # fmt: skip
                tried.append((url, reason))
        finally:
            pool.clear()
        failure = HealFailure(self._clock(), tuple(tried))
        with self._lock:
            self._failed[digest] = failure
        return failure

    def _try(self, pool: urllib3.PoolManager, url: str, digest: str, size: int) -> str | None:
        """None once the blob is stored from `url`, else why not (briefly)."""
        try:
            self._fetch(pool, url, digest, size)
        except MirrorFailed as exc:
            return str(exc)[:_REASON_CHARS]
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return failure_reason(exc)[:_REASON_CHARS]
        return None

    def _fetch(self, pool: urllib3.PoolManager, url: str, digest: str, size: int) -> None:
        # Identity: the digest is of the bytes as stored, not as compressed
        # on the fly. No other header: a mirror gets no credential.
        response = pool.request(
            "GET", url, headers={"Accept-Encoding": "identity"}, preload_content=False
        )
        try:
            if response.status != 200:
                raise MirrorFailed(f"HTTP {response.status} {response.reason or ''}".rstrip())
            encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise MirrorFailed(f"sent Content-Encoding {encoding}, not the stored bytes")
            length = response.headers.get("Content-Length")
            if length is not None and length.strip() != str(size):
                raise MirrorFailed(f"Content-Length {length.strip()}, not the blob's {size} bytes")
            self._tmp.mkdir(parents=True, exist_ok=True)
            limit_s = max(MIN_FETCH_S, size / MIN_FETCH_RATE)
            deadline = time.monotonic() + limit_s
            fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="heal-")
            try:
                hasher = hashlib.sha256()
                received = 0
                with os.fdopen(fd, "wb") as out:
                    for data in response.stream(_READ_BYTES, decode_content=False):
                        received += len(data)
                        if received > size:
                            raise MirrorFailed(f"sent more than the blob's {size} bytes; refused")
                        if time.monotonic() > deadline:
                            raise MirrorFailed(
                                f"too slow: {received} of {size} bytes in {limit_s:.0f} s"
                            )
                        hasher.update(data)
                        out.write(data)
                if received != size:
                    raise MirrorFailed(f"sent {received} bytes, not the blob's {size}")
                if hasher.hexdigest() != digest:
                    raise MirrorFailed(
                        f"its bytes hash to {hasher.hexdigest()[:12]}, not the blob's digest"
                    )
                self._put(Path(tmp), digest)  # verified again, synced, renamed into place
            finally:
                Path(tmp).unlink(missing_ok=True)
        finally:
            # Closed, not kept alive: what a refused mirror still had to send
            # is never read (nor would it be by the next request).
            response.close()
            response.release_conn()
