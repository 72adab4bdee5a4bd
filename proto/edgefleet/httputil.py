"""Small helpers for the HTTP downloads the agent and the control plane
make from mirrors (urllib3): what a log line may show of a URL, and why a
request failed in words a person can act on."""

from __future__ import annotations


def without_credentials(url: str) -> str:
    """`url` without any user:password it holds: for a log line, and for
    the request itself (a mirror never gets a credential)."""
    # Here, not at the top: an idle agent loads no HTTP client at boot.
    from urllib3.util import parse_url

    parts = parse_url(url)
    return parts._replace(auth=None).url if parts.auth else url


def failure_reason(exc: BaseException) -> str:
    """The cause of an HTTP failure, not urllib3's retry wrapper around it."""
    cause = getattr(exc, "reason", None) or exc
    return f"{type(cause).__name__}: {cause}"
