"""The device-credential cache (services/auth.DeviceCredentials) over a fake
database port: a hit skips the lookup, a change of the device drops it, and
a lookup that raced a change is answered but not kept."""

from __future__ import annotations

from typing import Any

import pytest

from edgefleet.controlplane.services import auth
from edgefleet.controlplane.services.auth import DeviceCredentials, DevicePrincipal
from edgefleet.controlplane.services.events import FleetEvent

CREDENTIAL = "Bearer efd_dev1.secret"
REJECTED = FleetEvent("device.updated", ("dev1",), desired_changed=True, subject="reject")


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def lookup(db: Any, authorization: str | None) -> DevicePrincipal:
        calls.append(str(authorization))
        return DevicePrincipal("dev1", "accepted")

    monkeypatch.setattr(auth, "authenticate_device", lookup)
    return calls


def test_a_hit_skips_the_lookup_until_the_device_changes_or_the_ttl_ends(
    lookups: list[str],
) -> None:
    now = [0.0]
    cache = DeviceCredentials(None, ttl_s=300, clock=lambda: now[0])  # type: ignore[arg-type]
    assert cache.cached(CREDENTIAL) is None
    cache.authenticate(CREDENTIAL)
    assert cache.cached(CREDENTIAL) == DevicePrincipal("dev1", "accepted")
    # A status report is not a change of who the device is.
    cache.on_event(FleetEvent("device.updated", ("dev1",)))
    assert cache.cached(CREDENTIAL) is not None
    cache.on_event(REJECTED)
    assert cache.cached(CREDENTIAL) is None
    now[0] = 1.0
    cache.authenticate(CREDENTIAL)
    now[0] = 301.5
    assert cache.cached(CREDENTIAL) is None  # expired
    assert len(lookups) == 2


def test_a_lookup_that_raced_a_rejection_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = DeviceCredentials(None, clock=lambda: 5.0)  # type: ignore[arg-type]

    def lookup(db: Any, authorization: str | None) -> DevicePrincipal:
        # The row was read as accepted; the rejection lands before we store it.
        cache.on_event(REJECTED)
        return DevicePrincipal("dev1", "accepted")

    monkeypatch.setattr(auth, "authenticate_device", lookup)
    cache.authenticate(CREDENTIAL)
    assert cache.cached(CREDENTIAL) is None
