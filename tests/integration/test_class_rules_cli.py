"""Issue 23 items 8 and 9 through `edgefleet classes` against an in-process
control plane (SQLite and PostgreSQL) with enrolled devices: the documented
quoted match rule matches, creating and updating a class reports how many
devices its rules match (and warns, with the values devices have, when a
rule matches none), and `--clear FIELD` removes a constraint, audited."""

from __future__ import annotations

import asyncio
import json
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from click.testing import CliRunner, Result

from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.server import ControlPlane
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import ADMIN, status_of

# The devices: name -> (arch, board model; "" for none reported).
BOARDS = {
    "pi-1": ("aarch64", "Raspberry Pi 4 Model B"),
    "pi-2": ("aarch64", "Raspberry Pi 5 Model B"),
    "pi-3": ("aarch64", "Raspberry Pi 4 Model B"),
    "jetson-1": ("aarch64", "NVIDIA Jetson Orin Nano"),
    "gw-1": ("x86_64", ""),
}
# The documented example as an operator types it in a shell.
DOCUMENTED = (
    """classes create pi-class --runtime tflite --match 'board_model glob "Raspberry Pi*"'"""
)


def _cli(server: str, *args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(
        cli, ["--server", server, "--token", ADMIN_TOKEN, *args]
    )


@dataclass
class Fleet:
    cp: ControlPlane
    op: og.OperatorServiceStub
    ids: dict[str, str]

    async def cli(self, *args: str) -> Result:
        """The CLI in a thread: the control plane runs on this loop."""
        return await asyncio.to_thread(_cli, self.cp.address, *args)

    async def ok(self, *args: str) -> Result:
        result = await self.cli(*args)
        assert result.exit_code == 0, result.output
        return result

    async def class_of(self, name: str) -> str:
        device = await self.op.GetDevice(o.GetDeviceRequest(id=self.ids[name]), metadata=ADMIN)
        return str(device.class_name)


@pytest.fixture
async def fleet(cp: ControlPlane) -> AsyncIterator[Fleet]:
    async with grpc.aio.insecure_channel(cp.address) as channel:
        op = og.OperatorServiceStub(channel)
        ids = {}
        for name, (arch, board) in BOARDS.items():
            token = await op.CreateEnrollmentToken(
                o.CreateEnrollmentTokenRequest(name=name, policy=o.ENROLLMENT_POLICY_AUTO_ACCEPT),
                metadata=ADMIN,
            )
            enrolled = await dg.DeviceServiceStub(channel).Enroll(
                d.EnrollRequest(
                    enrollment_token=token.secret, hardware_id=name, name=name,
                    hardware=c.HardwareProfile(arch=arch, board_model=board),
                )
            )  # fmt: skip
            ids[name] = enrolled.device_id
        yield Fleet(cp, op, ids)


async def test_the_documented_quoted_rule_matches_the_raspberry_pis(fleet: Fleet) -> None:
    hand = await fleet.ok("classes", "create", "hand-picked", "--runtime", "onnxruntime")
    assert "class hand-picked created; it has no match rules" in hand.stdout
    await fleet.ok("devices", "pin", fleet.ids["pi-3"], "hand-picked")

    args = shlex.split(DOCUMENTED)
    assert args[-1] == 'board_model glob "Raspberry Pi*"'
    created = await fleet.ok(*args)
    assert (
        "class pi-class created; its rules match 3 devices now (1 pinned to other classes); "
        "2 devices of 5 in no class"
    ) in created.stdout
    assert "warning" not in created.stderr
    # Stored without the quotes, and shown with them.
    shown = json.loads((await fleet.ok("classes", "show", "pi-class", "--json")).stdout)
    assert shown["match_rules"][0]["values"] == ["Raspberry Pi*"]
    assert shown["device_count"] == 2
    text = (await fleet.ok("classes", "show", "pi-class")).stdout
    assert 'board_model glob "Raspberry Pi*"' in text
    assert [await fleet.class_of(n) for n in ("pi-1", "pi-2", "pi-3", "jetson-1")] == [
        "pi-class", "pi-class", "hand-picked", "",
    ]  # fmt: skip


async def test_a_rule_matching_no_device_warns_with_the_values_devices_have(fleet: Fleet) -> None:
    typo = await fleet.ok(
        "classes", "create", "pi-typo", "--runtime", "tflite",
        "--match", 'board_model glob "Raspberry PI*"', "--match", "arch == aarch64",
    )  # fmt: skip
    assert "class pi-typo created; its rules match 0 devices now; 5 devices of 5 in no class" in (
        typo.stdout
    )
    warning = typo.stderr.strip()
    assert warning.startswith(
        "warning: rule 'board_model glob \"Raspberry PI*\"' matches no device of 5; "
        "check the values: board_model of devices: "
    ), warning
    # Most common first, then by name; the gateway reports no board model.
    assert warning.endswith(
        '"Raspberry Pi 4 Model B", "NVIDIA Jetson Orin Nano", "Raspberry Pi 5 Model B"'
    ), warning
    assert warning.count("warning:") == 1  # arch == aarch64 matches four

    # Fixed by an update, which reports again; --json keeps stdout JSON.
    fixed = await fleet.ok(
        "classes", "update", "pi-typo", "--match", "board_model glob 'Raspberry Pi*'", "--json"
    )
    report = json.loads(fixed.stdout)["match_report"]
    assert report == {
        "matching": 3, "pinned_elsewhere": 0, "outranked": 0, "fleet": 5, "unclassified": 2,
        "misses": [],
    }  # fmt: skip
    assert fixed.stderr == ""
    # A higher-priority class over the same devices: the count says where they went.
    await fleet.ok(
        "classes", "create", "pi-4", "--runtime", "tflite", "--priority", "5",
        "--match", 'board_model == "Raspberry Pi 4 Model B"',
    )  # fmt: skip
    again = await fleet.ok("classes", "update", "pi-typo", "--description", "Pis")
    assert (
        "class pi-typo updated; its rules match 3 devices now (2 in higher-priority classes)"
        in again.stdout
    )


async def test_rules_that_match_nothing_together_are_warned_about(fleet: Fleet) -> None:
    result = await fleet.ok(
        "classes", "create", "none", "--runtime", "tflite",
        "--match", "arch == x86_64", "--match", "board_model glob Raspberry*",
    )  # fmt: skip
    # The board rule matches Pis and the arch rule the gateway: not both.
    assert "warning: no device of 5 matches all 2 rules together" in result.stderr


async def test_an_unclosed_quote_is_a_usage_error_naming_the_rule(fleet: Fleet) -> None:
    rule = 'board_model glob "Raspberry Pi*'
    result = await fleet.cli("classes", "create", "x", "--runtime", "tflite", "--match", rule)
    assert result.exit_code == 2, result.output
    assert "quote is never closed" in result.stderr
    assert repr(rule) in result.stderr
    listed = await fleet.op.ListDeviceClasses(o.ListDeviceClassesRequest(), metadata=ADMIN)
    assert not listed.classes


async def test_clear_removes_constraints_and_is_audited(fleet: Fleet) -> None:
    await fleet.ok(
        "classes", "create", "pi", "--runtime", "tflite", "--latency-budget-ms", "20",
        "--max-memory-mb", "64", "--accelerator", "jetson", "--threads", "4",
        "--quantization", "int8", "--match", "arch == aarch64",
    )  # fmt: skip
    updated = await fleet.ok(
        "classes", "update", "pi", "--clear", "latency-budget-ms", "--clear", "accelerator",
        "--clear", "threads", "--clear", "quantization",
    )  # fmt: skip
    assert "class pi updated; its rules match 4 devices now" in updated.stdout
    shown = json.loads((await fleet.ok("classes", "show", "pi", "--json")).stdout)
    k = shown["constraints"]
    assert "latency_budget_p95_ms" not in k
    assert (k["max_memory_mb"], k["accelerator"], k["threads"]) == (64, "", 1)
    assert (k["runtime"], k["quantization"]) == ("RUNTIME_TFLITE", "QUANTIZATION_AUTO")
    audit = await fleet.op.ListAuditLog(
        o.ListAuditLogRequest(action="class.update", limit=1), metadata=ADMIN
    )
    (entry,) = audit.entries
    assert json.loads(entry.details)["cleared"] == [
        "accelerator", "latency_budget_p95_ms", "quantization", "threads",
    ]  # fmt: skip
    # Clearing what is not set changes nothing, and the audit says so.
    await fleet.ok("classes", "update", "pi", "--clear", "latency-budget-ms")
    audit = await fleet.op.ListAuditLog(
        o.ListAuditLogRequest(action="class.update", limit=1), metadata=ADMIN
    )
    assert "cleared" not in json.loads(audit.entries[0].details or "{}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--latency-budget-ms", "5", "--clear", "latency-budget-ms"], "exclude each other"),
        (["--clear", "runtime"], "'runtime' is not one of"),
        (["--clear", "colour"], "'colour' is not one of"),
    ],
)
async def test_clear_usage_errors(fleet: Fleet, args: list[str], message: str) -> None:
    await fleet.ok("classes", "create", "pi", "--runtime", "tflite", "--latency-budget-ms", "20")
    result = await fleet.cli("classes", "update", "pi", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"clear_constraints": ["runtime"]}, "runtime cannot be cleared"),
        ({"clear_constraints": ["colour"]}, "cannot clear 'colour': no such constraint"),
        (
            {
                "clear_constraints": ["max_memory_mb"],
                "constraints": c.ConstraintProfile(max_memory_mb=32),
            },
            "max_memory_mb is both set and cleared",
        ),
    ],
)
async def test_the_server_refuses_what_cannot_be_cleared(
    fleet: Fleet, request_fields: dict[str, object], message: str
) -> None:
    await fleet.ok("classes", "create", "pi", "--runtime", "tflite", "--max-memory-mb", "64")
    request = o.UpdateDeviceClassRequest(name="pi", **request_fields)  # type: ignore[arg-type]
    code, details = await status_of(fleet.op.UpdateDeviceClass(request, metadata=ADMIN))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    shown = await fleet.op.GetDeviceClass(o.GetDeviceClassRequest(name="pi"), metadata=ADMIN)
    assert shown.constraints.max_memory_mb == 64
    assert not shown.HasField("match_report")  # only create and update report
