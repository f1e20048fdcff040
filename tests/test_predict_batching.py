"""Predict batching in the gateway (services/gateway/predict_batching.py), against a model server stand-in that
answers each photo with its own pixels' mean, so every caller can tell its own row from the others'."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.gateway.predict_batching import NoBatching, PredictBatcher
from services.gateway.upstream import Prediction, UpstreamUnavailable


class HeldUpstream:
    """Records each Predict call's photos and target; each call waits until the test releases it."""

    def __init__(self):
        self.calls: list[tuple[list[float], int | None, str | None]] = []
        self.release: list[asyncio.Event] = []
        self.fail: set[int] = set()  # calls (by index) that fail

    async def predict(self, pixels: np.ndarray, version=None, label=None) -> list[Prediction]:
        index = len(self.calls)
        self.calls.append(([float(p.mean()) for p in pixels], version, label))
        gate = asyncio.Event()
        self.release.append(gate)
        await gate.wait()
        if index in self.fail:
            raise UpstreamUnavailable("model server: UNAVAILABLE")
        return [Prediction(version or 7, np.array([p.mean()], np.float32), ["x"], 1.0, False) for p in pixels]


def photo(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_lone_photo_goes_at_once_and_the_rest_wait_to_share_one_call():
    async def scenario():
        upstream = HeldUpstream()
        batcher = PredictBatcher(upstream, max_batch=4, max_in_flight=2)
        first = asyncio.create_task(batcher.predict(photo(1), 3, None))
        await settle()
        assert [c[0] for c in upstream.calls] == [[1.0]]  # sent at once: no timer
        rest = [asyncio.create_task(batcher.predict(photo(v), 3, None)) for v in range(2, 9)]
        await settle()
        # a second call for the free place in flight; the other six wait
        assert [c[0] for c in upstream.calls] == [[1.0], [2.0]]
        upstream.release[0].set()
        await settle()
        # the first call back: the waiting photos go out, max_batch at a time, in arrival order
        assert [c[0] for c in upstream.calls[2:]] == [[3.0, 4.0, 5.0, 6.0]]
        upstream.release[1].set()
        await settle()
        assert [c[0] for c in upstream.calls[3:]] == [[7.0, 8.0]]
        for gate in upstream.release[2:]:
            gate.set()
        answers = await asyncio.gather(first, *rest)
        assert [float(a.probabilities[0]) for a in answers] == [float(v) for v in range(1, 9)]  # each its own row
        assert {c[1] for c in upstream.calls} == {3}
        assert batcher._targets == {}  # nothing left behind

    asyncio.run(scenario())


def test_photos_for_different_targets_never_share_a_call():
    async def scenario():
        upstream = HeldUpstream()
        batcher = PredictBatcher(upstream, max_batch=8, max_in_flight=1)
        tasks = [asyncio.create_task(batcher.predict(photo(1), 1, None)),
                 asyncio.create_task(batcher.predict(photo(2), 2, None)),
                 asyncio.create_task(batcher.predict(photo(3), None, "stable")),
                 asyncio.create_task(batcher.predict(np.full((5, 5, 3), 4, np.uint8), 1, None)),
                 asyncio.create_task(batcher.predict(photo(5), 1, None))]
        await settle()
        assert sorted((c[1] or 0, c[2] or "", tuple(c[0])) for c in upstream.calls) == [
            (0, "stable", (3.0,)), (1, "", (1.0,)), (1, "", (4.0,)), (2, "", (2.0,))]  # another input size: own call
        upstream.release[0].set()  # version 1's first call back: its waiting photo goes out
        await settle()
        assert upstream.calls[-1][0] == [5.0] and upstream.calls[-1][1] == 1
        for gate in upstream.release:
            gate.set()
        await settle()
        for gate in upstream.release:
            gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_a_caller_that_leaves_cancels_nothing_for_the_others_in_its_call():
    async def scenario():
        upstream = HeldUpstream()
        batcher = PredictBatcher(upstream, max_batch=8, max_in_flight=1)
        busy = asyncio.create_task(batcher.predict(photo(1), 3, None))
        await settle()
        waiting = [asyncio.create_task(batcher.predict(photo(v), 3, None)) for v in (2, 3, 4)]
        await settle()
        waiting[1].cancel()  # left before its call went out: its photo is not sent
        upstream.release[0].set()
        await settle()
        assert upstream.calls[1][0] == [2.0, 4.0]
        waiting[0].cancel()  # left while its call is in flight: the call goes on for the others
        upstream.release[1].set()
        assert float((await waiting[2]).probabilities[0]) == 4.0
        assert float((await busy).probabilities[0]) == 1.0
        for task in waiting[:2]:
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_a_call_every_caller_left_is_cancelled_and_its_place_goes_to_the_photos_waiting():
    async def scenario():
        upstream = HeldUpstream()
        batcher = PredictBatcher(upstream, max_batch=4, max_in_flight=1)
        sent = asyncio.create_task(batcher.predict(photo(1), 3, None))
        await settle()
        left, waiting = (asyncio.create_task(batcher.predict(photo(v), 3, None)) for v in (2, 3))
        await settle()
        assert [c[0] for c in upstream.calls] == [[1.0]]  # photos 2 and 3 wait for the place in flight
        left.cancel()  # a waiting photo's caller leaves: no call to cancel yet
        sent.cancel()  # the call's only caller leaves: the call is cancelled, unanswered
        await settle()
        assert [c[0] for c in upstream.calls] == [[1.0], [3.0]]  # the place went to the photo still wanted
        upstream.release[1].set()
        assert float((await waiting).probabilities[0]) == 3.0
        assert not upstream.release[0].is_set()

    asyncio.run(scenario())


def test_a_failed_call_fails_its_own_photos_only_and_the_next_call_goes_out():
    async def scenario():
        upstream = HeldUpstream()
        upstream.fail = {1}
        batcher = PredictBatcher(upstream, max_batch=8, max_in_flight=1)
        first = asyncio.create_task(batcher.predict(photo(1), 3, None))
        await settle()
        failing = [asyncio.create_task(batcher.predict(photo(v), 3, None)) for v in (2, 3)]
        await settle()
        upstream.release[0].set()
        await settle()
        late = asyncio.create_task(batcher.predict(photo(4), 3, None))
        await settle()
        upstream.release[1].set()
        await settle()
        upstream.release[2].set()
        assert float((await first).probabilities[0]) == 1.0
        for task in failing:
            with pytest.raises(UpstreamUnavailable):
                await task
        assert float((await late).probabilities[0]) == 4.0
        assert [c[0] for c in upstream.calls] == [[1.0], [2.0, 3.0], [4.0]]

    asyncio.run(scenario())


def test_no_batching_makes_a_call_per_photo_and_the_bounds_are_checked():
    async def scenario():
        upstream = HeldUpstream()
        batcher = NoBatching(upstream)
        tasks = [asyncio.create_task(batcher.predict(photo(v), 3, None)) for v in (1, 2, 3)]
        await settle()
        assert [c[0] for c in upstream.calls] == [[1.0], [2.0], [3.0]]
        for gate in upstream.release:
            gate.set()
        assert [float(a.probabilities[0]) for a in await asyncio.gather(*tasks)] == [1.0, 2.0, 3.0]

    asyncio.run(scenario())
    for bad in ((0, 2), (4, 0)):
        with pytest.raises(ValueError):
            PredictBatcher(HeldUpstream(), *bad)
