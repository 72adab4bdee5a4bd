"""TUI benchmark: the real `edgefleet tui`, in a detached tmux session, over
N simulated devices (fleetsim) connected to one real control plane.

Starts `edgefleet server` (embedded SQLite in a temp dir, no build workers:
no model is involved) with a 30 s heartbeat, one device class per kind of
device of the default fleetsim profile, and in this process `--devices`
SimAgents (heartbeats and telemetry every 30 s, as bench_rollout's fleet)
plus `--events` pending ones (`late-NNNNN`). Then:

1. **idle CPU**: the TUI on the overview, then on the devices screen (the
   whole table), `--idle-s` seconds each with no key pressed, while the
   fleet chats as it does; CPU seconds of the TUI process / wall seconds,
   as % of one core. **The baseline**, over the same seconds: a bare
   grpc.aio WatchFleet consumer in a process of its own (this module with
   `--watch-only`), receiving the same events and doing nothing else. Goal:
   the TUI <= 2 % of a core;
2. **event -> row**: the devices screen filtered to the pending devices
   (`/late`); each is accepted (AcceptDevice) in turn, and the time from
   the call to its row reading `online` on the terminal (tmux capture-pane,
   polled every POLL_S) is taken. Goal: p95 <= 1 s. What it includes: the
   server's watch event, the TUI's coalescing (COALESCE_S), its re-read of
   the device the event names (GetDevice) and the redraw.

    python -m bench.bench_tui                    # 10,000 devices
    python -m bench.bench_tui --devices 2000 --idle-s 10
    python -m bench.bench_tui --smoke            # CI: seconds, figures meaningless

tmux must be installed. Figures from a busy machine are upper bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench.common import (
    ADMIN_TOKEN,
    CLASSES,
    Progress,
    clean_env,
    edgefleet_command,
    enroll,
    log_tail,
    make_profile,
    start_control_plane,
    stop_process,
)
from edgefleet.controlplane.client.connection import bearer_metadata, operator_stub
from edgefleet.sim import Fleet
from edgefleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc

GOAL_CPU_PERCENT = 2.0
GOAL_EVENT_TO_ROW_S = 1.0
# How often the terminal is read while timing an event (its resolution).
POLL_S = 0.02
# The bench's terminal: the filtered table shows every pending device.
WIDTH, HEIGHT = 120, 40
SMOKE = {"devices": 20, "events": 5, "idle_s": 3.0, "settle_s": 1.0}


# ------------------------------------------------------------------ tmux


ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The background of the focused input in the default theme at 256 colours
# (an unfocused one is a shade darker): how a person tells where keys go.
FOCUSED_INPUT = "\x1b[48;5;236m"


class Terminal:
    """One program in a detached tmux session, on a tmux server of its own
    (its own socket: no one's own sessions are touched). Keys go in with
    send-keys; what a person would read comes back with capture-pane."""

    def __init__(self, name: str, env: dict[str, str], width: int = 80, height: int = 24) -> None:
        self.socket = f"edgefleet-{name}-{uuid.uuid4().hex[:8]}"
        self.name = name
        self.env = env
        self.size = (width, height)

    def _tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                              env=self.env, capture_output=True, text=True, check=check,
                              timeout=10)  # fmt: skip

    def start(self, *command: str) -> Terminal:
        width, height = self.size
        self._tmux("new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                   "--", *command)  # fmt: skip
        # A program that dies leaves its last screen to read.
        self._tmux("set-option", "-t", self.name, "remain-on-exit", "on")
        return self

    def pid(self) -> int:
        """The process the session runs (the program itself, not a shell)."""
        return int(self._tmux("display-message", "-p", "-t", self.name, "#{pane_pid}").stdout)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.name).stdout

    def styled(self) -> str:
        """The screen with its colours (SGR escape sequences)."""
        return self._tmux("capture-pane", "-e", "-p", "-t", self.name).stdout

    def keys(self, *keys: str) -> None:
        """tmux key names: `Enter`, `Tab`, `C-r`, `a`... Escape followed at
        once by another key reads as alt+key: send Escape on its own."""
        self._tmux("send-keys", "-t", self.name, *keys)

    def type(self, text: str) -> None:
        """Text typed as is (no key names)."""
        self._tmux("send-keys", "-t", self.name, "-l", text)

    def exited(self) -> bool:
        """The program in the pane has ended."""
        shown = self._tmux("display-message", "-p", "-t", self.name, "#{pane_dead}", check=False)
        return shown.returncode != 0 or shown.stdout.strip() == "1"

    async def until(self, condition: Callable[[str], object], what: str, within_s: float = 30,
                    poll_s: float = 0.1) -> str:  # fmt: skip
        """The screen, once `condition(screen)` holds (a condition that
        raises LookupError or AssertionError has not held yet); else
        AssertionError showing the screen."""
        deadline = time.monotonic() + within_s
        while True:
            shown = await asyncio.to_thread(self.screen)
            try:
                holds = condition(shown)
            except (AssertionError, LookupError):  # a row not there yet
                holds = False
            if holds:
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"the TUI never showed {what}; the screen:\n{shown}")
            await asyncio.sleep(poll_s)

    async def shows(self, *texts: str, within_s: float = 30) -> str:
        what = " and ".join(map(repr, texts))
        return await self.until(lambda s: all(t in s for t in texts), what, within_s)

    async def focus_on(self, label: str, within_s: float = 30) -> None:
        """Until the form field labelled `label` is the focused one."""
        deadline = time.monotonic() + within_s
        while focused_field(shown := await asyncio.to_thread(self.styled)) != label:
            if time.monotonic() > deadline:
                raise AssertionError(f"the field {label!r} never had the focus; the screen:\n"
                                     f"{ANSI.sub('', shown)}")  # fmt: skip
            await asyncio.sleep(0.1)

    def close(self) -> None:
        self._tmux("kill-server", check=False)


def focused_field(styled: str) -> str:
    """The label of the form field (a label, then an input on one line)
    whose input shows the focus; '' if none does."""
    for line in styled.splitlines():
        label, _, field = line.partition("\x1b[39m")
        if field.lstrip(" ").startswith(FOCUSED_INPUT):
            return ANSI.sub("", label).strip()
    return ""


def one_line(screen: str, text: str) -> str:
    """The screen's first line holding `text` (StopIteration if none)."""
    return next(line for line in screen.splitlines() if text in line)


def row(screen: str, first: str) -> list[str]:
    """The words of the table row whose first cell is `first` (a monitor's
    mark `*` ignored); LookupError when no row is."""
    for line in screen.splitlines():
        words = line.split()
        if len(words) > 1 and words[0].lstrip("*") == first:
            return words
    raise LookupError(f"no row {first!r} on the screen")


def shows_online(name: str, screen: str) -> bool:
    """The row of device `name` reads `online`."""
    return row(screen, name)[1] == "online"


def footer(screen: str) -> str:
    """The key bar: the screen's last line."""
    return screen.rstrip("\n").splitlines()[-1]


# ------------------------------------------------------------------ the baseline


async def watch_only(address: str, token: str) -> None:
    """The baseline: a WatchFleet stream read and dropped, nothing else;
    on SIGTERM, prints how many events it received."""
    events = 0

    async def consume() -> None:
        nonlocal events
        async with grpc.aio.insecure_channel(address) as channel:
            stub = operator_pb2_grpc.OperatorServiceStub(channel)
            call = stub.WatchFleet(operator_pb2.WatchFleetRequest(),
                                   metadata=bearer_metadata(token))  # fmt: skip
            async for _ in call:
                events += 1

    task = asyncio.create_task(consume())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    print(json.dumps({"events": events}), flush=True)


# ------------------------------------------------------------------ the run


def start_watcher(address: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """The baseline (watch_only) in a process of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench.bench_tui", "--watch-only", address],
        env={**env, "EDGEFLEET_TOKEN": ADMIN_TOKEN}, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def idle_cpu(tui_pid: int, watcher_pid: int, seconds: float,
                   settle_s: float) -> dict[str, float]:  # fmt: skip
    """% of one core each process used over `seconds` of the same wall time,
    after `settle_s` (the screen's first load and paint are not idle)."""
    await asyncio.sleep(settle_s)
    t0, tui0, watch0 = time.monotonic(), cpu_s(tui_pid), cpu_s(watcher_pid)
    await asyncio.sleep(seconds)
    wall = time.monotonic() - t0
    return {"wall_s": wall, "tui_percent": 100 * (cpu_s(tui_pid) - tui0) / wall,
            "watch_percent": 100 * (cpu_s(watcher_pid) - watch0) / wall}  # fmt: skip


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-tui-"))
    proc, address = start_control_plane(root / "cp", heartbeat_s=30, build_workers=0)
    env = clean_env()
    env["TERM"] = "xterm-256color"
    results: dict[str, Any] = {"devices": args.devices, "events": args.events}
    watcher: subprocess.Popen[str] | None = None
    tui: Terminal | None = None
    fleet: Fleet | None = None
    late: Fleet | None = None
    try:
        op = operator_stub(address, ADMIN_TOKEN)
        for name, arch in CLASSES.items():
            op.CreateDeviceClass(operator_pb2.CreateDeviceClassRequest(
                name=name,
                constraints=common_pb2.ConstraintProfile(runtime=common_pb2.RUNTIME_ONNXRUNTIME),
                match_rules=[common_pb2.MatchRule(field="arch", op=common_pb2.MATCH_OP_EQ,
                                                  values=[arch])],
            ))  # fmt: skip
        tokens = [op.CreateEnrollmentToken(operator_pb2.CreateEnrollmentTokenRequest(
            name=name, policy=policy)).secret for name, policy in (
                ("fleet", operator_pb2.ENROLLMENT_POLICY_AUTO_ACCEPT),
                ("late", operator_pb2.ENROLLMENT_POLICY_PENDING))]  # fmt: skip
        profile = make_profile(30, 30)
        fleet = Fleet(address, tokens[0], profile, n=args.devices, prefix="sim", seed=1,
                      heartbeat_interval_s=30, telemetry_interval_s=30)  # fmt: skip
        print(f"enrolling {args.devices} devices ...", flush=True)
        results["enroll_s"] = await enroll(fleet, args.startup_timeout, Progress(fleet))
        late = Fleet(address, tokens[1], profile, n=args.events, prefix="late", seed=2,
                     heartbeat_interval_s=30, telemetry_interval_s=30)  # fmt: skip
        await late.start(timeout_s=args.startup_timeout)
        total = args.devices + args.events

        watcher = start_watcher(address, env)
        tui = Terminal("bench", env, WIDTH, HEIGHT).start(
            *edgefleet_command(), "--server", address, "--token", ADMIN_TOKEN, "tui"
        )
        t0 = time.monotonic()
        await tui.until(lambda s: row(s, "online")[1] == str(args.devices)
                        and "connected" in s, f"the overview of {total} devices",
                        within_s=args.startup_timeout)  # fmt: skip
        results["open_s"] = time.monotonic() - t0
        pid = tui.pid()

        print(f"idle on the overview, {args.idle_s:g} s ...", flush=True)
        results["idle_overview"] = await idle_cpu(pid, watcher.pid, args.idle_s, args.settle_s)
        tui.keys("2")
        await tui.until(lambda s: f"{total} of {total} devices" in s and "Sort" in footer(s),
                        "the devices table", within_s=args.startup_timeout)  # fmt: skip
        print(f"idle on the devices screen, {args.idle_s:g} s ...", flush=True)
        results["idle_devices"] = await idle_cpu(pid, watcher.pid, args.idle_s, args.settle_s)

        # The pending devices only (the footer drops the table's keys once
        # the filter has the focus: type after that, as a person does).
        tui.keys("/")
        await tui.until(lambda s: "Sort" not in footer(s), "the filter focused")
        tui.type("late")
        tui.keys("Enter")
        await tui.until(lambda s: f"{args.events} of {total} devices" in s and all(
            row(s, a.name)[1] == "pending" for a in late.agents), "the pending devices",
                        within_s=args.startup_timeout)  # fmt: skip
        latencies = []
        for agent in late.agents:
            t0 = time.monotonic()
            accept = operator_pb2.AcceptDeviceRequest(id=agent.device_id)
            await asyncio.to_thread(op.AcceptDevice, accept)
            await tui.until(functools.partial(shows_online, agent.name), f"{agent.name} online",
                            within_s=30, poll_s=POLL_S)  # fmt: skip
            latencies.append(time.monotonic() - t0)
        results["event_to_row_s"] = latencies
        watcher.send_signal(signal.SIGTERM)
        out, _ = watcher.communicate(timeout=30)
        results["watch_events"] = json.loads(out.strip().splitlines()[-1])["events"]
        return results
    except BaseException:
        print(log_tail(root / "cp"), file=sys.stderr)
        raise
    finally:
        if tui is not None:
            tui.close()
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        for f in (late, fleet):
            if f is not None:
                await f.stop()
        stop_process(proc)


def print_report(r: dict[str, Any]) -> None:
    print(f"\n## TUI: {r['devices']:,} devices connected (+{r['events']} pending)\n")
    print(f"enrolled in {r['enroll_s']:.1f} s; the TUI showed the overview {r['open_s']:.1f} s "
          f"after it started; {r['watch_events']} watch events over the run\n")  # fmt: skip
    print("| screen, idle | TUI, % of a core | bare WatchFleet consumer | over |")
    print("|---|---:|---:|---:|")
    for key, title in (("idle_overview", "overview"), ("idle_devices", "devices (whole table)")):
        m = r[key]
        print(f"| {title} | {m['tui_percent']:.2f} | {m['watch_percent']:.2f} | "
              f"{m['wall_s']:.0f} s |")  # fmt: skip
    worst = max(r["idle_overview"]["tui_percent"], r["idle_devices"]["tui_percent"])
    verdict = "met" if worst <= GOAL_CPU_PERCENT else "NOT met"
    print(f"\nTUI idle CPU, worst screen: {worst:.2f} % of a core "
          f"(goal <= {GOAL_CPU_PERCENT:g} %): {verdict}")  # fmt: skip
    lat = r["event_to_row_s"]
    p95 = quantile(lat, 0.95)
    print(f"device event -> its row (accept -> `online` on the terminal, {len(lat)} events): "
          f"median {statistics.median(lat):.3f} s, p95 {p95:.3f} s, max {max(lat):.3f} s "
          f"(goal <= {GOAL_EVENT_TO_ROW_S:g} s): "
          + ("met" if p95 <= GOAL_EVENT_TO_ROW_S else "NOT met"))  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="EdgeFleet TUI benchmark (needs tmux)")
    add = parser.add_argument
    add("--devices", type=int, default=10_000, help="simulated devices connected")
    add("--events", type=int, default=20, help="pending devices accepted, one timed event each")
    add("--idle-s", type=float, default=30.0, help="idle seconds measured per screen")
    add(
        "--settle-s",
        type=float,
        default=5.0,
        help="seconds after a screen opens before its idle seconds start",
    )
    add("--startup-timeout", type=float, default=600.0)
    add("--json", type=Path, help="write the results here")
    add("--smoke", action="store_true", help=f"CI's run of seconds: {SMOKE}")
    add(
        "--watch-only",
        metavar="ADDRESS",
        help="(internal) be the baseline: consume WatchFleet at ADDRESS with $EDGEFLEET_TOKEN",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.devices < 1 or args.events < 1:
        parser.error("--devices and --events must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.watch_only:
        asyncio.run(watch_only(args.watch_only, os.environ["EDGEFLEET_TOKEN"]))
        return 0
    results = asyncio.run(run(args))
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
