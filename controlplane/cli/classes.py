"""`edgefleet classes`: device classes, their match rules and constraints."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.base import (
    F,
    emit,
    enum_option,
    json_option,
    parsed,
    pass_env,
    usage_error,
)
from edgefleet.controlplane.client.class_match import match_summary, match_warnings
from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.client.syntax import (
    CONSTRAINT_FIELDS,
    FALLBACK_CHOICES,
    constraint_profile,
    parse_match,
)
from edgefleet.controlplane.domain.delivery import parse_base_url, parse_rate
from edgefleet.controlplane.domain.input_shapes import parse_input_shape
from edgefleet.v1 import common_pb2, operator_pb2

# `--clear` names: the options' own names.
CLEAR_CHOICES = {option.replace("_", "-"): option for option in CONSTRAINT_FIELDS}
# Delivery settings `--clear` also takes (not constraints: nothing rebuilds).
CLEAR_DELIVERY = ("artifact-mirror", "max-download-rate")
# The class's input shapes (a constraint, apart: --input-shape repeats).
CLEAR_SHAPES = "input-shapes"


@click.group()
def classes() -> None:
    """Device classes: match rules and build constraints."""


def _class_options(*, create: bool) -> Callable[[F], F]:
    """Options shared by `classes create` and `classes update`."""
    positive = click.FloatRange(min=0, min_open=True)
    # A limit: positive, or (updating) 0 to remove the one the class has.
    limit = positive if create else click.FloatRange(min=0)
    removes = "" if create else " 0 removes it."
    options = [
        enum_option(
            "--runtime",
            wrapper=common_pb2.Runtime,
            required=create,
            help="Inference runtime the class targets.",
        ),
        click.option("--max-size-mb", type=limit, help="Largest artifact allowed." + removes),
        click.option("--latency-budget-ms", type=limit, help="p95 latency budget." + removes),
        click.option(
            "--max-memory-mb",
            type=limit,
            help="Peak inference memory allowed per model." + removes,
        ),
        click.option(
            "--device-memory-mb",
            type=limit,
            help="Memory budget for all the models a device holds together (their builds' "
            "measured memory, summed); an assignment past it is refused." + removes,
        ),
        enum_option(
            "--quantization",
            wrapper=common_pb2.Quantization,
            default="auto" if create else None,
            show_default=create,
            help="Preferred precision; auto picks the best candidate that passes.",
        ),
        click.option(
            "--fallback",
            type=click.Choice(FALLBACK_CHOICES),
            help="Also build a lighter fallback artifact in this precision, which devices "
            "serve while they run hot or low on battery (docs/power.md); none drops it.",
        ),
        click.option("--accelerator", help="Accelerator kind devices must have, e.g. jetson."),
        click.option(
            "--min-accuracy-retention",
            type=click.FloatRange(min=0, max=1, min_open=True),
            help="Fraction of the fp32 accuracy an artifact must keep, e.g. 0.98.",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            help="Inference threads on the devices (1 if never set); builds measure with as many.",
        ),
        click.option(
            "--speed-factor",
            type=positive,
            help="Device latency / build-host latency, e.g. 3.5 for a slow board (1 if never set).",
        ),
        click.option(
            "--microcontroller/--no-microcontroller",
            default=None,
            help="Also emit the int8 model as C source for TensorFlow Lite Micro.",
        ),
        click.option(
            "--input-shape",
            "input_shapes",
            metavar="NAME=DIMS",
            multiple=True,
            callback=parsed(parse_input_shape),
            help="TFLite: the static shape to fix an input's dynamic dimensions to, e.g. "
            "images=1x3x48x320; repeat for each input"
            + (" (replaces the class's shapes)." if not create else ".")
            + " A dynamic batch stays dynamic where the converter can keep it "
            "(docs/operators/builds.md#tflite-input-shapes).",
        ),
        click.option("--priority", type=int, help="Higher wins when several classes match."),
        click.option("--description", help="Free text."),
        click.option(
            "--match",
            "rules",
            metavar="RULE",
            callback=parsed(parse_match),
            multiple=True,
            help="Match rule, e.g. 'arch == aarch64', 'memory_mb < 4096'"
            + (" (replaces all rules)." if not create else "; repeat for AND."),
        ),
        click.option(
            "--artifact-mirror",
            "mirrors",
            metavar="URL",
            multiple=True,
            callback=parsed(parse_base_url),
            help="An HTTP(S) server with the artifacts by digest (a site's local mirror), tried "
            "before the server-wide mirrors and the control plane; repeat in order"
            + (" (replaces the class's mirrors)." if not create else ".")
            + " Devices use it from their next assignment (docs/operators/delivery.md).",
        ),
        click.option(
            "--max-download-rate",
            metavar="RATE",
            callback=parsed(parse_rate),
            help="Cap on each download of the class's devices, bytes/s with K/M/G "
            "(1024-based): e.g. 500K, 2M, 2MiB/s; an agent's own lower cap wins."
            + (" 0 removes it." if not create else ""),
        ),
    ]

    def apply(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


@classes.command("create")
@click.argument("name")
@_class_options(create=True)
@json_option
@pass_env
def classes_create(
    env: Connection,
    /,
    name: str,
    rules: Sequence[common_pb2.MatchRule],
    priority: int | None,
    description: str | None,
    mirrors: Sequence[str],
    max_download_rate: int | None,
    as_json: bool,
    **constraints: Any,
) -> None:
    """Create a device class."""
    created = env.stub.CreateDeviceClass(
        operator_pb2.CreateDeviceClassRequest(
            name=name,
            description=description or "",
            priority=priority or 0,
            constraints=constraint_profile(**constraints),
            match_rules=rules,
            artifact_mirrors=mirrors,
            max_download_rate=max_download_rate or 0,
        )
    )
    emit(as_json, created, lambda: render.class_detail(created))
    report_matches(created, "created", as_json=as_json)


@classes.command("ls")
@json_option
@pass_env
def classes_ls(env: Connection, as_json: bool) -> None:
    """List device classes."""
    resp = env.stub.ListDeviceClasses(operator_pb2.ListDeviceClassesRequest())
    emit(as_json, resp.classes, lambda: render.classes_table(resp.classes))


@classes.command("show")
@click.argument("name")
@json_option
@pass_env
def classes_show(env: Connection, name: str, as_json: bool) -> None:
    """Show a class's constraints, match rules and device count."""
    found = env.stub.GetDeviceClass(operator_pb2.GetDeviceClassRequest(name=name))
    emit(as_json, found, lambda: render.class_detail(found))


