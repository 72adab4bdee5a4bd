"""Artifacts over HTTP: `GET /v1/artifacts/<digest>` (and HEAD) beside the
device port, with byte ranges, so that agents download with any HTTP
client, resume with Range and the kernel copies the bytes (sendfile) where
gRPC streaming copied every chunk through Python.

The same rules as DeviceService.DownloadArtifact: the device's credential
(`Authorization: Bearer ...`) and, when the control plane serves TLS, its
own client certificate (the listener asks for one and refuses a handshake
without it); only blobs built for the device's class; only verified bytes
(BlobStore.open). Errors are plain text a person can act on, with the
status an HTTP client expects: 400, 401, 403, 404, 416, 429 (busy, with
Retry-After), 500 (the stored copy is damaged), 503; 304 for If-None-Match.

An adapter: aiohttp here, the decisions in services/artifacts.py and
domain/byte_ranges.py."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from edgefleet.controlplane.api.rpc import PeerCertificates
from edgefleet.controlplane.domain.byte_ranges import Unsatisfiable, requested
from edgefleet.controlplane.errors import (
    DataLoss,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from edgefleet.controlplane.services import auth
from edgefleet.controlplane.services.artifacts import ArtifactService
from edgefleet.controlplane.services.blobstore import BlobFile
from edgefleet.fsutil import atomic_write

log = logging.getLogger(__name__)

ROUTE = "/v1/artifacts/{digest}"

_STATUS: dict[type[DomainError], int] = {
    InvalidArgument: 400,
    Unauthenticated: 401,
    PermissionDenied: 403,
    # Not accepted (pending, rejected): refused as DownloadArtifact refuses it.
    FailedPrecondition: 403,
    NotFound: 404,
    OutOfRange: 416,
    ResourceExhausted: 429,
    Unavailable: 503,
    # The stored copy is damaged (quarantined): nothing to resume from here.
    DataLoss: 500,
}


@dataclass
class ArtifactHttp:
    """The handler's collaborators: who the caller is, what it may read."""

    artifacts: ArtifactService
    credentials: auth.DeviceCredentials
    executor: ThreadPoolExecutor
    # Set when the control plane serves mutual TLS.
    peer_certificates: PeerCertificates | None = None
    # Downloads sending at once on this replica; over it, 429 with
    # Retry-After (agents wait their turn): a rollout of a large
    # artifact to thousands of devices queues instead of saturating the
    # link. 0: no limit.
    max_concurrent: int = 0
    retry_after_s: int = 5
    _sending: int = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        app.router.add_get(ROUTE, self.get)  # also answers HEAD
        return app

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except DomainError as exc:
            status = _STATUS.get(type(exc), 500)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
            return web.Response(status=status, text=f"{exc}\n", headers=headers)

    async def _device(self, request: web.Request) -> auth.DevicePrincipal:
        authorization = request.headers.get("Authorization")
        if not authorization:
            raise Unauthenticated(
                "no credential: send the device credential as 'Authorization: Bearer <credential>'"
            )
        cached = self.credentials.cached(authorization)
        device: auth.DevicePrincipal = (
            cached
            if cached is not None
            else await self._run(self.credentials.authenticate, authorization)
        )
        if self.peer_certificates is not None:
            self.peer_certificates.check_pem(device, _peer_pem(request))
        return device

    async def get(self, request: web.Request) -> web.StreamResponse:
        device = await self._device(request)
        digest = request.match_info["digest"]
        blob: BlobFile = await self._run(self.artifacts.open_for_device, device.device_id, digest)
        with blob:
            etag = f'"{blob.digest}"'
            if {etag, "*"} & _etags(request.headers.get("If-None-Match")):
                return web.Response(status=304, headers={"ETag": etag})
            try:
                part = requested(
                    request.headers.get("Range"), blob.size,
                    if_range=request.headers.get("If-Range"), etag=etag,
                )  # fmt: skip
            except Unsatisfiable as exc:
                return web.Response(
                    status=416, text=f"{exc}\n",
                    headers={"Content-Range": f"bytes */{blob.size}"},
                )  # fmt: skip
            response = web.StreamResponse(status=206 if part.partial else 200)
            response.headers.update({
                "Content-Type": "application/octet-stream",
                "ETag": etag,
                "Accept-Ranges": "bytes",
                # Content-addressed: these bytes never change under this name.
                "Cache-Control": "private, max-age=31536000, immutable",
            })  # fmt: skip
            if part.partial:
                response.headers["Content-Range"] = part.content_range()
            response.content_length = part.length if blob.size else 0
            if request.method == "HEAD" or blob.size == 0:
                await response.prepare(request)
                await response.write_eof()
                return response
            if self.max_concurrent and self._sending >= self.max_concurrent:
                return web.Response(
                    status=429,
                    text=f"{self._sending} downloads are under way (the limit); try again in "
                    f"{self.retry_after_s} s\n",
                    headers={"Retry-After": str(self.retry_after_s)},
                )
            self._sending += 1
            try:
                await self._send(request, response, blob, part.start, part.length)
            finally:
                self._sending -= 1
            return response

    async def _send(
        self, request: web.Request, response: web.StreamResponse, blob: BlobFile,
        offset: int, count: int,
    ) -> None:  # fmt: skip
        """Plain text: the kernel's sendfile from the descriptor that was
        verified, as aiohttp's FileResponse sends a file. TLS: chunks through
        aiohttp's writer (TLS copies every byte in userspace anyway, and
        asyncio's own sendfile fallback over an SSL transport left the last
        bytes unsent until the client timed out). A blob that changed on
        disk meanwhile cannot be unsent: the connection is cut short, so the
        client sees a short body and resumes; the next open verifies the
        file again."""
        await response.prepare(request)
        transport = request.transport
        assert transport is not None
        if transport.get_extra_info("sslcontext") is None:
            await asyncio.get_running_loop().sendfile(transport, blob.file, offset, count)
            if not blob.unchanged():
                transport.abort()
                return
        else:
            end = offset + count
            try:
                while offset < end:
                    # pread, checked against the verified version after it.
                    data = blob.read(offset, min(COPY_BYTES, end - offset))
                    await response.write(data)
                    offset += len(data)
            except Unavailable:
                transport.abort()
                return
        await response.write_eof()


