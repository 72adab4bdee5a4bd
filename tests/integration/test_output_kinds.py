"""Output kinds and the fidelity floor through a real server (issue 22): a
push declares them (`models push --output NAME=KIND:OPTION --min-fidelity`),
the version stores every output's kind (declared or inferred), its builds
carry them in their target (and so in their dedup key), and every hostile
declaration is INVALID_ARGUMENT naming what is wrong, with nothing stored.
On SQLite and PostgreSQL (`cp`)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import grpc
import pytest
from click.testing import CliRunner

from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.server import ControlPlane
from edgefleet.demo.models import BuiltModel
from edgefleet.fidelity import OutputKind, OutputSpec
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.builds import build_service
from testkit.harness import ADMIN_TOKEN
from testkit.models import model_parts, push_requests
from testkit.rpc import ADMIN, status_of


async def _class(op: og.OperatorServiceAsyncStub) -> None:
    await op.CreateDeviceClass(
        o.CreateDeviceClassRequest(
            name="arm",
            constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME),
            match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=["aarch64"])],
        ),
        metadata=ADMIN,
    )


def _requests(version: str, digits: BuiltModel, **header: Any) -> Any:
    """PushModel's stream with `header` fields added to its header."""

    async def stream() -> Any:
        parts = model_parts(model=digits.model, sample_data=digits.sample_data)
        first = True
        async for request in push_requests("digits", version, parts):
            if first:
                for name, value in header.items():
                    if name == "outputs":
                        request.header.outputs.extend(value)
                    else:
                        setattr(request.header, name, value)
                first = False
            yield request

    return stream()


async def test_declared_kinds_and_floor_are_stored_and_reach_the_build(
    cp: ControlPlane, digits: BuiltModel
) -> None:
    async with grpc.aio.insecure_channel(cp.address) as channel:
        op = og.OperatorServiceStub(channel)
        await _class(op)
        declared = c.OutputSpec(name="probabilities", kind=c.OUTPUT_KIND_CLASS_SCORES)
        pushed = await op.PushModel(
            _requests("1.0.0", digits, outputs=[declared], min_fidelity=0.98), metadata=ADMIN
        )
        assert [(s.name, s.kind, s.declared) for s in pushed.output_specs] == [
            ("probabilities", c.OUTPUT_KIND_CLASS_SCORES, True)
        ]
        assert pushed.min_fidelity == pytest.approx(0.98)
        # The same bytes without declarations: every kind inferred, no floor.
        plain = await op.PushModel(_requests("1.0.1", digits), metadata=ADMIN)
        assert [(s.kind, s.declared) for s in plain.output_specs] == [
            (c.OUTPUT_KIND_CLASS_SCORES, False)
        ]
        assert not plain.HasField("min_fidelity")
        for _ in range(100):
            builds = (await op.ListBuilds(o.ListBuildsRequest(), metadata=ADMIN)).builds
            if len(builds) == 2:
                break
            await asyncio.sleep(0.05)
        by_version = {b.model_version: b for b in builds}
        # A floor of its own is another build, not the twin's result.
        assert by_version["1.0.0"].dedup_key != by_version["1.0.1"].dedup_key
        jobs = {}
        service = build_service(cp)
        for _ in range(2):
            job = await asyncio.to_thread(service.claim, "runner", 60)
            assert job is not None
            jobs[job.build_id] = job.target
        strict = jobs[by_version["1.0.0"].id]
        assert strict.outputs == (
            OutputSpec("probabilities", OutputKind.CLASS_SCORES, declared=True),
        )
        assert (
            strict.min_fidelity == pytest.approx(0.98)
            and strict.fidelity_floor == strict.min_fidelity
        )
        assert jobs[by_version["1.0.1"].id].min_fidelity is None


def _spec(**fields: Any) -> c.OutputSpec:
    return c.OutputSpec(**{"name": "probabilities", "kind": c.OUTPUT_KIND_DENSE_MAP, **fields})


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ({"outputs": [_spec(kind=c.OUTPUT_KIND_UNSPECIFIED)]}, "'probabilities' has no known kind"),
        ({"outputs": [_spec(kind=99)]}, "has no known kind"),
        ({"outputs": [_spec(name="boxes")]}, "its outputs are ['probabilities']"),
        ({"outputs": [_spec(), _spec()]}, "declared twice"),
        ({"outputs": [_spec(name="p" * 300)]}, "name is 300 characters long; at most 256"),
        ({"outputs": [_spec(name="prob\x00abilities")]}, "name"),
        ({"outputs": [_spec(threshold=math.nan)]}, "threshold"),
        ({"outputs": [_spec(kind=c.OUTPUT_KIND_STATE, state_input="input")]}, "cannot be fed into"),
        ({"outputs": [_spec(kind=c.OUTPUT_KIND_STATE, state_input="h0")]}, "no input of that name"),
        ({"outputs": [_spec(kind=c.OUTPUT_KIND_SEQUENCE, blank=-3)]}, "blank"),
        ({"outputs": [_spec()] * 65}, "header.outputs has 65 items; at most 64"),
        ({"min_fidelity": 0.0}, "min fidelity 0.0 is not in (0, 1]"),
        ({"min_fidelity": 1.5}, "min_fidelity"),
        ({"min_fidelity": math.nan}, "min_fidelity"),
    ],
)  # fmt: skip
async def test_hostile_declarations_are_invalid_argument_and_store_nothing(
    cp: ControlPlane, digits: BuiltModel, header: dict[str, Any], says: str
) -> None:
    async with grpc.aio.insecure_channel(cp.address) as channel:
        op = og.OperatorServiceStub(channel)
        code, details = await status_of(op.PushModel(_requests("1.0.0", digits, **header),
                                                     metadata=ADMIN))  # fmt: skip
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert says in details, details
        assert not (await op.ListModels(o.ListModelsRequest(), metadata=ADMIN)).models


async def test_the_cli_declares_shows_and_refuses_kinds(
    cp: ControlPlane, digits: BuiltModel
) -> None:
    runner = CliRunner(env={"COLUMNS": "200"})

    async def edgefleet(*args: str) -> Any:
        return await asyncio.to_thread(
            runner.invoke, cli, ["--server", cp.address, "--token", ADMIN_TOKEN, *args]
        )

    files = [str(digits.model), "--sample-data", str(digits.sample_data)]
    bad = await edgefleet("models", "push", "digits", "1.0.0", *files, "--output", "probabilities")
    assert bad.exit_code == 2 and "expected NAME=KIND[:OPTION=VALUE]" in bad.output
    unknown = await edgefleet(
        "models", "push", "digits", "1.0.0", *files, "--output", "boxes=dense-map"
    )
    assert unknown.exit_code != 0 and "no output of that name" in unknown.output
    pushed = await edgefleet(
        "models", "push", "digits", "1.0.0", *files,
        "--output", "probabilities=dense-map:threshold=0.2", "--min-fidelity", "0.9",
    )  # fmt: skip
    assert pushed.exit_code == 0, pushed.output
    shown = await edgefleet("models", "show", "digits", "1.0.0")
    assert "dense-map, threshold 0.2 (declared)" in shown.output, shown.output
    assert "min fidelity" in shown.output and "0.9" in shown.output
    out_of_range = await edgefleet(
        "models", "push", "digits", "1.0.1", *files, "--min-fidelity", "0"
    )
    assert out_of_range.exit_code == 2 and "--min-fidelity" in out_of_range.output
