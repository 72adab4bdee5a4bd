"""A gRPC-level relay of the device service, for man-in-the-middle tests.

It terminates the agent's connection (plain text, or TLS with whatever
certificate the test gives it: the attacker's own) and forwards every
DeviceService method to the control plane as raw bytes, so it relays RPCs
added later too and changes nothing it is not told to. On Sync it parses
what the control plane pushes: each desired state is recorded (per device,
before any rewriting), then handed to `rewrite`, which may return it
edited, another message, or None to drop it. Every call that reached a
handler is counted in `calls`: a call that failed its TLS handshake never
gets here.

grpc.aio, on an event loop of its own in a daemon thread, so a synchronous
test drives it: `rewrite` runs on that loop, and must not block."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from edgefleet.controlplane.domain.secrets import SecretKind, parse_id
from edgefleet.v1 import device_pb2 as d

SERVICE = d.DESCRIPTOR.services_by_name["DeviceService"]
# Upstream chunks are 1 MiB; the control plane allows 8 MiB messages.
_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
]

# A handler's context: the relay never parses requests, nor most responses.
Context = grpc.aio.ServicerContext[bytes, bytes]
# (device id, what the control plane sent): what the agent gets, or None.
Rewrite = Callable[[str, d.ControlMessage], d.ControlMessage | None]


def _device_of(metadata: Any) -> str:
    """The device id a call's bearer credential names ("" if none)."""
    for key, value in metadata or ():
        if key == "authorization" and value.startswith("Bearer "):
            return parse_id(SecretKind.DEVICE, value.removeprefix("Bearer ")) or ""
    return ""


def _sequences(desired: d.DesiredState) -> set[int]:
    """The assignment sequences a desired state carries, in either field."""
    found = {a.sequence for a in desired.assignments}
    if desired.HasField("assignment"):
        found.add(desired.assignment.sequence)
    return found


def _forwarded(metadata: Any) -> tuple[tuple[str, str], ...]:
    # Only the credential: the rest (user agent, timeouts) is the relay's own.
    return tuple((k, v) for k, v in metadata or () if k == "authorization")


class GrpcRelay:
    """Listens on 127.0.0.1 (a free port) and relays the device service to
    `upstream`. `server_credentials` None serves plain text;
    `upstream_credentials` None talks plain text upstream."""

    def __init__(
        self,
        upstream: str,
        *,
        server_credentials: grpc.ServerCredentials | None = None,
        upstream_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.upstream = upstream
        self.rewrite: Rewrite | None = None
        self.calls: list[str] = []
        self.recorded: list[tuple[str, d.DesiredState]] = []
        self.port = 0
        self._server_credentials = server_credentials
        self._upstream_credentials = upstream_credentials
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> GrpcRelay:
        """Listen (once; starting a started relay does nothing)."""
        if not self._thread.is_alive():
            self._thread.start()
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __enter__(self) -> GrpcRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    # ------------------------------------------------------------ observation

    def count(self, method: str | None = None) -> int:
        """Calls that reached the relay (of `method`, or of any)."""
        with self._lock:
            return sum(1 for m in self.calls if method is None or m == method)

    def pushed(self, device_id: str, sequence: int) -> d.DesiredState:
        """A copy of the last desired state the control plane pushed to
        `device_id` with assignment `sequence` (among its `assignments`, or
        the singular `assignment` a one-model agent is sent)."""
        with self._lock:
            found = [
                desired
                for device, desired in self.recorded
                if device == device_id and sequence in _sequences(desired)
            ]
        assert found, f"the control plane pushed no assignment {sequence} to {device_id}"
        return d.DesiredState.FromString(found[-1].SerializeToString())

    # ------------------------------------------------------------ relaying

    async def _start(self) -> None:
        if self._upstream_credentials is None:
            self._channel = grpc.aio.insecure_channel(self.upstream, options=_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(
                self.upstream, self._upstream_credentials, options=_OPTIONS
            )
        self._server = grpc.aio.server(options=_OPTIONS)
        handlers = {method.name: self._handler(method) for method in SERVICE.methods}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
        )
        if self._server_credentials is None:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self._server.add_secure_port("127.0.0.1:0", self._server_credentials)
        await self._server.start()

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
        if self._channel is not None:
            await self._channel.close(None)

    def _seen(self, method: str) -> None:
        with self._lock:
            self.calls.append(method)

    def _handler(self, method: Any) -> grpc.RpcMethodHandler[bytes, bytes]:
        """A byte-for-byte forwarding handler for one method (Sync parsed)."""
        path = f"/{SERVICE.full_name}/{method.name}"
        name = str(method.name)

        def upstream() -> grpc.aio.Channel:
            assert self._channel is not None
            return self._channel

        # No serializers: requests and responses cross the relay as bytes.
        async def unary_unary(request: bytes, context: Context) -> bytes:
            self._seen(name)
            try:
                response: bytes = await upstream().unary_unary(path, None, None)(
                    request, metadata=_forwarded(context.invocation_metadata())
                )
                return response
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "")
                raise

        async def unary_stream(request: bytes, context: Context) -> AsyncIterator[bytes]:
            self._seen(name)
            call = upstream().unary_stream(path, None, None)(
                request, metadata=_forwarded(context.invocation_metadata())
            )
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "")
            finally:
                call.cancel()

        async def stream_stream(
            requests: AsyncIterator[bytes], context: Context
        ) -> AsyncIterator[bytes]:
            self._seen(name)
            metadata = context.invocation_metadata()
            device_id = _device_of(metadata)
            call = upstream().stream_stream(path, None, None)(
                requests, metadata=_forwarded(metadata)
            )
            try:
                async for response in call:
                    out = self._down(device_id, response) if name == "Sync" else response
                    if out is not None:
                        yield out
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "")
            finally:
                call.cancel()

        if method.client_streaming and method.server_streaming:
            return grpc.stream_stream_rpc_method_handler(stream_stream)
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(unary_stream)
        if method.client_streaming:
            raise NotImplementedError(f"{path}: no client-streaming device RPC to relay yet")
        return grpc.unary_unary_rpc_method_handler(unary_unary)

    def _down(self, device_id: str, raw: bytes) -> bytes | None:
        """A control message on its way to the agent: recorded, rewritten."""
        message = d.ControlMessage.FromString(raw)
        if message.HasField("desired"):
            with self._lock:
                self.recorded.append(
                    (device_id, d.DesiredState.FromString(message.desired.SerializeToString()))
                )
        rewrite = self.rewrite
        if rewrite is None:
            return raw
        out = rewrite(device_id, message)
        return None if out is None else out.SerializeToString()


__all__ = ["GrpcRelay", "Rewrite"]
