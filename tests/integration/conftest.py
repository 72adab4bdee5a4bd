"""The integration tier's promise, enforced lightly: real databases and
in-process servers, but none of EdgeFleet's own programs (`edgefleet`,
`edgefleet-agent`, the demo) as processes; tests that start them are e2e.
Other programs are fine here: build tools, protoc, mount, a measuring child.
The guard is up for the whole of each test, fixture setup and teardown
included."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest

from testkit import tier_guard

PROGRAMS = {"edgefleet", "edgefleet-agent"}
# `python -m MODULE` forms of the same programs (testkit.fuzzing: a server).
MODULES = {
    "edgefleet.controlplane.cli", "edgefleet.agent.main", "edgefleet.demo.run_demo",
    "testkit.fuzzing",
}  # fmt: skip
MOVE = "integration tests start none of EdgeFleet's programs: move this test to tests/e2e"
_execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]


def _program(args: str | bytes | Sequence[Any]) -> str | None:
    """The EdgeFleet program `args` would start, or None."""
    argv = [os.fsdecode(a) for a in ([args] if isinstance(args, str | bytes) else args)]
    if argv and os.path.basename(argv[0]) in PROGRAMS:
        return os.path.basename(argv[0])
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] in MODULES:
        return argv[argv.index("-m") + 1]
    return None


def _guarded_execute_child(
    self: subprocess.Popen[Any], args: str | bytes | Sequence[Any], *rest: Any, **kwargs: Any
) -> None:
    program = _program(args)
    if program is not None:
        raise RuntimeError(f"{program}: {MOVE}")
    _execute_child(self, args, *rest, **kwargs)


def _guard(patch: pytest.MonkeyPatch) -> None:
    patch.setattr(subprocess.Popen, "_execute_child", _guarded_execute_child)


# Guarded while this tier's modules are imported and for each test (testkit.tier_guard).
(
    pytest_make_collect_report,
    pytest_runtest_setup,
    pytest_runtest_call,
    pytest_runtest_teardown,
) = tier_guard.hooks(_guard)
