"""`sms-dispatch`: one command for every process and for provisioning.

Processes are started by module path (`api.app:create_app`, `worker.celery_app`) so this
module, like all of `shared`, never imports the edges it launches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared import accounts
from shared.db import Database
from shared.errors import InvalidParameter, RequestRefused
from shared.models import ProviderAccount, utcnow
from shared.phone import to_e164
from shared.settings import VAR_DIR, Settings, get_settings
from shared.tokens import issue_token

PROJECT_ROOT = Path(__file__).resolve().parents[1]

DEMO_TENANT = "12345678"
DEMO_KEY = "53736e07e4b05772e6475c2d"  # the seed document's sample key, for the local demo only
DEMO_SENDER = "+12121234567"


@click.group()
def main() -> None:
    """sms-dispatch: the Interact Send SMS API, queued through Celery."""


@contextmanager
def _transaction() -> Iterator[Session]:
    """A provisioning transaction whose ordinary mistakes read as one line, not a traceback."""
    db = Database(get_settings())
    try:
        with db.transaction() as session:
            yield session
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    except IntegrityError as exc:
        raise click.ClickException(
            f"that would duplicate an existing record ({exc.orig})"
        ) from None
    except RequestRefused as exc:
        what = f"unknown {exc.parameter}" if isinstance(exc, InvalidParameter) else exc.text
        raise click.ClickException(what) from None
    finally:
        db.dispose()


# Processes


@main.command()
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


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--concurrency", "-c", type=int, default=None, help="Sends in flight per process.")
@click.option("--beat", is_flag=True, help="Also run the sweeper schedule (single-process setups).")
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
    quiet: bool,
    metrics_port: int | None,
    celery_args: tuple[str, ...],
) -> None:
    """Run a Celery worker for sends and sweeps."""
    if metrics_port is not None:
        # The worker reads its settings again in this process: make the option one of them.
        os.environ["SMSD_WORKER_METRICS_PORT"] = str(metrics_port)
        get_settings.cache_clear()
    settings = get_settings()
    if settings.worker_metrics_port:
        _require_free_port(
            settings.worker_metrics_host, settings.worker_metrics_port, "SMSD_WORKER_METRICS_PORT"
        )
    queues = f"{settings.send_queue},{settings.send_queue}.sweep"
    args = ["worker", "-Q", queues, "-P", "threads", "-E", "--without-mingle", "--without-gossip"]
    if not any(arg in ("-n", "--hostname") or arg.startswith("--hostname=") for arg in celery_args):
        # A node name of its own: several workers on one host must not share Celery's pidbox
        # queue (RabbitMQ refuses the second), and Flower tells them apart.
        args += ["--hostname", f"sms-dispatch-{os.getpid()}@%h"]
    args += ["-c", str(concurrency or settings.worker_concurrency)]
    if beat:
        VAR_DIR.mkdir(exist_ok=True)
        args += ["-B", "--schedule", str(VAR_DIR / "celerybeat-schedule")]
    sys.exit(_supervise("worker", _celery_command(*args, *celery_args, quiet=quiet)))


@main.command()
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

    from shared.logging import configure_logging

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


@main.command(context_settings={"ignore_unknown_options": True})
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


@main.command()
@click.option("--host", default=None, help="Bind address (default: SMSD_SIMULATOR_HOST).")
@click.option("--port", type=int, default=None, help="HTTP port (default: SMSD_SIMULATOR_PORT).")
@click.option(
    "--tls-port", type=int, default=None, help="HTTPS port (default: SMSD_SIMULATOR_TLS_PORT)."
)
def simulator(host: str | None, port: int | None, tls_port: int | None) -> None:
    """Serve the provider simulator on HTTP and HTTPS (generic, Twilio and Vonage APIs)."""
    from simulator.server import serve

    options = {"simulator_host": host, "simulator_port": port, "simulator_tls_port": tls_port}
    settings = get_settings().model_copy(
        update={name: value for name, value in options.items() if value is not None}
    )
    try:
        serve(settings)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
def migrate() -> None:
    """Bring the database schema to the latest migration."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    command.upgrade(config, "head")


