"""Issue 23 item 2: the TUI knows its connection. Over the real FleetClient
and an in-process control plane: a refused token stops the TUI on one
screen and nothing else calls; the status line names the server, the
token's role and the state, and follows the server going away and back;
a server not up yet is retried until it answers."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from textual.widgets import Static

from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import ControlPlane, create_server
from edgefleet.tui.app import EdgeFleetApp, make_app
from edgefleet.tui.client import FleetClient
from edgefleet.tui.screens.audit import AuditScreen
from edgefleet.tui.screens.base import ConnectScreen
from edgefleet.tui.screens.overview import OverviewScreen
from edgefleet.tui.widgets import ConnectionBar
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import ADMIN
from testkit.tui_pilot import until

pytestmark = pytest.mark.timeout(90)
SIZE = (100, 30)


async def _start(data_dir: Path, port: int = 0) -> ControlPlane:
    return await create_server(
        ServerConfig(
            data_dir=data_dir, listen=f"127.0.0.1:{port}", admin_token=ADMIN_TOKEN,
            build_workers=0, heartbeat_interval_s=2,
        )
    )  # fmt: skip


class Plane:
    """A control plane that can be stopped and started again on its port
    and data directory, as an operator's server restarts."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.cp: ControlPlane | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> ControlPlane:
        self.cp = await _start(self.data_dir, self.port)
        self.port = self.cp.port
        return self.cp

    async def stop(self) -> None:
        if self.cp is not None:
            await self.cp.stop(grace=0.5)
            self.cp = None


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    p = Plane(tmp_path / "cp", 0)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


def _calls(cp: ControlPlane) -> float:
    """Every RPC the server has handled, whatever its method and status."""
    return sum(
        s.value
        for metric in cp.registry.collect()
        for s in metric.samples
        if s.name == "edgefleet_rpc_total"
    )


def _toasts(app: EdgeFleetApp) -> list[str]:
    """The title of every notification the app shows from now on (they
    expire from the screen; this list keeps them)."""
    titles: list[str] = []
    shown = app.notify

    def notify(message: str, *, title: str = "", **kw: Any) -> None:
        titles.append(title or message)
        shown(message, title=title, **kw)

    app.notify = notify  # type: ignore[method-assign]
    return titles


def _loading(app: EdgeFleetApp) -> list[Any]:
    return [w for w in app.workers if w.group != "watch" and w.is_running]


def _status(app: EdgeFleetApp) -> str:
    return str(app.screen.query_one(ConnectionBar).render())


def _message(app: EdgeFleetApp) -> str:
    return str(app.screen.query_one("#connect-message", Static).render())


async def _operator_token(address: str, role: o.OperatorRole.ValueType, name: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = og.OperatorServiceStub(channel)
        created = await stub.CreateOperatorToken(
            o.CreateOperatorTokenRequest(name=name, role=role), metadata=ADMIN
        )
        return str(created.secret)


async def test_a_refused_token_stops_on_one_screen_and_nothing_else_calls(plane: Plane) -> None:
    assert plane.cp is not None
    before = _calls(plane.cp)
    app = make_app(FleetClient(plane.address, "not-a-token"))
    toasts = _toasts(app)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, ConnectScreen)
        message = _message(app)
        assert (f"The control plane at {plane.address} refused the token: invalid operator "
                "token.") in " ".join(message.split())  # fmt: skip
        assert "Check --token / the context (edgefleet context ls)." in message
        assert "q to quit" in message
        assert app.connection.state == "refused"
        # One call told it all; the fleet keys do nothing, nothing retries.
        assert _calls(plane.cp) - before == 1
        await pilot.press("2", "5")
        await pilot.pause(1.5)
        assert isinstance(app.screen, ConnectScreen)
        assert _calls(plane.cp) - before == 1
        assert toasts == []
        assert not [w for w in app.workers if w.is_running]
        await pilot.press("q")
        await pilot.pause()
        assert app.return_code == 0


@pytest.mark.parametrize("role", ["admin", "viewer"])
async def test_the_status_line_names_server_role_and_connected(plane: Plane, role: str) -> None:
    token = ADMIN_TOKEN
    if role == "viewer":
        token = await _operator_token(plane.address, o.OPERATOR_ROLE_VIEWER, "dashboards")
    app = make_app(FleetClient(plane.address, token))
    toasts = _toasts(app)
    async with app.run_test(size=SIZE) as pilot:
        # The first answer is awaited at start: the overview is there.
        assert isinstance(app.screen, OverviewScreen)
        status = await until(pilot, lambda: app.events_seen and _status(app), "the watch")
        assert status == f"server {plane.address} · role {role} · connected"
        await pilot.press("7")  # every screen carries it
        await until(pilot, lambda: isinstance(app.screen, AuditScreen), "the audit screen")
        assert _status(app) == status
        assert toasts == []


