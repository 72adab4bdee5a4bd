"""`edgefleet server --workers N`: one control plane served by N processes.

One event loop holds every device's sync stream, and at 10,000 devices its
bursts and the garbage collector's pauses are what a heartbeat waits
behind (docs/benchmarks.md, "Soak"). Workers divide both: each is a whole
replica, serving the same ports with SO_REUSEPORT, so the kernel spreads
connections over them. They share the database as replicas always do
(leases, idempotent writes), hear each other's events over PostgreSQL or,
on the embedded SQLite file, over replicas.LocalEventBridge, and queue for
SQLite's writer through uow.SqliteWriters.

This process, the supervisor, prepares what the workers would otherwise
race to create (schema, admin token, signing key, CA), reserves ports given
as 0, starts the workers, writes the port file once all of them listen,
restarts one that dies, and stops them all on SIGTERM or SIGINT. It serves
nothing itself. Linux only: SO_REUSEPORT spreads connections only there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from edgefleet.controlplane import malloc_policy
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import (
    WorkerSlot,
    open_database,
    prepare,
    prepare_process,
    serve,
    write_port_files,
)

log = logging.getLogger(__name__)

# A worker that served this long before it died is restarted at once;
# one that keeps dying waits longer each time, up to MAX_BACKOFF_S.
HEALTHY_AFTER_S = 60.0
MAX_BACKOFF_S = 30.0
# How long a worker may take to start (migrations ran in the supervisor).
START_TIMEOUT_S = 120.0
# How long workers get to stop gracefully before they are killed.
STOP_TIMEOUT_S = 30.0
# linux/prctl.h
_PR_SET_PDEATHSIG = 1


def supervise(config: ServerConfig, workers: int) -> int:
    """Run `workers` worker processes until SIGTERM or SIGINT; the exit
    status: 0 after a clean stop, 1 if the workers could not start."""
    logging.basicConfig(level=logging.INFO, format=_log_format("supervisor"))
    if not sys.platform.startswith("linux"):
        log.error("--workers > 1 needs Linux (SO_REUSEPORT); run one worker here")
        return 1
    prepare_process(config)  # the workers inherit its umask and open-file limit
    db = open_database(config)
    try:
        prepare(db, config)
    finally:
        db.dispose()
    try:
        reserved, worker_config = _reserve_ports(config)
    except PortTaken as exc:
        log.error("%s", exc)
        return 1
    context = multiprocessing.get_context("spawn")  # gRPC does not survive fork
    pool = _Pool(context, worker_config, workers)
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        if not pool.start_all(lambda: stopping):
            return 0 if stopping else 1
        log.info(
            "%d workers serving %s (pids %s)",
            workers, worker_config.listen, ", ".join(str(p.pid) for p in pool.processes),
        )  # fmt: skip
        _write_port_files(config, worker_config)
        while not stopping:
            pool.watch()
        return 0
    finally:
        pool.stop_all()
        for sock in reserved:
            sock.close()


class _Pool:
    """The worker processes by index, the ready pipes of those still
    starting, and when a dead one may be restarted."""

    def __init__(
        self, context: multiprocessing.context.SpawnContext, config: ServerConfig, size: int
    ) -> None:
        self._context = context
        self._config = config
        self._size = size
        self._procs: list[BaseProcess | None] = [None] * size
        self._starting: dict[int, multiprocessing.connection.Connection] = {}
        self._started_at = [0.0] * size
        self._backoff = [1.0] * size
        self._due: dict[int, float] = {}

    @property
    def processes(self) -> list[BaseProcess]:
        return [p for p in self._procs if p is not None]

    def start_all(self, stopping: Callable[[], bool]) -> bool:
        """Start every worker and wait until each listens. False if one
        exited first (port taken, bad settings: its own log says why) or
        did not start in time; the caller stops the others."""
        for i in range(self._size):
            self._start(i)
        deadline = time.monotonic() + START_TIMEOUT_S
        while self._starting and not stopping():
            self._wait(min(0.5, max(0.0, deadline - time.monotonic())))
            self._take_ready()
            for i, proc in enumerate(self._procs):
                if i in self._starting and proc is not None and not proc.is_alive():
                    log.error("worker %d exited with status %s while starting", i, proc.exitcode)
                    return False
            if self._starting and time.monotonic() >= deadline:
                log.error("workers %s did not start within %.0f s", sorted(self._starting),
                          START_TIMEOUT_S)  # fmt: skip
                return False
        return True

    def watch(self) -> None:
        """Wait up to half a second for news; restart a dead worker when due."""
        self._wait(0.5)
        for i in self._take_ready():
            log.info("worker %d (pid %s) is serving again", i, self._pid(i))
        now = time.monotonic()
        for i, proc in enumerate(self._procs):
            if proc is not None and not proc.is_alive():
                ran = now - self._started_at[i]
                if ran >= HEALTHY_AFTER_S:
                    self._backoff[i] = 1.0
                log.error(
                    "worker %d (pid %s) exited with status %s after %.0f s; restarting in %.0f s",
                    i, proc.pid, proc.exitcode, ran, self._backoff[i],
                )  # fmt: skip
                self._due[i] = now + self._backoff[i]
                self._backoff[i] = min(self._backoff[i] * 2, MAX_BACKOFF_S)
                self._procs[i] = None
                if (pipe := self._starting.pop(i, None)) is not None:
                    pipe.close()
        for i, due in list(self._due.items()):
            if now >= due:
                del self._due[i]
                self._start(i)

    def stop_all(self) -> None:
        """SIGTERM every worker, then SIGKILL what is left after STOP_TIMEOUT_S."""
        for proc in self.processes:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker pid %s did not stop within %.0f s; killing it", proc.pid,
                          STOP_TIMEOUT_S)  # fmt: skip
                proc.kill()
                proc.join()

    def _start(self, index: int) -> None:
        receive, send = self._context.Pipe(duplex=False)
        proc = self._context.Process(
            target=_worker_main,
            args=(_worker_config(self._config, index), index, self._size, os.getpid(), send),
            name=f"edgefleet-worker-{index}",
        )
        proc.start()
        send.close()  # the worker holds the other copy: EOF when it dies
        self._procs[index] = proc
        self._starting[index] = receive
        self._started_at[index] = time.monotonic()

    def _wait(self, timeout: float) -> None:
        handles: list[Any] = [p.sentinel for p in self.processes]
        multiprocessing.connection.wait([*handles, *self._starting.values()], timeout)

    def _take_ready(self) -> list[int]:
        """The workers that said they listen since the last call."""
        ready = []
        for i, pipe in list(self._starting.items()):
            if not pipe.poll():
                continue
            try:
                pipe.recv()
                ready.append(i)
            except EOFError:
                continue  # it died before it listened; its exit is seen next
            del self._starting[i]
            pipe.close()
        return ready

    def _pid(self, index: int) -> int | None:
        proc = self._procs[index]
        return proc.pid if proc is not None else None


def _worker_config(config: ServerConfig, index: int) -> ServerConfig:
    """Worker `index`'s settings: builds on worker 0 only (its runner takes
    every replica's jobs from the database), metrics on the metrics port +
    index, and no port file (the supervisor writes it)."""
    metrics = config.metrics_listen
    if metrics:
        host, _, port = metrics.rpartition(":")
        metrics = f"{host}:{int(port) + index}" if int(port) else metrics
    return dataclasses.replace(
        config,
        metrics_listen=metrics,
        build_workers=config.build_workers if index == 0 else 0,
        port_file=None,
    )


def _worker_main(
    config: ServerConfig,
    index: int,
    workers: int,
    supervisor: int,
    ready: multiprocessing.connection.Connection,
) -> None:
    """A worker process: serve until SIGTERM, telling the supervisor when it listens."""
    logging.basicConfig(level=logging.INFO, format=_log_format(f"worker {index}"))
    # Ctrl-C reaches the whole process group; the supervisor stops us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop_with_parent(supervisor)
    malloc_policy.limit_arenas()

    def announce(_cp: object) -> None:
        with contextlib.suppress(OSError):  # the supervisor is gone: PDEATHSIG follows
            ready.send(True)
        ready.close()

    slot = WorkerSlot(index, workers)
    try:
        asyncio.run(serve(config, slot, on_ready=announce, signals=(signal.SIGTERM,)))
    except OSError as exc:  # a port that cannot be served: said, not a traceback
        log.error("%s", exc)
        sys.exit(1)


def _stop_with_parent(supervisor: int) -> None:
    """SIGTERM this worker when the supervisor dies (killed, not stopped):
    an orphaned worker would go on serving the port with nobody to restart
    or stop it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        log.warning("cannot ask to be stopped with the supervisor (errno %d)", ctypes.get_errno())
    if os.getppid() != supervisor:  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def _log_format(who: str) -> str:
    return f"%(asctime)s %(levelname)s [{who}] %(name)s: %(message)s"


