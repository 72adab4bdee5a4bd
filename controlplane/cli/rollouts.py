"""`edgefleet rollouts`: ship a model version to a cohort of devices in
stages, gated on measured health, and steer it (pause, resume, approve,
abort).

A stage is written as one compact string (`--stage`, see STAGE_HELP); the
client library reads and writes it (controlplane.client.stages)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import click
import grpc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.base import (
    CliError,
    emit,
    enum_option,
    json_option,
    label_option,
    now,
    parsed,
    pass_env,
    to_json_dict,
    usage_error,
)
from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.client.errors import rpc_status
from edgefleet.controlplane.client.rollout_edit import (
    MAX_COUNT,
    PACING_KEYS,
    STAGE_FIELDS,
    describe_changes,
    edit_spec,
    resolve_members,
)
from edgefleet.controlplane.client.stages import empty_stage_warnings, parse_ramp, parse_stage
from edgefleet.controlplane.client.syntax import parse_duration, parse_iso_time, parse_model_ref
from edgefleet.v1 import operator_pb2

# Seconds between GetRollout polls while `rollouts watch` follows one.
POLL_INTERVAL_S = 1.0
# A watch's call that takes longer is taken as the control plane lost.
WATCH_CALL_TIMEOUT_S = 10.0
# What a watch waits out (a restart, a network blip) rather than ends on.
_WATCH_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Devices `rollouts watch` lists (failed and moving ones first): the rest of
# the screen is for the stages.
WATCH_MAX_DEVICES = 20

STAGE_HELP = """\
\b
Stages (--stage SIZE[,OPTION]..., repeatable, in order):
  SIZE                 a percent of the whole cohort (10%) or a device count
                       (5); prefix shadow: for a shadow stage (the candidate
                       runs beside the active model on mirrored requests).
                       The last stage takes every device left.
  name=TEXT            a name to show
  stratified           every class of the cohort is represented
  success=PCT          committed devices needed to pass (default 100)
  errors=PCT[/MIN]     fail when more than PCT% of finished devices failed,
                       once MIN have finished (default 0/1: any failure)
  bake=DURATION        wait this long after success before going on
  latency=FACTOR       gate: p95 latency <= class budget x FACTOR
  error-rate=RATE      gate: errors / requests <= RATE (0.05 or 5%)
  memory=FACTOR        gate: the memory the model adds (as builds measure
                       it) <= class limit x FACTOR
  agent-memory=MB      gate: the agent's whole resident memory <= MB
  silence=DURATION     gate: a device silent this long has failed
  agreement=RATIO      shadow stages (required): argmax agreement >= RATIO
  approve              wait for `rollouts approve` before the next stage
  on-failure=ACTION    pause (default) or abort (aborts and reverts)

\b
Examples:
  --stage "shadow:5,agreement=0.95"
  --stage "10%,stratified,errors=20/3,bake=5m,latency=1.5,silence=2m,approve"
  --stage "100%,error-rate=0.05,on-failure=abort"
"""

ABORT_HELP = """Abort a rollout; no device is notified from then on.

