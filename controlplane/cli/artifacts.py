"""`edgefleet artifacts`: the signed artifacts builds published."""

from __future__ import annotations

import click

from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.base import call_by_id, emit, json_option, now, pass_env
from edgefleet.controlplane.client.connection import Connection
from edgefleet.v1 import operator_pb2


@click.group()
def artifacts() -> None:
    """Signed artifacts published by builds."""


@artifacts.command("ls")
@click.option("--model", "model_name", help="Only artifacts of this model.")
@click.option("--version", help="Only artifacts of this model version.")
@click.option("--class", "class_name", help="Only artifacts for this device class.")
@json_option
@pass_env
def artifacts_ls(
    env: Connection,
    model_name: str | None,
    version: str | None,
    class_name: str | None,
    as_json: bool,
) -> None:
    """List artifacts."""
    resp = env.stub.ListArtifacts(
        operator_pb2.ListArtifactsRequest(
            model_name=model_name or "", model_version=version or "", class_name=class_name or ""
        )
    )
    emit(as_json, resp.artifacts, lambda: render.artifacts_table(resp.artifacts, now()))


@artifacts.command("show")
@click.argument("digest", metavar="DIGEST")
@json_option
@pass_env
def artifacts_show(env: Connection, digest: str, as_json: bool) -> None:
    """Show an artifact's signed manifest (a digest prefix is enough; a
    lighter fallback's digest shows the artifact that ships it)."""

    def list_digests() -> list[str]:
        # Fallbacks too: their digest shows the artifact that ships them.
        listed = env.stub.ListArtifacts(operator_pb2.ListArtifactsRequest()).artifacts
        return sorted({a.digest for a in listed} | {a.fallback_digest for a in listed} - {""})

    found = call_by_id(
        digest.strip().lower().removeprefix("sha256:"),
        lambda d: env.stub.GetArtifact(operator_pb2.GetArtifactRequest(digest=d)),
        list_digests,
        "artifact",
    )
    emit(as_json, found, lambda: render.artifact_detail(found))
