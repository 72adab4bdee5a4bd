"""Where a device fetches an artifact's bytes, and how fast it may.

A device class may name its own mirrors (a site's local nginx) and a
download rate cap (a metered link). Neither is part of what a build
measures, so changing them rebuilds nothing; they reach devices with the
next desired state each one gets. The bytes are checked against the signed
manifest whatever their source, so a mirror is trusted with nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

# A class's own mirrors; the server-wide ones (--artifact-mirror) come after.
MAX_MIRRORS = 8
MAX_URL_LENGTH = 2048
# Below 1 KiB/s a 10 MB artifact takes three hours: a typo, not a link.
MIN_DOWNLOAD_RATE = 1024
MAX_DOWNLOAD_RATE = 100 * 1024**3


def parse_base_url(text: str) -> str:
    """An http(s) base URL (scheme://host[:port][/path]) as given, without a
    trailing slash; ValueError saying what is wrong."""
    url = text.strip().rstrip("/")
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"a base URL is at most {MAX_URL_LENGTH} characters, got {len(url)}")
    if any(ord(ch) < 0x20 or ch == "\x7f" or ch.isspace() for ch in url):
        raise ValueError(f"{text!r}: a base URL has no spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{text!r}: a base URL has no query, fragment or user:password")
    try:
        port = parts.port  # raises on a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    if port == 0:
        raise ValueError(f"{text!r}: port 0 is no port a server listens on")
    return url


@dataclass(frozen=True)
class Delivery:
    """A device class's delivery settings."""

    # Tried in order before the server-wide mirrors and the control plane.
    mirrors: tuple[str, ...] = ()
    # Bytes per second for each download of the class's devices; 0: no cap.
    # An agent with a lower cap of its own keeps its own.
    max_download_rate: int = 0

    def validated(self) -> Delivery:
        """The same settings with each URL in its canonical form; ValueError
        saying what is wrong."""
        if len(self.mirrors) > MAX_MIRRORS:
            raise ValueError(f"a class has at most {MAX_MIRRORS} mirrors, got {len(self.mirrors)}")
        mirrors = tuple(parse_base_url(m) for m in self.mirrors)
        if len(set(mirrors)) != len(mirrors):
            raise ValueError("a mirror is listed twice")
        rate = self.max_download_rate
        if rate and not MIN_DOWNLOAD_RATE <= rate <= MAX_DOWNLOAD_RATE:
            raise ValueError(
                f"the download rate cap is between {MIN_DOWNLOAD_RATE} bytes/s (1 KiB/s) and "
                f"{MAX_DOWNLOAD_RATE} bytes/s, or 0 for none; got {rate}"
            )
        return Delivery(mirrors, rate)


def mirror_order(class_mirrors: Iterable[str], server_mirrors: Iterable[str]) -> tuple[str, ...]:
    """The mirrors a device tries, nearest first: its class's, then the
    server-wide ones, each once."""
    return tuple(dict.fromkeys([*class_mirrors, *server_mirrors]))


def parse_rate(text: str) -> int:
    """A download rate as people write it: bytes per second, with an
    optional K/M/G suffix in either case, powers of 1024 as curl's and
    wget's --limit-rate read them ("B", "iB" and "/s" allowed: "500K",
    "2MiB/s", "10m", "2MB" is 2 MiB/s); "0" or "none" for no cap. ValueError
    saying what is wrong."""
    raw = text.strip()
    if raw.lower() in ("0", "none", "off"):
        return 0
    body = raw.removesuffix("/s").strip()
    lowered = body.lower().removesuffix("ib").removesuffix("b").strip()
    factor = 1
    if lowered and lowered[-1] in "kmg":
        factor = 1024 ** ("kmg".index(lowered[-1]) + 1)
        lowered = lowered[:-1].strip()
    try:
        value = float(lowered)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a rate: give bytes per second, e.g. 500K, 2M or 2MiB/s"
        ) from None
    if not value > 0 or value * factor > MAX_DOWNLOAD_RATE:
        raise ValueError(f"{text!r}: a rate is positive and at most 100 GiB/s (0 for none)")
    if value * factor < MIN_DOWNLOAD_RATE:
        raise ValueError(f"{text!r} is under 1K (1024 bytes/s), the least rate a cap takes")
    return round(value * factor)
