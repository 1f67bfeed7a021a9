"""`make bench`: accept, dispatch, end-to-end and backlog figures for sms-dispatch on this machine,
each as a ratio against a floor measured in the same run. Everything runs on loopback and is
stopped at the end; the table is printed and written to bench/results/latest.json.

Environment knobs (defaults in brackets):
  BENCH_ONLY [all]             comma-separated scenarios to run: accept, dispatch, e2e, backlog
  BENCH_FULL=1                 also the 200,000-message backlog (long: see docs/performance.md)
  BENCH_PROFILE=1              py-spy profiles of the API and the workers (perturbs the figures)
  BENCH_API_WORKERS [2]        uvicorn processes, for the API and for the bare floor app alike
  BENCH_WORKER_PROCS [2]       Celery worker processes, for the service and the no-op floor alike
  BENCH_WORKER_CONCURRENCY [32]  threads per worker process (SMSD_WORKER_CONCURRENCY's default)
  BENCH_CONNECTIONS [16]       closed-loop connections for the accept scenario
  BENCH_ACCEPT_SECONDS [15]    per accept measurement
  BENCH_DISPATCH [20000]       messages in the dispatch scenario
  BENCH_E2E_RATE [300]         offered msg/s in the end-to-end scenario
  BENCH_E2E_SECONDS [auto]     60, or 20 when the whole run would pass ~10 minutes
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

if not __package__:  # run as a script (`python bench/run.py`): the repository root is home
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import (
    LoadResult,
    direct_provider_latency,
    percentile,
    run_python_closed,
    run_python_open,
    run_wrk,
)
from bench.profile import Profile, Recording, py_spy, record
from bench.stack import ROOT, Interference, Proc, Stack, StackConfig, running
from tests.support.services import postgres_server, redis_server

RESULTS = ROOT / "bench" / "results"
SIMULATOR_LATENCY_MS = 50
DELIVERY_DELAY_MS = 200
BUDGET_S = 600  # the default run should stay within ~10 minutes
FOREIGN_NOTE_CORES = 0.1  # other processes' CPU worth a note next to a figure
E2E_WAIT_S = 120.0  # after an end-to-end run, at most this long for the stragglers
E2E_STALL_S = 15.0  # ... and no longer once nothing has moved for this long
E2E_WARMUP_S = 3.0  # before each end-to-end run, at its rate (not measured)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


@dataclass(frozen=True)
class Options:
    full: bool
    profile: bool
    connections: int
    accept_seconds: int
    dispatch_count: int
    e2e_rate: int
    e2e_seconds: int | None
    stack: StackConfig
    only: frozenset[str] = frozenset()

    def wants(self, scenario: str) -> bool:
        return not self.only or scenario in self.only

    @classmethod
    def from_env(cls) -> Options:
        seconds = os.environ.get("BENCH_E2E_SECONDS")
        return cls(
            full=os.environ.get("BENCH_FULL") == "1",
            profile=os.environ.get("BENCH_PROFILE") == "1",
            connections=_env_int("BENCH_CONNECTIONS", 16),
            accept_seconds=_env_int("BENCH_ACCEPT_SECONDS", 15),
            dispatch_count=_env_int("BENCH_DISPATCH", 20_000),
            e2e_rate=_env_int("BENCH_E2E_RATE", 300),
            e2e_seconds=int(seconds) if seconds else None,
            only=frozenset(s for s in os.environ.get("BENCH_ONLY", "").split(",") if s),
            stack=StackConfig(
                api_workers=_env_int("BENCH_API_WORKERS", 2),
                worker_procs=_env_int("BENCH_WORKER_PROCS", 2),
                worker_concurrency=_env_int("BENCH_WORKER_CONCURRENCY", 32),
            ),
        )


@dataclass
class Bench:
    options: Options
    stack: Stack
    generator: str
    started: float = field(default_factory=time.monotonic)
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interference: dict[str, float] = field(default_factory=dict)
    # Our own CPU, in cores, by component (api, worker, postgres, redis, simulator, bench ...).
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)

    def scenario(self, name: str, run: Callable[[], None]) -> None:
        """Run one scenario; a failure is recorded and reported, and the others still run."""
        try:
            run()
        except Exception as exc:
            self.failed.append(name)
            self.notes.append(f"{name} failed: {type(exc).__name__}: {exc}")
            self.say(f"{name} FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc()

    def meter(self) -> Interference:
        meter = Interference(self.stack.database_url)
        meter.start()
        return meter

    def foreign(self, what: str, meter: Interference) -> float:
        """Other processes' CPU while `what` was measured; noted when it is not negligible."""
        meter.names = self.stack.names()
        cores = meter.foreign_cores()
        self.interference[what] = round(cores, 3)
        self.cpu[what] = {kind: round(c, 3) for kind, c in sorted(meter.ours.items())}
        if cores >= FOREIGN_NOTE_CORES:
            self.notes.append(
                f"other processes on the machine used {cores:.2f} of its 2 cores while {what} "
                "was measured: that figure is perturbed"
            )
        return cores

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @contextlib.contextmanager
    def profiled(self, name: str, proc: Proc, seconds: float) -> Iterator[None]:
        recording: Recording | None = None
        if self.options.profile:
            output = RESULTS / f"profile-{name}.txt"
            recording = record(name, proc.pid, seconds, output)
        yield
        if recording is not None:
            profile = recording.finish()
            if profile is not None:
                self.profiles.append(profile)

    def e2e_seconds(self) -> int:
        """60 s, or 20 s when the rest of the run would then pass ~10 minutes: the end-to-end
        run, the generator's grace and the wait for the backlog it leaves (when offered above
        the drain rate just measured), the sustainable run, and the 10k backlog."""
        drain = max(float(self.results.get("dispatch", {}).get("msg_per_s", 100.0)), 1.0)
        rate = self.options.e2e_rate

        def rest(span: int) -> float:
            left = max(0.0, rate - drain) * span / drain
            grace = 30 if rate > drain else 0
            return 20 + span + grace + min(E2E_WAIT_S, left + 5) + 60 + 10_000 / drain + 25

        if self.elapsed + rest(60) <= BUDGET_S:
            return 60
        self.notes.append(
            f"end to end ran 20 s instead of 60 s: at 60 s the run would take about "
            f"{(self.elapsed + rest(60)) / 60:.0f} minutes"
        )
        return 20

    # Accept

    def load(self, base_url: str, *, seconds: float, collect: bool) -> LoadResult:
        tokens, conns = self.stack.tokens, self.options.connections
        if self.generator == "wrk":
            return run_wrk(
                base_url,
                tokens,
                self.stack.workdir,
                connections=conns,
                seconds=seconds,
                collect=collect,
            )
        return run_python_closed(
            base_url, tokens, connections=conns, seconds=seconds, collect=collect
        )

    def accept(self, api: Proc) -> None:
        seconds = self.options.accept_seconds
        self.say(f"accept: bare Litestar floor, {self.generator}, {seconds} s")
        with running(self.stack, [self.stack.start_bare()]) as (bare,):
            self.load(self.stack.bare_url, seconds=3, collect=False)  # warm-up
            meter = self.meter()
            with self.profiled("bare", bare, seconds - 2):
                floor = self.load(self.stack.bare_url, seconds=seconds, collect=False)
            self.foreign("the bare floor", meter)
        self.say(
            f"  bare: {floor.ok_per_s:.0f}/s, p50 {floor.p50_ms:.1f} ms, p99 {floor.p99_ms:.1f}"
        )
        self.say(f"accept: POST Send SMS v3 (workers stopped), {seconds} s")
        self.load(self.stack.api_url, seconds=3, collect=False)  # warm-up: pools, caches
        time.sleep(2)  # let the warm-up's last requests commit before the table is emptied
        self.stack.clean()
        meter = self.meter()
        with self.profiled("accept", api, seconds - 2):
            measured = self.load(self.stack.api_url, seconds=seconds, collect=True)
        self.foreign("accept", meter)
        time.sleep(2)  # requests cut off by the end of the run finish on the server
        durable = self.check_durable(measured)
        self.say(
            f"  accept: {measured.ok_per_s:.0f}/s, p50 {measured.p50_ms:.1f} ms, "
            f"p99 {measured.p99_ms:.1f}; {durable['verdict']}"
        )
        self.results["accept"] = {
            "bare": floor.summary(),
            "accept": measured.summary(),
            "durability": durable,
        }

    def check_durable(self, run: LoadResult) -> dict[str, Any]:
        """Every 200 is a committed row whose task is on the queue."""
        stack = self.stack
        rows = stack.sql("SELECT count(*) AS n, count(published_at) AS published FROM messages")
        answered = stack.sql(
            "SELECT count(*) AS n, count(published_at) AS published FROM messages "
            "WHERE sid = ANY(:sids)",
            sids=run.sids,
        )
        queued = stack.queued_tasks(stack.settings.send_queue)
        # A request in flight when the load generator stops is committed and queued, but its
        # answer is never read: those rows are the only ones allowed beyond the 200s.
        cut_off = rows.n - run.ok
        problems = [
            what
            for what, failed in (
                ("a 200 without a messageSid", len(run.sids) != run.ok),
                ("a 200 whose row is missing", answered.n != run.ok),
                ("a 200 whose task was never published", answered.published != run.ok),
                ("rows and queued tasks differ", not rows.n == rows.published == queued),
                (
                    "more rows than 200s plus requests in flight",
                    not 0 <= cut_off <= run.connections,
                ),
            )
            if failed
        ]
        ok = not problems
        verdict = (
            f"{'OK' if ok else 'FAILED (' + '; '.join(problems) + ')'}: {run.ok} answered 200, "
            f"{answered.n} of their rows committed, {answered.published} published; "
            f"{rows.n} rows, {queued} tasks queued"
            + (f" ({cut_off} answered after the generator stopped)" if cut_off else "")
        )
        return {
            "ok": ok,
            "answered_200": run.ok,
            "sids_in_answers": len(run.sids),
            "answered_rows": answered.n,
            "answered_published": answered.published,
            "rows": rows.n,
            "rows_published": rows.published,
            "tasks_queued": queued,
            "cut_off_in_flight": cut_off,
            "verdict": verdict,
        }

    # Dispatch and backlog

    def fill(self, count: int) -> dict[str, Any]:
        self.stack.clean()
        self.stack.control(
            latency_ms=SIMULATOR_LATENCY_MS, callbacks=False, failure_rate=0, next_errors=[]
        )
        before = self.stack.used_memory()
        filled = self.stack.fill(count)
        after = self.stack.used_memory()
        queued = self.stack.queued_tasks(self.stack.settings.send_queue)
        if queued != count:
            raise RuntimeError(f"{queued} tasks on the queue after filling {count}")
        self.say(
            f"  filled {count:,} ({filled.accepted:,} through accept_send in "
            f"{filled.accept_s:.1f} s, copies {filled.copy_s:.1f} s, publish "
            f"{filled.publish_s:.1f} s = {1000 * filled.publish_s / count:.2f} ms/task)"
        )
        return {
            "fill": asdict(filled),
            "redis_used_memory_before": before,
            "redis_used_memory_queued": after,
            "redis_bytes_per_queued_message": (after - before) / count,
        }

    def drain(self, count: int, name: str) -> dict[str, Any]:
        """Start the workers on a full queue and wait until every message is `sent`."""
        stack = self.stack
        started = time.monotonic()
        poll = 1.0 if count <= 50_000 else 3.0
        deadline = started + max(600.0, count / 40)
        workers = stack.start_workers()
        rss_idle = sum(w.rss_bytes() for w in workers)
        rss_peak = rss_idle
        recording: Recording | None = None
        meter = self.meter()
        with running(stack, workers):
            while True:
                rss_peak = max(rss_peak, sum(w.rss_bytes() for w in workers))
                progress = stack.sql(
                    "SELECT count(*) FILTER (WHERE status = 'sent') AS sent, "
                    "count(*) FILTER (WHERE status NOT IN ('queued', 'sending', 'sent')) AS other "
                    "FROM messages"
                )
                if self.options.profile and recording is None and progress.sent > 500:
                    # Steady state only: the first sends import the provider SDKs.
                    seconds = min(20.0, count / 400)
                    recording = record(
                        name, workers[0].pid, seconds, RESULTS / f"profile-{name}.txt"
                    )
                if progress.sent + progress.other >= count or time.monotonic() > deadline:
                    break
                time.sleep(poll)
            self.foreign(f"{name} ({count:,})", meter)
            if recording is not None:
                profile = recording.finish()
                if profile is not None:
                    self.profiles.append(profile)
        timing = stack.sql(
            "SELECT count(*) AS n, extract(epoch FROM max(sent_at) - min(sent_at)) AS span "
            "FROM messages WHERE status = 'sent'"
        )
        span = float(timing.span or 0)
        rate = (timing.n - 1) / span if span > 0 else 0.0
        with stack.db.engine.connect() as connection:
            statuses = {
                row.status: row.n
                for row in connection.execute(
                    _sql("SELECT status, count(*) AS n FROM messages GROUP BY status")
                )
            }
        complete = timing.n == count
        self.say(
            f"  drained {timing.n:,}/{count:,} to sent at {rate:.0f} msg/s "
            f"(worker RSS {rss_peak / 2**20:.0f} MiB)" + ("" if complete else f" {statuses}")
        )
        return {
            "count": count,
            "sent": timing.n,
            "complete": complete,
            "statuses": statuses,
            "span_s": span,
            "msg_per_s": rate,
            "worker_rss_idle": rss_idle,
            "worker_rss_peak": rss_peak,
        }

    def dispatch(self) -> None:
        count = self.options.dispatch_count
        self.say(f"dispatch: {count:,} queued, simulator at {SIMULATOR_LATENCY_MS} ms")
        filled = self.fill(count)
        drained = self.drain(count, "dispatch")
        self.say(f"dispatch floor: {count:,} no-op tasks, same worker settings")
        floor = self.noop_floor(count)
        self.results["dispatch"] = {**filled, **drained, "noop": floor}

    def noop_floor(self, count: int) -> dict[str, Any]:
        from bench.noop import NOOP_QUEUE, NOOP_TASK
        from bench.noop import app as noop_app

        stack = self.stack
        stack.clean()
        started = time.monotonic()
        with noop_app.producer_or_acquire() as producer:
            for i in range(count):
                noop_app.send_task(NOOP_TASK, args=[f"SM{i:032x}"], producer=producer)
        published = time.monotonic() - started
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                samples.append((time.monotonic(), stack.queued_tasks(NOOP_QUEUE)))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            meter = self.meter()
            workers = stack.start_noop_workers()
            with running(stack, workers):
                deadline = time.monotonic() + 300
                while (not samples or samples[-1][1] > 0) and time.monotonic() < deadline:
                    time.sleep(0.05)
                self.foreign("the no-op floor", meter)
        finally:
            stop.set()
            watcher.join()
        begin = max((t for t, left in samples if left >= count), default=samples[0][0])
        end = min((t for t, left in samples if left == 0), default=samples[-1][0])
        left = samples[-1][1]
        rate = (count - left) / (end - begin) if end > begin else 0.0
        self.say(f"  no-op floor: {rate:.0f} tasks/s ({left} left)")
        return {
            "count": count,
            "left": left,
            "publish_s": published,
            "span_s": end - begin,
            "tasks_per_s": rate,
        }

    def backlog(self) -> None:
        sizes = [10_000, 200_000] if self.options.full else [10_000]
        self.results["backlog"] = {}
        for size in sizes:
            self.say(f"backlog: {size:,} queued")
            filled = self.fill(size)
            drained = self.drain(size, f"backlog-{size}")
            self.results["backlog"][str(size)] = {**filled, **drained}

    # End to end

    def e2e(self, name: str, rate: int, seconds: int) -> None:
        """Open loop at `rate` for `seconds` with workers and callbacks on; then wait (bounded)
        for every accepted message to be delivered. One not sent (or delivered) by then counts
        as infinitely late, so an overloaded run cannot look better by dropping its tail."""
        stack = self.stack
        self.say(f"end to end ({name}): {rate} msg/s for {seconds} s, callbacks on")
        stack.fresh_edges()
        stack.clean()
        stack.control(
            latency_ms=SIMULATOR_LATENCY_MS,
            callbacks=True,
            delivery_delay_ms=DELIVERY_DELAY_MS,
            failure_rate=0,
        )
        floor = direct_provider_latency(stack.simulator_url)
        stack.clean()
        waited = 0.0
        with running(stack, stack.start_workers()):
            # Warm-up at the same rate: fresh processes open their database connections, fill
            # their caches and import the provider SDKs on first use. Its messages are sent (or
            # given up on) and removed before the measured run starts.
            warm = run_python_open(
                stack.api_url, stack.tokens, rate=rate, seconds=E2E_WARMUP_S, grace=5
            )
            wait_for_sent(stack, warm.sids, timeout=E2E_WARMUP_S + 30)
            stack.clean()
            meter = self.meter()
            run = run_python_open(stack.api_url, stack.tokens, rate=rate, seconds=seconds)
            finished = last_change = time.monotonic()
            seen = -1
            while time.monotonic() - finished < E2E_WAIT_S:
                done = stack.sql(
                    "SELECT count(sent_at) AS sent, count(delivered_at) AS delivered "
                    "FROM messages WHERE sid = ANY(:sids)",
                    sids=run.sids,
                )
                if done.delivered >= len(run.sids):
                    break
                if done.sent + done.delivered != seen:
                    seen, last_change = done.sent + done.delivered, time.monotonic()
                elif time.monotonic() - last_change > E2E_STALL_S:
                    break  # nothing moves any more: callbacks the simulator gave up on
                time.sleep(1)
            waited = time.monotonic() - finished
            self.foreign(f"end to end ({name})", meter)
        with stack.db.engine.connect() as connection:
            rows = connection.execute(
                _sql(
                    "SELECT sid, created_at, sent_at, delivered_at FROM messages "
                    "WHERE sid = ANY(:sids)"
                ),
                {"sids": run.sids},
            ).all()
        handed = httpx.get(f"{stack.simulator_url}/messages", timeout=120).json()
        provider_at = {
            m["idempotencyKey"]: datetime.fromisoformat(m["createdAt"])
            for m in handed
            if m.get("idempotencyKey")
        }

        def ms(pairs: list[tuple[datetime | None, datetime]]) -> list[float]:
            return [(b - a).total_seconds() * 1000 if b else math.inf for b, a in pairs]

        to_sent = ms([(r.sent_at, r.created_at) for r in rows])
        to_provider = ms([(provider_at.get(r.sid), r.created_at) for r in rows])
        to_delivered = ms([(r.delivered_at, r.created_at) for r in rows])
        result: dict[str, Any] = {
            "offered_per_s": rate,
            "seconds": seconds,
            "waited_after_s": waited,
            "accept": run.summary(),
            "accepted": len(run.sids),
            "provider_floor_ms": {"p50": percentile(floor, 50), "p99": percentile(floor, 99)},
            "delivery_delay_ms": DELIVERY_DELAY_MS,
            "accept_to_sent": _latency(to_sent),
            "accept_to_provider": _latency(to_provider),
            "accept_to_delivered": _latency(to_delivered),
        }
        self.results[name] = result
        stack.fresh_edges()  # its callbacks still in flight must not reach the next scenario
        self.say(
            f"  accepted {len(run.sids):,}/{int(rate * seconds):,} due ({run.errors} errors, "
            f"{run.dropped} dropped; accept p99 {run.p99_ms:.0f} ms, generator lag "
            f"{run.max_lag_ms:.0f} ms); accept->sent p50 "
            f"{_ms(result['accept_to_sent']['p50_ms'])} p99 "
            f"{_ms(result['accept_to_sent']['p99_ms'])}; delivered "
            f"{result['accept_to_delivered']['done']:,}, p99 "
            f"{_ms(result['accept_to_delivered']['p99_ms'])}"
        )


