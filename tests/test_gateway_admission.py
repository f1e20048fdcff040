"""Admission of cache misses (services/gateway/admission.py) on a fake clock: which misses are taken on and which
are refused with 503 overloaded, and which with 504 deadline_unreachable for their caller's own deadline."""
from __future__ import annotations

import asyncio

import pytest

from services.gateway import metrics
from services.gateway.admission import MIN_ADMITTED, RATE_WINDOWS, RETRY_AFTER_S, MissAdmission
from services.gateway.errors import GatewayError


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(admission: MissAdmission, count: int) -> None:
    for _ in range(count):
        with admission.admitted():
            pass


def hold(admission: MissAdmission, count: int) -> list:
    """``count`` misses taken on and left in progress: their context managers, entered."""
    held = [admission.admitted() for _ in range(count)]
    for miss in held:
        miss.__enter__()
    return held


def test_before_any_rate_is_known_the_first_misses_are_taken_on_and_the_next_refused_at_once():
    admission = MissAdmission(1.0, Clock())
    refused = metrics.MISSES_REFUSED_BY["queue"]._value.get()
    held = hold(admission, MIN_ADMITTED)
    with pytest.raises(GatewayError) as exc, admission.admitted():
        pass
    assert (exc.value.status, exc.value.code, exc.value.retry_after) == (503, "overloaded", RETRY_AFTER_S)
    assert exc.value.grpc_code.name == "UNAVAILABLE"
    assert admission.in_progress == len(held)
    assert metrics.MISSES_REFUSED_BY["queue"]._value.get() == refused + 1


def test_the_limit_is_what_the_recent_answer_rate_serves_within_the_wait():
    clock = Clock()
    admission = MissAdmission(0.5, clock)
    answer(admission, 300)  # 300 answers in the first second
    clock.now += 1.0
    assert admission.rate() == 300
    assert admission.limit() == 150
    held = hold(admission, 150)
    assert not admission.has_room() and admission.in_progress == len(held)
    held[0].__exit__(None, None, None)  # one answered: room for one more
    assert admission.has_room()


def test_a_lull_does_not_shrink_the_rate_until_every_window_has_passed():
    clock = Clock()
    admission = MissAdmission(1.0, clock)
    answer(admission, 200)  # a busy second
    clock.now += RATE_WINDOWS  # quiet since: the busy second is the oldest of the last RATE_WINDOWS
    assert admission.limit() == 200
    answer(admission, 10)
    clock.now += 1.0
    assert admission.limit() == MIN_ADMITTED  # no window since the busy one held more than 10 answers


def test_misses_that_failed_or_were_dropped_are_not_counted_as_answered():
    clock = Clock()
    admission = MissAdmission(1.0, clock)
    for failure in (ValueError("the model server failed"), asyncio.CancelledError()):
        for _ in range(100):
            with pytest.raises(type(failure)), admission.admitted():
                raise failure
    clock.now += 1.0
    assert admission.rate() == 0 and admission.in_progress == 0


def test_a_wait_of_zero_takes_every_miss_on():
    admission = MissAdmission(0, Clock())
    held = hold(admission, 10 * MIN_ADMITTED)
    assert admission.has_room() and admission.in_progress == len(held)


def test_a_miss_the_queue_would_not_answer_within_its_deadline_is_refused_and_a_longer_one_taken_on():
    clock = Clock()
    admission = MissAdmission(1.0, clock)
    answer(admission, 100)
    clock.now += 1.0  # 100 answers per second: 100 in progress within a second's wait
    held = hold(admission, 80)
    refused = metrics.MISSES_REFUSED_BY["deadline"]._value.get()
    with pytest.raises(GatewayError) as exc, admission.admitted(deadline=clock.now + 0.5):  # 50 within 0.5 s
        pass
    assert (exc.value.status, exc.value.code, exc.value.retry_after) == (504, "deadline_unreachable", None)
    assert exc.value.grpc_code.name == "DEADLINE_EXCEEDED"
    assert metrics.MISSES_REFUSED_BY["deadline"]._value.get() == refused + 1
    assert admission.in_progress == len(held)
    with admission.admitted(deadline=clock.now + 0.9):  # 90 within 0.9 s
        assert admission.in_progress == len(held) + 1
    with admission.admitted(deadline=None), admission.admitted(deadline=clock.now + 5):  # max_wait's 100 for both
        assert admission.in_progress == len(held) + 2


def test_before_any_rate_is_known_a_deadline_gets_its_share_of_the_floor_and_admission_off_takes_all():
    clock = Clock()
    admission = MissAdmission(1.0, clock)
    held = hold(admission, MIN_ADMITTED // 2 - 1)  # no rate known yet: MIN_ADMITTED per second assumed
    with admission.admitted(deadline=clock.now + 0.5):  # half a second: MIN_ADMITTED // 2 places
        with pytest.raises(GatewayError) as exc, admission.admitted(deadline=clock.now + 0.5):
            pass
    assert exc.value.code == "deadline_unreachable"
    with pytest.raises(GatewayError), admission.admitted(deadline=clock.now - 1):  # its caller has left already
        pass
    idle = MissAdmission(1.0, clock)
    with pytest.raises(GatewayError) as exc, idle.admitted(deadline=clock.now + 0.001):  # less than any miss takes
        pass
    assert "(1 ms left) leaves room for 0 cache misses in progress" in exc.value.message
    assert "and 0 are: a miss would not be answered in time" in exc.value.message
    with admission.admitted(deadline=clock.now + 0.75):
        assert admission.in_progress == len(held) + 1
    off = MissAdmission(0, clock)
    hold(off, 10 * MIN_ADMITTED)
    with off.admitted(deadline=clock.now + 0.001):
        pass
