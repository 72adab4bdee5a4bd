"""Domain errors. Services raise these; the API layer maps each to a gRPC status
in one place (controlplane.api.rpc), so services never know about gRPC."""

from __future__ import annotations


class DomainError(Exception):
    """Base class: a message a person can act on, and a short title for UIs."""

    title = "Error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    title = "Invalid input"


class NotFound(DomainError):
    title = "Not found"


class AlreadyExists(DomainError):
    title = "Already exists"


class FailedPrecondition(DomainError):
    title = "Not allowed now"


class Unauthenticated(DomainError):
    title = "Not signed in"


class PermissionDenied(DomainError):
    title = "Permission denied"


class ResourceExhausted(DomainError):
    title = "Too large"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        # Set when the same request will pass after this many seconds (a rate
        # limit); the client is told in the `retry-after-ms` trailer.
        self.retry_after_s = retry_after_s


class Unavailable(DomainError):
    """Temporary: the caller should retry (e.g. the server is shutting down)."""

    title = "Try again"


class OutOfRange(DomainError):
    title = "Out of range"


class DataLoss(DomainError):
    """Stored bytes are gone or damaged and the control plane holds no other
    copy: retrying will not help; the message says what brings them back."""

    title = "Data lost"
