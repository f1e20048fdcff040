"""Predict batching in the gateway: concurrent cache misses for the same version become one Predict call.

Every call to the model server costs the gateway and the model server a fixed share of CPU (gRPC, protobuf, the
server's batch scheduler) whatever it carries, so photos sent together cost less than photos sent one by one.
``PredictBatcher`` batches naturally, with no timer: a call for a target (a version number, or a version label, and
the input size) goes out at once while fewer than ``max_in_flight`` calls for that target are in flight, so a lone
request never waits; photos that arrive while they are all busy wait for the first one to return and then go out
together, up to ``max_batch`` per call. A batch is one ``[N, S, S, 3]`` Predict request, which TF Serving answers as
it answers any batch, so the gateway works the same against it.

The call runs in a task the batcher owns, not in a caller: a caller that goes away (its deadline, a closed
connection) only stops waiting, and the others in its batch get their answers. Once every caller of a call has
gone, the call is cancelled: gRPC tells the model server, whose batching does not start a request whose caller
left, and the call's place in flight goes at once to the photos waiting for one. The call's outcome reaches each
photo's caller: its own row of the answer, or the call's error (the photos of one call share a target, so a refusal
or an outage is the same for all of them).

``NoBatching`` (``--predict-batch-max 1``) is the same interface making one call per photo.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from services.gateway import metrics
from services.gateway.upstream import ModelServerClient, Prediction

MAX_BATCH = 32  # photos per Predict call, at most
MAX_IN_FLIGHT = 2  # calls per target in flight at once: one computing in the model server while the other travels


@dataclass
class _Target:
    pending: list[tuple[np.ndarray, asyncio.Future]] = field(default_factory=list)
    in_flight: int = 0


class PredictBatcher:
    def __init__(self, upstream: ModelServerClient, max_batch: int = MAX_BATCH, max_in_flight: int = MAX_IN_FLIGHT):
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError(f"max_batch and max_in_flight must be at least 1, got {max_batch}, {max_in_flight}")
        self.upstream = upstream
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._targets: dict[tuple, _Target] = {}
        self._calls: set[asyncio.Task] = set()

    async def predict(self, pixels: np.ndarray, version: int | None, label: str | None) -> Prediction:
        """The prediction of ``version`` (else of the version ``label`` points at, else the latest) for one photo's
        pixels [S, S, 3]; raises what ``ModelServerClient.predict`` raises."""
        key = (version, label, pixels.shape)
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = _Target()
        answer = asyncio.get_running_loop().create_future()
        target.pending.append((pixels, answer))
        self._send(key, target)
        return await answer

    def _send(self, key: tuple, target: _Target) -> None:
        """Sends what is waiting for ``key``, in batches, while the target has a free call."""
        while target.pending and target.in_flight < self.max_in_flight:
            batch = [(pixels, answer) for pixels, answer in target.pending[:self.max_batch] if not answer.done()]
            del target.pending[:self.max_batch]
            if not batch:  # every caller of these photos has gone
                continue
            target.in_flight += 1
            call = asyncio.create_task(self._call(key, target, batch))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)
            _cancel_once_all_left(call, [answer for _, answer in batch])
        if not target.pending and not target.in_flight:
            self._targets.pop(key, None)

    async def _call(self, key: tuple, target: _Target, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        version, label, _ = key
        metrics.PREDICT_BATCH_PHOTOS.observe(len(batch))
        try:
            predictions = await self.upstream.predict(np.stack([pixels for pixels, _ in batch]), version, label)
        except asyncio.CancelledError:  # every caller left (_cancel_once_all_left), or the gateway is stopping
            for _, answer in batch:
                answer.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the call's error
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
        else:
            for (_, answer), prediction in zip(batch, predictions):
                if not answer.done():
                    answer.set_result(prediction)
        finally:
            target.in_flight -= 1
            self._send(key, target)


def _cancel_once_all_left(call: asyncio.Task, answers: list[asyncio.Future]) -> None:
    """Cancels ``call`` when the last of ``answers`` is cancelled (a caller awaiting its answer was: it left)."""
    waiting = len(answers)

    def left(answer: asyncio.Future) -> None:
        nonlocal waiting
        if answer.cancelled():
            waiting -= 1
            if waiting == 0 and not call.done():
                metrics.PREDICT_CALLS_ABANDONED.inc()
                call.cancel()

    for answer in answers:
        answer.add_done_callback(left)


class NoBatching:
    """The PredictBatcher interface, one Predict call per photo."""

    def __init__(self, upstream: ModelServerClient):
        self.upstream = upstream

    async def predict(self, pixels: np.ndarray, version: int | None, label: str | None) -> Prediction:
        (prediction,) = await self.upstream.predict(pixels[None], version, label)
        return prediction
