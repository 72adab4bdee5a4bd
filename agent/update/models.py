"""The models a device holds: one update machine (and runner thread) per
model name, made on demand, and the unassigning of a model that left the
desired state.

`ModelUpdates.apply` takes the assignments of a desired state (at most one
per model name): each goes to its model's runner (made the first time the
model is named); with `remove_others`, a model the device holds that is not
listed is removed. Removal is persisted first (models/<name>/removing), then
handed to the model's runner, which aborts or settles its update, and calls
`remove_model` (below): unload from the ModelHost (requests in flight finish
on the object they hold), keep the model's trust facts device-wide, delete
its downloads no other model needs, delete its directory, and publish a last
status (Idle, nothing active). A model assigned again while its removal runs
starts afresh once the removal finished.

At boot, `start` migrates the single-model layout (layout.py), makes a
runner for each model with records (resuming its update) and finishes any
removal a restart interrupted."""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.errors import StateError
from edgefleet.fsutil import atomic_write
from edgefleet.v1 import common_pb2

from .activation import HostActivator, Installed
from .download import artifact_path, part_path
from .fallback import assignment_digests
from .layout import (
    REMOVING_FILE,
    InvalidModelName,
    check_model_name,
    held_models,
    migrate_single_model_layout,
    model_dir,
)
from .machine import UpdateMachine
from .remote import StatusReporter
from .runner import UpdateRunner
from .store import Assignment
from .trust import TrustStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelUpdate:
    """One model's update machine, its runner thread and its ports that the
    rest of the agent talks to."""

    name: str
    machine: UpdateMachine
    runner: UpdateRunner
    reporter: StatusReporter
    activator: HostActivator
    trust: TrustStore | None


# Makes a model's parts (not started); the removal callback goes to its runner.
Build = Callable[[str, Callable[[str], None]], ModelUpdate]


