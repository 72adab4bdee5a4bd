"""`edgefleet artifacts`: the signed artifacts builds published."""

from __future__ import annotations

from pathlib import Path

import click

from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.base import (
    CliError,
    call_by_id,
    emit,
    json_option,
    now,
    pass_env,
)
from edgefleet.controlplane.client.connection import Connection
from edgefleet.extras import require
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


@artifacts.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="EDGEFLEET_DATA_DIR",
    default="edgefleet-data",
    show_default=True,
    help="The control plane's data directory (its blobs, and its SQLite database).",
)
@click.option("--db", "db_url", help="The control plane's database URL, if not SQLite.")
@click.option(
    "--blob-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="EDGEFLEET_BLOB_DIR",
    help="The control plane's blob directory, if not DATA_DIR/blobs.",
)
def artifacts_export(
    directory: Path, data_dir: Path, db_url: str | None, blob_dir: Path | None
) -> None:
    """Write every published artifact into DIRECTORY by digest (DIRECTORY/<sha256>), for a
    mirror: serve DIRECTORY with any HTTP server and start the control plane with
    --artifact-mirror URL. Runs beside the control plane (its data dir); run it again after
    new builds: files already there with the right bytes are kept."""
    require("server", "sqlalchemy", part="`edgefleet artifacts export`")
    from sqlalchemy.exc import SQLAlchemyError

    from edgefleet.controlplane.config import ServerConfig
    from edgefleet.controlplane.server import open_database
    from edgefleet.controlplane.services.blobs import BlobStore
    from edgefleet.controlplane.services.mirror import export_blobs

    if db_url is None and not (data_dir / "edgefleet.db").exists():
        raise CliError(f"no control plane data in {data_dir} (give --data-dir, or --db)")
    config = ServerConfig(data_dir=data_dir, db_url=db_url, blob_store_dir=blob_dir)
    db = open_database(config)
    try:
        report = export_blobs(db, BlobStore(config.blob_dir), directory)
    except SQLAlchemyError as err:
        raise CliError(f"database: {getattr(err, 'orig', None) or err}") from None
    except OSError as err:
        raise CliError(f"{directory}: {err.strerror or err}") from None
    finally:
        db.dispose()
    click.echo(
        f"{len(report.written)} written, {len(report.replaced)} replaced (wrong bytes), "
        f"{len(report.kept)} already there; {report.bytes_written:,} bytes into {directory}"
    )
