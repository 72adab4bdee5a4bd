"""The Downloader port over HTTP(S), with httpx: the assignment's sources in
order (the control plane's own artifact endpoint, mirrors), then
DeviceService.DownloadArtifact as the last resort.

A source that fails before it answers with the bytes (refused, an error
status, a timeout) passes the download to the next one at once. A source
that was sending and stops (a cut connection, a short body) ends the fetch with
ConnectionError: the update machine backs off and resumes, with Range, from
the first source again, so a flaky link to a good server is resumed rather
than abandoned. Nothing here is trusted: ResumableDownload checks every
byte against the signed digest and size, whatever sent it.

Only a source marked as the control plane gets the device's credential and
client certificate; a mirror never sees either."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterator, Sequence

import httpx

from .ports import Chunk, Downloader, FatalUpdateError

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


class SourceFailed(Exception):
    """A source that could not start sending (the next one is tried)."""


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
    ) -> None:
        """`sources` reads the current assignment's; `ssl_context` is the
        device's TLS identity for the control plane (None in plain text),
        asked for per download, so a renewed certificate is used."""
        self._sources = sources
        self._fallback = fallback
        self._credential = credential
        self._ssl_context = ssl_context
        self._timeout = httpx.Timeout(stall_s, connect=min(stall_s, CONNECT_TIMEOUT_S))
        # Per digest: the mirrors that sent bytes of its download since it
        # last started from 0, and those that sent bytes that did not match.
        self._senders: dict[str, set[str]] = {}
        self._distrusted: dict[str, set[str]] = {}
        # What delivered the last chunk ("control plane over HTTP", a
        # mirror's base URL, "control plane over gRPC"), for status reports.
        self.last_source = ""

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
            url = f"{base_url.rstrip('/')}/{digest}"
            try:
                for chunk in self._fetch_one(url, control_plane, offset):
                    if chunk.offset == 0:
                        self._senders[digest] = set()  # it (re)starts from 0
                    if not control_plane:
                        self._senders.setdefault(digest, set()).add(base_url)
                    yield chunk
                    offset = chunk.offset + len(chunk.data)
                return
            except SourceFailed as exc:
                log.warning("artifact %s: %s; trying the next source", digest[:12], exc)
        self.last_source = "control plane (gRPC)"
        yield from self._fallback.fetch(digest, offset)

    def _fetch_one(self, url: str, control_plane: bool, offset: int) -> Iterator[Chunk]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        verify: ssl.SSLContext | bool = True
        if control_plane:
            context = self._ssl_context()
            if context is not None:
                if not url.startswith("https://"):
                    # A device with a TLS identity never sends its credential
                    # in plain text, whoever named the source.
                    raise SourceFailed(f"{_safe(url)}: not https; the credential stays home")
                verify = context
            headers["Authorization"] = f"Bearer {self._credential()}"
        sent = False
        try:
            with (
                httpx.Client(
                    verify=verify, timeout=self._timeout, follow_redirects=False
                ) as client,
                client.stream("GET", url, headers=headers) as response,
            ):
                start, total = _extent(response, offset, url, control_plane)
                # It answered and is sending: from here, trouble is a cut
                # to resume from this source, not a reason to leave it.
                sent = True
                self.last_source = "control plane (HTTP)" if control_plane else url
                position = start
                # As the bytes arrive: what came before a cut is kept.
                for data in response.iter_bytes():
                    yield Chunk(position, data, total)
                    position += len(data)
        except httpx.HTTPError as exc:
            if not sent:
                raise SourceFailed(f"{_safe(url)}: {type(exc).__name__}: {exc}") from None
            raise ConnectionError(
                f"download from {_safe(url)} cut short: {type(exc).__name__}: {exc}"
            ) from None
        except ssl.SSLError as exc:
            raise SourceFailed(f"{_safe(url)}: TLS: {exc}") from None


def _extent(
    response: httpx.Response, offset: int, url: str, control_plane: bool
) -> tuple[int, int]:
    """Where the body starts and the blob's whole size, from the status and
    headers; SourceFailed (or, from the control plane, fatal) otherwise."""
    status = response.status_code
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
        " ".join(response.read()[:300].decode("utf-8", "replace").split())
        if plain
        else (response.reason_phrase)
    )
    if control_plane and status in _FATAL_FROM_CONTROL_PLANE:
        raise FatalUpdateError(f"{_FATAL_FROM_CONTROL_PLANE[status]} ({status}): {text}")
    if control_plane and status in (429, 503):
        # Busy: wait and come back (the update machine backs off), rather
        # than take the same bytes from it over gRPC at once.
        raise ConnectionError(f"the control plane is busy ({status}): {text}")
    raise SourceFailed(f"{_safe(url)}: HTTP {status} {text}")


def _safe(url: str) -> str:
    """A URL for a log line: without any user:password a mirror URL holds."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(userinfo=b"")) if parsed.userinfo else url
