"""The telemetry loop: every interval, snapshot the request statistics into the
on-disk buffer, then upload what is pending to the control plane.

Uploads go in seq order, in batches of at most `MAX_BATCH`, with the device
credential. Whatever the control plane acks (the highest seq it holds) is
trimmed from the buffer. UNAVAILABLE, DEADLINE_EXCEEDED, UNAUTHENTICATED and
any other failure leave the samples buffered for the next interval, except
INVALID_ARGUMENT: a batch is refused whole for one bad sample (say, a broken
device clock), so the batch is resent one sample at a time and the samples
still refused are discarded and counted as dropped, instead of blocking the
buffer forever.

RESOURCE_EXHAUSTED with a `retry-after-ms` trailer is the control plane's
per-device rate limit: the batch stays buffered and no upload is tried until
that delay (plus up to 10 % jitter, never less) has passed; the run loop
wakes then rather than at the next interval, so a backlog drains at the
rate the control plane allows, costing one refusal per delay. Intervals go
on meanwhile and their samples wait in the buffer.

The same figures can be served on a local Prometheus endpoint
(`TelemetryMetrics`, its own CollectorRegistry; `serve_metrics` binds loopback
by default). prometheus_client is imported only when a TelemetryMetrics is
made: an agent that serves no /metrics does not pay its ~2 MB of RSS.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import grpc
import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.agent.telemetry import IntervalSample, RequestStats
from edgefleet.agent.telemetry_buffer import Pending, TelemetryBuffer
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

MAX_BATCH = 500  # the control plane's limit per UploadTelemetry call
DEFAULT_INTERVAL_S = 10.0
RPC_TIMEOUT_S = 15.0
# The control plane's trailer naming how long to wait (whole milliseconds)
# before a refused upload would pass (controlplane/api/rpc.py).
RETRY_AFTER_MS = "retry-after-ms"
# A delay beyond this is taken as this: a broken or hostile answer must not
# silence a device's telemetry for days (the buffer would overflow anyway).
MAX_RETRY_AFTER_S = 3600.0
RETRY_JITTER = 0.1


def retry_after_s(exc: grpc.aio.AioRpcError) -> float | None:
    """The delay a refusal asks for, in seconds; None when it names none."""
    # grpc.aio gives (key, value) pairs; grpc-stubs types them as the sync API's.
    trailers = cast("Iterable[tuple[str, str | bytes]]", exc.trailing_metadata() or ())
    for key, value in trailers:
        if key == RETRY_AFTER_MS:
            try:
                ms = int(value)
            except (TypeError, ValueError):
                return None
            return min(max(ms, 0) / 1000, MAX_RETRY_AFTER_S)
    return None


def to_proto(pending: Pending) -> device_pb2.TelemetrySample:
    """The wire form: only the fields TelemetrySample has. A sensor the
    device lacks (None) stays unset, which the control plane stores as NULL."""
    s = pending.sample
    at = Timestamp()
    at.FromDatetime(s.at)
    sample = device_pb2.TelemetrySample(
        seq=pending.seq,
        at=at,
        model_name=s.model_name,
        model_version=s.model_version,
        request_count=s.request_count,
        error_count=s.error_count,
        timeout_count=s.timeout_count,
        latency_p50_ms=s.latency_p50_ms,
        latency_p95_ms=s.latency_p95_ms,
        latency_p99_ms=s.latency_p99_ms,
        latency_max_ms=s.latency_max_ms,
        memory_mb=s.memory_mb,
        cpu_percent=s.cpu_percent,
        dropped_samples=pending.dropped_samples,
        system_memory_percent=s.system_memory_used_percent,
        power_mode=s.power_mode,
        concurrency_limit=s.concurrency_limit,
        shadow_version=s.shadow_version,
        shadow_requests=s.shadow_requests,
        shadow_agreement=s.shadow_agreement,
        shadow_max_diff=s.shadow_max_diff,
        shadow_latency_p95_ms=s.shadow_latency_p95_ms,
        variant=s.variant,  # type: ignore[arg-type]  # an ArtifactVariant's number
        fallback_request_count=s.fallback_request_count,
        model_memory_mb=s.model_memory_mb,
    )
    if s.temperature_c is not None:
        sample.temperature_c = s.temperature_c
    if s.battery_percent is not None:
        sample.battery_percent = s.battery_percent
    return sample


@dataclass
class FlushResult:
    uploaded: int = 0  # samples sent and acked
    discarded: int = 0  # refused by the control plane (INVALID_ARGUMENT)
    acked_seq: int = 0
    error: grpc.StatusCode | None = None  # why pending samples stayed buffered
    retry_after_s: float | None = None  # the control plane's rate limit asked to wait


# ---------------------------------------------------------------- Prometheus


class TelemetryMetrics:
    """The last interval's figures as Prometheus gauges, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import CollectorRegistry, Gauge  # see the module docstring

        self.registry = registry if registry is not None else CollectorRegistry()
        r, mv = self.registry, ["model", "version"]
        p = "edgefleet_agent_"
        self.requests = Gauge(
            p + "interval_requests", "Requests in the last interval", mv, registry=r
        )
        self.errors = Gauge(p + "interval_errors", "Errors in the last interval", mv, registry=r)
        self.timeouts = Gauge(
            p + "interval_timeouts", "Timeouts (also errors) in the last interval", mv, registry=r
        )
        self.latency = Gauge(
            p + "interval_latency_ms", "Latency in the last interval", [*mv, "quantile"], registry=r
        )
        self.fallback_requests = Gauge(
            p + "interval_fallback_requests",
            "Requests the lighter fallback artifact served in the last interval",
            mv,
            registry=r,
        )
        self.serving_fallback = Gauge(
            p + "serving_fallback",
            "1 while the model serves its lighter fallback artifact (power/thermal policy)",
            mv,
            registry=r,
        )
        self.rss = Gauge(p + "process_rss_mb", "Agent resident memory", registry=r)
        self.cpu = Gauge(p + "process_cpu_percent", "Agent CPU (100 = one core)", registry=r)
        self.sys_mem = Gauge(p + "system_memory_used_percent", "System memory used", registry=r)
        self.sys_avail = Gauge(p + "system_memory_available_mb", "System memory free", registry=r)
        self.temperature = Gauge(p + "temperature_celsius", "Hottest sensor", registry=r)
        self.battery = Gauge(p + "battery_percent", "Battery charge", registry=r)
        self.concurrency = Gauge(
            p + "concurrency_limit", "Inference concurrency allowed (0: unlimited)", registry=r
        )
        self.power_mode = Gauge(
            p + "power_mode", "The power/thermal policy's mode (1 for the current one)", ["mode"],
            registry=r,
        )  # fmt: skip
        self.buffered = Gauge(p + "telemetry_buffered_samples", "Samples not yet acked", registry=r)
        self.dropped = Gauge(
            p + "telemetry_dropped_samples", "Samples ever dropped from the buffer", registry=r
        )
        self.disk_full = Gauge(
            p + "state_disk_full",
            "1 while a write to the state directory waits for room (disk full)",
            registry=r,
        )

    def observe(self, samples: Sequence[IntervalSample]) -> None:
        for gauge in (
            self.requests,
            self.errors,
            self.timeouts,
            self.latency,
            self.fallback_requests,
            self.serving_fallback,
        ):
            gauge.clear()
        for s in samples:
            if s.model_name or s.model_version:
                labels = (s.model_name, s.model_version)
                self.requests.labels(*labels).set(s.request_count)
                self.errors.labels(*labels).set(s.error_count)
                self.timeouts.labels(*labels).set(s.timeout_count)
                self.fallback_requests.labels(*labels).set(s.fallback_request_count)
                self.serving_fallback.labels(*labels).set(
                    1 if s.variant == common_pb2.ARTIFACT_VARIANT_FALLBACK else 0
                )
                for quantile, value in (
                    ("0.5", s.latency_p50_ms),
                    ("0.95", s.latency_p95_ms),
                    ("0.99", s.latency_p99_ms),
                    ("1", s.latency_max_ms),
                ):
                    self.latency.labels(*labels, quantile).set(value)
        if samples:
            s = samples[-1]
            self.rss.set(s.memory_mb)
            self.cpu.set(s.cpu_percent)
            self.sys_mem.set(s.system_memory_used_percent)
            self.sys_avail.set(s.system_memory_available_mb)
            if s.temperature_c is not None:
                self.temperature.set(s.temperature_c)
            if s.battery_percent is not None:
                self.battery.set(s.battery_percent)
            self.concurrency.set(s.concurrency_limit)
            self.power_mode.clear()
            self.power_mode.labels(s.power_mode).set(1)

    def observe_buffer(self, buffer: TelemetryBuffer) -> None:
        self.buffered.set(len(buffer))
        self.dropped.set(buffer.dropped_total)

    def observe_disk(self, waiting: bool) -> None:
        """Whether a state write waits for room (agent/disk.py)."""
        self.disk_full.set(1 if waiting else 0)


