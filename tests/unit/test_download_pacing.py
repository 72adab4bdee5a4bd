"""The download speed cap (agent/update/rate_limit.py) and what a
download's progress reports say: its source and its rate."""

from __future__ import annotations

from collections.abc import Iterator

from edgefleet.agent.update.ports import Chunk
from edgefleet.agent.update.rate_limit import RateLimitedDownloader, effective_rate
from edgefleet.agent.update.remote import StatusReporter
from edgefleet.agent.update.states import State
from edgefleet.agent.update.store import UpdateRecord
from edgefleet.controlplane.client.format import model_update_text, model_view
from edgefleet.update_state import to_wire
from edgefleet.v1 import common_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Chunks:
    """Hands over `sizes` bytes at once (a source faster than any cap)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
        total = offset + sum(self.sizes)
        for size in self.sizes:
            yield Chunk(offset, b"x" * size, total)
            offset += size


KIB = 1024
CAP = 256 * KIB  # the bucket: max(64 KiB, a quarter second) = 64 KiB


def test_the_cap_holds_the_average_and_sleeps_only_when_ahead() -> None:
    clock = Clock()
    capped = RateLimitedDownloader(
        Chunks([64 * KIB] * 20), lambda: CAP, clock=clock, sleep=clock.sleep
    )
    got = list(capped.fetch("d", 0))
    assert sum(len(c.data) for c in got) == 20 * 64 * KIB
    # 1,280 KiB at 256 KiB a second: five seconds, less the first bucketful
    # (a quarter second), a quarter second per chunk after it.
    assert abs(clock.now - 100.0 - 4.75) < 1e-9, clock.now
    assert all(abs(s - 0.25) < 1e-9 for s in clock.slept) and len(clock.slept) == 19
    # A source already slower than the cap is never slowed further.
    slow = Clock()

    class Slow(Chunks):
        def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
            for chunk in super().fetch(digest, offset):
                slow.now += 1.0  # 64 KiB a second
                yield chunk

    paced = RateLimitedDownloader(Slow([64 * KIB] * 5), lambda: CAP, clock=slow, sleep=slow.sleep)
    list(paced.fetch("d", 0))
    assert slow.slept == []


def test_a_stall_earns_no_more_than_a_bucketful() -> None:
    """A mirror that hung 5 s before the next source answered must not buy
    5 s of bytes at full speed: 1,280 KiB at 256 KiB a second are 5 s of
    pacing, less at most a bucketful (64 KiB, a quarter second) for the
    start and for each of the two stalls."""
    clock = Clock()

    class LateThenFast(Chunks):
        def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
            for i, chunk in enumerate(super().fetch(digest, offset)):
                if i in (0, 10):
                    clock.now += 5.0  # stalled before the first and the eleventh chunk
                yield chunk

    capped = RateLimitedDownloader(
        LateThenFast([64 * KIB] * 20), lambda: CAP, clock=clock, sleep=clock.sleep
    )
    list(capped.fetch("d", 0))
    assert sum(clock.slept) >= 5.0 - 3 * 0.25 - 1e-9, clock.slept


def test_no_cap_never_sleeps_and_the_cap_is_read_at_each_fetch() -> None:
    clock = Clock()
    caps = [0]
    capped = RateLimitedDownloader(
        Chunks([64 * KIB] * 8), lambda: caps[0], clock=clock, sleep=clock.sleep
    )
    assert sum(len(c.data) for c in capped.fetch("d", 0)) == 512 * KIB and clock.slept == []
    caps[0] = CAP  # the next assignment's class cap
    list(capped.fetch("d", 0))
    assert abs(sum(clock.slept) - 1.75) < 1e-9  # 2 s less the first bucketful


def test_the_lower_cap_wins_and_a_class_cannot_lift_the_owners() -> None:
    assert effective_rate(0, 0) == 0
    assert effective_rate(1000, 0) == 1000  # the agent's own only
    assert effective_rate(0, 5000) == 5000  # the class's only
    assert effective_rate(1000, 5000) == 1000
    assert effective_rate(8000, 5000) == 5000


def test_download_reports_say_where_the_bytes_come_from_and_how_fast() -> None:
    clock = Clock()
    published: list[common_pb2.UpdateStatus] = []
    reporter = StatusReporter(
        published.append, UpdateRecord, lambda: ("", ""), clock=clock,
        progress_interval_s=0.5, source=lambda: "control plane (HTTP)",
    )  # fmt: skip
    reporter.report(State.DOWNLOADING, 0, 10_000, None)
    clock.now += 2.0
    reporter.report(State.DOWNLOADING, 4_000, 10_000, None)
    first, second = published
    assert first.download_source == second.download_source == "control plane (HTTP)"
    assert first.download_rate == 0  # nothing to measure yet
    assert second.download_rate == 2_000
    clock.now += 1.0
    reporter.report(State.VERIFYING, 10_000, 10_000, None)
    assert published[-1].download_source == "" and published[-1].download_rate == 0


def test_operators_read_the_source_and_rate_of_a_download() -> None:
    status = common_pb2.UpdateStatus(
        model_name="digits", model_version="2.0.0", sequence=3, bytes_done=1024,
        bytes_total=4096, download_source="http://mirror.example/blobs", download_rate=2048,
    )  # fmt: skip
    status.state = to_wire("downloading")
    view = model_view(common_pb2.DeviceModel(
        model_name="digits", assigned_version="2.0.0", sequence=3, status=status
    ))  # fmt: skip
    assert model_update_text(view) == (
        "downloading 2.0.0 1.0 KiB/4.0 KiB at 2.0 KiB/s from http://mirror.example/blobs"
    )
