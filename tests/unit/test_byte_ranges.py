"""Which bytes a Range header asks for (RFC 9110 section 14), table-driven."""

from __future__ import annotations

import pytest

from edgefleet.controlplane.domain.byte_ranges import ByteRange, Unsatisfiable, requested

ETAG = '"abc"'
SIZE = 100


@pytest.mark.parametrize(
    ("header", "if_range", "expected"),
    [
        (None, None, (0, 99)),
        ("bytes=0-", None, (0, 99)),
        ("bytes=10-", None, (10, 99)),
        ("bytes=10-19", None, (10, 19)),
        ("bytes=10-1000", None, (10, 99)),  # clamped to the end
        ("bytes=-5", None, (95, 99)),
        ("bytes=-1000", None, (0, 99)),
        (" bytes = 10 - 19 ", None, (10, 19)),
        ("BYTES=10-", None, (10, 99)),
        ("items=1-2", None, (0, 99)),  # another unit: ignored
        ("bytes=1-2,5-6", None, (0, 99)),  # several ranges: answered whole
        ("bytes=10-", ETAG, (10, 99)),  # If-Range names this version
        ("bytes=10-", '"other"', (0, 99)),  # another version: whole
    ],
)
def test_a_range_asks_for_these_bytes(
    header: str | None, if_range: str | None, expected: tuple[int, int]
) -> None:
    part = requested(header, SIZE, if_range=if_range, etag=ETAG)
    assert (part.start, part.end) == expected
    assert part.length == expected[1] - expected[0] + 1


@pytest.mark.parametrize(
    "header",
    # "\u0661" is ARABIC-INDIC DIGIT ONE: str.isdigit says yes, a header says no.
    ["bytes=100-", "bytes=1000-2000", "bytes=9-3", "bytes=-0", "bytes=abc", "bytes=-",
     "bytes=1-2-3", "bytes=\u0661-", "bytes=" + "9" * 300, "bytes=1.5-"],
)  # fmt: skip
def test_a_range_it_cannot_satisfy_is_refused_with_a_reason(header: str) -> None:
    with pytest.raises(Unsatisfiable) as refused:
        requested(header, SIZE, if_range=None, etag=ETAG)
    assert str(refused.value)


def test_an_empty_blob_has_no_satisfiable_suffix_and_a_whole_of_nothing() -> None:
    with pytest.raises(Unsatisfiable):
        requested("bytes=-5", 0, if_range=None, etag=ETAG)
    with pytest.raises(Unsatisfiable):
        requested("bytes=0-", 0, if_range=None, etag=ETAG)
    assert requested(None, 0, if_range=None, etag=ETAG) == ByteRange(0, -1, 0)


def test_content_range_counts_both_ends() -> None:
    part = requested("bytes=10-19", SIZE, if_range=None, etag=ETAG)
    assert part.partial and part.content_range() == "bytes 10-19/100"
    assert not requested(None, SIZE, if_range=None, etag=ETAG).partial


def test_a_start_past_the_end_says_so() -> None:
    with pytest.raises(Unsatisfiable, match="starts at 100, past the end of the 100-byte blob"):
        requested("bytes=100-", SIZE, if_range=None, etag=ETAG)
