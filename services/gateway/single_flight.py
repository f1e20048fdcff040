"""Single-flight: identical concurrent misses share one model server call, and an answer whose cache write is still
in flight is shared with identical requests arriving meanwhile (as they would have joined the call a moment before).

``SingleFlight`` shares; ``NoSingleFlight`` (``--no-single-flight``, for benchmarks) is the same interface without
the sharing, so every identical miss makes its own call. The classifier is given one of them at construction.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from services.gateway import metrics


class _Flight:
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task):
        self.task = task
        self.waiters = 0  # callers awaiting the task now


class SingleFlight:
    """The call runs in a task the single-flight owns, not in the first caller: a caller that goes away (a gRPC
    deadline, a cancelled call, a closed HTTP connection) only stops waiting, and the call goes on for the others
    (and for callers arriving while it is still in flight). Its outcome, answer or error, reaches every waiter.

    A call every caller has left is cancelled: work nobody waits for is not done. Under more misses than the model
    server can answer, the requests whose clients gave up would otherwise still be decoded and predicted, ahead of
    the ones still waiting. A miss cancelled while it waits for the preprocessing pool or for a place in a Predict
    call costs nothing more; one already in a call leaves its row of that call unread. An identical request arriving
    afterwards starts a call of its own.
    """

    def __init__(self):
        self._flights: dict[str, _Flight] = {}
        self._held: dict[str, dict] = {}  # cache key -> an answer whose cache write is in flight

    async def do(self, key: str, work: Callable[[], Awaitable]):
        flight = self._flights.get(key)
        if flight is not None:
            metrics.SINGLE_FLIGHT_SHARED.inc()
        else:
            flight = self._flights[key] = _Flight(asyncio.create_task(work()))
            flight.task.add_done_callback(lambda done: self._finished(key, done))
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if not flight.waiters and not flight.task.done():  # the last caller left
                if self._flights.get(key) is flight:
                    del self._flights[key]
                flight.task.cancel()
                metrics.MISSES_ABANDONED.inc()

    def _finished(self, key: str, call: asyncio.Task) -> None:
        flight = self._flights.get(key)
        if flight is not None and flight.task is call:
            del self._flights[key]
        if not call.cancelled():
            call.exception()  # retrieved here, so a call every waiter left logs no "never retrieved" warning

    def hold(self, key: str, answer: dict) -> Callable[[], None]:
        """Shares ``answer`` under the cache key ``key`` until the returned release is called (when its cache write
        has ended, landed or not)."""
        self._held[key] = answer

        def release() -> None:
            if self._held.get(key) is answer:
                del self._held[key]
        return release

    def held(self, key: str) -> dict | None:
        """The answer held under ``key`` (counted as shared), or None."""
        answer = self._held.get(key)
        if answer is not None:
            metrics.SINGLE_FLIGHT_SHARED.inc()
        return answer


class NoSingleFlight:
    """The SingleFlight interface without the sharing: each call runs in its caller, and ends when it leaves."""

    async def do(self, key: str, work: Callable[[], Awaitable]):
        try:
            return await work()
        except asyncio.CancelledError:
            metrics.MISSES_ABANDONED.inc()
            raise

    def hold(self, key: str, answer: dict) -> Callable[[], None]:
        return _nothing

    def held(self, key: str) -> None:
        return None


def _nothing() -> None:
    pass
