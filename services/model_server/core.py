"""What both APIs share: find the servable for a model spec and run a signature, batched or not, off the event loop."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from services.model_server import metrics
from services.model_server.batching import Batcher
from services.model_server.config import BatchingParameters
from services.model_server.errors import DEFAULT_SIGNATURE, ServingError
from services.model_server.manager import Manager
from services.model_server.servable import Servable

log = logging.getLogger("model_server.core")


def configure_tensorflow_threads(concurrent_calls: int, intra_op: int = 0, inter_op: int = 0) -> None:
    """TensorFlow's thread counts: ``intra_op``/``inter_op`` when given (--tensorflow_*_op_parallelism), otherwise
    each of the model calls that can run at once gets its share of the cores as intra-op threads.

    By default every call may use all cores; when the calls that can run at once fill the cores they then fight
    over them and TensorFlow's thread pool spins waiting for work. Splitting the cores between the calls gives the
    same outputs (bit for bit) for less CPU per call (bench/model_server_bench.py measures it). Only possible before TensorFlow's runtime starts; an explicit setting (or a started runtime) is left alone."""
    import tensorflow as tf

    if inter_op > 0:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    if intra_op > 0:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        return
    threads = max(1, (os.cpu_count() or 1) // max(1, concurrent_calls))
    if tf.config.threading.get_intra_op_parallelism_threads() != 0 or threads >= (os.cpu_count() or 1):
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime is already initialised (e.g. a second server in one process)
        log.debug("TensorFlow already initialised: intra-op threads left as they are")


# the API label TF Serving gives a model run (RecordRuntimeLatency in predict_util.cc, classifier.cc, regressor.cc);
# MultiInference records none there
RUNTIME_API = {"grpc_predict": "Predict", "rest_predict": "Predict", "grpc_classify": "Classify",
               "rest_classify": "Classify", "grpc_regress": "Regress", "rest_regress": "Regress"}


class PredictionCore:
    def __init__(self, manager: Manager, batching: BatchingParameters | None, threads: int, intra_op: int = 0,
                 inter_op: int = 0):
        self.manager = manager
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="predict")
        self.batcher = Batcher(batching, self.executor) if batching else None
        configure_tensorflow_threads(max(1, batching.num_batch_threads) if batching else threads, intra_op, inter_op)

    async def predict(self, api: str, name: str, version: int | None, label: str | None, signature: str,
                      inputs: Mapping, output_filter=(), read: Callable[[Mapping], dict[str, np.ndarray]] | None = None
                      ) -> tuple[Servable, dict[str, np.ndarray]]:
        """Resolve the model spec, then ``run`` the signature on the servable it names; a spec that names no
        servable is counted in ``request_count`` too. ``read``, when given, turns ``inputs`` (a gRPC request's
        TensorProtos by name) into arrays once their names are the signature's: a request may carry hundreds of
        thousands, each read in a turn of a Python loop."""
        try:
            servable = self.manager.resolve(name, version, label)
            if read is not None:
                if (signature or DEFAULT_SIGNATURE) in servable.signatures:  # else ``run`` says it is not found
                    servable.check_input_names(signature, inputs)
                inputs = read(inputs)
        except ServingError as exc:
            self._count(name, exc.code.name)
            raise
        return servable, await self.run(api, servable, signature, inputs, output_filter)

    async def run(self, api: str, servable: Servable, signature: str, inputs: dict[str, np.ndarray],
                  output_filter=()) -> dict[str, np.ndarray]:
        """The signature's outputs on ``servable``, which the caller resolved once and holds for the whole request
        (as TF Serving's ServableHandle: a request of several model runs, MultiInference's tasks, runs them all on
        one version even if that version is unloaded meanwhile). Counted in ``request_count`` whatever the outcome;
        a run that succeeds is timed in ``runtime_latency`` as TF Serving times its Session::Run: from handing the
        inputs over to the outputs back, the batch queue included when batching is on."""
        status = "OK"
        try:
            if api == "grpc_predict" and (signature or DEFAULT_SIGNATURE) not in servable.signatures:
                # TF Serving's gRPC Predict (predict_util.cc); its REST API checks first, with INVALID_ARGUMENT
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f'Serving signature key "{signature or DEFAULT_SIGNATURE}" not found.')
            output_filter = tuple(sorted(output_filter))
            started = time.perf_counter()
            if self.batcher is not None:
                outputs = await self.batcher.run(servable, signature, inputs, output_filter)
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(
                    self.executor, servable.run, signature, inputs, output_filter)
            if api in RUNTIME_API:
                metrics.RUNTIME_LATENCY.labels(model_name=servable.model_name, API=RUNTIME_API[api],
                                               runtime=metrics.RUNTIME_LABEL
                                               ).observe((time.perf_counter() - started) * 1e6)
            return outputs
        except ServingError as exc:
            status = exc.code.name
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self._count(servable.model_name, status)

    def _count(self, name: str, status: str) -> None:
        model_value = name if self.manager.has_model(name) else "unknown"  # bounded cardinality
        metrics.REQUEST_COUNT.labels(model_name=model_value, status=status).inc()
