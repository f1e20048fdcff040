"""What both APIs share: find the servable for a model spec and run a signature, batched or not, off the event loop."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from services.model_server import metrics
from services.model_server.batching import Batcher
from services.model_server.config import BatchingParameters
from services.model_server.errors import ServingError
from services.model_server.manager import Manager
from services.model_server.servable import Servable


class PredictionCore:
    def __init__(self, manager: Manager, batching: BatchingParameters | None, threads: int):
        self.manager = manager
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="predict")
        self.batcher = Batcher(batching, self.executor) if batching else None

    async def predict(self, api: str, name: str, version: int | None, label: str | None, signature: str,
                      inputs: dict[str, np.ndarray], output_filter=()) -> tuple[Servable, dict[str, np.ndarray]]:
        start = time.perf_counter()
        version_label, status = "", "OK"
        try:
            servable = self.manager.resolve(name, version, label)
            version_label = str(servable.version)
            output_filter = tuple(sorted(output_filter))
            if self.batcher is not None:
                outputs = await self.batcher.run(servable, signature, inputs, output_filter)
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(
                    self.executor, servable.run, signature, inputs, output_filter)
            return servable, outputs
        except ServingError as exc:
            status = exc.code.name
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            model_label = name if self.manager.has_model(name) else "unknown"  # bounded cardinality
            metrics.REQUEST_COUNT.labels(model_name=model_label, model_version=version_label, API=api,
                                         status=status).inc()
            metrics.REQUEST_LATENCY.labels(model_name=model_label, API=api,
                                           entrypoint="GRPC" if api.startswith("grpc") else "REST"
                                           ).observe(time.perf_counter() - start)
