"""A throwaway Redis the fault tests own: kill it, bring it back empty or with its data.

Loopback only, a free port, data in a temp dir. Not persistent (`--save "" --appendonly no`)
unless `persistent=True`, which writes every command to the append-only file before it
answers (`--appendfsync always`), so a SIGKILLed server comes back with all it acknowledged."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from tests.support.services import free_port

START_TIMEOUT = 10.0


class RedisControl:
    def __init__(self, *, persistent: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found on PATH")
        self._binary = binary
        self.persistent = persistent
        self.dir = Path(tempfile.mkdtemp(prefix="redis-fault-"))
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)

    def start(self) -> None:
        assert self._proc is None or self._proc.poll() is not None, "already running"
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        cmd = [
            self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", *persistence, "--daemonize", "no", "--loglevel", "warning",
        ]  # fmt: skip
        with (self.dir / "redis.log").open("ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log_text = (self.dir / "redis.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"redis-server did not start on {self.port}:\n{log_text}")
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save."""
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=10)

    def restart_empty(self) -> None:
        """Start again on the same port with nothing in it (whatever it had is gone)."""
        if self._proc is not None and self._proc.poll() is None:
            self.kill()
        for path in self.dir.iterdir():
            if path.name != "redis.log":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.start()

    def restart_with_data(self) -> None:
        """Start again on the same port from its append-only file."""
        assert self.persistent, "only a persistent server keeps its data"
        if self._proc is not None and self._proc.poll() is None:
            self.kill()
        self.start()

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisControl:
        self.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()
