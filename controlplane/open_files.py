"""The control plane's open-file limit.

Every connection is a file descriptor, as are the SQLite files, the blob
cache and the build workers' pipes. The usual soft limit of 1,024 is
reached by 1,100 idle TCP connections (an attack measured exactly that:
operator calls timed out once it was), long before a fleet of 10,000
agents holding sync streams. The hard limit is what the administrator
allows (systemd's LimitNOFILE=, ulimit -Hn); `edgefleet server` raises
its soft limit to it at start, and gRPC bounds how long an unauthenticated
connection may hold one (server.CONNECTION_OPTIONS)."""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Below this many descriptors the control plane serves a small fleet at most.
LOW_LIMIT = 4096


@dataclass(frozen=True)
class OpenFileLimit:
    before: int
    after: int
    hard: int


def raise_open_file_limit() -> OpenFileLimit:
    """Raise the soft RLIMIT_NOFILE to the hard limit (what this user may
    without privileges) and say what it is; a limit still low is logged as
    a warning naming how to lift it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    after = soft
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            after = hard
        except (ValueError, OSError) as exc:
            # An infinite hard limit is not a valid soft one on every kernel
            # (Linux caps it at fs.nr_open, macOS at OPEN_MAX): keep ours.
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    limit = OpenFileLimit(soft, after, hard)
    shown = "unlimited" if after == resource.RLIM_INFINITY else str(after)
    if after != resource.RLIM_INFINITY and after < LOW_LIMIT:
        log.warning(
            "open-file limit is %s (hard limit %s): every connection holds one and a "
            "device holds one or two, so this serves a small fleet at most; raise the "
            "hard limit (systemd LimitNOFILE=, ulimit -Hn)", shown, hard,
        )  # fmt: skip
    elif after != soft:
        log.info("raised the open-file limit from %d to %s", soft, shown)
    return limit
