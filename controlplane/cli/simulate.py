"""`edgefleet simulate`: a fleet of simulated agents in this process (fleetsim),
speaking the real device protocol to the control plane at --server (TLS
trusting --ca-cert, as every command connects)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edgefleet.controlplane.cli.base import CliError, json_option, pass_env, usage_error
from edgefleet.controlplane.client.connection import Connection, tls_credentials
from edgefleet.controlplane.client.syntax import parse_duration
from edgefleet.controlplane.client.tls_probe import tls_mismatch
from edgefleet.sim import (
    Fleet,
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
# How often the run checks whether the fleet can get anywhere (a refused
# token, a TLS mismatch): failing fast must not wait for the next summary.
CHECK_EVERY_S = 0.2


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
    "label fleetsim=PREFIX. The simulator keeps no credentials between runs, so a prefix "
    "an earlier run enrolled is refused: use a new one, or decommission those devices.",
)
@click.option(
    "--duration", callback=_seconds, help="Stop after this long (60, 90s, 5m); default: Ctrl-C."
)
@click.option(
    "--enroll-timeout",
    callback=_seconds,
    default="60",
    show_default=True,
    help="Give up (exit 1) when no agent has enrolled after this long (60, 90s, 5m).",
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
    enroll_timeout: float,
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
    """Run --agents simulated devices against the control plane at --server,
    over TLS trusting --ca-cert when given (`edgefleet --ca-cert CA simulate
    ...`; the agents then hold mutual TLS on the device port with the
    certificates they are issued), in plain text otherwise.

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

    Exit status: 0 when every agent enrolled and held its Sync stream; 1,
    with the final summary and then the reason on stderr, when any agent
    never did by the end (a half-working fleet makes every figure of the
    run wrong, so it fails loudly). It gives up early, exit 1, when the
    control plane refuses the token (at the first refusal), when every
    agent still waiting was refused, when the first Enroll failure is a TLS
    mismatch (plain text to a TLS server, say), or when no agent enrolled
    within --enroll-timeout.
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
    ca_pem = None
    if env.ca_cert is not None:
        tls_credentials(env.ca_cert)  # an unreadable or non-PEM file: one line, exit 1
        ca_pem = env.ca_cert.read_bytes()
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
        ca_cert=ca_pem,
    )
    advice = Advice(env.server, env.ca_cert)
    summary, failure = asyncio.run(_run(fleet, advice, duration, refresh, enroll_timeout))
    if as_json:
        click.echo(json.dumps({**summary.to_dict(), "failure": failure or None}, indent=2))
    else:
        Console().print(render_summary(summary, profile, final=True, advice=advice.words))
    if failure:
        raise CliError(failure)


class Advice:
    """What to tell the operator about the fleet's enrollment errors: a TLS
    mismatch (found by a handshake of our own, once), a prefix an earlier
    run enrolled, a control plane that is not there."""

    def __init__(self, server: str, ca_cert: Path | None) -> None:
        self.server = server
        self.ca_cert = ca_cert
        self.tls: str | None = None  # None: not probed yet; "": TLS agrees

    async def probe(self, error: str) -> str:
        """For an Enroll that failed with `error`: what TLS mismatch it
        shows ("" when none)."""
        if "UNAVAILABLE" not in error:
            return ""
        if self.tls is None:
            self.tls = ""  # one probe, whatever it finds
            self.tls = await asyncio.to_thread(tls_mismatch, self.server, self.ca_cert) or ""
        return self.tls

    def words(self, error: str) -> str:
        """Advice for the Enroll error `error` ("" when none)."""
        if "UNAVAILABLE" in error and self.tls:
            return self.tls
        if "PERMISSION_DENIED" in error and "already enrolled" in error:
            return (
                "an earlier run enrolled these hardware ids and the simulator keeps no "
                "credentials between runs: pass another --prefix"
            )
        if "UNAVAILABLE" in error and "connect" in error.lower():
            return f"is the control plane running at {self.server}?"
        return ""

    def explain(self, error: str) -> str:
        """`error` with its advice, if any, in parentheses."""
        words = self.words(error)
        return f"{error} ({words})" if words else error


