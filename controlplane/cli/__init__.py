"""The operator CLI, `edgefleet`.

Every command is a thin adapter over the client library (controlplane.client):
parse options (its syntax and stages modules), build the request, call
OperatorService, render the answer (controlplane.cli.render, or JSON with
--json). Server and database code is imported only inside the
`server` and `db upgrade` commands, so the client side stays light."""

from __future__ import annotations

import dataclasses
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from edgefleet.extras import MissingExtra, missing_modules, require

# Before click is imported: on a device's install (the agent's base, no [cli])
# `edgefleet` says in one line what to install.
if _missing := missing_modules("click", "rich"):
    raise MissingExtra("edgefleet.controlplane.cli", "cli", _missing)

import click
from click.shell_completion import CompletionItem

from edgefleet.controlplane.cli.artifacts import artifacts
from edgefleet.controlplane.cli.audit import audit
from edgefleet.controlplane.cli.base import CliError, ConnectionSettings, F, RootGroup, parsed
from edgefleet.controlplane.cli.builds import builds
from edgefleet.controlplane.cli.classes import classes
from edgefleet.controlplane.cli.context import context
from edgefleet.controlplane.cli.devices import devices
from edgefleet.controlplane.cli.models import models
from edgefleet.controlplane.cli.rollouts import rollouts
from edgefleet.controlplane.cli.signing_keys import signing_keys
from edgefleet.controlplane.cli.simulate import simulate
from edgefleet.controlplane.cli.telemetry import telemetry
from edgefleet.controlplane.cli.tokens import operator_tokens, tokens
from edgefleet.controlplane.cli.toolchain import toolchain
from edgefleet.controlplane.cli.tui import tui
from edgefleet.controlplane.client.connection import DEFAULT_SERVER
from edgefleet.controlplane.client.contexts import ContextError, contexts_path, load
from edgefleet.controlplane.client.syntax import parse_address, parse_duration
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.domain.delivery import parse_base_url


def _advertised_address(text: str) -> str:
    """An address agents are told to reach: any host (theirs, when empty),
    but a real port."""
    address = parse_address(text, any_host=True)
    if int(address.rpartition(":")[2]) == 0:
        raise ValueError(f"{text!r}: agents cannot reach port 0; give the port they reach")
    return address


def _config_default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(ServerConfig) if f.name == name)


def _data_dir_option(f: F) -> F:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="EDGEFLEET_DATA_DIR",
        default=Path("edgefleet-data"),
        show_default=True,
        help="Directory for the database, blobs and admin token [env EDGEFLEET_DATA_DIR].",
    )(f)


def _blob_dir_option(f: F) -> F:
    return click.option(
        "--blob-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="EDGEFLEET_BLOB_DIR",
        help="Directory for blob bytes (pushed models, built artifacts); replicas sharing one "
        "(a network file system) serve each other's [default: DATA_DIR/blobs; env "
        "EDGEFLEET_BLOB_DIR].",
    )(f)


def _db_option(f: F) -> F:
    return click.option(
        "--db", "db_url", help="SQLAlchemy database URL (default: SQLite file in the data dir)."
    )(f)


# ------------------------------------------------------------------ root


def _complete_context(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    try:
        names = load(contexts_path()).names()
    except ContextError:
        return []
    return [CompletionItem(name) for name in names if name.startswith(incomplete)]


# The connection options are taken after the subcommand too (RootGroup), and
# each one not given falls back on the context (controlplane.client.contexts).
@click.group(cls=RootGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--server",
    envvar="EDGEFLEET_SERVER",
    help="Control plane address, host:port [env EDGEFLEET_SERVER; default: the context's, "
    f"else {DEFAULT_SERVER}].",
)
@click.option(
    "--token",
    envvar="EDGEFLEET_TOKEN",
    help="Operator API token [env EDGEFLEET_TOKEN; default: the context's].",
)
@click.option(
    "--ca-cert",
    envvar="EDGEFLEET_CA_CERT",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The control plane's CA certificate (its data dir's ca.pem): connect with TLS. "
    "Without it (nor a context's): plain text [env EDGEFLEET_CA_CERT].",
)
@click.option(
    "--context",
    "context_name",
    envvar="EDGEFLEET_CONTEXT",
    metavar="NAME",
    shell_complete=_complete_context,
    help="Connect with this saved context rather than the current one (edgefleet context) "
    "[env EDGEFLEET_CONTEXT].",
)
@click.version_option(package_name="edgefleet")
@click.pass_context
def cli(
    ctx: click.Context,
    server: str | None,
    token: str | None,
    ca_cert: Path | None,
    context_name: str | None,
) -> None:
    """EdgeFleet: manage ML models on a fleet of edge devices.

    The options below also work after the subcommand
    (edgefleet devices ls --context prod)."""
    ctx.obj = ConnectionSettings(server=server, token=token, ca_cert=ca_cert, context=context_name)


