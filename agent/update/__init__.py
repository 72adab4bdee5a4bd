"""The agent's update state machine: a pure core with ports.

The core:
- states.py: the states, the events handlers return, and the one transition
  table that picks every successor;
- store.py: the update record, persisted atomically before each state's work;
- machine.py: UpdateMachine, which runs a state's handler, looks its event up
  in the table and persists the next state;
- ports.py: what the real agent provides (downloader, verifier, validator,
  activator, reporter) and the errors they raise (fatal or retryable);
- download.py: the resumable, hash-once download into the state directory;
- fallback.py: a version's lighter fallback artifact, named by the primary's
  signed manifest, which the update downloads, checks, validates and
  installs beside it.

The ports the daemon wires in:
- remote.py: the gRPC downloader and the status reporter;
- trust.py: the signed assignment statement (replay, downgrade, key
  rotations) and the trusted state, written only after verification;
- verify.py: the manifest checks (signature against the trusted keys, device
  class, digest and size);
- validate.py: golden outputs, latency and memory budgets, measured on the
  device in a child process;
- activation.py: switching the ModelHost, active.json, restore at boot;
- runner.py: the thread that reconciles the assignment with the machine;
- faults.py: the crash-test pause (EDGEFLEET_TEST_AGENT_FAULT_PAUSE);
- layout.py: each model's directory (models/<name>/) and the migration of
  the single-model layout;
- models.py: one machine and runner thread per model, and unassigning.

The machine itself never speaks gRPC or loads a runtime. See
docs/agent-updates.md."""
