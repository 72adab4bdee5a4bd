"""`python -m edgefleet.demo.models` lists the demo models and builds them,
rather than importing and exiting without a word; the TUI's builds table
follows a running build's progress."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from textual.widgets import DataTable

from edgefleet.demo import models
from edgefleet.tui import data as d
from edgefleet.tui.app import make_app
from edgefleet.tui.screens import models as models_screen
from testkit.tui_fake import BUILDS, NOW, FakeFleet

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["edgefleet.demo.models", "demo.models"])
def test_module_run_lists_the_models(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()[:3]]
    assert names == ["digits", "cnn", "gru"]
    assert "build them: python -m edgefleet.demo.models OUT_DIR [NAME...]" in proc.stdout


def test_main_builds_the_named_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main([str(tmp_path), "digits"]) == 0
    out = capsys.readouterr().out.splitlines()
    model = tmp_path / "digits" / "model.onnx"
    onnx.checker.check_model(onnx.load(model))
    assert np.load(tmp_path / "digits" / "samples.npz")["input"].shape[1] == 64
    assert out[0].startswith(f"digits: {model} (held-out score 0.9")
    assert out[1].strip() == (
        f"edgefleet models push digits 1.0.0 {model} --sample-data "
        f"{tmp_path / 'digits' / 'samples.npz'} --labels {tmp_path / 'digits' / 'labels.txt'}"
    )
    assert not (tmp_path / "cnn").exists()  # only what was named


def test_main_refuses_an_unknown_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        models.main([str(tmp_path), "resnet"])
    assert exited.value.code == 2
    assert "no demo model named 'resnet'; known: digits, cnn, gru" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


class _Building(FakeFleet):
    """A fleet whose running build moves on each time it is read."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def list_builds(self, model_name: str = "", version: str = "") -> list[d.Build]:
        self.reads += 1
        # Small steps: a loaded machine may read many times before the
        # test looks, and 100% would stop it moving.
        progress = min(0.01 * self.reads, 1.0)
        return [
            replace(b, progress=progress) if b.state == "running" else b
            for b in await super().list_builds(model_name, version)
        ]


def _progress(table: DataTable[object], class_name: str) -> str:
    for row in range(table.row_count):
        cells = [str(c) for c in table.get_row_at(row)]
        if cells[0] == class_name:
            return cells[2]
    raise AssertionError(f"no build for {class_name}")


async def test_tui_build_progress_moves_while_a_build_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_screen, "BUILD_POLL_S", 0.1)
    assert any(b.state == "running" and b.class_name == "pi-class" for b in BUILDS)
    fleet = _Building()
    app = make_app(fleet, clock=lambda: NOW, watch=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("4")
        await pilot.pause(0.3)
        table = app.screen.query_one("#builds", DataTable)
        first = _progress(table, "pi-class")
        await pilot.pause(0.5)
        later = _progress(table, "pi-class")
        # No watch event came: only the poll re-read the builds.
        assert int(later.rstrip("%")) > int(first.rstrip("%")), (first, later)
        assert fleet.reads >= 3


async def test_tui_polls_no_builds_when_none_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_screen, "BUILD_POLL_S", 0.1)

    class Settled(FakeFleet):
        reads = 0

        async def list_builds(self, model_name: str = "", version: str = "") -> list[d.Build]:
            Settled.reads += 1
            return [b for b in await super().list_builds(model_name, version)
                    if b.state not in ("queued", "running")]  # fmt: skip

    app = make_app(Settled(), clock=lambda: NOW, watch=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("4")
        await pilot.pause(0.3)
        settled = Settled.reads
        await pilot.pause(0.5)
        assert Settled.reads == settled
