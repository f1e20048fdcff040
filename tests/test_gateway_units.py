"""Unit tests of the gateway's pure parts: the shared preprocessing, weighted rendezvous routing, single-flight and
the circuit breaker."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest

import training_job.preprocessing as contract
from services.gateway import classifier
from services.gateway.cache import CircuitBreaker, SingleFlight, cache_key
from services.gateway.routing import RoutingError, RoutingTable, parse_assignments, pick_version

CLIENTS = [f"client-{i}" for i in range(20000)]


def test_gateway_uses_the_training_jobs_preprocessing_function_object():
    assert classifier.preprocess_bytes is contract.preprocess_bytes


def test_cache_key_depends_on_photo_model_version_and_preprocessing():
    key = cache_key("abc", "mushrooms", 3)
    assert contract.PREPROCESSING_VERSION in key
    assert len({key, cache_key("abd", "mushrooms", 3), cache_key("abc", "other", 3), cache_key("abc", "mushrooms", 4)}) == 4


def test_split_converges_to_the_weights():
    counts = Counter(pick_version({1: 90, 2: 10}, c) for c in CLIENTS)
    assert abs(counts[1] / len(CLIENTS) - 0.9) < 0.01


def test_a_weight_shift_moves_few_clients_and_only_towards_the_growing_version():
    before = {c: pick_version({1: 90, 2: 10}, c) for c in CLIENTS}
    after = {c: pick_version({1: 80, 2: 20}, c) for c in CLIENTS}
    moved = [c for c in CLIENTS if before[c] != after[c]]
    assert 0.08 < len(moved) / len(CLIENTS) < 0.13  # the ideal is 10 %
    assert all(before[c] == 1 and after[c] == 2 for c in moved)


def test_a_removed_version_only_moves_its_own_clients():
    before = {c: pick_version({1: 50, 2: 30, 3: 20}, c) for c in CLIENTS}
    after = {c: pick_version({1: 50, 2: 30}, c) for c in CLIENTS}
    assert all(before[c] == after[c] for c in CLIENTS if before[c] != 3)


@pytest.mark.parametrize("table, message", [
    ({"weights": {"x!": 1}}, "neither a version number nor a version label"),
    ({"weights": {"1.5": 1}}, "neither a version number nor a version label"),
    ({"weights": {"": 1}}, "neither a version number nor a version label"),
    ({"weights": {"1": "heavy"}}, "weights are numbers"),
    ({"weights": {"1": -5}}, ">= 0"),
    ({"weights": [1, 2]}, "routing must be"),
    ({"weights": {"1": 1}, "shadow": "can ary"}, "shadow"),
    ({"weights": {"1": 1}, "shadow": 1.5}, "shadow"),
])
def test_bad_tables_are_refused(table, message):
    with pytest.raises(RoutingError, match=message):
        RoutingTable.from_json(table)


def test_cli_assignments():
    table = parse_assignments(["3=90", "4=10", "shadow=5"])
    assert (table.weights, table.shadow) == ({3: 90.0, 4: 10.0}, 5)


def test_identical_concurrent_misses_make_one_call():
    calls = []

    async def work():
        calls.append(1)
        await asyncio.sleep(0.05)
        return {"answer": 42}

    async def main():
        flight = SingleFlight()
        return await asyncio.gather(*(flight.do("same-photo", work) for _ in range(10)))

    assert asyncio.run(main()) == [{"answer": 42}] * 10
    assert len(calls) == 1


def test_breaker_opens_after_failures_and_retries_later(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("services.gateway.cache.time.monotonic", lambda: now[0])
    breaker = CircuitBreaker(failures_to_open=3, open_seconds=2.0)
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert not breaker.allow()
    now[0] += 2.5
    assert breaker.allow()
    breaker.success()
    assert breaker.allow() and breaker.failures == 0
