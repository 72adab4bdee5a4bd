"""The soak's probe: a few of the fleet's devices, and a few echo agents, in
a process of their own.

A real fleet's devices each have their own CPU; the soak's 10,000 simulated
ones share one Python process, whose event loop is busy for hundreds of
milliseconds at a time when thousands of them download, verify and report
at once. A heartbeat's round trip measured there is mostly that wait
(its echo agents, on a server that does nothing, show it). The probe's
devices are ordinary members of the fleet (they enroll, heartbeat, upload
telemetry and take part in every rollout) but their client is a process
with little else to do, at the control plane's priority while the main
load generator runs below it: their round trips are what a device with a
CPU of its own would see. Its echo agents are that process's own baseline.

Run by bench/bench_soak.py (`Probe`), which talks to it in lines: this
process writes `probe: <json>` on stdout and reads commands on stdin:

- (on start) -> {"ready": [device ids]} once every agent holds its stream;
- `wait <version>` -> {"committed": version} once every device runs it;
- `start <t0>` -> from now on samples are stamped in seconds after `t0`
  (the soak's time.monotonic(): one clock for every process on the host);
- `stop` -> the soak is over: the telemetry held is drained, the fleets
  stop, and {"result": path}: a JSON file (`--out`) with every sample and
  every device's telemetry tally (megabytes: too long for a line); then
  the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import every_device_on
from bench.latencies import Latencies
from edgefleet.sim import Fleet, parse_profile

PREFIX = "probe: "
# Real devices each hold a connection of their own, and with `edgefleet
# server --workers N` the kernel spreads connections, not streams, over
# the workers: the probe's devices share a connection in tens, so that
# they sample every worker (fleetsim's default, 500, would put them all on
# one). The echo agents are connected the same way, to stay its baseline.
AGENTS_PER_CHANNEL = 10
REPO = Path(__file__).resolve().parents[1]
# The longest message line (the ready line lists every device id); past
# asyncio's default of 64 KiB a read fails and the child is never reaped.
LINE_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class TelemetryTally:
    """What one simulated device made of telemetry, for the soak's
    accounting (the attributes it reads of a SimAgent)."""

    name: str
    device_id: str
    telemetry_produced: int
    telemetry_dropped: int
    telemetry_seq: int
    pending_samples: int


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


async def _commands() -> Any:
    """stdin's lines, read on a thread (one command at a time)."""
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        yield line.strip()


async def run(args: argparse.Namespace) -> None:
    """The probe (see the module docstring)."""
    profile = parse_profile(json.loads(args.profile.read_text()))
    heartbeats = Latencies(time.monotonic())
    echo = Latencies(time.monotonic())
    fleet = Fleet(
        args.address, args.token, profile, n=args.agents, prefix=args.prefix, seed=args.seed,
        heartbeat_interval_s=args.heartbeat_s, telemetry_interval_s=args.telemetry_s,
        on_heartbeat_ack=lambda _, rtt: heartbeats.add(rtt),
        agents_per_channel=AGENTS_PER_CHANNEL,
    )  # fmt: skip
    echo_fleet = Fleet(
        args.echo_address, "echo", profile, n=args.echo_agents, prefix=f"{args.prefix}echo",
        seed=args.seed, heartbeat_interval_s=args.heartbeat_s, telemetry_interval_s=1e9,
        on_heartbeat_ack=lambda _, rtt: echo.add(rtt),
        agents_per_channel=AGENTS_PER_CHANNEL,
    )  # fmt: skip
    try:
        await fleet.start(timeout_s=args.timeout_s)
        await echo_fleet.start(timeout_s=args.timeout_s)
        # A few hundred agents make a small heap: the default thresholds
        # collect it in well under a millisecond, where the control plane's
        # large young generation (gc_policy) would stop this process for
        # tens of milliseconds at a time. Start-up's objects are frozen.
        gc.collect()
        gc.freeze()
        _emit({"ready": [a.device_id for a in fleet.agents]})
        ended = 0.0
        async for line in _commands():
            command, _, arg = line.partition(" ")
            if command == "wait":
                await _wait_version(fleet, arg, args.timeout_s)
                _emit({"committed": arg})
            elif command == "start":
                for series in (heartbeats, echo):
                    series.reset(float(arg))
            elif command == "stop":
                ended = time.monotonic() - heartbeats.t0
                break
            else:
                raise ValueError(f"the soak's probe got an unknown command {line!r}")
        fleet.drain_telemetry()
        with contextlib.suppress(TimeoutError):
            await fleet.wait_until(lambda f: f.pending_samples() == 0, args.drain_s, interval=0.5)
        args.out.write_text(json.dumps({
            "soak_s": ended,
            "sync": heartbeats.to_lists(),
            "echo": echo.to_lists(),
            "tallies": [asdict(_tally(a)) for a in fleet.agents],
            "uploads": fleet.ctx.stats.telemetry_uploads,
            "upload_failures": fleet.ctx.stats.telemetry_failures,
            "errors": dict(fleet.ctx.stats.errors),
        }))  # fmt: skip
        _emit({"result": str(args.out)})
    finally:
        await fleet.stop()
        await echo_fleet.stop()


