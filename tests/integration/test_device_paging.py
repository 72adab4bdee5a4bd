"""ListDevices pages through a fleet (keyset on name, id) on both backends:
every device once, in order, whatever the page size and filters; tokens are
bound to the filters they were issued for; the CLI and the TUI walk every
page."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from edgefleet.controlplane.api import paging
from edgefleet.controlplane.client import paging as client_paging
from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import ControlPlane, create_server
from edgefleet.controlplane.services import devices as device_service
from edgefleet.tui import client as tui_client
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import ADMIN, enrollment_token, status_of

FLEET = 23


@pytest.fixture
async def fleet(tmp_path: Path, db_url: str) -> AsyncIterator[tuple[ControlPlane, list[str]]]:
    """A control plane with FLEET enrolled devices, every third one in ring
    "a"; and their ids in ListDevices order (name, then id)."""
    cp = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp",
            listen="127.0.0.1:0",
            admin_token=ADMIN_TOKEN,
            db_url=db_url,
            build_workers=0,
        )
    )
    try:
        async with grpc.aio.insecure_channel(cp.address) as channel:
            op, dev = og.OperatorServiceStub(channel), dg.DeviceServiceStub(channel)
            token = await enrollment_token(op)
            # Three devices share a name, so the id breaks the tie.
            for i in range(FLEET):
                await dev.Enroll(
                    d.EnrollRequest(
                        enrollment_token=token,
                        hardware_id=f"hw-{i:02d}",
                        name="twin" if i in (7, 8, 9) else f"dev-{i:02d}",
                        labels={"ring": "a" if i % 3 == 0 else "b"},
                        hardware=c.HardwareProfile(arch="aarch64", memory_mb=2048, cpu_cores=4),
                    )
                )
            everything = await op.ListDevices(o.ListDevicesRequest(), metadata=ADMIN)
            ordered = sorted(everything.devices, key=lambda x: (x.name, x.id))
            assert len(ordered) == FLEET and not everything.next_page_token
            assert [x.name for x in ordered].count("twin") == 3
            yield cp, [x.id for x in ordered]
    finally:
        await cp.stop(grace=0.5)


async def _walk(op: og.OperatorServiceStub, request: o.ListDevicesRequest) -> list[list[str]]:
    pages: list[list[str]] = []
    while True:
        page = await op.ListDevices(request, metadata=ADMIN)
        pages.append([x.id for x in page.devices])
        if not page.next_page_token:
            return pages
        request.page_token = page.next_page_token


@pytest.mark.parametrize("size", [1, 5, 22, 23, 24])
async def test_pages_hold_every_device_once_in_order(
    fleet: tuple[ControlPlane, list[str]], size: int
) -> None:
    cp, ordered = fleet
    async with grpc.aio.insecure_channel(cp.address) as channel:
        pages = await _walk(og.OperatorServiceStub(channel), o.ListDevicesRequest(page_size=size))
    assert [i for page in pages for i in page] == ordered
    # Full pages but the last; no empty page after a full last one.
    assert [len(p) for p in pages] == [size] * (FLEET // size) + (
        [FLEET % size] if FLEET % size else []
    )


@pytest.mark.parametrize("scan", [2, 500])
async def test_label_filter_fills_pages_and_the_page_size_may_change(
    fleet: tuple[ControlPlane, list[str]], scan: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows read per query while the filter fills a page: 2 makes every page
    # take several reads.
    monkeypatch.setattr(device_service, "_LIST_BATCH", scan)
    cp, ordered = fleet
    async with grpc.aio.insecure_channel(cp.address) as channel:
        op = og.OperatorServiceStub(channel)
        ring_a = await op.ListDevices(o.ListDevicesRequest(labels={"ring": "a"}), metadata=ADMIN)
        assert len(ring_a.devices) == len(range(0, FLEET, 3))
        request = o.ListDevicesRequest(labels={"ring": "a"}, page_size=3)
        first = await op.ListDevices(request, metadata=ADMIN)
        assert len(first.devices) == 3 and first.next_page_token
        # A later page may ask for another size (AIP-158).
        request.page_token, request.page_size = first.next_page_token, 100
        rest = await op.ListDevices(request, metadata=ADMIN)
        assert not rest.next_page_token
        got = [x.id for x in [*first.devices, *rest.devices]]
        assert got == [x.id for x in ring_a.devices]
        assert got == [i for i in ordered if i in set(got)]


async def test_tokens_are_bound_to_their_filters_and_bad_ones_refused(
    fleet: tuple[ControlPlane, list[str]],
) -> None:
    cp, _ = fleet
    async with grpc.aio.insecure_channel(cp.address) as channel:
        op = og.OperatorServiceStub(channel)
        first = await op.ListDevices(o.ListDevicesRequest(page_size=2), metadata=ADMIN)
        other = o.ListDevicesRequest(labels={"ring": "b"}, page_token=first.next_page_token)
        code, details = await status_of(op.ListDevices(other, metadata=ADMIN))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "other ListDevices filters" in details
        forged = [
            "not base64!",
            base64.urlsafe_b64encode(b'{"c": 5, "f": "x"}').decode(),
            base64.urlsafe_b64encode(b'{"c": ["only-one"], "f": "x"}').decode(),
            base64.urlsafe_b64encode(b"[" * 100_000).decode(),
        ]
        for token in forged:
            code, details = await status_of(
                op.ListDevices(o.ListDevicesRequest(page_token=token), metadata=ADMIN)
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT, token
            assert "start again without it" in details


def test_page_size_defaults_and_caps() -> None:
    assert paging.page_size(0) == paging.DEFAULT_PAGE_SIZE == 500
    assert paging.page_size(7) == 7
    assert paging.page_size(10**6) == paging.MAX_PAGE_SIZE == 1000


async def test_the_cli_and_the_tui_read_every_page(
    fleet: tuple[ControlPlane, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    cp, ordered = fleet
    # Pages of 4, so 23 devices take six of them.
    monkeypatch.setattr(client_paging, "DEVICE_PAGE_SIZE", 4)
    cli_connection = Connection(server=cp.address, token=ADMIN_TOKEN)
    listed = await asyncio.to_thread(
        client_paging.list_devices, cli_connection.stub, o.ListDevicesRequest()
    )
    assert [x.id for x in listed] == ordered
    tui = tui_client.FleetClient(cp.address, ADMIN_TOKEN)
    try:
        assert [x.id for x in await tui.list_devices()] == ordered
    finally:
        await tui.close()
