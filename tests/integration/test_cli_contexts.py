"""`edgefleet context` and the connection settings it feeds, driving the
real CLI (click's runner, in this process) against real control planes:
A in plain text and B with TLS, both with the same admin token, so only
the server and CA tell them apart (and a token sent to the wrong one would
be accepted, which lets a test see that it was not sent).

The control planes run on an event loop in a thread of their own and the
CLI in the test's main thread, as in a terminal: `simulate` installs its
signal handlers there. The contexts file is a temporary one
(EDGEFLEET_CONFIG), never the real home's."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import ControlPlane, create_server
from testkit.harness import ADMIN_TOKEN

# Nothing from the environment the tests do not set themselves.
CLEAN = {
    "EDGEFLEET_SERVER": None, "EDGEFLEET_TOKEN": None, "EDGEFLEET_CA_CERT": None,
    "EDGEFLEET_CONTEXT": None, "EDGEFLEET_ENROLLMENT_TOKEN": None, "XDG_CONFIG_HOME": None,
    "http_proxy": None, "https_proxy": None, "HTTP_PROXY": None, "HTTPS_PROXY": None,
    "grpc_proxy": None, "COLUMNS": "200",
}  # fmt: skip


@dataclass
class Planes:
    a: ControlPlane  # plain text
    b: ControlPlane  # TLS
    config: Path  # the contexts file
    token_file: Path  # holds ADMIN_TOKEN

    def cli(self, *args: str, **env: str) -> Result:
        runner = CliRunner(env={**CLEAN, "EDGEFLEET_CONFIG": str(self.config), **env})
        return runner.invoke(cli, list(args))

    def ok(self, *args: str, **env: str) -> str:
        result = self.cli(*args, **env)
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        return result.stdout

    def json(self, *args: str, **env: str) -> Any:
        return json.loads(self.ok(*args, "--json", **env))

    def error(self, *args: str, **env: str) -> str:
        result = self.cli(*args, **env)
        assert result.exit_code != 0, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            result.exception
        )
        return result.stderr

    def token_names(self, *args: str, **env: str) -> set[str]:
        return {t["name"] for t in self.json("tokens", "ls", *args, **env)}

    def add_both(self) -> None:
        """Contexts a (current) and b."""
        token = ["--token-file", str(self.token_file)]
        self.ok("context", "add", "a", "--server", self.a.address, *token, "--use")
        ca = ["--ca-cert", str(self.b.config.ca_file)]
        self.ok("context", "add", "b", "--server", self.b.address, *token, *ca)


@pytest.fixture
def planes(tmp_path: Path) -> Iterator[Planes]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="control-planes", daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    started: list[ControlPlane] = []
    try:
        for name, tls in (("a", False), ("b", True)):
            config = ServerConfig(
                data_dir=tmp_path / name, listen="127.0.0.1:0", tls=tls,
                admin_token=ADMIN_TOKEN, build_workers=0,
            )  # fmt: skip
            started.append(run(create_server(config)))
        token_file = tmp_path / "admin-token"
        token_file.write_text(ADMIN_TOKEN + "\n")
        # Tell the two apart by what they hold: an enrollment token on each.
        planes = Planes(*started, tmp_path / "cfg" / "edgefleet" / "contexts.json", token_file)
        for cp, name in ((planes.a, "on-a"), (planes.b, "on-b")):
            args = ["--server", cp.address, "--token", ADMIN_TOKEN]
            if cp.config.tls:
                args += ["--ca-cert", str(cp.config.ca_file)]
            planes.ok(*args, "tokens", "create", "--name", name)
        yield planes
    finally:
        for cp in started:
            run(cp.stop(grace=0.5))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# ------------------------------------------------------------------ the commands


def test_add_use_and_every_command_connects_with_the_current_context(planes: Planes) -> None:
    assert "no contexts in" in planes.ok("context", "ls")
    assert "UNAUTHENTICATED" in planes.error("tokens", "ls", "--server", planes.a.address)
    planes.add_both()
    assert planes.config.stat().st_mode & 0o777 == 0o600
    assert planes.config.parent.stat().st_mode & 0o777 == 0o700
    assert ADMIN_TOKEN in planes.config.read_text()
    assert planes.ok("context", "current") == "a\n"
    # No --server, --token, --ca-cert nor EDGEFLEET_*: the context's.
    assert planes.token_names() == {"on-a"}
    assert planes.ok("devices", "ls", "--json").strip() == "[]"
    planes.ok("context", "use", "b")
    assert planes.ok("context", "current") == "b\n"
    assert planes.token_names() == {"on-b"}  # over TLS, with b's CA


def test_context_ls_shows_the_settings_but_never_the_token(planes: Planes) -> None:
    planes.add_both()
    table = planes.ok("context", "ls")
    assert ADMIN_TOKEN not in table
    lines = [line.split() for line in table.splitlines()]
    assert lines[0] == ["CURRENT", "NAME", "SERVER", "TLS", "TOKEN"]
    assert lines[1] == ["*", "a", planes.a.address, "no", "set"]
    assert lines[2] == ["b", planes.b.address, "yes", "set"]
    listed = planes.json("context", "ls")
    assert ADMIN_TOKEN not in json.dumps(listed)
    assert listed == [
        {"name": "a", "current": True, "server": planes.a.address, "tls": False,
         "ca_cert": None, "token_set": True},
        {"name": "b", "current": False, "server": planes.b.address, "tls": True,
         "ca_cert": str(planes.b.config.ca_file.absolute()), "token_set": True},
    ]  # fmt: skip
    # --context marks the one commands would use.
    assert [c["current"] for c in planes.json("context", "ls", "--context", "b")] == [False, True]


def test_rm_and_the_errors_a_person_can_act_on(planes: Planes, tmp_path: Path) -> None:
    planes.add_both()
    message = planes.error("context", "use", "prod")
    assert f"error: no context named 'prod' in {planes.config}; known: a, b" in message
    assert "known: a, b" in planes.error("devices", "ls", "--context", "prod")
    assert "known: a, b" in planes.error("devices", "ls", EDGEFLEET_CONTEXT="prod")
    assert "exists already: pass --overwrite" in planes.error(
        "context", "add", "a", "--server", "x:1"
    )
    missing = tmp_path / "no-token"
    assert f"token file {missing} does not exist" in planes.error(
        "context", "add", "c", "--server", "x:1", "--token-file", str(missing)
    )
    assert "not a PEM certificate" in planes.error(
        "context", "add", "c", "--server", "x:1", "--ca-cert", str(planes.token_file)
    )
    assert "give --token-file or --token, not both" in planes.error(
        "context", "add", "c", "--server", "x:1", "--token", "t",
        "--token-file", str(planes.token_file),
    )  # fmt: skip
    assert "must not hold spaces" in planes.error("context", "add", "c d", "--server", "x:1")
    assert [c["name"] for c in planes.json("context", "ls")] == ["a", "b"]  # nothing added

    assert "no context is current now" in planes.ok("context", "rm", "a")
    assert "no current context: edgefleet context use NAME" in planes.error("context", "current")
    assert [c["name"] for c in planes.json("context", "ls")] == ["b"]


def test_a_corrupt_or_open_file_is_reported_in_one_line(planes: Planes) -> None:
    planes.add_both()
    planes.config.chmod(0o644)
    assert f"(mode 0644): run chmod 600 {planes.config}" in planes.error("tokens", "ls")
    planes.config.chmod(0o600)
    planes.config.write_text("{half")
    message = planes.error("tokens", "ls")
    assert message.startswith(f"error: {planes.config} is not a valid contexts file (not JSON")
    assert len(message.strip().splitlines()) == 1
    assert "move it away and add the contexts again" in planes.error("context", "ls")


# ------------------------------------------------------------------ resolution order


def test_context_option_and_environment_choose_another(planes: Planes) -> None:
    planes.add_both()
    assert planes.token_names() == {"on-a"}
    assert planes.token_names("--context", "b") == {"on-b"}
    assert planes.token_names(EDGEFLEET_CONTEXT="b") == {"on-b"}
    # The option over the variable.
    assert planes.token_names("--context", "a", EDGEFLEET_CONTEXT="b") == {"on-a"}
    assert "wins over it" in planes.cli("context", "use", "a", EDGEFLEET_CONTEXT="b").stderr


def test_explicit_settings_win_over_the_context(planes: Planes) -> None:
    planes.add_both()
    # An explicit token over the context's.
    assert "UNAUTHENTICATED" in planes.error("tokens", "ls", "--token", "wrong")
    assert "UNAUTHENTICATED" in planes.error("tokens", "ls", EDGEFLEET_TOKEN="wrong")
    planes.ok("context", "use", "b")
    # The current context's own server named: its token and CA still apply.
    assert planes.token_names("--server", planes.b.address) == {"on-b"}
    # Another server: the context (TLS to B) is left out whole, its token too,
    # although A would take it.
    assert "UNAUTHENTICATED" in planes.error("tokens", "ls", "--server", planes.a.address)
    assert "UNAUTHENTICATED" in planes.error("tokens", "ls", EDGEFLEET_SERVER=planes.a.address)
    assert planes.token_names("--server", planes.a.address, "--token", ADMIN_TOKEN) == {"on-a"}
    # --context with --server: the context's token goes where it is told.
    assert planes.token_names("--context", "a", "--server", planes.a.address) == {"on-a"}


def test_every_setting_given_needs_no_contexts_file(planes: Planes) -> None:
    planes.config.parent.mkdir(parents=True)
    planes.config.write_text("{half")
    planes.config.chmod(0o600)
    given = ["--server", planes.b.address, "--token", ADMIN_TOKEN,
             "--ca-cert", str(planes.b.config.ca_file)]  # fmt: skip
    assert planes.token_names(*given) == {"on-b"}
    assert "not a valid contexts file" in planes.error("tokens", "ls", *given[:4])
    # Commands that make no call never read it.
    assert "Usage:" in planes.ok("devices", "ls", "--help")
    assert "Usage:" in planes.ok("--help")


# ------------------------------------------------------------------ global options


def test_global_options_work_after_the_subcommand(planes: Planes) -> None:
    planes.add_both()
    assert planes.token_names("--server", planes.b.address, "--token", ADMIN_TOKEN,
                              "--ca-cert", str(planes.b.config.ca_file)) == {"on-b"}  # fmt: skip
    # The --opt=value form; the last one given wins, as before the subcommand.
    assert "UNAUTHENTICATED" in planes.error(
        "--token", ADMIN_TOKEN, "tokens", "ls", f"--server={planes.a.address}", "--token=wrong"
    )
    assert planes.token_names(f"--server={planes.a.address}", f"--token={ADMIN_TOKEN}") == {"on-a"}
    assert {r["name"] for r in planes.json("tokens", "--context", "b", "ls")} == {"on-b"}
    assert planes.json("rollouts", "ls", "--context", "b") == []
    # After `--` nothing moves: a device id, looked up on the server (exit 1).
    after = planes.cli("devices", "show", "--", "--server")
    assert after.exit_code == 1 and "No such option" not in after.stderr
    missing = planes.cli("devices", "ls", "--context")
    assert missing.exit_code == 2
    assert "Option '--context' requires an argument" in missing.stderr


# ------------------------------------------------------------------ tui and simulate


def test_tui_connects_with_the_context_and_options_after_it(
    planes: Planes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app is not run (that needs a terminal): its client is kept and
    makes a real call, as the app's first screen does. B answers only over
    TLS, A only with the token."""
    import edgefleet.tui.app as tui_app
    from edgefleet.tui.client import FleetClient, ServerError
    from edgefleet.tui.data import ConnectionStatus

    clients: list[FleetClient] = []

    class NotRun:
        connection = ConnectionStatus()

        def run(self) -> None:
            pass

    def make_app(client: FleetClient, **_: Any) -> NotRun:
        clients.append(client)
        return NotRun()

    async def devices(client: FleetClient) -> list[Any]:
        try:
            return list(await client.list_devices())
        finally:
            await client.close()

    monkeypatch.setattr(tui_app, "make_app", make_app)
    planes.add_both()
    planes.ok("tui")
    planes.ok("tui", "--context", "b")
    planes.ok("tui", "--server", planes.a.address, "--token", "wrong")
    a, b, wrong = clients
    assert (a.target, b.target, wrong.target) == (planes.a.address, planes.b.address,
                                                  planes.a.address)  # fmt: skip
    assert asyncio.run(devices(a)) == []
    assert asyncio.run(devices(b)) == []
    with pytest.raises(ServerError) as refused:
        asyncio.run(devices(wrong))
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED

    # The app ended on the refusal screen: the shell sees it too.
    NotRun.connection = ConnectionStatus().refused("UNAUTHENTICATED: invalid token")
    result = planes.cli("tui", "--server", planes.a.address, "--token", "wrong")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: the control plane refused the token: UNAUTHENTICATED: invalid token\n"
    )


def test_simulate_reaches_the_contexts_server_and_its_token_stays_the_enrollment_token(
    planes: Planes,
) -> None:
    planes.add_both()
    secret = planes.json("tokens", "create", "--name", "sim")["secret"]
    assert secret != ADMIN_TOKEN
    # The operator token (global --token, the context's) is not an enrollment token.
    message = planes.error("--token", secret, "simulate", "-n", "1", "--duration", "1")
    assert "--token (an enrollment token) is required" in message
    # simulate's own --token is the enrollment token; the server comes from
    # the context (plain-text A), a global option after it moves to the root.
    summary = planes.json("simulate", "-n", "1", "--token", secret, "--prefix", "ctx",
                          "--duration", "3", "--refresh", "0.5", "--context", "a")  # fmt: skip
    assert summary["agents"] == 1 and summary["enrolled"] == 1, summary
    devices = planes.json("devices", "ls")
    assert [d["name"] for d in devices] == ["ctx-00000"]
