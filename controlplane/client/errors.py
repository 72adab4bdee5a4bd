"""What a failed call says, from either gRPC stack.

The blocking stack raises errors that are both grpc.RpcError and grpc.Call;
grpc.aio raises AioRpcError, which is a grpc.RpcError with the same code()
and details() but not a grpc.Call. Checking for grpc.Call alone would read
every asyncio failure as a status-less error."""

from __future__ import annotations

import grpc


def rpc_status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str] | None:
    """The status code and details of a failed call on either stack; None
    for an RpcError that carries no status."""
    if isinstance(err, grpc.aio.AioRpcError):
        return err.code(), err.details() or ""
    if isinstance(err, grpc.Call):
        return err.code(), err.details() or ""
    return None


def rpc_error_message(err: grpc.RpcError) -> str:
    """`NOT_FOUND: device 'x' not found` from a failed call."""
    status = rpc_status(err)
    if status is None:
        return str(err)
    code, details = status
    return f"{code.name}: {details}".rstrip(": ")