def wait_for_sent(stack: Stack, sids: list[str], timeout: float) -> None:
    """Until every one of `sids` left the queue (sent or final), or `timeout` s passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = stack.sql(
            "SELECT count(*) AS n FROM messages WHERE sid = ANY(:sids) "
            "AND status IN ('queued', 'sending')",
            sids=sids,
        )
        if left.n == 0:
            return
        time.sleep(0.5)


def _latency(values: list[float]) -> dict[str, Any]:
    """Percentiles where a message that never got there is infinitely late (None in JSON)."""

    def finite(value: float) -> float | None:
        return None if math.isinf(value) else value

    return {
        "count": len(values),
        "done": sum(1 for v in values if not math.isinf(v)),
        "p50_ms": finite(percentile(values, 50)),
        "p99_ms": finite(percentile(values, 99)),
        "max_ms": finite(max(values, default=0.0)),
    }


def _ms(value: float | None) -> str:
    if value is None:
        return f"> {E2E_WAIT_S:.0f} s wait"
    return f"{value / 1000:.1f} s" if value >= 10_000 else f"{value:.0f} ms"


def _sql(query: str) -> Any:
    from sqlalchemy import text

    return text(query)


# The table


@dataclass
class Row:
    path: str
    figure: str
    measured: str
    floor: str
    ratio: str
    target: str
    met: str


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def table(results: dict[str, Any], notes: list[str]) -> list[Row]:
    rows: list[Row] = []
    if "accept" in results:
        acc, bare = results["accept"]["accept"], results["accept"]["bare"]
        ratio = acc["ok_per_s"] / bare["ok_per_s"] if bare["ok_per_s"] else 0.0
        conns = f"{acc['connections']} conns"
        rows.append(
            Row(
                "Accept",
                f"200/s, closed loop {conns}",
                f"{acc['ok_per_s']:,.0f}/s",
                f"bare {bare['ok_per_s']:,.0f}/s",
                f"{ratio:.3f}",
                ">= 0.5",
                _yes(ratio >= 0.5),
            )
        )
        p99_ratio = acc["p99_ms"] / bare["p99_ms"] if bare["p99_ms"] else 0.0
        rows.append(
            Row(
                "Accept",
                "latency p50 / p99",
                f"{acc['p50_ms']:.1f} / {acc['p99_ms']:.1f} ms",
                f"{bare['p50_ms']:.1f} / {bare['p99_ms']:.1f} ms",
                f"p99 x{p99_ratio:.1f}",
                "p99 <= 25 ms",
                _yes(acc["p99_ms"] <= 25 and ratio >= 0.5),
            )
        )
        durable = results["accept"]["durability"]
        rows.append(
            Row(
                "Accept",
                "every 200 durable + queued",
                f"{durable['answered_rows']:,} rows / {durable['answered_200']:,} 200s",
                f"{durable['tasks_queued']:,} tasks",
                "-",
                "all",
                _yes(durable["ok"]),
            )
        )
    if "dispatch" in results:
        d = results["dispatch"]
        floor = d["noop"]["tasks_per_s"]
        ratio = d["msg_per_s"] / floor if floor else 0.0
        rows.append(
            Row(
                "Dispatch",
                f"{d['count']:,} queued -> sent, {SIMULATOR_LATENCY_MS} ms",
                f"{d['msg_per_s']:,.0f} msg/s",
                f"no-op {floor:,.0f}/s",
                f"{ratio:.3f}",
                ">= 1,000/s, >= 0.5",
                _yes(d["msg_per_s"] >= 1000 and ratio >= 0.5 and d["complete"]),
            )
        )
    for key in ("e2e", "e2e-sustainable"):
        if key in results:
            rows += _e2e_rows(results[key], target=key == "e2e")
    backlog = results.get("backlog", {})
    small, large = backlog.get("10000"), backlog.get("200000")
    if small:
        rows.append(
            Row(
                "Backlog",
                "10,000 queued -> sent",
                f"{small['msg_per_s']:,.0f} msg/s",
                "(the floor for 200k)",
                "1.000",
                "-",
                "-",
            )
        )
    if small and large:
        ratio = large["msg_per_s"] / small["msg_per_s"] if small["msg_per_s"] else 0.0
        rows.append(
            Row(
                "Backlog",
                "200,000 queued -> sent",
                f"{large['msg_per_s']:,.0f} msg/s",
                f"10k {small['msg_per_s']:,.0f} msg/s",
                f"{ratio:.3f}",
                "within 10%",
                _yes(abs(1 - ratio) <= 0.10 and large["complete"]),
            )
        )
    elif small:
        notes.append("200,000 backlog not run (BENCH_FULL=1 runs it; see docs/performance.md)")
    for size, case in ((10_000, small), (200_000, large)):
        if not case:
            continue
        rows.append(
            Row(
                "Backlog",
                f"Redis per queued msg / worker RSS, {size // 1000}k",
                f"{case['redis_bytes_per_queued_message']:,.0f} B / "
                f"{case['worker_rss_peak'] / 2**20:,.0f} MiB",
                f"{case['redis_used_memory_before'] / 2**20:.1f} MiB empty / "
                f"{case['worker_rss_idle'] / 2**20:.0f} MiB idle",
                f"{case['worker_rss_peak'] / case['worker_rss_idle']:.2f} RSS",
                "stated",
                "-",
            )
        )
    return rows


def _e2e_rows(e: dict[str, Any], *, target: bool) -> list[Row]:
    floor = e["provider_floor_ms"]["p50"]
    label = f"{e['offered_per_s']}/s x {e['seconds']} s"
    sent, prov, dlv = e["accept_to_sent"], e["accept_to_provider"], e["accept_to_delivered"]
    acc = e["accept"]

    def pair(lat: dict[str, Any]) -> str:
        return f"{_ms(lat['p50_ms'])} / {_ms(lat['p99_ms'])}"

    def times(lat: dict[str, Any], base: float) -> str:
        return f"p99 x{lat['p99_ms'] / base:.1f}" if lat["p99_ms"] is not None and base else "-"

    p99 = sent["p99_ms"]
    dfloor = floor + e["delivery_delay_ms"]
    return [
        Row(
            "End to end",
            f"{label}: accept p50 / p99",
            f"{acc['p50_ms']:.0f} / {acc['p99_ms']:.0f} ms",
            "-",
            "-",
            "-",
            f"{e['accepted']:,} 200 of {e['offered_per_s'] * e['seconds']:,} due",
        ),
        Row(
            "End to end",
            f"{label}: accept -> provider has it",
            pair(prov),
            f"direct POST {floor:.0f} ms",
            times(prov, floor),
            "-",
            f"{prov['done']:,} there",
        ),
        Row(
            "End to end",
            f"{label}: accept -> sent (sent_at)",
            pair(sent),
            f"direct POST {floor:.0f} ms",
            times(sent, floor),
            "p99 <= 100 ms" if target else "-",
            _yes(p99 is not None and p99 <= 100) if target else f"{sent['done']:,} sent",
        ),
        Row(
            "End to end",
            f"{label}: accept -> delivered",
            pair(dlv),
            f"{dfloor:.0f} ms (+ delay)",
            times(dlv, dfloor),
            "-",
            f"{dlv['done']:,} delivered",
        ),
    ]


def render(rows: list[Row]) -> str:
    header = Row("Path", "Figure", "Measured", "Floor (same run)", "Ratio", "Target", "Met")
    cells = [list(asdict(r).values()) for r in [header, *rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = []
    for n, c in enumerate(cells):
        out.append("|" + "|".join(f" {v:<{w}} " for v, w in zip(c, widths, strict=True)) + "|")
        if n == 0:
            out.append("|" + line + "|")
    return "\n".join(out)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError):
        memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def main() -> int:
    options = Options.from_env()
    RESULTS.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    generator = "wrk" if shutil.which("wrk") else "python"
    if generator == "python":
        notes.append(
            "wrk is not installed: the accept scenario uses the Python load generator (httpx), "
            "which saturates before the bare app does, so accept/bare reads high"
        )
        print("NOTE: " + notes[-1], flush=True)
    if options.profile and py_spy() is None:
        notes.append("BENCH_PROFILE=1 but py-spy is not installed: no profiles")
    workdir = Path(tempfile.mkdtemp(prefix="sms-bench-"))
    begun = datetime.now(UTC)
    bench: Bench | None = None
    try:
        with postgres_server() as database_url, redis_server() as redis_url:
            stack = Stack(workdir, database_url, redis_url, options.stack)
            bench = Bench(options, stack, generator, notes=notes)
            try:
                bench.say(f"PostgreSQL and Redis up; logs in {workdir}")
                stack.migrate()
                stack.provision()
                stack.start_simulator()
                api = stack.start_api()
                bench.say(f"API ({options.stack.api_workers} processes) and simulator up")
                if options.wants("accept"):
                    bench.scenario("accept", lambda: bench.accept(api))
                if options.wants("dispatch"):
                    bench.scenario("dispatch", bench.dispatch)
                if options.wants("e2e"):
                    seconds = options.e2e_seconds or bench.e2e_seconds()
                    bench.scenario("e2e", lambda: bench.e2e("e2e", options.e2e_rate, seconds))
                # The same pipeline at a rate it can carry. Accepting, sending and the callbacks
                # share the same cores, so their costs add up: 30% of the rate both stages
                # together managed, leaving room for the callbacks.
                accepted = bench.results.get("accept", {}).get("accept", {}).get("ok_per_s", 0.0)
                drained = bench.results.get("dispatch", {}).get("msg_per_s", 0.0)
                together = 1 / (1 / accepted + 1 / drained) if accepted and drained else 30.0
                rate = max(10, int(0.3 * together))
                if options.wants("e2e"):
                    bench.scenario(
                        "e2e-sustainable", lambda: bench.e2e("e2e-sustainable", rate, 20)
                    )
                if options.wants("backlog"):
                    bench.scenario("backlog", bench.backlog)
            finally:
                stack.stop_all()
                stack.db.dispose()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert bench is not None
    rows = table(bench.results, notes)
    rendered = render(rows)
    print()
    print(rendered)
    for note in notes:
        print(f"note: {note}")
    print(
        "\nCPU while measured, in cores of the machine's 2 (ours by component; others = the rest):"
    )
    for what, parts in bench.cpu.items():
        ours = ", ".join(f"{kind} {cores:.2f}" for kind, cores in parts.items() if cores >= 0.005)
        print(f"  {what}: {ours}; others {bench.interference[what]:.2f}")
    for profile in bench.profiles:
        print()
        print(profile.report())
    wall = bench.elapsed
    print(f"\nbench took {wall / 60:.1f} min; results in {RESULTS / 'latest.json'}")
    document = {
        "started_at": begun.isoformat(),
        "seconds": wall,
        "machine": machine(),
        "load_generator": generator,
        "options": asdict(options),
        "notes": notes,
        "failed": bench.failed,
        "foreign_cpu_cores": bench.interference,
        "cpu_cores_by_component": bench.cpu,
        "table": [asdict(r) for r in rows],
        "table_text": rendered,
        "results": bench.results,
        "profiles": {
            p.name: {
                "samples": p.samples,
                "by_library": p.by_library(),
                "top_own": p.top(own=True, count=25),
                "top_ours": p.top(own=False, ours=True, count=25),
            }
            for p in bench.profiles
        },
        "git": _git_head(),
    }
    (RESULTS / "latest.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 1 if bench.failed else 0


def _git_head() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    return ""


if __name__ == "__main__":
    sys.exit(main())
