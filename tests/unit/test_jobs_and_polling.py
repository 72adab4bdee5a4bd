"""The helpers every part shares: background jobs (edgefleet.jobs: what the
control plane and the agent run beside their main work) and polling
(edgefleet.polling: the one wait_for of tests, benchmarks and the demo)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from edgefleet.jobs import BackgroundJob, BackgroundJobs
from edgefleet.polling import WaitTimeout, wait_for, wait_for_async


class Recorder:
    """A job's loop and hooks that write down what happened, in order."""

    def __init__(self, name: str, seen: list[str]) -> None:
        self.name = name
        self.seen = seen

    async def run(self) -> None:
        self.seen.append(f"{self.name} runs")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.seen.append(f"{self.name} cancelled")
            raise

    async def halt(self) -> None:
        self.seen.append(f"{self.name} halted")

    async def hand_over(self) -> None:
        self.seen.append(f"{self.name} handed over")


async def test_jobs_start_together_and_stop_in_order_halting_then_handing_over() -> None:
    seen: list[str] = []
    first, second = Recorder("first", seen), Recorder("second", seen)
    jobs = BackgroundJobs([
        BackgroundJob("first", first.run, hand_over=first.hand_over),
        BackgroundJob("second", second.run, halt=second.halt),
    ])  # fmt: skip
    jobs.start()
    await asyncio.sleep(0)
    assert seen == ["first runs", "second runs"]

    await jobs.cancel()
    # Cancelled, not yet ended: nothing is handed over before join().
    assert seen[2:] == ["second halted"]
    await jobs.join()
    assert seen[2:] == ["second halted", "first cancelled", "second cancelled", "first handed over"]


async def test_a_failed_hand_over_is_logged_and_the_others_still_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []
    later = Recorder("later", seen)

    async def fail() -> None:
        raise OSError("database gone")

    jobs = BackgroundJobs([
        BackgroundJob("failing", Recorder("failing", seen).run, hand_over=fail),
        BackgroundJob("later", later.run, hand_over=later.hand_over),
    ])  # fmt: skip
    jobs.start()
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="edgefleet.jobs"):
        await jobs.stop()
    assert "failing: could not hand over what it held" in caplog.text
    assert seen[-1] == "later handed over"


async def test_a_job_that_crashed_on_its_own_raises_its_error_when_stopped() -> None:
    async def crash() -> None:
        raise RuntimeError("loop broke")

    job = BackgroundJob("crashing", crash)
    job.start()
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="loop broke"):
        await job.stop()


def test_wait_for_returns_the_first_truthy_value() -> None:
    answers = iter([None, False, 0, "ready"])
    assert wait_for(lambda: next(answers), 5, interval=0) == "ready"


def test_wait_for_gives_up_naming_what_and_the_last_value() -> None:
    with pytest.raises(WaitTimeout, match=r"gave up waiting for the port file after 0\.05 s"):
        wait_for(lambda: [], 0.05, what="the port file", interval=0.01)
    with pytest.raises(AssertionError, match=r"\(last value: \[\]\)"):  # a failed check in tests
        wait_for(lambda: [], 0.01, interval=0.01)


def test_wait_for_lets_the_predicates_own_error_through() -> None:
    def exited() -> bool:
        raise RuntimeError("the server exited")

    with pytest.raises(RuntimeError, match="the server exited"):
        wait_for(exited, 5)


async def test_wait_for_async_lets_the_loop_run_what_it_waits_for() -> None:
    done = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, done.set)
    assert await wait_for_async(done.is_set, 5, interval=0.01) is True
    with pytest.raises(WaitTimeout, match="gave up waiting for nothing"):
        await wait_for_async(lambda: None, 0.02, what="nothing", interval=0.01)
