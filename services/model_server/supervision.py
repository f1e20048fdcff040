"""Supervised background loops: a step that raises is logged, counted, and retried with backoff; the loop never
ends on an exception. Each loop's health is on the monitoring endpoint:
``model_server_background_loop_failures{loop}`` counts failed steps,
``model_server_background_loop_last_success_timestamp_seconds{loop}`` says when a step last succeeded and
``model_server_background_loop_consecutive_failures{loop}`` is 0 while it is healthy."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter, Gauge

from services.model_server.metrics import REGISTRY

log = logging.getLogger("model_server.supervision")

LOOP_FAILURES = Counter("model_server_background_loop_failures", "Failed steps of a background loop", ["loop"],
                        registry=REGISTRY)
LOOP_LAST_SUCCESS = Gauge("model_server_background_loop_last_success_timestamp_seconds",
                          "Unix time of a background loop's last successful step", ["loop"], registry=REGISTRY)
LOOP_CONSECUTIVE_FAILURES = Gauge("model_server_background_loop_consecutive_failures",
                                  "Failed steps of a background loop since its last success", ["loop"],
                                  registry=REGISTRY)


def backoff_seconds(interval: float, failures: int, cap: float) -> float:
    """The wait after ``failures`` consecutive failed steps: the interval doubled per failure, at most ``cap``
    (and never less than the interval)."""
    return max(interval, min(cap, interval * 2 ** failures)) if failures else interval


async def supervised_loop(name: str, step: Callable[[], Awaitable[None]], interval: float,
                          stopping: asyncio.Event, max_backoff: float = 30.0) -> None:
    """Run ``step`` every ``interval`` seconds until ``stopping`` is set."""
    failures = 0
    LOOP_CONSECUTIVE_FAILURES.labels(loop=name).set(0)
    LOOP_FAILURES.labels(loop=name)  # the series exists (at 0) before the first failure
    while not stopping.is_set():
        try:
            await asyncio.wait_for(stopping.wait(), backoff_seconds(interval, failures, max_backoff))
            return
        except asyncio.TimeoutError:
            pass
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is logged, counted and retried
            failures += 1
            LOOP_FAILURES.labels(loop=name).inc()
            LOOP_CONSECUTIVE_FAILURES.labels(loop=name).set(failures)
            log.error("background loop %s failed (%d in a row; next try in %.0f s): %s: %s", name, failures,
                      backoff_seconds(interval, failures, max_backoff), type(exc).__name__, exc,
                      exc_info=not isinstance(exc, OSError))
            continue
        failures = 0
        LOOP_CONSECUTIVE_FAILURES.labels(loop=name).set(0)
        LOOP_LAST_SUCCESS.labels(loop=name).set(time.time())
