"""A throwaway PostgreSQL cluster a fault test can freeze, stop and start again.

Built like tests/support/services.py `postgres_server` (its helpers, imported): initdb into a
temp dir, loopback only, trust auth. Besides `url` it offers

- `pause()`: SIGSTOP the postmaster and every process of the cluster (its children: backends,
  checkpointer, walwriter, ...). The kernel still completes TCP handshakes and ACKs packets,
  so clients see a server that accepts bytes and never answers: a frozen host, not a dead one.
- `resume()`: SIGCONT them all.
- `stop()` / `start()`: pg_ctl, `-m immediate` by default (a crash, as far as clients can tell).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.services import (
    PG_DATABASE,
    PG_USER,
    _as_postgres_prefix,
    _chown_tree,
    _log_tail,
    _make_tempdir,
    _pg_bindir,
    free_port,
)


class PostgresControl:
    """One private cluster; `close()` (or the context manager) removes everything."""

    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        self.prefix = _as_postgres_prefix()
        self.tmp = _make_tempdir("pg-fault-")
        self.data = self.tmp / "data"
        self.sockdir = self.tmp / "sock"
        self.log = self.tmp / "server.log"
        self.sockdir.mkdir()
        if self.prefix:
            _chown_tree(self.tmp, PG_USER)
        self.port = free_port()
        self.url = f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{PG_DATABASE}"
        self._paused: list[int] = []

    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = [*self.prefix, str(self.bindir / args[0]), *args[1:]]
        res = subprocess.run(
            cmd, cwd=self.tmp, capture_output=True, text=True, check=False, timeout=timeout
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed (exit {res.returncode}):\n{res.stdout}{res.stderr}"
                f"\n--- server log ---\n{_log_tail(self.log)}"
            )

    def create(self) -> None:
        flags = f"-U {PG_USER} --auth=trust -E UTF8 --no-sync".split()
        self._run("initdb", "-D", str(self.data), *flags)
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, PG_DATABASE)

    def start(self) -> None:
        # Unlike the suite's cluster, synchronous_commit stays on: an immediate stop must not
        # lose a commit that was answered 200 (fsync=off is safe: the OS does not crash here).
        opts = (
            f"-p {self.port} -k {self.sockdir} -h 127.0.0.1 -c fsync=off"
            " -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "start")

    def stop(self, mode: str = "immediate") -> None:
        self.resume()  # a stopped postmaster would never hear pg_ctl
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "stop", "-m", mode, "-w")

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def processes(self) -> list[int]:
        """The postmaster and all its children (backends and auxiliary processes)."""
        postmaster = self.postmaster_pid()
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                # Fields after the parenthesised command: state, ppid, ...
                fields = stat.read_text().rpartition(")")[2].split()
                if int(fields[1]) == postmaster:
                    children.append(int(stat.parent.name))
        return [postmaster, *children]

    def pause(self) -> None:
        """Freeze the whole cluster: the postmaster first, so it forks nothing new meanwhile."""
        pids = self.processes()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        # A child forked between the listing and the postmaster's stop: freeze it too.
        late = [pid for pid in self.processes() if pid not in pids]
        for pid in late:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self._paused = pids + late

    def resume(self) -> None:
        for pid in self._paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._paused = []

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def controlled_postgres() -> Iterator[PostgresControl]:
    """A fresh cluster with an empty `sms_dispatch_test` database, removed on exit."""
    pg = PostgresControl()
    try:
        pg.create()
        yield pg
    finally:
        pg.close()
