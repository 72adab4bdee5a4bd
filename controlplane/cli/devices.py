"""`edgefleet devices`: the device inventory."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import click

from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.base import (
    CliError,
    call_by_id,
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
from edgefleet.controlplane.client.format import model_views
from edgefleet.controlplane.client.paging import list_devices
from edgefleet.controlplane.client.pin_checks import pin_warnings
from edgefleet.controlplane.client.syntax import parse_label, parse_model_ref, resolve_prefix
from edgefleet.v1 import common_pb2, operator_pb2


@click.group()
def devices() -> None:
    """The device inventory."""


def _all_ids(env: Connection) -> list[str]:
    """Every device's id, decommissioned ones too: what short ids resolve
    against."""
    return [
        d.id
        for d in list_devices(
            env.stub, operator_pb2.ListDevicesRequest(include_decommissioned=True)
        )
    ]


def _resolve_ids(env: Connection, texts: Sequence[str]) -> list[str]:
    """Full device ids for ids or the short prefixes tables show."""
    known = _all_ids(env)
    try:
        return [i if i in known else resolve_prefix(i, known, "device") for i in texts]
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _on_device(
    env: Connection, text: str, call: Callable[[str], common_pb2.Device]
) -> common_pb2.Device:
    """`call(device_id)`, accepting the short ids `devices ls` shows."""

    return call_by_id(text, call, lambda: _all_ids(env), "device")


def device_json(device: common_pb2.Device) -> dict[str, Any]:
    """The device's --json form: its proto JSON, with `models` flattened to
    what scripts ask of a model (one object per model, by name)."""
    data = to_json_dict(device)
    data["models"] = [
        {
            "name": v.name,
            "version": v.serving,
            "assigned_version": v.assigned,
            "state": v.state,
            "sequence": v.sequence,
            "rollout_id": v.rollout_id,
            "shadow": v.shadow,
            "bytes_done": v.bytes_done,
            "bytes_total": v.bytes_total,
            "reason": v.reason,
        }
        for v in model_views(device)
    ]
    return data


def _device_done(as_json: bool, verb: str, device: common_pb2.Device, suffix: str = "") -> None:
    emit(as_json, device, lambda: f"{verb} device {device.name} ({device.id}){suffix}")


@devices.command("ls")
@enum_option("--state", wrapper=common_pb2.DeviceState, help="Only devices in this state.")
@click.option("--class", "class_name", help="Only devices in this class.")
@label_option("Only devices with this label; repeatable.")
@click.option("--unclassified", is_flag=True, help="Only devices that match no class.")
@click.option("--all", "include_decommissioned", is_flag=True, help="Include decommissioned.")
@json_option
@pass_env
def devices_ls(
    env: Connection,
    state: common_pb2.DeviceState.ValueType | None,
    class_name: str | None,
    labels: Sequence[tuple[str, str]],
    unclassified: bool,
    include_decommissioned: bool,
    as_json: bool,
) -> None:
    """List devices."""
    if class_name and unclassified:
        usage_error("--class and --unclassified exclude each other")
    listed = list_devices(
        env.stub,
        operator_pb2.ListDevicesRequest(
            state=state or common_pb2.DEVICE_STATE_UNSPECIFIED,
            class_name=class_name or "",
            labels=dict(labels),
            unclassified=unclassified,
            include_decommissioned=include_decommissioned
            or state == common_pb2.DEVICE_STATE_DECOMMISSIONED,
        ),
    )
    if as_json:
        click.echo(json.dumps([device_json(d) for d in listed], indent=2))
    else:
        emit(False, listed, lambda: render.devices_table(listed, now()))


@devices.command("show")
@click.argument("device_id", metavar="ID")
@json_option
@pass_env
def devices_show(env: Connection, device_id: str, as_json: bool) -> None:
    """Show a device's hardware, runtime, class and every model it holds:
    assigned and served version, update state, the update in flight or the
    last failure."""
    device = _on_device(
        env, device_id, lambda i: env.stub.GetDevice(operator_pb2.GetDeviceRequest(id=i))
    )
    if as_json:
        click.echo(json.dumps(device_json(device), indent=2))
    else:
        emit(False, device, lambda: render.device_detail(device, now()))


@devices.command("accept")
@click.argument("device_id", metavar="ID")
@json_option
@pass_env
def devices_accept(env: Connection, device_id: str, as_json: bool) -> None:
    """Accept a pending device so it can receive work."""
    device = _on_device(
        env, device_id, lambda i: env.stub.AcceptDevice(operator_pb2.AcceptDeviceRequest(id=i))
    )
    _device_done(as_json, "accepted", device)


@devices.command("reject")
@click.argument("device_id", metavar="ID")
@click.option("--reason", default="", help="Why, for the audit log.")
@json_option
@pass_env
def devices_reject(env: Connection, device_id: str, reason: str, as_json: bool) -> None:
    """Reject a device; its RPCs are denied from then on."""
    device = _on_device(
        env,
        device_id,
        lambda i: env.stub.RejectDevice(operator_pb2.RejectDeviceRequest(id=i, reason=reason)),
    )
    _device_done(as_json, "rejected", device)


@devices.command("decommission")
@click.argument("device_id", metavar="ID")
@click.option("--reason", default="", help="Why, for the audit log.")
@json_option
@pass_env
def devices_decommission(env: Connection, device_id: str, reason: str, as_json: bool) -> None:
    """Retire a device: its credential and certificates stop working and its
    agent is refused; a reinstalled board with its hardware id may enroll
    afresh (what a device that lost its identity needs)."""
    device = _on_device(
        env,
        device_id,
        lambda i: env.stub.DecommissionDevice(
            operator_pb2.DecommissionDeviceRequest(id=i, reason=reason)
        ),
    )
    _device_done(as_json, "decommissioned", device)


@devices.command("label")
@click.argument("device_id", metavar="ID")
@click.argument("labels", metavar="[KEY=VALUE]...", nargs=-1, callback=parsed(parse_label))
@click.option("--remove", multiple=True, metavar="KEY", help="Label key to remove.")
@json_option
@pass_env
def devices_label(
    env: Connection,
    device_id: str,
    labels: Sequence[tuple[str, str]],
    remove: Sequence[str],
    as_json: bool,
) -> None:
    """Set labels (KEY=VALUE) on a device and remove others (--remove KEY)."""
    if not labels and not remove:
        usage_error("give KEY=VALUE labels to set or --remove KEY")
    device = _on_device(
        env,
        device_id,
        lambda i: env.stub.UpdateDeviceLabels(
            operator_pb2.UpdateDeviceLabelsRequest(id=i, set=dict(labels), remove=remove)
        ),
    )
    _device_done(as_json, "labelled", device)


@devices.command("pin")
@click.argument("device_id", metavar="ID")
@click.argument("class_name", metavar="CLASS")
@json_option
@pass_env
def devices_pin(env: Connection, device_id: str, class_name: str, as_json: bool) -> None:
    """Pin a device to a class; match rules no longer move it."""
    device = _on_device(
        env,
        device_id,
        lambda i: env.stub.SetDeviceClass(
            operator_pb2.SetDeviceClassRequest(id=i, class_name=class_name)
        ),
    )
    _device_done(as_json, "pinned", device, f" to {class_name}")
    for warning in pin_warnings(env.stub, device, class_name):
        click.secho(f"warning: {warning}", fg="yellow", bold=True, err=True)


@devices.command("unpin")
@click.argument("device_id", metavar="ID")
@json_option
@pass_env
def devices_unpin(env: Connection, device_id: str, as_json: bool) -> None:
    """Unpin a device; match rules classify it again."""
    device = _on_device(
        env, device_id, lambda i: env.stub.SetDeviceClass(operator_pb2.SetDeviceClassRequest(id=i))
    )
    _device_done(as_json, "unpinned", device)


@devices.command("assign")
@click.argument("ref", metavar="MODEL@VERSION", callback=parsed(parse_model_ref))
@click.argument("device_ids", metavar="ID...", nargs=-1, required=True)
@click.option("--reason", default="", help="Why, for the audit log.")
@json_option
@pass_env
def devices_assign(
    env: Connection, ref: tuple[str, str], device_ids: Sequence[str], reason: str, as_json: bool
) -> None:
    """Install MODEL@VERSION on devices now, each its class's artifact.

    Adds the model to each device, or replaces that model's version there;
    the devices' other models are untouched (remove one with `edgefleet
    devices unassign`). All or nothing: if one device cannot take it (no successful build for its
    class, not accepted), nothing is assigned and every such device is named.
    Watch progress with `edgefleet devices ls` and `edgefleet devices history ID`."""
    ids = _resolve_ids(env, device_ids)
    response = env.stub.AssignModel(
        operator_pb2.AssignModelRequest(
            device_ids=ids, model_name=ref[0], model_version=ref[1], reason=reason
        )
    )
    emit(
        as_json,
        list(response.assignments),
        lambda: render.assignments_table(response.assignments, now()),
    )


@devices.command("unassign")
@click.argument("model_name", metavar="MODEL")
@click.argument("device_ids", metavar="ID...", nargs=-1, required=True)
@click.option("--reason", default="", help="Why, for the audit log.")
@json_option
@pass_env
def devices_unassign(
    env: Connection, model_name: str, device_ids: Sequence[str], reason: str, as_json: bool
) -> None:
    """Remove MODEL from devices; their other models keep serving.

    Each device's agent unloads the model once its in-flight requests are
    done. Devices that do not hold MODEL are listed as not assigned (not an
    error); an unknown device or model, a device an active rollout of MODEL
    holds, or one whose agent speaks the one-model protocol fails the whole
    call and nothing is removed."""
    if not model_name.strip():
        usage_error("MODEL is empty: name the model to remove, e.g. digits")
    if "@" in model_name:
        name = model_name.partition("@")[0]
        usage_error(
            f"unassign takes a model name, not MODEL@VERSION (a device holds one version "
            f"of each model): edgefleet devices unassign {name} ID..."
        )
    response = env.stub.UnassignModel(
        operator_pb2.UnassignModelRequest(
            device_ids=_resolve_ids(env, device_ids), model_name=model_name, reason=reason
        )
    )
    emit(as_json, response, lambda: render.unassigned(model_name, response))


@devices.command("history")
@click.argument("device_id", metavar="ID")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@json_option
@pass_env
def devices_history(env: Connection, device_id: str, limit: int, as_json: bool) -> None:
    """A device's deployment history: every update state its agent reported."""

    response = call_by_id(
        device_id,
        lambda i: env.stub.ListDeployments(
            operator_pb2.ListDeploymentsRequest(device_id=i, limit=limit)
        ),
        lambda: _all_ids(env),
        "device",
    )
    emit(as_json, response, lambda: render.deployment_history(response, now()))
