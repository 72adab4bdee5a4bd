"""The build pipeline stands apart from the server: what a build worker
process loads (the pipeline and the worker entry point) holds none of the
server's services, database, API, assembly or CLI, nor SQLAlchemy. The
typed job and result are all that crosses between them (build.types;
tests/unit/test_build_types.py). Checked in a fresh interpreter, by what is
in sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_PARTS = tuple(
    f"edgefleet.controlplane.{part}" for part in ("services", "db", "api", "server", "cli")
)


def test_the_pipeline_and_worker_import_nothing_of_the_server() -> None:
    probe = (
        "import json, sys\n"
        "import edgefleet.controlplane.build.pipeline, edgefleet.controlplane.build.worker\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "edgefleet.controlplane.build.pipeline" in loaded
    assert "edgefleet.controlplane.build.worker" in loaded
    server = [
        m for m in loaded if m in SERVER_PARTS or m.startswith(tuple(f"{p}." for p in SERVER_PARTS))
    ]
    assert server == []
    assert [m for m in loaded if m.split(".")[0] == "sqlalchemy"] == []
