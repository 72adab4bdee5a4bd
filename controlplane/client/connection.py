"""How an operator reaches the control plane: address, bearer token, TLS
trust, and the channels and stubs made from them (blocking and asyncio)."""

from __future__ import annotations

import contextlib
import errno
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from edgefleet.v1 import operator_pb2_grpc

DEFAULT_SERVER = "127.0.0.1:7443"
CHANNEL_OPTIONS = [
    # Generous message limit so model uploads can use 1 MiB chunks with headroom.
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # A watch or the TUI sees a restarted control plane within seconds: gRPC's
    # default backoff grows to 120 s between tries to reconnect.
    ("grpc.max_reconnect_backoff_ms", 5_000),
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


@dataclass
class Connection:
    """The settings an operator connects with: the control plane's address,
    the operator token sent on every call, and the CA certificate to trust
    (TLS) or None (plain text). The blocking stub (and its channel) is made
    on first use and kept; the other channels are new on every call."""

    server: str
    token: str | None
    ca_cert: Path | None = None
    # Where `server` came from, in words an error can end with ("the
    # default", "context 'lab'"); empty when the caller named it.
    # (Neither is part of what the connection is: equal settings compare equal.)
    origin: str = field(default="", compare=False)
    # The context the settings came from, if any.
    context: str = field(default="", compare=False)
    # The context in use that was left out because --server named another
    # server (its token is not sent elsewhere): what an UNAUTHENTICATED for
    # a missing token should mention.
    set_aside: str = field(default="", compare=False)
    _stub: operator_pb2_grpc.OperatorServiceStub | None = field(default=None, repr=False)

    @property
    def stub(self) -> operator_pb2_grpc.OperatorServiceStub:
        if self._stub is None:
            self._stub = operator_stub(self.server, self.token, self.ca_cert)
        return self._stub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What an asyncio call passes to carry the token (nothing without one)."""
        return bearer_metadata(self.token) if self.token else ()

    def channel(self) -> grpc.Channel:
        """A new blocking channel sending the token on every call; the caller
        closes it."""
        return operator_channel(self.server, self.token, self.ca_cert)

    def aio_channel(self) -> grpc.aio.Channel:
        """A new asyncio channel, on the running event loop; calls pass
        `metadata`. The caller closes it."""
        return operator_aio_channel(self.server, self.ca_cert)
