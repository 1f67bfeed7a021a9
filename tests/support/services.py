"""Throwaway PostgreSQL and Redis servers for the test suite (stdlib only).

``postgres_server()`` and ``redis_server()`` are context managers that yield a
connection URL. If ``TEST_DATABASE_URL`` / ``TEST_REDIS_URL`` is set, that URL
is yielded as-is and nothing is started, so a developer can point the suite at
servers of their own. Otherwise a private server is started from the binaries
installed on this machine, on a free loopback port, with its data in a temp
dir, and torn down (and the dir removed) on exit.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["free_port", "postgres_server", "rabbitmq_server", "redis_server"]

PG_DATABASE = "sms_dispatch_test"
PG_USER = "postgres"  # superuser created by initdb, and the system account
START_TIMEOUT = 10.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- PostgreSQL -------------------------------------------------------------


def _pg_bindir() -> Path:
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        bindir = Path(out.stdout.strip())
        if out.returncode == 0 and (bindir / "initdb").exists():
            return bindir
    # Debian keeps the server binaries off PATH, one dir per major version.
    versions = list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if versions:
        newest = max(versions, key=lambda p: int(p.parent.parent.name))
        return newest.parent
    initdb = shutil.which("initdb")
    if initdb:  # resolve symlinks so that pg_ctl & co. sit next to it
        return Path(os.path.realpath(initdb)).parent
    raise RuntimeError("PostgreSQL binaries not found (no pg_config/initdb)")


def _as_postgres_prefix() -> list[str]:
    """Command prefix that drops root to the ``postgres`` system user.

    initdb and postgres refuse to run as root (CI runs as root), so every
    PostgreSQL binary goes through runuser (util-linux's su for root scripts:
    no authentication, no shell quoting, and it runs for a system user whose
    login shell is nologin). Non-root users run the binaries directly.
    """
    if os.geteuid() != 0:
        return []
    if runuser := shutil.which("runuser"):
        return [runuser, "-u", PG_USER, "--"]
    if setpriv := shutil.which("setpriv"):
        pw = pwd.getpwnam(PG_USER)
        ids = f"--reuid={pw.pw_uid} --regid={pw.pw_gid} --init-groups"
        return [setpriv, *ids.split(), "--"]
    raise RuntimeError("running as root, but neither runuser nor setpriv found")


def _make_tempdir(prefix: str) -> Path:
    base = tempfile.gettempdir()
    if os.geteuid() == 0:
        # postgres must be able to traverse every parent of its data dir.
        parents = [Path(base), *Path(base).parents]
        if not all(p.stat().st_mode & 0o001 for p in parents):
            base = "/tmp"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _chown_tree(root: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    os.chown(root, pw.pw_uid, pw.pw_gid)
    for path in root.rglob("*"):
        os.chown(path, pw.pw_uid, pw.pw_gid)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a SQLAlchemy URL of a fresh, empty ``sms_dispatch_test`` database."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
        return

    bindir = _pg_bindir()
    prefix = _as_postgres_prefix()
    tmp = _make_tempdir("pg-test-")
    data, sockdir, log = tmp / "data", tmp / "sock", tmp / "server.log"
    sockdir.mkdir()
    if prefix:
        _chown_tree(tmp, PG_USER)
    port = free_port()

    def run(*args: str) -> None:
        # cwd=tmp: the caller's cwd (e.g. /root) may be unreadable to postgres.
        cmd = [*prefix, str(bindir / args[0]), *args[1:]]
        res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed (exit {res.returncode}):\n{res.stdout}"
                f"{res.stderr}\n--- server log ---\n{_log_tail(log)}"
            )

    try:
        flags = f"-U {PG_USER} --auth=trust -E UTF8 --no-sync".split()
        run("initdb", "-D", str(data), *flags)
        # Durability is pointless for a throwaway cluster; turning it off
        # makes DDL-heavy test setup much faster.
        opts = (
            f"-p {port} -k {sockdir} -h 127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=200"
        )
        run("pg_ctl", "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, PG_DATABASE)
        yield f"postgresql+psycopg://{PG_USER}@127.0.0.1:{port}/{PG_DATABASE}"
    finally:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                run("pg_ctl", "-D", str(data), "stop", "-m", "immediate", "-w")
        shutil.rmtree(tmp, ignore_errors=True)


# --- Redis ------------------------------------------------------------------


def _redis_answers(port: int, datadir: Path) -> bool:
    """True once *our* redis-server answers PING on ``port``.

    Also asks for its ``dir``: if another server grabbed the port first, ours
    exits, and we must not mistake the other one (whose data tests may flush)
    for it.
    """
    expected = os.path.realpath(datadir).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\nCONFIG GET dir\r\n")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
                if reply.endswith(b"\r\n") and reply.count(b"\r\n") >= 6:
                    break
            return reply.startswith(b"+PONG") and expected + b"\r\n" in reply
    except OSError:
        return False


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Yield the URL of a fresh, empty, non-persistent Redis server."""
    if url := os.environ.get("TEST_REDIS_URL"):
        yield url
        return

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found on PATH")
    tmp = _make_tempdir("redis-test-")
    log = tmp / "redis.log"
    port = free_port()
    flags = "--bind 127.0.0.1 --appendonly no --daemonize no --loglevel warning"
    cmd = [binary, "--port", str(port), "--dir", str(tmp), "--save", "", *flags.split()]
    with log.open("wb") as log_file:
        # New session: a Ctrl-C aimed at pytest must not kill it mid-teardown.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _redis_answers(port, tmp):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}:\n{_log_tail(log)}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _amqp_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")  # the AMQP 0-9-1 protocol header
            return sock.recv(1) == b"\x01"  # a Connection.Start method frame follows
    except OSError:
        return False


@contextlib.contextmanager
def rabbitmq_server() -> Iterator[str]:
    """Yield the AMQP URL of a throwaway RabbitMQ node (or TEST_AMQP_URL's)."""
    if url := os.environ.get("TEST_AMQP_URL"):
        yield url
        return
    binary = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
    if not binary.exists():
        binary = Path(shutil.which("rabbitmq-server") or "rabbitmq-server")
    tmp = _make_tempdir("rabbitmq-test-")
    port, dist_port = free_port(), free_port()
    # Its own node name, ports and directories, so the machine's RabbitMQ is never touched.
    env = {
        **os.environ,
        "HOME": str(tmp),
        "RABBITMQ_NODENAME": f"smsdtest{port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(tmp / "mnesia"),
        "RABBITMQ_LOG_BASE": str(tmp / "log"),
        "RABBITMQ_PID_FILE": str(tmp / "rabbit.pid"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(tmp / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(tmp / "rabbitmq"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(tmp / "advanced.config"),
    }
    log = tmp / "rabbitmq.out"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [str(binary)],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60  # an Erlang node takes several seconds to boot
        while not _amqp_answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rabbitmq did not start on port {port}:\n{_log_tail(log)}")
            time.sleep(0.2)
        yield f"amqp://guest:guest@127.0.0.1:{port}//"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
