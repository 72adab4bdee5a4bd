"""How the agent's connection loop decides what to do after a step ended:
the backoff between attempts and the one transition table from a step's
outcome (a gRPC status) to the next step and delay. Its own module, light on
imports, because fleetsim's simulated devices reconnect by the same table."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import grpc

# ---------------------------------------------------------------- backoff


class Backoff:
    """Exponential backoff with full jitter: the n-th delay is uniform in
    [0, min(maximum, initial * 2**n)), so a fleet that lost its control plane
    at the same moment does not come back at the same moment."""

    # 2**64 times any sane initial delay is past any sane maximum; capping the
    # exponent keeps the arithmetic finite however long an outage lasts.
    _MAX_EXPONENT = 64

    def __init__(
        self, initial_s: float, maximum_s: float, rng: Callable[[], float] = random.random
    ) -> None:
        if initial_s <= 0 or maximum_s < initial_s:
            raise ValueError("need 0 < initial_s <= maximum_s")
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self._rng = rng
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """Delays handed out since the last reset."""
        return self._attempt

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        exponent = min(self._attempt, self._MAX_EXPONENT)
        return min(self.maximum_s, self.initial_s * 2.0**exponent)

    def next_delay(self) -> float:
        """The next delay in seconds; each call doubles the ceiling up to the max."""
        delay = self._rng() * self.ceiling()
        self._attempt += 1
        return delay

    def at_max(self) -> float:
        """A delay near the maximum, for failures that retrying soon cannot fix:
        uniform in [maximum/2, maximum]. Jittered because such failures hit
        many devices at once (an operator rejects a batch); the half floor
        keeps it from degenerating into a quick retry. The following backoff
        delays start from the maximum too."""
        self._attempt = self._MAX_EXPONENT
        return self.maximum_s * (0.5 + 0.5 * self._rng())

    def reset(self) -> None:
        """Start again from the initial delay (after a connection that worked)."""
        self._attempt = 0


# ---------------------------------------------------------------- decisions


class Step(StrEnum):
    """What the loop does next: exchange the token for an identity, or hold
    the Sync stream open."""

    ENROLL = "enroll"
    SYNC = "sync"


class Delay(StrEnum):
    """How long to wait before the next step."""

    # Next delay of the exponential backoff: the problem is likely transient.
    BACKOFF = "backoff"
    # About the maximum delay: retrying soon cannot help, but an operator might
    # fix it (accept the device, issue a new token), so keep trying slowly.
    MAX = "max"


@dataclass(frozen=True)
class Decision:
    """What to do after a step ended: which step next, after which delay."""

    next_step: Step
    delay: Delay
    reason: str


# Failures of the connection or the server rather than of this device.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


def decide(step: Step, code: grpc.StatusCode | None, *, can_enroll: bool) -> Decision:
    """The transition table. `code` is the status the step ended with; None
    means the control plane ended the Sync stream cleanly. `can_enroll` says
    whether an enrollment token is configured."""
    if code is None:
        return Decision(Step.SYNC, Delay.BACKOFF, "control plane closed the stream")
    if code in RETRYABLE_CODES:
        return Decision(step, Delay.BACKOFF, "control plane unreachable or unavailable")
    if step is Step.SYNC and code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND):
        if can_enroll:
            # Enrolling is idempotent per hardware id: the same device id
            # comes back with a fresh credential. Backing off (not retrying at
            # once) bounds a loop of enroll/refuse if the server keeps refusing.
            return Decision(Step.ENROLL, Delay.BACKOFF, "credential refused; re-enrolling")
        return Decision(
            Step.SYNC, Delay.MAX, "credential refused and no enrollment token is configured"
        )
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return Decision(step, Delay.MAX, "device refused by the control plane")
    if step is Step.ENROLL:
        return Decision(Step.ENROLL, Delay.MAX, "enrollment refused")
    return Decision(step, Delay.MAX, "request refused by the control plane")