def _etags(header: str | None) -> set[str]:
    """The entity tags an If-None-Match header lists (weak ones compare as
    strong: these bytes never change under their name)."""
    if not header:
        return set()
    tags = {tag.strip().removeprefix("W/") for tag in header[:4096].split(",")}
    return tags


def _peer_pem(request: web.Request) -> bytes | None:
    """The client certificate the TLS handshake verified, as PEM."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return ssl.DER_cert_to_PEM_cert(der).encode() if der else None


def mutual_tls_context(key_pem: bytes, certificate_pem: bytes, ca_pem: bytes) -> ssl.SSLContext:
    """The device port's TLS for HTTP: our certificate, and a client
    certificate from our CA required (no certificate, no handshake).
    Python's ssl loads a key only from a file: this process's own, in a
    private temporary directory, gone once loaded (the workers of one
    server each make their own key and must not share files)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="edgefleet-tls-") as directory:
        key_file, cert_file = Path(directory) / "key.pem", Path(directory) / "cert.pem"
        atomic_write(key_file, key_pem)
        atomic_write(cert_file, certificate_pem)
        context.load_cert_chain(cert_file, key_file)
    context.load_verify_locations(cadata=ca_pem.decode())
    context.verify_mode = ssl.CERT_REQUIRED
    return context


# Connections held at once, handshakes included: asyncio gives each TLS
# connection a 256 KiB buffer from its accept on, so 8,800 idle connections
# that never sent a ClientHello took 3.5 GB (a stranger's try). Over the cap
# a connection is closed as it is accepted (the agent falls back to the
# device port's DownloadArtifact).
MAX_CONNECTIONS = 512
# Bytes per write over TLS.
COPY_BYTES = 256 * 1024
# A TLS handshake not done by then is dropped (asyncio's default: 60 s).
HANDSHAKE_TIMEOUT_S = 10.0


class _CappedListener(socket.socket):
    """A listening socket whose accept() refuses connections over `cap`:
    each accepted one is counted until its transport closes it (asyncio
    calls close() on the accepted socket object it was given)."""

    cap = MAX_CONNECTIONS
    refused = 0
    live = 0

    def accept(self) -> tuple[socket.socket, Any]:
        fd, address = self._accept()  # type: ignore[attr-defined]
        conn = _CountedConnection(self.family, self.type, self.proto, fileno=fd)
        if type(self).live >= self.cap:
            conn.close()
            type(self).refused += 1
            # asyncio stops this accept round and waits for the next event.
            raise ConnectionAbortedError("artifact downloads: too many connections")
        type(self).live += 1
        conn.listener = type(self)
        return conn, address


class _CountedConnection(socket.socket):
    listener: type[_CappedListener] | None = None

    def close(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.live -= 1
        super().close()


class _Site(web.SockSite):
    """SockSite with a TLS handshake timeout of our own."""

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if self._ssl_context else None,
        )  # fmt: skip


def _listener(host: str, port: int, reuse_port: bool, cap: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # A class per listener: its count is its own.
    listener_type: type[_CappedListener] = type(
        "Listener", (_CappedListener,), {"cap": cap, "live": 0, "refused": 0}
    )
    sock = listener_type(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]") or "0.0.0.0", port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def start(
    handler: ArtifactHttp, host: str, port: int, *, ssl_context: ssl.SSLContext | None,
    reuse_port: bool = False, max_connections: int = MAX_CONNECTIONS,
) -> tuple[web.AppRunner, int]:  # fmt: skip
    """Listen; the runner (to clean up) and the bound port."""
    try:
        sock = _listener(host, port, reuse_port, max_connections)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port} for artifact downloads: {exc}") from None
    runner = web.AppRunner(handler.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = _Site(runner, sock, ssl_context=ssl_context, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for artifact downloads: {exc}") from None
    return runner, int(sock.getsockname()[1])
