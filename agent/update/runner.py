"""Reconciling the device with its assignment: the update machine's thread.

The daemon hands over the newest assignment from each desired state
(`submit`); the thread compares it with what the machine last took on and
plans the next step:

- another assignment (another sequence) while the machine is idle: take it
  on (assign). An older sequence is taken on too, so that Verifying refuses
  it against the trusted state and reports why (a replay); deciding here
  from the update record would trust what was never verified (a refused
  assignment with a huge sequence would block every later one);
- a newer assignment while an update runs: abort that update (honoured
  before activation; after it, the update finishes) and take the new one
  once the machine settled; an older one waits until it settled. A
  download under way is interrupted at its next bytes (submit runs on the
  daemon's thread while this one is inside the download);
- otherwise, while an update runs (also one resumed after a restart): step.

The same sequence is the same assignment (a statement signed again after a
key rotation, for one): nothing to do.

Unassigning (`unassign`, the model left the desired state): an update in
an abortable state is aborted, one past Validating is let settle (it
finishes or rolls back); once the machine is idle the `remove` callback
unloads the model and deletes its records (removal.py), and the thread
ends. The caller persisted the intent before (layout.REMOVING_FILE), so a
restart in the middle finishes it.

There is one runner (and one thread) per model a device holds; they run
concurrently and share only the downloads directory.

The machine blocks (downloads, validation in a child process, loading a
model), so it runs here and never on the event loop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edgefleet.agent.errors import StateError

from .machine import UpdateMachine
from .states import ABORTABLE, State
from .store import Assignment

log = logging.getLogger(__name__)

# After the update record could not be read or written for a reason other
# than a full disk (the machine waits for room itself), wait this long.
STATE_ERROR_PAUSE_S = 10.0


class UpdateRunner:
    """Runs `machine` on a daemon thread until `stop()` (or until the model
    was removed: `unassign`). `remove` unloads the model and deletes its
    records; `name` names the thread."""

    def __init__(
        self,
        machine: UpdateMachine,
        *,
        name: str = "update",
        remove: Callable[[str], None] | None = None,
    ) -> None:
        self.machine = machine
        self._wanted: Assignment | None = None
        self._changed = threading.Condition()
        self._stopped = threading.Event()
        self._remove = remove
        # Why the model is being removed; None while it is assigned.
        self._removing: str | None = None
        # Set once the removal is done (the thread then ends).
        self.removed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the thread to stop after its current step; wait `timeout`.
        A step that blocks longer (a download) is abandoned with the process:
        the record on disk lets the next start resume it."""
        self._stopped.set()
        with self._changed:
            self._changed.notify_all()
        self._thread.join(timeout)

    def wait(self, timeout: float) -> None:
        """Sleep up to `timeout` unless stopped (the machine's backoff sleeps
        through this, so stopping cuts it short)."""
        self._stopped.wait(timeout)

    def unassign(self, reason: str) -> None:
        """Remove the model once its machine settled (module docstring)."""
        with self._changed:
            self._removing = reason
            self.machine.interrupt()  # a download need not finish first
            self._changed.notify_all()

    @property
    def removing(self) -> str | None:
        """Why the model is being removed; None while it is assigned."""
        return self._removing

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, assignment: Assignment) -> None:
        """The assignment of the newest desired state (the same sequence
        again is ignored)."""
        with self._changed:
            if self._wanted is None or assignment.sequence != self._wanted.sequence:
                self._wanted = assignment
                running = self.machine.record.assignment
                if running is not None and assignment.sequence > running.sequence:
                    # A download of what is now superseded stops at its next
                    # bytes, however slow its source (it is aborted next).
                    self.machine.interrupt()
                self._changed.notify_all()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                if not self._plan_and_act():
                    with self._changed:
                        self._changed.wait(timeout=1.0)
            except StateError as exc:
                log.error("update: %s; retrying in %.0f s", exc.message, STATE_ERROR_PAUSE_S)
                self._stopped.wait(STATE_ERROR_PAUSE_S)
            except Exception:
                # A bug must not kill the thread that installs fixes for it.
                log.exception("update machine step failed")
                self._stopped.wait(STATE_ERROR_PAUSE_S)

    def _plan_and_act(self) -> bool:
        """One step of reconciliation; False when there is nothing to do."""
        machine = self.machine
        record = machine.record
        with self._changed:
            wanted = self._wanted
            removing = self._removing
        taken = record.assignment.sequence if record.assignment else 0
        # An unsaved record (a full disk) keeps stepping until it is written.
        busy = record.pending or machine.state is not State.IDLE or machine.unsaved
        if removing is not None:
            if busy:
                if record.abort_reason is None and (
                    machine.state in ABORTABLE or machine.state is State.IDLE
                ):
                    machine.abort(f"unassigned: {removing}")
                if record.pending or machine.state is not State.IDLE or machine.unsaved:
                    machine.step()
                return True
            if self._remove is not None:
                self._remove(removing)
            self.removed.set()
            self._stopped.set()
            return False
        if wanted is not None and wanted.sequence != taken:
            if not busy:
                log.info(
                    "assignment %d: %s %s (%s)",
                    wanted.sequence,
                    wanted.model_name,
                    wanted.model_version,
                    wanted.artifact_digest[:12],
                )
                machine.assign(wanted)
                return True
            if wanted.sequence > taken and record.abort_reason is None:
                machine.abort(f"superseded by assignment {wanted.sequence}")
        if busy:
            machine.step()
            return True
        return False
