"""Supervised background loops: a step that raises is logged, counted and retried with backoff; the loop never ends
until the gateway stops. Each loop's last success is kept so readiness can report a loop that keeps failing."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from services.gateway import metrics

log = logging.getLogger("gateway.loops")
STALE_AFTER_INTERVALS = 6  # a loop with no success for this many intervals (at least MIN_STALE_SECONDS) is stale
MIN_STALE_SECONDS = 3.0


@dataclass
class LoopState:
    name: str
    interval: float
    max_backoff: float
    last_success: float = field(default_factory=time.monotonic)
    failures_in_a_row: int = 0
    last_error: str = ""

    def stale_for(self, now: float) -> float | None:
        """Seconds since the last success when that is past the stale bound, else None."""
        age = now - self.last_success
        return age if age > max(STALE_AFTER_INTERVALS * self.interval, MIN_STALE_SECONDS) else None


class Loops:
    def __init__(self, stopping: asyncio.Event, clock=time.monotonic):
        self.stopping = stopping
        self.clock = clock
        self.states: dict[str, LoopState] = {}

    async def run(self, name: str, step: Callable[[], Awaitable[None]], interval: float,
                  max_backoff: float = 5.0) -> None:
        """Calls ``step`` every ``interval`` seconds until stopping; after n failures in a row waits
        min(interval * 2**n, max_backoff) instead."""
        state = self.states.setdefault(name, LoopState(name, interval, max(max_backoff, interval)))
        state.last_success = self.clock()
        metrics.LOOP_LAST_SUCCESS.labels(loop=name).set_to_current_time()
        while not self.stopping.is_set():
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - supervised: any failure is logged, counted and retried
                state.failures_in_a_row += 1
                state.last_error = f"{type(exc).__name__}: {exc}"
                metrics.LOOP_FAILURES.labels(loop=name).inc()
                n = state.failures_in_a_row
                if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th ... failure in a row: a long outage logs little
                    log.warning("%s loop failed (%d in a row): %s", name, n, state.last_error, exc_info=n == 1)
                delay = min(interval * 2 ** state.failures_in_a_row, state.max_backoff)
            else:
                if state.failures_in_a_row:
                    log.info("%s loop recovered after %d failures", name, state.failures_in_a_row)
                state.failures_in_a_row, state.last_error = 0, ""
                state.last_success = self.clock()
                metrics.LOOP_LAST_SUCCESS.labels(loop=name).set_to_current_time()
                delay = interval
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def stale(self) -> dict[str, str]:
        """{loop: why} for each loop with no success for several intervals."""
        now = self.clock()
        return {s.name: f"no success for {age:.0f} s ({s.last_error})" for s in self.states.values()
                if (age := s.stale_for(now)) is not None}
