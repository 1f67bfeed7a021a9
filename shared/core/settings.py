"""One settings object, read once from `SMSD_*` environment variables."""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The embedded default keeps its files here so `make run` needs no server at all.
VAR_DIR = Path("var")


def _seconds(value: Any) -> Any:
    # Environment variables are text: "2.5" means seconds, as operators expect.
    if isinstance(value, str):
        try:
            return timedelta(seconds=float(value))
        except ValueError:
            return value  # ISO 8601 ("PT5M") and "HH:MM:SS" are pydantic's to parse
    return value


Duration = Annotated[timedelta, BeforeValidator(_seconds)]


class Settings(BaseSettings):
    """Every tunable of the service. Durations are `timedelta` (seconds or ISO 8601 in the env)."""

    model_config = SettingsConfigDict(env_prefix="SMSD_", extra="ignore")

    # DATABASE_URL / BROKER_URL are honoured too because every PaaS and compose file speaks them.
    database_url: str = Field(
        default=f"sqlite:///{VAR_DIR}/sms-dispatch.sqlite3",
        validation_alias=AliasChoices("SMSD_DATABASE_URL", "DATABASE_URL"),
    )
    broker_url: str = Field(
        default=f"sqla+sqlite:///{VAR_DIR}/broker.sqlite3",
        validation_alias=AliasChoices("SMSD_BROKER_URL", "BROKER_URL"),
    )
    database_pool_size: int = 10
    # A database that does not answer fails fast instead of hanging a request or a task
    # (psycopg's connect_timeout, whole seconds, at least 2; a URL's own connect_timeout wins).
    database_connect_timeout: Duration = timedelta(seconds=2)
    # How long a worker thread waits for a pooled connection (SQLAlchemy's pool_timeout).
    database_pool_timeout: Duration = timedelta(seconds=30)
    # The same for an API request: past it the request answers 503 instead of queueing on.
    api_database_pool_timeout: Duration = timedelta(seconds=3)

    # Where callers and providers reach us; callback URLs come from it, never from Host headers.
    # Default: http://{api_host}:{api_port}.
    public_base_url: str = ""
    api_host: str = "127.0.0.1"
    api_port: int = 8080

    log_level: str = "INFO"
    # None = decide by whether stderr is a terminal (pretty) or not (JSON).
    log_json: bool | None = None

    token_lifetime: Duration = timedelta(hours=24)
    token_max_lifetime: Duration = timedelta(days=7)
    # How long a short link (`/l/<code>`) keeps redirecting after it was made.
    short_link_lifetime: Duration = timedelta(days=30)
    # Numbers written without a country code are read in this region.
    default_region: str = "US"
    # A message not handed to a provider within this time is expired, never sent late.
    message_validity: Duration = timedelta(hours=4)
    # How far ahead a send may be scheduled (sendAt); later is a 400. Validity counts from then.
    schedule_horizon: Duration = timedelta(days=35)

    # Status callbacks (statusCallback): how often the deliverer looks for due ones, how long
    # one POST may take, how long a failing one is retried (backoff from the first retry's
    # delay, doubling, at most the max), and how many one run takes at once.
    status_callback_interval: Duration = timedelta(seconds=1)
    status_callback_timeout: Duration = timedelta(seconds=5)
    status_callback_retry_for: Duration = timedelta(hours=24)
    status_callback_backoff_base: Duration = timedelta(seconds=10)
    status_callback_backoff_max: Duration = timedelta(hours=1)
    status_callback_batch: int = 200
    # Networks a callback URL may reach although they are private, loopback or link-local
    # ("10.0.0.0/8,127.0.0.1/32"): nothing of them by default, so a caller cannot make the
    # service POST into the network it runs in (SSRF). Comma separated CIDRs.
    status_callback_allowed_networks: str = ""
    # After `account webhook-secret --rotate`, the old secret signs too this long, so
    # receivers can switch without refusing a callback.
    webhook_secret_overlap: Duration = timedelta(hours=24)

    # Prometheus metrics of each worker process at http://{host}:{port}/metrics; 0 = off.
    worker_metrics_port: int = 0
    worker_metrics_host: str = "127.0.0.1"
    # `sms-dispatch flower` basic auth, "user:password[,user2:password2]" (or FLOWER_BASIC_AUTH).
    flower_basic_auth: SecretStr | None = None

    # How long an API process may reuse an account, key, campaign or provider row it read. A
    # change to any of them is seen at once anyway (config_generation); 0 turns caching off.
    config_cache_ttl: Duration = timedelta(minutes=5)

    send_queue: str = "sms.send"
    worker_concurrency: int = 32
    # Celery task events all the time (Flower turns the workers' own on when it starts anyway).
    task_events: bool = False
    worker_prefetch_multiplier: int = 4
    # Provider calls one worker process keeps in flight for its batch tasks (`sms.send_batch`):
    # one thread pool per process, shared by every task the process runs at once. A claimed
    # message that waits for a thread longer than a quarter of SMSD_SEND_LEASE goes back on the
    # queue instead (its lease must outlast the call and the record).
    worker_send_threads: int = 64
    # How long one claim on a message lasts; a worker that died mid-send loses it after this.
    send_lease: Duration = timedelta(seconds=60)
    provider_timeout: Duration = timedelta(seconds=15)
    # Claims of a message whose worker was lost mid-send before it fails (a poison message
    # that kills its worker). Provider failures do not count: they retry until validity ends.
    max_send_attempts: int = 5
    retry_backoff_base: Duration = timedelta(seconds=2)
    retry_backoff_max: Duration = timedelta(minutes=5)
    # A send in doubt with a provider that can be searched (Twilio) is looked up after this,
    # once the provider has surely finished with the request and lists it.
    in_doubt_lookup_after: Duration = timedelta(seconds=30)
    # A message `sent` (or `in_doubt`) with no final receipt after this is asked about, where
    # the provider can be asked (Twilio, the simulator); again every this long.
    reconcile_after: Duration = timedelta(minutes=10)
    # ...and after this it ends `unknown` with code `no-receipt`: no final word is coming.
    receipt_window: Duration = timedelta(hours=24)

    # Where workers share send-rate limits and circuit breakers. Default: the broker, when the
    # broker is Redis; otherwise (the embedded default, one worker) each process keeps its own.
    redis_url: str | None = None
    # After this many transient failures in a row on one provider, a message moves to the next.
    failover_after: int = 2
    # A provider failing this often within breaker_window is skipped for breaker_cooldown.
    breaker_threshold: int = 5
    breaker_window: Duration = timedelta(seconds=30)
    breaker_cooldown: Duration = timedelta(seconds=30)

    sweep_interval: Duration = timedelta(seconds=10)
    # A committed message still unpublished after this is published by the sweeper.
    sweep_unpublished_after: Duration = timedelta(seconds=15)
    sweep_batch_size: int = 500
    # Messages in one send task, at most: the sweeper's, and the API's (publish_window).
    send_batch_size: int = 100
    # Redis: a task a worker took but never acknowledged (it was killed) is delivered again
    # after this. Every countdown we hand the broker stays far below it (long waits are kept
    # in the database), so a dead worker's prefetched tasks are sent within about a minute.
    broker_visibility_timeout: Duration = timedelta(seconds=60)

    # Default: http://{simulator_host}:{simulator_port}.
    simulator_url: str = ""
    simulator_host: str = "127.0.0.1"
    simulator_port: int = 8090
    # The simulator also speaks HTTPS here (the Vonage SDK only talks HTTPS), with a
    # self-signed certificate kept in simulator_tls_dir.
    simulator_tls_port: int = 8443
    simulator_tls_dir: Path = VAR_DIR / "simulator-tls"
    # Extra CA certificates (PEM) that provider SDKs trust besides the public ones: the
    # simulator's, in local runs and tests. Unset in production.
    provider_ca_file: Path | None = None
    simulator_latency: Duration = timedelta(milliseconds=50)
    simulator_failure_rate: float = 0.0
    simulator_delivery_delay: Duration = timedelta(milliseconds=200)
    # A signed provider webhook (Vonage's `timestamp`, the simulator's) older than this, or
    # this far in the future, is refused as a replay; repeats inside it are stored once.
    webhook_max_age: Duration = timedelta(minutes=10)

    # What one request may cost the API before anyone is authenticated.
    # Request line plus headers; past it the connection is answered 431 and closed.
    max_header_bytes: int = 16 * 1024
    # A connection whose request headers are not complete within this is closed (slow clients).
    header_timeout: Duration = timedelta(seconds=10)
    # Request bodies (the SOAP envelope and provider webhooks have their own limits); 413 past it.
    max_body_bytes: int = 64 * 1024
    # Bulk send (POST .../bulk): recipients in one request (413 past it), and its body's size
    # (413 past it). The body is spooled to disk past bulk_spool_bytes: memory stays bounded.
    bulk_max_recipients: int = 100_000
    # Processes (per API process) that validate a bulk request's numbers beside the thread
    # that stores it; 0: that thread validates them itself.
    bulk_validation_processes: int = 1
    bulk_max_body_bytes: int = 64 * 1024 * 1024
    bulk_spool_bytes: int = 1024 * 1024
    # Bulk requests one API process stores at once; more wait their turn (each holds a pooled
    # connection and a thread while it stores).
    bulk_concurrency: int = 2
    # The bulk lane (shared/messages/lanes.py): the bulk pump keeps about this many bulk
    # messages on the bulk queue ahead of its workers, taken from the tenants with queued bulk
    # work in turn. Larger keeps more workers busy; smaller lets a new tenant's batch start
    # sooner behind another's (it waits for at most this many, plus what workers prefetched).
    bulk_lane_depth: int = 2000
    # Bulk messages in one task of the bulk lane (`sms.send_bulk`).
    bulk_task_size: int = 100
    # The bulk lane's messages per second, all processes together (0 = no limit): room kept on
    # the database, the API and the cores that single sends share with it. The default is what
    # the smallest box (2 cores, everything on it) carries beside IVR traffic at no more than
    # twice its idle latency (docs/performance.md, "Issue 14: lanes"); raise it with the box.
    bulk_lane_rate: float = 100.0
    # Connections (and requests in progress) per API process; past it requests answer 503.
    api_max_connections: int = 2048
    # Key guessing: this many 401s from one client address within auth_failure_window block
    # that address (429, even with the right key) for auth_block_time.
    auth_failure_limit: int = 20
    auth_failure_window: Duration = timedelta(seconds=60)
    auth_block_time: Duration = timedelta(minutes=5)
    # Behind a load balancer: the header it writes the client address into (X-Forwarded-For),
    # believed only from the comma-separated proxy addresses or networks in trusted_proxies.
    trusted_proxy_header: str | None = None
    trusted_proxies: str = ""

    # A stalled database (PostgreSQL only; every pooled connection of every process).
    # Server side: a statement, a lock wait or a transaction left idle ends after these.
    database_statement_timeout: Duration = timedelta(seconds=5)
    database_lock_timeout: Duration = timedelta(seconds=3)
    database_idle_in_transaction_timeout: Duration = timedelta(seconds=60)
    # Client side (libpq, whole seconds): TCP keepalives find a dead host or a partition on an
    # idle connection (idle + interval x count); tcp_user_timeout ends a connection whose sent
    # data stays unacknowledged this long. Neither catches a frozen server whose kernel still
    # ACKs: api_accept_deadline does, for the API.
    database_keepalives_idle: Duration = timedelta(seconds=10)
    database_keepalives_interval: Duration = timedelta(seconds=3)
    database_keepalives_count: int = 3
    database_tcp_user_timeout: Duration = timedelta(seconds=10)
    # An API accept (Send SMS v3/v2, Notify, SOAP, generateToken, Interaction Link) not finished
    # within this answers 503 `service unavailable`; a later commit is never answered 200.
    api_accept_deadline: Duration = timedelta(seconds=3)
    # Group commit (shared/messages/group_commit.py): an API process accepts the send requests
    # that arrive together in one transaction. A group closes at once when none is being
    # committed, else after this window or when one finishes; at most this many messages and
    # this many groups in flight (each holds a pooled connection while it commits).
    accept_group_window: Duration = timedelta(milliseconds=2)
    # Provider callbacks (shared/messages/callback_groups.py): a group closes this long after
    # its first callback (or when full), so receipts arriving one by one share transactions.
    callback_group_window: Duration = timedelta(milliseconds=25)
    accept_group_size: int = 256
    accept_groups_in_flight: int = 4
    # The API's send tasks (shared/messages/outbox.py): at most one publish per this window
    # per API process, unless send_batch_size messages wait. A message committed after a quiet
    # spell leaves at once; under load, what commits within the window goes as one task (up to
    # send_batch_size messages), so workers pay their per-task cost for many messages.
    publish_window: Duration = timedelta(milliseconds=20)
    # Send SMS v3 answered in front of Litestar's routing (api/fast_send.py), with the Litestar
    # route's answers; false sends every request through the route.
    lean_send: bool = True

    @model_validator(mode="after")
    def _derive_urls(self) -> Settings:
        # Moving a port with SMSD_API_PORT alone must move the URLs built from it too.
        if not self.public_base_url:
            self.public_base_url = f"http://{self.api_host}:{self.api_port}"
        if self.redis_url is None and self.broker_url.startswith(("redis://", "rediss://")):
            self.redis_url = self.broker_url
        if not self.simulator_url:
            self.simulator_url = f"http://{self.simulator_host}:{self.simulator_port}"
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built once."""
    return Settings()
