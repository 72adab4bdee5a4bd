"""The edgefleet wheel, built from this checkout and installed (not editable)
into fresh virtual environments: what tests/e2e/test_wheel.py checks and
bench/bench_agent_install.py measures.

Nothing here runs inside the checkout: the wheel is built from a copy of the
checkout's files (so no build/ or egg-info is left behind, and no stale
build/lib from an earlier build can slip into the wheel), and the venvs'
processes run with a temporary directory as their working directory and no
PYTHONPATH, so the checkout's sources are never importable there.

pip's output goes to a log file per step; a failure shows the log's end and
says whether the package index could be reached at all (a machine with no
network and a cold pip cache cannot install anything, which a test skips)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from edgefleet.polling import wait_for

REPO = Path(__file__).resolve().parents[1]
MB = 1_000_000
# Generous: a cold pip cache downloads ~400 MB for [all].
INSTALL_TIMEOUT_S = 900.0
ADMIN_TOKEN = "wheel-admin-token-0123456789abcdef"
# The package index pip uses unless configured otherwise.
DEFAULT_INDEX = "https://pypi.org/simple"


class InstallFailed(Exception):
    """A build or install step failed; the message ends with its log's last
    lines. `index_reachable` tells a machine without network (nothing to be
    done there) from a broken requirement (a bug)."""

    def __init__(self, what: str, log: Path, *, index_reachable: bool) -> None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        super().__init__(f"{what} failed (log: {log}):\n{tail}")
        self.index_reachable = index_reachable


def clean_env(**extra: str) -> dict[str, str]:
    """This environment for the venvs' processes: no PYTHONPATH or active
    virtualenv (the checkout must not leak in), no proxy (gRPC would send
    loopback traffic to it), no EDGEFLEET_AGENT_* (they override the agent's
    config file)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        and "proxy" not in key.lower()
        and not key.startswith("EDGEFLEET_AGENT_")
    }
    env.update(extra)
    return env


def index_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the package index (PIP_INDEX_URL, else
    PyPI) opens; a local file index counts as reachable."""
    url = urlsplit(os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX))
    if url.scheme == "file":
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "pypi.org", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _run_logged(what: str, command: Sequence[str | Path], log: Path, timeout_s: float) -> None:
    with log.open("ab") as out:
        try:
            completed = subprocess.run(
                [str(part) for part in command],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=clean_env(),
                cwd=log.parent,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            out.write(f"\n[timed out after {timeout_s:g} s]\n".encode())
            failed = True
        else:
            failed = completed.returncode != 0
    if failed:
        raise InstallFailed(what, log, index_reachable=index_reachable())


# ------------------------------------------------------------------ the wheel


def checkout_files() -> list[Path]:
    """The checkout's files as a fresh clone with the local changes would
    have them (tracked and new files, nothing git ignores), relative paths."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    names = (name for name in listed.split("\0") if name)
    # A tracked file deleted in the working tree is still listed: skip it.
    return [Path(name) for name in names if os.path.lexists(REPO / name)]


def copy_checkout(dest: Path) -> Path:
    """The checkout's files copied to `dest` (symbolic links kept as links:
    proto/edgefleet's parts are links to the top-level folders)."""
    for relative in checkout_files():
        source, target = REPO / relative, dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)
    return dest


def build_wheel(workdir: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the checkout; the .whl's path."""
    source = copy_checkout(workdir / "source")
    dist = workdir / "dist"
    _run_logged(
        "building the wheel",
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, source],
        workdir / "wheel.log",
        INSTALL_TIMEOUT_S,
    )
    (wheel,) = dist.glob("edgefleet-*.whl")
    return wheel


def wheel_names(wheel: Path) -> list[str]:
    """The paths inside the wheel."""
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


# ------------------------------------------------------------------ venvs