@classes.command("update")
@click.argument("name")
@_class_options(create=False)
@click.option("--clear-rules", is_flag=True, help="Remove every match rule (pinning only).")
@click.option(
    "--clear",
    "clear",
    multiple=True,
    type=click.Choice([*CLEAR_CHOICES, CLEAR_SHAPES, *CLEAR_DELIVERY]),
    metavar="FIELD",
    help="Remove a constraint, as if never set, or the class's mirrors or download cap "
    "(repeat for several): " + ", ".join([*CLEAR_CHOICES, CLEAR_SHAPES, *CLEAR_DELIVERY]) + ".",
)
@json_option
@pass_env
def classes_update(
    env: Connection,
    /,
    name: str,
    rules: Sequence[common_pb2.MatchRule],
    clear_rules: bool,
    clear: Sequence[str],
    priority: int | None,
    description: str | None,
    mirrors: Sequence[str],
    max_download_rate: int | None,
    as_json: bool,
    **constraints: Any,
) -> None:
    """Change a class; options not given keep their stored values."""
    if rules and clear_rules:
        usage_error("--match and --clear-rules exclude each other")
    given = {
        "artifact-mirror": bool(mirrors),
        "max-download-rate": max_download_rate is not None,
        CLEAR_SHAPES: bool(constraints.get("input_shapes")),
    }
    for option in clear:
        if given.get(option) or constraints.get(CLEAR_CHOICES.get(option, "")) is not None:
            flag = "input-shape" if option == CLEAR_SHAPES else option
            usage_error(f"--{flag} and --clear {option} exclude each other")
    if "max-download-rate" in clear:
        max_download_rate = 0
    request = operator_pb2.UpdateDeviceClassRequest(
        name=name,
        description=description,
        priority=priority,
        constraints=constraint_profile(**constraints),
        match_rules=rules,
        replace_match_rules=bool(rules) or clear_rules,
        clear_constraints=sorted(
            {CONSTRAINT_FIELDS[CLEAR_CHOICES[o]] for o in clear if o in CLEAR_CHOICES}
            | ({"input_shapes"} if CLEAR_SHAPES in clear else set())
        ),
        artifact_mirrors=mirrors,
        replace_artifact_mirrors=bool(mirrors) or "artifact-mirror" in clear,
        max_download_rate=max_download_rate,
    )
    updated = env.stub.UpdateDeviceClass(request)
    emit(as_json, updated, lambda: render.class_detail(updated))
    report_matches(updated, "updated", as_json=as_json)


def report_matches(cls: common_pb2.DeviceClass, verb: str, *, as_json: bool) -> None:
    """After a create or update: how many devices the rules match (not with
    --json, whose output has match_report), and warnings on stderr."""
    if not cls.HasField("match_report"):
        return  # a server from before match reports
    if not as_json:
        click.echo(match_summary(cls, verb))
    for warning in match_warnings(cls):
        click.secho(f"warning: {warning}", fg="yellow", bold=True, err=True)


@classes.command("delete")
@click.argument("name")
@pass_env
def classes_delete(env: Connection, name: str) -> None:
    """Delete a class; its devices are reclassified by the remaining rules."""
    resp = env.stub.DeleteDeviceClass(operator_pb2.DeleteDeviceClassRequest(name=name))
    click.echo(f"deleted class {name}; {resp.reclassified} device(s) reclassified")
