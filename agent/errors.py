"""Agent errors. One base class carrying a message a person can act on and a
short title; a subclass per concern. Whether an error is fatal (the process
exits) or retryable (the daemon backs off) is decided by its class, never by
parsing its text."""

from __future__ import annotations


class AgentError(Exception):
    """Base class: a message a person can act on, and a short title."""

    title = "Agent error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(AgentError):
    """The configuration file or an environment override is unusable. Fatal."""

    title = "Configuration error"


class StateError(AgentError):
    """The state directory cannot be read or written. Fatal: nothing the agent
    does is safe if it cannot persist what it did. Except DiskFull, below."""

    title = "State directory error"


class DiskFull(StateError):
    """A write to the state directory failed because its file system is full
    (ENOSPC), over quota (EDQUOT) or read-only (EROFS). Not fatal, unlike
    other StateErrors: the agent keeps what it learned in memory, keeps
    serving the active model and writes again, with backoff, until the write
    lands (agent/disk.py)."""

    title = "Disk full"


class NotProvisioned(AgentError):
    """No identity is stored and no enrollment token is configured, so the
    agent has no way to reach the control plane. Fatal."""

    title = "Not provisioned"