def removal_pending(state_dir: Path, name: str) -> str | None:
    """Why model `name`'s removal is under way (persisted), or None."""
    try:
        return (model_dir(state_dir, name) / REMOVING_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read the removal record of {name}: {exc}") from exc


def mark_removal(state_dir: Path, name: str, reason: str) -> None:
    """Persist that `name` is to be removed, before any of it happens."""
    directory = model_dir(state_dir, name)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(directory / REMOVING_FILE, reason.encode())
    except OSError as exc:
        raise StateError(f"cannot record the removal of {name}: {exc}") from exc


def remove_model(
    state_dir: Path,
    update: ModelUpdate,
    *,
    others_use: Callable[[], set[str]],
) -> None:
    """Unload `update`'s model and delete what only it used (module
    docstring). Idempotent: a restart in the middle runs it again."""
    name = update.name
    host = update.activator.host
    # Requests in flight hold the LoadedModel they started on and finish on
    # it; new requests get ModelNotFound from now on.
    host.drop_shadow(name)
    host.remove(name)
    if update.trust is not None:
        update.trust.retire()
    mine = update.activator.store.digests()
    record = update.machine.record
    if record.assignment is not None:
        mine |= assignment_digests(record.assignment)
    keep = others_use()
    for digest in mine - keep:
        for path in (artifact_path(state_dir, digest), part_path(state_dir, digest)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    directory = model_dir(state_dir, name)
    # The removal record goes last: until then a restart finishes the job.
    for path in sorted(directory.iterdir(), key=lambda p: p.name == REMOVING_FILE):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()
    log.info("model %s unloaded and removed", name)


class ModelUpdates:
    """Every model's update machine on its own thread (module docstring)."""

    def __init__(self, state_dir: Path, build: Build) -> None:
        self.state_dir = state_dir
        self._build = build
        self._lock = threading.RLock()
        self._models: dict[str, ModelUpdate] = {}
        # Assignments of models whose removal is still running.
        self._after_removal: dict[str, Assignment] = {}
        self._stopped = False

    # ------------------------------------------------------------ boot

    def load(self) -> list[Installed]:
        """Migrate the old layout and make (not start) each held model's
        machine; restore what each one serves. Blocking (loads models)."""
        migrate_single_model_layout(self.state_dir)
        served = []
        for name in held_models(self.state_dir):
            update = self._make(name)
            try:
                installed = update.activator.restore()
            except StateError as exc:
                log.error("model %s: %s", name, exc.message)
                installed = None
            if installed is not None:
                served.append(installed)
        return served

    def start(self) -> None:
        """Start every runner made so far, and resume interrupted removals."""
        with self._lock:
            updates = list(self._models.values())
        for update in updates:
            update.runner.start()
            reason = removal_pending(self.state_dir, update.name)
            if reason is not None:
                log.info("finishing the removal of model %s", update.name)
                update.runner.unassign(reason)

    def _make(self, name: str) -> ModelUpdate:
        def remove(reason: str) -> None:
            self._removed(name, reason)

        update = self._build(name, remove)
        with self._lock:
            self._models[name] = update
        return update

    # ------------------------------------------------------------ queries

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def get(self, name: str) -> ModelUpdate | None:
        with self._lock:
            return self._models.get(name)

    def statuses(self) -> list[common_pb2.UpdateStatus]:
        """Every held model's status as of now (for a Hello), by name."""
        with self._lock:
            updates = [self._models[name] for name in sorted(self._models)]
        return [u.reporter.current() for u in updates if u.runner.removing is None]

    def in_use(self, exclude: str | None = None) -> set[str]:
        """The artifact digests the models' records name (active, standby,
        shadow, and the update in flight; fallbacks included), but `exclude`'s."""
        with self._lock:
            updates = [u for n, u in self._models.items() if n != exclude]
        digests: set[str] = set()
        for update in updates:
            digests |= update.activator.store.digests()
            record = update.machine.record
            if record.assignment is not None:
                digests |= assignment_digests(record.assignment)
        return digests

    # ------------------------------------------------------------ changes

    def apply(
        self, assignments: Iterable[Assignment], *, remove_others: bool, reason: str = ""
    ) -> None:
        """Hand each assignment to its model's runner; with `remove_others`,
        unassign every held model not among them."""
        wanted: dict[str, Assignment] = {}
        for assignment in assignments:
            try:
                check_model_name(assignment.model_name)
            except InvalidModelName as exc:
                log.error("ignoring assignment %d: %s", assignment.sequence, exc.message)
                continue
            wanted[assignment.model_name] = assignment
        with self._lock:
            if self._stopped:
                return
            for name, assignment in wanted.items():
                update = self._models.get(name)
                if update is not None and update.runner.removing is not None:
                    self._after_removal[name] = assignment  # starts once removed
                    continue
                if update is None:
                    update = self._make(name)
                    update.runner.start()
                update.runner.submit(assignment)
            if not remove_others:
                return
            for name, update in list(self._models.items()):
                if name in wanted:
                    continue
                self._after_removal.pop(name, None)
                if update.runner.removing is None:
                    why = reason or "not in the desired state any more"
                    log.info("model %s unassigned: removing it", name)
                    mark_removal(self.state_dir, name, why)
                    update.runner.unassign(why)

    def _removed(self, name: str, reason: str) -> None:
        """On the model's runner thread, once its machine settled."""
        update = self.get(name)
        if update is None:
            return
        remove_model(self.state_dir, update, others_use=lambda: self.in_use(exclude=name))
        update.reporter.publish(update.reporter.removed(reason))
        with self._lock:
            self._models.pop(name, None)
            again = self._after_removal.pop(name, None)
            if again is not None and not self._stopped:
                fresh = self._make(name)
                fresh.runner.start()
                fresh.runner.submit(again)

    def stop(self, timeout: float = 1.0) -> None:
        with self._lock:
            self._stopped = True
            updates = list(self._models.values())
        for update in updates:
            update.runner.stop(timeout)
