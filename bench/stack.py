"""Everything the bench starts on loopback, and stops again: PostgreSQL and Redis (the test suite's
throwaway servers), the API, the bare floor app, Celery workers (real and no-op) and the simulator.

Every process leads its own process group and is stopped by its own id, never by name."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import delete, text

from shared.accounts import access, provisioning
from shared.calls.tokens import issue_token
from shared.core.broker import create_celery
from shared.core.db import Database
from shared.core.logging import configure_logging
from shared.core.models import ProviderAccount, utcnow
from shared.core.settings import Settings, get_settings
from shared.messages.accept import SendSmsCommand, accept_send
from shared.messages.outbox import chunked, publish_batches
from tests.support.services import free_port

ROOT = Path(__file__).resolve().parents[1]
TENANT = "12345678"
KEY = "53736e07e4b05772e6475c2d"  # the seed document's sample key, as in `make run`
CAMPAIGN = "campaign1"
SENDER = "+12121234567"
# The Twilio account the real SDK talks to, on the simulator's Twilio API (which takes any
# AccountSid and token, and signs its status callbacks with the token it was given).
TWILIO_SID = "AC" + "5" * 32
ADDITIONAL_PARAMS = "var1=value1&var2=value"
SEND_PATH = f"/interact/version/3/account/{TENANT}/resources/campaign/sms/{CAMPAIGN}"
HEADERS = {"Tenant-Id": TENANT, "Application-Key": KEY, "Content-Type": "application/json"}


def send_body(token: str, caller: str) -> bytes:
    """The Send SMS v3 body the bench sends: what an IVR sends, with a valid jpToken."""
    return (
        f'{{"callerId": "{caller}", "jpToken": "{token}", '
        f'"additionalParams": "{ADDITIONAL_PARAMS}"}}'
    ).encode()


@dataclass
class Proc:
    """A child process in its own process group, with its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM its group (a warm shutdown hands a worker's tasks back), SIGKILL what stays."""
        self._signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        self._signal(signal.SIGKILL)
        self.popen.wait()

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signum)

    def tree(self) -> list[int]:
        """Its pid and every descendant's (uvicorn's worker processes, say)."""
        return descendants(self.pid)

    def rss_bytes(self) -> int:
        """Resident memory of the process and its descendants."""
        total = 0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total


@dataclass(frozen=True)
class StackConfig:
    api_workers: int
    worker_procs: int
    worker_concurrency: int
    tokens: int = 2000


