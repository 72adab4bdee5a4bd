"""What every fleet screen shares: the client, reporting errors as
notifications, and reloading when the watch stream says its data changed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar, cast

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.dom import DOMNode
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from edgefleet.tui.client import ClientError, FleetApi, ServerError
from edgefleet.tui.data import RESYNC_TOPICS, ConnectionStatus, FleetEvent
from edgefleet.tui.widgets import ConnectionBar

if TYPE_CHECKING:
    from edgefleet.tui.app import EdgeFleetApp

# Seconds a burst of watch events is gathered into one reload.
COALESCE_S = 0.15

NAV = (("1", "overview", "Overview"), ("2", "devices", "Devices"), ("3", "classes", "Classes"),
       ("4", "models", "Models"), ("5", "rollouts", "Rollouts"), ("6", "telemetry", "Telemetry"),
       ("7", "audit", "Audit"))  # fmt: skip


@contextmanager
def reporting(node: DOMNode, title: str = "") -> Iterator[None]:
    """Turn a failure inside the block into an error notification carrying
    the server's message (or the input problem); never a traceback."""
    try:
        yield
    except ClientError as err:
        if isinstance(err, ServerError) and err.token_refused:
            # Revoked or expired: one refusal screen rather than a toast per call.
            from edgefleet.tui.app import EdgeFleetApp

            cast(EdgeFleetApp, node.app).refuse(err)
            return
        node.app.notify(err.message, title=title or err.title, severity="error", markup=False)
    except Exception as err:  # a bug must not kill the operator's session
        node.app.notify(
            f"{type(err).__name__}: {err}", title="Unexpected error", severity="error", markup=False
        )


class NavBar(Static):
    """The screens and their keys, the current one highlighted."""

    def __init__(self, current: str) -> None:
        super().__init__(id="nav", markup=False)
        self._current = current

    def on_mount(self) -> None:
        from rich.text import Text

        text = Text()
        for key, mode, title in NAV:
            style = "bold reverse" if mode == self._current else ""
            text.append(f" {key} {title} ", style=style)
        self.update(text)


def keep_cursor(table: DataTable[object], key: str | None) -> None:
    """After a refill, put the cursor back on the row it was on (and redraw
    the cells at their new widths)."""
    # DataTable measures new rows when idle but keeps cells it rendered
    # before that at the old column widths (textual 8.2); a style update
    # drops those renders.
    table.call_after_refresh(table.notify_style_update)
    if key is None:
        return
    # The row may be gone: the cursor stays where the refill left it.
    with suppress(Exception):
        table.move_cursor(row=table.get_row_index(key))


def cursor_key(table: DataTable[object]) -> str | None:
    """The key of the row under the cursor; None for an empty table."""
    if table.row_count == 0:
        return None
    try:
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except Exception:
        return None
    return str(key) if key is not None else None


class ConnectScreen(Screen[None]):
    """Shown until the control plane first answers (retrying while it
    cannot be reached), and for good once it refuses the token: nothing
    else runs then; q quits."""

    def compose(self) -> ComposeResult:
        yield Static(id="connect-message", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "connection", self.show, init=True)

    def show(self, status: ConnectionStatus) -> None:
        message = self.query_one("#connect-message", Static)
        message.update(status.screen_text)
        message.set_class(status.state == "refused", "-refused")


class FleetScreen(Screen[None]):
    """A screen showing fleet data: loads on mount, and again (coalesced)
    when the watch stream reports a change in one of its TOPICS, or when it
    comes back into view after such a change."""

    TOPICS: ClassVar[frozenset[str]] = frozenset()
    NAV_MODE: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self._stale = False
        self._pending = False

    @property
    def fleet(self) -> EdgeFleetApp:
        from edgefleet.tui.app import EdgeFleetApp

        return cast(EdgeFleetApp, self.app)

    @property
    def client(self) -> FleetApi:
        return self.fleet.client

    def now(self) -> datetime:
        return self.fleet.now()

    def compose_nav(self) -> ComposeResult:
        if self.NAV_MODE:
            yield NavBar(self.NAV_MODE)

    def compose_footer(self) -> ComposeResult:
        with Vertical(classes="bottom"):
            yield ConnectionBar()
            yield Footer()

    def on_mount(self) -> None:
        self.fleet.fleet_events.subscribe(self, self.on_fleet_event)
        self.reload()

    def on_screen_resume(self) -> None:
        if self._stale:
            self._stale = False
            self.reload()

    def on_fleet_event(self, event: FleetEvent) -> None:
        if event.topic not in self.TOPICS and event.topic not in RESYNC_TOPICS:
            return
        self.handle_event(event)
        if self.is_current and self.patch(event):
            return
        if not self.is_current:
            self._stale = True
        elif not self._pending:
            self._pending = True
            self.set_timer(COALESCE_S, self._coalesced_reload)

    def handle_event(self, event: FleetEvent) -> None:
        """Use what the event itself carries, before the reload (optional)."""

    def patch(self, event: FleetEvent) -> bool:
        """Bring the shown data up to date with `event` without a reload,
        if the screen can (re-reading only what the event names); True when
        it will, so no reload follows. A 10,000-device list re-read for one
        device's change takes seconds."""
        return False

    def _coalesced_reload(self) -> None:
        self._pending = False
        self.reload()

    def reload(self) -> None:
        """Fetch this screen's data (in a worker) and show it."""

    def action_refresh(self) -> None:
        self.reload()
