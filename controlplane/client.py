"""Operator-side connection helpers shared by the CLI, the TUI and tests.
Imports no server code (no database, no servicers)."""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from edgefleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc

DEFAULT_SERVER = "127.0.0.1:7443"
# Generous message limit so model uploads can use 1 MiB chunks with headroom.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Metadata carrying a bearer token, for callers that pass it per call."""
    return (("authorization", f"Bearer {token}"),)


class _AddMetadata(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds the bearer token to every call. An interceptor rather than call
    credentials: those refuse plain-text channels, and the token must travel
    the same way on both."""

    def __init__(self, token: str) -> None:
        self._metadata = bearer_metadata(token)

    def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or ()) + list(self._metadata)
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def tls_credentials(ca_cert: Path | None) -> grpc.ChannelCredentials | None:
    """Channel credentials that trust the control plane's CA (its data
    directory's ca.pem); None for plain text (no CA given). OSError when the
    file cannot be read or holds no PEM certificate (the CLI prints it as one
    line; gRPC would fail every call with "Failed to create security
    handshaker")."""
    if ca_cert is None:
        return None
    pem = ca_cert.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise OSError(
            errno.EINVAL,
            "not a PEM certificate: pass the ca.pem from the control plane's data directory",
            str(ca_cert),
        )
    return grpc.ssl_channel_credentials(root_certificates=pem)


OMITTED_TRAILER = "edgefleet-omitted-items"


class _WarnOmitted(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Says on stderr when a listing came back shortened: the control plane
    keeps every answer within a client's receive limit and counts the rows it
    left out in a trailer (api/rpc.py), which a stub's plain call drops."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        with contextlib.suppress(grpc.RpcError):  # the caller sees the error itself
            omitted = dict(outcome.trailing_metadata() or ()).get(OMITTED_TRAILER)
            if omitted:
                method = str(details.method).rsplit("/", 1)[-1]
                print(
                    f"warning: {method} left out {omitted} item(s) to keep the answer within "
                    "the message size limit (this listing does not page yet; the command's "
                    "filters, where it has any, narrow it)",
                    file=sys.stderr,
                )
        return outcome


def operator_channel(server: str, token: str | None, ca_cert: Path | None = None) -> grpc.Channel:
    """A blocking channel to the control plane that sends `token` on every
    call: TLS trusting `ca_cert`, or plain text without one."""
    credentials = tls_credentials(ca_cert)
    if credentials is None:
        channel = grpc.insecure_channel(server, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.secure_channel(server, credentials, options=CHANNEL_OPTIONS)
    channel = grpc.intercept_channel(channel, _WarnOmitted())
    if token:
        channel = grpc.intercept_channel(channel, _AddMetadata(token))
    return channel


def operator_aio_channel(server: str, ca_cert: Path | None = None) -> grpc.aio.Channel:
    """An asyncio channel (TLS trusting `ca_cert`, or plain text); callers
    pass the token per call."""
    credentials = tls_credentials(ca_cert)
    if credentials is None:
        return grpc.aio.insecure_channel(server, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(server, credentials, options=CHANNEL_OPTIONS)


def operator_stub(
    server: str, token: str | None, ca_cert: Path | None = None
) -> operator_pb2_grpc.OperatorServiceStub:
    """An OperatorService stub on a new channel (see operator_channel)."""
    return operator_pb2_grpc.OperatorServiceStub(operator_channel(server, token, ca_cert))


@dataclass(frozen=True)
class TlsProbe:
    """What a TLS handshake of our own found at a control plane's address."""

    # True: it completed a TLS handshake; False: it answered, but not with
    # TLS; None: nothing answered (down, refused, unreachable, not host:port).
    serves_tls: bool | None
    # Why its certificate does not verify against the CA we were given.
    untrusted: str | None = None


def probe_tls(server: str, ca_cert: Path | None, timeout: float = 3.0) -> TlsProbe:
    """Shake hands with `server` over TLS, for a call that found it
    UNAVAILABLE: gRPC reports a plain-text client at a TLS server as
    "Socket closed" and the reverse as an OpenSSL error, which name neither
    side's mistake. Python's ssl says which it is: whether the server speaks
    TLS at all (certificate unchecked) and, given `ca_cert`, whether its
    certificate verifies for the host as gRPC checks it."""
    address = _host_port(server)
    if address is None:
        return TlsProbe(None)
    host, port = address
    anything = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anything.check_hostname = False
    anything.verify_mode = ssl.CERT_NONE
    serves = _handshake(address, anything, timeout)
    if not serves or ca_cert is None:
        return TlsProbe(serves)
    try:
        trusted = ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError):
        return TlsProbe(True)  # the client itself reports an unreadable CA file
    trusted.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout) as raw,
            trusted.wrap_socket(raw, server_hostname=host),
        ):
            return TlsProbe(True)
    except ssl.SSLCertVerificationError as err:
        return TlsProbe(True, err.verify_message or str(err))
    except (OSError, ssl.SSLError):
        return TlsProbe(True)


def _handshake(address: tuple[str, int], context: ssl.SSLContext, timeout: float) -> bool | None:
    """True if `address` completes a TLS handshake, False if it answers
    otherwise, None if it cannot be reached."""
    context.set_alpn_protocols(["h2"])  # as a gRPC client offers
    try:
        raw = socket.create_connection(address, timeout)
    except OSError:
        return None
    try:
        with context.wrap_socket(raw, server_hostname=address[0]):
            return True
    except (ssl.SSLError, ConnectionError):
        return False  # a plain-text HTTP/2 server answers with frames, or hangs up
    except OSError:
        return None  # timed out: it said nothing either way
    finally:
        raw.close()


def _host_port(server: str) -> tuple[str, int] | None:
    """host and port of a `host:port` target (also `[v6]:port`, `dns:///…`);
    None for other gRPC targets (unix:, xds:…)."""
    target = server.removeprefix("dns:///")
    if "://" in target or target.startswith("unix:"):
        return None
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


# Devices per ListDevices page: the most the control plane sends in one.
DEVICE_PAGE_SIZE = 1000


def list_devices(
    stub: operator_pb2_grpc.OperatorServiceStub, request: operator_pb2.ListDevicesRequest
) -> list[common_pb2.Device]:
    """Every device `request` matches, page after page."""
    request.page_size = DEVICE_PAGE_SIZE
    listed: list[common_pb2.Device] = []
    while _took_page(listed, request, stub.ListDevices(request)):
        pass
    return listed


async def list_devices_async(
    call: Callable[[operator_pb2.ListDevicesRequest], Awaitable[operator_pb2.ListDevicesResponse]],
    request: operator_pb2.ListDevicesRequest,
) -> list[common_pb2.Device]:
    """list_devices over an asyncio stack: `call` is the ListDevices RPC."""
    request.page_size = DEVICE_PAGE_SIZE
    listed: list[common_pb2.Device] = []
    while _took_page(listed, request, await call(request)):
        pass
    return listed


def _took_page(
    listed: list[common_pb2.Device],
    request: operator_pb2.ListDevicesRequest,
    page: operator_pb2.ListDevicesResponse,
) -> bool:
    """Add `page` to `listed`; True if another follows, `request` now
    asking for it."""
    listed += page.devices
    request.page_token = page.next_page_token
    return bool(page.next_page_token)