@dataclass
class Stack:
    """The service on loopback: one PostgreSQL, one Redis, and the processes started on them."""

    workdir: Path
    database_url: str
    redis_url: str
    config: StackConfig
    ports: dict[str, int] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    tokens: list[tuple[str, str]] = field(default_factory=list)
    started_count: int = 0

    def __post_init__(self) -> None:
        self.ports = {name: free_port() for name in ("api", "bare", "simulator", "simulator_tls")}
        self.env = {
            "SMSD_DATABASE_URL": self.database_url,
            "SMSD_BROKER_URL": self.redis_url,
            "SMSD_API_PORT": str(self.ports["api"]),
            "SMSD_PUBLIC_BASE_URL": self.api_url,
            "SMSD_SIMULATOR_PORT": str(self.ports["simulator"]),
            "SMSD_SIMULATOR_URL": self.simulator_url,
            "SMSD_SIMULATOR_TLS_PORT": str(self.ports["simulator_tls"]),
            "SMSD_SIMULATOR_TLS_DIR": str(self.workdir / "simulator-tls"),
            # Production defaults otherwise: INFO, JSON lines (to a file here).
            "SMSD_LOG_JSON": "true",
            "SMSD_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
        # This process provisions and fills queues through the same code, with the same settings.
        os.environ.update(self.env)
        get_settings.cache_clear()
        self.settings: Settings = get_settings()
        configure_logging(self.settings.model_copy(update={"log_level": "WARNING"}))
        self.db = Database(self.settings)
        self.redis = redis.Redis.from_url(self.redis_url)
        self.celery = create_celery(self.settings)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def bare_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['bare']}"

    @property
    def simulator_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['simulator']}"

    # Processes

    def start(self, name: str, argv: list[str]) -> Proc:
        self.started_count += 1
        log = self.workdir / f"{self.started_count:02d}-{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def cli(self, name: str, *args: str) -> Proc:
        return self.start(name, [sys.executable, "-m", "shared.cli", *args])

    def names(self) -> dict[int, str]:
        """pid -> what it is, for the processes the bench started (digits dropped: worker0 is a
        worker)."""
        named: dict[int, str] = {}
        for proc in self.procs:
            kind = proc.name.rstrip("0123456789")
            named.update(dict.fromkeys(proc.tree(), kind))
        return named

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def start_simulator(self) -> Proc:
        proc = self.cli("simulator", "simulator")
        wait_http(f"{self.simulator_url}/health", proc)
        self.simulator = proc
        return proc

    def start_api(self) -> Proc:
        proc = self.cli("api", "api", "--workers", str(self.config.api_workers))
        wait_http(f"{self.api_url}/health/ready", proc)
        self.api = proc
        return proc

    def fresh_edges(self) -> None:
        """A new simulator and API: nothing left over from a scenario that overloaded them (the
        simulator retries its callbacks for a while, and the API would keep taking them)."""
        for proc in (getattr(self, "simulator", None), getattr(self, "api", None)):
            if proc is not None:
                self.stop(proc)
        self.start_simulator()
        self.start_api()

    def start_bare(self) -> Proc:
        argv = [sys.executable, "-m", "bench.bare_app", "--port", str(self.ports["bare"])]
        proc = self.start("bare", [*argv, "--workers", str(self.config.api_workers)])
        wait_http(self.bare_url + SEND_PATH, proc, method="POST")
        return proc

    def start_workers(self) -> list[Proc]:
        """`sms-dispatch worker` processes, as deployed (no beat: nothing here needs a sweeper)."""
        concurrency = str(self.config.worker_concurrency)
        procs = [
            self.cli(f"worker{i}", "worker", "-c", concurrency, "--quiet")
            for i in range(self.config.worker_procs)
        ]
        for proc in procs:
            wait_ready(proc)
        return procs

    def start_lane_workers(self, *, realtime: int, bulk: int) -> list[Proc]:
        """One `sms-dispatch worker` per lane, `realtime` and `bulk` threads each."""
        procs = [
            self.cli(
                "worker-realtime", "worker", "--lane", "realtime", "-c", str(realtime), "--quiet"
            ),
            self.cli("worker-bulk", "worker", "--lane", "bulk", "-c", str(bulk), "--quiet"),
        ]
        for proc in procs:
            wait_ready(proc)
        return procs

    def start_noop_workers(self) -> list[Proc]:
        """The no-op floor: the same flags `sms-dispatch worker` gives Celery, on our own queue."""
        from bench.noop import NOOP_QUEUE

        procs = []
        for i in range(self.config.worker_procs):
            argv = [sys.executable, "-m", "celery", "-A", "bench.noop", "--quiet", "worker"]
            argv += ["-Q", NOOP_QUEUE, "-P", "threads", "--without-mingle"]
            argv += ["--without-gossip", "--hostname", f"bench-noop-{i}-{os.getpid()}@%h"]
            argv += ["-c", str(self.config.worker_concurrency)]
            procs.append(self.start(f"noop{i}", argv))
        for proc in procs:
            wait_ready(proc)
        return procs

    # The database and the broker

    def migrate(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "shared.cli", "migrate"],
            cwd=ROOT,
            env={**os.environ, **self.env},
            check=True,
            capture_output=True,
        )

    def provision(self) -> None:
        """The demo account, campaign1 on the simulator, and jpTokens for many calls (one row each
        in the Deflected Call Report, so sends do not all update one row)."""
        with self.db.transaction() as session:
            account = provisioning.create_account(session, TENANT, "Bench", "PROD")
            provisioning.add_application_key(session, account, KEY)
            environment = access.resolve_environment(session, account, None)
            provisioning.upsert_campaign(
                session,
                environment,
                CAMPAIGN,
                name="Deflection",
                message_text="Skip the queue: continue here <link>",
                link_url="https://example.com/flow",
            )
            provisioning.set_provider(session, account, "simulator", sender_ids=[SENDER])
            self.provider = "simulator"
            now = utcnow()
            for i in range(self.config.tokens):
                caller = f"+1202555{i % 10000:04d}"
                issued = issue_token(session, account, environment, caller, timedelta(days=1), now)
                self.tokens.append((issued.token, caller))

    def sql(self, query: str, **params: Any) -> Any:
        with self.db.engine.connect() as connection:
            return connection.execute(text(query), params).one()

    def analyze(self) -> None:
        """PostgreSQL's statistics of every table brought up to date, as autovacuum would."""
        with self.db.engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))

    def clean(self) -> None:
        """No messages and no tasks: each scenario starts from the same empty queue and table."""
        with self.db.transaction() as session:
            session.execute(
                text(
                    "TRUNCATE messages, message_parts, delivery_events, bulk_batches,"
                    " status_callbacks, status_callback_attempts"
                )
            )
        with self.db.engine.connect() as connection:
            # The calls' rows stay (their tokens are the load's), but every send rewrites its
            # call's row: vacuumed here, not by autovacuum in the middle of the next scenario.
            connection.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE messages, deflected_calls")
            )
        # Kombu keeps its exchange bindings in `_kombu.binding.*`; everything else is tasks.
        for key in self.redis.scan_iter(count=1000):
            if not bytes(key).startswith(b"_kombu.binding"):
                self.redis.delete(key)
        with httpx.Client(base_url=self.simulator_url, timeout=60) as simulator:
            simulator.delete("/messages").raise_for_status()

    def use_provider(self, provider: str) -> None:
        """Send the demo account's messages through `provider` only: "simulator" (our own
        adapter) or "twilio" (the real twilio SDK, its API host the simulator's Twilio API).
        Empties the messages first (they reference the settings they were accepted with); the
        config triggers tell every process's cache at once."""
        if provider == self.provider:
            return
        self.clean()
        credentials: dict[str, Any] = {}
        if provider == "twilio":
            credentials = {
                "account_sid": TWILIO_SID,
                "auth_token": secrets.token_hex(16),
                "base_url": self.simulator_url,
            }
        with self.db.transaction() as session:
            account = provisioning.get_account(session, TENANT)
            session.execute(delete(ProviderAccount).where(ProviderAccount.account_id == account.id))
            provisioning.set_provider(
                session, account, provider, sender_ids=[SENDER], credentials=credentials
            )
        self.provider = provider

    def control(self, **behaviour: Any) -> None:
        httpx.post(f"{self.simulator_url}/control", json=behaviour, timeout=60).raise_for_status()

    def queued_tasks(self, queue: str) -> int:
        """Tasks on the queue plus those a worker holds unacknowledged."""
        pipe = self.redis.pipeline()
        pipe.llen(queue)
        pipe.hlen("unacked")
        waiting, unacked = pipe.execute()
        return int(waiting) + int(unacked)

    def broker_tasks(self, queue: str) -> BrokerTasks:
        """Every send task on the queue or held unacknowledged by a worker, read from Redis,
        with the messageSids each carries (`sms.send` one, `sms.send_batch` a list)."""
        pipe = self.redis.pipeline()
        pipe.lrange(queue, 0, -1)
        pipe.hvals("unacked")
        waiting, unacked = pipe.execute()
        tasks = BrokerTasks()
        for raw in waiting:
            tasks.add(json.loads(raw))
        for raw in unacked:
            # kombu keeps `[message, exchange, routing key]` for each unacknowledged one.
            message, _exchange, routing_key = json.loads(raw)
            if routing_key == queue:
                tasks.add(message)
        return tasks

    def used_memory(self) -> int:
        return int(self.redis.info("memory")["used_memory"])

    def fill(self, count: int, batch: int) -> Fill:
        """`count` queued messages with their send tasks published, workers stopped.

        One message per jpToken goes through the accept service itself (validated, rendered,
        committed in transactions of 500); the rest are copies of those seeds with new
        messageSids (INSERT ... SELECT: the same rows, since everything is rendered at accept
        time), because accepting 200,000 one by one takes longer than draining them. Every seed
        is copied once per round, so each call (jpToken) has count / seeds messages whatever the
        size, and the tasks take the calls in turn (every call's first message, then every
        call's second, ...): consecutive messages belong to different calls, as they do when
        many callers are texted. The tasks are then published as the sweeper publishes what it
        finds (and as the API publishes a group commit): `batch` messageSids per task, through
        the outbox's own `publish_batches` (which marks the rows). `batch` 1 publishes one
        `sms.send` each."""
        started = time.monotonic()
        seeded = min(count, len(self.tokens))
        seeds: list[str] = []
        for first in range(0, seeded, 500):
            with self.db.transaction() as session:
                for i in range(first, min(first + 500, seeded)):
                    seeds.append(accept_send(session, self.command(i), self.settings, utcnow()).sid)
        accepted = time.monotonic()
        copied = seeded
        while copied < count:
            chunk = min(seeded, count - copied)
            with self.db.transaction() as session:
                session.execute(
                    text(_COPY.format(columns=_MESSAGE_COLUMNS)), {"n": chunk, "seeds": seeds}
                )
            copied += chunk
        rows = time.monotonic()
        with self.db.engine.connect() as connection:
            sids = list(connection.execute(text(_IN_TURN)).scalars())
        tasks = 0
        # A few hundred tasks per pipeline, as a sweep of SMSD_SWEEP_BATCH_SIZE does.
        for first in range(0, len(sids), 50 * batch):
            batches = chunked(sids[first : first + 50 * batch], batch)
            published = publish_batches(self.celery, self.db, batches)
            if len(published) != sum(len(b) for b in batches):
                raise RuntimeError("publishing send tasks failed; see the log above")
            tasks += len(batches)
        done = time.monotonic()
        return Fill(
            count=count,
            accepted=seeded,
            batch=batch,
            tasks=tasks,
            accept_s=accepted - started,
            copy_s=rows - accepted,
            publish_s=done - rows,
        )

    def command(self, i: int) -> SendSmsCommand:
        token, caller = self.tokens[i % len(self.tokens)]
        return SendSmsCommand(
            account_in_url=TENANT,
            tenant_id=TENANT,
            application_key=KEY,
            environment_name=None,
            campaign_id=CAMPAIGN,
            caller_id=caller,
            jp_token=token,
            additional_params=ADDITIONAL_PARAMS,
        )


