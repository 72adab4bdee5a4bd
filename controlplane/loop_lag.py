"""How late the control plane's event loop runs what is due.

Every device stream, heartbeat ack and DesiredState push runs on the one
event loop; database work runs on threads that share the interpreter with
it. When those threads (or a long callback) hold the interpreter, every
stream's next message waits. The probe sleeps a fixed interval and records
how much later than asked it woke: that is what any message arriving at that
moment waited before the loop could look at it, so its distribution is the
control plane's own share of an agent's sync round trip, whatever the
network and the agent add. Exported as a Prometheus histogram, so operators
see a saturated control plane before agents time out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram

PROBE_EVERY_S = 0.05
# Fine at the low end, where a healthy loop lives; the top buckets catch the
# stalls that make agents' round trips slow.
BUCKETS_S = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip


def lag_histogram(registry: CollectorRegistry) -> Histogram:
    """The histogram the probe observes into, registered in `registry`."""
    return Histogram(
        "edgefleet_event_loop_lag_seconds",
        "How much later than due the event loop woke a sleeping task",
        registry=registry,
        buckets=BUCKETS_S,
    )


async def probe(observe: Callable[[float], None], every_s: float = PROBE_EVERY_S) -> None:
    """Until cancelled: sleep `every_s`, observe how late the wake-up was."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + every_s
        await asyncio.sleep(every_s)
        observe(max(0.0, loop.time() - asked))
