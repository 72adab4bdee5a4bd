"""Import hygiene: the control plane and the agent run without textual, and
the TUI is a client: it never loads the control plane's database layer or
services (nor the server)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120)  # fmt: skip
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_control_plane_and_agent_import_without_textual() -> None:
    loaded = _modules_after(
        "import controlplane.server, controlplane.cli, controlplane.api.operator_servicer\n"
        "import agent.daemon, agent.main"
    )
    assert "controlplane.server" in loaded and "agent.daemon" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("textual", "textual_plotext", "tui")]


def test_tui_never_imports_the_database_or_services() -> None:
    loaded = _modules_after(
        "import tui.app, tui.client, controlplane.cli.tui\n"
        "from tui.app import make_app\nfrom tui.client import FleetClient\n"
        "make_app(FleetClient('127.0.0.1:1', 'token'))"
    )
    assert "textual" in loaded
    forbidden = ("controlplane.db", "controlplane.services", "controlplane.api",
                 "controlplane.server", "sqlalchemy", "alembic")  # fmt: skip
    assert not [m for m in loaded if m.startswith(forbidden)]


def test_headless_client_does_not_import_textual() -> None:
    loaded = _modules_after("import tui.client, tui.data, tui.summary")
    assert "tui.client" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("textual", "textual_plotext")]
