"""Issue 18's limits table (api/limits.py) and paging.fit, without a server:
the table names real fields and covers every request field, the largest
device the limits allow fits a response many times, fit cuts what does not,
and the agent's own update reasons always pass. Against a real server:
tests/e2e/test_sec_limits.py."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor

from edgefleet.controlplane.api import limits, paging
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import operator_pb2 as o

WIDE = "\U0001f600"
HUGE_HOSTNAME = "h" * 8_000_000


def _request_types() -> list[Any]:
    services = (
        d.DESCRIPTOR.services_by_name["DeviceService"],
        o.DESCRIPTOR.services_by_name["OperatorService"],
    )
    return [method.input_type for service in services for method in service.methods]


def _fields_needing_a_limit() -> set[str]:
    """`Message.field` of every string, bytes, repeated or map field that a
    request of either service can carry, at any depth (ours, not Google's)."""
    found: set[str] = set()
    seen: set[str] = set()
    pending = _request_types()
    while pending:
        message = pending.pop()
        if message.full_name in seen or not message.full_name.startswith("edgefleet.v1."):
            continue
        seen.add(message.full_name)
        for field in message.fields:
            key = f"{message.name}.{field.name}"
            is_map = (
                field.type == FieldDescriptor.TYPE_MESSAGE
                and field.message_type.GetOptions().map_entry
            )
            if field.type == FieldDescriptor.TYPE_MESSAGE and not is_map:
                pending.append(field.message_type)
            if field.is_repeated or field.type == FieldDescriptor.TYPE_STRING:
                found.add(key)
    return found


def test_the_limits_table_names_real_fields_and_covers_every_request_field() -> None:
    assert limits.unknown_keys() == []
    # So the table is the documentation: no field falls back to DEFAULT.
    missing = _fields_needing_a_limit() - set(limits.LIMITS)
    assert not missing, sorted(missing)


def _at_limits(message: Any) -> None:
    """Fill every string of `message` to its limit in four-byte characters
    (ASCII where the field takes only that) and every repeated field to its
    count, recursively: the largest such message the limits allow."""
    descriptor = message.DESCRIPTOR
    for field in descriptor.fields:
        limit = limits.LIMITS.get(f"{descriptor.name}.{field.name}", limits.DEFAULT)
        char = "a" if limit.ascii else WIDE
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                entries = getattr(message, field.name)
                for i in range(limit.count):
                    key = f"{i:0{limit.key_chars}d}"
                    entries[key] = char * limit.chars
            elif field.message_type.full_name.startswith("edgefleet.v1."):
                if field.is_repeated:
                    for _ in range(limit.count):
                        _at_limits(getattr(message, field.name).add())
                else:
                    _at_limits(getattr(message, field.name))
        elif field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                getattr(message, field.name).extend([char * limit.chars] * limit.count)
            else:
                setattr(message, field.name, char * limit.chars)


def test_the_largest_device_the_limits_allow_fits_many_times_in_a_response() -> None:
    """What a device can make its row hold (EnrollRequest and Hello are all
    it writes): far below a response, so a page always holds a device and a
    row is only ever cut when it was stored before the limits."""
    largest = c.Device(id="d" * 32, class_name="c" * 100, class_id="i" * 32)
    enroll = d.EnrollRequest()
    _at_limits(enroll)
    hello = d.Hello()
    _at_limits(hello)
    # The enrollment keeps 200 characters of the name (the column's).
    largest.hardware_id, largest.name = enroll.hardware_id, enroll.name[:200]
    largest.labels.update(enroll.labels)
    largest.hardware.CopyFrom(hello.hardware)
    largest.runtime.CopyFrom(hello.runtime)
    largest.update.CopyFrom(hello.update)
    size = largest.ByteSize()
    assert size < paging.MAX_RESPONSE_BYTES // 20, size
    # The cursor of the longest name still makes a token the server accepts.
    request = o.ListDevicesRequest()
    page_token = paging.encode(request, (largest.name, largest.id))
    assert len(page_token) <= limits.PAGE_TOKEN.chars
    request.page_token = page_token
    assert paging.decode(request, parts=2) == (largest.name, largest.id)


def test_fit_drops_the_last_rows_and_cuts_a_row_too_large_alone() -> None:
    budget = 1_000_000
    devices = o.ListDevicesResponse(next_page_token="t" * 100)
    for i in range(30):
        devices.devices.add(id=f"{i}", name="n" * 50_000)
    assert paging.fit(devices, budget) == 11
    assert len(devices.devices) == 19 and devices.ByteSize() <= budget
    assert devices.next_page_token == "t" * 100

    alone = o.ListDevicesResponse()
    alone.devices.add(id="x", hardware=c.HardwareProfile(hostname=HUGE_HOSTNAME))
    alone.devices.add(id="y")
    assert paging.fit(alone, budget) == 1
    assert [x.id for x in alone.devices] == ["x"]
    assert alone.devices[0].hardware.hostname == "h" * 253

    # A rollout's own fields stay; its device rows go, then its exclusions.
    rollout = o.Rollout(id="r", reason="why")
    rollout.devices.extend(o.RolloutDevice(device_id=f"{i:06d}", reason="r" * 100)
                           for i in range(20_000))  # fmt: skip
    rollout.excluded.add(device_id="e", reason="x")
    dropped = paging.fit(rollout, budget)
    assert rollout.ByteSize() <= budget and rollout.id == "r" and rollout.reason == "why"
    assert len(rollout.devices) + dropped == 20_000 and len(rollout.excluded) == 1

    small = o.ListModelsResponse(models=[c.Model(name="m")])
    assert paging.fit(small, budget) == 0 and len(small.models) == 1


def test_the_agents_update_reasons_always_pass_the_limits() -> None:
    """A reason the agent joins from exception texts over retries may be long
    and hold anything; what it reports must never get its own Sync refused."""
    from edgefleet.agent.update.remote import reportable
    from edgefleet.controlplane.api import limits as api_limits
    from edgefleet.v1 import device_pb2

    raw = ("download failed: \x00\x1b[31mboom\x07\n" * 5000) + "the latest failure"

    def status(reason: str) -> device_pb2.AgentMessage:
        return device_pb2.AgentMessage(
            status=device_pb2.StatusReport(
                update=c.UpdateStatus(state=c.UPDATE_STATE_FAILED, reason=reason)
            )
        )

    with pytest.raises(InvalidArgument, match="reason"):
        api_limits.check(status(raw))
    cleaned = reportable(raw)
    api_limits.check(status(cleaned))
    assert cleaned.endswith("the latest failure") and cleaned.startswith("download failed")
    assert reportable("plain reason\nsecond line") == "plain reason\nsecond line"
