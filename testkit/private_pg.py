"""A PostgreSQL cluster of the test's own, to restart and kill under load
without touching the machine's shared server (other tests and people use it).

initdb refuses to run as root, so as root the cluster belongs to the
`postgres` user (`runuser -u postgres --`) in a temporary directory it owns;
as any other user it is that user's. Trust auth on 127.0.0.1, a free port,
the unix socket in the cluster's directory."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg


def postgres_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin with initdb, or pg_ctl's dir on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _major(path: str) -> int:
    version = Path(path).parent.parent.name
    return int(version) if version.isdigit() else 0


def unavailable_reason() -> str | None:
    """Why a private cluster cannot be made here, or None."""
    if postgres_bin_dir() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and initdb refuses root: no `postgres` user to run it as"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivatePostgres:
    """initdb, start, restart (fast or immediate), stop, and URLs for one
    database, `edgefleet`. `close()` stops the cluster and deletes it."""

    def __init__(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError(unavailable_reason() or "no PostgreSQL binaries")
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self.user = "postgres" if self._as_postgres else pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bin_dir / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr or done.stdout}")

    def _pg_ctl(self, action: str, *args: str) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run("pg_ctl", action, "-D", str(self.data), "-l", str(self.log_path),
                  "-o", options, "-w", "-t", "60", *args)  # fmt: skip

    def start(self) -> PrivatePostgres:
        """initdb on first use, then start and create the database."""
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust",
                      "--no-sync", "-E", "UTF8")  # fmt: skip
            self._pg_ctl("start")
            with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                conn.execute("CREATE DATABASE edgefleet")
        else:
            self._pg_ctl("start")
        return self

    def restart(self, mode: str = "fast") -> None:
        """`pg_ctl restart -m fast|immediate` (immediate: no checkpoint, like a crash)."""
        self._pg_ctl("restart", "-m", mode)

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60")

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        """psycopg's connection string for the `edgefleet` database."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/edgefleet"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL the control plane takes (--db)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/edgefleet"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["PrivatePostgres", "postgres_bin_dir", "unavailable_reason"]
