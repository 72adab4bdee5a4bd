"""Listings that come in pages: every page fetched, on either gRPC stack."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from edgefleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc

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
