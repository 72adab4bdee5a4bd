"""Fault injection for crash tests: with EDGEFLEET_TEST_AGENT_FAULT_PAUSE=<state>
the update machine stops inside that state's work and waits forever, after
writing <state_dir>/fault-paused (holding the state's name), so a test can
kill -9 the agent at a known point and check what it does on restart.

Where each state pauses is the most damaging point inside it:
- downloading: after the first chunk was written (a partial file on disk);
- verifying, validating, rolling_back, committed: before the port's work;
- activating: after the new model was switched in and recorded as active
  (or loaded and recorded as the shadow), before the machine moved on (the
  switch happened, the commit did not);
- verified (not a state): inside Verifying, after every check passed and
  before the trusted state is written (trust.json must still be the old one).

`<state>@<model>` pauses only that model's machine (the others go on).

Never set in production; the agent logs loudly when it is. Only
`edgefleet-agent`'s entry point (agent/main.py) reads the variable; the
Agent takes the wrapped ports as an argument, and testkit's AgentProcess
sets the variable for the tests that ask for a pause."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from edgefleet.fsutil import atomic_write

from .ports import Activator, Chunk, Downloader, Ports, Trust, Validator, Verifier
from .states import State
from .store import Assignment
from .trust import TrustState

# Not EDGEFLEET_AGENT_*: that prefix overrides config keys, and this is no setting.
FAULT_ENV = "EDGEFLEET_TEST_AGENT_FAULT_PAUSE"
MARKER_FILE = "fault-paused"
VERIFIED = "verified"

log = logging.getLogger(__name__)


def pause_forever(state_dir: Path, point: str) -> None:
    """Record where the machine stopped, then block this thread for good."""
    log.warning("fault injection: pausing in %s", point)
    atomic_write(state_dir / MARKER_FILE, point.encode())
    threading.Event().wait()


def with_pause(ports: Ports, point: str, state_dir: Path) -> Ports:
    """`ports` with a pause at `point` (a state's name, or VERIFIED)."""

    def pause() -> None:
        pause_forever(state_dir, point)

    if point == VERIFIED:
        if ports.trust is None:
            raise ValueError(f"{VERIFIED}: the ports have no trust store to pause in")
        inner_trust: Trust = ports.trust

        class _Trust:
            def check(self, assignment: Assignment) -> TrustState:
                return inner_trust.check(assignment)

            def accept(self, verified: TrustState) -> None:
                pause()
                inner_trust.accept(verified)

            def committed(self, assignment: Assignment) -> None:
                inner_trust.committed(assignment)

        return dataclasses.replace(ports, trust=_Trust())
    state = State(point)

    downloader: Downloader = ports.downloader
    verifier: Verifier = ports.verifier
    validator: Validator = ports.validator
    activator: Activator = ports.activator
    if state is State.DOWNLOADING:
        inner_downloader = ports.downloader

        class _Downloader:
            def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
                for index, chunk in enumerate(inner_downloader.fetch(digest, offset)):
                    if index == 1:
                        pause()  # the first chunk is on disk by now
                    yield chunk

        downloader = _Downloader()
    elif state is State.VERIFYING:
        inner_verifier = ports.verifier

        class _Verifier:
            def verify(
                self,
                path: Path,
                *,
                digest: str,
                manifest: bytes,
                signature: bytes,
                trusted_keys: Mapping[str, bytes] | None = None,
            ) -> None:
                pause()
                inner_verifier.verify(
                    path,
                    digest=digest,
                    manifest=manifest,
                    signature=signature,
                    **({} if trusted_keys is None else {"trusted_keys": trusted_keys}),
                )

        verifier = _Verifier()
    elif state is State.VALIDATING:
        inner_validator = ports.validator

        class _Validator:
            def validate(self, path: Path, manifest: bytes) -> None:
                pause()
                inner_validator.validate(path, manifest)

        validator = _Validator()
    elif state in (State.ACTIVATING, State.COMMITTED, State.ROLLING_BACK):
        inner = ports.activator

        class _Activator:
            def active(self) -> str | None:
                return inner.active()

            def activate(self, path: Path, manifest: bytes) -> None:
                inner.activate(path, manifest)
                if state is State.ACTIVATING:
                    pause()

            def shadow(self, path: Path, manifest: bytes) -> None:
                inner.shadow(path, manifest)
                if state is State.ACTIVATING:
                    pause()

            def rollback(self, previous: str | None) -> None:
                if state is State.ROLLING_BACK:
                    pause()
                inner.rollback(previous)

            def commit(self) -> None:
                if state is State.COMMITTED:
                    pause()
                inner.commit()

        activator = _Activator()
    return dataclasses.replace(
        ports, downloader=downloader, verifier=verifier, validator=validator, activator=activator
    )
