"""Runs THE preprocessing contract (training_job.preprocessing.preprocess_bytes) off the event loop."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from training_job.preprocessing import (  # the one contract shared with training; never re-implemented here
    PREPROCESSING_VERSION, InvalidImage, Limits, preprocess_bytes,
)

__all__ = ["InvalidImage", "Limits", "PREPROCESSING_VERSION", "Preprocessor", "preprocess_bytes"]


class Preprocessor:
    """Decodes photos in a thread pool (Pillow releases the GIL while decoding and resizing)."""

    def __init__(self, limits: Limits, workers: int = 4, size: int = 224):
        self.limits = limits
        self.size = size
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess")

    async def pixels(self, data: bytes) -> np.ndarray:
        """uint8 (size, size, 3); raises InvalidImage for photos the contract refuses."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, preprocess_bytes, data, self.size, self.limits)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
