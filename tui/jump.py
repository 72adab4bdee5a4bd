"""The global jump: a command palette provider (ctrl+p, or `/` where a
screen does not filter with it) that finds any device, rollout, model or
class by name (fuzzy) or by id prefix, and opens it: a device's detail, a
rollout's monitor, the models or classes screen on its row.

The fleet is read once each time the palette opens (Provider.startup), not
on every key typed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, cast

from textual.command import Hit, Hits, Provider
from textual.screen import Screen
from textual.style import Style
from textual.widgets import DataTable

from edgefleet.tui.client import ClientError
from edgefleet.tui.data import Device, DeviceClass, Model, Rollout
from edgefleet.tui.screens.base import keep_cursor
from edgefleet.tui.summary import device_status

if TYPE_CHECKING:
    from edgefleet.tui.app import EdgeFleetApp

Kind = Literal["device", "rollout", "model", "class"]
# An id prefix shorter than this matches too many ids to mean one.
MIN_ID_PREFIX = 4
# Seconds the models or classes screen may take to list the row to select.
SELECT_WITHIN_S = 5.0
# The score of an id prefix or a whole name: above any fuzzy score (the
# matcher's scores are not bounded by 1, whatever Hit's docstring says).
EXACT = 1e6


@dataclass(frozen=True)
class JumpTarget:
    """One thing to jump to: `name` is matched fuzzily, `id` by prefix."""

    kind: Kind
    id: str
    name: str
    help: str

    @property
    def text(self) -> str:
        return f"{self.kind} {self.name}"


def jump_targets(
    devices: list[Device], rollouts: list[Rollout], models: list[Model], classes: list[DeviceClass]
) -> list[JumpTarget]:
    """Everything the jump can open, with a line of help that tells alike
    names apart (a device's short id and status, a rollout's id and state)."""
    targets: list[JumpTarget] = []
    for x in devices:
        where = x.class_name or "no class"
        targets.append(JumpTarget("device", x.id, x.name,
                                  f"{x.id[:8]} · {device_status(x)} · {where}"))  # fmt: skip
    for r in rollouts:
        targets.append(JumpTarget("rollout", r.id, r.ref, f"{r.id[:8]} · {r.state} · {r.cohort}"))
    for m in models:
        latest = f"latest {m.latest_version or '-'} · {m.version_count} version(s)"
        targets.append(JumpTarget("model", m.name, m.name, latest))
    for c in classes:
        about = " · ".join(filter(None, (f"{c.device_count} device(s)", c.description)))
        targets.append(JumpTarget("class", c.name, c.name, about))
    return targets


def id_match(target: JumpTarget, query: str) -> bool:
    """The query is the start of the target's id (an id as tables show it,
    8 characters, or any unique part of at least MIN_ID_PREFIX)."""
    text = query.strip().lower()
    return (
        target.kind in ("device", "rollout")
        and len(text) >= MIN_ID_PREFIX
        and target.id.lower().startswith(text)
    )


def score(target: JumpTarget, query: str, fuzzy: Callable[[str], float]) -> float:
    """EXACT for an id prefix or the whole name; else the fuzzy score of
    `kind name` (0: no hit). Ids are not matched fuzzily: a hex query would
    match most ids so."""
    if id_match(target, query) or query.strip().lower() == target.name.lower():
        return EXACT
    return fuzzy(target.text)


class JumpProvider(Provider):
    """Devices, rollouts, models and classes by name or id prefix."""

    def __init__(self, screen: Screen[Any], match_style: Style | None = None) -> None:
        super().__init__(screen, match_style)
        self._targets: list[JumpTarget] = []

    @property
    def fleet(self) -> EdgeFleetApp:
        from edgefleet.tui.app import EdgeFleetApp

        return cast(EdgeFleetApp, self.app)

    async def startup(self) -> None:
        app = self.fleet
        if app.connection.state in ("connecting", "refused"):
            return
        client = app.client
        try:
            devices, rollouts, models, classes = await asyncio.gather(
                client.list_devices(), client.list_rollouts(), client.list_models(),
                client.list_classes(),
            )  # fmt: skip
        except ClientError as err:
            app.notify(err.message, title=f"Jump: {err.title}", severity="error", markup=False)
            return
        self._targets = jump_targets(devices, rollouts, models, classes)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for target in self._targets:
            found = score(target, query, matcher.match)
            if found > 0:
                shown = target.text if id_match(target, query) else matcher.highlight(target.text)
                yield Hit(found, shown, partial(self.open, target), text=target.text,
                          help=target.help)  # fmt: skip

    def open(self, target: JumpTarget) -> None:
        app = self.fleet
        app.run_worker(self._open(target), group="jump", exclusive=True, exit_on_error=False)

    async def _open(self, target: JumpTarget) -> None:
        """On the screen of its kind (a device on the devices list, a rollout
        on the rollouts list), so Esc goes back to that list and 1-7 leave it."""
        from edgefleet.tui.screens.device_detail import DeviceDetailScreen
        from edgefleet.tui.screens.monitor import MonitorScreen

        app = self.fleet
        mode = {"device": "devices", "rollout": "rollouts", "model": "models"}.get(
            target.kind, "classes"
        )
        await app.action_show_mode(mode)
        if target.kind == "device":
            await app.push_screen(DeviceDetailScreen(target.id))
        elif target.kind == "rollout":
            await app.push_screen(MonitorScreen(target.id))
        else:
            await select_row(app, mode, target)


async def select_row(app: EdgeFleetApp, mode: str, target: JumpTarget) -> None:
    """Put the cursor of the mode's first table on the target's row once
    the screen has listed it (its rows load in a worker): a class's row is
    keyed by its name, a model's rows by `name@version`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SELECT_WITHIN_S
    while loop.time() < deadline:
        if app.current_mode != mode:
            return  # the operator went elsewhere
        table = next(iter(app.screen.query(DataTable)), None)
        if table is not None:
            key = next((str(k.value) for k in table.rows
                        if k.value == target.name
                        or str(k.value).startswith(f"{target.name}@")), None)  # fmt: skip
            if key is not None:
                keep_cursor(table, key)
                table.focus()
                return
        await asyncio.sleep(0.05)
