"""Page tokens for list RPCs (AIP-158 style): opaque to clients, they carry
the cursor where the last page ended and a fingerprint of the filters it was
asked with, so a token sent with other filters is refused instead of
silently listing the wrong set.

And the size of every response: `fit` keeps a response under
MAX_RESPONSE_BYTES by dropping the last items of its lists (RESPONSE_LISTS
says which), whatever the rows hold. Rows are bounded by the request limits
(api/limits.py), but a page of 1,000 of them is not, nor are the lists that
have no page token (the operator service's lists but ListDevices): before,
one device's 8 MB hostname put every ListDevices page that held it past the
message limit, for every operator."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from edgefleet.controlplane.api import limits
from edgefleet.controlplane.errors import InvalidArgument, ResourceExhausted
from edgefleet.v1 import operator_pb2 as o

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000
# A cursor of a device name (200 characters, each up to 12 once JSON-escaped)
# and an id is about 3,300 characters of token; the limit leaves room.
_MAX_TOKEN = limits.PAGE_TOKEN.chars

# What a response may hold: gRPC's default receive limit (4 MiB), which
# clients keep unless they raise it (the CLI does; a script or another
# language's stub usually does not), less room for the framing.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024 - 64 * 1024

# Response type -> its lists, the most dispensable first: what `fit` drops
# the last items of. A list RPC's own list comes first and keeps at least
# one item (so paging always moves on); the rest may be emptied.
RESPONSE_LISTS: dict[type[Message], tuple[str, ...]] = {
    o.ListEnrollmentTokensResponse: ("tokens",),
    o.ListOperatorTokensResponse: ("tokens",),
    o.ListDevicesResponse: ("devices",),
    o.AssignModelResponse: ("assignments",),
    o.ListDeploymentsResponse: ("events", "assignments"),
    o.ListDeviceClassesResponse: ("classes",),
    o.ListModelsResponse: ("models",),
    o.GetModelResponse: ("versions",),
    o.RunBuildResponse: ("builds",),
    o.ListBuildsResponse: ("builds",),
    o.ListArtifactsResponse: ("artifacts",),
    o.ListRolloutsResponse: ("rollouts",),
    # A rollout's stage counts are of every device, whatever rows it carries
    # (as with GetRollout's device_limit).
    o.Rollout: ("devices", "excluded"),
    o.CreateRolloutResponse: ("planned", "excluded", "rollout.devices", "rollout.excluded"),
    o.QueryTelemetryResponse: ("series",),
    o.ListAuditLogResponse: ("entries",),
    o.ListSigningKeysResponse: ("keys",),
}
# Of those, the responses whose first list is the RPC's answer (not a detail
# of one object): it keeps an item.
_LIST_RPCS = frozenset(RESPONSE_LISTS) - {o.Rollout, o.CreateRolloutResponse}


def page_size(requested: int) -> int:
    """0 is the default; more than the maximum is taken as the maximum."""
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


def _fingerprint(request: Message) -> str:
    # Every field but the paging ones: a page size may change between pages.
    filters = type(request)()
    filters.CopyFrom(request)
    filters.ClearField("page_size")
    filters.ClearField("page_token")
    return hashlib.sha256(filters.SerializeToString(deterministic=True)).hexdigest()[:16]


def encode(request: Message, cursor: tuple[str, ...] | None) -> str:
    """The next_page_token for a page of `request` that ended at `cursor`
    (empty when it was the last page)."""
    if cursor is None:
        return ""
    body = json.dumps({"c": list(cursor), "f": _fingerprint(request)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode(request: Message, parts: int) -> tuple[str, ...] | None:
    """The cursor of `parts` strings in `request.page_token`, or None for the
    first page. InvalidArgument for a token this server did not issue or one
    issued for other filters."""
    token: str = getattr(request, "page_token")  # noqa: B009 - a Message has no such attribute to mypy
    if not token:
        return None
    rpc = type(request).__name__.removesuffix("Request")
    try:
        if len(token) > _MAX_TOKEN:
            # Ours are short; a long one could be nested deep enough for
            # json to overflow the stack.
            raise ValueError("too long")
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        cursor, fingerprint = body["c"], body["f"]
        if not (
            isinstance(cursor, list)
            and len(cursor) == parts
            and all(isinstance(p, str) for p in cursor)
        ):
            raise TypeError("cursor")
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise InvalidArgument(
            f"page_token is not one a {rpc} response gave; start again without it"
        ) from None
    if fingerprint != _fingerprint(request):
        raise InvalidArgument(
            f"page_token was issued for other {rpc} filters; send the same filters for every "
            "page, or start again without a token"
        )
    return tuple(cursor)


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _repeated(message: Message, path: str) -> Any:
    for name in path.split("."):
        message = getattr(message, name)
    return message


def fit_page(
    request: Message, response: Message, rows: str, cursors: Sequence[tuple[str, ...]]
) -> None:
    """`fit` for one page of a paged list: the rows dropped are left for the
    next page, which then starts after the last row kept (`cursors[i]` is
    the i-th row's cursor). Room is kept for the longer token."""
    if fit(response, MAX_RESPONSE_BYTES - _MAX_TOKEN):
        kept = len(getattr(response, rows))
        response.next_page_token = encode(request, cursors[kept - 1])  # type: ignore[attr-defined]


def fit(response: Message, budget: int = MAX_RESPONSE_BYTES) -> int:
    """Make `response` serialize within `budget` bytes, in place; how many
    list items were dropped. Items go from the end of its lists
    (RESPONSE_LISTS), a list RPC's own list keeping at least one; what still
    does not fit (a row stored before the request limits, too large alone)
    is cut down to those limits (limits.clip). ResourceExhausted if even
    that does not fit, which the limits rule out for every response."""
    excess = response.ByteSize() - budget
    if excess <= 0:
        return 0
    fields = RESPONSE_LISTS.get(type(response), ())
    dropped = 0
    for position, path in enumerate(fields):
        items = _repeated(response, path)
        floor = 1 if position == 0 and type(response) in _LIST_RPCS else 0
        while excess > 0 and len(items) > floor:
            size = items[-1].ByteSize()
            # At least what the item took (a tag byte, its length, itself):
            # a parent's length may shrink too, so this never drops too few.
            excess -= 1 + _varint_size(size) + size
            del items[-1]
            dropped += 1
    if response.ByteSize() > budget:
        # The rows, not the envelope: a page token is not cut.
        for path in fields:
            for item in _repeated(response, path):
                limits.clip(item)
        if not fields:
            limits.clip(response)
        size = response.ByteSize()
        if size > budget:
            raise ResourceExhausted(
                f"the {type(response).__name__} would be {size:,} bytes, over the "
                f"{budget:,}-byte limit of a response; narrow the request"
            )
    return dropped
