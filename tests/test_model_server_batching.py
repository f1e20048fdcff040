"""The model server's batch scheduler (services/model_server/batching.py) driven in-process: each test runs the real
``Batcher`` on a stand-in servable, a real ``Servable`` (its checks are the real ones) whose engine is a Python
function, so a test decides what each model call answers and when it returns."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf

from services.model_server.batching import Batcher
from services.model_server.config import BatchingParameters
from services.model_server.errors import ServingError
from services.model_server.servable import Servable, SignatureInfo


class StandIn(Servable):
    """Signature ``s``: input ``x`` (float32), the outputs ``compute`` returns. A call waits for ``release`` (set
    from the start unless ``held``); ``calls`` records the rows of ``x`` each model call got."""

    def __init__(self, compute, outputs=("y",), held: bool = False):
        self.model_name, self.version, self.path = "fake", 1, Path("/nonexistent")
        self.signature_defs = {}
        self.signatures = {"s": SignatureInfo("s", "tensorflow/serving/predict", {"x": tf.float32}, sorted(outputs))}
        self.compute = compute
        self.calls: list[list] = []
        self.release = threading.Event()
        if not held:
            self.release.set()

    def _call(self, info, inputs, wanted):
        self.calls.append(inputs["x"].tolist())
        self.release.wait(30)
        outputs = self.compute(inputs)
        return {k: outputs[k] for k in wanted}


def doubled(inputs):
    return {"y": inputs["x"] * 2}


def batcher(**params) -> Batcher:
    return Batcher(BatchingParameters(**{"num_batch_threads": 1, **params}), ThreadPoolExecutor(max_workers=2))


def rows(*values) -> dict[str, np.ndarray]:
    return {"x": np.array([[v] for v in values], np.float32)}


async def until(condition, timeout: float = 10.0) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


async def settle() -> None:
    """Let every task created so far run up to where it waits: a request waits once it is queued."""
    for _ in range(3):
        await asyncio.sleep(0)


def failure(outcome) -> tuple[str, str]:
    assert isinstance(outcome, ServingError), outcome
    return outcome.code.name, outcome.message


# ---------------------------------------------------------------------------------------------- splitting outputs


def with_labels(inputs):
    return {"y": inputs["x"] * 2, "labels": np.array([b"a", b"b", b"c", b"d"], dtype=object),
            "scalar": np.float32(1.0)}


SPLIT_ERROR = ("FAILED_PRECONDITION", "Batched output tensor's 0th dimension does not equal the sum of the 0th "
               "dimension sizes of the input tensors")
SCALAR_ERROR = ("FAILED_PRECONDITION", "Batched output tensor has 0 dimensions")


def test_outputs_without_a_batch_dimension_are_refused_as_tf_serving_refuses_them():
    """TF Serving's BatchingSession splits every output along its first dimension, which must hold the batch's
    rows (SplitOutputTensors); an output that does not is an error for every request of the batch, never a
    silently cut answer."""
    async def scenario():
        b = batcher(max_batch_size=8)
        servable = StandIn(with_labels, outputs=("y", "labels", "scalar"))
        lone = await asyncio.gather(b.run(servable, "s", rows(1.0), ("labels",)),
                                    return_exceptions=True)
        scalar = await asyncio.gather(b.run(servable, "s", rows(1.0), ("scalar",)), return_exceptions=True)
        answered = await b.run(servable, "s", rows(1.0, 2.0), ("y",))
        b.executor.shutdown()
        return lone[0], scalar[0], answered

    lone, scalar, answered = asyncio.run(scenario())
    assert failure(lone) == SPLIT_ERROR
    assert failure(scalar) == SCALAR_ERROR
    np.testing.assert_array_equal(answered["y"], [[2.0], [4.0]])


def one_held_then_queued(servable: StandIn, queued: tuple, output_filter: tuple = ()) -> tuple[list, list]:
    """A request for 0.0 runs on ``servable`` (held) while one request per value of ``queued`` is queued behind it;
    then the model is released. (the model calls, each request's outcome: the held one's first)"""
    async def scenario():
        b = batcher(max_batch_size=8, batch_timeout_micros=1_000_000)
        executing = asyncio.create_task(b.run(servable, "s", rows(0.0), output_filter))
        await until(lambda: servable.calls)
        waiting = [asyncio.create_task(b.run(servable, "s", rows(v), output_filter)) for v in queued]
        await settle()
        servable.release.set()
        outcomes = await asyncio.gather(executing, *waiting, return_exceptions=True)
        b.executor.shutdown()
        return servable.calls, outcomes

    return asyncio.run(scenario())


def test_a_batch_with_an_output_without_a_batch_dimension_fails_for_each_of_its_requests():
    calls, outcomes = one_held_then_queued(StandIn(with_labels, outputs=("y", "labels", "scalar"), held=True),
                                           (1.0, 2.0, 3.0), ("labels", "y"))
    assert calls == [[[0.0]], [[1.0], [2.0], [3.0]]]  # the three queued requests shared one model call
    assert [failure(o) for o in outcomes] == [SPLIT_ERROR] * 4


# ---------------------------------------------------------------------------------------------- queue capacity


@pytest.mark.parametrize("task_rows, admitted", [(4, 2), (3, 2), (1, 8)])
def test_the_queue_holds_max_enqueued_batches_batches_as_tf_serving_counts_them(task_rows, admitted):
    """TF Serving's shared batch scheduler (ValidateBatchTaskQueueCapacity): a task that does not fit the open batch
    is refused with UNAVAILABLE when max_enqueued_batches batches are already queued (a batch that executes is no
    longer queued). With max_batch_size 4 and two batches: one 4-row or 3-row task per batch, or 8 one-row tasks."""
    async def scenario():
        b = batcher(max_batch_size=4, max_enqueued_batches=2, batch_timeout_micros=1_000_000)
        servable = StandIn(doubled, held=True)
        executing = asyncio.create_task(b.run(servable, "s", rows(*[0.0] * 4), ()))
        await until(lambda: servable.calls)
        tasks = [asyncio.create_task(b.run(servable, "s", rows(*[float(i)] * task_rows), ())) for i in range(10)]
        await settle()
        refused = [t for t in tasks if t.done()]
        servable.release.set()
        outcomes = await asyncio.gather(executing, *tasks, return_exceptions=True)
        b.executor.shutdown()
        return len(tasks) - len(refused), [failure(t.exception()) for t in refused], outcomes

    queued, refusals, outcomes = asyncio.run(scenario())
    assert queued == admitted
    assert {code for code, _ in refusals} == {"UNAVAILABLE"}
    assert all("The batch scheduling queue to which this task was submitted is full" in m for _, m in refusals)
    assert sum(isinstance(o, dict) for o in outcomes) == 1 + admitted


# ---------------------------------------------------------------------------------------------- what makes a queue


def other_tasks() -> int:
    """The asyncio tasks alive besides the caller's: the batch queues' workers."""
    return len(asyncio.all_tasks()) - 1


def test_requests_the_signature_refuses_never_make_a_queue():
    """Input names and output filters are the client's: each refused one used to leave a queue and its workers
    behind, for as long as the version stayed loaded."""
    async def scenario():
        b = batcher(max_batch_size=8, num_batch_threads=2)
        servable = StandIn(doubled)
        outcomes = [*await asyncio.gather(*(b.run(servable, "s", {f"x{i}": np.zeros((1, 1), np.float32)}, ())
                                            for i in range(50)), return_exceptions=True),
                    *await asyncio.gather(b.run(servable, "s", rows(1.0), ("nope",)), return_exceptions=True)]
        workers = other_tasks()
        b.executor.shutdown()
        return outcomes, workers

    outcomes, workers = asyncio.run(scenario())
    assert {failure(o)[0] for o in outcomes} == {"INVALID_ARGUMENT"}
    assert workers == 0


def test_requests_of_other_shapes_share_a_queue_but_never_a_model_call():
    async def scenario():
        b = batcher(max_batch_size=8, batch_timeout_micros=1_000_000)
        servable = StandIn(doubled, held=True)
        executing = asyncio.create_task(b.run(servable, "s", rows(0.0), ()))
        await until(lambda: servable.calls)
        wide = {"x": np.full((1, 2), 2.0, np.float32)}
        queued = [asyncio.create_task(b.run(servable, "s", inputs, ())) for inputs in (rows(1.0), wide, rows(3.0))]
        await settle()
        workers = other_tasks() - 4  # minus the four requests
        servable.release.set()
        answers = await asyncio.gather(executing, *queued)
        b.executor.shutdown()
        return servable.calls, workers, answers

    calls, workers, answers = asyncio.run(scenario())
    assert workers == 1  # one queue: num_batch_threads workers
    assert calls == [[[0.0]], [[1.0]], [[2.0, 2.0]], [[3.0]]]  # a batch takes a task of its own shape only
    assert [a["y"].tolist() for a in answers] == [[[0.0]], [[2.0]], [[4.0, 4.0]], [[6.0]]]


def test_a_queue_idle_for_idle_seconds_goes_with_its_workers():
    async def scenario():
        b = Batcher(BatchingParameters(num_batch_threads=2), ThreadPoolExecutor(max_workers=2), idle_seconds=0.05)
        servable = StandIn(doubled)
        first = await b.run(servable, "s", rows(1.0), ())
        busy = other_tasks()
        for _ in range(500):  # up to 5 s
            if other_tasks() == 0:
                break
            await asyncio.sleep(0.01)
        idle = other_tasks()
        again = await b.run(servable, "s", rows(2.0), ())  # a new queue when traffic comes back
        b.executor.shutdown()
        return busy, idle, first, again

    busy, idle, first, again = asyncio.run(scenario())
    assert busy >= 2 and idle == 0  # num_batch_threads workers, then none
    assert (first["y"].tolist(), again["y"].tolist()) == ([[2.0]], [[4.0]])


# ---------------------------------------------------------------------------------------------- one bad request


def refuses_negatives(inputs):
    if (inputs["x"] < 0).any():
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "a negative value")
    return doubled(inputs)


def test_a_request_the_model_refuses_fails_alone_not_with_the_others_of_its_batch():
    """Unlike TF Serving, where one undecodable photo fails every request of its batch: a batch that fails with
    INVALID_ARGUMENT (an input's fault) runs again one request at a time, so only the request at fault fails."""
    calls, outcomes = one_held_then_queued(StandIn(refuses_negatives, held=True), (1.0, -1.0, 3.0))
    assert calls == [[[0.0]], [[1.0], [-1.0], [3.0]], [[1.0]], [[-1.0]], [[3.0]]]
    assert [o["y"].tolist() for o in (outcomes[0], outcomes[1], outcomes[3])] == [[[0.0]], [[2.0]], [[6.0]]]
    assert failure(outcomes[2]) == ("INVALID_ARGUMENT", "a negative value")


def test_a_batch_that_fails_otherwise_fails_for_all_its_requests_at_once():
    def broken(inputs):
        raise ServingError(grpc.StatusCode.INTERNAL, "the model is broken")

    calls, outcomes = one_held_then_queued(StandIn(broken, held=True), (1.0, 2.0))
    assert calls == [[[0.0]], [[1.0], [2.0]]]  # not run again: it is not a request's fault
    assert [failure(o) for o in outcomes] == [("INTERNAL", "the model is broken")] * 3
