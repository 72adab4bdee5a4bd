"""Fleet events: what services announce after they commit, for the sync hub
(push desired state) and live UIs (WatchFleet). Services run in worker
threads; subscribers live on the event loop, so publishing is thread-safe."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FleetEvent:
    # "device.enrolled", "device.updated", "class.updated", "model.pushed", ...
    kind: str
    device_ids: tuple[str, ...] = ()
    # Devices whose desired state changed and must be pushed.
    desired_changed: bool = False
    subject: str = ""
    message: str = ""
    # Set on events received from another replica, so they are not sent back.
    remote: bool = False


Subscriber = Callable[[FleetEvent], None]


@dataclass
class EventBus:
    """Delivers events to subscribers on the owning event loop."""

    loop: asyncio.AbstractEventLoop | None = None
    _subscribers: list[Subscriber] = field(default_factory=list)

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    def publish(self, event: FleetEvent) -> None:
        """Callable from any thread."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._deliver(event)
        else:
            loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: FleetEvent) -> None:
        for fn in list(self._subscribers):
            fn(event)


@dataclass
class Pulse:
    """Counts something frequent (telemetry samples) between announcements,
    so live views hear "there is new data" every few seconds instead of an
    event per upload. Lives on the event loop."""

    count: int = 0

    def add(self, n: int) -> None:
        self.count += n

    def take(self) -> int:
        """The count since the previous take."""
        n, self.count = self.count, 0
        return n
