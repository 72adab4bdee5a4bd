"""`edgefleet context`: named connection settings (server, token, CA), like
kubectl's contexts. The file and the rules live in the client library
(controlplane.client.contexts); these commands only edit and show it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgefleet.controlplane.cli.base import CliError, ConnectionSettings, json_option
from edgefleet.controlplane.client.connection import tls_credentials
from edgefleet.controlplane.client.contexts import (
    ADD_HINT,
    Contexts,
    contexts_path,
    editing,
    load,
    make_context,
    read_token_file,
)


def _named() -> str | None:
    """The context named by --context or EDGEFLEET_CONTEXT, if any."""
    settings = click.get_current_context().find_object(ConnectionSettings)
    return settings.context if settings is not None else None


def _in_use(contexts: Contexts) -> str | None:
    """The context commands connect with now: the named one, else the current."""
    return _named() or contexts.current


@click.group("context")
def context() -> None:
    """Saved connection settings, like kubectl's contexts.

    A context is a server, an operator token and a CA certificate under a
    name. Add one, `use` it, and every command, the TUI and `simulate`
    connect with it.

    Stored in ~/.config/edgefleet/contexts.json (under $XDG_CONFIG_HOME when
    set; $EDGEFLEET_CONFIG names another file), mode 0600. An option or
    EDGEFLEET_* variable still wins over the context for its own setting."""


@context.command("add")
@click.argument("name")
@click.option("--server", required=True, help="Control plane address, host:port.")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the operator token (a data dir's admin-token works); read now and "
    "stored in the context.",
)
@click.option("--token", help="The operator token itself (prefer --token-file: shell history).")
@click.option(
    "--ca-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The control plane's ca.pem: connect with TLS (its absolute path is stored). "
    "Without it: plain text.",
)
@click.option("--use", "use_it", is_flag=True, help="Make it the current context too.")
@click.option("--overwrite", is_flag=True, help="Replace a context of the same name.")
def context_add(
    name: str,
    server: str,
    token_file: Path | None,
    token: str | None,
    ca_cert: Path | None,
    use_it: bool,
    overwrite: bool,
) -> None:
    """Save the connection settings NAME."""
    if token_file is not None and token is not None:
        raise click.UsageError("give --token-file or --token, not both")
    if token_file is not None:
        token = read_token_file(token_file)
    if ca_cert is not None:
        tls_credentials(ca_cert)  # a missing or non-PEM file fails now, not at each call
    new = make_context(server, token, ca_cert)
    with editing(contexts_path()) as contexts:
        contexts.add(name, new, overwrite=overwrite)
        if use_it:
            contexts.use(name)
    tls = "TLS" if new.tls else "plain text"
    has_token = "token set" if new.token else "no token"
    click.echo(f"context {name!r} saved: {new.server}, {tls}, {has_token}")
    if use_it:
        click.echo(f"switched to context {name!r}")
    elif contexts.current is None:
        click.echo(f"use it: edgefleet context use {name}")


@context.command("use")
@click.argument("name")
def context_use(name: str) -> None:
    """Make NAME the current context."""
    with editing(contexts_path()) as contexts:
        chosen = contexts.use(name)
    click.echo(f"switched to context {name!r} ({chosen.server})")
    named = os.environ.get("EDGEFLEET_CONTEXT")
    if named and named != name:
        click.echo(
            f"note: EDGEFLEET_CONTEXT={named} is set and wins over it in this shell", err=True
        )


@context.command("rm")
@click.argument("name")
def context_rm(name: str) -> None:
    """Remove the context NAME."""
    with editing(contexts_path()) as contexts:
        was_current = contexts.remove(name)
    click.echo(f"context {name!r} removed")
    if was_current:
        click.echo("no context is current now: edgefleet context use NAME")


@context.command("current")
def context_current() -> None:
    """Print the name of the context commands connect with."""
    contexts = load(contexts_path())
    name = _in_use(contexts)
    if name is None:
        raise CliError("no current context: edgefleet context use NAME")
    contexts.get(name)  # a --context naming an unknown one is an error
    click.echo(name)


@context.command("ls")
@json_option
def context_ls(as_json: bool) -> None:
    """List the contexts; * marks the one commands connect with. Tokens are
    never shown, only whether one is set."""
    contexts = load(contexts_path())
    in_use = _in_use(contexts)
    rows = [
        {
            "name": name,
            "current": name == in_use,
            "server": c.server,
            "tls": c.tls,
            "ca_cert": None if c.ca_cert is None else str(c.ca_cert),
            "token_set": bool(c.token),
        }
        for name, c in sorted(contexts.contexts.items())
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no contexts in {contexts.path}: {ADD_HINT}")
        return
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold")
    # Long names and addresses fold onto more lines: cut off (no_wrap), a
    # 64-character name pushed TLS and TOKEN out of an 80-column terminal.
    for header in ("CURRENT", "NAME", "SERVER"):
        table.add_column(header, overflow="fold")
    for header in ("TLS", "TOKEN"):
        table.add_column(header, no_wrap=True, min_width=len(header))
    for row in rows:
        table.add_row(
            "*" if row["current"] else "",
            Text(str(row["name"])),
            Text(str(row["server"])),
            "yes" if row["tls"] else "no",
            "set" if row["token_set"] else "unset",
        )
    Console().print(table, markup=False, highlight=False)
