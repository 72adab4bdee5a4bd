"""Plumbing shared by the `edgefleet` command modules: option helpers,
output (JSON or rich) and error reporting. The connection settings are the
client library's Connection (controlplane.client.connection)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import click
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console, RenderableType

from edgefleet.controlplane.client.connection import Connection
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


class CliError(click.ClickException):
    """A failure to report as `error: <message>` on stderr, exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class RootGroup(click.Group):
    """Turns RPC and file errors from any command into CliError: a one-line
    message, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except grpc.RpcError as err:
            connection = ctx.find_object(Connection)
            hint = transport_hint(err, connection) if connection is not None else None
            raise CliError(hint or rpc_error_message(err)) from None
        except OSError as err:
            where = f": {err.filename}" if err.filename else ""
            raise CliError(f"{err.strerror or err}{where}") from None


# Every command's connection settings: the root group makes them from
# --server, --token and --ca-cert.
pass_env = click.make_pass_decorator(Connection)


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
