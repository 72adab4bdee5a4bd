"""`edgefleet-agent`: the console entry point. Thin: parse arguments, load the
config, set up logging, run the daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.config import default_config_path, env_var, load_config
from agent.daemon import serve
from agent.errors import ConfigError
from agent.hardware import agent_version

LOG_LEVELS = ("debug", "info", "warning", "error")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet-agent",
        description="EdgeFleet device agent: enrolls this device and keeps it in sync "
        "with the control plane.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help=f"TOML config file (default: ${env_var('config')}, else "
        "/etc/edgefleet-agent/agent.toml when it exists). Every key can be overridden "
        "by EDGEFLEET_AGENT_<KEY>.",
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="default: %(default)s"
    )
    parser.add_argument("--version", action="version", version=agent_version() or "unknown")
    return parser


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent; the process exit status (0 after SIGTERM/SIGINT, 2 on a
    configuration error, 1 on another fatal error)."""
    # Until the event loop installs its own handlers, a stop request (systemd
    # stopping a unit that just started) is still a clean stop, not a crash.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    args = _parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # grpc's own loggers repeat every failed call at INFO; ours says it once.
    logging.getLogger("grpc").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        config = load_config(args.config or default_config_path())
    except ConfigError as exc:
        print(f"edgefleet-agent: {exc.message}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