class PortTaken(OSError):
    """A port the workers were to share is served by something else."""


def _reserve_ports(config: ServerConfig) -> tuple[list[socket.socket], ServerConfig]:
    """Hold every port the workers share: bound here with SO_REUSEPORT and
    kept, never listened on, so a port given as 0 gets a number nothing
    else takes while the workers bind it too. Each is first bound without
    SO_REUSEPORT, which fails if anything listens there already: another
    server with SO_REUSEPORT would otherwise silently get half of the
    connections. Returns the sockets to close at the end and the settings
    with the ports filled in."""
    reserved: list[socket.socket] = []

    def bind(sockaddr: tuple[Any, ...], family: int, *, shared: bool) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        # As gRPC binds: past connections in TIME_WAIT do not block the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        return sock

    def hold(address: str) -> str:
        host, _, port = address.rpartition(":")
        try:
            family, _kind, _proto, _name, sockaddr = socket.getaddrinfo(
                host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )[0]  # fmt: skip
        except OSError as exc:  # a host name that does not resolve
            raise PortTaken(f"cannot listen on {address}: {exc.strerror or exc}") from exc
        if int(port):
            try:
                bind(sockaddr, family, shared=False).close()
            except OSError as exc:
                raise PortTaken(f"cannot listen on {address}: {exc.strerror}") from exc
        sock = bind(sockaddr, family, shared=True)
        reserved.append(sock)
        return f"{host}:{sock.getsockname()[1]}"

    try:
        listen = hold(config.listen)
        device_listen = hold(config.device_listen_address()) if config.tls else None
        http_address = config.artifact_http_address()
        http_listen = hold(http_address) if http_address is not None else "off"
    except BaseException:
        for sock in reserved:
            sock.close()
        raise
    return reserved, dataclasses.replace(
        config, listen=listen, device_listen=device_listen, artifact_http_listen=http_listen
    )


def _write_port_files(config: ServerConfig, workers: ServerConfig) -> None:
    """As one server writes them, with the ports the workers share."""
    if config.port_file is not None:
        device_port = workers.device_listen_address() if config.tls else ":0"
        http = workers.artifact_http_address()
        write_port_files(
            config.port_file, _port_of(workers.listen), _port_of(device_port),
            _port_of(http) if http is not None else 0,
        )  # fmt: skip


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])