@dataclass(frozen=True)
class Fill:
    count: int
    accepted: int  # of which went through the accept service one by one
    batch: int  # messageSids per task
    tasks: int  # tasks published
    accept_s: float
    copy_s: float
    publish_s: float

    @property
    def seconds(self) -> float:
        return self.accept_s + self.copy_s + self.publish_s


@dataclass
class BrokerTasks:
    """Send tasks as the broker holds them: how many, of which kind, and their messageSids
    (each as often as a task carries it)."""

    tasks: int = 0
    by_name: dict[str, int] = field(default_factory=dict)
    sids: list[str] = field(default_factory=list)
    unreadable: int = 0

    def add(self, message: dict[str, Any]) -> None:
        self.tasks += 1
        name, sids = task_sids(message)
        self.by_name[name] = self.by_name.get(name, 0) + 1
        if not sids:
            self.unreadable += 1
        self.sids += sids


def task_sids(message: dict[str, Any]) -> tuple[str, list[str]]:
    """A Celery task message (kombu's envelope: protocol 2 headers, the body base64 JSON
    `[args, kwargs, embed]`): its task name and the messageSids in its first argument,
    a sid (`sms.send`) or a list of them (`sms.send_batch`)."""
    try:
        name = str(message.get("headers", {}).get("task", "?"))
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        first = args[0]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return "?", []
    if isinstance(first, str):
        return name, [first]
    if isinstance(first, list) and all(isinstance(sid, str) for sid in first):
        return name, list(first)
    return name, []


