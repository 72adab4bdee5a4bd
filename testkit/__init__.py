"""What the tests and the benchmarks share, one module per concern; neither
imports the other. Processes: harness (`edgefleet server`), agent_harness
(`edgefleet-agent`), private_pg (a PostgreSQL cluster of the test's own).
Talking to a control plane: rpc (grpc.aio calls and streams), models (model
files and pushes), builds (builds answered by hand), deployments (what a
real agent settled on and serves), fleet (a control plane ready for
fleetsim), cli (the `edgefleet` CLI), metrics (/metrics scrapes),
tls_device (a device with its own key and certificate). Faults and fakes:
fault_scenarios, full_disk, tcp_proxy, grpc_relay, update_rig (the update
machine over fake ports), clock, sample_ranges, tui_fake, fuzzing (the
fuzzer's messages and runs), wheel (installs of the built wheel)."""
