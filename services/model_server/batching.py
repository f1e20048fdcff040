"""Server-side dynamic batching: concurrent small requests to one servable and signature share one model call.

A queue (and its num_batch_threads workers) serves one servable, signature, output filter and set of input names,
as TF Serving keys its batch schedulers by tensor names: a request is checked against its signature before it is
queued, so what a client sends cannot make queues the signature does not have. Requests whose inputs differ in shape
(beyond their rows) or type share a queue but never a model call. A queue idle for ``idle_seconds`` goes, workers
included, and comes back with the next request.

Every request a queue admits ends: it runs on the servable it was admitted for (a queue holds its servable, as TF
Serving's handle does, until its queue is drained), or it fails at once with UNAVAILABLE when the batcher is
closed for shutdown and its grace period is over. Unloading a version closes its queues: they refuse new
requests, finish the ones they hold, and their workers then exit."""
from __future__ import annotations

import asyncio
import bisect
import logging
import time
import weakref
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field

import grpc
import numpy as np

from services.model_server import metrics
from services.model_server.config import BatchingParameters
from services.model_server.errors import ServingError
from services.model_server.servable import Servable

log = logging.getLogger("model_server.batching")
QUEUE_IDLE_SECONDS = 30.0  # a queue without a request for this long goes; the next request makes a new one


@dataclass
class _Task:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future
    kind: tuple  # each input's shape beyond its rows, and type: only tasks of one kind are joined into a batch
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Batch:
    """Tasks that will share one model call, grouped as they arrive, as TF Serving's scheduler groups them."""
    tasks: list[_Task]
    rows: int
    kind: tuple  # its tasks'
    opened_at: float = field(default_factory=time.monotonic)  # when its first task arrived


def _unavailable(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNAVAILABLE, message)


