"""What the CLI and the TUI add to UNAVAILABLE (client/tls_probe.py) when
the operator never said where to look: nothing answering at the default
address (no --server, EDGEFLEET_SERVER or context in use) says so and how
to name a server, instead of a bare "failed to connect to all addresses"."""

from __future__ import annotations

import socket

from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.client.tls_probe import unavailable_advice


def test_nothing_answering_at_an_address_never_given_says_where_it_came_from() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        server = f"127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refused
        default = Connection(server, None, origin="the default address: no --server")
        advice = unavailable_advice(default)
        assert advice is not None
        assert advice.startswith(
            f"UNAVAILABLE: no control plane answers at {server} (the default address"
        )
        assert "edgefleet context add NAME --server HOST:PORT" in advice
        # An address the operator gave: is it the right one?
        given = unavailable_advice(Connection(server, None))
        assert given == (
            f"UNAVAILABLE: no control plane answers at {server}: is it running, and is that "
            "the address it listens on (`edgefleet server --listen`)?"
        )