async def test_a_token_revoked_mid_session_ends_on_the_refusal_screen(plane: Plane) -> None:
    token = await _operator_token(plane.address, o.OPERATOR_ROLE_OPERATOR, "night-shift")
    app = make_app(FleetClient(plane.address, token), watch=False)
    toasts = _toasts(app)
    async with app.run_test(size=SIZE) as pilot:
        assert "role operator · connected" in _status(app)
        async with grpc.aio.insecure_channel(plane.address) as channel:
            stub = og.OperatorServiceStub(channel)
            listed = await stub.ListOperatorTokens(o.ListOperatorTokensRequest(), metadata=ADMIN)
            (mine,) = [t.id for t in listed.tokens if t.name == "night-shift"]
            await stub.RevokeOperatorToken(o.RevokeOperatorTokenRequest(id=mine), metadata=ADMIN)
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ConnectScreen), "the refusal screen")
        assert "refused the token: operator token 'night-shift' was revoked" in " ".join(
            _message(app).split()
        )
        await pilot.pause(0.5)
        assert toasts == []  # the refusal is the screen, not an error toast


async def test_a_token_revoked_while_idle_ends_the_live_view(plane: Plane) -> None:
    """No key pressed: the watch stream checks its token again (every
    WATCH_REAUTH_S) and ends on the revocation, so the TUI does not show
    "connected" with live data over a token the server refuses (a stranger
    saw that for 25 s and more, until some event made a screen reload)."""
    token = await _operator_token(plane.address, o.OPERATOR_ROLE_VIEWER, "wall-screen")
    app = make_app(FleetClient(plane.address, token))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.events_seen, "the watch")
        async with grpc.aio.insecure_channel(plane.address) as channel:
            stub = og.OperatorServiceStub(channel)
            listed = await stub.ListOperatorTokens(o.ListOperatorTokensRequest(), metadata=ADMIN)
            (mine,) = [t.id for t in listed.tokens if t.name == "wall-screen"]
            await stub.RevokeOperatorToken(o.RevokeOperatorTokenRequest(id=mine), metadata=ADMIN)
        await until(pilot, lambda: isinstance(app.screen, ConnectScreen)
                    and "operator token 'wall-screen' was revoked" in _message(app),
                    "the refusal screen", within_s=15)  # fmt: skip


async def test_the_status_follows_the_server_stopping_and_coming_back(plane: Plane) -> None:
    app = make_app(FleetClient(plane.address, ADMIN_TOKEN))
    toasts = _toasts(app)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.events_seen, "the watch")
        assert _status(app).endswith("· connected")
        # The reload the first resync asks for, done before the server goes.
        await pilot.pause(0.5)
        await until(pilot, lambda: not _loading(app), "the overview loaded")
        await plane.stop()
        lost = await until(pilot, lambda: "reconnecting" in _status(app) and _status(app),
                           "reconnecting")  # fmt: skip
        assert lost.startswith(f"server {plane.address} · role admin · reconnecting since ")
        await until(pilot, lambda: app.connection.tries >= 2, "a second try")
        assert "(2 tries)" in _status(app) or app.connection.tries > 2
        since = app.connection.since
        await plane.start()
        await until(pilot, lambda: _status(app).endswith("· connected"), "connected again",
                    within_s=45)  # fmt: skip
        assert _status(app) == f"server {plane.address} · role admin · connected"
        # One toast each way, however many tries there were.
        assert toasts == ["Live updates lost", "Live updates back"]
        assert since is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_server_not_up_yet_is_retried_until_it_answers(tmp_path: Path) -> None:
    plane = Plane(tmp_path / "cp", _free_port())
    app = make_app(FleetClient(plane.address, ADMIN_TOKEN))
    toasts = _toasts(app)
    try:
        async with app.run_test(size=SIZE) as pilot:
            assert isinstance(app.screen, ConnectScreen)
            message = _message(app)
            assert message.startswith(f"Cannot reach {plane.address} (")
            assert "retrying..." in message
            assert "cannot connect, retrying since" in str(app.connection.line)
            await pilot.press("2")  # no fleet screen before the server answers
            assert isinstance(app.screen, ConnectScreen)
            await plane.start()
            await until(pilot, lambda: isinstance(app.screen, OverviewScreen), "the overview",
                        within_s=45)  # fmt: skip
            await until(pilot, lambda: _status(app).endswith("role admin · connected"),
                        "connected")  # fmt: skip
            assert toasts == []
    finally:
        await plane.stop()


