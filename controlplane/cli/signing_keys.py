"""`edgefleet signing-keys`: the keys that sign manifests and assignments."""

from __future__ import annotations

import click

from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.base import emit, json_option, now, pass_env
from edgefleet.controlplane.client.connection import Connection
from edgefleet.v1 import operator_pb2


@click.group("signing-keys")
def signing_keys() -> None:
    """Manifest- and assignment-signing keys: the current one and those a
    rotation retired."""


@signing_keys.command("ls")
@json_option
@pass_env
def signing_keys_ls(env: Connection, as_json: bool) -> None:
    """List the signing keys, oldest first."""
    resp = env.stub.ListSigningKeys(operator_pb2.ListSigningKeysRequest())
    emit(as_json, resp.keys, lambda: render.signing_keys_table(resp.keys, now()))


@signing_keys.command("rotate")
@click.option("--reason", default="", help="Why (kept in the audit log).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_env
def signing_keys_rotate(env: Connection, reason: str, yes: bool, as_json: bool) -> None:
    """Replace the signing key (admin): the old key signs the new one, every
    artifact manifest and assignment is signed again with the new key, and
    agents stop trusting the old key with their next assignment."""
    if not yes:
        click.confirm("Rotate the signing key?", abort=True)
    resp = env.stub.RotateSigningKey(operator_pb2.RotateSigningKeyRequest(reason=reason))
    emit(as_json, resp, lambda: render.signing_key_rotated(resp))
