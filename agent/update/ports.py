"""The ports the update machine drives, and the errors they raise.

The machine never speaks gRPC or loads a runtime; the daemon passes objects
implementing these Protocols (tests pass fakes). Every port error is
classified: FatalUpdateError (no retry) or RetryableUpdateError (back off and
try the same state again). ConnectionError and TimeoutError count as
retryable, and so does an OSError that says the disk is full; DiskFull (a
port's state file, e.g. active.json, could not be written) makes the machine
wait and run the step again (machine.py); any other exception from a port is
treated as fatal.

Contracts the real implementations must keep:
- Downloader.fetch starts at `offset` and yields Chunks in order; each chunk
  says where it starts and the artifact's total size (like ArtifactChunk). A
  source may ignore the offset and start at 0; download.py copes.
- Activator.activate loads and warms the new model, switches to it (in-flight
  requests finish on the old one) and keeps the old one as a warm standby; it
  persists which artifact is active atomically, so after a restart the daemon
  serves what active() says. rollback(previous) makes `previous` active again
  (None: no model) and must be idempotent; commit() drops the standby and must
  be idempotent too.
- Activator.shadow loads and warms the artifact as the shadow of its model
  name (requests are mirrored to it; the active model and what apps get do
  not change) and persists that, so a restart loads it again. commit() keeps
  the shadow (and its file); rollback(previous) and a later activate() drop
  it. Only one shadow is kept: a new one replaces the last.
- Trust.check verifies an assignment's signed statement against the trusted
  state and persists nothing; accept() persists what check() returned, once
  the manifest checks passed too; committed() records a committed version.
- Reporter.report must not raise (it buffers when the control plane is away);
  the machine ignores errors from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from edgefleet.agent.errors import AgentError

from .states import State

if TYPE_CHECKING:
    from .store import Assignment
    from .trust import TrustState


class UpdateError(AgentError):
    """A step of an update failed; `fatal` says whether retrying can help."""

    title = "Update failed"
    fatal = True


class FatalUpdateError(UpdateError):
    title = "Update failed"
    fatal = True


class RetryableUpdateError(UpdateError):
    title = "Update step will be retried"
    fatal = False


@dataclass(frozen=True)
class Chunk:
    offset: int
    data: bytes
    total_size: int


class Downloader(Protocol):
    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]: ...


@runtime_checkable
class MirroredDownloader(Downloader, Protocol):
    """A Downloader with sources it may stop trusting (mirrors)."""

    def distrust(self, digest: str) -> list[str]:
        """The mirrors that sent bytes of `digest` since its download last
        started from 0, skipped for it from now on; [] when none did (the
        control plane sent every byte: its word stands)."""
        ...


class Verifier(Protocol):
    def verify(
        self,
        path: Path,
        *,
        digest: str,
        manifest: bytes,
        signature: bytes,
        trusted_keys: Mapping[str, bytes] | None = None,
    ) -> None: ...


class Trust(Protocol):
    """The signed-statement checks and the trusted state (trust.py)."""

    def check(self, assignment: Assignment) -> TrustState: ...

    def accept(self, verified: TrustState) -> None: ...

    def committed(self, assignment: Assignment) -> None: ...


class Validator(Protocol):
    def validate(self, path: Path, manifest: bytes) -> None: ...


class Activator(Protocol):
    def active(self) -> str | None: ...

    def activate(self, path: Path, manifest: bytes) -> None: ...

    def shadow(self, path: Path, manifest: bytes) -> None: ...

    def rollback(self, previous: str | None) -> None: ...

    def commit(self) -> None: ...


class Reporter(Protocol):
    def report(
        self, state: State, bytes_done: int, bytes_total: int, reason: str | None
    ) -> None: ...


@dataclass(frozen=True)
class Ports:
    downloader: Downloader
    verifier: Verifier
    validator: Validator
    activator: Activator
    reporter: Reporter
    # Injected so tests neither wait nor depend on the host's free space.
    sleep: Callable[[float], None] = time.sleep
    # The agent always has one; None only in tests of the other states
    # (assignments then go unchecked beyond their manifest).
    trust: Trust | None = None
    # The artifact digests other models on the device still need (their
    # active, standby, shadow or in-flight artifacts): Failed must not
    # delete a shared download.
    shared: Callable[[], set[str]] = set
    # The artifact digests this model's own records still name (its active,
    # standby and shadow versions', fallbacks included: ActiveStore.digests),
    # which Failed must not delete either.
    kept: Callable[[], set[str]] = set
