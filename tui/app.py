"""The operators' terminal UI: an App over a FleetApi. `make_app` builds it
(tests give it a real client on a test control plane, or a fake for
snapshots); `edgefleet tui` runs it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import var
from textual.screen import Screen
from textual.signal import Signal

from edgefleet.tui.client import REFUSED, ClientError, FleetApi, KnowsRole, ServerError
from edgefleet.tui.data import ConnectionStatus, FleetEvent
from edgefleet.tui.jump import JumpProvider
from edgefleet.tui.screens.audit import AuditScreen
from edgefleet.tui.screens.base import NAV, ConnectScreen
from edgefleet.tui.screens.classes import ClassesScreen
from edgefleet.tui.screens.devices import DevicesScreen
from edgefleet.tui.screens.help import HelpScreen
from edgefleet.tui.screens.models import ModelsScreen
from edgefleet.tui.screens.overview import OverviewScreen
from edgefleet.tui.screens.rollouts import RolloutsScreen
from edgefleet.tui.screens.telemetry import TelemetryScreen

Clock = Callable[[], datetime]
# Reconnect backoff of the watch stream (seconds): first, and most.
WATCH_RETRY_S = (0.5, 30.0)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class EdgeFleetApp(App[None]):
    """Screens are modes (1-7); detail views are pushed on top of them. The
    `connect` mode shows until the control plane first answers, and again
    if it refuses the token."""

    CSS_PATH = "app.tcss"
    COMMANDS = App.COMMANDS | {JumpProvider}
    TITLE = "EdgeFleet"
    MODES = {
        "connect": ConnectScreen,
        "overview": OverviewScreen,
        "devices": DevicesScreen,
        "classes": ClassesScreen,
        "models": ModelsScreen,
        "rollouts": RolloutsScreen,
        "telemetry": TelemetryScreen,
        "audit": AuditScreen,
    }
    BINDINGS = [
        *(Binding(key, f"show_mode('{mode}')", title, show=False) for key, mode, title in NAV),
        Binding("question_mark", "help", "Help"),
        # The palette, where the jump (tui.jump) lives; screens that filter
        # with `/` keep it (theirs wins), ctrl+p opens it everywhere. Not
        # bound to `command_palette` itself: Textual then drops its ctrl+p.
        Binding("slash", "jump", "Jump", show=False),
        Binding("q", "quit", "Quit"),
    ]

    connection: var[ConnectionStatus] = var(ConnectionStatus)

    def __init__(self, client: FleetApi, *, clock: Clock = _utc_now, watch: bool = True) -> None:
        super().__init__()
        self.client = client
        self._clock = clock
        self._watch = watch
        self.fleet_events: Signal[FleetEvent] = Signal(self, "fleet-events")
        # What the watch stream delivered, for tests and the headless demo.
        self.events_seen = 0
        # What to do about the start's failure to connect (TLS, an address
        # never given), found at its first try; None when nothing to add.
        self._advice: str | None = None
        self.set_reactive(EdgeFleetApp.connection, ConnectionStatus(client.target))

    def now(self) -> datetime:
        return self._clock()

    async def on_mount(self) -> None:
        self.sub_title = self.client.target
        # Awaited, not in a worker: keys pressed meanwhile wait in the queue
        # and reach the screen the answer leads to, and no fleet screen loads
        # data over a token the server refuses.
        if await self._check() or self.connection.state == "refused":
            return
        self.switch_mode("connect")
        self.retry_connect()

    async def _check(self) -> bool:
        """One try at the control plane (the token's role); True once
        connected. A client that cannot check (a fake) counts as connected."""
        try:
            role = await self.client.whoami() if isinstance(self.client, KnowsRole) else ""
        except ServerError as err:
            if err.code in REFUSED:
                self.refuse(err)
                return False
            if not self.connection.tries and isinstance(self.client, KnowsRole):
                # Asked once, at the first failure, and kept over the retries:
                # a TLS mismatch or an address the operator never gave will
                # not mend by retrying, and later tries fail the same way.
                self._advice = await self.client.advice(err)
            reason = self._advice or err.details
            self.connection = self.connection.failed(reason, self.now())
            return False
        self.connection = self.connection.connected(role)
        self.switch_mode("overview")
        if self._watch:
            self.watch_fleet()
        return True

    @work(exclusive=True, group="connect", exit_on_error=False)
    async def retry_connect(self) -> None:
        """Until the control plane first answers (or refuses the token)."""
        delay = WATCH_RETRY_S[0]
        while self.connection.state == "connecting":
            await asyncio.sleep(delay)
            delay = min(delay * 2, WATCH_RETRY_S[1])
            await self._check()

    def refuse(self, err: ServerError) -> None:
        """The token will not do: say so on one screen and stop every call."""
        if self.connection.state == "refused":
            return
        self.connection = self.connection.refused(err.details)
        self.workers.cancel_group(self, "watch")
        self.switch_mode("connect")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # No fleet screen before the server has taken the token.
        return action != "show_mode" or self.connection.state not in ("connecting", "refused")

    async def on_unmount(self) -> None:
        await self.client.close()

    @work(exclusive=True, group="watch", exit_on_error=False)
    async def watch_fleet(self) -> None:
        """Publish every fleet event to the screens; reconnect with backoff
        when the stream breaks (each reconnect starts with a resync)."""
        delay = WATCH_RETRY_S[0]
        while True:
            reason = "the stream ended"
            try:
                async for event in self.client.watch():
                    delay = WATCH_RETRY_S[0]
                    if event.topic == "resync":
                        self._reconnected()
                    self.events_seen += 1
                    self.fleet_events.publish(event)
            except ServerError as err:
                if err.code in REFUSED:
                    self.refuse(err)
                    return
                reason = err.details
            except ClientError as err:
                reason = err.message
            lost = self.connection.state == "connected"
            self.connection = self.connection.failed(reason, self.now())
            if lost:  # once per outage: the status line counts the tries
                self.notify(f"{reason}; reconnecting", title="Live updates lost",
                            severity="warning", markup=False)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, WATCH_RETRY_S[1])

    def _reconnected(self) -> None:
        if self.connection.state == "reconnecting":
            self.notify(f"Connected to {self.client.target} again", title="Live updates back",
                        markup=False)  # fmt: skip
        self.connection = self.connection.connected()

    def action_jump(self) -> None:
        self.action_command_palette()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if self.connection.state in ("connecting", "refused"):
            return
        for key, mode, title in NAV:
            yield SystemCommand(f"Go to {title}", f"Show the {title.lower()} screen (key {key})",
                                lambda m=mode: self.run_action(f"show_mode('{m}')"))  # fmt: skip
        yield SystemCommand("New rollout", "Open the rollout wizard", self._new_rollout)
        yield SystemCommand("Push a model", "Upload a model version from files", self._push)
        yield SystemCommand("Help", "Every key, by screen", self.action_help)

    async def action_show_mode(self, mode: str) -> None:
        """The screen a key 1-7 names, as its list: a device view or monitor
        left open on top of it (a jump, an alert) is closed. Keeping them
        showed a stale device where the operator asked for the classes,
        and `5 Enter x` rejected that device instead of aborting a rollout."""
        self.switch_mode(mode)
        while len(self.screen_stack) > 1:
            await self.pop_screen()

    def _new_rollout(self) -> None:
        from edgefleet.tui.screens.wizard import WizardScreen

        self.switch_mode("rollouts")
        self.push_screen(WizardScreen())

    def _push(self) -> None:
        from edgefleet.tui.screens.push import PushScreen

        self.switch_mode("models")
        self.push_screen(PushScreen())


def make_app(client: FleetApi, *, clock: Clock = _utc_now, watch: bool = True) -> EdgeFleetApp:
    """The TUI over `client`; `clock` fixes "now" (snapshots), `watch=False`
    leaves the live stream off."""
    return EdgeFleetApp(client, clock=clock, watch=watch)
