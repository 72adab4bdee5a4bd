"""Fan events out to the other control-plane replicas over PostgreSQL
LISTEN/NOTIFY, so a change committed on one replica reaches agents connected
to another within the push budget. SQLite deployments are one process and
need none of this."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Executor

import psycopg
from sqlalchemy.engine import make_url

from controlplane.services.events import EventBus, FleetEvent

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
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if data.get("origin") == self.replica_id:
            return
        self._bus.publish(
            FleetEvent(
                kind=str(data.get("kind", "")),
                device_ids=tuple(data.get("ids", ())),
                desired_changed=bool(data.get("desired")),
                subject=str(data.get("subject", "")),
                remote=True,
            )
        )
