"""Connected agents on this replica: who is online, and waking a device's
sync stream when its desired state changes. Lives on the event loop."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass, field

from edgefleet.controlplane.db.models import utcnow
from edgefleet.controlplane.errors import DomainError, FailedPrecondition, Unavailable
from edgefleet.controlplane.services.events import FleetEvent


@dataclass(eq=False)
class DeviceSession:
    """One open sync stream."""

    device_id: str
    # Set when the desired state may have changed; the stream re-reads it.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the stream must end: why, and the error that ends it.
    closed_reason: str = ""
    closed_error: type[DomainError] = FailedPrecondition
    # Epoch seconds: a float is cheaper than a datetime on the per-message path.
    last_seen: float = field(default_factory=time.time)


class SyncHub:
    """At most one session per device: a reconnecting agent replaces its old
    stream, which the hub ends."""

    def __init__(self) -> None:
        self._sessions: dict[str, DeviceSession] = {}
        self._dirty: set[str] = set()
        # Devices that connected or disconnected since take_presence().
        self._presence: set[str] = set()

    def connect(self, device_id: str) -> DeviceSession:
        old = self._sessions.get(device_id)
        if old is not None:
            self._close(old, "replaced by a newer connection from the same device")
        session = DeviceSession(device_id)
        self._sessions[device_id] = session
        self._dirty.add(device_id)
        self._presence.add(device_id)
        return session

    def disconnect(self, session: DeviceSession) -> None:
        if self._sessions.get(session.device_id) is session:
            del self._sessions[session.device_id]
            self._dirty.add(session.device_id)
            self._presence.add(session.device_id)
            session.last_seen = time.time()

    def seen(self, session: DeviceSession) -> None:
        """Hot path: called for every message from the device."""
        session.last_seen = time.time()
        self._dirty.add(session.device_id)

    def is_connected(self, device_id: str) -> bool:
        return device_id in self._sessions

    def connected_count(self) -> int:
        return len(self._sessions)

    def take_seen(self) -> dict[str, dt.datetime]:
        """Last-seen times changed since the previous call (for a batched write)."""
        seen: dict[str, dt.datetime] = {}
        now = utcnow()
        for device_id in self._dirty:
            session = self._sessions.get(device_id)
            seen[device_id] = (
                dt.datetime.fromtimestamp(session.last_seen, dt.UTC) if session else now
            )
        self._dirty.clear()
        return seen

    def take_presence(self) -> list[str]:
        """Devices that came online or went offline here since the previous call."""
        changed, self._presence = sorted(self._presence), set()
        return changed

    def on_event(self, event: FleetEvent) -> None:
        """EventBus subscriber: wake the streams of devices whose desired
        state changed."""
        if not event.desired_changed:
            return
        for device_id in event.device_ids:
            session = self._sessions.get(device_id)
            if session is not None:
                session.wake.set()

    def _close(
        self, session: DeviceSession, reason: str, error: type[DomainError] = FailedPrecondition
    ) -> None:
        session.closed_reason = reason
        session.closed_error = error
        session.wake.set()
        if self._sessions.get(session.device_id) is session:
            del self._sessions[session.device_id]

    def close_all(self, reason: str) -> None:
        """End every stream with UNAVAILABLE so agents reconnect promptly."""
        for session in list(self._sessions.values()):
            self._close(session, reason, Unavailable)
