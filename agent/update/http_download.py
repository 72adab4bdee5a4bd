"""The Downloader port over HTTP(S), with urllib3 (what requests is built
on; light enough for a device, and it loads no CLI): the assignment's sources in
order (the control plane's own artifact endpoint, mirrors), then
DeviceService.DownloadArtifact as the last resort.

A source that fails before it answers with the bytes (refused, an error
status, a timeout) passes the download to the next one at once. A source
that was sending and stops (a cut connection, a short body) ends the fetch with
ConnectionError: the update machine backs off and resumes, with Range, from
the first source again, so a flaky link to a good server is resumed rather
than abandoned (a mirror that did so twice is left for that artifact).
Nothing here is trusted: ResumableDownload checks every byte against the
signed digest and size, whatever sent it.

A mirror slower than `min_mirror_rate` over a SLOW_WINDOW_S window (a
trickle that never quite stalls) is left for that artifact at once and the
download goes on from the next source, from where it was: without that, a
mirror sending a byte a second would hold the device for hours. The floor
is kept below the download's own rate cap, which paces the reads.

Only a source marked as the control plane gets the device's credential and
client certificate; a mirror never sees either."""

from __future__ import annotations

import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from edgefleet.httputil import failure_reason as _reason
from edgefleet.httputil import without_credentials as _safe

from .ports import Chunk, Downloader, FatalUpdateError

if TYPE_CHECKING:
    import urllib3

log = logging.getLogger(__name__)

# Statuses after which another source may do better; any other error status
# from the control plane itself is as final as its gRPC twin's refusal.
_FATAL_FROM_CONTROL_PLANE = {
    400: "the control plane rejected the download request",
    401: "the control plane refused the device's credential",
    403: "the control plane refused the download",
}
CONNECT_TIMEOUT_S = 10.0
# Between two reads: a server that stops sending ends the attempt (resumed).
READ_TIMEOUT_S = 60.0

Source = tuple[str, bool]  # (base URL, is the control plane)
# A mirror that cut a download short this often is left for that artifact.
MIRROR_CUTS = 2
MAX_REDIRECTS = 5
READ_BYTES = 64 * 1024
# How long a download waits out a busy control plane (429/503) in all, and
# at most between two tries, before it counts as a failed attempt.
BUSY_WAIT_S = 600.0
BUSY_PAUSE_MAX_S = 30.0
# A mirror below the floor for this long is left (the module docstring).
SLOW_WINDOW_S = 30.0
MIN_MIRROR_RATE = 32 * 1024


class SourceFailed(Exception):
    """A source that could not start sending (the next one is tried)."""


class TooSlow(Exception):
    """A mirror sent too little for too long (left for that artifact)."""