_MESSAGE_COLUMNS = (
    "account_id, environment_id, campaign_pk, campaign_id, token_id, to_number, from_number, "
    "body, segments, encoding, status, provider, provider_account_id, attempts, "
    "provider_failures, created_at, expires_at, updated_at"
)
# Copies of the first :n seeds. (Copying the oldest :n unpublished rows instead, as the bench
# did until 2026-12-01, copied copies: they share their seed's created_at, so every round took
# the earliest seeds again, and a 200,000 backlog held 178,048 messages of one call, the row
# every send of them updates, against at most 16 per call at 10,000.)
_COPY = (
    "INSERT INTO messages (sid, {columns}) "
    "SELECT 'SM' || replace(gen_random_uuid()::text, '-', ''), {columns} FROM "
    "(SELECT * FROM messages WHERE sid = ANY(:seeds) ORDER BY created_at LIMIT :n) AS seed"
)
# The backlog in the order its tasks are published: each call's first message, then each
# call's second, and so on.
_IN_TURN = (
    "SELECT sid FROM (SELECT sid, created_at, "
    "row_number() OVER (PARTITION BY token_id ORDER BY sid) AS turn FROM messages) AS m "
    "ORDER BY turn, created_at"
)


def wait_for(check: Callable[[], bool], timeout: float, what: str, proc: Proc | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.output()}")
        time.sleep(0.1)
    tail = proc.output()[-3000:] if proc is not None else ""
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n{tail}")


