"""`sms-dispatch` process commands: the API, the Celery worker and beat (each under a small
supervisor that restarts it), Flower, the provider simulator, migrations, and `dev`, which runs
them all on this machine.

Processes are started by module path (`api.app:create_app`, `worker.celery_app`,
`simulator.server`) so this module, like all of `shared`, never imports what it launches."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import click

from shared.cli.provisioning import DEMO_KEY, DEMO_TENANT
from shared.core.settings import VAR_DIR, Settings, get_settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@click.command()
@click.option("--host", default=None, help="Bind address (default: SMSD_API_HOST).")
@click.option("--port", type=int, default=None, help="Port (default: SMSD_API_PORT).")
@click.option("--workers", type=int, default=1, help="Server processes.")
def api(host: str | None, port: int | None, workers: int) -> None:
    """Serve the HTTP API."""
    import uvicorn

    settings = get_settings()
    try:
        import httptools  # noqa: F401

        # httptools bounds nothing before the app runs: this subclass bounds the headers.
        http = "api.server:BoundedHttpToolsProtocol"
    except ImportError:
        http = "h11"
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=20,
        http=http,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=settings.api_max_connections,
        # The client address comes from SMSD_TRUSTED_PROXY_HEADER alone: uvicorn's own
        # default would believe X-Forwarded-For from any local process.
        proxy_headers=False,
    )


def _celery(*args: str, quiet: bool = False) -> None:
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", "-A", "worker.celery_app", *(["--quiet"] if quiet else []), *args]
    celery_main()


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--concurrency", "-c", type=int, default=None, help="Sends in flight per process.")
@click.option("--beat", is_flag=True, help="Also run the sweeper schedule (single-process setups).")
@click.option(
    "--lane",
    type=click.Choice(["all", "realtime", "bulk", "callbacks"]),
    default="all",
    show_default=True,
    help=(
        "Which work: single sends (realtime), bulk batches (bulk), status callbacks to "
        "callers (callbacks) or all of them; see the README."
    ),
)
@click.option("--quiet", is_flag=True, help="No start-up banner.")
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Serve Prometheus metrics on this port (default: SMSD_WORKER_METRICS_PORT; 0 = off).",
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(
    concurrency: int | None,
    beat: bool,
    lane: str,
    quiet: bool,
    metrics_port: int | None,
    celery_args: tuple[str, ...],
) -> None:
    """Run a Celery worker for sends (of one lane, or every one) and sweeps."""
    if metrics_port is not None:
        # The worker reads its settings again in this process: make the option one of them.
        os.environ["SMSD_WORKER_METRICS_PORT"] = str(metrics_port)
        get_settings.cache_clear()
    settings = get_settings()
    if settings.worker_metrics_port:
        _require_free_port(
            settings.worker_metrics_host, settings.worker_metrics_port, "SMSD_WORKER_METRICS_PORT"
        )
    from shared.core.broker import lane_queues  # Celery's import, only for this command

    queues = ",".join(lane_queues(settings, lane))
    # No -E: task events follow SMSD_TASK_EVENTS (worker_send_task_events), off by default, as
    # each is a broker publish per task (a sixth of a busy worker's CPU). A running Flower turns
    # them on (and they stay on until the workers restart): see docs/operations.md.
    args = ["worker", "-Q", queues, "-P", "threads", "--without-mingle", "--without-gossip"]
    if not any(arg in ("-n", "--hostname") or arg.startswith("--hostname=") for arg in celery_args):
        # A node name of its own: several workers on one host must not share Celery's pidbox
        # queue (RabbitMQ refuses the second), and Flower tells them apart.
        args += ["--hostname", f"sms-dispatch-{os.getpid()}@%h"]
    args += ["-c", str(concurrency or settings.worker_concurrency)]
    if lane == "bulk":
        # A bulk worker reserves no tasks beyond the ones it runs: what it held back would
        # stand in front of the next tenant's turn (the pump's window counts the queue only).
        args += ["--prefetch-multiplier", "1"]
    if beat:
        VAR_DIR.mkdir(exist_ok=True)
        args += ["-B", "--schedule", str(VAR_DIR / "celerybeat-schedule")]
    sys.exit(_supervise("worker", _celery_command(*args, *celery_args, quiet=quiet)))


@click.command()
def beat() -> None:
    """Run the periodic sweeper schedule (exactly one per deployment)."""
    VAR_DIR.mkdir(exist_ok=True)
    sys.exit(
        _supervise(
            "beat", _celery_command("beat", "--schedule", str(VAR_DIR / "celerybeat-schedule"))
        )
    )


def _celery_command(*args: str, quiet: bool = False) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app",
        *(["--quiet"] if quiet else []), *args,
    ]  # fmt: skip


# Exit codes that a restart cannot cure: a usage or configuration mistake (click, sysexits).
_NO_RESTART_CODES = frozenset({2, 64, 78})
_RESTART_BACKOFF_FIRST = 1.0
_RESTART_BACKOFF_MAX = 30.0
# A child that ran this long before it died starts again after the shortest backoff.
_RESTART_STABLE_AFTER = 60.0
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _supervise(name: str, command: list[str]) -> int:
    """Run `command` (a Celery worker or beat) in a child process and start it again, after a
    short backoff, whenever it exits without being asked to; returns its last exit code.

    The child stays in our process group, so signalling the group (a terminal's Ctrl-C, `dev`,
    the tests) reaches everything. SIGTERM or SIGINT to this process alone is passed on as
    SIGTERM (Celery's warm shutdown; a second one asks for a cold shutdown) and we exit when
    the child has. Processes the child started (the embedded beat) are left behind when it is
    killed: as their subreaper we inherit them and stop them before the next start."""
    import structlog

    from shared.core.logging import configure_logging

    configure_logging(get_settings())
    log = structlog.get_logger("sms_dispatch.supervisor").bind(process=name)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    stopping: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def on_stop(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if child is not None and child.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM if len(stopping) == 1 else signal.SIGQUIT)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    backoff = _RESTART_BACKOFF_FIRST
    restarts = 0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(command, preexec_fn=_die_with_parent)
        log.info("supervisor.started", pid=child.pid, restarts=restarts)
        code = child.wait()  # signal handlers run meanwhile (PEP 475)
        _stop_orphans(log)
        if stopping:
            log.info("supervisor.stopped", pid=child.pid, exit_code=code)
            return 0 if code < 0 else code
        if code in _NO_RESTART_CODES:
            log.error("supervisor.gave_up", pid=child.pid, exit_code=code)
            return code
        if time.monotonic() - started >= _RESTART_STABLE_AFTER:
            backoff = _RESTART_BACKOFF_FIRST
        restarts += 1
        log.warning(
            "supervisor.restarting",
            pid=child.pid,
            exit_code=code,
            signal=signal.Signals(-code).name if code < 0 else None,
            delay=backoff,
            restarts=restarts,
        )
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return 0
        backoff = min(backoff * 2, _RESTART_BACKOFF_MAX)


def _prctl(option: int, value: int) -> None:
    if sys.platform != "linux":
        return
    import ctypes

    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _die_with_parent() -> None:
    # In the child before exec: should the supervisor itself be killed, the child is asked to
    # stop (SIGTERM, a warm shutdown) rather than run on unsupervised.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _orphans() -> list[int]:
    """Our children still alive: what a killed child left (we are their subreaper)."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc/self").exists() else []:
        if not entry.name.isdigit():
            continue
        with suppress(OSError):
            stat = (entry / "stat").read_text()
            # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
            if stat[stat.rindex(")") + 2 :].split()[1] == me:
                found.append(int(entry.name))
    return found


