"""`edgefleet simulate`: a fleet of simulated agents in this process (fleetsim),
speaking the real device protocol to the control plane at --server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
import time
from pathlib import Path

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edgefleet.controlplane.cli.base import CliError, json_option, pass_env, usage_error
from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.client.syntax import parse_duration
from edgefleet.sim import (
    Fleet,
    FleetError,
    FleetProfile,
    FleetSummary,
    ProfileError,
    default_profile,
    load_profile,
)

# Update states in the order an update goes through them.
STATE_ORDER = (
    "idle", "downloading", "verifying", "validating", "activating", "committed",
    "rolling_back", "failed",
)  # fmt: skip
CONNECTION_ORDER = (
    "online", "new", "enrolling", "connecting", "backoff", "silent", "refused", "stopped",
)  # fmt: skip


def _seconds(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """Seconds, as a number or a duration (90s, 5m, 1h)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            return parse_duration(value).total_seconds()
        except ValueError as err:
            raise click.BadParameter(str(err), ctx, param) from None
    if seconds <= 0:
        raise click.BadParameter("must be positive", ctx, param)
    return seconds


@click.command()
@click.option("--agents", "-n", type=click.IntRange(min=1), help="How many devices to simulate.")
@click.option(
    "--token",
    "enrollment_token",
    envvar="EDGEFLEET_ENROLLMENT_TOKEN",
    help="Enrollment token the devices join with (edgefleet tokens create) "
    "[env EDGEFLEET_ENROLLMENT_TOKEN].",
)
@click.option(
    "--profile",
    "profile_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON fleet profile (default: the built-in pi/jetson/gateway fleet).",
)
@click.option(
    "--prefix",
    default="sim",
    show_default=True,
    help="Names the devices: hardware ids sim-PREFIX-00000..., names PREFIX-00000..., "
    "label fleetsim=PREFIX. The same prefix re-runs as the same devices.",
)
@click.option(
    "--duration", callback=_seconds, help="Stop after this long (60, 90s, 5m); default: Ctrl-C."
)
@click.option(
    "--download",
    is_flag=True,
    help="Really download each assigned artifact (DownloadArtifact) and check its digest.",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds between heartbeats (default: the control plane's setting).",
)
@click.option(
    "--telemetry-interval",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds between telemetry uploads (default: the control plane's setting).",
)
@click.option(
    "--agents-per-channel",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Sync streams sharing one connection.",
)
@click.option(
    "--connect-concurrency",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Enroll calls and stream connects in flight.",
)
@click.option(
    "--refresh",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between live summaries.",
)
@click.option("--seed", type=int, help="Seed the random draws (default: random).")
@click.option(
    "--protocol",
    type=click.Choice(["1", "2"]),
    default="2",
    show_default=True,
    help="Sync protocol: 2 holds several models per device; 1 is an old one-model agent.",
)
@click.option(
    "--print-profile", is_flag=True, help="Print the profile (as parsed, as JSON) and exit."
)
@json_option
@pass_env
def simulate(
    env: Connection,
    agents: int | None,
    enrollment_token: str | None,
    profile_path: Path | None,
    prefix: str,
    duration: float | None,
    download: bool,
    heartbeat_interval: float | None,
    telemetry_interval: float | None,
    agents_per_channel: int,
    connect_concurrency: int,
    refresh: float,
    seed: int | None,
    protocol: str,
    print_profile: bool,
    as_json: bool,
) -> None:
    """Run --agents simulated devices against the control plane at --server.

    Each device enrolls with --token and a stable hardware id, holds a Sync
    stream with heartbeats, installs what it is assigned by reporting the
    update states (downloading, verifying, validating, activating,
    committed; or rolling_back and failed; a shadow assignment commits with
    the served version unchanged) for each model it holds, removes a model
    no longer assigned, and uploads telemetry (one sample per model), all
    with figures drawn from its class in the profile; there is no real
    inference. A live summary (per model@version and update state) is
    shown on stderr; the final one on stdout, as JSON with --json. Ctrl-C or SIGTERM stops cleanly.

    The profile is JSON; every key but "name" is optional (see
    fleetsim/profiles.py for all of them and their defaults):

    \b
    {"heartbeat_interval_s": 15, "telemetry_interval_s": 10,
     "versions": {"2.0.0": {"latency_factor": 1.5}},
     "classes": [
      {"name": "pi", "weight": 3,              (or "count": 100)
       "hardware": {"arch": "aarch64", "memory_mb": 3792,
                    "board_model": "Raspberry Pi 4 Model B"},
       "runtime": {"onnxruntime_version": "1.20.1"},
       "labels": {"site": "line-3"},
       "install_s": [2, 6], "latency_p95_ms": 20, "error_rate": 0.001,
       "requests_per_s": 5, "memory_mb": 80, "cpu_percent": 15,
       "versions": {"2.0.0": {"latency_p95_ms": 90, "error_rate": 0.2,
                              "fail_rate": 0.5, "fail_state": "validating",
                              "fail_reason": "golden outputs differ",
                              "agreement": 0.6,
                              "silent_after_commit": false}}}]}

    Hardware and runtime take the HardwareProfile and RuntimeFingerprint
    fields, so device classes' match rules place the devices. A version's
    behaviour is the class's, then the top-level "versions" entry, then the
    class's own. Heartbeat and telemetry intervals follow the control
    plane's agent config unless the options above fix them.
    """
    try:
        profile = load_profile(profile_path) if profile_path else default_profile()
    except ProfileError as err:
        raise click.BadParameter(str(err), param_hint="--profile") from None
    if print_profile:
        click.echo(json.dumps(profile.to_dict(), indent=2))
        return
    if agents is None:
        usage_error("--agents is required")
    if not enrollment_token:
        usage_error("--token (an enrollment token) is required")
    fleet = Fleet(
        env.server,
        enrollment_token,
        profile,
        agents,
        prefix,
        download=download,
        seed=seed,
        agents_per_channel=agents_per_channel,
        connect_concurrency=connect_concurrency,
        heartbeat_interval_s=heartbeat_interval,
        telemetry_interval_s=telemetry_interval,
        protocol=int(protocol),
    )
    try:
        summary = asyncio.run(_run(fleet, duration, refresh))
    except FleetError as err:
        raise CliError(str(err)) from None
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        Console().print(render_summary(summary, profile, final=True))


async def _run(fleet: Fleet, duration: float | None, refresh: float) -> FleetSummary:
    """Start the fleet, show the live summary until the duration is over or
    a signal arrives, stop it; the final summary."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    console = Console(stderr=True)
    deadline = time.monotonic() + duration if duration else None
    frozen = False
    try:
        await fleet.start(wait=False)
        # Redrawn in place on a terminal; a line per refresh in a log.
        display: contextlib.AbstractContextManager[Live | None] = (
            Live(render_summary(fleet.summary(), fleet.profile), console=console,
                 auto_refresh=False, transient=True)
            if console.is_terminal
            else contextlib.nullcontext()
        )  # fmt: skip
        with display as live:
            while not stop.is_set():
                timeout = refresh
                if deadline is not None:
                    timeout = min(refresh, deadline - time.monotonic())
                    if timeout <= 0:
                        break
                try:
                    async with asyncio.timeout(timeout):
                        await stop.wait()
                except TimeoutError:
                    pass
                error = fleet.refused()
                if error:
                    raise FleetError(error)
                if not frozen and all(a.connects for a in fleet.agents):
                    # The agents live until the end: move them out of the
                    # collector's reach. A full collection over 10,000 of
                    # them stalled the loop for 0.7 s.
                    gc.freeze()
                    frozen = True
                summary = fleet.summary()
                if live is not None:
                    live.update(render_summary(summary, fleet.profile), refresh=True)
                else:
                    console.print(one_line(summary), highlight=False, markup=False)
                    console.file.flush()  # a log reader sees each line as it comes
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await fleet.stop()
    return fleet.summary()


def one_line(summary: FleetSummary) -> str:
    """The live summary as one line, for logs."""
    connections = " ".join(f"{k}={v}" for k, v in summary.connection.items())
    updates = "; ".join(
        f"{ref or '-'}: " + " ".join(f"{s}={n}" for s, n in states.items())
        for ref, states in summary.models.items()
    )
    return f"[{summary.elapsed_s:6.1f}s] {connections} | {updates}"


def _ordered(keys: list[str], order: tuple[str, ...]) -> list[str]:
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


def render_summary(
    summary: FleetSummary, profile: FleetProfile, *, final: bool = False
) -> RenderableType:
    """Counts per model@version and update state, connections and RPC
    figures, as rich renderables."""
    connections = "  ".join(
        f"{state} {summary.connection[state]:,}"
        for state in _ordered(list(summary.connection), CONNECTION_ORDER)
    )
    title = (
        f"{'Final: ' if final else ''}{summary.agents:,} simulated agents "
        f"({', '.join(c.name for c in profile.classes)}), {summary.elapsed_s:,.0f} s"
    )
    states = _ordered(
        list({s for by_state in summary.models.values() for s in by_state}), STATE_ORDER
    )
    table = Table()
    table.add_column("model@version")
    for state in states:
        table.add_column(state, justify="right")
    table.add_column("serving", justify="right")
    refs = sorted(set(summary.models) | set(summary.serving))
    for ref in refs:
        by_state = summary.models.get(ref, {})
        table.add_row(
            ref or "(no model)",
            *(f"{by_state[s]:,}" if s in by_state else "" for s in states),
            f"{summary.serving.get(ref, 0):,}",
        )
    stats = summary.stats
    figures = (
        f"enrolled {stats['enrollments']:,}  streams {stats['connects']:,}  "
        f"heartbeats {stats['heartbeats']:,}  status reports {stats['status_reports']:,}  "
        f"telemetry uploads {stats['telemetry_uploads']:,} "
        f"({stats['telemetry_failures']:,} failed)"
    )
    if stats["downloads"]:
        figures += (
            f"  downloads {stats['downloads']:,} ({stats['download_bytes'] / 2**20:,.1f} MiB)"
        )
    parts: list[RenderableType] = [Text(title, style="bold"), Text(connections), table]
    parts.append(Text(figures))
    errors = stats["errors"]
    if errors:
        worst = sorted(errors.items(), key=lambda item: -item[1])[:5]
        parts.append(Text("errors: " + ", ".join(f"{k} x{v:,}" for k, v in worst), style="red"))
    return Group(*parts)
