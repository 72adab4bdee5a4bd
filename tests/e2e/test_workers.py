"""`edgefleet server --workers N`. On the embedded SQLite file the workers
queue for SQLite's writer across processes (two workers in one process
hearing each other's events: tests/integration/test_workers.py). The supervisor
starts them on one port, refuses a port already served, restarts one that
dies and stops them all, and they stop with it. On PostgreSQL they serve
one fleet too."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from sqlalchemy import text

from edgefleet.controlplane.db.engine import make_engine, sqlite_url
from edgefleet.controlplane.db.uow import Database
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from testkit.agent_harness import AgentProcess
from testkit.harness import ControlPlane, wait_for

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers need Linux"),
]


def test_a_writer_in_another_process_holds_this_ones_back(tmp_path: Path) -> None:
    db = Database(make_engine(sqlite_url(tmp_path)))
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import fcntl, sys\n"
            f"f = open({str(tmp_path / 'edgefleet.db')!r} + '-writers.lock', 'a+b')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "sys.stdin.readline()\n"
        )],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        wrote = threading.Event()

        def write() -> None:
            with db.unit_of_work() as uow:
                uow.session.execute(text("CREATE TABLE t (x INTEGER)"))
                uow.commit()
            wrote.set()

        writer = threading.Thread(target=write)
        writer.start()
        assert not wrote.wait(1.0), "wrote while another process held the writers' lock"
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert wrote.wait(10), "the writer did not get the lock once it was let go"
        writer.join()
    finally:
        holder.kill()
        holder.wait()
        db.dispose()
    # And this process's lock is let go after the write: another process gets it.
    with open(tmp_path / "edgefleet.db-writers.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _workers_of(supervisor: int) -> list[psutil.Process]:
    """The supervisor's live worker processes (not multiprocessing's
    resource tracker, nor a dead worker not yet reaped)."""
    found = []
    for child in psutil.Process(supervisor).children():
        try:
            if any("spawn_main" in part for part in child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def test_edgefleet_server_serves_with_two_workers_restarts_one_and_stops(
    tmp_path: Path,
) -> None:
    cp = ControlPlane(tmp_path / "cp", None, "--workers", "2", tls=True)
    agents: list[AgentProcess] = []
    try:
        cp.start()
        assert cp.proc is not None
        first = wait_for(lambda: len(w := _workers_of(cp.proc.pid)) == 2 and w, 30)
        op = cp.operator()
        token = op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="w")).secret
        agents = [
            AgentProcess(tmp_path / f"agent-{i}", cp.address, token, ca_cert=str(cp.ca_file))
            for i in range(3)
        ]
        for agent in agents:
            agent.start()
        ids = [str(agent.wait_for(agent.identity, timeout=60)["device_id"]) for agent in agents]

        def labelled(value: str) -> None:
            for device_id in ids:
                op.UpdateDeviceLabels(o.UpdateDeviceLabelsRequest(id=device_id, set={"v": value}))
            for agent in agents:
                agent.wait_for(
                    lambda a=agent: (a.desired() or {}).get("labels", {}).get("v") == value,
                    timeout=60,
                )

        labelled("before")
        os.kill(first[1].pid, signal.SIGKILL)
        again = wait_for(
            lambda: len(w := _workers_of(cp.proc.pid)) == 2 and first[1] not in w and w, 60
        )
        assert first[0] in again
        assert "restarting" in cp.log()
        restarted = next(w for w in again if w != first[0])
        serving = re.compile(rf"worker \d \(pid {restarted.pid}\) is serving again")
        wait_for(lambda: serving.search(cp.log()), 60)
        # Agents that were on the killed worker reconnect; every one still hears.
        labelled("after")
        assert restarted.is_running() and restarted in _workers_of(cp.proc.pid)
        assert cp.stop(60) == 0
        assert not any(w.is_running() for w in again)
    finally:
        for agent in agents:
            agent.close()
        cp.close()


def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp", None, "--workers", "2")
    try:
        cp.start()
        assert cp.proc is not None
        workers = wait_for(lambda: len(w := _workers_of(cp.proc.pid)) == 2 and w, 30)
        cp.kill()
        # Orphans would go on serving the port with nobody to stop them.
        psutil.wait_procs(workers, timeout=30)
        assert not any(w.is_running() for w in workers)
    finally:
        cp.close()


def test_a_port_already_served_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        edgefleet = str(Path(sys.executable).parent / "edgefleet")
        done = subprocess.run(
            [edgefleet, "server", "--insecure", "--workers", "2",
             "--data-dir", str(tmp_path / "cp"), "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "worker 0" not in done.stderr


def test_workers_on_postgresql_serve_one_fleet(pg_url: str, tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp", pg_url, "--workers", "2")
    try:
        cp.start()
        assert cp.proc is not None
        wait_for(lambda: len(_workers_of(cp.proc.pid)) == 2, 30)
        token = cp.operator().CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="pg"))
        # A channel each: the kernel spreads connections over both workers.
        enrolled = []
        for i in range(6):
            with cp.channel() as channel:
                enrolled.append(dg.DeviceServiceStub(channel).Enroll(
                    d.EnrollRequest(enrollment_token=token.secret, hardware_id=f"pg-{i}")
                ).device_id)  # fmt: skip
        listed = cp.operator().ListDevices(o.ListDevicesRequest(page_size=100))
        assert sorted(x.id for x in listed.devices) == sorted(enrolled)
        assert cp.stop(60) == 0
    finally:
        cp.close()
