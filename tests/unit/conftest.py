"""The unit tier's promise, enforced: no sockets, no subprocesses, no database
server. A test that opens one fails at once, saying where it belongs.

The guard is up while the tier's modules are imported (module-level code)
and for the whole of each test, fixture setup and teardown included (a
module-scoped fixture that starts a server is caught too).
Allowed: socket.socketpair (asyncio's event loop wakes itself through one),
sockets wrapped around an existing descriptor (socketpair's halves), the
`uname` platform runs once (done before any test), and SQLite, which runs in
this process."""

from __future__ import annotations

import multiprocessing.process
import os
import platform
import socket
import subprocess
from typing import Any, NoReturn

import grpc
import grpc.aio
import psycopg
import pytest

from testkit import tier_guard

MOVE = "unit tests use no sockets or subprocesses: move this test to tests/integration or tests/e2e"
_NETWORK_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
_socket_init = socket.socket.__init__
# platform.processor() runs `uname -p` once and caches it; pure code that
# reads the platform (hardware detection) should not fail for that.
platform.processor()


def _refuser(what: str) -> Any:
    def refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise RuntimeError(f"{what}: {MOVE}")

    return refuse


def _guarded_socket_init(
    self: socket.socket, family: int = -1, type: int = -1, proto: int = -1, fileno: Any = None
) -> None:
    # -1 is socket.socket's default family, AF_INET. A fileno wraps a
    # descriptor made elsewhere (socketpair's halves): nothing new is opened.
    opened = socket.AF_INET if family == -1 else family
    if fileno is None and opened in _NETWORK_FAMILIES:
        _refuser(f"socket.socket({socket.AddressFamily(opened).name})")()
    _socket_init(self, family, type, proto, fileno)


def _guard(patch: pytest.MonkeyPatch) -> None:
    patch.setattr(socket.socket, "__init__", _guarded_socket_init)
    # subprocess.run and asyncio's subprocesses all go through _execute_child.
    patch.setattr(subprocess.Popen, "_execute_child", _refuser("subprocess.Popen"))
    for name in ("system", "fork", "forkpty", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            patch.setattr(os, name, _refuser(f"os.{name}"))
    patch.setattr(multiprocessing.process.BaseProcess, "start", _refuser("a multiprocessing start"))
    # gRPC and libpq open their sockets in C, below the socket module.
    for module in (grpc, grpc.aio):
        patch.setattr(module, "server", _refuser("a gRPC server"))
        patch.setattr(module, "insecure_channel", _refuser("a gRPC channel"))
        patch.setattr(module, "secure_channel", _refuser("a gRPC channel"))
    patch.setattr(psycopg, "connect", _refuser("a PostgreSQL connection"))
    patch.setattr(psycopg.AsyncConnection, "connect", _refuser("a PostgreSQL connection"))


# Guarded while this tier's modules are imported and for each test (testkit.tier_guard).
(
    pytest_make_collect_report,
    pytest_runtest_setup,
    pytest_runtest_call,
    pytest_runtest_teardown,
) = tier_guard.hooks(_guard)
