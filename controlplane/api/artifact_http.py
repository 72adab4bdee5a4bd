"""Artifacts over HTTP: `GET /v1/artifacts/<digest>` (and HEAD) beside the
device port, with byte ranges, so that agents download with any HTTP
client, resume with Range and the kernel copies the bytes (sendfile) where
gRPC streaming copied every chunk through Python.

The same rules as DeviceService.DownloadArtifact: the device's credential
(`Authorization: Bearer ...`) and, when the control plane serves TLS, its
own client certificate (the listener asks for one and refuses a handshake
without it); only blobs built for the device's class; only verified bytes
(BlobStore.open). Errors are plain text a person can act on, with the
status an HTTP client expects: 400, 401, 403, 404, 416, 429, 503.

An adapter: aiohttp here, the decisions in services/artifacts.py and
domain/byte_ranges.py."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
    # Called with (status, bytes sent) after each request (metrics).
    observe: Callable[[int, int], None] = lambda status, sent: None
    # Downloads sending at once on this replica; over it, 429 with
    # Retry-After (agents back off and resume): a rollout of a large
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
            self.observe(status, 0)
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
            try:
                part = requested(
                    request.headers.get("Range"), blob.size,
                    if_range=request.headers.get("If-Range"), etag=etag,
                )  # fmt: skip
            except Unsatisfiable as exc:
                self.observe(416, 0)
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
                self.observe(response.status, 0)
                return response
            if self.max_concurrent and self._sending >= self.max_concurrent:
                self.observe(429, 0)
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
            self.observe(response.status, part.length)
            return response

    async def _send(
        self, request: web.Request, response: web.StreamResponse, blob: BlobFile,
        offset: int, count: int,
    ) -> None:  # fmt: skip
        """The bytes by sendfile (asyncio copies them itself through TLS),
        as aiohttp's FileResponse sends a file, but from the descriptor that
        was verified. A blob that changed on disk meanwhile cannot be
        unsent: the connection is cut short, so the client sees a short body
        (fewer bytes than Content-Length) and resumes; the next open
        verifies the file again."""
        await response.prepare(request)
        transport = request.transport
        assert transport is not None
        await asyncio.get_running_loop().sendfile(transport, blob.file, offset, count)
        if not blob.unchanged():
            transport.abort()
            return
        await response.write_eof()


def _peer_pem(request: web.Request) -> bytes | None:
    """The client certificate the TLS handshake verified, as PEM."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return ssl.DER_cert_to_PEM_cert(der).encode() if der else None


def mutual_tls_context(cert_file: str, key_file: str, ca_pem: bytes) -> ssl.SSLContext:
    """The device port's TLS for HTTP: our certificate, and a client
    certificate from our CA required (no certificate, no handshake)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    context.load_verify_locations(cadata=ca_pem.decode())
    context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start(
    handler: ArtifactHttp, host: str, port: int, *, ssl_context: ssl.SSLContext | None,
    reuse_port: bool = False,
) -> tuple[web.AppRunner, int]:  # fmt: skip
    """Listen; the runner (to clean up) and the bound port."""
    runner = web.AppRunner(handler.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(
        runner, host or None, port, ssl_context=ssl_context, reuse_port=reuse_port or None
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port} for artifact downloads: {exc}") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, int(bound)
