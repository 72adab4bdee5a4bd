"""The wheel, built and installed for real (not editable), proves the split
into extras instead of trusting pyproject.toml: the wheel ships `edgefleet`
alone with its data files; an agent-only install (`edgefleet[onnxruntime]`)
has no server, CLI or TUI dependencies and runs the agent and its unit
tests; a [cli] install runs the client commands and says in one line which
extra `edgefleet server` and `edgefleet tui` need, and its agent (no runtime)
says what ONNX models need; the full install (`edgefleet[all]`) serves and
tours the TUI headless. Every venv process runs in a temporary directory, so
the checkout is never importable there (testkit/wheel.py).

Installing needs the package index or pip's cache: on a machine with neither
the tests skip, saying so; with the index reachable a failed install fails.
About 1.5-2 minutes on 2 cores with a warm pip cache; the timings are printed."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from edgefleet.polling import wait_for
from edgefleet.v1 import inference_pb2, inference_pb2_grpc
from testkit import wheel as wheel_kit
from testkit.wheel import InstallFailed, Server, Venv

T = TypeVar("T")
TESTS = wheel_kit.REPO / "tests"
# What a device must not install to run an agent (the list).
NOT_ON_A_DEVICE = ("sqlalchemy", "alembic", "psycopg", "textual", "onnx", "onnxconverter_common",
                   "tensorflow", "click")  # fmt: skip
# Third-party modules the agent-only venv has: the base, onnxruntime, pytest.
AGENT_VENV_MODULES = {"grpc", "google", "numpy", "cryptography", "psutil", "prometheus_client",
                      "onnxruntime", "pytest", "pytest_asyncio", "_pytest"}  # fmt: skip
# Parts of edgefleet an agent-only install has but must not need.
NOT_AGENT = ("edgefleet.controlplane", "edgefleet.tui", "edgefleet.sim", "edgefleet.demo",
             "edgefleet.migrations")  # fmt: skip
TOUR = """
import sys
from edgefleet.tui.client import FleetClient
from edgefleet.tui.tour import run_tour
for line in run_tour(FleetClient(sys.argv[1], sys.argv[2])):
    print(line)
"""


@pytest.fixture(scope="module")
def say(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Print past pytest's capture, so CI logs show the timings."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def line(text: str) -> None:
        if reporter is None or capture is None:
            print(f"test_wheel: {text}")
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"test_wheel: {text}")

    return line


def timed(say: Callable[[str], None], what: str, step: Callable[[], T]) -> T:
    """`step()`, its time printed; a skip when it failed for want of the index."""
    started = time.monotonic()
    try:
        result = step()
    except InstallFailed as failed:
        if not failed.index_reachable:
            pytest.skip(f"no network to the package index and pip's cache cannot {what}")
        raise
    say(f"{what}: {time.monotonic() - started:.1f} s")
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wheel")


@pytest.fixture(scope="module")
def wheel(workdir: Path, say: Callable[[str], None]) -> Path:
    return timed(say, "build the wheel", lambda: wheel_kit.build_wheel(workdir))


@pytest.fixture(scope="module")
def agent_venv(workdir: Path, wheel: Path, say: Callable[[str], None]) -> Venv:
    test_tools = ("pytest", "pytest-asyncio", "pytest-timeout")
    venv = timed(
        say,
        "install edgefleet[onnxruntime] + pytest",
        lambda: wheel_kit.make_venv(workdir / "agent", wheel, "onnxruntime", *test_tools),
    )
    say(f"agent-only venv (with pytest): {venv.site_packages_mb():.0f} MB of site-packages")
    return venv


@pytest.fixture(scope="module")
def cli_venv(workdir: Path, wheel: Path, say: Callable[[str], None]) -> Venv:
    return timed(
        say, "install edgefleet[cli]", lambda: wheel_kit.make_venv(workdir / "cli", wheel, "cli")
    )


@pytest.fixture(scope="module")
def full_venv(workdir: Path, wheel: Path, say: Callable[[str], None]) -> Venv:
    venv = timed(
        say, "install edgefleet[all]", lambda: wheel_kit.make_venv(workdir / "full", wheel, "all")
    )
    say(f"full venv: {venv.site_packages_mb():.0f} MB of site-packages")
    return venv


@pytest.fixture(scope="module")
def control_plane(workdir: Path, full_venv: Venv) -> Iterator[Server]:
    """`edgefleet server` from the full install: the server's smoke test."""
    server = wheel_kit.start_server(full_venv, workdir / "server")
    try:
        yield server
    finally:
        wheel_kit.stop(server.proc)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a command printed to stderr (asserted single)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ------------------------------------------------------------------ the wheel


