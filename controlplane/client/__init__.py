"""The operator's client library: what the CLI, the TUI, tests and scripts
share to talk to the control plane. No click, no rich, no textual, no server
code (tests/e2e/test_import_contract.py holds that); the CLI (controlplane.cli)
and the TUI (tui.client) are adapters over it.

One module per concern, imported by name (this package re-exports nothing):
connection (address, token, TLS, channels), tls_probe (why a connection
failed), errors (status of a failed call, either stack), paging (listings
that page), push (model uploads with progress), syntax (operator text <->
protobuf), stages (the rollout stage syntax), rollout_edit (changing a
rollout under way) and format (sizes, times and rollout fields for people)."""
