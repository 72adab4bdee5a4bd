"""Operator-side connection helpers shared by the CLI, the TUI and tests.
Imports no server code (no database, no servicers)."""

from __future__ import annotations

from typing import Any

import grpc

from edgefleet.v1 import operator_pb2_grpc

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
    """Adds the bearer token to every call on a plain-text channel (call
    credentials require TLS, which issue 7 brings)."""

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


def operator_channel(server: str, token: str | None) -> grpc.Channel:
    """A blocking channel to the control plane that sends `token` on every call."""
    channel = grpc.insecure_channel(server, options=CHANNEL_OPTIONS)
    if token:
        channel = grpc.intercept_channel(channel, _AddMetadata(token))
    return channel


def operator_stub(server: str, token: str | None) -> operator_pb2_grpc.OperatorServiceStub:
    """An OperatorService stub on a new channel (see operator_channel)."""
    return operator_pb2_grpc.OperatorServiceStub(operator_channel(server, token))
