"""Artifact builds: the optimization ladder per runtime, measurement of every
candidate, and the verdict per device class. Runs in worker processes; knows
nothing about gRPC or SQL (its inputs are files and a BuildTarget)."""
