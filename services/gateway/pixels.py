"""The preprocess stage: a photo to the uint8 pixels [S, S, 3] a version of input size S takes, by the one
preprocessing contract (``training_job.preprocessing.preprocess_bytes``); an unusable photo is a 400 (413 when too
large)."""
from __future__ import annotations

import asyncio
import io
import time
from concurrent.futures import Executor

import numpy as np
from PIL import Image

from services.gateway import metrics
from services.gateway.errors import GatewayError
from training_job.preprocessing import InvalidImage, Limits, preprocess_bytes

# Photos this small are decoded on the event loop: their decode costs about what the two thread hand-offs to and
# from the preprocessing pool cost. Bigger ones (or ones whose header says many pixels) go to the pool, so a
# slow decode never blocks the loop.
INLINE_MAX_BYTES = 64 * 1024
INLINE_MAX_PIXELS = 1_000_000


def cheap_to_decode(photo: bytes) -> bool:
    if len(photo) > INLINE_MAX_BYTES:
        return False
    try:
        width, height = Image.open(io.BytesIO(photo)).size  # header only
    except Exception:  # noqa: BLE001 - not an image, or a bomb: the pool's preprocess_bytes says what is wrong
        return False
    return width * height <= INLINE_MAX_PIXELS


class Preprocessor:
    def __init__(self, limits: Limits, executor: Executor):
        self.limits = limits
        self.executor = executor  # the pool photos too costly for the event loop are decoded in

    async def pixels(self, photo: bytes, size: int) -> np.ndarray:
        start = time.perf_counter()
        try:
            if cheap_to_decode(photo):
                pixels = preprocess_bytes(photo, size, self.limits)
            else:
                pixels = await asyncio.get_running_loop().run_in_executor(
                    self.executor, preprocess_bytes, photo, size, self.limits)
        except InvalidImage as exc:
            status = 413 if exc.code in ("too_large",) else 400
            raise GatewayError(status, exc.code, exc.message) from None
        metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - start)
        return pixels