class Probe:
    """The soak's side of a probe process: start it, then send it the
    soak's steps and read its answers (the module docstring)."""

    def __init__(self, process: asyncio.subprocess.Process, device_ids: list[str]) -> None:
        self.process = process
        self.device_ids = device_ids

    @classmethod
    async def start(
        cls,
        *,
        address: str,
        token: str,
        echo_address: str,
        profile: dict[str, Any],
        agents: int,
        echo_agents: int,
        prefix: str,
        heartbeat_s: float,
        telemetry_s: float,
        workdir: Path,
        timeout_s: float,
        drain_s: float,
    ) -> Probe:
        """Spawn the probe; returns once its agents hold their streams."""
        profile_path = workdir / "probe-profile.json"
        profile_path.write_text(json.dumps(profile))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.soak_probe", "--address", address, "--token", token,
            "--echo-address", echo_address, "--profile", str(profile_path),
            "--agents", str(agents), "--echo-agents", str(echo_agents), "--prefix", prefix,
            "--heartbeat-s", str(heartbeat_s), "--telemetry-s", str(telemetry_s),
            "--timeout-s", str(timeout_s), "--drain-s", str(drain_s),
            "--out", str(workdir / "probe-results.json"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            cwd=REPO, limit=LINE_LIMIT,
        )  # fmt: skip
        probe = cls(process, [])
        try:
            probe.device_ids = (await probe._answer("ready", timeout_s))["ready"]
        except BaseException:
            await probe.close()
            raise
        return probe

    async def _send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def _answer(self, key: str, timeout_s: float) -> dict[str, Any]:
        """The next message of the probe, which must carry `key`."""
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout_s):
            while True:
                line = (await self.process.stdout.readline()).decode()
                if not line:
                    code = await self.process.wait()
                    raise RuntimeError(f"the soak's probe exited ({code}) before it sent {key!r}")
                if line.startswith(PREFIX):
                    message: dict[str, Any] = json.loads(line[len(PREFIX) :])
                    if key not in message:
                        raise RuntimeError(f"the soak's probe sent {message}, not {key!r}")
                    return message

    async def wait_version(self, version: str, timeout_s: float) -> None:
        """Until every probe device has committed `version`."""
        await self._send(f"wait {version}")
        await self._answer("committed", timeout_s + 10)

    async def start_clock(self, t0: float) -> None:
        """Stamp samples from `t0` (time.monotonic()) on; earlier ones are dropped."""
        await self._send(f"start {t0!r}")

    async def finish(self, timeout_s: float) -> dict[str, Any]:
        """The soak is over: the probe drains, stops and reports."""
        await self._send("stop")
        path = Path((await self._answer("result", timeout_s))["result"])
        await self.close()
        result: dict[str, Any] = json.loads(await asyncio.to_thread(path.read_text))
        return result

    async def close(self) -> None:
        """Kill the probe if it still runs, and reap it (idempotent)."""
        if self.process.returncode is None:
            self.process.kill()
        # asyncio reaps a child only once its pipes are closed: read out
        # whatever it still wrote, or wait() would never return.
        assert self.process.stdout is not None
        await self.process.stdout.read()
        await self.process.wait()


async def _wait_version(fleet: Fleet, version: str, timeout_s: float) -> None:
    await fleet.wait_until(
        lambda f: every_device_on(f, version), timeout_s, interval=0.5,
        what=f"every probe device on {version}",
    )  # fmt: skip


def _tally(agent: Any) -> TelemetryTally:
    return TelemetryTally(
        agent.name, agent.device_id, agent.telemetry_produced, agent.telemetry_dropped,
        agent.telemetry_seq, agent.pending_samples,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--address", required=True)
    add("--token", required=True, help="the enrollment token")
    add("--echo-address", required=True)
    add("--profile", type=Path, required=True, help="the fleetsim profile, as JSON")
    add("--agents", type=int, required=True)
    add("--echo-agents", type=int, required=True)
    add("--prefix", required=True)
    add("--seed", default="bench-soak-probe")
    add("--heartbeat-s", type=float, required=True)
    add("--telemetry-s", type=float, required=True)
    add("--timeout-s", type=float, default=900.0)
    add("--drain-s", type=float, default=300.0)
    add("--out", type=Path, required=True, help="where the results go (JSON)")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
