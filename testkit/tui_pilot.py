"""Waiting on a Textual app under a pilot, for the TUI's tests against a
real control plane: what is on screen arrives from workers and the watch
stream, so a test waits for it (with a deadline) instead of sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from textual.pilot import Pilot


async def until(pilot: Pilot[None], condition: Callable[[], Any], what: str,
                within_s: float = 30) -> Any:  # fmt: skip
    """Let the app run until `condition()` is truthy (it reads the UI) and
    return its value; AssertionError naming `what` after `within_s`."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        try:
            value = condition()
        except Exception:  # a widget not mounted yet, a row not there yet
            value = None
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the TUI never showed {what}")
        await pilot.pause(0.05)
