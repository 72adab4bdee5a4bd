"""Fault injection for crash tests: with EDGEFLEET_AGENT_FAULT_PAUSE=<state>
the update machine stops inside that state's work and waits forever, after
writing <state_dir>/fault-paused (holding the state's name), so a test can
kill -9 the agent at a known point and check what it does on restart.

Where each state pauses is the most damaging point inside it:
- downloading: after the first chunk was written (a partial file on disk);
- verifying, validating, rolling_back, committed: before the port's work;
- activating: after the new model was switched in and recorded as active
  (or loaded and recorded as the shadow), before the machine moved on (the
  switch happened, the commit did not).

Never set in production; the agent logs loudly when it is."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from agent.identity import atomic_write

from .ports import Activator, Chunk, Downloader, Ports, Validator, Verifier
from .states import State

FAULT_ENV = "EDGEFLEET_AGENT_FAULT_PAUSE"
MARKER_FILE = "fault-paused"

log = logging.getLogger(__name__)


def pause_forever(state_dir: Path, state: State) -> None:
    """Record where the machine stopped, then block this thread for good."""
    log.warning("fault injection: pausing in %s", state.value)
    atomic_write(state_dir / MARKER_FILE, state.value.encode())
    threading.Event().wait()


def with_pause(ports: Ports, state: State, state_dir: Path) -> Ports:
    """`ports` with a pause inside `state`'s work."""

    def pause() -> None:
        pause_forever(state_dir, state)

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
            def verify(self, path: Path, *, digest: str, manifest: bytes, signature: bytes) -> None:
                pause()
                inner_verifier.verify(path, digest=digest, manifest=manifest, signature=signature)

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
