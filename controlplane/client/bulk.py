"""One action on many devices: which devices (a selector, or ids), and
what became of each (ok, or the server's one-line refusal).

Shared by the CLI's `devices accept/reject/label/pin/unpin/assign/unassign`
and the TUI's selection. No click, no textual: the callers bring the call
(blocking or grpc.aio) and show the result their own way."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from edgefleet.controlplane.client.errors import rpc_error_message
from edgefleet.controlplane.client.syntax import enum_name, enum_value, parse_label
from edgefleet.v1 import common_pb2, operator_pb2

# Per-device calls in flight at once: enough to accept a 1,000-device batch
# in seconds, few enough that the control plane's database pool is not
# drained by one operator.
CONCURRENCY = 16
# Devices per AssignModel/UnassignModel call: those take lists, and each call
# is one transaction; past this its all-or-nothing check and its response
# grow with no gain.
LIST_CALL_LIMIT = 1000


@dataclass(frozen=True)
class Selector:
    """Devices to act on, in the terms ListDevices filters by. Empty fields
    do not filter."""

    state: common_pb2.DeviceState.ValueType = common_pb2.DEVICE_STATE_UNSPECIFIED
    class_name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.state or self.class_name or self.labels)

    def request(self) -> operator_pb2.ListDevicesRequest:
        return operator_pb2.ListDevicesRequest(
            state=self.state,
            class_name=self.class_name,
            labels=dict(self.labels),
            include_decommissioned=self.state == common_pb2.DEVICE_STATE_DECOMMISSIONED,
        )

    def __str__(self) -> str:
        """The selector as an operator writes it: `state=pending,class=pi`."""
        parts = [f"state={enum_name(common_pb2.DeviceState, self.state)}"] if self.state else []
        parts += [f"class={self.class_name}"] if self.class_name else []
        parts += [f"{k}={v}" for k, v in sorted(self.labels.items())]
        return ",".join(parts)


def parse_selector(text: str, state: str | None = None) -> Selector:
    """`class=pi-class,site=line-3,state=pending`: `class=` and `state=` pick
    by class and state, any other `key=value` is a label the device must
    carry. `state`: a state given on its own (the CLI's --state), which must
    agree with one in the text. ValueError saying what is wrong."""
    picked_state: str | None = None
    class_name = ""
    labels: dict[str, str] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, value = parse_label(item)
        if not value:
            raise ValueError(f"selector {item!r} has no value: write {key}=VALUE")
        if key == "class":
            if class_name and class_name != value:
                raise ValueError(f"selector names two classes ({class_name}, {value}): give one")
            class_name = value
        elif key == "state":
            if picked_state and picked_state != value:
                raise ValueError(f"selector names two states ({picked_state}, {value}): give one")
            picked_state = value
        elif labels.get(key, value) != value:
            raise ValueError(f"selector gives label {key} two values ({labels[key]}, {value})")
        else:
            labels[key] = value
    if state is not None:
        if picked_state is not None and _state(picked_state) != _state(state):
            raise ValueError(f"--state {state} disagrees with state={picked_state} in the selector")
        picked_state = state
    return Selector(
        state=_state(picked_state) if picked_state else common_pb2.DEVICE_STATE_UNSPECIFIED,
        class_name=class_name,
        labels=labels,
    )


def _state(text: str) -> common_pb2.DeviceState.ValueType:
    try:
        return enum_value(common_pb2.DeviceState, text)
    except ValueError as err:
        raise ValueError(f"state: {err}") from None


@dataclass(frozen=True)
class Target:
    """A device to act on: its id, and the name to report it by."""

    device_id: str
    name: str


def targets_of(devices: Iterable[common_pb2.Device]) -> list[Target]:
    return [Target(d.id, d.name or d.id) for d in devices]


def merge_targets(*groups: Iterable[Target]) -> list[Target]:
    """The targets of every group, each device once, in first-seen order."""
    seen: dict[str, Target] = {}
    for group in groups:
        for target in group:
            seen.setdefault(target.device_id, target)
    return list(seen.values())


@dataclass(frozen=True)
class Outcome:
    """What became of one device: `error` is "" when the call succeeded,
    else the server's words (`FAILED_PRECONDITION: device is rejected`);
    `note` says more about a success (`not assigned`)."""

    device_id: str
    name: str
    error: str = ""
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class BulkResult:
    outcomes: tuple[Outcome, ...]

    @property
    def failed(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if not o.ok)

    @property
    def succeeded(self) -> int:
        return len(self.outcomes) - len(self.failed)

    def summary(self, verb: str) -> str:
        """`accepted 98 of 100; 2 failed:` (the failures follow, one a line,
        see failure_lines); `accepted 100 of 100`."""
        head = f"{verb} {self.succeeded} of {len(self.outcomes)}"
        return f"{head}; {len(self.failed)} failed:" if self.failed else head

    def failure_lines(self, shown: int = 5) -> list[str]:
        """`pi-7 (0a1b...): FAILED_PRECONDITION: device is rejected`; devices
        that failed with the same error share one line (`20 devices (pi-1,
        pi-2, ... and 15 more): NOT_FOUND: no class 'x'`), since a call for
        many devices at once, or a cause common to all, fails them alike."""
        by_error: dict[str, list[Outcome]] = {}
        for o in self.failed:
            by_error.setdefault(o.error, []).append(o)
        lines = []
        for error, alike in by_error.items():
            if len(alike) == 1:
                lines.append(f"{alike[0].name} ({alike[0].device_id}): {error}")
                continue
            names = ", ".join(o.name for o in alike[:shown])
            more = f" and {len(alike) - shown} more" if len(alike) > shown else ""
            lines.append(f"{len(alike)} devices ({names}{more}): {error}")
        return lines

    def short_summary(self, verb: str) -> str:
        """One line for a notification: `accepted 98, 2 failed: pi-7:
        FAILED_PRECONDITION: device is rejected` (the first failure's reason)."""
        if not self.failed:
            return f"{verb} {self.succeeded}"
        first = self.failed[0]
        return f"{verb} {self.succeeded}, {len(self.failed)} failed: {first.name}: {first.error}"

    def as_json(self) -> list[dict[str, object]]:
        return [
            {"device_id": o.device_id, "name": o.name, "ok": o.ok, "error": o.error, "note": o.note}
            for o in self.outcomes
        ]


# How a caller's failure reads: the message for an error it expects (the
# device is refused, not found...), None for one that is not about this
# device and must propagate (a bug).
Failure = Callable[[Exception], str | None]


def rpc_failure(err: Exception) -> str | None:
    """A failed gRPC call (either stack) as `CODE: details`."""
    return rpc_error_message(err) if isinstance(err, grpc.RpcError) else None


def apply_each(
    targets: Sequence[Target],
    call: Callable[[str], object],
    *,
    failure: Failure = rpc_failure,
    concurrency: int = CONCURRENCY,
) -> BulkResult:
    """`call(device_id)` for every target on a blocking stub, `concurrency`
    at a time (a blocking channel takes calls from many threads)."""

    def one(target: Target) -> Outcome:
        try:
            call(target.device_id)
        except Exception as err:
            message = failure(err)
            if message is None:
                raise
            return Outcome(target.device_id, target.name, message)
        return Outcome(target.device_id, target.name)

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(targets)))) as pool:
        return BulkResult(tuple(pool.map(one, targets)))


