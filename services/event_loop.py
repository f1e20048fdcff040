"""The event loop the services run on: uvloop (libuv's loop for asyncio) where it is installed, asyncio's own
otherwise. Both run the same coroutine to the same end (``asyncio.Runner``'s: tasks cancelled, async generators and
the default executor shut down); uvloop spends less CPU per socket event, which the gateway and the model server
pay on every request. ``MUSHROOM_EVENT_LOOP=asyncio`` chooses asyncio's loop where uvloop is installed."""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine

ENVIRONMENT = "MUSHROOM_EVENT_LOOP"
log = logging.getLogger("event_loop")


def loop_factory():
    """The new-loop function ``run`` uses: uvloop's, or None for asyncio's own."""
    if os.environ.get(ENVIRONMENT, "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine):
    """``asyncio.run(main)`` on the loop ``loop_factory`` chooses."""
    factory = loop_factory()
    log.info("event loop: %s", "asyncio" if factory is None else "uvloop")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