def main() -> None:
    """Console-script entry point. A command whose part of EdgeFleet is not
    installed (`server` without [server], `tui` without [tui]) prints the one
    line naming the extra and exits 2, the status of a usage error."""
    try:
        cli(prog_name="edgefleet")
    except MissingExtra as missing:
        print(missing, file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------ server & db


@cli.command()
@_data_dir_option
@_db_option
@_blob_dir_option
@click.option(
    "--blob-grace",
    default="1h",
    show_default=True,
    callback=parsed(parse_duration),
    help="How long a blob nothing refers to (and a file with no blob) is kept before garbage "
    "collection deletes it; at least as long as a push or build takes to publish.",
)
@click.option(
    "--listen",
    default=_config_default("listen"),
    show_default=True,
    callback=parsed(parse_address),
    help="gRPC address.",
)
@click.option(
    "--metrics-listen",
    callback=parsed(lambda text: None if text == "off" else parse_address(text)),
    help="host:port for the Prometheus endpoint, or off (the default).",
)
@click.option(
    "--admin-token",
    envvar="EDGEFLEET_ADMIN_TOKEN",
    help="Admin API token to use instead of generating one [env EDGEFLEET_ADMIN_TOKEN].",
)
@click.option(
    "--max-upload-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=_config_default("max_upload_mb"),
    show_default=True,
    help="Largest model upload accepted.",
)
@click.option(
    "--heartbeat-interval",
    type=click.IntRange(min=1),
    default=_config_default("heartbeat_interval_s"),
    show_default=True,
    help="Seconds between agent heartbeats.",
)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the bound port here once listening (useful with port 0).",
)
@click.option(
    "--build-workers",
    type=click.IntRange(min=0),
    default=_config_default("build_workers"),
    show_default=True,
    help="Build worker processes on this replica (0: run no builds here).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes serving this control plane, sharing its ports (Linux). More than one "
    "divides the device streams' work over CPU cores; builds run on the first.",
)
@click.option(
    "--build-lease",
    type=click.FloatRange(min=1),
    default=_config_default("build_lease_s"),
    show_default=True,
    help="Seconds without a heartbeat after which a build is run again elsewhere.",
)
@click.option(
    "--toolchains-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="EDGEFLEET_TOOLCHAINS_DIR",
    help="Where converter toolchains live [env EDGEFLEET_TOOLCHAINS_DIR].",
)
@click.option(
    "--telemetry-retention",
    default="7d",
    show_default=True,
    callback=parsed(parse_duration),
    help="How long raw telemetry is kept before it is rolled up into hourly rows (>= 1h).",
)
@click.option(
    "--telemetry-rate",
    type=click.FloatRange(min=0, min_open=True, max=1e9),
    default=_config_default("telemetry_rate_per_s"),
    show_default=True,
    help="Telemetry samples a second one device may store on average (per server process); "
    "more is refused with RESOURCE_EXHAUSTED and a retry delay.",
)
@click.option(
    "--telemetry-burst",
    type=click.IntRange(min=500),
    default=_config_default("telemetry_burst"),
    show_default=True,
    help="Telemetry samples one device may store at once (at least one full upload, 500).",
)
@click.option(
    "--tls/--insecure",
    default=True,
    show_default=True,
    help="--tls: TLS for operators and enrollment on --listen, mutual TLS for devices on "
    "--device-listen, certificates from the fleet's CA (written to DATA_DIR/ca.pem). "
    "--insecure: plain text, for local development only.",
)
@click.option(
    "--device-listen",
    callback=parsed(parse_address),
    help="Address of the mutual-TLS device port [default: --listen's host, port + 1].",
)
@click.option(
    "--device-advertise",
    callback=parsed(_advertised_address),
    help="The device port as agents reach it (host:port), if not --device-listen.",
)
@click.option(
    "--artifact-http-listen",
    callback=parsed(lambda text: text if text == "off" else parse_address(text)),
    help="Address of artifact downloads over HTTP (GET /v1/artifacts/<digest>, with ranges; "
    "mutual TLS with --tls) [default: --listen's host, port + 2]; 'off' for none (agents "
    "then download over gRPC only).",
)
@click.option(
    "--artifact-http-advertise",
    callback=parsed(parse_base_url),
    help="Artifact downloads over HTTP as agents reach them (http(s)://host:port), if not "
    "--artifact-http-listen (a load balancer, a proxy).",
)
@click.option(
    "--artifact-mirror",
    "artifact_mirrors",
    multiple=True,
    callback=parsed(parse_base_url),
    help="Base URL of a mirror serving artifacts by digest (<URL>/<sha256>): agents try the "
    "mirrors in the order given, then the control plane (repeatable; see `edgefleet artifacts "
    "export`).",
)
@click.option(
    "--max-concurrent-downloads",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Artifact downloads over HTTP sending at once on this replica; more get 429 with "
    "Retry-After and the agents resume later (0: no limit).",
)
@click.option(
    "--artifact-http-max-connections",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Connections the artifact port holds at once, TLS handshakes included; more are "
    "closed as they arrive (agents then download over the device port).",
)
@click.option(
    "--tls-name",
    "tls_names",
    multiple=True,
    help="Another host name or address the server certificate must name (repeatable).",
)
@click.option(
    "--device-cert-lifetime",
    default="30d",
    show_default=True,
    callback=parsed(parse_duration),
    help="Lifetime of device client certificates; agents renew at two thirds of it.",
)
def server(
    data_dir: Path,
    db_url: str | None,
    blob_dir: Path | None,
    blob_grace: timedelta,
    listen: str,
    metrics_listen: str | None,
    admin_token: str | None,
    max_upload_mb: float,
    heartbeat_interval: int,
    port_file: Path | None,
    build_workers: int,
    workers: int,
    build_lease: float,
    toolchains_dir: Path | None,
    telemetry_retention: timedelta,
    telemetry_rate: float,
    telemetry_burst: int,
    tls: bool,
    device_listen: str | None,
    device_advertise: str | None,
    artifact_http_listen: str | None,
    artifact_http_advertise: str | None,
    artifact_mirrors: tuple[str, ...],
    max_concurrent_downloads: int,
    artifact_http_max_connections: int,
    tls_names: tuple[str, ...],
    device_cert_lifetime: timedelta,
) -> None:
    """Run the control plane until SIGTERM or Ctrl-C."""
    require("server", part="`edgefleet server`")
    from edgefleet.controlplane.server import run

    if telemetry_retention < timedelta(hours=1):
        raise click.BadParameter("must be at least 1h", param_hint="--telemetry-retention")
    if device_cert_lifetime < timedelta(seconds=10):
        raise click.BadParameter("must be at least 10s", param_hint="--device-cert-lifetime")
    if blob_grace < timedelta(minutes=1):
        raise click.BadParameter("must be at least 1m", param_hint="--blob-grace")

    config = ServerConfig(
        data_dir=data_dir,
        db_url=db_url,
        blob_store_dir=blob_dir,
        blob_grace_s=blob_grace.total_seconds(),
        listen=listen,
        metrics_listen=metrics_listen,
        admin_token=admin_token,
        max_upload_mb=max_upload_mb,
        heartbeat_interval_s=heartbeat_interval,
        port_file=port_file,
        build_workers=build_workers,
        build_lease_s=build_lease,
        toolchains_dir=toolchains_dir,
        telemetry_retention_s=telemetry_retention.total_seconds(),
        telemetry_rate_per_s=telemetry_rate,
        telemetry_burst=telemetry_burst,
        tls=tls,
        device_listen=device_listen,
        device_advertise=device_advertise,
        artifact_http_listen=artifact_http_listen,
        artifact_http_advertise=artifact_http_advertise,
        artifact_mirrors=artifact_mirrors,
        max_concurrent_downloads=max_concurrent_downloads,
        artifact_http_max_connections=artifact_http_max_connections,
        tls_names=tls_names,
        device_cert_lifetime_s=device_cert_lifetime.total_seconds(),
    )
    _check_addresses(config, workers)
    run(config, workers=workers)


