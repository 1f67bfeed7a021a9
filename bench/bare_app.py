"""The accept floor: a bare Litestar app with one POST route, served exactly as `sms-dispatch api`
serves the real one (same uvicorn settings), so accept/bare isolates what our handler costs."""

from __future__ import annotations

import argparse

import uvicorn
from litestar import Litestar, MediaType, Request, post
from litestar.datastructures import State

PATH = "/interact/version/3/account/{account_id:str}/resources/campaign/sms/{campaign_id:str}"


@post(PATH, media_type=MediaType.TEXT, status_code=200)
async def place(request: Request[object, object, State], account_id: str, campaign_id: str) -> str:
    """Read the body as the real handler does, answer a short text, touch nothing else."""
    await request.body()
    return f"Placed campaign {{{campaign_id}}} in SMS queue"


def create_app() -> Litestar:
    return Litestar(route_handlers=[place], logging_config=None, openapi_config=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    # The same call as shared.cli.launcher.api, argument for argument.
    uvicorn.run(
        "bench.bare_app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=20,
    )


if __name__ == "__main__":
    main()
