"""A TCP proxy on loopback for fault-injection tests: it relays between the
agents and the control plane and drops connections on demand.

- `cut_all()` resets every live connection (RST, as a dead link or a NAT
  timeout looks to both ends);
- `cut_after_bytes`: each connection stops once it carried that many bytes
  towards the client and is reset 0.2 s later, so a long download can only
  finish by resuming;
- `offline()` / `online()`: while offline, live connections are reset and
  new ones are accepted and reset at once (the network is down);
- `down_bytes_per_s`: a slow link towards the client, so a download is
  still under way when the test does something to the device.

Counters (`connections`, `cuts`, `bytes_down`, `bytes_up`) say what went
through. One thread accepts; each connection is relayed by a thread of its
own with select(), so a cut is a flag and a close, never a race between two
pumps."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

_BLOCK = 64 * 1024
_POLL_S = 0.05
_CUT_GRACE_S = 0.2


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class ProxyStats:
    """What went through the proxy so far."""

    connections: int = 0  # accepted and connected upstream
    refused: int = 0  # accepted while offline and reset at once
    cuts: int = 0  # live connections reset by cut_all, offline or cut_after_bytes
    bytes_down: int = 0  # upstream -> client
    bytes_up: int = 0  # client -> upstream


class _Link:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.down = 0
        self.cut = threading.Event()


class TcpProxy:
    """Listens on 127.0.0.1 (a free port) and relays to `upstream`
    ("host:port"). Use as a context manager or start()/close()."""

    def __init__(
        self,
        upstream: str,
        *,
        cut_after_bytes: int | None = None,
        down_bytes_per_s: float | None = None,
    ) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host or "127.0.0.1", int(port))
        self.cut_after_bytes = cut_after_bytes
        self.down_bytes_per_s = down_bytes_per_s
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._offline = False
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL_S)
        self.port = int(self._listener.getsockname()[1])
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._spawn(self._accept, "proxy-accept")
        return self

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        self.cut_all()
        with contextlib.suppress(OSError):
            self._listener.close()
        for thread in self._threads:
            thread.join(5)

    # ------------------------------------------------------------ faults

    def cut_all(self) -> int:
        """Reset every live connection; how many there were."""
        with self._lock:
            links = list(self._links)
        for link in links:
            self._cut(link)
        return len(links)

    def offline(self) -> None:
        """The network goes down: cut everything, refuse what comes next."""
        with self._lock:
            self._offline = True
        self.cut_all()

    def online(self) -> None:
        with self._lock:
            self._offline = False

    @property
    def live(self) -> int:
        """Connections open now."""
        with self._lock:
            return len(self._links)

    # ------------------------------------------------------------ relaying

    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                offline = self._offline
            if offline:
                with self._lock:
                    self.stats.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)  # the control plane is down: so is the link
                continue
            for sock in (client, upstream):
                sock.setblocking(True)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            with self._lock:
                self._links.add(link)
                self.stats.connections += 1
            self._spawn(self._relay, "proxy-relay", link)

    def _cut(self, link: _Link) -> None:
        with self._lock:
            if link not in self._links:
                return
            self._links.discard(link)
            self.stats.cuts += 1
        link.cut.set()
        _reset(link.client)
        _reset(link.upstream)

    def _close(self, link: _Link) -> None:
        """An orderly end: one side closed its end."""
        with self._lock:
            if link not in self._links:
                return
            self._links.discard(link)
        for sock in (link.client, link.upstream):
            with contextlib.suppress(OSError):
                sock.close()

    def _relay(self, link: _Link) -> None:
        peers = {link.client: link.upstream, link.upstream: link.client}
        while not link.cut.is_set():
            try:
                readable, _, _ = select.select(list(peers), [], [], _POLL_S)
                for sock in readable:
                    data = sock.recv(_BLOCK)
                    if not data:
                        self._close(link)
                        return
                    if sock is link.upstream:
                        data = self._limit(link, data)
                        rate = self.down_bytes_per_s
                        if rate:
                            time.sleep(len(data) / rate)
                    peers[sock].sendall(data)
                    with self._lock:
                        if sock is link.upstream:
                            self.stats.bytes_down += len(data)
                        else:
                            self.stats.bytes_up += len(data)
                    limit = self.cut_after_bytes
                    if sock is link.upstream and limit is not None and link.down >= limit:
                        # A link that died after carrying these bytes: the
                        # client may read them before the reset (an instant
                        # RST would also purge its unread socket buffer).
                        link.cut.wait(_CUT_GRACE_S)
                        self._cut(link)
                        return
            except (OSError, ValueError):  # cut meanwhile, or the peer reset
                self._close(link)
                return

    def _limit(self, link: _Link, data: bytes) -> bytes:
        """The part of `data` this connection may still carry downstream."""
        limit = self.cut_after_bytes
        if limit is not None:
            data = data[: max(0, limit - link.down)]
        link.down += len(data)
        return data


__all__ = ["ProxyStats", "TcpProxy"]