def _check_addresses(config: ServerConfig, workers: int) -> None:
    """What the options' own parsers cannot see: ports derived from
    --listen's past the last one (usage errors naming the option to give),
    and device options --insecure ignores (warnings). Before anything is
    made."""
    if not config.tls:
        for option, value in (("--device-listen", config.device_listen),
                              ("--device-advertise", config.device_advertise)):  # fmt: skip
            if value:
                click.secho(f"warning: {option} is ignored with --insecure: there is no "
                            "mutual-TLS device port", fg="yellow", bold=True, err=True)  # fmt: skip
    try:
        config.artifact_http_address()
        if config.tls:
            config.device_listen_address()
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--listen") from None
    metrics = config.metrics_listen
    metrics_port = int(metrics.rpartition(":")[2]) if metrics else 0
    if metrics_port and metrics_port + workers - 1 > 65535:  # a worker's is the port + its index
        raise click.BadParameter(
            f"with --workers {workers} the metrics ports run to {metrics_port + workers - 1}, "
            "past 65535",
            param_hint="--metrics-listen",
        )


@cli.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
@_data_dir_option
@_db_option
@_blob_dir_option
def db_upgrade(data_dir: Path, db_url: str | None, blob_dir: Path | None) -> None:
    """Bring the database schema to the newest revision (0016 moves blob bytes
    out of the database into the blob directory)."""
    require("server", "sqlalchemy", "alembic", part="`edgefleet db upgrade`")
    from sqlalchemy.exc import SQLAlchemyError

    from edgefleet.controlplane.db.engine import current_revision, make_engine, sqlite_url, upgrade

    if db_url is None:
        data_dir.mkdir(parents=True, exist_ok=True)
        db_url = sqlite_url(data_dir)
    engine = make_engine(db_url)
    try:
        upgrade(engine, blob_dir=blob_dir or data_dir / "blobs")
        revision = current_revision(engine)
    except SQLAlchemyError as err:
        raise CliError(f"database: {getattr(err, 'orig', None) or err}") from None
    finally:
        engine.dispose()
    click.echo(f"database at revision {revision}")


for group in (tokens, operator_tokens, signing_keys, devices, classes, models, builds, artifacts,
              rollouts, telemetry, toolchain):  # fmt: skip
    cli.add_command(group)
cli.add_command(simulate)
cli.add_command(tui)
cli.add_command(context)
cli.add_command(audit)
