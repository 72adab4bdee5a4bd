"""The audit log is searched on the server (actor, action, what it is about
by name, id or id prefix, a time range) over the whole log, not a loaded
page, and shows what each entry is about by its current name; on a real
control plane on SQLite and PostgreSQL, and through `edgefleet audit`."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from sqlalchemy import select, update
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static

from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.db.models import (
    AuditRow,
    BlobRow,
    DeviceRow,
    ModelRow,
    ModelVersionRow,
    RolloutRow,
)
from edgefleet.controlplane.server import ControlPlane
from edgefleet.controlplane.services import audit
from edgefleet.tui.app import EdgeFleetApp, make_app
from edgefleet.tui.client import FleetClient, ServerError
from edgefleet.tui.data import ALL_AUDIT, AuditQuery
from edgefleet.tui.screens.audit import AuditScreen
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import ADMIN, status_of
from testkit.tui_fake import FakeFleet

EDGE_01 = "abcd1111aaaa0001"
EDGE_02 = "abcd2222aaaa0002"
DAY = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


@pytest.fixture
async def op(cp: ControlPlane) -> AsyncIterator[og.OperatorServiceAsyncStub]:
    """`cp` (both backends) with a history: admin accepts edge-01 (day 1),
    creates class cams and the operator token alice (day 2), alice rejects
    edge-02 (day 3) and deletes class cams (day 4)."""
    with cp.db.unit_of_work() as uow:
        for device_id, name in ((EDGE_01, "edge-01"), (EDGE_02, "edge-02")):
            uow.session.add(
                DeviceRow(id=device_id, hardware_id=f"hw-{name}", name=name, state="pending",
                          credential_hash="-")
            )  # fmt: skip
        uow.commit()
    async with grpc.aio.insecure_channel(cp.address) as channel:
        stub = og.OperatorServiceStub(channel)
        days: list[tuple[int, int]] = []  # (first audit id, day)

        def mark(day: int) -> None:
            with cp.db.unit_of_work(readonly=True) as uow:
                days.append((len(uow.session.scalars(select(AuditRow.id)).all()), day))

        mark(1)
        await stub.AcceptDevice(o.AcceptDeviceRequest(id=EDGE_01), metadata=ADMIN)
        mark(2)
        await stub.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name="cams", constraints=c.ConstraintProfile(runtime=c.RUNTIME_TFLITE)
            ),
            metadata=ADMIN,
        )
        alice = await stub.CreateOperatorToken(
            o.CreateOperatorTokenRequest(name="alice", role=o.OPERATOR_ROLE_OPERATOR),
            metadata=ADMIN,
        )
        mark(3)
        as_alice = bearer_metadata(alice.secret)
        await stub.RejectDevice(
            o.RejectDeviceRequest(id=EDGE_02, reason="stolen"), metadata=as_alice
        )
        mark(4)
        await stub.DeleteDeviceClass(o.DeleteDeviceClassRequest(name="cams"), metadata=as_alice)
        # Each step's entries get its day, so time ranges are exact.
        with cp.db.unit_of_work() as uow:
            ids = sorted(uow.session.scalars(select(AuditRow.id)))
            bounds = [*days[1:], (len(ids), 0)]
            for (start, day), (end, _) in zip(days, bounds, strict=True):
                chosen = ids[start:end]
                uow.session.execute(
                    update(AuditRow)
                    .where(AuditRow.id.in_(chosen))
                    .values(at=DAY + dt.timedelta(days=day - 1, hours=12))
                )
            uow.commit()
        yield stub


async def _search(op: og.OperatorServiceAsyncStub, **fields: object) -> list[o.AuditEntry]:
    since = fields.pop("since", None)
    until = fields.pop("until", None)
    request = o.ListAuditLogRequest(**fields)  # type: ignore[arg-type]
    if isinstance(since, dt.datetime):
        request.since.FromDatetime(since)
    if isinstance(until, dt.datetime):
        request.until.FromDatetime(until)
    return list((await op.ListAuditLog(request, metadata=ADMIN)).entries)


def _actions(entries: list[o.AuditEntry]) -> list[str]:
    return [e.action for e in entries]


async def test_search_by_target_name_id_prefix_and_kind(op: og.OperatorServiceAsyncStub) -> None:
    by_name = await _search(op, target="edge-01")
    assert [(e.action, e.target, e.target_name) for e in by_name] == [
        ("device.accept", f"device:{EDGE_01}", "edge-01")
    ]
    assert await _search(op, target=EDGE_01[:8]) == by_name
    assert await _search(op, target="device:edge-01") == by_name
    assert await _search(op, target=f"device:{EDGE_01}") == by_name
    # A prefix two devices share finds both; a class by name finds it after
    # it was deleted, with no name (it has none now).
    assert _actions(await _search(op, target="abcd")) == ["device.reject", "device.accept"]
    cams = await _search(op, target="cams")
    assert [(e.action, e.target_name) for e in cams] == [
        ("class.delete", ""),
        ("class.create", ""),
    ]
    assert await _search(op, target="nothing-of-that-name") == []


async def test_wildcards_in_the_target_match_only_themselves(
    op: og.OperatorServiceAsyncStub,
) -> None:
    assert await _search(op, target="edge_01") == []
    assert await _search(op, target="edge%") == []
    assert await _search(op, target="device:%") == []
    assert await _search(op, actor="%") == []


async def test_search_by_actor_action_and_time_range(op: og.OperatorServiceAsyncStub) -> None:
    assert _actions(await _search(op, actor="alice")) == ["class.delete", "device.reject"]
    assert _actions(await _search(op, action="device")) == ["device.reject", "device.accept"]
    assert _actions(await _search(op, action="device.reject")) == ["device.reject"]
    day2 = await _search(op, since=DAY + dt.timedelta(days=1), until=DAY + dt.timedelta(days=2))
    assert sorted(_actions(day2)) == ["class.create", "operator_token.create"]
    token = next(e for e in day2 if e.action == "operator_token.create")
    assert token.target_name == "alice"
    later = await _search(op, since=DAY + dt.timedelta(days=2), actor="alice", action="device")
    assert _actions(later) == ["device.reject"]
    code, details = await status_of(
        op.ListAuditLog(
            _range(o.ListAuditLogRequest(), DAY + dt.timedelta(days=2), DAY), metadata=ADMIN
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'until' must be after 'since'" in details


def _range(
    request: o.ListAuditLogRequest, since: dt.datetime, until: dt.datetime
) -> o.ListAuditLogRequest:
    request.since.FromDatetime(since)
    request.until.FromDatetime(until)
    return request


async def test_the_search_covers_the_whole_log_and_pages(op: og.OperatorServiceAsyncStub) -> None:
    """A search is not limited to the newest page: the oldest matching entry
    is found under a page of other entries, and paging goes on from it."""
    newest = await _search(op, limit=1, target="edge-02")
    assert _actions(newest) == ["device.reject"]
    older = await _search(op, limit=1, action="device", before_id=newest[0].id)
    assert _actions(older) == ["device.accept"]


async def test_the_cli_searches_and_shows_names(
    cp: ControlPlane, op: og.OperatorServiceAsyncStub
) -> None:
    runner = CliRunner(env={"COLUMNS": "200"})
    args = ["--server", cp.address, "--token", ADMIN_TOKEN, "audit"]
    result = await asyncio.to_thread(
        runner.invoke, cli, [*args, "--target", "edge-01", "--since", "2026-11-01T00:00Z"]
    )
    assert result.exit_code == 0, result.output
    assert f"device:{EDGE_01[:8]} (edge-01)" in result.output
    assert "device.accept" in result.output and "device.reject" not in result.output
    result = await asyncio.to_thread(
        runner.invoke, cli, [*args, "--actor", "alice", "--action", "class", "--until", "1h"]
    )
    assert result.exit_code == 0, result.output
    assert "class.delete" in result.output and "device.reject" not in result.output
    result = await asyncio.to_thread(runner.invoke, cli, [*args, "--since", "yesterday"])
    assert result.exit_code == 2
    assert "neither a time ago (2h, 7d) nor an ISO 8601 time" in result.output
    result = await asyncio.to_thread(runner.invoke, cli, [*args, "--target", "abc"])
    assert result.exit_code == 0 and "No audit entries match." in result.output


async def _until(pilot: Pilot[None], condition: Callable[[], Any], what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + 30
    while not (value := condition()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the TUI never showed {what}")
        await pilot.pause(0.05)
    return value


def _rows(app: EdgeFleetApp) -> list[list[str]]:
    table = app.screen.query_one("#audit", DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


async def test_the_tui_searches_the_server_and_shows_names(
    cp: ControlPlane, op: og.OperatorServiceAsyncStub
) -> None:
    """Enter in the audit screen's filter asks the server; what it finds by
    an id prefix is shown even where the text is not in the row."""
    app = make_app(FleetClient(cp.address, ADMIN_TOKEN), watch=False)
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.press("7")
        await _until(pilot, lambda: isinstance(app.screen, AuditScreen) and _rows(app), "entries")
        assert [r[3] for r in _rows(app) if r[2] == "device.accept"] == [
            f"device:{EDGE_01[:8]} (edge-01)"
        ]
        await pilot.press("slash", *"actor=alice action=class", "enter")
        await _until(pilot, lambda: [r[2] for r in _rows(app)] == ["class.delete"], "the search")
        status = str(app.screen.query_one("#status", Static).render())
        assert "found for actor=alice action=class" in status
        filter_input = app.screen.query_one(Input)
        filter_input.value = ""
        await pilot.press("slash", *"edge-02", "enter")
        await _until(pilot, lambda: [r[2] for r in _rows(app)] == ["device.reject"], "edge-02")
        filter_input.value = ""
        await pilot.press("slash", "enter")  # an empty filter: everything again
        await _until(pilot, lambda: len(_rows(app)) > 3, "every entry")


async def test_rollouts_and_model_versions_are_named_while_they_exist(
    cp: ControlPlane, op: og.OperatorServiceAsyncStub
) -> None:
    """A rollout is named by the model version it rolls out; a model
    version's entries by it while it exists (and not once it is gone)."""
    with cp.db.unit_of_work() as uow:
        uow.session.add(BlobRow(digest="d" * 64, size_bytes=1, media_type="x"))
        uow.session.add(ModelRow(id="m1", name="digits"))
        uow.session.flush()
        uow.session.add(
            ModelVersionRow(id="mv1", model_id="m1", version="1.0.0", version_sort="1",
                            model_digest="d" * 64, size_bytes=1, inputs=[], outputs=[], opset=13,
                            created_by="admin")
        )  # fmt: skip
        uow.session.flush()
        uow.session.add(
            RolloutRow(id="7c1e0000aaaa0001", model_version_id="mv1", spec={}, state="draft",
                       created_by="admin")
        )  # fmt: skip
        audit.record(uow, "admin", "model.push", "model:digits@1.0.0")
        audit.record(uow, "admin", "model.push", "model:digits@0.9.0")  # deleted since
        audit.record(uow, "admin", "rollout.create", "rollout:7c1e0000aaaa0001")
        uow.commit()
    found = await _search(op, target="7c1e")
    assert [(e.target, e.target_name) for e in found] == [
        ("rollout:7c1e0000aaaa0001", "digits@1.0.0")
    ]
    models = await _search(op, target="digits")
    assert [(e.target, e.target_name) for e in models] == [
        ("model:digits@0.9.0", ""),
        ("model:digits@1.0.0", "digits@1.0.0"),
    ]