async def test_nothing_at_an_address_never_given_says_where_it_came_from() -> None:
    """The CLI's advice (client/tls_probe.py) on the start screen too, once:
    the default address with no context in use, and what to do."""
    address = f"127.0.0.1:{_free_port()}"
    app = make_app(FleetClient(address, ADMIN_TOKEN, origin="the default address: no --server"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.connection.tries >= 1, "a failed try")
        message = _message(app)
        assert f"no control plane answers at {address} (the default address" in message
        assert "edgefleet context add NAME --server HOST:PORT" in message


def _notes(app: EdgeFleetApp) -> list[tuple[str, str]]:
    """(title, message) of every notification from now on."""
    seen: list[tuple[str, str]] = []
    shown = app.notify

    def notify(message: str, *, title: str = "", **kw: Any) -> None:
        seen.append((title, message))
        shown(message, title=title, **kw)

    app.notify = notify  # type: ignore[method-assign]
    return seen


def _one_readable_line(title: str, message: str, code: str) -> None:
    """An error as an operator reads it: titled with the status in words,
    one line of the server's message, nothing of gRPC's own repr."""
    assert title == code, (title, message)
    assert "\n" not in message and message.strip()
    for raw in ("AioRpcError", "debug_error_string", "StatusCode.", "<", "grpc_status"):
        assert raw not in message, message


async def test_each_server_error_is_one_readable_line(plane: Plane) -> None:
    """Issue 23 item 1 over the real client: INVALID_ARGUMENT (a label key
    longer than the server takes), PERMISSION_DENIED (a viewer accepting a
    device), UNAUTHENTICATED (the refusal screen: test_a_refused_token...)
    and UNAVAILABLE (the server stopped under an action)."""
    assert plane.cp is not None
    async with grpc.aio.insecure_channel(plane.address) as channel:
        op = og.OperatorServiceStub(channel)
        token = await op.CreateEnrollmentToken(
            o.CreateEnrollmentTokenRequest(name="t", policy=o.ENROLLMENT_POLICY_PENDING),
            metadata=ADMIN,
        )
        await dg.DeviceServiceStub(channel).Enroll(d.EnrollRequest(
            enrollment_token=token.secret, hardware_id="hw-1", name="pi-1",
            hardware=c.HardwareProfile(arch="aarch64"),
        ))  # fmt: skip
    viewer = await _operator_token(plane.address, o.OPERATOR_ROLE_VIEWER, "intern")

    # A viewer's accept.
    app = make_app(FleetClient(plane.address, viewer), watch=False)
    notes = _notes(app)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.connection.state == "connected", "connected")
        await pilot.press("2")
        await until(pilot, lambda: app.screen.query_one("#devices").row_count == 1, "the device")
        await pilot.press("a", "y")
        (title, message), *_ = await until(pilot, lambda: notes, "the refusal")
        _one_readable_line(title, message, "PERMISSION_DENIED")
        assert "viewer" in message

    # An admin's label key the server refuses, then an accept with the server
    # gone (the live watch notices it first, so the call fails at once
    # instead of waiting out a reconnect).
    app = make_app(FleetClient(plane.address, ADMIN_TOKEN))
    notes = _notes(app)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.connection.state == "connected", "connected")
        await pilot.press("2")
        await until(pilot, lambda: app.screen.query_one("#devices").row_count == 1, "the device")
        await pilot.press("l", *("k" * 300 + "=v"), "enter")
        (title, message), *_ = await until(pilot, lambda: notes, "the invalid label")
        _one_readable_line(title, message, "INVALID_ARGUMENT")
        notes.clear()
        await plane.stop()
        await until(pilot, lambda: app.connection.state == "reconnecting", "the watch lost")
        notes.clear()  # the watch's own "Live updates lost"
        await pilot.press("a", "y")
        (title, message), *_ = await until(pilot, lambda: notes, "the unreachable server")
        _one_readable_line(title, message, "UNAVAILABLE")
        assert message.startswith("control plane unreachable (")


async def test_a_tls_server_without_its_ca_says_to_pass_it_on_every_retry(
    tmp_path: Path,
) -> None:
    """The CLI's TLS advice on the start screen, kept over the retries (a
    stranger saw it replaced by gRPC's "Socket closed" at the second try)."""
    cp = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp", listen="127.0.0.1:0", device_listen="127.0.0.1:0",
            admin_token=ADMIN_TOKEN, build_workers=0, tls=True,
        )
    )  # fmt: skip
    try:
        app = make_app(FleetClient(cp.address, ADMIN_TOKEN))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.connection.tries >= 2, "two failed tries")
            message = " ".join(_message(app).split())
            assert (
                f"the control plane at {cp.address} serves TLS and this connection was plain"
                in (message)
            )
            assert "--ca-cert" in message
    finally:
        await cp.stop(grace=0.5)
