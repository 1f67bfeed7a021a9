"""The event loop our own loops run on (uvicorn picks the same for the API)."""

from __future__ import annotations

import asyncio


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (a dependency on Linux and macOS): the loops that carry
    provider calls and the simulator's callbacks do socket work, which it does in C. asyncio's
    own loop elsewhere."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
