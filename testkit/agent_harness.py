"""Runs the real `edgefleet-agent` as a subprocess for end-to-end tests.

Each AgentProcess gets its own directory (config, state, log) and its own
hardware id, so several agents can run on one machine as different devices.
Observation is through the files the agent persists (identity.json,
desired.json) and its log, never through its internals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from edgefleet.agent.update.faults import FAULT_ENV
from edgefleet.polling import wait_for as wait_for  # re-exported for the tests

T = TypeVar("T")

AGENT_EXECUTABLE = Path(sys.executable).parent / "edgefleet-agent"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # JSON string escapes are valid TOML basic-string escapes.
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: Mapping[str, Any]) -> str:
    """Enough TOML for agent configs: scalars, tables, arrays of tables."""
    lines: list[str] = []

    def emit(prefix: str, table: Mapping[str, Any]) -> None:
        nested: list[tuple[str, Any]] = []
        for key, value in table.items():
            if value is None:
                continue
            if isinstance(value, Mapping) or (
                isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value)
            ):
                nested.append((key, value))
            else:
                lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
        for key, value in nested:
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                lines.append(f"\n[{name}]")
                emit(f"{name}.", value)
            else:
                for item in value:
                    lines.append(f"\n[[{name}]]")
                    emit(f"{name}.", item)

    emit("", config)
    return "\n".join(lines) + "\n"


class AgentProcess:
    """`edgefleet-agent --config <dir>/agent.toml` in a subprocess.

    `config` entries are written to the TOML file on top of the defaults
    (server, enrollment token, state dir, unique hardware id, quick backoff);
    None removes a key. stdout and stderr go to `<dir>/agent.log`.
    """

    def __init__(
        self,
        directory: Path,
        server: str,
        enrollment_token: str | None,
        *,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        hardware: Mapping[str, Any] | None = None,
        **config: Any,
    ) -> None:
        self.directory = directory
        self.state_dir = directory / "state"
        self.config_path = directory / "agent.toml"
        self.log_path = directory / "agent.log"
        self.hardware_id = f"test-{uuid.uuid4().hex}"
        self.config: dict[str, Any] = {
            "server": server,
            "enrollment_token": enrollment_token,
            "state_dir": str(self.state_dir),
            "hardware_id": self.hardware_id,
            "name": name,
            "heartbeat_interval_s": 1,
            # Quick reconnects keep restart tests short; the max still bounds
            # how long a test waits after a refusal.
            "backoff_initial_s": 0.1,
            "backoff_max_s": 2,
            "labels": dict(labels or {}),
            "hardware": dict(hardware or {}),
        }
        # Plain text unless the test gives the control plane's CA certificate.
        if "ca_cert" not in config:
            self.config["insecure"] = True
        self.config.update(config)
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ lifecycle

    def write_config(self) -> None:
        """(Re)write the TOML file from `self.config`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.config))

    def start(
        self, *args: str, env: Mapping[str, str] | None = None, fault_pause: str | None = None
    ) -> AgentProcess:
        """Write the config and start the agent (with `env` added to its
        environment); returns self. With `fault_pause` (a state's name, or
        faults.VERIFIED) its update machine stops for good at that point
        (agent/update/faults.py), for a test to kill it there."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.write_config()
        child_env = {
            key: value
            for key, value in os.environ.items()
            # The test's environment must not override the file or inject
            # faults, and gRPC honours proxy variables, which would send
            # loopback traffic away.
            if not key.startswith("EDGEFLEET_AGENT_")
            and key != FAULT_ENV
            and "proxy" not in key.lower()
        }
        child_env.update(env or {})
        if fault_pause is not None:
            child_env[FAULT_ENV] = fault_pause
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                [str(AGENT_EXECUTABLE), "--config", str(self.config_path), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
            )
        finally:
            log.close()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, and return the exit code (SIGKILL after `timeout`)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            raise

    def kill(self) -> None:
        """SIGKILL, as a power cut would."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(15)

    def close(self) -> None:
        """Kill the process if it still runs (for fixture teardown)."""
        if self.running:
            self.kill()

    # ------------------------------------------------------------ observation

    def _json(self, name: str) -> dict[str, Any] | None:
        try:
            document = json.loads((self.state_dir / name).read_text())
        except FileNotFoundError:
            return None
        assert isinstance(document, dict)
        return document

    def identity(self) -> dict[str, Any] | None:
        """Parsed identity.json, or None before enrollment."""
        return self._json("identity.json")

    def desired(self) -> dict[str, Any] | None:
        """Parsed desired.json (the last applied DesiredState), or None."""
        return self._json("desired.json")

    def log(self) -> str:
        """Everything the agent wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(
        self, predicate: Callable[[], T | Literal[False] | None], timeout: float = 30.0
    ) -> T:
        """Like edgefleet.polling.wait_for, but fails at once with the log if
        the agent exits, and includes the log in the failure message."""

        def check() -> T | Literal[False] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}")
            return predicate()

        try:
            return wait_for(check, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- agent log ---\n{self.log()}") from None
