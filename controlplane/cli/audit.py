"""`edgefleet audit`: who did what, when; searched on the server."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import click
from rich.table import Table
from rich.text import Text

from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.base import emit, json_option, now, parsed, pass_env
from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.client.syntax import parse_when
from edgefleet.v1 import operator_pb2


def target_cell(entry: operator_pb2.AuditEntry) -> str:
    """`device:e15f0a9c… (edge-01)`: the target with the name it has now."""
    kind, sep, rest = entry.target.partition(":")
    shown = entry.target
    # Ids are 16+ hex characters; tables show 8, which every command takes.
    if sep and kind not in ("class", "model") and len(rest) > 8:
        shown = f"{kind}:{render.short_id(rest)}"
    if entry.target_name and entry.target_name != rest:
        return f"{shown} ({entry.target_name})"
    return shown


def audit_table(entries: Sequence[operator_pb2.AuditEntry]) -> Table:
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold")
    # The id is what --before pages by, and the time is read whole: neither
    # is cut; the rest fold onto more lines in a narrow terminal.
    widest_id = max((len(str(e.id)) for e in entries), default=2)
    table.add_column("ID", no_wrap=True, min_width=widest_id)
    table.add_column("AT", no_wrap=True)
    for header in ("ACTOR", "ACTION", "TARGET"):
        table.add_column(header, overflow="fold")
    table.add_column("DETAILS", overflow="fold", min_width=12)
    for e in entries:
        cells = (str(e.id), render.format_time(e.at), e.actor, e.action, target_cell(e))
        table.add_row(*(Text(c) for c in (*cells, e.details or "-")))
    return table


@click.command("audit")
@click.option("--actor", default="", help="Who: an operator token's name, or its start.")
@click.option(
    "--action", default="", help="An action (device.accept) or a group of them (rollout)."
)
@click.option(
    "--target",
    default="",
    help="What about: a name, full id or id prefix (any kind), or KIND:TEXT (device:edge-01).",
)
@click.option(
    "--since",
    callback=parsed(lambda text: parse_when(text, now())),
    help="From then: 2h, 7d (that long ago) or an ISO time.",
)
@click.option(
    "--until",
    callback=parsed(lambda text: parse_when(text, now())),
    help="Before then: 2h, 7d (that long ago) or an ISO time.",
)
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="Entries."
)
@click.option("--before", "before_id", type=click.IntRange(min=0), default=0,
              help="Entries older than this id (the next page).")  # fmt: skip
@json_option
@pass_env
def audit(
    env: Connection,
    actor: str,
    action: str,
    target: str,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    before_id: int,
    as_json: bool,
) -> None:
    """Who changed what, when: the audit log, newest first, searched on the
    server. Each target is shown with the name it has now."""
    request = operator_pb2.ListAuditLogRequest(
        actor=actor, action=action, target=target, limit=limit, before_id=before_id
    )
    if since is not None:
        request.since.FromDatetime(since)
    if until is not None:
        request.until.FromDatetime(until)
    resp = env.stub.ListAuditLog(request)
    emit(as_json, resp.entries, lambda: _human(resp.entries))


def _human(entries: Sequence[operator_pb2.AuditEntry]) -> Table | Text:
    if not entries:
        return Text("No audit entries match.")
    return audit_table(entries)