def test_the_tui_search_text_parses_into_fields() -> None:
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    assert AuditQuery.parse("actor=alice action=rollout edge-01", now) == AuditQuery(
        actor="alice", action="rollout", target="edge-01"
    )
    assert AuditQuery.parse("  device:edge-01 ", now) == AuditQuery(target="device:edge-01")
    assert AuditQuery.parse("", now) == ALL_AUDIT
    assert AuditQuery(actor="a", target="b").describe() == "actor=a target=b"
    # The time range (a stranger's since=2h was searched as a target).
    ranged = AuditQuery.parse("since=2h until=2026-12-07T11:30Z pi", now)
    assert ranged == AuditQuery(
        target="pi",
        since=datetime(2026, 12, 7, 10, 0, tzinfo=UTC),
        until=datetime(2026, 12, 7, 11, 30, tzinfo=UTC),
    )
    assert ranged.describe() == "target=pi since=2026-12-07 10:00 until=2026-12-07 11:30"
    # A field that is none is refused, not searched as a target.
    with pytest.raises(ValueError, match="no search field 'colour': use actor=, action="):
        AuditQuery.parse("colour=red", now)
    with pytest.raises(ValueError, match="'soon' is neither a time ago"):
        AuditQuery.parse("since=soon", now)


async def test_the_fake_searches_and_fails_as_the_server_does(
    op: og.OperatorServiceAsyncStub,
) -> None:
    fake = FakeFleet()
    found = await fake.audit_log(query=AuditQuery(action="device"))
    assert {e.action.split(".")[0] for e in found} == {"device"}
    assert [e.target for e in await fake.audit_log(query=AuditQuery(target="pi-kitchen"))] == [
        "device:pi-kitchen"
    ]
    with pytest.raises(ServerError) as fake_error:
        await fake.audit_log(query=AuditQuery(target="x" * 201))
    code, details = await status_of(
        op.ListAuditLog(o.ListAuditLogRequest(target="x" * 201), metadata=ADMIN)
    )
    assert (fake_error.value.code, fake_error.value.details) == (code, details)
