"""fleetsim: thousands of simulated EdgeFleet agents in one process.

Each simulated agent speaks the real device protocol (Enroll, Sync,
UploadTelemetry, optionally DownloadArtifact) against a real control plane,
with latency, error and failure figures drawn from a per-class profile
instead of real inference. For tests, benchmarks and demos; the CLI is
`edgefleet simulate`. A client of the control plane: it imports none of its
code, only the generated protocol.

    from edgefleet.sim import Fleet, load_profile

    fleet = Fleet("127.0.0.1:7443", token, load_profile(path), n=1000, prefix="lab")
    await fleet.start()
    ...
    await fleet.stop()

The profile format is described in fleetsim.profiles.
"""

from edgefleet.sim.agent import PROTOCOLS, FleetStats, SimAgent, SimModel, make_sample
from edgefleet.sim.fleet import Fleet, FleetError, FleetSummary
from edgefleet.sim.profiles import (
    Behaviour,
    ClassProfile,
    FleetProfile,
    ProfileError,
    default_profile,
    load_profile,
    parse_profile,
)

__all__ = [
    "PROTOCOLS",
    "Behaviour",
    "ClassProfile",
    "Fleet",
    "FleetError",
    "FleetProfile",
    "FleetStats",
    "FleetSummary",
    "ProfileError",
    "SimAgent",
    "SimModel",
    "default_profile",
    "load_profile",
    "make_sample",
    "parse_profile",
]