class _Queue:
    """One queue (and its worker tasks) per servable, signature, output filter and input names. Its batches are
    formed as tasks arrive: a task joins the last batch when its rows fit (max_batch_size) and it is of that batch's
    kind, or opens a new one, of which at most max_enqueued_batches wait (TF Serving's shared batch scheduler; a
    batch executing no longer waits). After ``idle_seconds`` with nothing queued or executing it calls
    ``on_idle(self)``, which closes it."""

    def __init__(self, servable: Servable, signature: str, output_filter: tuple, params: BatchingParameters,
                 executor: Executor, idle_seconds: float, on_idle):
        self.servable, self.signature, self.output_filter = servable, signature, output_filter
        self.params, self.executor = params, executor
        self.idle_seconds, self._on_idle = idle_seconds, on_idle
        self.batches: deque[_Batch] = deque()  # waiting to run, oldest first; the last one takes new tasks
        self.closed = False  # no new tasks; the workers exit once ``batches`` is empty
        self._changed = asyncio.Event()  # set when a task arrives or the queue closes
        self.running = 0  # batches executing now
        self._queued_gauge = metrics.BATCH_QUEUE_TASKS.labels(model_name=servable.model_name)
        self._running_gauge = metrics.BATCH_RUNNING.labels(model_name=servable.model_name)
        self.workers = [asyncio.create_task(self._work()) for _ in range(max(1, params.num_batch_threads))]

    def submit(self, task: _Task) -> None:
        """Queue ``task`` in the last batch, or a new one; UNAVAILABLE when it needs a new batch and
        max_enqueued_batches are waiting (shared_batch_scheduler.h ValidateBatchTaskQueueCapacity)."""
        if self.closed:
            raise _unavailable(f"version {self.servable.version} of {self.servable.model_name} is being unloaded")
        last = self.batches[-1] if self.batches else None
        if last is not None and last.kind == task.kind and last.rows + task.rows <= self.params.max_batch_size:
            last.tasks.append(task)
            last.rows += task.rows
        elif len(self.batches) >= self.params.max_enqueued_batches:
            raise _unavailable(f"The batch scheduling queue to which this task was submitted is full; currently "
                               f"{len(self.batches)} batches enqueued and max_enqueued_batches is "
                               f"{self.params.max_enqueued_batches}")
        else:
            self.batches.append(_Batch([task], task.rows, task.kind))
        self._queued_gauge.inc()
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    def fail_pending(self, message: str) -> None:
        while self.batches:
            batch = self.batches.popleft()
            self._queued_gauge.dec(len(batch.tasks))
            for task in batch.tasks:
                if not task.future.done():
                    task.future.set_exception(_unavailable(message))

    async def _wait_for_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def _collect(self) -> list[_Task] | None:
        """The tasks of the next batch to run; None once the queue is closed and empty. A batch goes when another
        was opened behind it, when it is full, or when the queue closes; the last batch also goes at once when no
        batch of this queue is executing, and otherwise once batch_timeout_micros have passed since its first task
        arrived. Unlike TF Serving, which waits for the timeout either way: an idle model runs a lone request at
        once, and under load requests pile up during execution anyway, so batches fill without adding the timeout
        to every latency."""
        timeout = self.params.batch_timeout_micros / 1e6
        while True:
            if not self.batches:
                if self.closed:
                    return None
                try:
                    async with asyncio.timeout(self.idle_seconds):
                        await self._wait_for_change()
                except TimeoutError:
                    if not self.batches and not self.running and not self.closed:
                        self._on_idle(self)
                continue
            first = self.batches[0]
            remaining = first.opened_at + timeout - time.monotonic()
            if (len(self.batches) > 1 or first.rows >= self.params.max_batch_size or self.closed
                    or self.running == 0 or remaining <= 0):
                self.batches.popleft()
                self._queued_gauge.dec(len(first.tasks))
                return first.tasks
            try:
                async with asyncio.timeout(remaining):
                    await self._wait_for_change()
            except TimeoutError:
                pass

    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            if batch is None:
                return
            batch = [task for task in batch if not task.future.done()]  # callers that left are not run
            if not batch:
                continue
            self.running += 1
            self._running_gauge.inc()
            try:
                results = await asyncio.get_running_loop().run_in_executor(self.executor, self._run, batch)
            except asyncio.CancelledError:  # the batcher's grace period is over: nobody waits for this call
                for task in batch:
                    if not task.future.done():
                        task.future.set_exception(_unavailable("the server is shutting down"))
                raise
            except Exception as exc:  # noqa: BLE001 - the error belongs to every task in the batch
                for task in batch:
                    if not task.future.done():
                        task.future.set_exception(exc)
                continue
            finally:
                self.running -= 1
                self._running_gauge.dec()
            for task, result in zip(batch, results):
                if task.future.done():
                    continue
                if isinstance(result, Exception):
                    task.future.set_exception(result)
                else:
                    task.future.set_result(result)

    def _run(self, batch: list[_Task]) -> list[dict[str, np.ndarray] | ServingError]:
        """Each task's outputs, from one model call; raises what fails them all. A batch of several tasks that fails
        with INVALID_ARGUMENT (some request's input: an undecodable photo) runs again one task at a time, so only
        the tasks at fault get their error (unlike TF Serving, where one client's bad input fails every request
        batched with it)."""
        started = time.perf_counter()
        queuing = metrics.QUEUING_LATENCY.labels(thread_pool_name=self.params.thread_pool_name)
        for task in batch:  # TF Serving's queuing_latency: from the task's arrival to its batch starting to run
            queuing.observe((started - task.queued_at) * 1e6)
        try:
            return self._call(batch)
        except ServingError as exc:
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT or len(batch) == 1:
                raise
            log.debug("a batch of %d requests failed with INVALID_ARGUMENT (%s): running them one by one",
                      len(batch), exc.message)
        results: list[dict[str, np.ndarray] | ServingError] = []
        for task in batch:
            try:
                results.extend(self._call([task]))
            except ServingError as exc:
                results.append(exc)
        return results

    def _call(self, batch: list[_Task]) -> list[dict[str, np.ndarray]]:
        """One model call on the batch's inputs joined (padded up to an allowed batch size), split into each task's
        outputs."""
        rows = sum(t.rows for t in batch)
        names = batch[0].inputs.keys()
        joined = {k: np.concatenate([t.inputs[k] for t in batch]) if len(batch) > 1 else batch[0].inputs[k]
                  for k in names}
        padded = rows  # the rows of the model call: the batch's, padded up to an allowed batch size
        allowed = self.params.allowed_batch_sizes
        if allowed:
            padded = max(rows, allowed[min(bisect.bisect_left(allowed, rows), len(allowed) - 1)])
            if padded > rows:
                joined = {k: np.concatenate([v, np.repeat(v[:1], padded - rows, axis=0)]) for k, v in joined.items()}
        metrics.BATCH_SIZE.labels(model_name=self.servable.model_name).observe(rows)
        outputs = self.servable.run_batch(self.signature, joined, self.output_filter)
        _check_batched_outputs(outputs, padded)
        results, start = [], 0
        for task in batch:
            results.append({k: v[start:start + task.rows] for k, v in outputs.items()})
            start += task.rows
        return results


