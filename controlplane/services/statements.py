"""The signed statements agents verify (proto AssignmentStatement and
KeyRotationStatement), serialized deterministically: the stored bytes are
exactly the signed bytes, so every replica pushes the same ones.

An assignment statement binds one device's assignment (device id, sequence,
artifact and its size, the manifest's bytes, shadow, rollback, rollout) to
the signing key; the
agent acts only on what it says (agent/update/trust.py). A rotation statement
names the new key and is signed by the key it replaces."""

from __future__ import annotations

import datetime as dt
import hashlib

from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.v1 import common_pb2 as c

# Assignment statements name the rollout and the artifact's size since
# format 2 (agents accept 1 and 2: a format-1 statement stored before says
# nothing of them, and the agent then takes neither from the assignment's
# unsigned fields as signed). Rotation statements are still format 1.
ASSIGNMENT_FORMAT = 2
ROTATION_FORMAT = 1


def manifest_sha256(manifest: bytes) -> str:
    """The digest a statement names its manifest by (hex)."""
    return hashlib.sha256(manifest).hexdigest()


def _timestamp(at: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def assignment_statement(
    *,
    device_id: str,
    sequence: int,
    model_name: str,
    model_version: str,
    artifact_sha256: str,
    manifest_digest: str,
    shadow: bool,
    rollback: bool,
    key_id: str,
    issued_at: dt.datetime,
    rollout_id: str,
    artifact_size: int,
) -> bytes:
    """The serialized AssignmentStatement (what gets signed and stored)."""
    return c.AssignmentStatement(
        format_version=ASSIGNMENT_FORMAT,
        rollout_id=rollout_id,
        artifact_size=artifact_size,
        device_id=device_id,
        sequence=sequence,
        model_name=model_name,
        model_version=model_version,
        artifact_sha256=artifact_sha256,
        manifest_sha256=manifest_digest,
        shadow=shadow,
        rollback=rollback,
        key_id=key_id,
        issued_at=_timestamp(issued_at),
    ).SerializeToString(deterministic=True)


def with_key(statement: bytes, key_id: str) -> bytes:
    """The same assignment statement naming another signing key (a rotation
    signs every stored statement again)."""
    parsed = c.AssignmentStatement.FromString(statement)
    parsed.key_id = key_id
    return parsed.SerializeToString(deterministic=True)


def rotation_statement(
    *, previous_key_id: str, key_id: str, public_key: bytes, rotated_at: dt.datetime
) -> bytes:
    """The serialized KeyRotationStatement (signed by `previous_key_id`)."""
    return c.KeyRotationStatement(
        format_version=ROTATION_FORMAT,
        previous_key_id=previous_key_id,
        key_id=key_id,
        public_key=public_key,
        rotated_at=_timestamp(rotated_at),
    ).SerializeToString(deterministic=True)
