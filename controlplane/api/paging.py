"""Page tokens for list RPCs (AIP-158 style): opaque to clients, they carry
the cursor where the last page ended and a fingerprint of the filters it was
asked with, so a token sent with other filters is refused instead of
silently listing the wrong set."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from google.protobuf.message import Message

from controlplane.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000
_MAX_TOKEN = 1024


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
