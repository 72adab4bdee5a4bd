"""`edgefleet-agent`: the console entry point. Thin: parse arguments, load the
config, set up logging, run the daemon; or, as `edgefleet-agent predict ...`,
run one inference on the running agent (agent/predict_cli.py).

It is also the one place that reads the crash tests' fault-injection
variable (agent/update/faults.py): the daemon only takes what it is given."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgefleet.agent.config import AgentConfig, default_config_path, env_var, load_config
from edgefleet.agent.daemon import UpdateFaults, serve
from edgefleet.agent.errors import ConfigError
from edgefleet.agent.hardware import agent_version
from edgefleet.agent.update.faults import FAULT_ENV, with_pause
from edgefleet.agent.update.ports import Ports
from edgefleet.extras import MissingExtra

log = logging.getLogger("edgefleet.agent")

LOG_LEVELS = ("debug", "info", "warning", "error")


class _VersionAction(argparse.Action):
    """`--version`, with the version looked up only when asked for: reading
    package metadata imports importlib.metadata, which the running agent
    would keep for nothing (~1 MB of RSS; docs/benchmarks.md)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show program's version number and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        print(agent_version() or "unknown")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet-agent",
        description="EdgeFleet device agent: enrolls this device and keeps it in sync "
        "with the control plane. `edgefleet-agent predict --help`: run one inference "
        "on the agent running here.",
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
    parser.add_argument("--version", action=_VersionAction)
    return parser


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def update_faults_from_env(config: AgentConfig) -> UpdateFaults | None:
    """The update machines' fault injection that a crash test asked for with
    FAULT_ENV=<point> (every model's machine) or <point>@<model> (that
    model's only); None (always, in production) when it is not set."""
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    log.warning("%s=%s: update fault injection is ON (tests only)", FAULT_ENV, value)
    point, _, only = value.partition("@")

    def pause_at_point(model_name: str, ports: Ports) -> Ports:
        if only and model_name != only:
            return ports
        return with_pause(ports, point, config.state_dir)

    return pause_at_point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent; the process exit status (0 after SIGTERM/SIGINT, 2 on a
    configuration error or a missing extra, 1 on another fatal error)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["predict"]:
        # A client of the running agent, not the daemon (agent/predict_cli.py).
        from edgefleet.agent.predict_cli import main as predict

        return predict(arguments[1:])
    # Until the event loop installs its own handlers, a stop request (systemd
    # stopping a unit that just started) is still a clean stop, not a crash.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    args = _parser().parse_args(arguments)
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
    try:
        return asyncio.run(serve(config, update_faults=update_faults_from_env(config)))
    except MissingExtra as missing:  # a part of EdgeFleet this install lacks: one line
        print(missing, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
