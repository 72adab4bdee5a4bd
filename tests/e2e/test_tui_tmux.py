"""The real `edgefleet tui` in a terminal, as an operator meets it: a
control plane process (`edgefleet server`), simulated devices (fleetsim) on
the real device protocol, contexts written by `edgefleet context add`, and
the TUI running in a detached tmux session of 80x24 (bench.bench_tui's
Terminal, which its benchmark drives too). Keys go in with `tmux
send-keys`; what a person would read comes back with `tmux capture-pane`,
polled against a deadline.

The scenario (issue 23): a context with a wrong token gives one clear
message; the good context opens the overview; a pending device is accepted
by its name; a rollout is started from the wizard; the device that failed
it is opened from the monitor."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.bench_tui import Terminal, footer, one_line, row
from edgefleet.controlplane.db.engine import make_engine, sqlite_url
from edgefleet.controlplane.db.uow import Database
from edgefleet.sim import Fleet, parse_profile
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from testkit.builds import answer_builds
from testkit.fleet import GW, random_mlp
from testkit.harness import ControlPlane, env_without_proxy
from testkit.models import model_parts, push_model

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
WIDTH, HEIGHT = 80, 24
CLASS = "cams"
VERSION = "digits@1.0.0"
# Every device fails to install the version: the rollout's first stage has
# a failed device for the monitor to show (the validating step's reason).
FAIL_REASON = "validation failed: outputs differ from the reference"


# ------------------------------------------------------------------ the fleet


@dataclass
class Setup:
    cp: ControlPlane
    op: object
    auto_token: str
    pending_token: str
    env: dict[str, str]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """A control plane process with one class, digits 1.0.0 built (by hand),
    and two enrollment tokens (auto-accept, pending); the CLI's environment
    with a contexts file of its own."""
    cp = ControlPlane(tmp_path / "cp", None, "--build-workers", "0")
    cp.start()
    try:
        op = cp.operator()
        op.CreateDeviceClass(o.CreateDeviceClassRequest(
            name=CLASS, constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME),
            match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=["x86_64"])],
        ))  # fmt: skip
        model = random_mlp(tmp_path / "digits.onnx", seed=0)
        push_model(op, "digits", "1.0.0", model_parts(model=model))
        engine = make_engine(sqlite_url(cp.data_dir), pool_size=2)
        files = {hashlib.sha256(model.read_bytes()).hexdigest(): model}
        answer_builds(Database(engine), cp.data_dir / "blobs", files, op)
        engine.dispose()
        policies = {"line": o.ENROLLMENT_POLICY_AUTO_ACCEPT, "new": o.ENROLLMENT_POLICY_PENDING}
        tokens = [
            op.CreateEnrollmentToken(
                o.CreateEnrollmentTokenRequest(name=name, policy=policy)
            ).secret
            for name, policy in policies.items()
        ]
        env = env_without_proxy()
        env["EDGEFLEET_CONFIG"] = str(tmp_path / "config" / "contexts.json")
        for key in ("EDGEFLEET_SERVER", "EDGEFLEET_TOKEN", "EDGEFLEET_CA_CERT",
                    "EDGEFLEET_CONTEXT"):  # fmt: skip
            env.pop(key, None)
        env["TERM"] = "xterm-256color"
        yield Setup(cp, op, tokens[0], tokens[1], env)
    finally:
        cp.close()


@pytest.fixture
async def fleet(setup: Setup) -> AsyncIterator[tuple[Fleet, Fleet]]:
    """Three accepted devices that fail to install VERSION, and two pending
    ones (new-00000, new-00001)."""
    profile = parse_profile({
        "heartbeat_interval_s": 1, "telemetry_interval_s": 1,
        "classes": [{"name": "cam", "hardware": GW, "install_s": [0.05, 0.2],
                     "versions": {"1.0.0": {"fail_rate": 1.0, "fail_state": "validating",
                                            "fail_reason": FAIL_REASON}}}],
    })  # fmt: skip
    line = Fleet(setup.cp.address, setup.auto_token, profile, n=3, prefix="line", seed=1)
    new = Fleet(setup.cp.address, setup.pending_token, profile, n=2, prefix="new", seed=2)
    async with line, new:
        yield line, new


def context_add(setup: Setup, name: str, *token: str) -> None:
    command = [EDGEFLEET, "context", "add", name, "--server", setup.cp.address, *token]
    run = subprocess.run(command, env=setup.env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr


@pytest.fixture
def terminals(setup: Setup) -> Iterator[Callable[[str], Terminal]]:
    """Terminals of WIDTH x HEIGHT running with the CLI's environment;
    closed (their tmux servers ended) after the test."""
    opened: list[Terminal] = []

    def terminal(name: str) -> Terminal:
        opened.append(Terminal(name, setup.env, WIDTH, HEIGHT))
        return opened[-1]

    yield terminal
    for t in opened:
        t.close()


def failed_device(screen: str) -> str:
    """The name of the first failed device in the monitor's table ('' if
    none): its rows are device, class, stage, state, reason."""
    for line in screen.splitlines():
        words = line.split()
        if len(words) > 4 and words[0].lstrip("*").startswith(("line-", "new-")) \
                and words[3] == "failed":  # fmt: skip
            return words[0].lstrip("*")
    return ""


# ------------------------------------------------------------------ the scenario


async def test_an_operator_in_a_real_terminal(
    setup: Setup, fleet: tuple[Fleet, Fleet], terminals: Callable[[str], Terminal],
    tmp_path: Path,
) -> None:  # fmt: skip
    line, _ = fleet
    await line.wait_connected(60)

    # 1. A wrong token: one clear message, nothing else; q leaves.
    context_add(setup, "typo", "--token", "not-the-token-0123456789")
    bad = terminals("bad").start(EDGEFLEET, "tui", "--context", "typo")
    shown = await bad.shows("refused the token")
    assert f"The control plane at {setup.cp.address} refused the token" in shown
    assert "Check --token / the context (edgefleet context ls)" in shown
    assert "Traceback" not in shown and "Overview" not in shown
    bad.keys("q")
    await bad.until(lambda _: bad.exited(), "the TUI ending on q")

    # 2. The good context, made current: `edgefleet tui` with no option.
    token_file = tmp_path / "admin-token"
    token_file.write_text(setup.cp.admin_token)
    context_add(setup, "lab", "--token-file", str(token_file), "--use")
    tui = terminals("good").start(EDGEFLEET, "tui")
    shown = await tui.shows("1 Overview", "connected", "Devices")
    assert "role admin" in one_line(shown, "connected")

    # 3. Accept a pending device by its name: filter, then a.
    tui.keys("2")
    await tui.until(lambda s: "of 5 devices, sorted" in s and "Sort" in footer(s),
                    "the devices table")  # fmt: skip
    tui.keys("/")
    # The footer drops the table's letter keys once the filter has the
    # focus (a person sees that before typing). Keys sent in the same
    # instant as `/` reach the table instead: focus() is deferred.
    await tui.until(lambda s: "Sort" not in footer(s), "the filter focused")
    tui.type("new-00001")
    tui.keys("Enter")
    shown = await tui.shows("1 of 5 devices")
    assert row(shown, "new-00001")[1] == "pending"
    tui.keys("a")
    shown = await tui.until(lambda s: row(s, "new-00001")[1] == "online", "new-00001 accepted")
    assert "accepted new-00001" in shown
    states = {d.name: d.state for d in setup.op.ListDevices(o.ListDevicesRequest()).devices}
    assert states["new-00001"] == c.DEVICE_STATE_ACCEPTED
    assert states["new-00000"] == c.DEVICE_STATE_PENDING

    # 4. A rollout from the wizard: 5, n, the version it suggests, Tab, the
    # class, dry run, start.
    tui.keys("5")
    await tui.shows("no rollouts yet")
    tui.keys("n")
    await tui.until(lambda s: VERSION in one_line(s, "version"), "the wizard with the version")
    # Each key once the field it is for shows the focus (as a person waits
    # to see it): the wizard's first focus lands a moment after it shows.
    await tui.focus_on("version")
    tui.keys("Tab")
    await tui.focus_on("classes")
    tui.type(CLASS)
    await tui.until(lambda s: one_line(s, "classes").split() == ["classes", CLASS], "the cohort")
    tui.keys("C-r")
    shown = await tui.shows("ctrl+s starts it")
    tui.keys("C-s")
    shown = await tui.shows("rollout ", VERSION, "stage 1/")
    assert one_line(shown, VERSION).split()[0] == "rollout"
    # 5. The device that failed: first in the monitor's table, Enter opens it.
    shown = await tui.until(failed_device, "a failed device in the monitor", within_s=60)
    name = failed_device(shown)
    assert "PAUSED" in one_line(shown, VERSION)
    tui.keys("Enter")
    shown = await tui.until(lambda s: s.split()[:1] == [name], f"the detail of {name}")
    assert row(shown, name)[2] == "failed"
    # Its model, failed, and why (the start of the reason: the cell wraps).
    model = one_line(shown, "digits ")
    assert model.split()[:2] == ["digits", "1.0.0"] and "failed: validation failed" in model
