"""A device class's delivery settings (issue 24): its own artifact mirrors
and its download rate cap, through `edgefleet classes` against an
in-process control plane (SQLite and PostgreSQL): set, shown, replaced,
cleared, audited; hostile values refused whole with a readable reason."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.server import ControlPlane
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import ADMIN, status_of

SITE = "https://mirror.site-a.example/blobs"
SPARE = "http://10.0.0.5:8080/artifacts"


def _cli(server: str, *args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(
        cli, ["--server", server, "--token", ADMIN_TOKEN, *args]
    )


async def _ok(cp: ControlPlane, *args: str) -> Result:
    result = await asyncio.to_thread(_cli, cp.address, *args)
    assert result.exit_code == 0, result.output
    return result


async def _shown(cp: ControlPlane, name: str) -> dict[str, Any]:
    return json.loads((await _ok(cp, "classes", "show", name, "--json")).stdout)  # type: ignore[no-any-return]


@pytest.fixture
async def op(cp: ControlPlane) -> AsyncIterator[og.OperatorServiceStub]:
    async with grpc.aio.insecure_channel(cp.address) as channel:
        yield og.OperatorServiceStub(channel)


async def test_set_shown_replaced_cleared_and_audited(
    cp: ControlPlane, op: og.OperatorServiceStub
) -> None:
    created = await _ok(
        cp, "classes", "create", "site-a", "--runtime", "onnxruntime",
        "--artifact-mirror", SITE + "/", "--artifact-mirror", SPARE, "--max-download-rate", "2M",
    )  # fmt: skip
    # Stored canonical (no trailing slash), in order; shown to people too.
    lines = [line.strip() for line in created.stdout.splitlines()]
    assert f"mirrors          {SITE}" in lines and SPARE in lines, created.stdout
    assert "download cap     2.0 MiB/s" in lines, created.stdout
    shown = await _shown(cp, "site-a")
    assert shown["artifact_mirrors"] == [SITE, SPARE]
    assert int(shown["max_download_rate"]) == 2 * 1024 * 1024

    # Other changes keep the delivery settings.
    await _ok(cp, "classes", "update", "site-a", "--description", "site A", "--threads", "2")
    assert (await _shown(cp, "site-a"))["artifact_mirrors"] == [SITE, SPARE]
    # --artifact-mirror replaces the list; the cap stays.
    await _ok(cp, "classes", "update", "site-a", "--artifact-mirror", SPARE)
    shown = await _shown(cp, "site-a")
    assert shown["artifact_mirrors"] == [SPARE] and int(shown["max_download_rate"]) == 2 * 1024**2
    audit = await op.ListAuditLog(
        o.ListAuditLogRequest(action="class.update", limit=1), metadata=ADMIN
    )
    assert json.loads(audit.entries[0].details) == {
        "mirrors": [SPARE], "max_download_rate": 2 * 1024**2,
    }  # fmt: skip
    # Cleared, both ways a person would try.
    await _ok(cp, "classes", "update", "site-a", "--clear", "artifact-mirror")
    await _ok(cp, "classes", "update", "site-a", "--max-download-rate", "0")
    shown = await _shown(cp, "site-a")
    assert shown.get("artifact_mirrors") == [] and int(shown.get("max_download_rate", 0)) == 0
    text = (await _ok(cp, "classes", "show", "site-a")).stdout
    assert "(none: the server's mirrors, then the control plane)" in text
    await _ok(cp, "classes", "update", "site-a", "--max-download-rate", "500K")
    await _ok(cp, "classes", "update", "site-a", "--clear", "max-download-rate")
    assert int((await _shown(cp, "site-a")).get("max_download_rate", 0)) == 0


@pytest.mark.parametrize(
    ("mirrors", "rate", "why"),
    [
        (["ftp://mirror.example/blobs"], 0, "not an http:// or https:// URL"),
        (["https://user:secret@mirror.example/blobs"], 0, "no query, fragment or user:password"),
        (["https://mirror.example/a\x00b"], 0, "control character U+0000"),
        (["https://mirror.example/" + "a" * 3000], 0, "at most 2,048"),
        ([f"https://m{i}.example" for i in range(9)], 0, "at most 8"),
        ([SITE, SITE + "/"], 0, "listed twice"),
        ([SITE], 10, "between 1024 bytes/s"),
    ],
)
async def test_hostile_values_are_refused_and_change_nothing(
    cp: ControlPlane, op: og.OperatorServiceStub, mirrors: list[str], rate: int, why: str
) -> None:
    base = c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME)
    code, details = await status_of(
        op.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name="bad", constraints=base, artifact_mirrors=mirrors, max_download_rate=rate
            ),
            metadata=ADMIN,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and why in details, details
    listed = await op.ListDeviceClasses(o.ListDeviceClassesRequest(), metadata=ADMIN)
    assert not listed.classes
    # The same values in an update: refused, the stored ones kept.
    await op.CreateDeviceClass(
        o.CreateDeviceClassRequest(name="good", constraints=base, artifact_mirrors=[SPARE]),
        metadata=ADMIN,
    )
    code, details = await status_of(
        op.UpdateDeviceClass(
            o.UpdateDeviceClassRequest(
                name="good", artifact_mirrors=mirrors, replace_artifact_mirrors=True,
                max_download_rate=rate or None,
            ),
            metadata=ADMIN,
        )
    )  # fmt: skip
    assert code == grpc.StatusCode.INVALID_ARGUMENT and why in details, details
    kept = await op.GetDeviceClass(o.GetDeviceClassRequest(name="good"), metadata=ADMIN)
    assert list(kept.artifact_mirrors) == [SPARE] and kept.max_download_rate == 0


async def test_the_cli_says_what_a_rate_looks_like(cp: ControlPlane) -> None:
    result = await asyncio.to_thread(
        _cli, cp.address, "classes", "create", "x", "--runtime", "tflite",
        "--max-download-rate", "fast",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "give bytes per second, e.g. 500K, 2M or 2MiB/s" in result.stderr
    both = await asyncio.to_thread(
        _cli, cp.address, "classes", "update", "x", "--artifact-mirror", SITE,
        "--clear", "artifact-mirror",
    )  # fmt: skip
    assert both.exit_code == 2 and "exclude each other" in both.stderr
