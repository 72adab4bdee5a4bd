"""`edgefleet telemetry`: what the fleet's agents report, bucketed over time."""

from __future__ import annotations

from datetime import datetime, timedelta

import click
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.base import (
    emit,
    enum_option,
    json_option,
    label_option,
    now,
    parsed,
    pass_env,
)
from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.client.syntax import enum_choices, enum_value, parse_duration
from edgefleet.v1 import operator_pb2


@click.group()
def telemetry() -> None:
    """Agent telemetry: latency, errors, load, memory, temperature and battery."""


@telemetry.command("query")
@click.argument(
    "metric",
    metavar="METRIC",
    type=click.Choice(list(enum_choices(operator_pb2.TelemetryMetric)), case_sensitive=False),
    callback=parsed(lambda text: enum_value(operator_pb2.TelemetryMetric, text)),
)
@enum_option(
    "--by", "group_by", wrapper=operator_pb2.TelemetryGroupBy, help="One series per group."
)
@click.option(
    "--since",
    default="1h",
    show_default=True,
    callback=parsed(parse_duration),
    help="How far back from now (30m, 24h, 7d).",
)
@click.option(
    "--step", callback=parsed(parse_duration), help="Bucket length (default: 1/60 of --since)."
)
@click.option(
    "--device",
    "device_id",
    default="",
    help="Only this device (its name, id or a unique id prefix).",
)
@click.option("--class", "class_name", default="", help="Only devices of this class.")
@click.option("--model", "model_name", default="", help="Only this model.")
@click.option("--version", "model_version", default="", help="Only this model version.")
@label_option("Only devices carrying this label now; repeatable.")
@json_option
@pass_env
def telemetry_query(
    env: Connection,
    metric: operator_pb2.TelemetryMetric.ValueType,
    group_by: operator_pb2.TelemetryGroupBy.ValueType | None,
    since: timedelta,
    step: timedelta | None,
    device_id: str,
    class_name: str,
    model_name: str,
    model_version: str,
    labels: tuple[tuple[str, str], ...],
    as_json: bool,
) -> None:
    """Query METRIC bucketed over time: latency-p50-ms, latency-p95-ms,
    latency-p99-ms, latency-max-ms, error-rate, timeout-rate, request-rate,
    request-count, error-count, memory-mb, cpu-percent, dropped-samples,
    system-memory-percent, temperature-c, battery-percent,
    fallback-request-count, fallback-share or model-memory-mb (the memory
    one model adds; memory-mb is the agent's whole resident memory).

    Latency percentiles are the worst device-interval in each bucket; rates
    and the fallback share are sums over sums (errors / requests, requests
    the lighter fallback artifact served / requests); memory, system memory and
    temperature are the maximum, battery the minimum, cpu the mean. Buckets
    without samples are left out. Telemetry older than the server's
    retention is kept as hourly rollups: there, points are per hour."""
    end = now()
    request = operator_pb2.QueryTelemetryRequest(
        metric=metric,
        group_by=group_by or operator_pb2.TELEMETRY_GROUP_BY_UNSPECIFIED,
        device_id=device_id,
        class_name=class_name,
        model_name=model_name,
        model_version=model_version,
        labels=dict(labels),
    )
    request.start.CopyFrom(_ts(end - since))
    request.end.CopyFrom(_ts(end))
    if step is not None:
        duration = Duration()
        duration.FromTimedelta(step)
        request.step.CopyFrom(duration)
    resp = env.stub.QueryTelemetry(request)
    emit(as_json, resp.series, lambda: render.telemetry_table(resp.series, metric))


def _ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp
