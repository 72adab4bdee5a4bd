"""Parts of EdgeFleet whose extra is missing say so in one line
(edgefleet.extras): the guarded packages raise MissingExtra, the `edgefleet`
command prints the line and exits 2, ONNX Runtime's and LiteRT's adapters
name their extras. A module is made missing the way Python itself knows it:
None in sys.modules, which find_spec reports as not found and `import`
refuses; the guarded package is evicted from sys.modules so its guard runs
again (monkeypatch puts everything back).

tests/e2e/test_wheel.py checks the same with real installs that lack them."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import signal
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from edgefleet import extras
from edgefleet.agent.runtimes import RuntimeUnavailable, open_runner
from edgefleet.extras import EXTRA_MODULES, MissingExtra, require

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OPTIONAL = PYPROJECT["project"]["optional-dependencies"]


def make_missing(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def evict(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Forget `package` and its submodules, so that importing it runs it again."""
    for name in list(sys.modules):
        if name == package or name.startswith(f"{package}."):
            monkeypatch.delitem(sys.modules, name)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def included_extras(extra: str) -> set[str]:
    """`extra` and every extra it pulls in through edgefleet[...]."""
    found = {extra}
    for line in OPTIONAL[extra]:
        requirement = Requirement(line)
        if _normal(requirement.name) == "edgefleet":
            for inner in requirement.extras:
                found |= included_extras(inner)
    return found


# ------------------------------------------------------------------ the line


def test_the_message_is_one_line_naming_the_extra_and_the_command() -> None:
    error = MissingExtra("edgefleet.tui", "tui", ("textual",))
    assert str(error) == (
        "edgefleet.tui needs the 'tui' extra (textual is not installed): "
        "pip install 'edgefleet[tui]'"
    )
    assert isinstance(error, ImportError) and error.name == "textual"
    many = MissingExtra("x", "server", ("a", "b", "c", "d", "e"))
    assert "(a, b, c and 2 more are not installed)" in str(many)
    assert "\n" not in str(many)


def test_require_passes_when_installed_and_names_only_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require("cli", "click", "rich", part="p")
    require("cli", part="p")  # no modules named: the whole extra
    make_missing(monkeypatch, "rich")
    with pytest.raises(MissingExtra) as missing:
        require("cli", part="the CLI")
    assert missing.value.missing == ("rich",)
    assert missing.value.extra == "cli"


# ------------------------------------------------------------------ guards


@pytest.mark.parametrize(
    ("package", "module", "extra"),
    [
        ("edgefleet.controlplane.db", "sqlalchemy", "server"),
        ("edgefleet.controlplane.services", "psycopg", "server"),
        ("edgefleet.controlplane.build", "onnx", "server"),
        ("edgefleet.controlplane.cli", "click", "cli"),
        ("edgefleet.tui", "textual", "tui"),
        ("edgefleet.controlplane.server", "grpc_health", "server"),
        ("edgefleet.controlplane.domain.onnx_inspect", "onnx", "server"),
        ("edgefleet.demo", "sqlalchemy", "server"),
        ("edgefleet.demo", "sklearn", "demo"),
    ],
)
def test_a_guarded_package_without_its_extra_raises_missing_extra(
    monkeypatch: pytest.MonkeyPatch, package: str, module: str, extra: str
) -> None:
    make_missing(monkeypatch, module)
    evict(monkeypatch, package)
    with pytest.raises(MissingExtra) as missing:
        importlib.import_module(package)
    assert str(missing.value) == (
        f"{package} needs the '{extra}' extra ({module} is not installed): "
        f"pip install 'edgefleet[{extra}]'"
    )


def guard_calls() -> list[tuple[Path, str, list[str]]]:
    """Every require(extra, *modules, ...) call in edgefleet's sources:
    (file, extra, modules)."""
    calls = []
    # The parts are links in proto/edgefleet (pyproject.toml): follow them.
    sources = [
        Path(folder, name)
        for folder, _, names in os.walk(ROOT / "proto" / "edgefleet", followlinks=True)
        for name in names
        if name.endswith(".py") and not name.endswith(("_pb2.py", "_pb2_grpc.py"))
    ]
    for path in sorted(sources):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "require"
            ):
                extra, *modules = (ast.literal_eval(arg) for arg in node.args)
                calls.append((path, extra, modules))
    return calls


def test_every_guard_names_an_extra_that_installs_what_it_checks() -> None:
    calls = guard_calls()
    # db, services, build, tui, and the server/db upgrade commands at least.
    assert len(calls) >= 6, calls
    for path, extra, modules in calls:
        provided = {m for e in included_extras(extra) for m in EXTRA_MODULES.get(e, ())}
        assert set(modules) <= provided, (path, extra, set(modules) - provided)


