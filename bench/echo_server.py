"""A bare grpc.aio DeviceService: the baseline the control plane is measured
against in bench_sync.py.

It implements only what the benchmark drives, with no authentication, no
database and no business logic:

* Enroll answers every request with the same fixed EnrollResponse;
* Sync answers the first message (Hello) with an empty DesiredState and every
  Heartbeat with HeartbeatAck(seq).

It runs as one process with one event loop, like `edgefleet server`, binds the
address given by --listen (port 0 picks a free port), writes the bound port to
--port-file once it listens, and stops gracefully on SIGTERM or SIGINT.

    python bench/echo_server.py --listen 127.0.0.1:0 --port-file /tmp/echo.port
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from edgefleet.fsutil import atomic_write
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc

EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
_ENROLLED = device_pb2.EnrollResponse(
    device_id="echo-device",
    device_credential="echo-credential",
    state=common_pb2.DEVICE_STATE_ACCEPTED,
)


class EchoDeviceService(device_pb2_grpc.DeviceServiceServicer):
    """Enroll and Sync with no work behind them."""

    async def Enroll(
        self, request: device_pb2.EnrollRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> device_pb2.EnrollResponse:
        return _ENROLLED

    async def Sync(  # type: ignore[override]  # read/write API, not a generator
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        # The read/write API: nothing between the stream and the handler. An
        # `async for` over the requests, or a reader task feeding a queue (the
        # control plane's shape), differed by less than the noise (about 10 %)
        # in a short test under background load.
        first = await context.read()
        if first is EOF:
            return
        await context.write(device_pb2.ControlMessage(desired=device_pb2.DesiredState()))
        while True:
            message = await context.read()
            if message is EOF:
                return
            if message.WhichOneof("kind") == "heartbeat":
                ack = device_pb2.HeartbeatAck(seq=message.heartbeat.seq)
                await context.write(device_pb2.ControlMessage(heartbeat_ack=ack))

    async def DownloadArtifact(  # type: ignore[override]
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "echo server")

    async def UploadTelemetry(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> device_pb2.UploadTelemetryResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "echo server")

    async def RenewCertificate(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> device_pb2.RenewCertificateResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "echo server")


async def serve(listen: str, port_file: Path | None, grace_s: float) -> None:
    server = grpc.aio.server()
    device_pb2_grpc.add_DeviceServiceServicer_to_server(EchoDeviceService(), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise SystemExit(f"echo_server: cannot bind {listen}")
    await server.start()
    if port_file is not None:
        atomic_write(port_file, f"{port}\n".encode())  # never a partial number

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(grace_s)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port; port 0 picks one")
    parser.add_argument("--port-file", type=Path, help="written with the bound port")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds to drain on SIGTERM")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, args.port_file, args.grace))


if __name__ == "__main__":
    main()