def test_the_wheel_ships_edgefleet_alone_with_its_data_files(wheel: Path) -> None:
    names = wheel_kit.wheel_names(wheel)
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"edgefleet", f"{wheel.name.split('-py3')[0]}.dist-info"}, sorted(tops)
    for pattern in ("edgefleet/tui/screens/*.py", "edgefleet/tui/app.tcss",
                    "edgefleet/migrations/versions/*.py", "edgefleet/v1/*.proto",
                    "edgefleet/agent/packaging/*", "edgefleet/extras.py",
                    "edgefleet/migrations/script.py.mako", "edgefleet/py.typed"):  # fmt: skip
        assert any(Path(name).match(pattern) for name in names), pattern
    # The screens an installed `edgefleet tui` once lacked, each of them.
    screens = {path.name for path in (wheel_kit.REPO / "tui" / "screens").glob("*.py")}
    shipped = {Path(n).name for n in names if n.startswith("edgefleet/tui/screens/")}
    assert screens <= shipped, screens - shipped
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


# ------------------------------------------------------------------ agent only


def test_an_agent_only_install_has_no_server_cli_or_tui_dependencies(agent_venv: Venv) -> None:
    assert agent_venv.importable(*NOT_ON_A_DEVICE) == []
    assert agent_venv.importable("onnxruntime", "grpc", "numpy") == ["onnxruntime", "grpc", "numpy"]
    # The installed copy, not the checkout, is what runs there.
    where = agent_venv.run(agent_venv.python, "-c", "import edgefleet; print(edgefleet.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(agent_venv.site_packages), where


def test_the_agent_only_install_runs_edgefleet_agent(agent_venv: Venv) -> None:
    helped = agent_venv.run(agent_venv.bin("edgefleet-agent"), "--help")
    assert helped.returncode == 0, helped.stderr
    assert "usage: edgefleet-agent" in helped.stdout
    # Its `edgefleet` command has no CLI to run: the error names the extra.
    cli = agent_venv.run(agent_venv.bin("edgefleet"), "--help")
    assert cli.returncode == 2, cli.stdout + cli.stderr
    assert one_line(cli).endswith("pip install 'edgefleet[cli]'"), cli.stderr


def _import_statements(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports a module runs when it is imported: top level, and inside
    top-level if/try blocks, except `if TYPE_CHECKING:`."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                yield from _import_statements(node.body)
            yield from _import_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _import_statements(block)
            for handler in node.handlers:
                yield from _import_statements(handler.body)


def imported_modules(path: Path) -> set[str]:
    """The modules `path` imports when imported ("." for a relative import)."""
    imported: set[str] = set()
    for node in _import_statements(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif node.level:
            imported.add(".")
        elif node.module in ("edgefleet", "testkit"):  # from edgefleet import agent
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif node.module:
            imported.add(node.module)
    return imported - {"__future__"}


def agent_side(module: str) -> bool:
    """Whether the agent-only venv has `module` and the agent may use it; a
    testkit module when everything it imports is agent-side too."""
    top = module.split(".")[0]
    if top == "edgefleet":
        return not module.startswith(NOT_AGENT)
    if top == "testkit":
        path = wheel_kit.REPO.joinpath(*module.split(".")).with_suffix(".py")
        return module == "testkit" or (
            path.is_file() and all(map(agent_side, imported_modules(path)))
        )
    return top in sys.stdlib_module_names or top in AGENT_VENV_MODULES


def agent_only_test_files() -> list[Path]:
    """The unit and integration test files that import only what the agent
    venv has (standard library, the base, onnxruntime, pytest, edgefleet's
    agent side, testkit modules of the same kind), an agent module among it."""
    candidates = sorted([*TESTS.glob("unit/test_*.py"), *TESTS.glob("integration/test_*.py")])
    return [
        path
        for path in candidates
        if all(map(agent_side, modules := imported_modules(path)))
        and any(module.startswith("edgefleet.agent") for module in modules)
    ]


def helpers_of(path: Path) -> set[Path]:
    """The testkit files `path` imports, directly or through one another."""
    found: set[Path] = set()
    pending = [path]
    while pending:
        for module in imported_modules(pending.pop()):
            helper = wheel_kit.REPO.joinpath(*module.split(".")).with_suffix(".py")
            if module.startswith("testkit.") and helper not in found:
                found.add(helper)
                pending.append(helper)
    return found


def copy_with_helpers(files: list[Path], dest: Path) -> None:
    """`files` into `dest` (keeping their tier folders) with the testkit
    modules they import."""
    for path in files:
        target = dest / path.relative_to(TESTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        for helper in helpers_of(path):
            (dest / "testkit").mkdir(exist_ok=True)
            shutil.copy2(wheel_kit.REPO / "testkit" / "__init__.py", dest / "testkit")
            shutil.copy2(helper, dest / "testkit")


def test_the_agents_unit_tests_pass_against_the_agent_only_install(
    agent_venv: Venv, workdir: Path, say: Callable[[str], None]
) -> None:
    files = agent_only_test_files()
    assert TESTS / "integration" / "test_agent_daemon.py" in files, files
    here = workdir / "agent-tests"
    copy_with_helpers(files, here)
    (here / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "timeout = 180\n"
    )
    started = time.monotonic()
    run = agent_venv.run(agent_venv.python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "--import-mode=importlib", ".", cwd=here, timeout_s=600)  # fmt: skip
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    say(f"agent tests in the agent-only venv ({', '.join(p.name for p in files)}): {summary}, "
        f"{time.monotonic() - started:.1f} s")  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in summary and "error" not in summary, summary


def test_an_idle_agent_from_the_agent_only_install_serves_its_inference_api(
    agent_venv: Venv, cli_venv: Venv, control_plane: Server, workdir: Path,
    say: Callable[[str], None],
) -> None:  # fmt: skip
    token = wheel_kit.create_enrollment_token(cli_venv, control_plane.address)
    agent = wheel_kit.start_agent(agent_venv, workdir / "idle-agent", control_plane.address, token)
    try:
        agent.wait_synced()
        socket = agent.state_dir / "inference.sock"
        wait_for(socket.exists, 30, what="the inference socket")
        # No model is assigned: the API answers, NOT_FOUND.
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetModelMetadata(
                    inference_pb2.GetModelMetadataRequest(model_name="digits"), timeout=10
                )
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        rss = wheel_kit.idle_rss_mb(agent.proc.pid, idle_s=10)
        say(f"idle agent from the agent-only install: RSS {rss:.1f} MB")
        assert agent.proc.poll() is None, agent.log()
        assert "Traceback" not in agent.log()
    finally:
        wheel_kit.stop(agent.proc)


# ------------------------------------------------------------------ [cli] only


def test_client_commands_need_only_the_cli_extra(cli_venv: Venv, control_plane: Server) -> None:
    assert cli_venv.importable(*NOT_ON_A_DEVICE) == ["click"]
    edgefleet = (cli_venv.bin("edgefleet"), "--server", control_plane.address,
                 "--token", wheel_kit.ADMIN_TOKEN)  # fmt: skip
    listed = cli_venv.run(*edgefleet, "devices", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.lstrip().startswith(("[", "{")), listed.stdout


@pytest.mark.parametrize(
    ("command", "extra"),
    [(("server", "--insecure"), "server"), (("tui",), "tui"),
     (("db", "upgrade"), "server"), (("toolchain", "ls"), "server")],
)  # fmt: skip
def test_a_command_whose_extra_is_missing_says_which_in_one_line(
    cli_venv: Venv, workdir: Path, command: tuple[str, ...], extra: str
) -> None:
    ran = cli_venv.run(cli_venv.bin("edgefleet"), *command, cwd=workdir)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    line = one_line(ran)
    assert f"needs the '{extra}' extra" in line, line
    assert line.endswith(f"pip install 'edgefleet[{extra}]'"), line


def test_an_agent_without_onnxruntime_runs_and_says_what_onnx_models_need(
    cli_venv: Venv, control_plane: Server, workdir: Path
) -> None:
    assert cli_venv.importable("onnxruntime") == []
    token = wheel_kit.create_enrollment_token(cli_venv, control_plane.address)
    agent = wheel_kit.start_agent(cli_venv, workdir / "bare-agent", control_plane.address, token)
    try:
        agent.wait_synced()
        assert agent.proc.poll() is None
        said = "serving ONNX models needs the 'onnxruntime' extra"
        assert f"{said}: pip install 'edgefleet[onnxruntime]'" in agent.log(), agent.log()
    finally:
        wheel_kit.stop(agent.proc)


# ------------------------------------------------------------------ [all]


def test_the_full_install_serves_and_migrates(
    full_venv: Venv, control_plane: Server, workdir: Path
) -> None:
    listed = full_venv.run(full_venv.bin("edgefleet"), "--server", control_plane.address,
                           "--token", wheel_kit.ADMIN_TOKEN, "devices", "ls")  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    upgraded = full_venv.run(
        full_venv.bin("edgefleet"), "db", "upgrade", "--data-dir", workdir / "fresh-db"
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.startswith("database at revision "), upgraded.stdout
    assert "Traceback" not in control_plane.log()


def test_the_full_install_tours_the_tui_headless(
    full_venv: Venv, control_plane: Server, workdir: Path, say: Callable[[str], None]
) -> None:
    started = time.monotonic()
    toured = full_venv.run(full_venv.python, "-c", TOUR, control_plane.address,
                           wheel_kit.ADMIN_TOKEN, cwd=workdir, timeout_s=300)  # fmt: skip
    say(f"TUI headless tour from the full install: {time.monotonic() - started:.1f} s")
    assert toured.returncode == 0, toured.stdout[-3000:] + toured.stderr[-3000:]
    for screen in ("[Overview]", "[Devices]", "[Classes]", "[Models]", "[Rollouts]",
                   "[Telemetry]", "[Audit]"):  # fmt: skip
        assert screen in toured.stdout, (screen, toured.stdout[-3000:])
