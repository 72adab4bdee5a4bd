"""Device actions shared by the devices table and the detail view: each
asks what it needs in a dialog, then calls the client in a worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from edgefleet.controlplane.client.bulk import (
    BulkResult,
    Target,
    apply_chunked_async,
    apply_each_async,
)
from edgefleet.tui.client import InputError, client_failure, parse_label_edit
from edgefleet.tui.data import Device
from edgefleet.tui.screens.base import FleetScreen, reporting
from edgefleet.tui.screens.modals import ChoiceScreen, ConfirmScreen, PromptScreen
from edgefleet.tui.summary import format_labels


def run(screen: FleetScreen, call: Callable[[], Awaitable[object]], done: str) -> None:
    """Call the client in a worker; notify `done` on success, the server's
    message on failure. The watch stream brings the change to every screen."""

    async def go() -> None:
        with reporting(screen):
            await call()
            screen.app.notify(done, markup=False)
            screen.reload()

    screen.run_worker(go(), group="action", exit_on_error=False)


def accept(screen: FleetScreen, device: Device) -> None:
    """Accept a pending device (the server says why not otherwise)."""
    run(screen, lambda: screen.client.accept_device(device.id), f"accepted {device.name}")


def reject(screen: FleetScreen, device: Device) -> None:
    def answered(yes: bool | None) -> None:
        if yes:
            run(screen, lambda: screen.client.reject_device(device.id, "rejected in the TUI"),
                f"rejected {device.name}")  # fmt: skip

    screen.app.push_screen(
        ConfirmScreen(f"Reject {device.name}? It is refused on every call and cannot enroll "
                      "again.", yes="Reject"), answered)  # fmt: skip


def edit_labels(screen: FleetScreen, device: Device) -> None:
    def answered(text: str | None) -> None:
        if text:
            run(screen, lambda: screen.client.edit_labels(device.id, text),
                f"labels of {device.name} changed")  # fmt: skip

    current = format_labels(device.labels.items())
    screen.app.push_screen(
        PromptScreen(f"Labels of {device.name} (now: {current or 'none'})",
                     placeholder="tier=canary, -old",
                     hint="key=value sets a label, -key removes one; comma-separated"),
        answered,
    )  # fmt: skip


def pin(screen: FleetScreen, device: Device) -> None:
    async def choose() -> None:
        with reporting(screen):
            classes = await screen.client.list_classes()
            options = [(c.name, c.name) for c in classes]
            options.append(("(unpin: classify by rules)", ""))

            def answered(name: str | None) -> None:
                if name is None:
                    return
                what = f"pinned {device.name} to {name}" if name else f"unpinned {device.name}"
                run(screen, lambda: screen.client.pin_device(device.id, name), what)

            screen.app.push_screen(ChoiceScreen(f"Pin {device.name} to a class", options),
                                   answered)  # fmt: skip

    screen.run_worker(choose(), group="action", exit_on_error=False)


def unassign(screen: FleetScreen, device: Device) -> None:
    """Pick one of the device's assigned models, confirm, remove it (its
    other models keep serving)."""
    assigned = [m for m in device.models if m.assigned_version]
    if not assigned:
        screen.app.notify(f"{device.name} has no model assigned", title="Nothing to unassign",
                          severity="warning", markup=False)  # fmt: skip
        return

    def confirm(name: str | None) -> None:
        if not name:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                run(screen, lambda: _unassign(screen, device, name),
                    f"unassigned {name} from {device.name}")  # fmt: skip

        others = [m.name for m in device.models if m.name != name and m.assigned_version]
        keeps = f" It keeps serving {', '.join(others)}." if others else ""
        question = (f"Unassign {name} from {device.name}? Its agent unloads the model once its "
                    f"in-flight requests are done.{keeps}")  # fmt: skip
        screen.app.push_screen(ConfirmScreen(question, yes="Unassign"), answered)

    if len(assigned) == 1:
        confirm(assigned[0].name)
        return
    options = [(f"{m.name}@{m.assigned_version}", m.name) for m in assigned]
    screen.app.push_screen(ChoiceScreen(f"Unassign a model from {device.name}", options), confirm)


async def _unassign(screen: FleetScreen, device: Device, name: str) -> None:
    if not await screen.client.unassign_model(device.id, name, "unassigned in the TUI"):
        screen.app.notify(f"{name} was not assigned to {device.name}", markup=False)


# ------------------------------------------------------------ many devices
#
# The same actions on the devices table's selection: what they need is asked
# once, then ONE confirmation naming the count; each device's call is made
# (16 at a time, controlplane.client.bulk) and one notification sums up:
# `accepted 98, 2 failed: pi-7: FAILED_PRECONDITION: ...`. `done` gets the
# result (the table keeps the failed devices selected).

Done = Callable[[BulkResult], None]


def _targets(devices: Sequence[Device]) -> list[Target]:
    return [Target(x.id, x.name) for x in devices]


def _count(devices: Sequence[Device]) -> str:
    return f"{len(devices)} devices" if len(devices) != 1 else devices[0].name


def run_bulk(
    screen: FleetScreen, call: Callable[[], Awaitable[BulkResult]], verb: str, done: Done
) -> None:
    """`call` in a worker, then its summary as one notification (a warning
    when some failed) and `done(result)`."""

    async def go() -> None:
        with reporting(screen):
            result = await call()
            screen.app.notify(result.short_summary(verb), title="Some failed" if result.failed
                              else "", severity="warning" if result.failed else "information",
                              markup=False)  # fmt: skip
            done(result)
            screen.reload()

    screen.run_worker(go(), group="action", exit_on_error=False)


def on_each(
    screen: FleetScreen,
    devices: Sequence[Device],
    call: Callable[[str], Awaitable[object]],
    *,
    question: str,
    yes: str,
    verb: str,
    done: Done,
) -> None:
    """Confirm `question`, then `call(device_id)` for every device."""
    targets = _targets(devices)

    def answered(ok: bool | None) -> None:
        if ok:
            run_bulk(screen, lambda: apply_each_async(targets, call, failure=client_failure),
                     verb, done)  # fmt: skip

    screen.app.push_screen(ConfirmScreen(question, yes=yes), answered)


def accept_many(screen: FleetScreen, devices: Sequence[Device], done: Done) -> None:
    """Accept the selected devices not accepted yet (pending, or rejected
    ones let back in); those accepted already are left as they are, so
    selecting a whole site and accepting takes its pending devices."""
    todo = [x for x in devices if x.state != "accepted"]
    already = len(devices) - len(todo)
    if not todo:
        what = f"all {len(devices)} selected" if len(devices) > 1 else devices[0].name
        screen.app.notify(f"{what}: accepted already, nothing to do", markup=False)
        return
    besides = f" ({already} selected accepted already: left as they are)" if already else ""
    on_each(screen, todo, screen.client.accept_device, question=f"Accept {_count(todo)}?{besides}",
            yes="Accept", verb="accepted", done=done)  # fmt: skip


def reject_many(screen: FleetScreen, devices: Sequence[Device], done: Done) -> None:
    on_each(screen, devices, lambda i: screen.client.reject_device(i, "rejected in the TUI"),
            question=f"Reject {_count(devices)}? They are refused on every call and cannot "
            "enroll again.", yes="Reject", verb="rejected", done=done)  # fmt: skip


def labels_many(screen: FleetScreen, devices: Sequence[Device], done: Done) -> None:
    def answered(text: str | None) -> None:
        if not text:
            return
        try:
            parse_label_edit(text)  # what was typed is checked once, not per device
        except InputError as err:
            screen.app.notify(err.message, title=err.title, severity="error", markup=False)
            return
        on_each(screen, devices, lambda i: screen.client.edit_labels(i, text),
                question=f"Change the labels of {_count(devices)} ({text})?", yes="Label",
                verb="labelled", done=done)  # fmt: skip

    screen.app.push_screen(
        PromptScreen(f"Labels of {_count(devices)}", placeholder="tier=canary, -old",
                     hint="key=value sets a label, -key removes one; comma-separated"),
        answered,
    )  # fmt: skip


def pin_many(screen: FleetScreen, devices: Sequence[Device], done: Done) -> None:
    async def choose() -> None:
        with reporting(screen):
            options = [(c.name, c.name) for c in await screen.client.list_classes()]
            options.append(("(unpin: classify by rules)", ""))

            def answered(name: str | None) -> None:
                if name is None:
                    return
                question = (f"Pin {_count(devices)} to {name}?" if name
                            else f"Unpin {_count(devices)}?")  # fmt: skip
                on_each(screen, devices, lambda i: screen.client.pin_device(i, name),
                        question=question, yes="Pin" if name else "Unpin",
                        verb=f"pinned to {name}:" if name else "unpinned", done=done)  # fmt: skip

            screen.app.push_screen(ChoiceScreen(f"Pin {_count(devices)} to a class", options),
                                   answered)  # fmt: skip

    screen.run_worker(choose(), group="action", exit_on_error=False)


def assign_many(screen: FleetScreen, devices: Sequence[Device], done: Done) -> None:
    """Pick a model version; confirm; AssignModel in calls of up to 1,000
    devices (each all or nothing, as the server has it)."""
    targets = _targets(devices)

    async def choose() -> None:
        with reporting(screen):
            versions = await screen.client.list_versions()
            options = [(f"{v.model_name}@{v.version}", f"{v.model_name}@{v.version}")
                       for v in versions]  # fmt: skip
            if not options:
                screen.app.notify("push a model first (4 Models, u)", title="No model to assign",
                                  severity="warning", markup=False)  # fmt: skip
                return

            def confirm(ref: str | None) -> None:
                if not ref:
                    return
                model, _, version = ref.partition("@")

                async def assign(ids: list[str]) -> None:
                    await screen.client.assign_models(ids, model, version, "assigned in the TUI")

                def answered(ok: bool | None) -> None:
                    if ok:
                        run_bulk(screen, lambda: apply_chunked_async(
                            targets, assign, failure=client_failure),
                            f"assigned {ref} to", done)  # fmt: skip

                question = (f"Assign {ref} to {_count(devices)}? Their other models stay; "
                            "each agent installs its class's build.")  # fmt: skip
                screen.app.push_screen(ConfirmScreen(question, yes="Assign"), answered)

            screen.app.push_screen(ChoiceScreen(f"Assign a model to {_count(devices)}", options),
                                   confirm)  # fmt: skip

    screen.run_worker(choose(), group="action", exit_on_error=False)


def unassign_many(screen: FleetScreen, devices: Sequence[Device], done: Done) -> None:
    """Pick one of the models the devices hold; confirm; UnassignModel in
    calls of up to 1,000 devices."""
    held = sorted({m.name for x in devices for m in x.models if m.assigned_version})
    if not held:
        screen.app.notify(f"{_count(devices)}: no model assigned", title="Nothing to unassign",
                          severity="warning", markup=False)  # fmt: skip
        return
    targets = _targets(devices)

    def confirm(name: str | None) -> None:
        if not name:
            return

        async def unassign(ids: list[str]) -> dict[str, str]:
            missing = await screen.client.unassign_models(ids, name, "unassigned in the TUI")
            return {i: "not assigned" for i in missing}

        def answered(ok: bool | None) -> None:
            if ok:
                run_bulk(screen, lambda: apply_chunked_async(
                    targets, unassign, failure=client_failure),
                    f"unassigned {name} from", done)  # fmt: skip

        question = (f"Unassign {name} from {_count(devices)}? Each agent unloads it once its "
                    "in-flight requests are done.")  # fmt: skip
        screen.app.push_screen(ConfirmScreen(question, yes="Unassign"), answered)

    screen.app.push_screen(
        ChoiceScreen(f"Unassign a model from {_count(devices)}", [(n, n) for n in held]), confirm
    )
