"""Semantic versions (semver.org 2.0): validation and a sortable key."""

from __future__ import annotations

import re

from edgefleet.controlplane.errors import InvalidArgument

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


def validate(version: str) -> None:
    if not _SEMVER.match(version):
        raise InvalidArgument(
            f"version {version!r} is not a semantic version; use MAJOR.MINOR.PATCH "
            "such as 1.4.0 or 2.0.0-rc.1"
        )


def sort_key(version: str) -> str:
    """A string that sorts like the versions do (for ORDER BY in SQL).
    Release > pre-release of the same core; pre-release identifiers compare
    numerically when numeric. Build metadata is ignored, as semver says."""
    m = _SEMVER.match(version)
    if not m:
        raise InvalidArgument(f"version {version!r} is not a semantic version")
    core = ".".join(f"{int(m.group(i)):010d}" for i in (1, 2, 3))
    pre = m.group(4)
    if pre is None:
        return f"{core}~"  # '~' sorts after every pre-release character
    parts = [f"0{int(p):010d}" if p.isdigit() else f"1{p}" for p in pre.split(".")]
    return f"{core}-{'.'.join(parts)}"
