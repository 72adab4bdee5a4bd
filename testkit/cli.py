"""Running the `edgefleet` CLI from a test: in this process through click's
runner (invoke), or as the console script against a real server (edgefleet,
edgefleet_json); and reading what it printed (text_of) at a fixed time (NOW,
ts)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console, RenderableType

from edgefleet.controlplane.cli import cli
from testkit.harness import ControlPlane, env_without_proxy

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def ts(when: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(when)
    return out


def text_of(renderable: RenderableType) -> str:
    """What rich prints of `renderable`, 200 columns wide, as plain text."""
    with open("/dev/null", "w") as sink:
        console = Console(width=200, record=True, file=sink)
        console.print(renderable)
    return console.export_text()


def invoke(*args: str, server: str = "127.0.0.1:1") -> Result:
    """The CLI in this process: `edgefleet --server SERVER --token tok ARGS`."""
    return CliRunner(env={"COLUMNS": "200"}).invoke(
        cli, ["--server", server, "--token", "tok", *args]
    )


def edgefleet(
    cp: ControlPlane, *args: str, token: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the console script; server and token come from the environment."""
    env = env_without_proxy()
    env.update(EDGEFLEET_SERVER=cp.address, EDGEFLEET_TOKEN=token or cp.admin_token, COLUMNS="200")
    result = subprocess.run([EDGEFLEET, *args], capture_output=True, text=True, env=env, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    if check:
        assert result.returncode == 0, f"{args}: {result.stderr}"
    return result


def edgefleet_json(cp: ControlPlane, *args: str) -> Any:
    return json.loads(edgefleet(cp, *args, "--json").stdout)