@main.command("seed-demo")
def seed_demo() -> None:
    """Create the demo account, campaign and simulator provider (safe to run again)."""
    with _transaction() as session:
        account = accounts.ensure_account(session, DEMO_TENANT, "Demo account")
        accounts.add_application_key(session, account, DEMO_KEY)
        environment = accounts.resolve_environment(session, account, None)
        accounts.upsert_campaign(
            session,
            environment,
            "campaign1",
            name="Demo deflection",
            message_text="Skip the queue: continue here <link>",
            link_url="https://example.com/flow",
        )
        if not session.scalar(
            select(ProviderAccount.id).where(ProviderAccount.account_id == account.id)
        ):
            accounts.set_provider(session, account, "simulator", sender_ids=[DEMO_SENDER])
    click.echo(f"demo account {DEMO_TENANT} ready")


@main.command()
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
        for args in (["simulator"], ["worker", "--beat", "-c", "8", "--quiet"], ["api"]):
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
    headers = f"-H 'Tenant-Id: {DEMO_TENANT}' -H 'Application-Key: {DEMO_KEY}' -H 'Content-Type: application/json'"
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
"""


# Provisioning


@main.group()
def account() -> None:
    """Accounts and their application keys."""


@account.command("create")
@click.argument("tenant_id")
@click.option("--name", required=True)
@click.option("--environment", "default_environment", default="PROD", show_default=True)
def account_create(tenant_id: str, name: str, default_environment: str) -> None:
    """Create an account (tenant id `system` makes the system account) and print its key."""
    with _transaction() as session:
        created = accounts.create_account(session, tenant_id, name, default_environment)
        key = None if created.is_system else accounts.add_application_key(session, created)
    click.echo(f"account {tenant_id} created")
    if key:
        click.echo(f"Application-Key: {key}  (shown once; only its hash is stored)")


@account.command("rotate-key")
@click.argument("tenant_id")
@click.option("--revoke-old/--keep-old", default=False, help="Revoke existing keys now.")
def account_rotate_key(tenant_id: str, revoke_old: bool) -> None:
    """Issue a new application key; old keys stay valid unless --revoke-old."""
    with _transaction() as session:
        found = accounts.get_account(session, tenant_id)
        key = accounts.add_application_key(session, found, revoke_others=revoke_old)
    click.echo(f"Application-Key: {key}  (shown once; only its hash is stored)")


@main.group()
def environment() -> None:
    """Environments of an account."""


@environment.command("add")
@click.argument("tenant_id")
@click.argument("name")
@click.option("--default", "make_default", is_flag=True, help="Make it the account's default.")
def environment_add(tenant_id: str, name: str, make_default: bool) -> None:
    with _transaction() as session:
        found = accounts.get_account(session, tenant_id)
        accounts.add_environment(session, found, name)
        if make_default:
            found.default_environment = name
    click.echo(f"environment {name} on {tenant_id}")


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise click.BadParameter(f"{value!r} needs a timezone, e.g. {value}+00:00")
    return parsed


@main.group()
def campaign() -> None:
    """Campaigns of an account's environment."""


@campaign.command("set")
@click.argument("tenant_id")
@click.argument("campaign_id")
@click.option("--environment", "environment_name", default=None, help="Default: the account's.")
@click.option("--name", required=True)
@click.option("--text", "message_text", required=True, help="Message text with <link>.")
@click.option("--link", "link_url", default=None)
@click.option("--inactive", is_flag=True)
@click.option("--shorten", is_flag=True, help="Send /l/<code> short links (counts clicks).")
@click.option("--valid-from", default=None, help="ISO 8601 with timezone.")
@click.option("--valid-until", default=None, help="ISO 8601 with timezone.")
def campaign_set(
    tenant_id: str,
    campaign_id: str,
    environment_name: str | None,
    name: str,
    message_text: str,
    link_url: str | None,
    inactive: bool,
    shorten: bool,
    valid_from: str | None,
    valid_until: str | None,
) -> None:
    """Create or update a campaign."""
    with _transaction() as session:
        found = accounts.get_account(session, tenant_id)
        env = accounts.resolve_environment(session, found, environment_name)
        accounts.upsert_campaign(
            session,
            env,
            campaign_id,
            name=name,
            message_text=message_text,
            link_url=link_url,
            active=not inactive,
            shorten_links=shorten,
            valid_from=_when(valid_from),
            valid_until=_when(valid_until),
        )
    click.echo(f"campaign {campaign_id} saved")


@main.group()
def provider() -> None:
    """Telephony provider settings."""