def _check_batched_outputs(outputs: dict[str, np.ndarray], rows: int) -> None:
    """Every output of a batched call must hold the batch's ``rows`` (padding included) along its first dimension,
    to be split between the batch's requests; otherwise FAILED_PRECONDITION for all of them, with TF Serving's
    words (batching_session.cc SplitOutputTensors), never an answer cut to a request's rows."""
    for value in outputs.values():
        if np.ndim(value) == 0:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, "Batched output tensor has 0 dimensions")
        if np.shape(value)[0] != rows:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               "Batched output tensor's 0th dimension does not equal the sum of the 0th dimension "
                               "sizes of the input tensors")


def _batch_rows(inputs: dict[str, np.ndarray], max_batch_size: int) -> int | None:
    """The rows of a request, which its inputs all hold along their first dimension (None: no inputs). Raises
    INVALID_ARGUMENT as TF Serving's batching does: inputs without a first dimension or of unequal ones
    (batching_util.h ComputeTensorBatchSize), more rows than ``max_batch_size`` (TensorFlow's shared batch
    scheduler: TF Serving does not turn on large-batch splitting, so clients split their own requests)."""
    if not inputs:
        return None
    sizes = set()
    for value in inputs.values():
        if value.ndim == 0:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               "Batching Run() input tensors must have at least one dimension")
        sizes.add(value.shape[0])
    if len(sizes) > 1:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           "Batching Run() input tensors must have equal 0th-dimension size")
    [rows] = sizes
    if rows > max_batch_size:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"Task size {rows} is larger than maximum input batch size {max_batch_size}")
    return rows


class Batcher:
    def __init__(self, params: BatchingParameters, executor: Executor, idle_seconds: float = QUEUE_IDLE_SECONDS):
        self.params = params
        self.executor = executor
        self.idle_seconds = idle_seconds
        self._queues: dict[tuple, _Queue] = {}
        self._draining: set[_Queue] = set()  # closed queues whose workers have not exited yet
        self._retired: weakref.WeakSet[Servable] = weakref.WeakSet()  # unloaded servables still held by requests
        self._closed = False

    async def run(self, servable: Servable, signature: str, inputs: dict[str, np.ndarray],
                  output_filter: tuple) -> dict[str, np.ndarray]:
        """The signature's outputs for this request, run in a batch with other requests when it can be. The request
        is checked against its signature first (``Servable.check_request``)."""
        if self._closed:
            raise _unavailable("the server is shutting down")
        signature = servable.check_request(signature, inputs, output_filter).name
        rows = _batch_rows(inputs, self.params.max_batch_size)
        if rows is None or servable in self._retired:
            # No inputs to cut into rows, or a request that resolved a version just before it was unloaded: it runs
            # alone on that version.
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, servable.run, signature, inputs, output_filter)
        key = (id(servable), signature, output_filter, tuple(sorted(inputs)))
        queue = self._queues.get(key)
        if queue is None or queue.servable is not servable:
            queue = self._queues[key] = _Queue(servable, signature, output_filter, self.params, self.executor,
                                               self.idle_seconds, lambda idle: self._drop_idle(key, idle))
        future = asyncio.get_running_loop().create_future()
        kind = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(inputs.items()))
        queue.submit(_Task(inputs, rows, future, kind))
        return await future

    def _drop_idle(self, key: tuple, queue: _Queue) -> None:
        """An idle queue goes (its workers exit, as it holds nothing); the next request for its key makes another."""
        if self._queues.get(key) is queue:
            del self._queues[key]
        queue.close()

    def _retire(self, queue: _Queue) -> None:
        self._retired.add(queue.servable)
        queue.close()
        self._draining.add(queue)
        done = asyncio.gather(*queue.workers, return_exceptions=True)
        done.add_done_callback(lambda _: self._draining.discard(queue))

    def forget(self, live_servables: set[int]) -> None:
        """Close the queues of servables that were unloaded: they finish what they hold, then their workers exit."""
        for key in [k for k in self._queues if k[0] not in live_servables]:
            self._retire(self._queues.pop(key))

    async def close(self, grace_seconds: float) -> None:
        """Shutdown: refuse new requests, let the queued ones run for up to ``grace_seconds``, then fail what is
        left with UNAVAILABLE."""
        self._closed = True
        for key in list(self._queues):
            self._retire(self._queues.pop(key))
        queues = list(self._draining)
        workers = [w for q in queues for w in q.workers]
        if workers:
            _, late = await asyncio.wait(workers, timeout=grace_seconds)
            if late:
                log.warning("shutdown: %d batch workers still busy after %.0f s; failing their requests",
                            len(late), grace_seconds)
            for queue in queues:
                queue.fail_pending("the server is shutting down")
            for worker in late:
                worker.cancel()
            if late:
                await asyncio.wait(late)