async def apply_each_async(
    targets: Sequence[Target],
    call: Callable[[str], Awaitable[object]],
    *,
    failure: Failure = rpc_failure,
    concurrency: int = CONCURRENCY,
) -> BulkResult:
    """apply_each on an asyncio stack."""
    gate = asyncio.Semaphore(concurrency)

    async def one(target: Target) -> Outcome:
        async with gate:
            try:
                await call(target.device_id)
            except Exception as err:
                message = failure(err)
                if message is None:
                    raise
                return Outcome(target.device_id, target.name, message)
        return Outcome(target.device_id, target.name)

    return BulkResult(tuple(await asyncio.gather(*(one(t) for t in targets))))


def chunks(targets: Sequence[Target], size: int = LIST_CALL_LIMIT) -> list[Sequence[Target]]:
    """`targets` in lists of at most `size`, for calls that take device lists."""
    return [targets[i : i + size] for i in range(0, len(targets), size)]


def chunk_outcomes(
    chunk: Sequence[Target], error: str = "", notes: Mapping[str, str] | None = None
) -> list[Outcome]:
    """The outcome of one list call for each of its devices: all refused
    alike (`error`; such calls are all or nothing), or all done, with
    `notes` by device id."""
    notes = notes or {}
    return [Outcome(t.device_id, t.name, error, notes.get(t.device_id, "")) for t in chunk]


def apply_chunked(
    targets: Sequence[Target],
    call: Callable[[list[str]], Mapping[str, str] | None],
    *,
    failure: Failure = rpc_failure,
) -> BulkResult:
    """`call(device_ids)` once per LIST_CALL_LIMIT targets (AssignModel,
    UnassignModel), one after the other; `call` may return notes by device
    id (`not assigned`)."""
    outcomes: list[Outcome] = []
    for chunk in chunks(targets):
        try:
            notes = call([t.device_id for t in chunk])
        except Exception as err:
            message = failure(err)
            if message is None:
                raise
            outcomes += chunk_outcomes(chunk, message)
            continue
        outcomes += chunk_outcomes(chunk, notes=notes)
    return BulkResult(tuple(outcomes))


async def apply_chunked_async(
    targets: Sequence[Target],
    call: Callable[[list[str]], Awaitable[Mapping[str, str] | None]],
    *,
    failure: Failure = rpc_failure,
) -> BulkResult:
    """apply_chunked on an asyncio stack."""
    outcomes: list[Outcome] = []
    for chunk in chunks(targets):
        try:
            notes = await call([t.device_id for t in chunk])
        except Exception as err:
            message = failure(err)
            if message is None:
                raise
            outcomes += chunk_outcomes(chunk, message)
            continue
        outcomes += chunk_outcomes(chunk, notes=notes)
    return BulkResult(tuple(outcomes))


def unassign_notes(response: operator_pb2.UnassignModelResponse) -> dict[str, str]:
    """UnassignModel's devices that did not hold the model: done, nothing removed."""
    return {device_id: "not assigned" for device_id in response.not_assigned}