async def _run(
    fleet: Fleet, advice: Advice, duration: float | None, refresh: float, enroll_timeout: float
) -> tuple[FleetSummary, str]:
    """Start the fleet, show the live summary until the duration is over, a
    signal arrives or the fleet cannot get anywhere, stop it; the final
    summary and why the run failed ("" when it did not)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Signals reach only the main thread (a test may run the CLI in another).
    signals = (
        (signal.SIGINT, signal.SIGTERM)
        if threading.current_thread() is threading.main_thread()
        else ()
    )
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    console = Console(stderr=True)
    started = time.monotonic()
    deadline = started + duration if duration else None
    enroll_deadline = started + enroll_timeout
    frozen = False
    failure = ""
    try:
        await fleet.start(wait=False)
        # Redrawn in place on a terminal; a line per refresh in a log.
        display: contextlib.AbstractContextManager[Live | None] = (
            Live(render_summary(fleet.summary(), fleet.profile), console=console,
                 auto_refresh=False, transient=True)
            if console.is_terminal
            else contextlib.nullcontext()
        )  # fmt: skip
        next_refresh = started + refresh
        with display as live:
            while not stop.is_set():
                now = time.monotonic()
                timeout = min(CHECK_EVERY_S, next_refresh - now)
                if deadline is not None:
                    if deadline <= now:
                        break
                    timeout = min(timeout, deadline - now)
                try:
                    async with asyncio.timeout(max(0.0, timeout)):
                        await stop.wait()
                except TimeoutError:
                    pass
                failure = await _hopeless(fleet, advice, enroll_deadline, enroll_timeout)
                if failure:
                    break
                if not frozen and all(a.connects for a in fleet.agents):
                    # The agents live until the end: move them out of the
                    # collector's reach. A full collection over 10,000 of
                    # them stalled the loop for 0.7 s.
                    gc.freeze()
                    frozen = True
                if time.monotonic() < next_refresh:
                    continue
                next_refresh = time.monotonic() + refresh
                summary = fleet.summary()
                if live is not None:
                    live.update(
                        render_summary(summary, fleet.profile, advice=advice.words), refresh=True
                    )
                else:
                    console.print(one_line(summary, advice.words), highlight=False, markup=False)
                    console.file.flush()  # a log reader sees each line as it comes
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await fleet.stop()
    return fleet.summary(), failure or _incomplete(fleet, advice)


async def _hopeless(
    fleet: Fleet, advice: Advice, enroll_deadline: float, enroll_timeout: float
) -> str:
    """Why going on cannot help ("" while it may): the token refused, every
    waiting agent refused, a TLS mismatch, or nothing enrolled in time."""
    enrolled = fleet.enrolled()
    token = fleet.token_refused()
    if token and not enrolled:  # a token revoked mid-run leaves the enrolled agents be
        return (
            f"the control plane refused the enrollment token ({token}); "
            "create one with `edgefleet tokens create` and pass it with --token"
        )
    refused = fleet.refused()
    if refused:
        return advice.explain(refused)
    if enrolled:
        return ""
    failed, error = fleet.enroll_failures()
    if error and await advice.probe(error):
        return f"enroll failed for {failed} of {len(fleet.agents)}: {advice.explain(error)}"
    if time.monotonic() >= enroll_deadline:
        why = advice.explain(error) if error else "no Enroll call was answered"
        return f"no agent enrolled within {enroll_timeout:g} s (--enroll-timeout): {why}"
    return ""


def _incomplete(fleet: Fleet, advice: Advice) -> str:
    """Why the run did not fully work: agents that never enrolled, or
    enrolled but never held a Sync stream ("" when every agent did)."""
    n = len(fleet.agents)
    problems = []
    unenrolled = [a for a in fleet.agents if not a.device_id]
    if unenrolled:
        _, error = fleet.enroll_failures()
        why = advice.explain(error) if error else "still enrolling when the run ended"
        problems.append(f"{len(unenrolled)} of {n} agents never enrolled ({why})")
    unsynced = [a for a in fleet.agents if a.device_id and not a.connects]
    if unsynced:
        why = unsynced[0].last_error or "still connecting when the run ended"
        problems.append(
            f"{len(unsynced)} of {n} agents enrolled but never got a Sync stream ({why})"
        )
    return "; ".join(problems)


def enrollment_line(summary: FleetSummary, advice: Callable[[str], str] | None = None) -> str:
    """Enrolled, connected and failed-to-enroll counts, with the first
    enrollment error (and what to do about it)."""
    line = f"enrolled {summary.enrolled:,} of {summary.agents:,}, connected {summary.connected:,}"
    if summary.enroll_failed:
        words = advice(summary.enroll_error) if advice is not None else ""
        line += (
            f", enroll failed for {summary.enroll_failed:,} of {summary.agents:,}: "
            f"{summary.enroll_error}" + (f" ({words})" if words else "")
        )
    return line


def one_line(summary: FleetSummary, advice: Callable[[str], str] | None = None) -> str:
    """The live summary as one line, for logs."""
    connections = " ".join(f"{k}={v}" for k, v in summary.connection.items())
    updates = "; ".join(
        f"{ref or '-'}: " + " ".join(f"{s}={n}" for s, n in states.items())
        for ref, states in summary.models.items()
    )
    return (
        f"[{summary.elapsed_s:6.1f}s] {connections} | {updates} | "
        f"{enrollment_line(summary, advice)}"
    )


def _ordered(keys: list[str], order: tuple[str, ...]) -> list[str]:
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


def render_summary(
    summary: FleetSummary,
    profile: FleetProfile,
    *,
    final: bool = False,
    advice: Callable[[str], str] | None = None,
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
        f"enrollments {stats['enrollments']:,}  Sync streams {stats['connects']:,}  "
        f"heartbeats {stats['heartbeats']:,}  status reports {stats['status_reports']:,}  "
        f"telemetry uploads {stats['telemetry_uploads']:,} "
        f"({stats['telemetry_failures']:,} failed)"
    )
    if stats["downloads"]:
        figures += (
            f"  downloads {stats['downloads']:,} ({stats['download_bytes'] / 2**20:,.1f} MiB)"
        )
    enrollment = Text(
        enrollment_line(summary, advice),
        style="red" if summary.enroll_failed else "",
    )
    parts: list[RenderableType] = [Text(title, style="bold"), Text(connections), enrollment]
    parts += [table, Text(figures)]
    errors = stats["errors"]
    if errors:
        worst = sorted(errors.items(), key=lambda item: -item[1])[:5]
        failed = ", ".join(f"{k} x{v:,}" for k, v in worst)
        parts.append(Text(f"failed calls (each retry counted): {failed}", style="red"))
    return Group(*parts)
