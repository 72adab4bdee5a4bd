"""Where each model's update records live: <state_dir>/models/<model name>/.

A device holds several models, each with its own update machine, so each
model has its own update record (update.json), active-model record
(active.json) and per-model trust facts (trust.json: the highest sequence
verified and the version committed for that model). The device-wide parts
stay at the root of the state directory: the signing-key trust (trust.json),
the identity, the desired state, and the downloads (shared by digest).

Model names come from the control plane and become directory names, so they
are checked first against the control plane's own rule for model names
(controlplane/services/registry.py): lower-case letters, digits, '.', '_' and
'-', starting with a letter or digit, at most 100 characters. Nothing else
ever reaches the file system ('..', '/', a leading dot).

Migration: agents before several models per device kept one update.json and
one active.json at the root. `migrate_single_model_layout` moves them into
models/<their model name>/ at boot; each file moves with one rename, so an
interrupted migration is finished by the next boot."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

from edgefleet.agent.errors import AgentError, StateError

log = logging.getLogger(__name__)

MODELS_DIR = "models"
# What an unassigned model's directory holds while its removal is under way
# (written before any side effect: a restart finishes the removal).
REMOVING_FILE = "removing"
# The files the single-model layout kept at the root (store.py, activation.py).
_LEGACY_FILES = ("update.json", "active.json")

# The control plane's rule for model names (controlplane/services/registry.py).
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")


class InvalidModelName(AgentError):
    """A model name the agent refuses to use as a directory name."""

    title = "Invalid model name"


def valid_model_name(name: str) -> bool:
    """Whether `name` follows the control plane's rule for model names."""
    return bool(_MODEL_NAME.match(name))


def check_model_name(name: str) -> str:
    """`name`, or InvalidModelName saying what is wrong with it."""
    if not valid_model_name(name):
        raise InvalidModelName(
            f"model name {name!r} is not valid: expected lower-case letters, digits, "
            "'.', '_' or '-', starting with a letter or digit, at most 100 characters"
        )
    return name


def models_dir(state_dir: Path) -> Path:
    return state_dir / MODELS_DIR


def model_dir(state_dir: Path, name: str) -> Path:
    """The directory of model `name`'s records (the name is checked first)."""
    return models_dir(state_dir) / check_model_name(name)


def held_models(state_dir: Path) -> list[str]:
    """The models with a directory of records, sorted. Directories whose
    names are not model names (nothing the agent wrote) are logged and
    ignored."""
    root = models_dir(state_dir)
    if not root.is_dir():
        return []
    names = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        if not valid_model_name(entry.name):
            log.warning("ignoring %s: not a model name", entry)
            continue
        names.append(entry.name)
    return names


def _named_model(path: Path) -> str | None:
    """The model a legacy record file is about; None when it names none."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: cannot read it to migrate it: {exc}") from exc
    if not isinstance(document, dict):
        return None
    for key in ("assignment", "active", "standby", "shadow"):
        entry = document.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("model_name"), str):
            return str(entry["model_name"])
    return None


def migrate_single_model_layout(state_dir: Path) -> str | None:
    """Move a single-model agent's update.json and active.json into
    models/<model name>/; the model's name, or None when there was nothing
    to migrate. Idempotent: a file already moved is not looked at again,
    and a second file finds the directory the first one made.

    A root record that names no model (an idle record of an agent that
    never had an assignment) carries nothing to keep and is deleted."""
    legacy = [state_dir / name for name in _LEGACY_FILES if (state_dir / name).exists()]
    if not legacy:
        return None
    name = next((n for n in map(_named_model, legacy) if n is not None), None)
    if name is None:
        # An interrupted migration moved the file that named the model.
        held = held_models(state_dir)
        name = held[0] if len(held) == 1 else None
    if name is None:
        for path in legacy:
            log.info("removing %s: it names no model", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return None
    if not valid_model_name(name):
        raise StateError(
            f"{legacy[0]}: names model {name!r}, which is not a valid model name; "
            "cannot migrate it into " + str(models_dir(state_dir))
        )
    target = model_dir(state_dir, name)
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path in legacy:
        destination = target / path.name
        if destination.exists():
            # Both exist only if the model's own record was written after an
            # interrupted migration: the newer one wins.
            path.unlink()
            continue
        os.replace(path, destination)
    log.info("migrated the single-model state into %s", target)
    return name
