"""The one place where RPCs are authenticated, timed, and where domain errors
become gRPC status codes. Servicers never call context.abort themselves."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, ParamSpec, TypeVar

import grpc
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Histogram

from edgefleet.controlplane.api import limits, paging
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import pki, roles
from edgefleet.controlplane.errors import (
    AlreadyExists,
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

log = logging.getLogger(__name__)

STATUS_OF: dict[type[DomainError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    DataLoss: grpc.StatusCode.DATA_LOSS,
}

P = ParamSpec("P")
T = TypeVar("T")


class RpcMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "edgefleet_rpc_total", "RPCs handled", ["method", "code"], registry=registry
        )
        self.latency = Histogram(
            "edgefleet_rpc_seconds",
            "RPC handling time (streams: until the stream ends)",
            ["method"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
        )

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.calls.labels(method, code.name).inc()
        self.latency.labels(method).observe(seconds)


class Handlers:
    """Base of the servicers: what the rpc decorator needs."""

    def __init__(
        self, db: Database, executor: ThreadPoolExecutor, metrics: RpcMetrics,
        credentials: auth.DeviceCredentials | None = None,
        peer_certificates: PeerCertificates | None = None,
    ) -> None:  # fmt: skip
        self.db = db
        self._executor = executor
        self.metrics = metrics
        self._credentials = credentials
        # Set when the control plane serves mutual TLS: device RPCs then need
        # the device's own client certificate as well as its credential.
        self._peer_certificates = peer_certificates

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run blocking service code (SQL, file I/O) off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def authenticate(self, kind: str, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if kind == "none":
            return None
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        if kind == "operator":
            return await self.run(auth.authenticate_operator, self.db, authorization)
        credentials = self._credentials
        if credentials is None:
            device = await self.run(auth.authenticate_device, self.db, authorization)
        else:
            hit = credentials.cached(authorization)
            device = (
                hit if hit is not None else await self.run(credentials.authenticate, authorization)
            )
        if self._peer_certificates is not None:
            self._peer_certificates.check(device, context)
        return device


class PeerCertificates:
    """Binds a device's credential to its client certificate. TLS has
    already verified the certificate chains to our CA and has not expired;
    this checks it names the device the credential belongs to and is one
    the device may still use (re-enrolling revokes earlier ones). Parsed
    certificates are remembered by their bytes: a long-lived stream's
    certificate is parsed once, not on every telemetry upload."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self._parsed: dict[bytes, pki.DeviceCertificateInfo] = {}
        self._max = max_entries

    def _info(self, pem: bytes) -> pki.DeviceCertificateInfo:
        info = self._parsed.get(pem)
        if info is None:
            try:
                info = pki.device_certificate_info(pem)
            except pki.CertificateError as exc:
                raise Unauthenticated(f"client certificate refused: {exc}") from None
            if len(self._parsed) >= self._max:
                self._parsed.clear()
            self._parsed[pem] = info
        return info

    def check(self, device: auth.DevicePrincipal, context: Any) -> None:
        """Raise unless the caller's TLS client certificate is `device`'s."""
        pems = (context.auth_context() or {}).get("x509_pem_cert") or ()
        self.check_pem(device, pems[0] if pems else None)

    def check_pem(self, device: auth.DevicePrincipal, pem: bytes | None) -> None:
        """`check` for a certificate already taken from the connection."""
        if not pem:
            raise Unauthenticated(
                "device RPCs need the device's client certificate: connect to the "
                "control plane's device port with mutual TLS (the certificate is issued "
                "at enrollment)"
            )
        info = self._info(pem)
        if info.device_id != device.device_id:
            raise PermissionDenied(
                f"the client certificate is device {info.device_id}'s, the credential "
                f"device {device.device_id}'s"
            )
        if info.serial not in device.cert_serials:
            raise Unauthenticated(
                f"client certificate {info.serial} of device {device.device_id} was "
                "replaced (the device enrolled again); use the current one"
            )


Auth = Literal["none", "operator", "device"]


