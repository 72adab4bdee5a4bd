"""Fan events out to the other control-plane replicas, so a change committed
on one replica reaches agents connected to another within the push budget.

Replicas on PostgreSQL (on any hosts) use LISTEN/NOTIFY. The workers of one
`edgefleet server --workers N` on the embedded SQLite file have no such
channel; they send the same payloads to each other as datagrams on Linux
abstract-namespace Unix sockets, named after the data directory and the
worker's index, so nothing is left on disk when a worker dies. One SQLite
process needs neither."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Executor
from hashlib import sha256
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from edgefleet.controlplane.services.events import EventBus, FleetEvent

log = logging.getLogger(__name__)

CHANNEL = "edgefleet_events"
# NOTIFY payloads must stay under 8000 bytes; 16-character ids plus quotes
# and commas fit 300 to a message with room to spare.
IDS_PER_NOTIFY = 300
LISTEN_READY_TIMEOUT_S = 10.0


def libpq_dsn(sqlalchemy_url: str) -> str:
    """The psycopg connection string for a SQLAlchemy PostgreSQL URL."""
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def _payloads(event: FleetEvent, origin: str) -> Iterator[str]:
    """The event as JSON messages of at most IDS_PER_NOTIFY device ids each."""
    ids = list(event.device_ids) or [""]
    for start in range(0, len(ids), IDS_PER_NOTIFY):
        chunk = [i for i in ids[start : start + IDS_PER_NOTIFY] if i]
        yield json.dumps(
            {
                "origin": origin,
                "kind": event.kind,
                "ids": chunk,
                "desired": event.desired_changed,
                "subject": event.subject,
            },
            separators=(",", ":"),
        )


def _decode(payload: str | bytes, own_origin: str) -> FleetEvent | None:
    """The event another replica sent; None for our own or a garbled one."""
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("origin") == own_origin:
        return None
    return FleetEvent(
        kind=str(data.get("kind", "")),
        device_ids=tuple(data.get("ids", ())),
        desired_changed=bool(data.get("desired")),
        subject=str(data.get("subject", "")),
        remote=True,
    )


class PgEventBridge:
    """Publishes this replica's events with NOTIFY and re-publishes other
    replicas' events on the local bus."""

    def __init__(self, dsn: str, bus: EventBus, executor: Executor) -> None:
        self._dsn = dsn
        self._bus = bus
        self._executor = executor
        self.replica_id = uuid.uuid4().hex
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="pg-listen", daemon=True)
        self._sender: psycopg.Connection[tuple[object, ...]] | None = None
        self._send_lock = threading.Lock()

    async def start(self) -> None:
        """Subscribe to the local bus and wait (briefly) until LISTEN is in place."""
        self._bus.subscribe(self._forward)
        self._thread.start()
        await asyncio.get_running_loop().run_in_executor(
            self._executor, self._listening.wait, LISTEN_READY_TIMEOUT_S
        )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._send_lock:
            if self._sender is not None:
                self._sender.close()

    def _forward(self, event: FleetEvent) -> None:
        if event.remote:
            return
        loop = asyncio.get_running_loop()
        loop.run_in_executor(self._executor, self._notify, event)

    def _notify(self, event: FleetEvent) -> None:
        with self._send_lock:
            try:
                if self._sender is None or self._sender.closed:
                    self._sender = psycopg.connect(self._dsn, autocommit=True)
                for payload in _payloads(event, self.replica_id):
                    self._sender.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
            except psycopg.Error:
                # Other replicas then learn of the change when their agents
                # reconnect; nothing is lost from the database itself.
                log.exception("could not notify other replicas of %s", event.kind)
                self._sender = None

    def _listen(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    backoff = 0.5
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._receive(note.payload)
            except psycopg.Error:
                log.warning("replica event listener lost its connection; retrying", exc_info=True)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _receive(self, payload: str) -> None:
        event = _decode(payload, self.replica_id)
        if event is not None:
            self._bus.publish(event)


# A datagram this size holds IDS_PER_NOTIFY ids several times over.
_MAX_DATAGRAM = 64 * 1024
# A worker that does not read for this long (stopped in a debugger, or
# swapping) loses the event rather than stall the sender's thread pool.
_SEND_TIMEOUT_S = 2.0


def worker_address(data_dir: Path, index: int) -> bytes:
    """The abstract socket name of worker `index` of the server on `data_dir`.
    Two servers on different data directories never hear each other."""
    group = sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return f"\0edgefleet-{group}-{index}".encode()


class LocalEventBridge:
    """Publishes this worker's events to its sibling workers and re-publishes
    theirs on the local bus. A sibling that is not running (restarting) is
    skipped: its agents reconnect, to any worker, and read their desired
    state then, as after any restart."""

    def __init__(
        self, data_dir: Path, index: int, workers: int, bus: EventBus, executor: Executor
    ) -> None:
        self._bus = bus
        self._executor = executor
        self.replica_id = uuid.uuid4().hex
        self._peers = [worker_address(data_dir, i) for i in range(workers) if i != index]
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(worker_address(data_dir, index))
        self._sock.settimeout(0.5)
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.settimeout(_SEND_TIMEOUT_S)
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="worker-events", daemon=True)

    async def start(self) -> None:
        """Subscribe to the local bus; the socket is bound already, so no
        event sent to this worker from now on is missed."""
        self._bus.subscribe(self._forward)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        with self._send_lock:
            self._sender.close()

    def _forward(self, event: FleetEvent) -> None:
        if event.remote or not self._peers:
            return
        asyncio.get_running_loop().run_in_executor(self._executor, self._send, event)

    def _send(self, event: FleetEvent) -> None:
        with self._send_lock:
            if self._stop.is_set():
                return  # queued before stop(); the socket is closed
            for payload in _payloads(event, self.replica_id):
                data = payload.encode()
                for peer in self._peers:
                    try:
                        self._sender.sendto(data, peer)
                    except (ConnectionRefusedError, FileNotFoundError):
                        pass  # that worker is restarting; see the class docstring
                    except OSError:
                        log.warning("could not tell a worker of %s", event.kind, exc_info=True)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(_MAX_DATAGRAM)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            event = _decode(data, self.replica_id)
            if event is not None:
                self._bus.publish(event)