@provider.command("set")
@click.argument("tenant_id")
@click.argument("provider_name")
@click.option("--sender", "senders", multiple=True, required=True, help="Repeat for several.")
@click.option("--credential", "credentials", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--expires-at", default=None, help="ISO 8601 with timezone.")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--sender-rate", type=float, default=None, help="Segments/s per sender number.")
@click.option("--account-rate", type=float, default=None, help="Segments/s for these settings.")
def provider_set(
    tenant_id: str,
    provider_name: str,
    senders: tuple[str, ...],
    credentials: tuple[str, ...],
    expires_at: str | None,
    priority: int,
    sender_rate: float | None,
    account_rate: float | None,
) -> None:
    """Set an account's provider, its senders and credentials (never echoed back).

    Several providers at different priorities make a failover chain."""
    from shared.providers import missing_credentials, provider_names

    if provider_name not in provider_names():
        raise click.BadParameter(f"choose one of {', '.join(provider_names())}")
    pairs: dict[str, Any] = {}
    for item in credentials:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        pairs[key] = value
    if missing := missing_credentials(provider_name, pairs):
        raise click.BadParameter(f"{provider_name} needs the credentials {', '.join(missing)}")
    with _transaction() as session:
        found = accounts.get_account(session, tenant_id)
        settings_row = accounts.set_provider(
            session,
            found,
            provider_name,
            sender_ids=list(senders),
            credentials=pairs,
            expires_at=_when(expires_at),
            priority=priority,
        )
        settings_row.sender_rate = sender_rate
        settings_row.account_rate = account_rate
        webhook_urls = _webhook_urls(settings_row)
    click.echo(f"provider {provider_name} set for {tenant_id} ({len(pairs)} credentials)")
    for line in webhook_urls:
        click.echo(line)


@provider.command("rotate-callback-token")
@click.argument("tenant_id")
@click.option("--priority", type=int, default=0, show_default=True)
def provider_rotate_callback_token(tenant_id: str, priority: int) -> None:
    """Issue a new secret for the Vonage webhook URLs; the previous one keeps working until
    the next rotation, so set the new URLs in the Vonage dashboard, then rotate again later
    to retire the old secret for good."""
    with _transaction() as session:
        found = accounts.get_account(session, tenant_id)
        settings_row = session.scalar(
            select(ProviderAccount).where(
                ProviderAccount.account_id == found.id,
                ProviderAccount.provider == "vonage",
                ProviderAccount.priority == priority,
            )
        )
        if settings_row is None:
            raise click.ClickException(f"{tenant_id} has no vonage settings at priority {priority}")
        accounts.rotate_callback_token(session, settings_row)
        webhook_urls = _webhook_urls(settings_row)
    for line in webhook_urls:
        click.echo(line)


def _webhook_urls(settings_row: ProviderAccount) -> list[str]:
    """What to paste into the provider's dashboard (the Vonage ones carry a secret)."""
    base = get_settings().public_base_url.rstrip("/")
    if settings_row.provider == "vonage":
        token = settings_row.credentials[accounts.CALLBACK_TOKEN]
        return [
            f"delivery receipts: {base}/callbacks/vonage/{token}",
            f"inbound SMS:       {base}/inbound/vonage/{token}",
        ]
    if settings_row.provider == "twilio":
        return [f"inbound SMS:       {base}/inbound/twilio"]
    return []


@main.group()
def token() -> None:
    """Interaction tokens."""


@token.command("issue")
@click.argument("tenant_id")
@click.argument("caller_id")
@click.option("--environment", "environment_name", default=None)
@click.option("--lifetime", type=int, default=None, help="Seconds (default: SMSD_TOKEN_LIFETIME).")
def token_issue(
    tenant_id: str, caller_id: str, environment_name: str | None, lifetime: int | None
) -> None:
    """Issue a jpToken, as generateToken does."""
    settings = get_settings()
    caller = to_e164(caller_id, settings.default_region)
    if caller is None:
        raise click.BadParameter(f"{caller_id!r} is not a phone number")
    with _transaction() as session:
        found = accounts.get_account(session, tenant_id)
        env = accounts.resolve_environment(session, found, environment_name)
        span = timedelta(seconds=lifetime) if lifetime else settings.token_lifetime
        issued = issue_token(session, found, env, caller, span, utcnow())
    click.echo(json.dumps({"jpToken": issued.token, "expiresAt": issued.expires_at.isoformat()}))


if __name__ == "__main__":
    main()