def test_extra_modules_matches_pyproject() -> None:
    """Each extra's own distributions (pyproject.toml) install exactly the
    modules EXTRA_MODULES lists for it (where installed here)."""
    assert set(EXTRA_MODULES) == set(OPTIONAL) - {"all", "dev"}
    distributions = importlib.metadata.packages_distributions()
    for extra, modules in EXTRA_MODULES.items():
        own = {
            _normal(Requirement(line).name)
            for line in OPTIONAL[extra]
            if _normal(Requirement(line).name) != "edgefleet"
        }
        for module in modules:
            shipped_by = {_normal(d) for d in distributions.get(module, [])}
            if not shipped_by:  # not installed here (tflite-runtime: no wheel for 3.11)
                continue
            assert shipped_by & own, (extra, module, shipped_by, own)
        installed = {_normal(d) for names in distributions.values() for d in names}
        for distribution in own & installed:
            assert any(
                distribution in {_normal(d) for d in distributions.get(m, [])} for m in modules
            ), (extra, distribution)


def test_the_cli_names_the_toolchains_as_the_build_package_does() -> None:
    """cli/toolchain.py repeats two names so that it loads the build package
    (the [server] extra) only when a toolchain command runs."""
    build = importlib.import_module("edgefleet.controlplane.build.toolchain")
    cli = importlib.import_module("edgefleet.controlplane.cli.toolchain")
    assert (cli.TFLITE, cli.TOOLCHAINS_ENV) == (build.TFLITE, build.TOOLCHAINS_ENV)


# ------------------------------------------------------------------ entry points


@pytest.mark.parametrize(
    ("argv", "module", "extra"),
    [
        (["server", "--insecure"], "grpc_health", "server"),
        (["db", "upgrade"], "alembic", "server"),
        (["tui"], "textual_plotext", "tui"),
        (["toolchain", "ls"], "onnxconverter_common", "server"),
    ],
)
def test_the_cli_prints_the_one_line_and_exits_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    argv: list[str],
    module: str,
    extra: str,
) -> None:
    from edgefleet.controlplane.cli import main

    make_missing(monkeypatch, module)
    # The part each command imports, so that its guard runs again.
    for package in ("edgefleet.controlplane.build", "edgefleet.tui"):
        evict(monkeypatch, package)
    monkeypatch.chdir(tmp_path)  # `server`/`db upgrade` would make a data dir here
    monkeypatch.setattr(sys, "argv", ["edgefleet", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert f"needs the '{extra}' extra ({module} is not installed)" in line, line
    assert line.endswith(f"pip install 'edgefleet[{extra}]'"), line
    assert list(tmp_path.iterdir()) == []


def test_the_agent_prints_the_one_line_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from edgefleet.agent import main as agent_main

    def serve_needing_the_tui(*args: object, **kwargs: object) -> None:
        require("tui", "textual", part="this agent")

    config = tmp_path / "agent.toml"
    config.write_text(f'server = "127.0.0.1:1"\nstate_dir = "{tmp_path / "state"}"\n')
    make_missing(monkeypatch, "textual")
    monkeypatch.setattr(agent_main, "serve", serve_needing_the_tui)
    # main() installs its own SIGTERM handler; this process keeps pytest's.
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert agent_main.main(["--config", str(config)]) == 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        "this agent needs the 'tui' extra (textual is not installed): pip install 'edgefleet[tui]'"
    )


# ------------------------------------------------------------------ runtimes


def test_an_onnx_model_without_onnxruntime_is_refused_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    make_missing(monkeypatch, "onnxruntime")
    evict(monkeypatch, "edgefleet.agent.runtimes.onnxruntime")
    with pytest.raises(RuntimeUnavailable) as refused:
        open_runner(tmp_path / "model.onnx", "onnxruntime")
    assert str(refused.value) == (
        "Serving ONNX models needs the 'onnxruntime' extra (onnxruntime is not installed): "
        "pip install 'edgefleet[onnxruntime]'"
    )


def test_a_tflite_model_without_an_interpreter_is_refused_naming_both_extras(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgefleet.agent.runtimes.litert import load_interpreter_class

    make_missing(monkeypatch, "ai_edge_litert", "tflite_runtime")
    with pytest.raises(RuntimeUnavailable) as refused:
        load_interpreter_class()
    message = str(refused.value)
    assert "pip install 'edgefleet[litert]'" in message, message
    assert "pip install 'edgefleet[tflite-runtime]'" in message, message
    assert "\n" not in message


def test_is_installed_reads_without_importing(monkeypatch: pytest.MonkeyPatch) -> None:
    evict(monkeypatch, "textual_plotext")
    assert extras.is_installed("textual_plotext")
    assert "textual_plotext" not in sys.modules
    assert not extras.is_installed("no_such_module_anywhere")


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["server", "--data-dir", "d"], "server"),
        (["--server", "h:1", "tui"], "tui"),
        (["db", "upgrade"], "server"),
        (["devices", "ls"], "cli"),
        ([], "cli"),
    ],
)
def test_the_console_without_the_cli_names_the_extra_its_command_needs(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    extra: str,
) -> None:
    from edgefleet import console

    make_missing(monkeypatch, "click")
    evict(monkeypatch, "edgefleet.controlplane.cli")
    monkeypatch.setattr(sys, "argv", ["edgefleet", *argv])
    with pytest.raises(SystemExit) as exited:
        console.edgefleet()
    assert exited.value.code == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and line.endswith(f"pip install 'edgefleet[{extra}]'\n"), line
