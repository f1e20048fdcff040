"""Admission of cache misses: under more misses than the model server can answer, the excess is refused at once
(HTTP 503 ``overloaded`` with Retry-After, gRPC UNAVAILABLE) instead of queueing until every client's timeout has
expired and the work done for them is wasted.

A miss is admitted while the misses already in progress (being preprocessed, waiting for a place in a Predict call,
in one) would all be answered within ``max_wait`` seconds at the rate misses have been answered lately: by Little's
law a new miss waits about (misses in progress) / (rate). The rate is the best of the last RATE_WINDOWS one-second
windows, so a lull does not shrink it, and at least MIN_ADMITTED per ``max_wait``, so a burst after a quiet spell (or
at start, before any rate is known) is not refused for want of a measured rate: a caller without a shorter deadline
always gets MIN_ADMITTED places.

A caller that says how long it will wait (a gRPC deadline; over HTTP, Envoy's ``x-envoy-expected-rq-timeout-ms``,
which Istio and so KServe set) is held to that instead when it is shorter: a miss the queue could not answer before
its caller leaves is refused at once (504 ``deadline_unreachable``, gRPC DEADLINE_EXCEEDED) rather than taken on,
holding a place a caller that waits longer could have had, and dropped when the deadline expires. The rate's floor
is the same (MIN_ADMITTED per ``max_wait``), so a caller waiting half of ``max_wait`` always gets half as many places.

Only misses pass through here: a cache hit, or a request joining an identical miss already in progress, costs no
model work and is never refused. A miss whose clients all left counts as in progress until it is dropped, and is not
counted as answered.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager

from services.gateway import metrics
from services.gateway.errors import GatewayError

MIN_ADMITTED = 64  # two full Predict calls (predict_batching.MAX_BATCH photos each)
RATE_WINDOWS = 10  # one-second windows the answered-miss rate is the best of
WINDOW_S = 1.0
RETRY_AFTER_S = 1
REFUSAL_CODES = ("overloaded", "deadline_unreachable")  # the GatewayError codes of a miss refused here


class MissAdmission:
    def __init__(self, max_wait: float, clock: Callable[[], float] = time.monotonic):
        """``max_wait`` seconds a miss may expect to wait for the ones before it; 0 admits every miss."""
        self.max_wait = max_wait
        self.in_progress = 0
        self._clock = clock
        self._window_start = clock()
        self._answered_in_window = 0
        self._windows: deque[int] = deque(maxlen=RATE_WINDOWS)  # misses answered in each full window

    def export(self) -> None:
        """Shows this admission's state in the gateway's metrics, read at each scrape."""
        metrics.MISSES_IN_PROGRESS.set_function(lambda: self.in_progress)
        metrics.MISSES_ADMITTED_LIMIT.set_function(lambda: self.limit() if self.max_wait > 0 else 0)

    def rate(self) -> float:
        """Misses answered per second: the best of the recent full windows (0 before the first one ends)."""
        self._roll()
        return max(self._windows, default=0) / WINDOW_S

    def limit(self, wait: float | None = None) -> int:
        """How many misses may be in progress at once now for a miss that may wait ``wait`` seconds (at most, and by
        default, max_wait): as many as are answered in that time at the recent rate, or at its floor."""
        wait = self.max_wait if wait is None else min(wait, self.max_wait)
        return max(int(MIN_ADMITTED * (wait / self.max_wait)), int(self.rate() * wait))

    def has_room(self, wait: float | None = None) -> bool:
        return self.max_wait <= 0 or self.in_progress < self.limit(wait)

    @contextmanager
    def admitted(self, deadline: float | None = None):
        """``with admission.admitted(deadline):`` around a miss's work, ``deadline`` the instant (on this admission's
        clock) its caller stops waiting, or None. Raises at once, when there is no room: the 503 ``overloaded``
        GatewayError (for any caller), or the 504 ``deadline_unreachable`` one (for this caller's deadline)."""
        if not self.has_room():
            metrics.MISSES_REFUSED_BY["queue"].inc()
            raise GatewayError(
                503, "overloaded", f"the gateway is answering as many cache misses as it can ({self.in_progress} in "
                f"progress, about {self.max_wait:g} s of work at {self.rate():.0f} answers per second): try again "
                "in a moment", retry_after=RETRY_AFTER_S)
        if deadline is not None:
            left = max(0.0, deadline - self._clock())
            if not self.has_room(left):  # the same room as above for a deadline of max_wait or more
                metrics.MISSES_REFUSED_BY["deadline"].inc()
                raise GatewayError(
                    504, "deadline_unreachable", f"this request's deadline ({left * 1000:.0f} ms left) leaves room for "
                    f"{self.limit(left)} cache misses in progress, at the rate misses are answered ({self.rate():.0f} "
                    f"a second lately, counted as at least {MIN_ADMITTED} per {self.max_wait:g} s), and "
                    f"{self.in_progress} are: a miss would not be answered in time")
        self.in_progress += 1
        try:
            yield
            self._roll()
            self._answered_in_window += 1  # reached only when the work ended with its answer
        finally:
            self.in_progress -= 1

    def _roll(self) -> None:
        """Closes the windows that have ended (those with no answer count 0)."""
        ended = int((self._clock() - self._window_start) / WINDOW_S)
        if ended <= 0:
            return
        self._windows.append(self._answered_in_window)
        self._windows.extend([0] * min(ended - 1, RATE_WINDOWS))
        self._window_start += ended * WINDOW_S
        self._answered_in_window = 0