def _stop_orphans(log: Any) -> None:
    orphans = _orphans()
    if not orphans:
        return
    log.warning("supervisor.stopping_orphans", pids=orphans)
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in orphans:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while orphans and time.monotonic() < deadline:
            for pid in list(orphans):
                with suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == 0:
                        continue
                orphans.remove(pid)
            time.sleep(0.05)
        if not orphans:
            return


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--port", type=int, default=5555, show_default=True, help="HTTP port.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Bind address.")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(port: int, address: str, flower_args: tuple[str, ...]) -> None:
    """Run Flower (workers, tasks, queues) against the configured broker.

    Basic auth: SMSD_FLOWER_BASIC_AUTH or FLOWER_BASIC_AUTH, "user:password[,user:password]".
    Other Flower options go after the command or in FLOWER_* variables."""
    auth = get_settings().flower_basic_auth
    if auth is not None:
        # Through the environment, where Flower reads it: never on a command line.
        os.environ["FLOWER_BASIC_AUTH"] = auth.get_secret_value()
    if not os.environ.get("FLOWER_BASIC_AUTH") and address not in ("127.0.0.1", "::1", "localhost"):
        click.echo(
            f"warning: Flower on {address} without basic auth: anyone who reaches it sees every "
            "worker and task (set SMSD_FLOWER_BASIC_AUTH)",
            err=True,
        )
    _celery("flower", f"--port={port}", f"--address={address}", *flower_args)


@click.command()
@click.option("--host", default=None, help="Bind address (default: SMSD_SIMULATOR_HOST).")
@click.option("--port", type=int, default=None, help="HTTP port (default: SMSD_SIMULATOR_PORT).")
@click.option(
    "--tls-port", type=int, default=None, help="HTTPS port (default: SMSD_SIMULATOR_TLS_PORT)."
)
def simulator(host: str | None, port: int | None, tls_port: int | None) -> None:
    """Serve the provider simulator on HTTP and HTTPS (generic, Twilio and Vonage APIs)."""
    # By module path in this very process (exec), as the other processes are started by
    # theirs: shared never imports the simulator. The options reach it as the settings they
    # stand for; it prints a busy port as one line and exits 1, as a click error would.
    options = {
        "SMSD_SIMULATOR_HOST": host,
        "SMSD_SIMULATOR_PORT": port,
        "SMSD_SIMULATOR_TLS_PORT": tls_port,
    }
    given = {name: str(value) for name, value in options.items() if value is not None}
    command = [sys.executable, "-m", "simulator.server"]
    os.execve(sys.executable, command, {**os.environ, **given})  # noqa: S606 (our own module)


