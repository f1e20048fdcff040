"""Single-flight: identical concurrent misses share one model server call, and an answer whose cache write is still
in flight is shared with identical requests arriving meanwhile (as they would have joined the call a moment before).

``SingleFlight`` shares; ``NoSingleFlight`` (``--no-single-flight``, for benchmarks) is the same interface without
the sharing, so every identical miss makes its own call. The classifier is given one of them at construction.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from services.gateway import metrics


class SingleFlight:
    """The call runs in a task the single-flight owns, not in the first caller: a caller that goes away (a gRPC
    deadline, a cancelled call, a closed HTTP connection) only stops waiting, and the call goes on for the others
    (and for callers arriving while it is still in flight). Its outcome, answer or error, reaches every waiter.
    """

    def __init__(self):
        self._calls: dict[str, asyncio.Task] = {}
        self._held: dict[str, dict] = {}  # cache key -> an answer whose cache write is in flight

    async def do(self, key: str, work: Callable[[], Awaitable]):
        call = self._calls.get(key)
        if call is not None:
            metrics.SINGLE_FLIGHT_SHARED.inc()
        else:
            call = asyncio.create_task(work())
            self._calls[key] = call
            call.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(call)

    def _finished(self, key: str, call: asyncio.Task) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]
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
    """The SingleFlight interface without the sharing."""

    async def do(self, key: str, work: Callable[[], Awaitable]):
        return await work()

    def hold(self, key: str, answer: dict) -> Callable[[], None]:
        return _nothing

    def held(self, key: str) -> None:
        return None


def _nothing() -> None:
    pass
