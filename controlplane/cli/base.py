"""Plumbing shared by the `edgefleet` command modules: option helpers,
output (JSON or rich) and error reporting. The connection settings are the
client library's Connection (controlplane.client.connection), resolved with
the contexts file (controlplane.client.contexts) when a command needs it."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import update_wrapper
from pathlib import Path
from typing import Any, Concatenate, NoReturn, ParamSpec, TypeVar

import click
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console, RenderableType

from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.client.contexts import (
    ContextError,
    resolve_connection,
    set_aside_hint,
)
from edgefleet.controlplane.client.errors import rpc_error_message, rpc_status
from edgefleet.controlplane.client.syntax import (
    enum_choices,
    enum_value,
    parse_label,
    resolve_prefix,
)
from edgefleet.controlplane.client.tls_probe import transport_hint

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")


class CliError(click.ClickException):
    """A failure to report as `error: <message>` on stderr, exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


@dataclass
class ConnectionSettings:
    """The root group's connection options as given (None: not given).
    connection() resolves them with the contexts file on first use, so a
    command that makes no call (server, db, context, --help) never reads it."""

    server: str | None = None
    token: str | None = None
    ca_cert: Path | None = None
    context: str | None = None
    resolved: Connection | None = None

    def connection(self) -> Connection:
        if self.resolved is None:
            resolved = resolve_connection(
                server=self.server, token=self.token, ca_cert=self.ca_cert, context=self.context
            )
            ca = resolved.ca_cert
            if ca is not None and self.ca_cert is None and not ca.is_file():
                # A context's CA can go missing after `context add` checked
                # it: name the context to fix (a --ca-cert names itself).
                raise ContextError(
                    f"context {resolved.context!r}: its CA certificate {ca} is gone; "
                    f"add the context again with the server's ca.pem (edgefleet context add "
                    f"{resolved.context} --overwrite --server {resolved.server} --ca-cert …)"
                )
            self.resolved = resolved
        return self.resolved


def _value_counts(command: click.Command, ctx: click.Context) -> dict[str, int]:
    """Each option name of `command` and how many values follow it."""
    counts: dict[str, int] = {}
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            takes = 0 if param.is_flag or param.count else param.nargs
            counts.update((name, takes) for name in (*param.opts, *param.secondary_opts))
    return counts


class RootGroup(click.Group):
    """Takes the global options after the subcommand too, and turns RPC,
    file and context errors from any command into CliError: a one-line
    message, never a traceback."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self._hoist_global_options(ctx, args))

    def _hoist_global_options(self, ctx: click.Context, args: list[str]) -> list[str]:
        """`args` with the root's value options found after the subcommand
        (`edgefleet devices ls --server X`, as kubectl takes its flags) moved
        just before it. An option belongs to the command whose arguments it
        is among: one that command defines itself stays (`simulate --token`
        is its enrollment token), and nothing after `--` moves."""
        root = _value_counts(self, ctx)
        hoistable = {name for name, takes in root.items() if takes}
        start = 0
        while start < len(args) and args[start].startswith("-") and args[start] not in ("-", "--"):
            name, eq, _ = args[start].partition("=")
            start += 1 + (0 if eq else root.get(name, 0))
        if start >= len(args) or args[start] == "--":
            return args
        command: click.Command | None = self.get_command(ctx, args[start])
        hoisted: list[str] = []
        kept = [args[start]]
        i = start + 1
        while i < len(args):
            token = args[i]
            if token == "--" or command is None:
                kept.extend(args[i:])
                break
            if token.startswith("-") and token != "-":
                name, eq, _ = token.partition("=")
                own = _value_counts(command, ctx)
                if name in own or name not in hoistable:
                    # Its own option (with its values), or one nobody
                    # knows, left for click to report.
                    width = 1 + (0 if eq else own.get(name, 0))
                    kept.extend(args[i : i + width])
                    i += width
                elif eq:
                    hoisted.append(token)
                    i += 1
                elif i + 1 < len(args):
                    hoisted.extend(args[i : i + 2])
                    i += 2
                elif ctx.resilient_parsing:
                    kept.append(token)
                    i += 1
                else:
                    raise click.UsageError(f"Option '{name}' requires an argument.", ctx)
                continue
            if isinstance(command, click.Group):
                command = command.get_command(ctx, token)
            kept.append(token)
            i += 1
        return args[:start] + hoisted + kept

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except grpc.RpcError as err:
            settings = ctx.find_object(ConnectionSettings)
            connection = settings.resolved if settings is not None else None
            hint = transport_hint(err, connection) if connection is not None else None
            message = hint or rpc_error_message(err)
            status = rpc_status(err)
            if connection is not None and status and status[0] == grpc.StatusCode.UNAUTHENTICATED:
                message = "; ".join(filter(None, (message, set_aside_hint(connection))))
            raise CliError(message) from None
        except ContextError as err:
            raise CliError(str(err)) from None
        except OSError as err:
            where = f": {err.filename}" if err.filename else ""
            raise CliError(f"{err.strerror or err}{where}") from None


def pass_env(f: Callable[Concatenate[Connection, P], R]) -> Callable[P, R]:
    """Passes a command its Connection: the root group's --server, --token
    and --ca-cert over the chosen context (controlplane.client.contexts)."""

    def new_func(*args: P.args, **kwargs: P.kwargs) -> R:
        ctx = click.get_current_context()
        settings = ctx.find_object(ConnectionSettings)
        if settings is None:
            raise RuntimeError("no connection settings: run the command under the edgefleet group")
        return ctx.invoke(f, settings.connection(), *args, **kwargs)

    return update_wrapper(new_func, f)


def parsed(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """An option callback running a pure parser over the value (or each value
    of a multiple option); its ValueError becomes a usage error."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            if isinstance(value, tuple):
                return tuple(parse(v) for v in value)
            return None if value is None else parse(value)
        except ValueError as err:
            raise click.BadParameter(str(err), ctx, param) from None

    return callback