def wait_ready(proc: Proc) -> None:
    """A Celery worker logs `... ready.` once it consumes."""
    wait_for(lambda: "ready" in proc.output(), 60, f"{proc.name} ready", proc)


def wait_http(url: str, proc: Proc, method: str = "GET") -> None:
    def answers() -> bool:
        try:
            return httpx.request(method, url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, 60, url, proc)


@contextlib.contextmanager
def running(stack: Stack, procs: list[Proc]) -> Iterator[list[Proc]]:
    """Processes that are stopped when the block ends, however it ends."""
    try:
        yield procs
    finally:
        for proc in procs:
            stack.stop(proc)


def _cpu_ticks(pid: int) -> int:
    """A process's CPU and that of the children it reaped: PostgreSQL's backends come and go
    (a pool closes its overflow connections), and the postmaster's reaped-children time is the
    only place their CPU stays once they exit (see `Interference.foreign_cores`)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # utime + stime (also of its reaped threads) + cutime + cstime (its reaped children's).
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])


def _busy_ticks() -> int:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4]  # all but idle and iowait


def own_pids(database_url: str) -> dict[int, str]:
    """Every process of ours and what it is: this process's tree (the bench and its load
    generator, Redis, the service's processes) and the throwaway PostgreSQL (daemonised by
    pg_ctl, so not a child)."""
    port = database_url.rsplit(":", 1)[1].split("/", 1)[0]
    found = dict.fromkeys(descendants(os.getpid()), "bench")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"/postgres") and port.encode() in argv:
                found.update(dict.fromkeys(descendants(int(entry.name)), "postgres"))
            elif int(entry.name) in found and argv[0].endswith(b"redis-server"):
                found[int(entry.name)] = "redis"
    return found


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


@dataclass
class Interference:
    """CPU that processes other than ours used while a scenario ran, in cores (2.0 = the whole
    box). The box is shared with other sessions; this says how far to trust a figure."""

    database_url: str
    # Names the service's processes by pid (the rest of ours: bench, postgres, redis).
    names: dict[int, str] = field(default_factory=dict)
    started: float = 0.0
    busy0: int = 0
    ours0: dict[int, int] = field(default_factory=dict)
    names0: dict[int, str] = field(default_factory=dict)
    # Filled by foreign_cores(): our own CPU over the same span, in cores, by component, and
    # that span in seconds.
    ours: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self.busy0 = _busy_ticks()
        self.names0 = own_pids(self.database_url)
        self.names0.update({pid: name for pid, name in self.names.items() if pid in self.names0})
        self.ours0 = {pid: _cpu_ticks(pid) for pid in self.names0}

    def busy_seconds(self) -> float:
        """Since start(): the whole box's CPU (every process's), in seconds."""
        self.seconds = time.monotonic() - self.started
        return (_busy_ticks() - self.busy0) / os.sysconf("SC_CLK_TCK")

    def foreign_cores(self) -> float:
        """Since start(): other processes' CPU, averaged over the time, in cores."""
        seconds = self.seconds = time.monotonic() - self.started
        if seconds <= 0:
            return 0.0
        hz = os.sysconf("SC_CLK_TCK")
        busy = _busy_ticks() - self.busy0
        kinds = own_pids(self.database_url)
        kinds.update({pid: name for pid, name in self.names.items() if pid in kinds})
        # Read while the measured processes still run. One that ended meanwhile was reaped by
        # its parent (ours too), whose count now holds all of its ticks, those from before
        # start() included: they are taken off again here (it counts its ticks at start
        # negatively). A child started and ended within the span counts through its parent.
        self.ours = {}
        for pid in set(self.ours0) | set(kinds):
            ticks = _cpu_ticks(pid) - self.ours0.get(pid, 0)
            kind = kinds.get(pid) or self.names0.get(pid, "bench")
            self.ours[kind] = self.ours.get(kind, 0.0) + ticks / hz / seconds
        self.ours = {kind: max(0.0, cores) for kind, cores in self.ours.items()}
        return max(0.0, busy / hz / seconds - sum(self.ours.values()))
