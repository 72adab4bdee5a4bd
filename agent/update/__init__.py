"""The agent's update state machine: a pure core with ports.

- states.py: the states, the events handlers return, and the one transition
  table that picks every successor;
- store.py: the update record, persisted atomically before each state's work;
- machine.py: UpdateMachine, which runs a state's handler, looks its event up
  in the table and persists the next state;
- ports.py: what the real agent provides (downloader, verifier, validator,
  activator, reporter) and the errors they raise (fatal or retryable);
- download.py: the resumable, hash-once download into the state directory;
- verify.py: the manifest checks (signature against pinned keys, device class,
  digest and size).

Nothing here speaks gRPC or loads a runtime; the daemon wires real ports in."""
