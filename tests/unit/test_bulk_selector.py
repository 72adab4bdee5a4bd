"""The bulk-action selector (`class=pi-class,site=line-3,state=pending`) and
what a bulk run reports, with no server: parsing is pure, and the runners
are driven with plain functions that fail as the gRPC stacks do."""

from __future__ import annotations

import grpc
import pytest

from edgefleet.controlplane.client import bulk
from edgefleet.controlplane.client.bulk import Outcome, Selector, Target, parse_selector
from edgefleet.tui.client import ServerError, client_failure
from edgefleet.v1 import common_pb2 as c


def test_class_state_and_labels() -> None:
    picked = parse_selector(" class=pi-class, site=line-3 ,state=Pending,tier=a=b")
    assert picked == Selector(c.DEVICE_STATE_PENDING, "pi-class", {"site": "line-3", "tier": "a=b"})
    request = picked.request()
    assert (request.state, request.class_name) == (c.DEVICE_STATE_PENDING, "pi-class")
    assert dict(request.labels) == {"site": "line-3", "tier": "a=b"}
    assert not request.include_decommissioned
    assert str(picked) == "state=pending,class=pi-class,site=line-3,tier=a=b"


def test_state_option_and_empty_selector() -> None:
    assert parse_selector("", "pending") == Selector(c.DEVICE_STATE_PENDING)
    assert parse_selector("state=pending", "PENDING").state == c.DEVICE_STATE_PENDING
    assert parse_selector("").empty and parse_selector(" , ").empty
    assert parse_selector("state=decommissioned").request().include_decommissioned


@pytest.mark.parametrize(
    ("text", "state", "says"),
    [
        ("pi-class", None, "label 'pi-class' must look like key=value"),
        ("class=", None, "selector 'class=' has no value: write class=VALUE"),
        ("class=a,class=b", None, "names two classes (a, b)"),
        ("state=pending,state=accepted", None, "names two states"),
        ("site=a,site=b", None, "gives label site two values (a, b)"),
        ("state=asleep", None, "state: 'asleep' is not one of: pending, accepted"),
        ("state=accepted", "pending", "--state pending disagrees with state=accepted"),
    ],
)
def test_bad_selectors_say_what_is_wrong(text: str, state: str | None, says: str) -> None:
    with pytest.raises(ValueError, match=r".*") as info:
        parse_selector(text, state)
    assert says in str(info.value)


def test_merge_keeps_each_device_once_in_order() -> None:
    a, b, a2 = Target("a", "pi-a"), Target("b", "pi-b"), Target("a", "other")
    assert bulk.merge_targets([a, b], [a2, Target("c", "c")]) == [a, b, Target("c", "c")]


class _Refused(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What the blocking stack raises: both RpcError and Call."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_apply_each_collects_every_outcome() -> None:
    targets = [Target(str(i), f"pi-{i}") for i in range(40)]

    def accept(device_id: str) -> None:
        if device_id in ("7", "9"):
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, f"device {device_id} is gone")

    result = bulk.apply_each(targets, accept)
    assert [o.device_id for o in result.outcomes] == [t.device_id for t in targets]
    assert result.succeeded == 38
    assert result.summary("accepted") == "accepted 38 of 40; 2 failed:"
    assert result.failure_lines() == [
        "pi-7 (7): FAILED_PRECONDITION: device 7 is gone",
        "pi-9 (9): FAILED_PRECONDITION: device 9 is gone",
    ]
    assert result.short_summary("accepted") == (
        "accepted 38, 2 failed: pi-7: FAILED_PRECONDITION: device 7 is gone"
    )


def test_devices_failing_alike_share_one_line() -> None:
    """A stranger's `unassign --selector` printed one error 20 times (one
    call fails its whole chunk alike)."""
    targets = [Target(str(i), f"pi-{i}") for i in range(20)]

    def unassign(device_id: str) -> None:
        if device_id != "3":
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, "in an active rollout")
        raise _Refused(grpc.StatusCode.NOT_FOUND, "no such device")

    result = bulk.apply_each(targets, unassign)
    assert result.failure_lines() == [
        "19 devices (pi-0, pi-1, pi-2, pi-4, pi-5 and 14 more): FAILED_PRECONDITION: in an "
        "active rollout",
        "pi-3 (3): NOT_FOUND: no such device",
    ]


def test_a_bug_is_not_a_device_failure() -> None:
    def broken(device_id: str) -> None:
        raise KeyError(device_id)

    with pytest.raises(KeyError):
        bulk.apply_each([Target("a", "a")], broken)


async def test_apply_each_async_keeps_at_most_16_in_flight() -> None:
    import asyncio

    flying, most = 0, 0

    async def accept(device_id: str) -> None:
        nonlocal flying, most
        flying += 1
        most = max(most, flying)
        await asyncio.sleep(0.001)
        flying -= 1
        if device_id == "3":
            raise ServerError(grpc.StatusCode.NOT_FOUND, "no such device: 3")

    targets = [Target(str(i), str(i)) for i in range(100)]
    result = await bulk.apply_each_async(targets, accept, failure=client_failure)
    assert most == bulk.CONCURRENCY
    assert result.failed == (Outcome("3", "3", "NOT_FOUND: no such device: 3"),)


def test_list_calls_take_1000_devices_each_all_or_nothing() -> None:
    targets = [Target(f"d{i}", f"d{i}") for i in range(2500)]
    calls: list[int] = []

    def assign(ids: list[str]) -> dict[str, str]:
        calls.append(len(ids))
        if len(calls) == 2:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, "d1500: no build")
        return {ids[0]: "not assigned"}

    result = bulk.apply_chunked(targets, assign)
    assert calls == [1000, 1000, 500]
    assert len(result.failed) == 1000
    assert {o.error for o in result.failed} == {"FAILED_PRECONDITION: d1500: no build"}
    assert result.outcomes[0].note == "not assigned" and result.outcomes[0].ok
    assert result.summary("assigned digits@1.0.0 to") == (
        "assigned digits@1.0.0 to 1500 of 2500; 1000 failed:"
    )
