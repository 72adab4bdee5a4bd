"""`edgefleet builds`: build a model version for device classes, and read
what each build measured."""

from __future__ import annotations

import time
from collections.abc import Sequence

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.base import (
    CliError,
    emit,
    enum_option,
    json_option,
    now,
    parsed,
    pass_env,
)
from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.client.syntax import enum_name, parse_model_ref
from edgefleet.v1 import operator_pb2

# Seconds between GetBuild polls while `builds run --wait` watches.
POLL_INTERVAL_S = 0.5

FINISHED = frozenset(
    {
        operator_pb2.BUILD_STATE_SUCCEEDED,
        operator_pb2.BUILD_STATE_FAILED,
        operator_pb2.BUILD_STATE_CANCELLED,
    }
)


@click.group()
def builds() -> None:
    """Optimize model versions for device classes."""


def _get_build(env: Connection, text: str) -> operator_pb2.Build:
    """GetBuild; the server takes the short ids `builds ls` shows."""
    return env.stub.GetBuild(operator_pb2.GetBuildRequest(id=text))


def _describe(b: operator_pb2.Build) -> str:
    return f"{b.class_name}: {enum_name(operator_pb2.BuildState, b.state)}"


def _wait(env: Connection, started: Sequence[operator_pb2.Build]) -> list[operator_pb2.Build]:
    """Poll each build until it succeeds or fails, with a progress bar per
    build on stderr; the builds in their final state, in the same order."""
    latest = {b.id: b for b in started}
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with progress:
        tasks = {b.id: progress.add_task(_describe(b), total=1.0) for b in started}
        try:
            while True:
                for b in latest.values():
                    finished = b.state in FINISHED
                    done = 1.0 if finished else b.progress
                    progress.update(tasks[b.id], description=_describe(b), completed=done)
                if all(b.state in FINISHED for b in latest.values()):
                    break
                time.sleep(POLL_INTERVAL_S)
                for build_id, b in list(latest.items()):
                    if b.state not in FINISHED:
                        latest[build_id] = env.stub.GetBuild(operator_pb2.GetBuildRequest(id=b.id))
        except KeyboardInterrupt:
            ids = ", ".join(render.short_id(i) for i in latest)
            raise CliError(
                f"stopped waiting; the builds go on (see `edgefleet builds show ID`): {ids}"
            ) from None
    return [latest[b.id] for b in started]


def _failures(done: Sequence[operator_pb2.Build]) -> str:
    ended = (operator_pb2.BUILD_STATE_FAILED, operator_pb2.BUILD_STATE_CANCELLED)
    failed = [b for b in done if b.state in ended]
    return "; ".join(
        f"build for class {b.class_name} failed: {b.error.strip() or 'no reason given'}"
        for b in failed
    )


@builds.command("run")
@click.argument("ref", metavar="MODEL@VERSION", callback=parsed(parse_model_ref))
@click.option("--class", "class_name", help="Only this device class (default: every class).")
@click.option("--force", is_flag=True, help="Rebuild even when an identical build exists.")
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Follow the builds until they finish; exit 1 if any fails.",
)
@json_option
@pass_env
def builds_run(
    env: Connection,
    ref: tuple[str, str],
    class_name: str | None,
    force: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Build a model version for each device class (or one)."""
    name, version = ref
    resp = env.stub.RunBuild(
        operator_pb2.RunBuildRequest(
            model_name=name, model_version=version, class_name=class_name or "", force=force
        )
    )
    if not wait:
        emit(as_json, resp.builds, lambda: render.builds_table(resp.builds, now()))
        return
    done = _wait(env, resp.builds)
    emit(as_json, done, lambda: render.build_report(done))
    failures = _failures(done)
    if failures:
        raise CliError(failures)


@builds.command("ls")
@click.option("--model", "model_name", help="Only builds of this model.")
@click.option("--version", help="Only builds of this model version.")
@click.option("--class", "class_name", help="Only builds for this device class.")
@enum_option("--state", wrapper=operator_pb2.BuildState, help="Only builds in this state.")
@json_option
@pass_env
def builds_ls(
    env: Connection,
    model_name: str | None,
    version: str | None,
    class_name: str | None,
    state: operator_pb2.BuildState.ValueType | None,
    as_json: bool,
) -> None:
    """List builds, newest first."""
    resp = env.stub.ListBuilds(
        operator_pb2.ListBuildsRequest(
            model_name=model_name or "",
            model_version=version or "",
            class_name=class_name or "",
            state=state or operator_pb2.BUILD_STATE_UNSPECIFIED,
        )
    )
    emit(as_json, resp.builds, lambda: render.builds_table(resp.builds, now()))


@builds.command("show")
@click.argument("build_id", metavar="ID")
@json_option
@pass_env
def builds_show(env: Connection, build_id: str, as_json: bool) -> None:
    """Show a build: every candidate measured, its verdict and why, and the log."""
    found = _get_build(env, build_id)
    emit(as_json, found, lambda: render.build_detail(found, now()))


@builds.command("cancel")
@click.argument("build_id", metavar="ID")
@json_option
@pass_env
def builds_cancel(env: Connection, build_id: str, as_json: bool) -> None:
    """Cancel a queued or running build (a running one stops at its next step)."""
    found = env.stub.CancelBuild(operator_pb2.CancelBuildRequest(id=build_id))
    short = render.short_id(found.id)
    running = found.state == operator_pb2.BUILD_STATE_RUNNING
    emit(
        as_json,
        found,
        lambda: (
            f"build {short} ({found.class_name}) is stopping; `edgefleet builds show {short}`"
            if running
            else f"cancelled build {short} ({found.class_name})"
        ),
    )
