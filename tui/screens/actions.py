"""Device actions shared by the devices table and the detail view: each
asks what it needs in a dialog, then calls the client in a worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

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
