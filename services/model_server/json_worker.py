"""Where REST JSON is parsed and printed: on the event loop when it is small, in a worker process otherwise.

Python's JSON parser and printer hold the GIL throughout, so a body parsed on the event loop (or on a thread) stalls
every other request of both APIs for the whole parse: one photo of 224 x 224 as JSON numbers (0.8 MB) for tens of
milliseconds, a batch of 32 (25 MB) most of a second. TF Serving parses and prints each request's JSON on its own
HTTP worker thread, beside the others. Here JSON of ``WORKER_JSON_BYTES`` or more is parsed into the request's
tensors, or printed from the answer's, in a worker process, so the event loop keeps answering; smaller JSON is
handled in place, where the loop spends less on the parse than on a round trip to a process. Two workers, each taking
one request at a time: one for JSON under ``LARGE_JSON_BYTES``, one for larger JSON and for parses found costly in
place (below), so a photo's JSON never waits behind a large body's seconds of parsing or dies with it. Each is
spawned at the first JSON for it. The smaller JSON's worker takes longer to start than parsing that JSON: until it
runs, such JSON is still handled in place (a server that never sees any never starts one); larger JSON waits for its
worker.

``run(fn, json_bytes, *args)`` returns ``fn(*args)``; ``json_bytes`` is the size of the JSON ``fn`` parses
(``parse_bytes``: a body of many object members counts as large) or prints; a parse run in place that finds the
body holds many rows (IN_PLACE_ROWS) or values to convert one by one (IN_PLACE_SLOW_VALUES), each costing Python
work, is run again in the large JSON's worker. ``fn`` is a module-level function (it is sent to the worker by name)
whose arguments, result and exceptions pickle. A worker that dies (JSON too large for memory) fails the requests it
holds with INTERNAL, and the next request for it gets a new one; one that died between requests fails none. A worker
outlives no server: it exits once its parent is gone, however the parent ended. A worker imports what ``fn``'s module
imports: a predict body's json_tensor.py needs numpy only, while a classify or regress body's tf.Example protos bring
TensorFlow into it (a few hundred MB, from the first such body on).
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import grpc

from services.model_server.errors import LargeJson, ServingError

log = logging.getLogger("model_server.json_worker")

# JSON of this size or more goes to the worker once it runs: under it, a parse in place holds the loop (every other
# request) about as long as handing the JSON to the worker and back would add to its own request.
WORKER_JSON_BYTES = 64 * 1024
# JSON of this size or more waits for the worker to start rather than hold the loop (about 5 photos of 224 x 224).
LARGE_JSON_BYTES = 4 * 1024 * 1024
# json.loads spends far longer on an object's member than on a number in a list, byte for byte: a body of more
# members than this is large whatever its size.
LARGE_JSON_MEMBERS = 20_000
# Rows (instances, examples) a request may have for its parse to stay in place: each is turned into tensors by
# Python code of its own. A photo is a row.
IN_PLACE_ROWS = 1000
# Values a parse in place may convert one by one (json_tensor.SlowValues: in a predict body, a ragged nest, a
# string tensor, a value of the wrong type; every feature and value of a classify or regress body's examples), each
# some Python work; a predict body's regular nest of numbers is converted by numpy and not counted.
IN_PLACE_SLOW_VALUES = 10_000
IN_PLACE_LIMITS = {"max_rows": IN_PLACE_ROWS, "max_slow_values": IN_PLACE_SLOW_VALUES}  # the parsers' in_place
PARENT_CHECK_SECONDS = 1.0


def _exit_with_parent(parent_pid: int) -> None:
    """In a worker: exit once the server that started it is gone (killed, say, which closes nothing for it)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _Worker:
    """One worker process, spawned at the first ``pool()``, taking one request at a time; ``started`` is done once
    it runs."""

    def __init__(self):
        self._pool: ProcessPoolExecutor | None = None
        self.started: Future | None = None

    def runs(self) -> bool:
        return self.started is not None and self.started.done() and self.started.exception() is None

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_exit_with_parent, initargs=(os.getpid(),))
            self.started = self._pool.submit(os.getpid)
        return self._pool

    async def run(self, fn, json_bytes: int, *args):
        """``fn(*args)`` in the process. A process that died before this request came (killed while idle) is
        replaced for it; one that dies while handling it fails it with INTERNAL, and the next request gets a new one."""
        pool = self.pool()
        try:
            try:
                done = pool.submit(fn, *args)
            except BrokenProcessPool:
                self._forget(pool)
                pool = self.pool()
                done = pool.submit(fn, *args)
            return await asyncio.wrap_future(done)
        except BrokenProcessPool:
            log.error("the process handling %d bytes of JSON died; the next request for it gets a new one", json_bytes)
            self._forget(pool)
            raise ServingError(grpc.StatusCode.INTERNAL, f"the process handling the request's {json_bytes} bytes of "
                               "JSON died (out of memory?)") from None

    def _forget(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:
            self._pool = self.started = None
        pool.shutdown(wait=False)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self.started = None


class JsonWorker:
    def __init__(self, large_json_bytes: int = LARGE_JSON_BYTES, worker_json_bytes: int = WORKER_JSON_BYTES):
        self.large_json_bytes = large_json_bytes
        self.worker_json_bytes = min(worker_json_bytes, large_json_bytes)
        # A process for JSON under the large size, another for large JSON and for parses found costly in place:
        # a photo's JSON never waits behind a large body's seconds, nor dies of its memory.
        self._medium, self._large = _Worker(), _Worker()

    def parse_bytes(self, raw: bytes) -> int:
        """The ``json_bytes`` of parsing ``raw``: its size, or the large size when it holds more than
        LARGE_JSON_MEMBERS object members (its ``:``, within strings too)."""
        if len(raw) < self.large_json_bytes and raw.count(b":") > LARGE_JSON_MEMBERS:
            return self.large_json_bytes
        return len(raw)

    async def run(self, fn, json_bytes: int, *args, in_place: dict | None = None):
        """``fn(*args)``: in place when ``json_bytes`` is small, or under the large size while its worker starts
        (``fn`` then gets the keyword arguments ``in_place`` too, and may raise LargeJson: it runs again in the
        large JSON's worker, without them); otherwise in the worker of its size."""
        if json_bytes >= self.large_json_bytes:
            return await self._large.run(fn, json_bytes, *args)
        if json_bytes >= self.worker_json_bytes:
            if self._medium.runs():
                return await self._medium.run(fn, json_bytes, *args)
            self._medium.pool()  # started for the next such JSON
        try:
            return fn(*args, **(in_place or {}))
        except LargeJson:
            return await self._large.run(fn, self.large_json_bytes, *args)

    def close(self) -> None:
        self._medium.close()
        self._large.close()
