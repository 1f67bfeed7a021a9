"""The HTTP exchange floor: what one request and its answer cost this box with the HTTP stack
a dispatched message goes through, doing nothing else.

A message dispatched with callbacks on makes three such exchanges: the worker's provider call
(aiohttp, as the simulator adapter and the Twilio SDK's async client make it) and the provider's
two status callbacks (`sent`, then `delivered`). The client here is aiohttp, as theirs is; the
server is the cheapest ASGI app uvicorn can serve (no framework: it reads the body and answers
a fixed text), started with the service's uvicorn settings. Box CPU over the exchanges made is a
lower bound for each of the three, so two cores over three of it is a ceiling for dispatch with
callbacks on that no change to our code can pass.

    python -m bench.exchange serve --port P --workers 2
    python -m bench.exchange client --url URL --seconds 12 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import uvicorn
import uvloop

BODY = b'{"from":"+15005550006","callerId":"+15005550009","jpToken":"bench","additionalParams":{}}'
_ANSWER = b"Placed"

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """Read the request's body, answer 200 with a short text."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = bool(message.get("more_body", False))
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(_ANSWER))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": _ANSWER})


async def _drive(url: str, seconds: float, concurrency: int) -> int:
    done = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:
        end = time.monotonic() + seconds

        async def loop() -> None:
            nonlocal done
            while time.monotonic() < end:
                async with session.post(url, data=BODY, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url} answered {response.status}")
                done += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--workers", type=int, default=1)
    client = sub.add_parser("client")
    client.add_argument("--url", required=True)
    client.add_argument("--seconds", type=float, default=12)
    client.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    if args.command == "serve":
        # As shared.cli.launcher.api runs the API (uvloop and httptools are uvicorn's choice).
        uvicorn.run(
            "bench.exchange:app",
            host="127.0.0.1",
            port=args.port,
            workers=args.workers,
            log_config=None,
            access_log=False,
        )
    else:
        print(uvloop.run(_drive(args.url, args.seconds, args.concurrency)), flush=True)


if __name__ == "__main__":
    main()
