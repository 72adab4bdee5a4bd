"""`edgefleet toolchain`: converters the build host runs in their own
environments (onnx2tf for TFLite). Local commands: no server involved.

The build package is the build host's ([server] extra): it is imported when
a command runs, so that the rest of the CLI needs only [cli]. Hence the
literals below for its TFLITE and TOOLCHAINS_ENV (a test checks they agree)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgefleet.controlplane.cli.base import CliError, F, json_option
from edgefleet.controlplane.errors import DomainError

TFLITE = "tflite"
TOOLCHAINS_ENV = "EDGEFLEET_TOOLCHAINS_DIR"


def _dir_option(f: F) -> F:
    return click.option(
        "--dir",
        "toolchains_dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=TOOLCHAINS_ENV,
        help=f"Where toolchains live [env {TOOLCHAINS_ENV}; "
        "default ~/.cache/edgefleet/toolchains].",
    )(f)


@click.group()
def toolchain() -> None:
    """Build toolchains on this machine (the build host)."""


@toolchain.command("install")
@click.argument("name", type=click.Choice([TFLITE]))
@_dir_option
@click.option("--force", is_flag=True, help="Reinstall even when the install is current.")
def toolchain_install(name: str, toolchains_dir: Path | None, force: bool) -> None:
    """Install a toolchain (tflite: onnx2tf and TensorFlow, ~2.5 GB, a few minutes)."""
    from edgefleet.controlplane.build.toolchain import install_tflite

    console = Console(stderr=True)
    try:
        if console.is_terminal:
            # Stages stay on screen; pip's lines flow through the spinner's line.
            with console.status(f"installing the {name} toolchain") as status:
                toolchain = install_tflite(
                    toolchains_dir,
                    lambda line: status.update(_one_line(line, console.width)),
                    step=lambda line: console.print(Text(f"• {line}")),
                    force=force,
                )
        else:
            # CI logs: every line, no spinner.
            toolchain = install_tflite(
                toolchains_dir, lambda line: click.echo(line, err=True), force=force
            )
    except DomainError as err:
        raise CliError(err.message) from None
    click.echo(
        f"{name}: onnx2tf {toolchain.onnx2tf_version}, TensorFlow {toolchain.tensorflow_version} "
        f"at {toolchain.venv}"
    )


def _one_line(line: str, width: int) -> Text:
    return Text(line.strip()[: max(20, width - 4)], no_wrap=True, overflow="ellipsis")


@toolchain.command("ls")
@_dir_option
@json_option
def toolchain_ls(toolchains_dir: Path | None, as_json: bool) -> None:
    """List the toolchains and their versions."""
    from edgefleet.controlplane.build.toolchain import (
        default_toolchains_dir,
        installed_toolchains,
        is_stale,
    )

    root = toolchains_dir or default_toolchains_dir()
    found = installed_toolchains(root)
    if as_json:
        click.echo(
            json.dumps(
                {
                    name: None
                    if tc is None
                    else {"path": str(tc.venv), "key": tc.key, "versions": dict(tc.versions)}
                    for name, tc in found.items()
                },
                indent=2,
            )
        )
        return
    table = Table(title=f"toolchains in {root}", title_justify="left")
    for column in ("NAME", "STATUS", "ONNX2TF", "TENSORFLOW", "PATH"):
        table.add_column(column)
    for name, tc in found.items():
        if tc is None:
            status = "stale (other pins)" if is_stale(name, root) else "not installed"
            hint = f"edgefleet toolchain install {name}" + (
                f" --dir {root}" if toolchains_dir else ""
            )
            table.add_row(name, status, "-", "-", hint)
        else:
            table.add_row(
                name, "installed", tc.onnx2tf_version, tc.tensorflow_version, str(tc.venv)
            )
    Console().print(table, markup=False, highlight=False)
