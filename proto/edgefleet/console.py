"""The `edgefleet` command's entry point, apart from the CLI package: the
console script imports this module, which imports the CLI only when the
command runs, so an install without the 'cli' extra (a device's) gets one
line naming the extra to install (edgefleet.extras) and exit status 2
instead of a traceback."""

from __future__ import annotations

import os
import sys

from edgefleet.extras import MissingExtra, needs

# Commands that need more than the CLI: naming their extra at once spares a
# second round (installing [cli] only to be told about [server]); each of
# these extras includes the CLI's.
COMMAND_EXTRAS = {"server": "server", "db": "server", "toolchain": "server", "tui": "tui"}


def command_extra(argv: list[str]) -> str:
    """The extra that the command in `argv` (sys.argv[1:]) needs. Without
    click there is no parser to say which word is the command (global options
    take values), so the first word naming one of COMMAND_EXTRAS is taken."""
    command = next((arg for arg in argv if arg in COMMAND_EXTRAS), "")
    return COMMAND_EXTRAS.get(command, "cli")


def edgefleet() -> None:
    # gRPC's C core logs at INFO by default ("Handshake failed with error
    # SSL_ERROR_SSL ..." before our own one-line advice); its errors stay.
    # Set before grpc is first imported, which reads it once.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        from edgefleet.controlplane.cli import main
    except MissingExtra as exc:
        extra = command_extra(sys.argv[1:])
        line = str(exc) if extra == exc.extra else needs("`edgefleet`", extra, exc.missing)
        sys.stderr.write(f"{line}\n")
        raise SystemExit(2) from None
    main()
