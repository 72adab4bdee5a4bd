"""Agent-only install: its size against the full install's, and the idle
agent's memory from it.

Builds the wheel from this checkout and installs it, not editable, into
fresh virtual environments (testkit/wheel.py, shared with
tests/e2e/test_wheel.py): `edgefleet[onnxruntime]`, what a device needs to
run the agent (the base plus ONNX Runtime); `edgefleet[all]`, the full
install (server, CLI, TUI, both runtimes); and the base alone (an agent
with no runtime) for reference. Each one's site-packages is measured in MB
(10^6 bytes; file sizes, bytecode pip compiled included; the venvs have no
pip of their own). Then a control plane from the full venv, and agents
enrolled to it from the base, the agent-only venv and the development
install running this script, are left idle for --idle seconds; their RSS
(median of 5 samples 0.5 s apart, children included) is reported side by
side. Goal: the agent-only install's idle agent <= 40 MB.

    python -m bench.bench_agent_install            # ~1.5 min with a warm pip cache
    python -m bench.bench_agent_install --smoke    # CI: the dev install only, 0.5 s idle

--smoke builds and installs nothing (tests/e2e/test_wheel.py runs that
machinery in CI): it measures the development install against itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from testkit import wheel as wheel_kit
from testkit.wheel import Venv

GOAL_MB = 40.0
BASE = "edgefleet (the base: an agent with no runtime)"
AGENT_ONLY = "edgefleet[onnxruntime] (agent only)"
FULL = "edgefleet[all] (full)"
DEV = "dev install (editable, [dev,demo])"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--idle", type=float, default=10.0, help="idle seconds before sampling")
    parser.add_argument("--smoke", action="store_true", help="dev install only, 0.5 s idle")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    idle_s = 0.5 if args.smoke else args.idle

    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{datetime.date.today()}; idle {idle_s:g} s" + (" (smoke)" if args.smoke else ""),
        flush=True,
    )
    dev = Venv(Path(sys.prefix))
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-install-") as tmp:
        root = Path(tmp)
        if args.smoke:
            installs = {DEV: dev}
            server_venv = dev
        else:
            started = time.monotonic()
            wheel = wheel_kit.build_wheel(root)
            base = wheel_kit.make_venv(root / "base", wheel, None)
            agent_only = wheel_kit.make_venv(root / "agent", wheel, "onnxruntime")
            full = wheel_kit.make_venv(root / "full", wheel, "all")
            print(f"built and installed in {time.monotonic() - started:.0f} s", flush=True)
            installs = {BASE: base, AGENT_ONLY: agent_only, FULL: full, DEV: dev}
            server_venv = full
        for label, venv in installs.items():
            figures[label] = {"site_packages_mb": venv.site_packages_mb()}

        server = wheel_kit.start_server(server_venv, root / "server")
        agents: dict[str, wheel_kit.Agent] = {}
        try:
            for label, venv in installs.items():
                if label == FULL:  # its agent runs the agent-only install's code
                    continue
                token = wheel_kit.create_enrollment_token(server_venv, server.address)
                directory = root / f"agent-{len(agents)}"
                agents[label] = wheel_kit.start_agent(venv, directory, server.address, token)
            for agent in agents.values():
                agent.wait_synced()
            # Sampled one after the other; each has been idle at least idle_s.
            time.sleep(idle_s)
            for label, agent in agents.items():
                figures[label]["idle_rss_mb"] = wheel_kit.idle_rss_mb(agent.proc.pid, idle_s=0)
        finally:
            for agent in agents.values():
                wheel_kit.stop(agent.proc)
            wheel_kit.stop(server.proc)

    print(f"\n| install | site-packages | idle agent RSS (goal <= {GOAL_MB:.0f} MB) |")
    print("|---|---|---|")
    for label, row in figures.items():
        rss = row.get("idle_rss_mb")
        shown = "-" if rss is None else f"{rss:.1f} MB ({'met' if rss <= GOAL_MB else 'NOT met'})"
        print(f"| {label} | {row['site_packages_mb']:.0f} MB | {shown} |")
    if not args.smoke:
        size_ratio = figures[AGENT_ONLY]["site_packages_mb"] / figures[FULL]["site_packages_mb"]
        print(f"\nagent-only / full install size: {size_ratio:.2f}")
        rss_ratio = figures[AGENT_ONLY]["idle_rss_mb"] / figures[DEV]["idle_rss_mb"]
        print(f"agent-only / dev install idle RSS: {rss_ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