class _Busy(Exception):
    """The control plane asked to come back later (429/503)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1.0, retry_after_s)


class HttpDownloader:
    """Implements the Downloader port over the assignment's HTTP sources,
    falling back to `fallback` (DownloadArtifact)."""

    def __init__(
        self,
        sources: Callable[[], Sequence[Source]],
        fallback: Downloader,
        credential: Callable[[], str],
        ssl_context: Callable[[], ssl.SSLContext | None],
        *,
        stall_s: float = READ_TIMEOUT_S,
        busy_wait_s: float = BUSY_WAIT_S,
        sleep: Callable[[float], None] = time.sleep,
        max_rate: Callable[[], float] = lambda: 0,
        min_mirror_rate: float = MIN_MIRROR_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`sources` reads the current assignment's; `ssl_context` is the
        device's TLS identity for the control plane (None in plain text),
        asked for per download, so a renewed certificate is used.
        `max_rate()` is the download's rate cap (0: none), which paces it
        outside this class; `min_mirror_rate` the floor a mirror must keep
        (0: none)."""
        self._sources = sources
        self._fallback = fallback
        self._credential = credential
        self._ssl_context = ssl_context
        self._stall_s = stall_s
        # Per digest: the mirrors that sent bytes of its download since it
        # last started from 0, and those that sent bytes that did not match.
        self._senders: dict[str, set[str]] = {}
        self._distrusted: dict[str, set[str]] = {}
        # Per (digest, mirror): downloads it cut short. A mirror that keeps
        # stopping part-way is left for that artifact, as one that sends
        # wrong bytes is (the control plane is resumed however often).
        self._cuts: Counter[tuple[str, str]] = Counter()
        # The source the download is on now ("control plane (HTTP)", a
        # mirror's URL, "control plane (gRPC)"), for status reports.
        self.last_source = ""
        self._sleep = sleep
        self._busy_wait_s = busy_wait_s
        self._max_rate = max_rate
        self._min_mirror_rate = min_mirror_rate
        self._clock = clock

    def distrust(self, digest: str) -> list[str]:
        bad = self._senders.pop(digest, set())
        self._distrusted.setdefault(digest, set()).update(bad)
        return sorted(bad)

    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
        if offset == 0:
            self._senders[digest] = set()
        distrusted = self._distrusted.get(digest, set())
        for base_url, control_plane in self._sources():
            if base_url in distrusted:
                continue
            if not control_plane and self._cuts[digest, base_url] >= MIRROR_CUTS:
                continue
            url = f"{base_url.rstrip('/')}/{digest}"
            self.last_source = (
                f"control plane ({'HTTPS' if url.startswith('https://') else 'HTTP'})"
                if control_plane
                else _safe(url)
            )
            try:
                for chunk in self._fetch_busy(url, control_plane, offset):
                    if chunk.offset == 0:
                        self._senders[digest] = set()  # it (re)starts from 0
                    if not control_plane:
                        self._senders.setdefault(digest, set()).add(base_url)
                    yield chunk
                    offset = chunk.offset + len(chunk.data)
                return
            except SourceFailed as exc:
                log.warning("artifact %s: %s; trying the next source", digest[:12], exc)
            except TooSlow as exc:
                self._cuts[digest, base_url] = MIRROR_CUTS
                log.warning(
                    "artifact %s: %s; that mirror is left for this artifact, the download goes "
                    "on from the next source at byte %d", digest[:12], exc, offset,
                )  # fmt: skip
            except ConnectionError:
                if not control_plane:
                    self._cuts[digest, base_url] += 1
                raise
        self.last_source = "control plane (gRPC)"
        yield from self._fallback.fetch(digest, offset)

    def _fetch_busy(self, url: str, control_plane: bool, offset: int) -> Iterator[Chunk]:
        """_fetch_one, waiting out the control plane's "busy" (429/503 with
        Retry-After) for up to busy_wait_s: a download queued behind
        --max-concurrent-downloads waits its turn instead of spending the
        update's retries (or taking the same bytes over gRPC at once)."""
        waited = 0.0
        while True:
            try:
                yield from self._fetch_one(url, control_plane, offset)
                return
            except _Busy as busy:
                if waited >= self._busy_wait_s:
                    raise ConnectionError(
                        f"the control plane stayed busy for {waited:.0f} s: {busy}"
                    ) from None
                pause = min(busy.retry_after_s, BUSY_PAUSE_MAX_S, self._busy_wait_s - waited)
                log.info("artifact download waits %.0f s: %s", pause, busy)
                self._sleep(pause)
                waited += pause

    def _fetch_one(self, url: str, control_plane: bool, offset: int) -> Iterator[Chunk]:
        # Identity: a mirror that compresses on the fly would send no
        # Content-Length, and the signed digest is of the bytes as stored.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        context: ssl.SSLContext | None = None
        if control_plane:
            context = self._ssl_context()
            if context is not None and not url.startswith("https://"):
                # A device with a TLS identity never sends its credential in
                # plain text, whoever named the source.
                raise SourceFailed(f"{_safe(url)}: not https; the credential stays home")
            headers["Authorization"] = f"Bearer {self._credential()}"
        # Loaded at the first download, not at the agent's boot (an idle
        # agent imports nothing it does not use).
        import urllib3

        # A bucket or CDN may redirect (to a signed URL); the control plane
        # does not, and its credential goes nowhere else. Nothing is retried
        # here: the update machine owns retries.
        retries = urllib3.Retry(
            total=None, connect=0, read=0, status=0, other=0,
            redirect=0 if control_plane else MAX_REDIRECTS, raise_on_redirect=True,
        )  # fmt: skip
        sent = False
        timeout = urllib3.Timeout(connect=min(self._stall_s, CONNECT_TIMEOUT_S), read=self._stall_s)
        cap = self._max_rate()
        floor = 0.0 if control_plane else self._min_mirror_rate
        if floor and cap > 0:
            floor = min(floor, cap / 2)  # the cap's pacing must never look slow
        pool = urllib3.PoolManager(ssl_context=context, timeout=timeout, retries=retries)
        try:
            response = pool.request("GET", url, headers=headers, preload_content=False)
            try:
                start, total = _extent(response, offset, url, control_plane)
                # It answered and is sending: from here, trouble is a cut to
                # resume from this source, not a reason to leave it.
                sent = True
                log.info("downloading %s from byte %d of %d", _safe(url), start, total)
                position = start
                window_at, window_bytes = self._clock(), 0
                # read1: what one read got, so progress (and a trickle) shows
                # as it arrives rather than 64 KiB at a time.
                while data := response.read1(READ_BYTES, decode_content=False):
                    yield Chunk(position, data, total)
                    position += len(data)
                    if floor:
                        window_bytes += len(data)
                        now = self._clock()
                        if now - window_at >= SLOW_WINDOW_S:
                            if window_bytes / (now - window_at) < floor:
                                raise TooSlow(
                                    f"{_safe(url)}: {window_bytes / (now - window_at):.0f} "
                                    f"bytes/s over {now - window_at:.0f} s, below the "
                                    f"{floor:.0f} bytes/s a mirror must keep"
                                )
                            window_at, window_bytes = now, 0
                if position < total:
                    raise urllib3.exceptions.ProtocolError(
                        f"the body ended at byte {position} of {total}"
                    )
            finally:
                response.release_conn()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if not sent:
                raise SourceFailed(f"{_safe(url)}: {_reason(exc)}") from None
            raise ConnectionError(f"download from {_safe(url)} cut short: {_reason(exc)}") from None
        finally:
            pool.clear()


