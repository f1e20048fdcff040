"""Server-side dynamic batching: concurrent small requests to one servable and signature share one model call."""
from __future__ import annotations

import asyncio
import bisect
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc
import numpy as np

from services.model_server import metrics
from services.model_server.config import BatchingParameters
from services.model_server.errors import ServingError
from services.model_server.servable import Servable


@dataclass
class _Task:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future


class _Queue:
    """One queue (and its worker tasks) per servable, signature and input shape."""

    def __init__(self, servable: Servable, signature: str, output_filter: tuple, params: BatchingParameters,
                 executor: Executor):
        self.servable, self.signature, self.output_filter = servable, signature, output_filter
        self.params, self.executor = params, executor
        self.pending: asyncio.Queue[_Task] = asyncio.Queue()
        self.running = 0  # batches executing now
        self.workers = [asyncio.create_task(self._work()) for _ in range(max(1, params.num_batch_threads))]

    def submit(self, task: _Task) -> None:
        max_rows = self.params.max_batch_size * self.params.max_enqueued_batches
        if self.pending.qsize() >= max_rows:
            raise ServingError(grpc.StatusCode.UNAVAILABLE,
                               "The batch scheduling queue to which this task was submitted is full")
        self.pending.put_nowait(task)

    async def _collect(self) -> list[_Task]:
        """Take what is queued, up to max_batch_size. Unlike TF Serving, wait up to batch_timeout_micros for more
        only while another batch is executing: an idle model runs a lone request at once, and under load requests
        pile up during execution anyway, so batches fill without adding the timeout to every latency."""
        first = await self.pending.get()
        batch, rows = [first], first.rows
        deadline = asyncio.get_running_loop().time() + self.params.batch_timeout_micros / 1e6
        while rows < self.params.max_batch_size:
            try:
                task = self.pending.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0 or self.running == 0:
                    break
                try:
                    task = await asyncio.wait_for(self.pending.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if rows + task.rows > self.params.max_batch_size:
                self.pending.put_nowait(task)  # goes first into the next batch (order is not promised)
                break
            batch.append(task)
            rows += task.rows
        return batch

    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            self.running += 1
            try:
                outputs = await asyncio.get_running_loop().run_in_executor(self.executor, self._run, batch)
            except Exception as exc:  # noqa: BLE001 - the error belongs to every task in the batch
                for task in batch:
                    if not task.future.done():
                        task.future.set_exception(exc)
                continue
            finally:
                self.running -= 1
            start = 0
            for task in batch:
                if not task.future.done():
                    task.future.set_result({k: v[start:start + task.rows] for k, v in outputs.items()})
                start += task.rows

    def _run(self, batch: list[_Task]) -> dict[str, np.ndarray]:
        rows = sum(t.rows for t in batch)
        names = batch[0].inputs.keys()
        joined = {k: np.concatenate([t.inputs[k] for t in batch]) if len(batch) > 1 else batch[0].inputs[k]
                  for k in names}
        allowed = self.params.allowed_batch_sizes
        if allowed:
            target = allowed[min(bisect.bisect_left(allowed, rows), len(allowed) - 1)]
            if target > rows:
                joined = {k: np.concatenate([v, np.repeat(v[:1], target - rows, axis=0)]) for k, v in joined.items()}
        metrics.BATCH_SIZE.labels(model_name=self.servable.model_name).observe(rows)
        outputs = self.servable.run(self.signature, joined, self.output_filter)
        return {k: v[:rows] for k, v in outputs.items()}


class Batcher:
    def __init__(self, params: BatchingParameters, executor: Executor):
        self.params = params
        self.executor = executor
        self._queues: dict[tuple, _Queue] = {}

    async def run(self, servable: Servable, signature: str, inputs: dict[str, np.ndarray],
                  output_filter: tuple) -> dict[str, np.ndarray]:
        rows = {v.shape[0] if v.ndim else -1 for v in inputs.values()}
        if len(rows) != 1 or -1 in rows or next(iter(rows)) > self.params.max_batch_size or not inputs:
            # Not batchable (scalars, unequal batch dimensions, too big): run alone, as TF Serving splits or rejects.
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, servable.run, signature, inputs, output_filter)
        key = (id(servable), signature, output_filter,
               tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in inputs.items())))
        queue = self._queues.get(key)
        if queue is None or queue.servable is not servable:
            queue = self._queues[key] = _Queue(servable, signature, output_filter, self.params, self.executor)
        future = asyncio.get_running_loop().create_future()
        queue.submit(_Task(inputs, next(iter(rows)), future))
        return await future

    def forget(self, live_servables: set[int]) -> None:
        """Stop the queues of servables that were unloaded."""
        for key in [k for k in self._queues if k[0] not in live_servables]:
            for worker in self._queues.pop(key).workers:
                worker.cancel()
