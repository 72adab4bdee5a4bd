"""`edgefleet models`: the model registry."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.base import confirm, emit, json_option, parsed, pass_env
from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.client.format import format_bytes
from edgefleet.controlplane.client.push import model_parts, push_model
from edgefleet.controlplane.client.syntax import parse_model_ref
from edgefleet.controlplane.domain.sample_archive import (
    MAX_SAMPLE_ARRAY_BYTES,
    MAX_SAMPLE_TOTAL_BYTES,
    MiB,
)
from edgefleet.fidelity import OutputSpec, SpecError, parse_output
from edgefleet.fidelity_wire import spec_to_wire
from edgefleet.v1 import operator_pb2


@click.group()
def models() -> None:
    """The model registry."""


_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _parsed_outputs(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> tuple[OutputSpec, ...]:
    try:
        return tuple(parse_output(value) for value in values)
    except SpecError as exc:
        raise click.BadParameter(str(exc)) from exc


@models.command("push")
@click.argument("name")
@click.argument("version")
@click.argument("model_file", metavar="MODEL.onnx", type=_FILE)
@click.option(
    "--sample-data",
    type=_FILE,
    help=".npz with one array per input (+ 'labels'), or a plain .npy for a model with "
    "exactly one input (its samples, no labels). Numeric/bool arrays only; at most "
    f"{MAX_SAMPLE_ARRAY_BYTES // MiB} MiB per array and {MAX_SAMPLE_TOTAL_BYTES // MiB} MiB "
    "in all, uncompressed.",
)
@click.option("--labels", type=_FILE, help="Text file, one class label per line.")
@click.option("--description", default="", help="Free text.")
@click.option(
    "--output",
    "outputs",
    multiple=True,
    metavar="NAME=KIND[:OPTION=VALUE]",
    callback=_parsed_outputs,
    help="What an output means, so builds judge it by a metric that fits; repeatable. KIND: "
    "class-scores, dense-map (threshold=T), sequence (blank=N, CTC), regression (also "
    "embeddings), state (input=NAME: fed back, not judged). Undeclared outputs are inferred "
    "from their shapes and names; `models show` says which.",
)
@click.option(
    "--min-fidelity",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="The share of the original's quality each output must keep in this version's builds "
    "(its metric, e.g. mask IoU 0.98); default: the class's --min-accuracy-retention.",
)
@json_option
@pass_env
def models_push(
    env: Connection,
    name: str,
    version: str,
    model_file: Path,
    sample_data: Path | None,
    labels: Path | None,
    description: str,
    outputs: tuple[OutputSpec, ...],
    min_fidelity: float | None,
    as_json: bool,
) -> None:
    """Upload a new version of an ONNX model (versions are immutable)."""
    parts = model_parts(model_file, sample_data=sample_data, labels=labels)
    header = operator_pb2.PushModelHeader(
        model_name=name,
        version=version,
        description=description,
        outputs=[spec_to_wire(spec) for spec in outputs],
        min_fidelity=min_fidelity,
    )
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with progress:
        task = progress.add_task(f"push {name} {version}", total=sum(p.size_bytes for p in parts))
        pushed = push_model(
            env.stub,
            header,
            parts,
            on_progress=lambda sent, _total: progress.update(task, completed=sent),
        )
    emit(as_json, pushed, lambda: render.model_version_detail(pushed))
    # On stderr, as `classes create` warns: --json output stays one document
    # (which carries them too, as push_warnings).
    for warning in pushed.push_warnings:
        click.secho(f"warning: {warning}", fg="yellow", bold=True, err=True)


@models.command("ls")
@json_option
@pass_env
def models_ls(env: Connection, as_json: bool) -> None:
    """List models."""
    resp = env.stub.ListModels(operator_pb2.ListModelsRequest())
    emit(as_json, resp.models, lambda: render.models_table(resp.models))


@models.command("show")
@click.argument("name")
@click.argument("version", required=False)
@json_option
@pass_env
def models_show(env: Connection, name: str, version: str | None, as_json: bool) -> None:
    """Show a model and its versions, or one version's inputs and outputs."""
    if version is None:
        resp = env.stub.GetModel(operator_pb2.GetModelRequest(name=name))
        emit(as_json, resp, lambda: render.model_detail(resp))
        return
    found = env.stub.GetModelVersion(
        operator_pb2.GetModelVersionRequest(model_name=name, version=version)
    )
    emit(as_json, found, lambda: render.model_version_detail(found))


_REF = click.argument("ref", metavar="MODEL@VERSION", callback=parsed(parse_model_ref))


@models.command("yank")
@_REF
@click.option(
    "--reason", required=True, help="Why; shown to whoever tries to assign it or roll it out."
)
@json_option
@pass_env
def models_yank(env: Connection, ref: tuple[str, str], reason: str, as_json: bool) -> None:
    """Refuse new assignments and rollouts of a version; devices running it
    keep it. `models unyank` undoes it."""
    name, version = ref
    found = env.stub.YankModelVersion(
        operator_pb2.YankModelVersionRequest(model_name=name, version=version, reason=reason)
    )
    emit(as_json, found, lambda: f"yanked {name}@{version}: {found.yank_reason}")


@models.command("unyank")
@_REF
@click.option("--reason", default="", help="Why, for the audit log.")
@json_option
@pass_env
def models_unyank(env: Connection, ref: tuple[str, str], reason: str, as_json: bool) -> None:
    """Allow assignments and rollouts of a yanked version again."""
    name, version = ref
    found = env.stub.UnyankModelVersion(
        operator_pb2.UnyankModelVersionRequest(model_name=name, version=version, reason=reason)
    )
    emit(as_json, found, lambda: f"unyanked {name}@{version}: it may be assigned again")


@models.command("delete")
@_REF
@click.option("--reason", default="", help="Why, for the audit log.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_env
def models_delete(
    env: Connection, ref: tuple[str, str], reason: str, yes: bool, as_json: bool
) -> None:
    """Delete a version that was never deployed, with its builds, artifacts
    and the files nothing else uses. A deployed version is refused: yank it."""
    name, version = ref
    confirm(f"Delete {name}@{version}, its builds and artifacts?", yes)
    done = env.stub.DeleteModelVersion(
        operator_pb2.DeleteModelVersionRequest(model_name=name, version=version, reason=reason)
    )
    emit(
        as_json,
        done,
        lambda: (
            f"deleted {name}@{version}: {done.builds_deleted} build(s), "
            f"{done.artifacts_deleted} artifact(s), {done.blobs_deleted} file(s) "
            f"({format_bytes(done.bytes_freed)}) freed"
        ),
    )