By default the abort reverts: every device that took the new version (or is
taking it) is put back on the version it had before the rollout, and devices
not yet notified are dropped (they keep what they run). With --keep, devices
keep whatever they have now. The reason counts how the devices ended
(reverted, revert failed, dropped)."""

# Rollouts that will not change any more on their own (one that succeeded
# with failures waits for `retry`).
_ENDED = frozenset({operator_pb2.ROLLOUT_STATE_SUCCEEDED,
                    operator_pb2.ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES})  # fmt: skip


# ------------------------------------------------------------------ parsing (pure)


def rollout_ended(r: operator_pb2.Rollout) -> bool:
    """Nothing more will happen: succeeded, or aborted and done putting its
    devices back (finished: right after an abort no device may be reverting
    yet, while the orchestrator has every revert still to send)."""
    if r.state == operator_pb2.ROLLOUT_STATE_ABORTED:
        return r.HasField("finished_at")
    return r.state in _ENDED


# ------------------------------------------------------------------ commands


@click.group()
def rollouts() -> None:
    """Staged rollouts of a model version, gated on device health."""


def _on_rollout(
    env: Connection, text: str, call: Callable[[str], operator_pb2.Rollout]
) -> operator_pb2.Rollout:
    """`call(rollout_id)`; the server takes the short ids `rollouts ls`
    shows (services/references.py)."""
    return call(text)


def _get(env: Connection, rollout_id: str) -> operator_pb2.Rollout:
    return env.stub.GetRollout(operator_pb2.GetRolloutRequest(id=rollout_id))


def _pacing(
    max_per_minute: int, ramp: tuple[int, float] | None, timeout: timedelta | None, retries: int
) -> operator_pb2.Pacing:
    pacing = operator_pb2.Pacing(max_per_minute=max_per_minute, device_retries=retries)
    if ramp is not None:
        pacing.ramp_base_per_minute, pacing.ramp_factor = ramp
    if timeout is not None:
        pacing.device_timeout.FromTimedelta(timeout)
    return pacing


@rollouts.command("create", epilog=STAGE_HELP)
@click.argument("ref", metavar="MODEL@VERSION", callback=parsed(parse_model_ref))
@click.option(
    "--class",
    "class_names",
    multiple=True,
    metavar="NAME",
    help="Devices of this class; repeatable.",
)
@label_option("Devices carrying this label; repeatable (with --class: both must hold).")
@click.option(
    "--stage",
    "stages",
    multiple=True,
    required=True,
    metavar="SPEC",
    callback=parsed(parse_stage),
    help="A stage: SIZE[,OPTION]...; repeatable, in order (syntax below).",
)
@click.option("--dynamic", is_flag=True, help="Devices that start matching later join too.")
@click.option("--start", is_flag=True, help="Start now (default: stay a draft until `start`).")
@click.option(
    "--start-at",
    metavar="ISO-TIME",
    callback=parsed(parse_iso_time),
    help="Start at this time, e.g. 2026-11-23T02:00Z (UTC unless an offset is given).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Only show which devices land in each stage, and which are excluded and why.",
)
@click.option(
    "--max-per-minute",
    metavar="N",
    type=click.IntRange(min=0, max=MAX_COUNT),
    default=0,
    help="Notify at most N devices a minute (0: no limit).",
)
@click.option(
    "--ramp",
    metavar="BASE:FACTOR",
    callback=parsed(parse_ramp),
    help="Exponential ramp: BASE devices the first minute, x FACTOR each minute.",
)
@click.option(
    "--device-timeout",
    metavar="DURATION",
    callback=parsed(parse_duration),
    help="A device not done this long after being notified timed out (a failure).",
)
@click.option(
    "--retries",
    metavar="N",
    type=click.IntRange(min=0, max=MAX_COUNT),
    default=0,
    help="Retries (with backoff) before a device counts as failed.",
)
@json_option
@pass_env
def rollouts_create(
    env: Connection,
    ref: tuple[str, str],
    class_names: Sequence[str],
    labels: Sequence[tuple[str, str]],
    stages: Sequence[operator_pb2.StageSpec],
    dynamic: bool,
    start: bool,
    start_at: datetime | None,
    dry_run: bool,
    max_per_minute: int,
    ramp: tuple[int, float] | None,
    device_timeout: timedelta | None,
    retries: int,
    as_json: bool,
) -> None:
    """Create a rollout of MODEL@VERSION to devices of --class and/or --label.

    Each device gets its class's artifact of the version; devices that cannot
    take part (no passing artifact, offline, pending, in another active
    rollout) are excluded with the reason. A draft until started (--start,
    --start-at or `rollouts start`)."""
    if not class_names and not labels:
        usage_error("name the cohort with --class and/or --label")
    if dry_run and (start or start_at):
        usage_error("--dry-run only plans; leave out --start and --start-at")
    if start and start_at:
        usage_error("--start starts it now, --start-at at a time: give one of them")
    spec = operator_pb2.RolloutSpec(
        model_name=ref[0],
        model_version=ref[1],
        class_names=class_names,
        label_selector=dict(labels),
        stages=stages,
        pacing=_pacing(max_per_minute, ramp, device_timeout, retries),
        dynamic=dynamic,
    )
    if start_at is not None:
        spec.start_at.FromDatetime(start_at)
    resp = env.stub.CreateRollout(
        operator_pb2.CreateRolloutRequest(
            spec=spec, dry_run=dry_run, start=start or start_at is not None
        )
    )
    if dry_run:
        emit(as_json, resp, lambda: render.rollout_plan(spec, resp.planned, resp.excluded))
        per_stage = [sum(d.stage == i for d in resp.planned) for i in range(len(spec.stages))]
    else:
        emit(as_json, resp.rollout, lambda: render.rollout_detail(resp.rollout, now()))
        per_stage = [s.total for s in resp.rollout.stages]
    warnings = empty_stage_warnings(per_stage)
    if start_at is not None and start_at < now():
        warnings.append(f"--start-at {start_at:%Y-%m-%dT%H:%MZ} is past: it starts now")
    for warning in warnings:
        click.secho(f"warning: {warning}", fg="yellow", bold=True, err=True)


@rollouts.command("ls")
@enum_option("--state", wrapper=operator_pb2.RolloutState, help="Only rollouts in this state.")
@json_option
@pass_env
def rollouts_ls(
    env: Connection, state: operator_pb2.RolloutState.ValueType | None, as_json: bool
) -> None:
    """List rollouts, newest first."""
    resp = env.stub.ListRollouts(
        operator_pb2.ListRolloutsRequest(state=state or operator_pb2.ROLLOUT_STATE_UNSPECIFIED)
    )
    emit(as_json, resp.rollouts, lambda: render.rollouts_table(resp.rollouts, now()))


@rollouts.command("show")
@click.argument("rollout_id", metavar="ID")
@json_option
@pass_env
def rollouts_show(env: Connection, rollout_id: str, as_json: bool) -> None:
    """Show a rollout: its spec, state and reason, each stage's progress and
    gates against their limits, and every device with its state and reason."""
    found = _on_rollout(env, rollout_id, lambda i: _get(env, i))
    emit(as_json, found, lambda: render.rollout_detail(found, now()))


def passed_stage(r: operator_pb2.Rollout) -> int:
    """The stage (from 0) an approve or a promote just passed: the current
    one after the last stage, else the one before it (the next started)."""
    current = r.current_stage
    done = (operator_pb2.STAGE_PHASE_PASSED, operator_pb2.STAGE_PHASE_PROMOTED)
    if current < len(r.stages) and r.stages[current].phase in done:
        return current
    return max(current - 1, 0)


def _action(
    name: str,
    verb: str,
    rpc: Callable[[Connection, operator_pb2.RolloutActionRequest], operator_pb2.Rollout],
    doc: str,
    *,
    staged: bool = False,
) -> None:
    """Register `rollouts NAME ID [--reason]`: one RolloutActionRequest RPC;
    `staged` (approve, promote) adds --stage, the stage the operator means
    to pass, and prints the stage passed."""

    def command(
        env: Connection, rollout_id: str, reason: str, as_json: bool, stage: int | None = None
    ) -> None:
        def call(i: str) -> operator_pb2.Rollout:
            request = operator_pb2.RolloutActionRequest(id=i, reason=reason)
            if stage is not None:
                request.stage = stage - 1  # people count from 1, the API from 0
            return rpc(env, request)

        done = _on_rollout(env, rollout_id, call)
        what = f"{verb} stage {passed_stage(done) + 1} of" if staged else verb
        emit(as_json, done, lambda: render.rollout_action(what, done))

    decorated = click.option("--reason", default="", help="Why, for the audit log.")(
        json_option(pass_env(command)))  # fmt: skip
    if staged:
        decorated = click.option(
            "--stage", "stage", type=click.IntRange(min=1), metavar="N",
            help="The stage you mean to pass (from 1, as `show` lists them): refused when the "
                 "rollout is at another, so a repeated command passes one stage, not two. "
                 "Default: the current stage.",
        )(decorated)  # fmt: skip
    rollouts.command(name, help=doc)(click.argument("rollout_id", metavar="ID")(decorated))


_action("start", "started", lambda env, req: env.stub.StartRollout(req),
        "Start a draft rollout now (or at its start time).")  # fmt: skip
_action("pause", "paused", lambda env, req: env.stub.PauseRollout(req),
        "Pause a rollout: no device is notified until `resume`.")  # fmt: skip
_action("resume", "resumed", lambda env, req: env.stub.ResumeRollout(req),
        "Resume a paused rollout. The current stage's failures so far are "
        "acknowledged: only new failures can trip its error threshold again.")  # fmt: skip
_action("approve", "approved", lambda env, req: env.stub.ApproveRolloutStage(req),
        "Approve the stage a rollout waits at: the next stage starts.", staged=True)  # fmt: skip
_action("promote", "promoted", lambda env, req: env.stub.PromoteRollout(req),
        "Pass the current stage now, whatever its thresholds and gates say (audited); "
        "the next stage starts. Refused when every stage passed already.",
        staged=True)  # fmt: skip


# ------------------------------------------------------------------ remediation


def _member_ids(env: Connection, rollout_id: str, texts: Sequence[str]) -> list[str]:
    """Member device ids for ids, short ids or device names."""
    if not texts:
        return []
    members = _get(env, rollout_id).devices
    try:
        return resolve_members(texts, members)
    except ValueError as err:
        raise CliError(str(err)) from None


def _device_texts(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    # "" is a prefix of every id: it would be "ambiguous" among them all.
    if any(not text.strip() for text in value):
        raise click.BadParameter("a device id or name must not be empty", ctx, param)
    return value


def _devices_verb(verb: str, ids: Sequence[str]) -> str:
    return f"{verb} {len(ids)} device(s) of" if ids else f"{verb} the failed devices of"


@rollouts.command("retry")
@click.argument("rollout_id", metavar="ID")
@click.argument("devices", nargs=-1, metavar="[DEVICE]...", callback=_device_texts)
@click.option("--reason", default="", help="Why, for the audit log and each device's reason.")
@json_option
@pass_env
def rollouts_retry(
    env: Connection, rollout_id: str, devices: Sequence[str], reason: str, as_json: bool
) -> None:
    """Try failed, rejected or timed-out members again, with a fresh retry
    budget: the DEVICEs named (ids, short ids or names), or every failed
    member. A paused rollout, or one that succeeded with failures, runs
    again."""
    ids: list[str] = []

    def call(i: str) -> operator_pb2.Rollout:
        ids[:] = _member_ids(env, i, devices)
        request = operator_pb2.RetryRolloutRequest(id=i, device_ids=ids, reason=reason)
        return env.stub.RetryRollout(request)

    done = _on_rollout(env, rollout_id, call)
    emit(as_json, done, lambda: render.rollout_action(_devices_verb("retried", ids), done))


@rollouts.command("skip")
@click.argument("rollout_id", metavar="ID")
@click.argument("devices", nargs=-1, required=True, metavar="DEVICE...", callback=_device_texts)
@click.option("--reason", required=True, help="Why (required): kept on each device and audited.")
@json_option
@pass_env
def rollouts_skip(
    env: Connection, rollout_id: str, devices: Sequence[str], reason: str, as_json: bool
) -> None:
    """Leave members (ids, short ids or names) on the version they run: the
    rollout stops waiting for them and they leave their stage's success
    count. Committed and reverting members cannot be skipped."""
    if not reason.strip():
        usage_error("say why with --reason")
    ids: list[str] = []

    def call(i: str) -> operator_pb2.Rollout:
        ids[:] = _member_ids(env, i, devices)
        request = operator_pb2.SkipRolloutDevicesRequest(id=i, device_ids=ids, reason=reason)
        return env.stub.SkipRolloutDevices(request)

    done = _on_rollout(env, rollout_id, call)
    emit(as_json, done, lambda: render.rollout_action(_devices_verb("skipped", ids), done))


UPDATE_HELP = """\
\b
Each option changes that setting only; the rest of the rollout stays. Stage
options take the values of `rollouts create --stage` (e.g. --errors 20/3,
--bake 5m, --latency 1.5); `off` removes one (the default applies again).
Without --stage they apply to every stage. An error threshold changed alone
takes a default success threshold with it (100% less the errors tolerated).
The model, cohort and stage sizes cannot change (the server says which
field was refused): create another rollout for that.

