"""Import hygiene: the control plane and the agent run without textual, and
the TUI is a client: it never loads the control plane's database layer or
services (nor the server)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120)  # fmt: skip
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_control_plane_and_agent_import_without_textual() -> None:
    loaded = _modules_after(
        "import edgefleet.controlplane.server, edgefleet.controlplane.cli\n"
        "import edgefleet.controlplane.api.operator_servicer\n"
        "import edgefleet.agent.daemon, edgefleet.agent.main"
    )
    assert "edgefleet.controlplane.server" in loaded and "edgefleet.agent.daemon" in loaded
    assert not [
        m
        for m in loaded
        if m.split(".")[0] in ("textual", "textual_plotext") or m.startswith("edgefleet.tui")
    ]


def test_tui_never_imports_the_database_or_services() -> None:
    loaded = _modules_after(
        "import edgefleet.tui.app, edgefleet.tui.client, edgefleet.controlplane.cli.tui\n"
        "from edgefleet.tui.app import make_app\nfrom edgefleet.tui.client import FleetClient\n"
        "make_app(FleetClient('127.0.0.1:1', 'token'))"
    )
    assert "textual" in loaded
    forbidden = tuple(f"edgefleet.controlplane.{p}" for p in ("db", "services", "api", "server"))
    forbidden += ("sqlalchemy", "alembic")
    assert not [m for m in loaded if m.startswith(forbidden)]


def test_headless_client_does_not_import_textual() -> None:
    loaded = _modules_after(
        "import edgefleet.tui.client, edgefleet.tui.data, edgefleet.tui.summary"
    )
    assert "edgefleet.tui.client" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("textual", "textual_plotext")]
