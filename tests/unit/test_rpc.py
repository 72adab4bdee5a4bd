"""The rpc decorator: authentication, error mapping and metrics in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from edgefleet.controlplane.api.rpc import Handlers, RpcMetrics, rpc
from edgefleet.controlplane.errors import NotFound


class AbortError(Exception):
    """Stands in for grpc.aio's AbortError (matched by name, as in rpc.py)."""


class FakeContext:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise AbortError(details)

    def code(self) -> grpc.StatusCode | None:
        return self.aborted[0] if self.aborted else None


class Demo(Handlers):
    @rpc("none")
    async def Unary(self, request: Any, context: Any, _: None) -> str:
        if request == "missing":
            raise NotFound("no such thing")
        if request == "bug":
            raise RuntimeError("boom")
        return f"hello {request}"

    @rpc("none")
    async def Stream(self, request: Any, context: Any, _: None) -> AsyncIterator[int]:
        for i in range(request):
            yield i
        raise NotFound("ran out")


@pytest.fixture
def demo() -> Demo:
    registry = CollectorRegistry()
    handlers = Demo(db=None, executor=ThreadPoolExecutor(1), metrics=RpcMetrics(registry))  # type: ignore[arg-type]
    handlers.registry = registry  # type: ignore[attr-defined]
    return handlers


def _count(demo: Demo, method: str, code: str) -> float:
    value = demo.registry.get_sample_value(  # type: ignore[attr-defined]
        "edgefleet_rpc_total", {"method": method, "code": code}
    )
    return value or 0.0


async def test_unary_results_and_errors_map_to_status(demo: Demo) -> None:
    assert await demo.Unary("you", FakeContext()) == "hello you"
    context = FakeContext()
    with pytest.raises(AbortError):
        await demo.Unary("missing", context)
    assert context.aborted == (grpc.StatusCode.NOT_FOUND, "no such thing")
    context = FakeContext()
    with pytest.raises(AbortError):
        await demo.Unary("bug", context)
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.INTERNAL
    assert "boom" not in context.aborted[1]  # internals stay in the log
    assert [_count(demo, "Unary", c) for c in ("OK", "NOT_FOUND", "INTERNAL")] == [1, 1, 1]


async def test_streams_yield_then_map_errors(demo: Demo) -> None:
    context = FakeContext()
    got = []
    with pytest.raises(AbortError):
        async for item in demo.Stream(3, context):
            got.append(item)
    assert got == [0, 1, 2]
    assert context.aborted == (grpc.StatusCode.NOT_FOUND, "ran out")
    assert _count(demo, "Stream", "NOT_FOUND") == 1