\b
Examples:
  edgefleet rollouts update 1a2b --stage 2 --errors 20/3 --bake 10m
  edgefleet rollouts update 1a2b --latency off --no-approve --max-per-minute 50
"""
# `rollouts update` options: the stage option (STAGE_FIELDS key) each sets.
_STAGE_OPTIONS = {
    "success": ("PCT", "Committed devices needed to pass (success=)."),
    "errors": ("PCT[/MIN]", "Error threshold (errors=)."),
    "bake": ("DURATION", "Bake time after success (bake=)."),
    "latency": ("FACTOR", "Gate: p95 latency <= class budget x FACTOR."),
    "error-rate": ("RATE", "Gate: errors / requests <= RATE."),
    "memory": ("FACTOR", "Gate: the model's memory <= class limit x FACTOR."),
    "agent-memory": ("MB", "Gate: the agent's resident memory <= MB."),
    "silence": ("DURATION", "Gate: a device silent this long has failed."),
    "agreement": ("RATIO", "Shadow stages: argmax agreement >= RATIO."),
}
_PACING_OPTIONS = {
    "max-per-minute": ("N", "Notify at most N devices a minute (0: no limit)."),
    "ramp": ("BASE:FACTOR", "Exponential ramp (off: none)."),
    "device-timeout": ("DURATION", "A device not done this long timed out (off: never)."),
    "retries": ("N", "Retries before a device counts as failed."),
}


def _update_options(command: Callable[..., None]) -> Callable[..., None]:
    for key, (metavar, help_text) in reversed([*_STAGE_OPTIONS.items(),
                                               *_PACING_OPTIONS.items()]):  # fmt: skip
        command = click.option(f"--{key}", metavar=metavar, help=help_text)(command)
    return command


@rollouts.command("update", epilog=UPDATE_HELP)
@click.argument("rollout_id", metavar="ID")
@click.option(
    "--stage",
    "stage",
    type=click.IntRange(min=1),
    metavar="N",
    help="Change stage N only (from 1, as `show` lists them); default: every stage.",
)
@_update_options
@click.option(
    "--approve/--no-approve", default=None, help="Wait for `rollouts approve` after the stage."
)
@click.option("--on-failure", type=click.Choice(["pause", "abort"]), help="On a failed stage.")
@click.option("--reason", default="", help="Why, for the audit log.")
@json_option
@pass_env
def rollouts_update(
    env: Connection,
    /,
    rollout_id: str,
    stage: int | None,
    approve: bool | None,
    reason: str,
    as_json: bool,
    **options: str | None,
) -> None:
    """Change the thresholds, gates, bake times, approval, on-failure action
    or pacing of a rollout that has not finished (draft, scheduled, running,
    waiting for approval or paused). Prints what changed."""
    given = {k.replace("_", "-"): v for k, v in options.items() if v is not None}
    stage_changes = {k: v for k, v in given.items() if k in STAGE_FIELDS}
    if approve is not None:
        stage_changes["approve"] = "on" if approve else "off"
    pacing_changes = {k: v for k, v in given.items() if k in PACING_KEYS}
    if not stage_changes and not pacing_changes:
        usage_error("say what to change (see --help), e.g. --errors 20/3 or --bake 5m")
    if stage is not None and not stage_changes:
        usage_error(
            "--stage picks the stage that stage options change, and none was given: pacing "
            "(--max-per-minute, --device-timeout, ...) is the whole rollout's; leave out --stage"
        )
    before: list[operator_pb2.RolloutSpec] = []

    def call(i: str) -> operator_pb2.Rollout:
        current = env.stub.GetRollout(operator_pb2.GetRolloutRequest(id=i, summary_only=True))
        try:
            spec = edit_spec(current.spec, stage=stage, stage_changes=stage_changes,
                             pacing_changes=pacing_changes)  # fmt: skip
        except ValueError as err:
            usage_error(str(err))
        before.append(current.spec)
        request = operator_pb2.UpdateRolloutRequest(id=i, spec=spec, reason=reason)
        return env.stub.UpdateRollout(request)

    done = _on_rollout(env, rollout_id, call)

    def human() -> RenderableType:
        changed = describe_changes(before[-1], done.spec)
        return Group(render.rollout_action("updated", done), *(Text(line) for line in changed))

    emit(as_json, done, human)


@rollouts.command("abort", help=ABORT_HELP)
@click.argument("rollout_id", metavar="ID")
@click.option("--keep", is_flag=True, help="Devices keep what they have now (no revert).")
@click.option("--reason", default="", help="Why, for the audit log.")
@json_option
@pass_env
def rollouts_abort(
    env: Connection, rollout_id: str, keep: bool, reason: str, as_json: bool
) -> None:
    done = _on_rollout(
        env,
        rollout_id,
        lambda i: env.stub.AbortRollout(
            operator_pb2.AbortRolloutRequest(id=i, reason=reason, revert=not keep)
        ),
    )
    emit(as_json, done, lambda: render.rollout_action("aborted", done))


@rollouts.command("watch")
@click.argument("rollout_id", metavar="ID")
@json_option
@pass_env
def rollouts_watch(env: Connection, rollout_id: str, as_json: bool) -> None:
    """Follow a rollout live until it ends (a redraw every second); Ctrl-C
    stops watching, the rollout goes on. With --json: one JSON line per change.
    Into a pipe or a file: one plain line per change."""
    current = _on_rollout(env, rollout_id, lambda i: _get(env, i))
    try:
        if as_json:
            _watch_json(env, current)
        elif Console().is_terminal:
            _watch_live(env, current)
        else:
            # A live display draws nothing into a pipe until it stops.
            _watch_lines(env, current)
    except KeyboardInterrupt:
        pass  # the usual way to stop watching: not an error


class _Poller:
    """GetRollout every POLL_INTERVAL_S for a watch. A watch outlives a
    control-plane restart or a network blip: while the control plane cannot
    be reached it keeps asking, and `lost` says so; any other error (the
    rollout deleted, the token revoked) ends the watch with that error."""

    def __init__(
        self,
        env: Connection,
        request: operator_pb2.GetRolloutRequest,
        on_change: Callable[[str | None], None],
    ) -> None:
        self._env, self._request, self._on_change = env, request, on_change
        self.lost: str | None = None  # why the control plane is out of reach, since when

    def next(self) -> operator_pb2.Rollout:
        while True:
            time.sleep(POLL_INTERVAL_S)
            try:
                rollout = self._env.stub.GetRollout(self._request, timeout=WATCH_CALL_TIMEOUT_S)
            except grpc.RpcError as err:
                status = rpc_status(err)
                if status is None or status[0] not in _WATCH_RETRIED:
                    raise
                if self.lost is None:
                    self.lost = (
                        f"{now():%H:%M:%SZ} lost the control plane ({status[0].name}); "
                        "still watching, Ctrl-C to stop"
                    )
                    self._on_change(self.lost)
                continue
            if self.lost is not None:
                self.lost = None
                self._on_change(None)
            return rollout


def _say_on_stderr(lost: str | None) -> None:
    # stdout stays the watch's own lines (or JSON) for whoever reads the pipe.
    click.echo(lost or f"{now():%H:%M:%SZ} reconnected", err=True)


def _watch_json(env: Connection, current: operator_pb2.Rollout) -> None:
    poller = _Poller(env, operator_pb2.GetRolloutRequest(id=current.id), _say_on_stderr)
    last = ""
    while True:
        line = json.dumps(to_json_dict(current), separators=(",", ":"))
        if line != last:
            click.echo(line)
            last = line
        if rollout_ended(current):
            return
        current = poller.next()


def _watch_lines(env: Connection, current: operator_pb2.Rollout) -> None:
    shown = operator_pb2.GetRolloutRequest(id=current.id, device_limit=WATCH_MAX_DEVICES)
    poller = _Poller(env, shown, _say_on_stderr)
    last = ""
    while True:
        line = render.rollout_line(current)
        if line != last:
            click.echo(f"{now():%H:%M:%SZ} {line}")
            last = line
        if rollout_ended(current):
            return
        current = poller.next()


def _watch_live(env: Connection, current: operator_pb2.Rollout) -> None:
    # The screen shows WATCH_MAX_DEVICES, so only those are read: a whole
    # 10,000-device rollout every second costs the server a few hundred ms.
    shown = operator_pb2.GetRolloutRequest(id=current.id, device_limit=WATCH_MAX_DEVICES)
    live = Live(console=Console(), auto_refresh=False)

    def view() -> RenderableType:
        detail = render.rollout_detail(current, now(), max_devices=WATCH_MAX_DEVICES)
        if poller.lost is None:
            return detail
        return Group(detail, Text(poller.lost, style="bold red"))

    poller = _Poller(env, shown, lambda _lost: live.update(view(), refresh=True))
    with live:
        live.update(view(), refresh=True)
        while not rollout_ended(current):
            current = poller.next()
            live.update(view(), refresh=True)
