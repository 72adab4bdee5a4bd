"""The agent's HTTP downloads (agent/update/http_download.py) against real
HTTP servers on loopback: a mirror that trickles (never quite stalls) is
left for the next source, which resumes where it got; progress shows as
bytes arrive; and under a rate cap the wire stays near the paced reads."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgefleet.agent.update import http_download
from edgefleet.agent.update.http_download import HttpDownloader
from edgefleet.agent.update.ports import Chunk
from edgefleet.agent.update.rate_limit import RateLimitedDownloader

DATA = os.urandom(64 * 1024)
DIGEST = hashlib.sha256(DATA).hexdigest()
BIG = 8 * 1024 * 1024


@dataclass
class Server:
    url: str
    ranges: list[str] = field(default_factory=list)
    # Bytes the last /big response has written so far.
    written: list[int] = field(default_factory=list)


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            server.ranges.append(self.headers.get("Range", ""))
            start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0] or 0)
            if self.path.startswith("/big/"):
                self._big()
                return
            body = DATA[start:]
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
            self.end_headers()
            trickle = self.path.startswith("/trickle/")
            step = 100 if trickle else len(body)
            for at in range(0, len(body), step):
                try:
                    self.wfile.write(body[at : at + step])
                    self.wfile.flush()
                except OSError:
                    return
                if trickle:
                    time.sleep(0.1)  # 1,000 bytes a second

        def _big(self) -> None:
            # A small send buffer of its own: what it manages to write is
            # bounded by what the client's socket takes ahead of its reads.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            self.send_response(200)
            self.send_header("Content-Length", str(BIG))
            self.end_headers()
            server.written.append(0)
            piece = b"x" * 16384
            self.connection.settimeout(5.0)
            try:
                while server.written[-1] < BIG:
                    self.wfile.write(piece)
                    server.written[-1] += len(piece)
            except OSError:
                pass

    return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server("")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


class NoFallback:
    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
        raise AssertionError("DownloadArtifact was not to be needed")


def _downloader(sources: list[str], **kwargs: object) -> HttpDownloader:
    return HttpDownloader(
        lambda: [(s, False) for s in sources], NoFallback(), lambda: "", lambda: None,
        stall_s=10, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_trickling_mirror_is_left_and_the_next_one_resumes_where_it_got(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_download, "SLOW_WINDOW_S", 1.0)
    downloader = _downloader([f"{server.url}/trickle", f"{server.url}/good"], min_mirror_rate=4096)
    started = time.monotonic()
    chunks = list(downloader.fetch(DIGEST, 0))
    took = time.monotonic() - started
    assert b"".join(c.data for c in chunks) == DATA
    # Progress as it arrived (read1), not 64 KiB at a time.
    assert max(len(c.data) for c in chunks[:5]) <= 8 * 1024
    # Left after its window (the whole trickle would take 65 s), and the
    # good mirror was asked for the rest only.
    assert took < 5, took
    resumed = int(server.ranges[-1].removeprefix("bytes=").split("-")[0])
    assert 0 < resumed < 4000, server.ranges  # what the trickle sent in its window
    assert downloader.last_source == f"{server.url}/good/{DIGEST}"
    # Left for this artifact: the next fetch does not ask it again.
    asked = len(server.ranges)
    list(downloader.fetch(DIGEST, len(DATA) - 10))
    assert server.ranges[asked:] == [f"bytes={len(DATA) - 10}-"]


def test_under_a_low_rate_cap_the_floor_stays_below_the_cap(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cap of 1,500 bytes/s paces reads to it: the floor (half the cap,
    750) must not call that slow. The trickle (1,000/s) is kept."""
    monkeypatch.setattr(http_download, "SLOW_WINDOW_S", 1.0)
    downloader = _downloader(
        [f"{server.url}/trickle", f"{server.url}/good"], min_mirror_rate=4096,
        max_rate=lambda: 1500,
    )  # fmt: skip
    got = 0
    for chunk in downloader.fetch(DIGEST, 0):
        got += len(chunk.data)
        if got >= 3000:  # three windows in: still on the trickle
            break
    assert server.ranges == [""]
    assert downloader.last_source == f"{server.url}/trickle/{DIGEST}"


def test_paced_reads_keep_the_wire_near_the_cap(server: Server) -> None:
    """Reads paced at 256 KiB/s for 3 s: TCP's window follows what the agent
    reads, so the server's writes stay within its own send buffer and the
    socket's receive buffer of them (a server's log can say it sent a
    file long before the bytes crossed: its send buffer counts as sent)."""
    cap = 256 * 1024
    inner = HttpDownloader(
        lambda: [(f"{server.url}/big", False)], NoFallback(), lambda: "", lambda: None,
        stall_s=10, max_rate=lambda: cap, min_mirror_rate=0,
    )  # fmt: skip
    consumed, started = 0, time.monotonic()
    fetch = RateLimitedDownloader(inner, lambda: cap).fetch(hashlib.sha256(b"big").hexdigest(), 0)
    for chunk in fetch:
        consumed += len(chunk.data)
        if time.monotonic() - started >= 3.0:
            break
    took = time.monotonic() - started
    written = server.written[-1]
    fetch.close()
    # The cap, plus the bucket and the read not yet paid for (64 KiB each).
    assert consumed <= cap * took + 2 * 64 * 1024, (consumed, took)
    # The server's 64 KiB send buffer (doubled by Linux) and the client's
    # receive buffer: well under a megabyte ahead of the reads.
    assert written - consumed < 512 * 1024, (written, consumed)
