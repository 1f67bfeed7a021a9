"""Load generators: wrk (closed loop, a Lua script for the POST body and headers) when it is
installed, else a Python one (httpx, asyncio); and an open-loop Python generator at a fixed rate
(Debian's wrk has no fixed-rate mode) for the end-to-end scenario."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.stack import HEADERS, SEND_PATH, send_body

MARKER = "BENCH_JSON "
IDLE_REOPEN_S = 4.0  # below uvicorn's keep-alive timeout (5 s)

_LUA = """
local tokens = {%(tokens)s}
local path = "%(path)s"
local headers = {%(headers)s}
local params = "%(params)s"
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  n = 0
  ok = 0
  other = 0
  sids = {}
  collect = args[1] == "collect"
end

function request()
  n = n + 1
  local t = tokens[((n * #threads + tid) %% #tokens) + 1]
  local body = '{"callerId": "' .. t[2] .. '", "jpToken": "' .. t[1] ..
    '", "additionalParams": "' .. params .. '"}'
  return wrk.format("POST", path, headers, body)
end

function response(status, hdrs, body)
  if status == 200 then
    ok = ok + 1
    if collect then
      local sid = string.match(body, "SM%%x+")
      if sid then sids[#sids + 1] = sid end
    end
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local ok_total, other_total, sent_total, all_sids = 0, 0, 0, {}
  for _, thread in ipairs(threads) do
    ok_total = ok_total + thread:get("ok")
    other_total = other_total + thread:get("other")
    sent_total = sent_total + thread:get("n")
    for _, sid in ipairs(thread:get("sids")) do all_sids[#all_sids + 1] = '"' .. sid .. '"' end
  end
  local e = summary.errors
  io.write(string.format(
    '%(marker)s{"duration_us": %%d, "responses": %%d, "ok": %%d, "other": %%d, "sent": %%d, ' ..
    '"errors": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d, ' ..
    '"mean_us": %%f, "sids": [%%s]}\\n',
    summary.duration, summary.requests, ok_total, other_total, sent_total,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, table.concat(all_sids, ",")))
end
"""


@dataclass
class LoadResult:
    """What one load run saw. Latencies in milliseconds."""

    generator: str
    connections: int
    duration_s: float
    responses: int
    ok: int
    other: int
    sent: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    # Only for runs that collect them: every messageSid a 200 carried.
    sids: list[str] = field(default_factory=list, repr=False)
    # Open loop only: how far behind its schedule the generator itself fell, at worst, and
    # how many due requests it never sent (still waiting for a connection at its deadline).
    max_lag_ms: float = 0.0
    dropped: int = 0

    @property
    def ok_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    def summary(self) -> dict[str, float | int | str]:
        figures = {k: v for k, v in vars(self).items() if k != "sids"}
        return {**figures, "ok_per_s": round(self.ok_per_s, 1)}


def lua_script(tokens: Sequence[tuple[str, str]]) -> str:
    return _LUA % {
        "tokens": ", ".join(f'{{"{token}", "{caller}"}}' for token, caller in tokens),
        "path": SEND_PATH,
        "headers": ", ".join(f'["{k}"] = "{v}"' for k, v in HEADERS.items()),
        "params": "var1=value1&var2=value",
        "marker": MARKER,
    }


def run_wrk(
    base_url: str,
    tokens: Sequence[tuple[str, str]],
    workdir: Path,
    *,
    connections: int,
    seconds: float,
    threads: int = 1,
    collect: bool = False,
) -> LoadResult:
    """Closed loop: `connections` keep one request each in flight for `seconds`."""
    script = workdir / "send_sms.lua"
    script.write_text(lua_script(tokens))
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s"]
    argv += ["--timeout", "10s", "-s", str(script), base_url + SEND_PATH]
    argv += ["--", "collect" if collect else "count"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60)
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith(MARKER))
    data = json.loads(line.removeprefix(MARKER))
    return LoadResult(
        generator="wrk",
        connections=connections,
        duration_s=data["duration_us"] / 1e6,
        responses=data["responses"],
        ok=data["ok"],
        other=data["other"],
        sent=data["sent"],
        errors=data["errors"],
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        mean_ms=data["mean_us"] / 1000,
        sids=data["sids"],
    )


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (as wrk reports them); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


class _Connection:
    """A minimal HTTP/1.1 keep-alive client on one socket: the generator must cost far less than
    the server it loads (httpx's pool rescans every queued request on each one, which is
    quadratic once thousands are queued)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._used = 0.0
        fixed = "".join(f"{name}: {value}\r\n" for name, value in HEADERS.items())
        self._head = f"POST {SEND_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n{fixed}"

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self._streams is not None and time.monotonic() - self._used > IDLE_REOPEN_S:
            # uvicorn closes a keep-alive connection idle for 5 s: never write into that race.
            self.close()
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        try:
            writer.write(f"{self._head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            status = int((await reader.readline()).split()[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and b"close" in value.lower():
                    close = True
                elif name == b"transfer-encoding":
                    raise ValueError("chunked answers are not expected here")
            content = await reader.readexactly(length)
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        self._used = time.monotonic()
        return status, content

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


class _Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.ok = self.other = self.errors = self.sent = self.dropped = 0
        self.sids: list[str] = []

    def result(
        self, generator: str, connections: int, duration: float, lag: float = 0.0
    ) -> LoadResult:
        lat = self.latencies
        return LoadResult(
            generator=generator,
            connections=connections,
            duration_s=duration,
            responses=self.ok + self.other,
            ok=self.ok,
            other=self.other,
            sent=self.sent,
            errors=self.errors,
            p50_ms=percentile(lat, 50),
            p90_ms=percentile(lat, 90),
            p99_ms=percentile(lat, 99),
            max_ms=max(lat, default=0.0),
            mean_ms=sum(lat) / len(lat) if lat else 0.0,
            sids=self.sids,
            max_lag_ms=lag * 1000,
            dropped=self.dropped,
        )

    async def send(self, connection: _Connection, body: bytes, due: float, collect: bool) -> None:
        """One request; its latency counts from `due`, when it should have been sent."""
        self.sent += 1
        try:
            status, content = await asyncio.wait_for(connection.post(body), timeout=30)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, TimeoutError):
            self.errors += 1
            return
        self.latencies.append((time.perf_counter() - due) * 1000)
        if status == 200:
            self.ok += 1
            if collect:
                self.sids.append(content.decode().rsplit(" ", 1)[-1])
        else:
            self.other += 1


def _host_port(base_url: str) -> tuple[str, int]:
    host, _, port = base_url.removeprefix("http://").partition(":")
    return host, int(port)


def run_python_closed(
    base_url: str,
    tokens: Sequence[tuple[str, str]],
    *,
    connections: int,
    seconds: float,
    collect: bool = False,
) -> LoadResult:
    """The wrk fallback: `connections` keep-alive connections, each one request in flight."""
    host, port = _host_port(base_url)

    async def main() -> LoadResult:
        tally = _Tally()
        start = time.perf_counter()
        deadline = start + seconds

        async def loop(worker: int) -> None:
            connection, n = _Connection(host, port), worker
            while time.perf_counter() < deadline:
                token, caller = tokens[n % len(tokens)]
                n += connections
                await tally.send(connection, send_body(token, caller), time.perf_counter(), collect)
            connection.close()

        await asyncio.gather(*(loop(i) for i in range(connections)))
        return tally.result("python", connections, time.perf_counter() - start)

    return asyncio.run(main())


def run_python_open(
    base_url: str,
    tokens: Sequence[tuple[str, str]],
    *,
    rate: float,
    seconds: float,
    connections: int | None = None,
    grace: float = 30.0,
) -> LoadResult:
    """Open loop: one request due every 1/rate s whatever the answers do, sent on the first of
    `connections` free; latency counts from when it was due, so a server that falls behind
    shows it (the wait for a free connection is part of it). What is still unsent `grace` s
    after the schedule ends is dropped, and counted."""
    host, port = _host_port(base_url)
    # Enough for a second of answers in flight, at most 128.
    connections = connections or min(128, max(8, int(rate)))

    async def main() -> LoadResult:
        tally = _Tally()
        due_queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
        start = time.perf_counter()
        give_up = start + seconds + grace

        async def worker() -> None:
            connection = _Connection(host, port)
            while (item := await due_queue.get()) is not None:
                i, due = item
                if time.perf_counter() > give_up:
                    tally.dropped += 1
                    continue
                token, caller = tokens[i % len(tokens)]
                await tally.send(connection, send_body(token, caller), due, True)
            connection.close()

        workers = [asyncio.create_task(worker()) for _ in range(connections)]
        lag = 0.0
        for i in range(int(rate * seconds)):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(lag, time.perf_counter() - due)
            due_queue.put_nowait((i, due))
        for _ in workers:
            due_queue.put_nowait(None)
        await asyncio.gather(*workers)
        return tally.result("python-open-loop", connections, time.perf_counter() - start, lag)

    return asyncio.run(main())


def direct_provider_latency(simulator_url: str, count: int = 50) -> list[float]:
    """Milliseconds for a POST straight to the simulator, one at a time: the provider's own
    latency plus one HTTP round trip, the floor under accept -> provider call."""
    timings = []
    with httpx.Client(base_url=simulator_url, timeout=10) as client:
        for i in range(count):
            started = time.perf_counter()
            client.post(
                "/messages",
                json={"to": "+12025550100", "from": "+12121234567", "body": "floor"},
                headers={"Idempotency-Key": f"bench-floor-{i}-{time.time_ns()}"},
            ).raise_for_status()
            timings.append((time.perf_counter() - started) * 1000)
    return timings
