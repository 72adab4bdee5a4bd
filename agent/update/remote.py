"""The ports that talk to the control plane: the artifact Downloader over
DeviceService.DownloadArtifact, and the Reporter that turns the machine's
progress into UpdateStatus messages for the sync stream.

Both run on the update machine's thread, not the event loop: the download
uses the blocking gRPC stack, and the reporter hands messages to the loop
through a thread-safe callback."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from edgefleet.update_state import to_wire
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc

from .fallback import download_total
from .ports import Chunk, FatalUpdateError
from .states import State
from .store import UpdateRecord

# Codes that say the request can never succeed as made; anything else
# (unavailable, deadline, a server restart) is worth retrying.
_FATAL_CODES = {
    grpc.StatusCode.NOT_FOUND: "the control plane has no such artifact",
    grpc.StatusCode.PERMISSION_DENIED: "the control plane refused the download",
    grpc.StatusCode.INVALID_ARGUMENT: "the control plane rejected the download request",
}
# A stalled stream must end. Downloads resume, so a long one cut by this
# deadline continues from where it stopped.
CALL_TIMEOUT_S = 600.0


# The control plane refuses a status whose reason is longer than 16,384
# characters or holds control characters other than tab and line breaks
# (controlplane/api/limits.py): a reason made of exception texts joined over
# retries must never get the device's own Sync stream refused.
MAX_REASON_CHARS = 16_000
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def reportable(reason: str) -> str:
    """`reason` as the control plane accepts it: control characters replaced,
    and cut (keeping its start and its end, where the latest failure is)."""
    reason = _CONTROL.sub("\ufffd", reason)
    if len(reason) <= MAX_REASON_CHARS:
        return reason
    half = MAX_REASON_CHARS // 2 - 20
    return f"{reason[:half]} … ({len(reason) - 2 * half} characters cut) … {reason[-half:]}"


class GrpcDownloader:
    """Implements the Downloader port with DeviceService.DownloadArtifact."""

    def __init__(
        self,
        channel: Callable[[], grpc.Channel],
        credential: Callable[[], str],
        *,
        chunk_size: int = 0,
        call_timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        """`channel` makes a new channel per download attempt (so a renewed
        certificate is used from the next attempt on)."""
        self._call_timeout_s = call_timeout_s
        self._channel = channel
        self._credential = credential
        self._chunk_size = chunk_size

    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
        metadata = (("authorization", f"Bearer {self._credential()}"),)
        with self._channel() as channel:
            stub = device_pb2_grpc.DeviceServiceStub(channel)
            request = device_pb2.DownloadArtifactRequest(
                digest=digest, offset=offset, chunk_size=self._chunk_size
            )
            stream = stub.DownloadArtifact(request, metadata=metadata, timeout=self._call_timeout_s)
            try:
                for message in stream:
                    yield Chunk(message.offset, message.data, message.total_size)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                if code in _FATAL_CODES:
                    raise FatalUpdateError(f"{_FATAL_CODES[code]}: {details}") from None
                raise ConnectionError(f"download failed ({code.name}): {details}") from None
            finally:
                stream.cancel()  # type: ignore[no-untyped-call]


class StatusReporter:
    """Implements the Reporter port: builds UpdateStatus messages and passes
    them to `publish` (thread-safe; the daemon puts them on the sync stream).

    Download progress is throttled to one report per `progress_interval_s`
    (and the last byte); state changes are always reported. Back in Idle, an
    update that settled is reported by its outcome ("committed" or "failed",
    with the reason), so the device's status says how the last update ended.
    The latest status is kept for the Hello of the next sync stream.

    `condition` says why the device cannot write its state directory ("disk
    full: ...", agent/disk.py), or None; a status with no reason of its own
    carries it, so the operator sees the condition whatever the update does.

    There is one reporter per model (`model_name`): every status it builds
    names that model, and carries the state as the UpdateState enum
    (edgefleet.update_state; protocol 2 leaves legacy_state empty)."""

    def __init__(
        self,
        publish: Callable[[common_pb2.UpdateStatus], None],
        record: Callable[[], UpdateRecord],
        active: Callable[[], tuple[str, str]],
        *,
        progress_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        condition: Callable[[], str | None] = lambda: None,
        model_name: str = "",
        source: Callable[[], str] = lambda: "",
    ) -> None:
        self.model_name = model_name
        self._publish = publish
        self._record = record
        self._active = active
        self._condition = condition
        self._interval = progress_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_state: State | None = None
        self._last_progress = 0.0
        # Where the download's bytes come from, and the bytes and time of
        # the last download report (its rate is measured from there).
        self._source = source
        self._rate_mark: tuple[int, float] | None = None

    def report(self, state: State, bytes_done: int, bytes_total: int, reason: str | None) -> None:
        now = self._clock()
        with self._lock:
            if (
                state is self._last_state
                and state is State.DOWNLOADING
                and bytes_done < bytes_total
                and now - self._last_progress < self._interval
            ):
                return
            self._last_state, self._last_progress = state, now
            rate = 0
            if state is State.DOWNLOADING:
                mark = self._rate_mark
                if mark is not None and bytes_done > mark[0] and now > mark[1]:
                    rate = round((bytes_done - mark[0]) / (now - mark[1]))
                self._rate_mark = (bytes_done, now)
            else:
                self._rate_mark = None
        status = self.status(state, bytes_done, bytes_total, reason)
        if state is State.DOWNLOADING:
            status.download_source = self._source()[:2048]
            status.download_rate = rate
        self._publish(status)

    def current(self) -> common_pb2.UpdateStatus:
        """The status as of now (for a Hello)."""
        record = self._record()
        total = download_total(record.assignment) if record.assignment else 0
        reason = record.reason if record.state in (State.ROLLING_BACK, State.FAILED) else None
        return self.status(record.state, record.bytes_downloaded, total, reason)

    def status(
        self, state: State, bytes_done: int, bytes_total: int, reason: str | None
    ) -> common_pb2.UpdateStatus:
        """An UpdateStatus for the current assignment and active model."""
        record = self._record()
        name = state.value
        if state is State.IDLE and record.outcome is not None:
            name = State.COMMITTED.value if record.outcome == "committed" else State.FAILED.value
            reason = record.reason
        version, digest = self._active()
        status = common_pb2.UpdateStatus(
            state=to_wire(name),
            model_name=self.model_name,
            bytes_done=bytes_done,
            bytes_total=bytes_total,
            reason=reportable(reason or self._condition() or ""),
            active_model_version=version,
            active_artifact_digest=digest,
        )
        assignment = record.assignment
        if assignment is not None:
            status.model_name = assignment.model_name
            status.model_version = assignment.model_version
            status.artifact_digest = assignment.artifact_digest
            status.sequence = assignment.sequence
            status.rollout_id = assignment.rollout_id
        status.updated_at.GetCurrentTime()
        return status

    def removed(self, reason: str) -> common_pb2.UpdateStatus:
        """The last status of a model that was unassigned and unloaded: Idle,
        nothing active (docs/agent-updates.md, "Unassigning a model")."""
        status = common_pb2.UpdateStatus(
            state=to_wire(State.IDLE.value),
            model_name=self.model_name,
            reason=reportable(f"unassigned and unloaded: {reason}" if reason else "unloaded"),
        )
        status.updated_at.GetCurrentTime()
        return status

    def publish(self, status: common_pb2.UpdateStatus) -> None:
        """Send `status` as it is (the removal's last status)."""
        self._publish(status)
