"""The import contract between the parts: each ships to a different machine
with different extras (pyproject.toml), so each must load only what it needs.

- the TUI is a client: no click (the CLI), no server, database or build code;
- the agent runs on devices: no control-plane, TUI or simulator code;
- the server and the CLI run without textual;
- the client library (controlplane.client) is what the CLI and the TUI
  share: no click, rich or textual, no server code, no simulator;
- importing the CLI loads no database, server or inference runtime (every
  command's start-up pays for it).

Checked in a fresh interpreter by what is in sys.modules, so the order
tests run in cannot hide an import."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Server code: a client that loads it pulls in the database stack.
SERVER_SIDE = tuple(
    f"edgefleet.controlplane.{part}" for part in ("db", "services", "api", "server")
)
# The build pipeline (onnx, converters): the server's, and the CLI's
# `toolchain` command's.
BUILD = "edgefleet.controlplane.build"
TEXTUAL = ("textual", "textual_plotext")
DATABASE = ("sqlalchemy", "alembic")


def _modules_after(code: str) -> list[str]:
    """Every module loaded once `code` has run in a new interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=False, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def _offending(loaded: Iterable[str], forbidden: Iterable[str]) -> list[str]:
    """The loaded modules that are, or are inside, a forbidden package
    (`edgefleet.controlplane.cli` forbids `...cli.base`, not `...client`)."""
    packages = tuple(forbidden)
    return [m for m in loaded if any(m == p or m.startswith(f"{p}.") for p in packages)]


def test_tui_loads_no_cli_or_server_code() -> None:
    loaded = _modules_after(
        "import edgefleet.tui.app\n"
        "from edgefleet.tui.app import make_app\nfrom edgefleet.tui.client import FleetClient\n"
        "make_app(FleetClient('127.0.0.1:1', 'token'))"
    )
    assert "textual" in loaded and "edgefleet.controlplane.client.connection" in loaded
    forbidden = ("click", "edgefleet.controlplane.cli", *SERVER_SIDE, BUILD, *DATABASE)
    bad = _offending(loaded, forbidden)
    assert not bad, f"the TUI loads {bad}"


def test_tui_command_loads_no_server_code() -> None:
    # `edgefleet tui`: the CLI, then the app it opens.
    loaded = _modules_after(
        "import edgefleet.controlplane.cli.tui\n"
        "from edgefleet.tui.app import make_app\nfrom edgefleet.tui.client import FleetClient\n"
        "make_app(FleetClient('127.0.0.1:1', 'token'))"
    )
    assert "textual" in loaded and "click" in loaded
    bad = _offending(loaded, (*SERVER_SIDE, *DATABASE))
    assert not bad, f"`edgefleet tui` loads {bad}"


def test_tui_headless_modules_load_no_textual() -> None:
    loaded = _modules_after(
        "import edgefleet.tui.client, edgefleet.tui.data, edgefleet.tui.summary"
    )
    assert "edgefleet.tui.client" in loaded
    bad = _offending(loaded, TEXTUAL)
    assert not bad, f"the TUI's headless client loads {bad}"


def test_agent_loads_no_control_plane_tui_or_simulator() -> None:
    # The agent ships to devices alone, with the base dependencies only.
    loaded = _modules_after("import edgefleet.agent.main, edgefleet.agent.daemon")
    assert "edgefleet.agent.daemon" in loaded
    forbidden = ("edgefleet.controlplane", "edgefleet.tui", "edgefleet.sim", "click",
                 *TEXTUAL, *DATABASE)  # fmt: skip
    bad = _offending(loaded, forbidden)
    assert not bad, f"the agent loads {bad}"


def test_server_and_cli_load_no_textual() -> None:
    loaded = _modules_after(
        "import edgefleet.controlplane.server, edgefleet.controlplane.cli\n"
        "import edgefleet.controlplane.api.operator_servicer"
    )
    assert "edgefleet.controlplane.server" in loaded and "edgefleet.controlplane.cli" in loaded
    bad = _offending(loaded, (*TEXTUAL, "edgefleet.tui"))
    assert not bad, f"the server or the CLI loads {bad}"


def test_client_library_loads_no_ui_server_or_simulator() -> None:
    # Every module of the package, found on disk, so a new one is held too.
    loaded = _modules_after(
        "import importlib, pkgutil\nimport edgefleet.controlplane.client as package\n"
        "for module in pkgutil.iter_modules(package.__path__, package.__name__ + '.'):\n"
        "    importlib.import_module(module.name)"
    )
    assert "edgefleet.controlplane.client.connection" in loaded
    assert "edgefleet.controlplane.client.stages" in loaded
    forbidden = ("click", "rich", *TEXTUAL, *DATABASE, "edgefleet.controlplane.cli",
                 *SERVER_SIDE, BUILD, "edgefleet.sim", "edgefleet.tui")  # fmt: skip
    bad = _offending(loaded, forbidden)
    assert not bad, f"the client library loads {bad}"


def test_cli_import_stays_light() -> None:
    loaded = _modules_after("import edgefleet.controlplane.cli")
    assert "click" in loaded
    bad = _offending(loaded, (*DATABASE, *SERVER_SIDE, "onnxruntime", *TEXTUAL))
    assert not bad, f"importing the CLI loads {bad}"
