"""`edgefleet tui`: the operators' terminal UI (the tui package), on the
same connection as every command: --server/--token/--ca-cert, before or
after `tui`, over the current context or --context (edgefleet context).
Textual is imported only when the command runs, so the rest of the CLI
stays light."""

from __future__ import annotations

import click

from edgefleet.controlplane.cli.base import CliError, pass_env
from edgefleet.controlplane.client.connection import Connection


@click.command("tui")
@pass_env
def tui(env: Connection) -> None:
    """Open the terminal UI: fleet overview, devices, classes, models and
    builds, rollouts (wizard and live monitor), telemetry and the audit log.
    Press ? in it for every key."""
    from edgefleet.tui.app import make_app
    from edgefleet.tui.client import FleetClient

    app = make_app(FleetClient(env.server, env.token, env.ca_cert, origin=env.origin))
    app.run()
    if app.connection.state == "refused":
        # Scripts and shells see the refusal too, not only the screen.
        raise CliError(f"the control plane refused the token: {app.connection.reason}")
