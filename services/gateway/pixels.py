"""The preprocess stage: a photo to the uint8 pixels [S, S, 3] a version of input size S takes, by the one
preprocessing contract (``training_job.preprocessing.preprocess_bytes``); an unusable photo is a 400 (413 when too
large, 415 in a format not taken)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
from PIL import Image

from services.gateway import metrics
from services.gateway.errors import GatewayError
from training_job.preprocessing import (
    PNG_SIGNATURE, InvalidImage, Limits, open_image, preprocess_bytes, preprocess_opened,
)

# Photos this small are opened on the event loop (header only), and decoded there too when they are JPEGs of few
# pixels: decoded at a reduced DCT scale, they cost about what the two thread hand-offs to and from the
# preprocessing pool cost. Other formats decode every pixel, however few the bytes, and bigger photos cost more:
# they go to the pool, so a slow decode never blocks the loop other requests need. Each photo is opened once, where
# its header is read.
INLINE_MAX_BYTES = 64 * 1024
INLINE_MAX_PIXELS = 1_000_000
# The one request the gateway is serving has the event loop to itself: a JPEG of up to these bytes and pixels (the
# decode's cost grows with both: a few typical web photos' worth at most) is opened and decoded there, sparing the
# two thread hand-offs. A request arriving meanwhile waits for that decode; a larger photo, whose decode costs far
# more than the hand-offs, or another format, still goes to the pool.
ALONE_INLINE_MAX_BYTES = 256 * 1024
ALONE_INLINE_MAX_PIXELS = 2_000_000
LOOP_OPENED_SIGNATURES = (b"\xff\xd8", PNG_SIGNATURE)  # JPEG (MPO too), PNG


def opened_on_the_loop(photo: bytes, limits: Limits, size: int, alone: bool = False) -> Image.Image | None:
    """The photo opened (``open_image``: header only, limits checked for a decode to ``size``) when it is a JPEG or
    a PNG small enough in bytes to open on the event loop (larger when its request is ``alone``); None when the pool
    opens it. Theirs are headers whose reading the contract bounds (``jpeg_markers``, ``png_chunks``), and Pillow
    reads another format's header with code of its own, however long it takes (a GIF's is bounded too,
    ``gif_blocks``, but its pixels are decoded in the pool, where its header can be read as well). Raises
    ``InvalidImage``."""
    small = len(photo) <= (ALONE_INLINE_MAX_BYTES if alone else INLINE_MAX_BYTES)
    return open_image(photo, limits, size) if small and photo.startswith(LOOP_OPENED_SIGNATURES) else None


def cheap_to_decode(opened: Image.Image | None, alone: bool = False) -> bool:
    """True for a photo opened on the loop whose decode is cheap enough to run there: a JPEG of few pixels, or of
    up to ALONE_INLINE_MAX_PIXELS when its request is ``alone``."""
    limit = ALONE_INLINE_MAX_PIXELS if alone else INLINE_MAX_PIXELS
    return opened is not None and opened.format == "JPEG" and opened.width * opened.height <= limit


class Preprocessor:
    def __init__(self, limits: Limits, executor: Executor, alone: Callable[[], bool] = lambda: False):
        self.limits = limits
        self.executor = executor  # the pool photos too costly for the event loop are decoded in
        self.alone = alone  # () -> True while the asking request is the only one the gateway serves

    async def pixels(self, photo: bytes, size: int) -> np.ndarray:
        start = time.perf_counter()
        try:
            alone = self.alone()
            opened = opened_on_the_loop(photo, self.limits, size, alone)
            if cheap_to_decode(opened, alone):
                pixels = preprocess_opened(opened, size)
            else:
                work = (preprocess_bytes, photo, size, self.limits) if opened is None else \
                    (preprocess_opened, opened, size)
                pixels = await asyncio.get_running_loop().run_in_executor(self.executor, *work)
        except InvalidImage as exc:
            status = {"too_large": 413, "unsupported_format": 415}.get(exc.code, 400)
            raise GatewayError(status, exc.code, exc.message) from None
        metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - start)
        return pixels
