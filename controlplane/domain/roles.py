"""Operator roles, from least to most trusted. Each operator RPC names the
least role it needs; a token's role allows its own and every lesser one."""

from __future__ import annotations

VIEWER = "viewer"  # reads the fleet: listings, telemetry, the audit log, watch
OPERATOR = "operator"  # also changes it: devices, classes, models, builds, rollouts
ADMIN = "admin"  # also manages who may: operator tokens
ROLES = (VIEWER, OPERATOR, ADMIN)


def allows(held: str, needed: str) -> bool:
    """Whether a token with role `held` may do what needs `needed`."""
    return held in ROLES and ROLES.index(held) >= ROLES.index(needed)
