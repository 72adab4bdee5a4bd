"""HTTP byte ranges (RFC 9110 section 14) for artifact downloads: which part
of a blob a GET asks for. Pure: no server, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

# A header longer than this is not a byte range a downloader sends; bounded
# so that a hostile one costs nothing to refuse.
_MAX_HEADER = 200


class Unsatisfiable(ValueError):
    """The range asks for nothing the blob has (or cannot be read as one):
    416, with the blob's size in Content-Range."""


@dataclass(frozen=True)
class ByteRange:
    """Bytes [start, end] of a `size`-byte blob, both ends included (as the
    Content-Range header counts them)."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def partial(self) -> bool:
        return self.start > 0 or self.end < self.size - 1

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


def requested(header: str | None, size: int, *, if_range: str | None, etag: str) -> ByteRange:
    """The part of a `size`-byte blob a request with this Range header (and
    If-Range) asks for. The whole blob when there is no Range, when it is
    not in bytes, when it asks for several ranges (a server may answer those
    whole, and no downloader here sends them), or when If-Range names
    another version. Unsatisfiable for a range past the end or malformed."""
    whole = ByteRange(0, size - 1, size)
    if header is None or (if_range is not None and if_range.strip() != etag):
        return whole
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes":
        return whole
    if len(header) > _MAX_HEADER:
        raise Unsatisfiable("the Range header is too long for a single byte range")
    if "," in spec:
        return whole
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first or last) or not (first + last).isdigit() or not _ascii(first + last):
        raise Unsatisfiable(f"not a byte range: {header.strip()!r} (use bytes=START- or START-END)")
    if not first:  # bytes=-N: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable("an empty suffix range asks for no bytes")
        return ByteRange(max(0, size - suffix), size - 1, size)
    start = int(first)
    if start >= size:
        raise Unsatisfiable(f"the range starts at {start}, past the end of the {size}-byte blob")
    end = int(last) if last else size - 1
    if start > end:
        raise Unsatisfiable(f"the range {start}-{end} ends before it starts")
    return ByteRange(start, min(end, size - 1), size)


def _ascii(text: str) -> bool:
    # str.isdigit accepts other scripts' digits ("١٢"); a header is ASCII.
    return text.isascii()
