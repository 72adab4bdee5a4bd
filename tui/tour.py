"""A headless walk through every screen, for the demo and CI: the app runs
without a terminal, a pilot visits each screen (and a device's and a
rollout's detail), and what each showed is returned as text lines."""

from __future__ import annotations

import asyncio

from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from edgefleet.tui.app import EdgeFleetApp, make_app
from edgefleet.tui.client import FleetApi
from edgefleet.tui.screens.base import NAV

# Seconds a screen may take to show its data before the tour moves on.
SCREEN_TIMEOUT_S = 20.0
SIZE = (120, 36)


async def _settled(pilot: Pilot[object]) -> None:
    """Until no worker but the watch stream is running."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SCREEN_TIMEOUT_S
    while loop.time() < deadline:
        await pilot.pause(0.05)
        busy = [w for w in pilot.app.workers if w.group != "watch" and w.is_running]
        if not busy:
            break
    await pilot.pause(0.1)


def describe(app: EdgeFleetApp) -> list[str]:
    """What the current screen shows: its title line and each table's rows."""
    screen = app.screen
    name = type(screen).__name__.removesuffix("Screen")
    lines = [f"[{name}]"]
    for title in screen.query("#title, #reason, #choice, #legend"):
        if isinstance(title, Static):
            lines.extend(f"  {line}" for line in str(title.render()).splitlines())
    for table in screen.query(DataTable):
        headers = " | ".join(str(c.label) for c in table.ordered_columns)
        lines.append(f"  {table.id}: {table.row_count} rows ({headers})")
        for i in range(min(table.row_count, 8)):
            cells = [str(c) for c in table.get_row_at(i)]
            lines.append("    " + " | ".join(cells))
    return lines


def run_tour(client: FleetApi) -> list[str]:
    """Run the app headless over `client`, visit every screen, exit."""
    app = make_app(client)
    seen: list[str] = []

    async def pilot(p: Pilot[object]) -> None:
        await _settled(p)
        for key, _, _ in NAV:
            await p.press(key)
            await _settled(p)
            seen.extend(describe(app))
            table = next(iter(app.screen.query(DataTable)), None)
            # The first device's and the first rollout's detail views.
            if key in ("2", "5") and table is not None and table.row_count:
                table.focus()
                await p.press("enter")
                await _settled(p)
                seen.extend(describe(app))
                await p.press("escape")
                await _settled(p)
        app.exit()

    app.run(headless=True, size=SIZE, auto_pilot=pilot)
    return seen