@click.command()
def migrate() -> None:
    """Bring the database schema to the latest migration."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    command.upgrade(config, "head")


@click.command()
def dev() -> None:
    """Everything on this machine: migrate, seed, then API, worker+sweeper and simulator."""
    settings = get_settings()
    for host, port, setting in (
        (settings.api_host, settings.api_port, "SMSD_API_PORT"),
        (settings.simulator_host, settings.simulator_port, "SMSD_SIMULATOR_PORT"),
        (settings.simulator_host, settings.simulator_tls_port, "SMSD_SIMULATOR_TLS_PORT"),
    ):
        _require_free_port(host, port, setting)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    exe = [sys.executable, "-m", "shared.cli"]
    subprocess.run([*exe, "migrate"], check=True, env=env)
    subprocess.run([*exe, "seed-demo"], check=True, env=env)
    # SIGTERM (systemd, docker, an IDE's stop button) must tidy up exactly as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    # Also when started in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    children: list[subprocess.Popen[bytes]] = []
    try:
        if settings.redis_url:
            # One worker per lane (the bulk one also delivers status callbacks); their rate
            # limits are shared in Redis.
            workers = [
                ["worker", "--lane", "realtime", "--beat", "-c", "8", "--quiet"],
                ["worker", "--lane", "bulk", "-c", "4", "--quiet"],
            ]
        else:
            # Embedded (no Redis): one worker for every lane, so the sender limits and the bulk
            # lane's rate, kept in its memory, hold for every send.
            workers = [["worker", "--beat", "-c", "8", "--quiet"]]
        for args in (["simulator"], *workers, ["api"]):
            # Each child leads its own process group, so stopping it also stops what it
            # started (the worker's embedded beat), even if it has to be killed.
            children.append(subprocess.Popen([*exe, *args], env=env, start_new_session=True))
        _wait_until_ready(settings, children)
        click.echo(_demo_instructions(settings))
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        raise click.ClickException("a process of the service stopped; see its output above")
    except KeyboardInterrupt:
        pass
    finally:
        _stop_all(children)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _require_free_port(host: str, port: int, setting: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: a port only in TIME_WAIT after a restart is free, a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise click.ClickException(
                f"{host}:{port} is already in use; stop what listens there or set {setting} "
                "to another port"
            ) from None


def _wait_until_ready(settings: Settings, children: list[subprocess.Popen[bytes]]) -> None:
    import httpx

    url = f"http://{settings.api_host}:{settings.api_port}/health/ready"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise click.ClickException("a process of the service failed to start; see above")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise click.ClickException(f"{url} did not become ready within 60 s")


def _stop_all(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        _signal_group(child, signal.SIGTERM)
    for child in children:
        with suppress(subprocess.TimeoutExpired):
            child.wait(timeout=20)
        _signal_group(child, signal.SIGKILL)  # whatever is left of its group


def _signal_group(child: subprocess.Popen[bytes], signum: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(child.pid, signum)


def _demo_instructions(settings: Settings) -> str:
    base = (
        f"{settings.public_base_url.rstrip('/')}/interact/version/3/account/{DEMO_TENANT}/resources"
    )
    headers = f"-H 'Tenant-Id: {DEMO_TENANT}' -H 'Application-Key: {DEMO_KEY}' -H 'Content-Type: application/json'"  # noqa: E501 (printed whole, to be pasted)
    return f"""
sms-dispatch is running: API {settings.public_base_url}  (OpenAPI: {settings.public_base_url}/schema)
Paste this to get a token for the call, then send its SMS:

TOKEN=$(curl -s -X POST {base}/token {headers} \\
  -d '{{"callerId": "+972 54 4696388"}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["jpToken"])')
curl -s -X POST {base}/campaign/sms/campaign1 {headers} \\
  -d '{{"callerId": "+972 54 4696388", "jpToken": "'$TOKEN'", "additionalParams": "var1=value1&var2=value"}}'; echo

Look a message up by its messageSid:
curl -s {base}/messages/SM... -H 'Tenant-Id: {DEMO_TENANT}' -H 'Application-Key: {DEMO_KEY}'; echo

Then look at the call in the Deflected Call Report (smsSent):
curl -s {base}/reports/deflected-calls -H 'Tenant-Id: {DEMO_TENANT}' -H 'Application-Key: {DEMO_KEY}'; echo

Ctrl-C stops everything.
"""  # noqa: E501 (the curl commands are printed whole, to be pasted)


# What `shared.cli` adds to `sms-dispatch`.
COMMANDS: tuple[click.Command, ...] = (api, worker, beat, flower, simulator, migrate, dev)
