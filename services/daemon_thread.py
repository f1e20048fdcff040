"""Blocking work awaited from an event loop without holding the loop or its exit: a file operation on a volume that
stops answering (a network file system whose server is away) blocks for as long as the volume is away, and no
thread can be made to give it up.

``in_daemon_thread`` runs the work on a daemon thread of its own: never on the event loop, whose every request it
would hold, nor on the loop's default executor, whose few threads blocked ones would use up and whose threads
``asyncio.run`` waits for at exit. A caller that stops waiting (a timeout, a cancellation) leaves the thread to end
whenever the work does, its outcome handed to nobody."""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_daemon_thread(work: Callable[..., T], *args, name: str) -> T:
    """``work(*args)`` on a new daemon thread called ``name``: its result, or what it raised."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(outcome: BaseException | None, result) -> None:
        if done.done():  # its waiter stopped waiting (the future was cancelled with it)
            return
        if outcome is not None:
            done.set_exception(outcome)
        else:
            done.set_result(result)

    def run() -> None:
        outcome, result = None, None
        try:
            result = work(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter, which raises it
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (the service stopped)
            loop.call_soon_threadsafe(settle, outcome, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done
