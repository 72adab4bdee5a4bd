"""The rollout orchestrator's planning without a control plane: which devices
a revert chunk takes first, and how far apart ticks are spaced. Rollouts
through a real control plane: tests/integration/test_rollouts.py."""

from __future__ import annotations

import datetime as dt

import pytest

from edgefleet.controlplane.domain.rollout_plan import Member, revert_order
from edgefleet.controlplane.domain.rollout_states import MemberState
from edgefleet.controlplane.services.events import EventBus
from edgefleet.controlplane.services.orchestrator import Orchestrator, Wake

COMMITTED, IN_PROGRESS, NOTIFIED = (
    MemberState.COMMITTED, MemberState.IN_PROGRESS, MemberState.NOTIFIED,
)  # fmt: skip


def test_a_revert_chunk_takes_the_devices_running_the_version_first() -> None:
    members = [
        Member(device_id=f"d{i}", class_name="c", stage=0, state=state, reason="", attempts=1,
               sequence=1, notified_at=None, finished_at=None, next_attempt_at=None,
               previous_model_version_id=None)
        for i, state in enumerate((IN_PROGRESS, COMMITTED, NOTIFIED, COMMITTED))
    ]  # fmt: skip
    assert [d.device_id for d in sorted(members, key=revert_order)] == ["d1", "d3", "d0", "d2"]


def test_ticks_are_spaced_so_they_take_at_most_a_quarter_of_the_time() -> None:
    o_ = Orchestrator(None, EventBus(), owner="x", offline_after_s=60, tick_s=0.5)  # type: ignore[arg-type]
    assert o_.pause_after(0.01, more=False) == 0.5  # a short tick: the usual interval
    assert o_.pause_after(0.4, more=False) == pytest.approx(1.2)  # a long one: 3x its time
    # The next notify chunk follows at once, however long the step took.
    assert o_.pause_after(0.01, more=True) == 0.0
    assert o_.pause_after(3.0, more=True) == 0.0


def test_a_step_due_sooner_cuts_the_pause_short() -> None:
    """A bake ending before the next tick is stepped when it ends; a pause
    already shorter stays as it is, and a due time passed means at once."""
    now = dt.datetime(2026, 12, 7, tzinfo=dt.UTC)
    o_ = Orchestrator(None, EventBus(), owner="x", offline_after_s=60, tick_s=0.5,  # type: ignore[arg-type]
                      clock=lambda: now)  # fmt: skip
    soon = Wake(due=now + dt.timedelta(seconds=0.2))
    assert o_.pause_for(1.0, soon) == pytest.approx(0.2)  # not 3 s after a long tick
    assert o_.pause_for(0.01, Wake(due=now + dt.timedelta(seconds=30))) == 0.5
    assert o_.pause_for(1.0, Wake(due=now - dt.timedelta(seconds=1))) == 0.0
    assert o_.pause_for(1.0, Wake()) == pytest.approx(3.0)
