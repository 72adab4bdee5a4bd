"""The pytest hooks that hold a test tier to its promise (tests/unit: no
sockets or subprocesses; tests/integration: none of EdgeFleet's programs as
processes). Each tier's conftest.py says what its guard refuses; the hooks
here keep the guard up while pytest imports the tier's test modules and for
the whole of each test, fixture setup and teardown included. Hooks in a
conftest apply only to the tests under its directory."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import pytest

Guard = Callable[[pytest.MonkeyPatch], None]
Wrapper = Callable[..., Generator[None, object, object]]


def _guarded(guard: Guard) -> Generator[None, object, object]:
    patch = pytest.MonkeyPatch()
    guard(patch)
    try:
        return (yield)
    finally:
        patch.undo()


def hooks(guard: Guard) -> tuple[Wrapper, Wrapper, Wrapper, Wrapper]:
    """pytest_make_collect_report (module-level code, run at import),
    pytest_runtest_setup, pytest_runtest_call and pytest_runtest_teardown,
    each with `guard` up; a conftest assigns them to those names."""

    @pytest.hookimpl(wrapper=True)
    def wrapper(*_args: Any, **_kwargs: Any) -> Generator[None, object, object]:
        return (yield from _guarded(guard))

    return wrapper, wrapper, wrapper, wrapper