def enum_option(*decls: str, wrapper: Any, **kwargs: Any) -> Callable[[F], F]:
    """An option choosing among an enum's CLI names (`auto-accept`); the
    command receives the enum value."""
    return click.option(
        *decls,
        type=click.Choice(list(enum_choices(wrapper)), case_sensitive=False),
        callback=parsed(lambda text: enum_value(wrapper, text)),
        **kwargs,
    )


def label_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--label",
        "labels",
        multiple=True,
        metavar="KEY=VALUE",
        callback=parsed(parse_label),
        help=help_text,
    )


def to_json_dict(message: Message) -> dict[str, Any]:
    """The machine-readable form `--json` prints: proto field names, and every
    field without presence (zeros, empty lists) included so scripts can rely
    on the keys."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def emit(
    as_json: bool, data: Message | Sequence[Message], human: Callable[[], RenderableType]
) -> None:
    """Print `data` as JSON (a list for sequences), or the human rendering."""
    if as_json:
        obj = to_json_dict(data) if isinstance(data, Message) else [to_json_dict(m) for m in data]
        click.echo(json.dumps(obj, indent=2))
    else:
        Console().print(human(), markup=False, highlight=False)


def confirm(question: str, yes: bool) -> None:
    """Ask `question` (y/N) unless --yes; with no terminal to ask on, refuse."""
    if yes:
        return
    if not sys.stdin.isatty():
        what = question.partition("?")[0]
        raise CliError(f"{what}: not confirmed; add --yes (stdin is not a terminal to ask on)")
    if not click.confirm(question, default=False):
        raise CliError("cancelled: nothing was changed")


def usage_error(message: str) -> NoReturn:
    raise click.UsageError(message)


def now() -> datetime:
    return datetime.now(UTC)


def call_by_id(
    text: str, call: Callable[[str], T], list_ids: Callable[[], Iterable[str]], what: str
) -> T:
    """`call(text)`; when the server answers NOT_FOUND and `text` is the unique
    prefix of a listed id (tables show short ids), `call(full_id)` instead."""
    try:
        return call(text)
    except grpc.RpcError as err:
        status = rpc_status(err)
        if status is None or status[0] != grpc.StatusCode.NOT_FOUND:
            raise
        try:
            full = resolve_prefix(text, list_ids(), what)
        except ValueError as ambiguous:
            raise CliError(str(ambiguous)) from None
        if full == text:
            raise
        return call(full)
