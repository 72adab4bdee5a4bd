"""`edgefleet devices`: the device inventory."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click

from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.base import (
    CliError,
    confirm,
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
from edgefleet.controlplane.client.bulk import (
    LIST_CALL_LIMIT,
    BulkResult,
    Selector,
    Target,
    apply_chunked,
    apply_each,
    merge_targets,
    parse_selector,
    rpc_failure,
    targets_of,
    unassign_notes,
)
from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.client.format import model_views
from edgefleet.controlplane.client.paging import list_devices
from edgefleet.controlplane.client.pin_checks import pin_warnings
from edgefleet.controlplane.client.syntax import (
    enum_choices,
    parse_label,
    parse_model_ref,
)
from edgefleet.v1 import common_pb2, operator_pb2


@click.group()
def devices() -> None:
    """The device inventory."""


def _resolve_ids(env: Connection, texts: Sequence[str]) -> list[str]:
    """Full device ids for names, ids or the short prefixes tables show, as
    the server resolves them (services/references.py): so a device given by
    name and also matched by a selector is acted on once."""
    return [env.stub.GetDevice(operator_pb2.GetDeviceRequest(id=t)).id for t in texts]


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
    device = env.stub.GetDevice(operator_pb2.GetDeviceRequest(id=device_id))
    if as_json:
        click.echo(json.dumps(device_json(device), indent=2))
    else:
        emit(False, device, lambda: render.device_detail(device, now()))


# ------------------------------------------------------------ bulk actions
#
# accept, reject, label, pin, unpin, assign and unassign act on one device as
# they always did, or on several: the ids given, and/or the devices that
# --selector and --state pick (controlplane.client.bulk). With more than one
# device they ask once, with the count, then say what became of each.


def selection_options(f: Any) -> Any:
    """--selector, --state and --yes for a command that may act on many devices."""
    f = click.option(
        "--yes", "-y", is_flag=True, help="Do not ask before acting on several devices."
    )(f)
    f = click.option(
        "--state",
        type=click.Choice(list(enum_choices(common_pb2.DeviceState)), case_sensitive=False),
        help="Act on every device in this state (with --selector: both must hold).",
    )(f)
    return click.option(
        "--selector",
        default="",
        metavar="KEY=VALUE,...",
        help="Act on every device matching: class=NAME, state=STATE, any other "
        "key=value a label (comma-separated, all must hold).",
    )(f)


@dataclass(frozen=True)
class Picking:
    """What a command was told to act on: ids as typed, and a selector
    (empty: none)."""

    ids: tuple[str, ...]
    selector: Selector

    @property
    def single(self) -> str | None:
        """The one id of a single-device call (today's behaviour), else None."""
        return self.ids[0] if len(self.ids) == 1 and self.selector.empty else None


def _picking(ids: Sequence[str], selector: str, state: str | None) -> Picking:
    try:
        picked = parse_selector(selector, state)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--selector'") from None
    if not ids and picked.empty:
        usage_error("give device IDs, --selector KEY=VALUE,... or --state STATE")
    return Picking(tuple(ids), picked)


def _targets(env: Connection, picking: Picking, *, resolve: bool = False) -> list[Target]:
    """The devices `picking` names, each once: the ids as given (or, with
    `resolve`, expanded from short prefixes as `ls` shows them), then those
    the selector matches."""
    ids = _resolve_ids(env, picking.ids) if resolve and picking.ids else picking.ids
    explicit = [Target(i, i) for i in ids]
    if picking.selector.empty:
        return merge_targets(explicit)
    matched = targets_of(list_devices(env.stub, picking.selector.request()))
    return merge_targets(explicit, matched)


def _failure(err: Exception) -> str | None:
    """A device's failure in a bulk run: the server's words, or a short id
    that named no single device."""
    if isinstance(err, CliError):
        return err.format_message()
    return rpc_failure(err)


def _report(result: BulkResult, verb: str, as_json: bool) -> None:
    """Per-device results (--json) or `accepted 98 of 100; 2 failed:` and a
    line per failure; exit status 1 if any failed."""
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
    else:
        click.echo(result.summary(verb))
        for line in result.failure_lines():
            click.echo(f"  {line}")
    if result.failed:
        click.get_current_context().exit(1)


def _nothing_matched(picking: Picking, as_json: bool) -> None:
    if as_json:
        click.echo("[]")
    else:
        click.echo(f"no device matches {picking.selector}: nothing to do", err=True)


def _each_device(
    env: Connection,
    picking: Picking,
    call: Callable[[str], object],
    *,
    question: str,
    verb: str,
    yes: bool,
    as_json: bool,
) -> None:
    """`call(device_id)` on every picked device after one confirmation
    (`question`, `{n}` the count) when there are several."""
    targets = _targets(env, picking)
    if not targets:
        _nothing_matched(picking, as_json)
        return
    if len(targets) > 1:
        confirm(question.format(n=len(targets)), yes)
    # A short id that is not found is expanded as for one device; the
    # listing it takes is read once for the whole run.
    result = apply_each(targets, call, failure=_failure)
    _report(result, verb, as_json)


@devices.command("accept")
@click.argument("device_ids", metavar="[ID]...", nargs=-1)
@selection_options
@json_option
@pass_env
def devices_accept(
    env: Connection,
    device_ids: Sequence[str],
    selector: str,
    state: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Accept pending devices so they can receive work: the IDs given and/or
    those --selector/--state pick (`--state pending` accepts every pending
    one)."""
    picking = _picking(device_ids, selector, state)
    if (one := picking.single) is not None:
        device = env.stub.AcceptDevice(operator_pb2.AcceptDeviceRequest(id=one))
        _device_done(as_json, "accepted", device)
        return
    _each_device(
        env,
        picking,
        lambda i: env.stub.AcceptDevice(operator_pb2.AcceptDeviceRequest(id=i)),
        question="Accept {n} devices?",
        verb="accepted",
        yes=yes,
        as_json=as_json,
    )


@devices.command("reject")
@click.argument("device_ids", metavar="[ID]...", nargs=-1)
@click.option("--reason", default="", help="Why, for the audit log.")
@selection_options
@json_option
@pass_env
def devices_reject(
    env: Connection,
    device_ids: Sequence[str],
    reason: str,
    selector: str,
    state: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Reject devices; their RPCs are denied from then on."""
    picking = _picking(device_ids, selector, state)

    def reject(i: str) -> common_pb2.Device:
        return env.stub.RejectDevice(operator_pb2.RejectDeviceRequest(id=i, reason=reason))

    if (one := picking.single) is not None:
        _device_done(as_json, "rejected", reject(one))
        return
    _each_device(
        env,
        picking,
        reject,
        question="Reject {n} devices? They are refused on every call and cannot enroll again.",
        verb="rejected",
        yes=yes,
        as_json=as_json,
    )


@devices.command("decommission")
@click.argument("device_id", metavar="ID")
@click.option("--reason", default="", help="Why, for the audit log.")
@json_option
@pass_env
def devices_decommission(env: Connection, device_id: str, reason: str, as_json: bool) -> None:
    """Retire a device: its credential and certificates stop working and its
    agent is refused; a reinstalled board with its hardware id may enroll
    afresh (what a device that lost its identity needs)."""
    device = env.stub.DecommissionDevice(
        operator_pb2.DecommissionDeviceRequest(id=device_id, reason=reason)
    )
    _device_done(as_json, "decommissioned", device)


@devices.command("label")
@click.argument("words", metavar="[ID]... [KEY=VALUE]...", nargs=-1)
@click.option("--remove", multiple=True, metavar="KEY", help="Label key to remove.")
@selection_options
@json_option
@pass_env
def devices_label(
    env: Connection,
    words: Sequence[str],
    remove: Sequence[str],
    selector: str,
    state: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Set labels (KEY=VALUE) on devices and remove others (--remove KEY).
    Words with `=` are labels, the others device IDs."""
    # A device id or name has no `=`: that is how the two lists part.
    ids = [w for w in words if "=" not in w]
    try:
        labels = dict(parse_label(w) for w in words if "=" in w)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'KEY=VALUE'") from None
    if not labels and not remove:
        usage_error("give KEY=VALUE labels to set or --remove KEY")
    picking = _picking(ids, selector, state)
    request = operator_pb2.UpdateDeviceLabelsRequest(set=labels, remove=remove)

    def relabel(i: str) -> common_pb2.Device:
        one_request = operator_pb2.UpdateDeviceLabelsRequest()
        one_request.CopyFrom(request)
        one_request.id = i
        return env.stub.UpdateDeviceLabels(one_request)

    if (one := picking.single) is not None:
        _device_done(as_json, "labelled", relabel(one))
        return
    _each_device(
        env, picking, relabel, question="Label {n} devices?", verb="labelled", yes=yes,
        as_json=as_json,
    )  # fmt: skip


@devices.command("pin")
@click.argument("words", metavar="[ID]... CLASS", nargs=-1, required=True)
@selection_options
@json_option
@pass_env
def devices_pin(
    env: Connection,
    words: Sequence[str],
    selector: str,
    state: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Pin devices to a class (the last word); match rules no longer move them."""
    *ids, class_name = words
    picking = _picking(ids, selector, state)

    def pin(i: str) -> common_pb2.Device:
        return env.stub.SetDeviceClass(
            operator_pb2.SetDeviceClassRequest(id=i, class_name=class_name)
        )

    if (one := picking.single) is not None:
        device = pin(one)
        _device_done(as_json, "pinned", device, f" to {class_name}")
        for warning in pin_warnings(env.stub, device, class_name):
            click.secho(f"warning: {warning}", fg="yellow", bold=True, err=True)
        return
    # A class that is not there fails every device alike: say it once,
    # before asking (the server resolves a name or an id prefix).
    env.stub.GetDeviceClass(operator_pb2.GetDeviceClassRequest(name=class_name))
    _each_device(
        env, picking, pin, question=f"Pin {{n}} devices to {class_name}?",
        verb=f"pinned to {class_name}:", yes=yes, as_json=as_json,
    )  # fmt: skip


@devices.command("unpin")
@click.argument("device_ids", metavar="[ID]...", nargs=-1)
@selection_options
@json_option
@pass_env
def devices_unpin(
    env: Connection,
    device_ids: Sequence[str],
    selector: str,
    state: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Unpin devices; match rules classify them again."""
    picking = _picking(device_ids, selector, state)

    def unpin(i: str) -> common_pb2.Device:
        return env.stub.SetDeviceClass(operator_pb2.SetDeviceClassRequest(id=i))

    if (one := picking.single) is not None:
        _device_done(as_json, "unpinned", unpin(one))
        return
    _each_device(
        env, picking, unpin, question="Unpin {n} devices?", verb="unpinned", yes=yes,
        as_json=as_json,
    )  # fmt: skip


def _in_lists(
    env: Connection,
    picking: Picking,
    call: Callable[[list[str]], Mapping[str, str] | None],
    *,
    question: str,
    verb: str,
    yes: bool,
    as_json: bool,
) -> None:
    """`call(device_ids)` for calls that take device lists, LIST_CALL_LIMIT
    devices a call, after one confirmation when a selector picked them."""
    targets = _targets(env, picking, resolve=True)
    if not targets:
        _nothing_matched(picking, as_json)
        return
    if len(targets) > 1:
        confirm(question.format(n=len(targets)), yes)
    _report(apply_chunked(targets, call, failure=_failure), verb, as_json)


def _listed_only(picking: Picking) -> bool:
    """Ids only, few enough for one call: the command as it always was (no
    question; the table or the server's refusal as it came)."""
    return picking.selector.empty and len(picking.ids) <= LIST_CALL_LIMIT


@devices.command("assign")
@click.argument("ref", metavar="MODEL@VERSION", callback=parsed(parse_model_ref))
@click.argument("device_ids", metavar="[ID]...", nargs=-1)
@click.option("--reason", default="", help="Why, for the audit log.")
@selection_options
@json_option
@pass_env
def devices_assign(
    env: Connection,
    ref: tuple[str, str],
    device_ids: Sequence[str],
    reason: str,
    selector: str,
    state: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Install MODEL@VERSION on devices now, each its class's artifact: the IDs
    given and/or those --selector/--state pick.

    Adds the model to each device, or replaces that model's version there;
    the devices' other models are untouched (remove one with `edgefleet
    devices unassign`). All or nothing: if one device cannot take it (no successful build for its
    class, not accepted), nothing is assigned and every such device is named.
    (Past 1,000 devices that holds for each call of 1,000.)
    Watch progress with `edgefleet devices ls` and `edgefleet devices history ID`."""
    picking = _picking(device_ids, selector, state)

    def assign(ids: list[str]) -> operator_pb2.AssignModelResponse:
        return env.stub.AssignModel(
            operator_pb2.AssignModelRequest(
                device_ids=ids, model_name=ref[0], model_version=ref[1], reason=reason
            )
        )

    if _listed_only(picking):
        response = assign(list(picking.ids))
        emit(
            as_json,
            list(response.assignments),
            lambda: render.assignments_table(response.assignments, now()),
        )
        return

    def assign_all(ids: list[str]) -> None:
        assign(ids)

    model_ref = f"{ref[0]}@{ref[1]}"
    _in_lists(
        env, picking, assign_all,
        question=f"Assign {model_ref} to {{n}} devices?", verb=f"assigned {model_ref} to",
        yes=yes, as_json=as_json,
    )  # fmt: skip


@devices.command("unassign")
@click.argument("model_name", metavar="MODEL")
@click.argument("device_ids", metavar="[ID]...", nargs=-1)
@click.option("--reason", default="", help="Why, for the audit log.")
@selection_options
@json_option
@pass_env
def devices_unassign(
    env: Connection,
    model_name: str,
    device_ids: Sequence[str],
    reason: str,
    selector: str,
    state: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Remove MODEL from devices (the IDs given and/or those --selector/--state
    pick); their other models keep serving.

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
    picking = _picking(device_ids, selector, state)

    def unassign(ids: list[str]) -> operator_pb2.UnassignModelResponse:
        return env.stub.UnassignModel(
            operator_pb2.UnassignModelRequest(device_ids=ids, model_name=model_name, reason=reason)
        )

    if _listed_only(picking):
        response = unassign(list(picking.ids))
        emit(as_json, response, lambda: render.unassigned(model_name, response))
        return
    _in_lists(
        env, picking, lambda ids: unassign_notes(unassign(ids)),
        question=f"Unassign {model_name} from {{n}} devices?",
        verb=f"unassigned {model_name} from", yes=yes, as_json=as_json,
    )  # fmt: skip


@devices.command("history")
@click.argument("device_id", metavar="ID")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@json_option
@pass_env
def devices_history(env: Connection, device_id: str, limit: int, as_json: bool) -> None:
    """A device's deployment history: every update state its agent reported."""

    response = env.stub.ListDeployments(
        operator_pb2.ListDeploymentsRequest(device_id=device_id, limit=limit)
    )
    emit(as_json, response, lambda: render.deployment_history(response, now()))