def _extent(
    response: urllib3.BaseHTTPResponse, offset: int, url: str, control_plane: bool
) -> tuple[int, int]:
    """Where the body starts and the blob's whole size, from the status and
    headers; SourceFailed (or, from the control plane, fatal) otherwise."""
    status = response.status
    if status == 200:
        length = response.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise SourceFailed(f"{_safe(url)}: no Content-Length")
        return 0, int(length)  # the whole blob: ResumableDownload restarts from 0
    if status == 206:
        unit, _, spec = response.headers.get("Content-Range", "").partition(" ")
        span, _, size = spec.partition("/")
        first = span.partition("-")[0]
        if unit != "bytes" or not first.isdigit() or not size.isdigit():
            raise SourceFailed(f"{_safe(url)}: 206 without a usable Content-Range")
        if int(first) != offset:
            raise SourceFailed(f"{_safe(url)}: asked for bytes from {offset}, got from {first}")
        return int(first), int(size)
    # A plain-text body explains itself (the control plane's do); an HTML
    # error page would only clutter the log.
    plain = response.headers.get("Content-Type", "").startswith("text/plain")
    text = (
        " ".join(response.read(300).decode("utf-8", "replace").split())
        if plain
        else response.reason or ""
    )
    if control_plane and status in _FATAL_FROM_CONTROL_PLANE:
        raise FatalUpdateError(f"{_FATAL_FROM_CONTROL_PLANE[status]} ({status}): {text}")
    if control_plane and status in (429, 503):
        retry_after = response.headers.get("Retry-After", "")
        raise _Busy(f"the control plane is busy ({status}): {text}",
                    float(retry_after) if retry_after.isdigit() else BUSY_PAUSE_MAX_S)  # fmt: skip
    raise SourceFailed(f"{_safe(url)}: HTTP {status} {text}")