def serve_metrics(metrics: TelemetryMetrics, port: int, addr: str = "127.0.0.1") -> None:
    """Serve /metrics on a daemon thread (port 0 is not reported back)."""
    from prometheus_client import start_http_server  # see the module docstring

    start_http_server(port, addr=addr, registry=metrics.registry)


# ---------------------------------------------------------------- uploader


class TelemetryUploader:
    def __init__(
        self,
        *,
        stats: RequestStats,
        buffer: TelemetryBuffer,
        target: str,
        credential: str | Callable[[], str],
        interval_s: float = DEFAULT_INTERVAL_S,
        batch_size: int = MAX_BATCH,
        rpc_timeout_s: float = RPC_TIMEOUT_S,
        metrics: TelemetryMetrics | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        channel_options: Sequence[tuple[str, int]] = (),
        channel: Callable[[], grpc.aio.Channel] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`channel` makes the channel to upload on (the agent's transport:
        TLS with its certificate); without it, plain text to `target`.
        `monotonic` times the control plane's retry delays."""
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}")
        self.stats, self.buffer, self.metrics = stats, buffer, metrics
        self._credential = credential
        self._interval_s, self._batch_size, self._timeout = interval_s, batch_size, rpc_timeout_s
        self._clock = clock
        self._monotonic = monotonic
        # No upload before this monotonic time (a rate-limit refusal).
        self._retry_at: float | None = None
        options = list(channel_options)
        self._connect = channel or (lambda: grpc.aio.insecure_channel(target, options=options))
        self._channel = self._connect()
        self._stub = device_pb2_grpc.DeviceServiceStub(self._channel)

    async def reconnect(self) -> None:
        """Upload on a new channel from now on (a renewed certificate)."""
        old, self._channel = self._channel, self._connect()
        self._stub = device_pb2_grpc.DeviceServiceStub(self._channel)
        await old.close(grace=None)

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def run(self) -> None:
        """Upload the backlog at once (a full buffer would otherwise evict
        samples the control plane may hold), then tick every interval until
        cancelled (a last snapshot is not taken)."""
        await self.flush()
        next_tick = self._monotonic() + self._interval_s
        while True:
            # Wake for the next interval, or earlier when a refused upload's
            # delay ends first: then only flush.
            wake = next_tick if self._retry_at is None else min(next_tick, self._retry_at)
            await asyncio.sleep(max(0.0, wake - self._monotonic()))
            if self._monotonic() >= next_tick:
                next_tick = self._monotonic() + self._interval_s
                await self.tick()
            else:
                await self.flush()

    async def tick(self) -> FlushResult:
        """Close the interval: snapshot into the buffer, then upload."""
        samples = self.stats.snapshot_and_reset(self._clock())
        await asyncio.to_thread(self.buffer.append, samples)
        if self.metrics is not None:
            self.metrics.observe(samples)
        result = await self.flush()
        if self.metrics is not None:
            self.metrics.observe_buffer(self.buffer)
        return result

    async def flush(self) -> FlushResult:
        """Upload everything pending, batch by batch, until done or a failure.
        While a rate-limit delay runs, upload nothing."""
        result = FlushResult()
        if self._retry_at is not None:
            left = self._retry_at - self._monotonic()
            if left > 0:
                result.error, result.retry_after_s = grpc.StatusCode.RESOURCE_EXHAUSTED, left
                return result
            self._retry_at = None
        while batch := await asyncio.to_thread(self.buffer.pending, self._batch_size):
            try:
                acked = await self._upload(batch)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    self._refused(exc, result)
                    return result
                if not await self._upload_one_by_one(batch, result):
                    return result
                continue
            result.acked_seq = acked
            result.uploaded += len(batch)
            if acked < batch[-1].seq:
                # The control plane stored the batch (no error) yet acks less:
                # stop rather than resend it in a loop.
                log.warning("telemetry acked seq %d below sent seq %d", acked, batch[-1].seq)
                return result
        return result

    async def _upload(self, batch: Sequence[Pending]) -> int:
        credential = self._credential if isinstance(self._credential, str) else self._credential()
        response = await self._stub.UploadTelemetry(
            device_pb2.UploadTelemetryRequest(samples=[to_proto(p) for p in batch]),
            metadata=(("authorization", f"Bearer {credential}"),),
            timeout=self._timeout,
        )
        acked = int(response.acked_seq)
        await asyncio.to_thread(self.buffer.ack, acked)
        return acked

    async def _upload_one_by_one(self, batch: Sequence[Pending], result: FlushResult) -> bool:
        """Send a refused batch one sample at a time, discarding those refused;
        False when another failure stops the flush."""
        for pending in batch:
            try:
                result.acked_seq = await self._upload([pending])
                result.uploaded += 1
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    self._refused(exc, result)
                    return False
                log.warning("telemetry sample seq=%d refused: %s", pending.seq, exc.details())
                await asyncio.to_thread(self.buffer.discard, pending.seq)
                result.discarded += 1
        return True

    def _refused(self, exc: grpc.aio.AioRpcError, result: FlushResult) -> None:
        """An upload failed for a reason resending may fix: keep the samples;
        when the control plane named a delay, send nothing before it ends."""
        result.error = exc.code()
        delay = retry_after_s(exc) if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
        if delay is None:
            log.info("telemetry upload failed (%s); kept buffered", exc.code().name)
            return
        # Jitter only ever adds: devices refused together do not come back
        # together, and none comes back before it was told to.
        delay *= 1 + RETRY_JITTER * random.random()
        self._retry_at = self._monotonic() + delay
        result.retry_after_s = delay
        log.info(
            "telemetry rate-limited by the control plane; kept buffered, next upload in %.1f s",
            delay,
        )
