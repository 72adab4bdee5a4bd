"""Which extra a part of EdgeFleet needs, checked before the part imports it.

The base install is what a device needs to run the agent; the control plane,
the operators' CLI, the terminal UI and the inference runtimes are extras
(pyproject.toml). A part whose extra is not installed says so in one line
naming what to install, instead of a ModuleNotFoundError from deep inside it:

    edgefleet.tui needs the 'tui' extra (textual is not installed): pip install 'edgefleet[tui]'

The check uses importlib.util.find_spec, which locates a top-level module
without importing it, so a guard costs a few directory lookups and no memory.
The console entry points print the line and exit 2."""

from __future__ import annotations

import importlib.util

DISTRIBUTION = "edgefleet"
# The top-level modules each extra installs itself (pyproject.toml; an extra
# that includes another, like server including cli, lists only its own), so
# a guard can check a whole extra. tests/unit/test_extras.py holds this to
# pyproject.toml.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime",),
    "litert": ("ai_edge_litert",),
    "tflite-runtime": ("tflite_runtime",),
    "cli": ("click", "rich", "httpx"),
    "server": (
        "grpc_health",
        "grpc_reflection",
        "sqlalchemy",
        "alembic",
        "psycopg",
        "onnx",
        "onnxconverter_common",
        "aiohttp",
    ),
    "tui": ("textual", "textual_plotext"),
    # The demo fleet trains its model on scikit-learn's digits.
    "demo": ("sklearn",),
}


def install_command(extra: str) -> str:
    """The pip command that installs `extra`."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def needs(part: str, extra: str, missing: tuple[str, ...] = ()) -> str:
    """One line: `part` needs `extra` (naming the `missing` modules), and how
    to install it."""
    why = ""
    if missing:
        # At most three names, so that the line stays one a terminal shows whole.
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        verb = "is" if len(missing) == 1 else "are"
        why = f" ({', '.join(missing[:3])}{more} {verb} not installed)"
    return f"{part} needs the '{extra}' extra{why}: {install_command(extra)}"


class MissingExtra(ImportError):
    """`part` cannot be imported: modules its extra installs are missing. The
    message is one line saying which extra to install."""

    def __init__(self, part: str, extra: str, missing: tuple[str, ...]) -> None:
        super().__init__(needs(part, extra, missing), name=missing[0])
        self.part = part
        self.extra = extra
        self.missing = missing


def is_installed(module: str) -> bool:
    """Whether the top-level `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a loaded module without __spec__
        return False


def missing_modules(*modules: str) -> tuple[str, ...]:
    """Those of the top-level `modules` that are not installed."""
    return tuple(module for module in modules if not is_installed(module))


def require(extra: str, *modules: str, part: str) -> None:
    """Raise MissingExtra unless every one of `modules` (top-level import
    names that `extra` installs; none given: all of EXTRA_MODULES[extra]) is
    installed. `part` names what needs them."""
    if missing := missing_modules(*(modules or EXTRA_MODULES[extra])):
        raise MissingExtra(part, extra, missing)