# Status details travel in a trailer, percent-encoded past ASCII: one that
# echoes a long input past the client's metadata limit (16 KiB) reaches it as
# RESOURCE_EXHAUSTED, not as its status. Bytes of UTF-8, so at most 3 KiB.
MAX_DETAILS = 1024
# Trailing metadata key of a refusal that will pass later (a rate limit):
# whole milliseconds to wait, in decimal.
RETRY_AFTER_MS = "retry-after-ms"


def _clip(message: str) -> str:
    data = message.encode()
    if len(data) <= MAX_DETAILS:
        return message
    kept = data[:MAX_DETAILS].decode(errors="ignore")
    return f"{kept}... ({len(message)} characters)"


async def _fail(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, DomainError):
        code = STATUS_OF.get(type(exc), grpc.StatusCode.INVALID_ARGUMENT)
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s is not None:
            # A plain trailer, not google.rpc.RetryInfo in grpc-status-details-bin:
            # reading it needs no googleapis-common-protos on the devices.
            retry = ((RETRY_AFTER_MS, str(math.ceil(retry_after_s * 1000))),)
            await context.abort(code, _clip(exc.message), retry)
        await context.abort(code, _clip(exc.message))
    log.exception("unexpected error in RPC")
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the control-plane log")
    raise AssertionError("unreachable")


def _code_of(exc: BaseException | None, context: Any) -> grpc.StatusCode:
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, DomainError):
        return STATUS_OF.get(type(exc), grpc.StatusCode.UNKNOWN)
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.INTERNAL


@contextlib.asynccontextmanager
async def _guarded(handlers: Handlers, method: str, context: Any) -> AsyncIterator[None]:
    """Time the RPC and turn what it raises into its status."""
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:
        error = exc
        if isinstance(exc, DomainError) or not _is_abort(exc):
            await _fail(context, exc)
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        handlers.metrics.observe(method, _code_of(error, context), time.perf_counter() - started)


def rpc(
    auth_kind: Auth, role: str = roles.OPERATOR
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a servicer method `(self, request, context, principal)`:
    authenticate (operator RPCs: and check the token's role allows `role`),
    check a request message against the field limits (api/limits.py; a
    stream's messages are the handler's to check), keep a unary response
    within the response size (paging.fit), time, and map errors. Works for
    unary and streaming handlers (async generators too)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        method = fn.__name__

        async def authorized(self: Handlers, request: Any, context: Any) -> Any:
            principal = await self.authenticate(auth_kind, context)
            if auth_kind == "operator" and not roles.allows(principal.role, role):
                raise PermissionDenied(
                    f"{method} needs the {role} role; operator token {principal.name!r} "
                    f"has {principal.role}"
                )
            # After authentication, so a stranger learns nothing from it;
            # before the service, so nothing unstorable reaches the database.
            if isinstance(request, Message):
                limits.check(request)
            return principal

        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def stream_wrapper(self: Handlers, request: Any, context: Any) -> Any:
                async with _guarded(self, method, context):
                    principal = await authorized(self, request, context)
                    async for item in fn(self, request, context, principal):
                        yield item

            return stream_wrapper

        @functools.wraps(fn)
        async def wrapper(self: Handlers, request: Any, context: Any) -> Any:
            async with _guarded(self, method, context):
                principal = await authorized(self, request, context)
                response = await fn(self, request, context, principal)
                if isinstance(response, Message):
                    _fit(method, response, context)
                return response

        return wrapper

    return decorate


def _fit(method: str, response: Message, context: Any) -> None:
    """Keep `response` within what a client can receive (paging.fit). Rows
    it leaves out are counted in the `edgefleet-omitted-items` trailer (the
    lists without a page token have nowhere else to say so) and logged."""
    dropped = paging.fit(response)
    if dropped:
        log.warning(
            "%s: %d item(s) left out to keep the response within %d bytes",
            method, dropped, paging.MAX_RESPONSE_BYTES,
        )  # fmt: skip
        context.set_trailing_metadata((("edgefleet-omitted-items", str(dropped)),))


def _is_abort(exc: BaseException) -> bool:
    """grpc.aio raises AbortError from context.abort; let it through."""
    return type(exc).__name__ == "AbortError"
