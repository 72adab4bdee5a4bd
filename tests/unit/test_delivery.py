"""Delivery settings as pure values (controlplane/domain/delivery.py): the
rates people type, the URLs a class may name, and the order a device tries."""

from __future__ import annotations

import pytest

from edgefleet.controlplane.domain.delivery import (
    Delivery,
    mirror_order,
    parse_base_url,
    parse_rate,
)


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("0", 0), ("none", 0), ("2048", 2048), ("500K", 500 * 1024), ("500k", 500 * 1024),
        ("5m", 5 * 1024**2),
        ("2M", 2 * 1024**2), ("2MiB/s", 2 * 1024**2), ("2MB/s", 2 * 1024**2),
        ("1.5G", 3 * 1024**3 // 2), (" 10 M ", 10 * 1024**2),
    ],
)  # fmt: skip
def test_rates_as_people_write_them(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    "text", ["fast", "", "-1M", "nan", "inf", "1T", "200G", "M", "0.5", "1000"]
)
def test_what_is_no_rate_says_so(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_urls_are_canonical_and_hostile_ones_refused() -> None:
    assert parse_base_url(" https://m.example:8443/blobs/ ") == "https://m.example:8443/blobs"
    for bad in (
        "m.example/blobs", "file:///srv/blobs", "https://m.example:99999/",
        "https://m.example/a b", "https://m.example/\x00", "https://u:p@m.example/",
        "https://m.example/?sig=1", "https://" + "a" * 2100 + ".example", "http://m.example:0/",
    ):  # fmt: skip
        with pytest.raises(ValueError):
            parse_base_url(bad)


def test_a_delivery_is_validated_whole() -> None:
    assert Delivery(("https://a.example/",), 4096).validated() == Delivery(
        ("https://a.example",), 4096
    )
    with pytest.raises(ValueError, match="listed twice"):
        Delivery(("https://a.example", "https://a.example/")).validated()
    with pytest.raises(ValueError, match="at most 8"):
        Delivery(tuple(f"https://m{i}.example" for i in range(9))).validated()
    with pytest.raises(ValueError, match="1024 bytes/s"):
        Delivery((), 100).validated()
    assert Delivery().validated() == Delivery()


def test_a_device_tries_its_class_mirrors_first_each_once() -> None:
    assert mirror_order(["https://site", "https://cdn"], ["https://cdn", "https://origin"]) == (
        "https://site", "https://cdn", "https://origin",
    )  # fmt: skip
    assert mirror_order([], ["https://cdn"]) == ("https://cdn",)