@dataclass(frozen=True)
class Venv:
    """A virtual environment holding one install of the wheel."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def bin(self, name: str) -> Path:
        return self.root / "bin" / name

    @property
    def site_packages(self) -> Path:
        (path,) = (self.root / "lib").glob("python3*/site-packages")
        return path

    def site_packages_mb(self) -> float:
        """The size of everything installed, in MB (10^6 bytes): file sizes,
        bytecode pip compiled included, links not followed."""
        total = sum(
            path.lstat().st_size for path in self.site_packages.rglob("*") if not path.is_dir()
        )
        return total / MB

    def importable(self, *modules: str) -> list[str]:
        """Those of the top-level `modules` this venv's Python finds."""
        probe = (
            "import importlib.util, json, sys\n"
            "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m)]))"
        )
        return list(json.loads(self.run(self.python, "-c", probe, *modules).stdout))

    def run(
        self, *command: str | Path, cwd: Path | None = None, timeout_s: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """`command` to completion, output captured, in `cwd` (default: the
        venv's root, outside the checkout)."""
        return subprocess.run(
            [str(part) for part in command],
            capture_output=True,
            text=True,
            env=clean_env(),
            cwd=cwd or self.root,
            timeout=timeout_s,
            check=False,
        )


def make_venv(root: Path, wheel: Path, extras: str | None, *also: str) -> Venv:
    """A fresh venv at `root` with `wheel` (and `extras`, e.g. "onnxruntime"
    or "all") and the `also` requirements installed by pip, reusing pip's
    cache. The venv has no pip of its own: the tests' pip installs into it,
    and the measured size is the install's alone."""
    root.parent.mkdir(parents=True, exist_ok=True)
    log = root.parent / f"{root.name}.log"
    _run_logged("creating a venv", [sys.executable, "-m", "venv", "--without-pip", root], log, 120)
    venv = Venv(root)
    requirement = f"edgefleet[{extras}] @ {wheel.as_uri()}" if extras else str(wheel)
    _run_logged(
        f"pip install {requirement} {' '.join(also)}".strip(),
        [sys.executable, "-m", "pip", "--python", venv.python, "install", requirement, *also],
        log,
        INSTALL_TIMEOUT_S,
    )
    return venv


# ------------------------------------------------------------------ processes


@dataclass
class Server:
    """`edgefleet server --insecure` from a venv, on SQLite in `data_dir`."""

    proc: subprocess.Popen[bytes]
    address: str
    data_dir: Path

    def log(self) -> str:
        return (self.data_dir / "server.log").read_text(errors="replace")


def start_server(venv: Venv, data_dir: Path, timeout_s: float = 60.0) -> Server:
    """The control plane from `venv`, listening on a loopback port the OS
    picked, with ADMIN_TOKEN; returns once it has written its port."""
    data_dir.mkdir(parents=True)
    port_file = data_dir / "port"
    with (data_dir / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(venv.bin("edgefleet")), "server", "--insecure", "--data-dir", str(data_dir),
             "--listen", "127.0.0.1:0", "--port-file", str(port_file),
             "--admin-token", ADMIN_TOKEN, "--build-workers", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=clean_env(), cwd=data_dir,
        )  # fmt: skip
    server = Server(proc, "", data_dir)

    def port() -> str | None:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.log()}")
        text = port_file.read_text().strip() if port_file.exists() else ""
        return text or None

    server.address = f"127.0.0.1:{wait_for(port, timeout_s, what='the server port file')}"
    return server


def create_enrollment_token(cli: Venv, server: str) -> str:
    """A fresh enrollment token, made with `cli`'s `edgefleet tokens create`."""
    name = f"wheel-{uuid.uuid4().hex[:8]}"
    made = cli.run(
        cli.bin("edgefleet"), "--server", server, "--token", ADMIN_TOKEN,
        "tokens", "create", "--name", name, "--json",
    )  # fmt: skip
    if made.returncode != 0:
        raise RuntimeError(f"edgefleet tokens create failed:\n{made.stdout}{made.stderr}")
    return str(json.loads(made.stdout)["secret"])


@dataclass
class Agent:
    """`edgefleet-agent` from a venv, enrolled with a fresh hardware id."""

    proc: subprocess.Popen[bytes]
    state_dir: Path

    def log(self) -> str:
        return (self.state_dir.parent / "agent.log").read_text(errors="replace")

    def wait_synced(self, timeout_s: float = 60.0) -> None:
        """Until the agent has applied its first desired state."""

        def synced() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {self.proc.returncode}:\n{self.log()}")
            return (self.state_dir / "desired.json").exists()

        wait_for(synced, timeout_s, what="the agent's first desired state")


def start_agent(venv: Venv, directory: Path, server: str, token: str) -> Agent:
    """The agent from `venv` in `directory` (its config, state and log)."""
    state = directory / "state"
    state.mkdir(parents=True)
    config = directory / "agent.toml"
    config.write_text(
        f'server = "{server}"\ninsecure = true\nenrollment_token = "{token}"\n'
        f'state_dir = "{state}"\nhardware_id = "wheel-{uuid.uuid4().hex}"\n'
        'name = "wheel-agent"\n'
    )
    with (directory / "agent.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(venv.bin("edgefleet-agent")), "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, env=clean_env(), cwd=directory,
        )  # fmt: skip
    return Agent(proc, state)


def stop(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace_s)


def idle_rss_mb(pid: int, idle_s: float, samples: int = 5) -> float:
    """The median RSS in MB (10^6 bytes) of `pid` and its children over
    `samples` samples 0.5 s apart, after `idle_s` seconds left alone."""
    time.sleep(idle_s)
    readings = []
    for _ in range(samples):
        process = psutil.Process(pid)
        total = 0
        for member in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):  # a child that just ended
                total += member.memory_info().rss
        readings.append(total / MB)
        time.sleep(0.5)
    return sorted(readings)[len(readings) // 2]
