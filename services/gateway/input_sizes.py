"""Each model version's input size S, from its ``serving_default`` signature (input ``images`` uint8
[batch, S, S, 3]; 224 for MobileNet and EfficientNet-Lite0, 240 for Lite1, 260 for Lite2), asked of the model server
through GetModelMetadata (TF Serving's API) and kept per version: a version's SavedModel never changes.

The gateway preprocesses a photo at the size of the version that will answer it, and the cache key holds that size.
The version watcher asks the size of each newly AVAILABLE version before routing to it (``refresh``).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Iterable

from services.gateway.upstream import ModelServerClient

log = logging.getLogger("gateway.input_sizes")

OPEN_SIZE = 224  # the size for a signature that leaves S open ([-1, -1, -1, 3]): the contract's default


class InputSizes:
    def __init__(self, upstream: ModelServerClient):
        self.upstream = upstream
        self._sizes: dict[int, int] = {}  # version -> S

    async def of(self, version: int) -> int:
        """S of ``version``: asked once, then kept. Raises UpstreamRejected / UpstreamUnavailable as the upstream
        client does."""
        size = self._sizes.get(version)
        if size is None:
            _, declared = await self.upstream.input_size(version)
            size = self._sizes[version] = declared or OPEN_SIZE
        return size

    async def resolve(self, label: str | None) -> tuple[int, int]:
        """(version, S) of the version ``label`` points at now (or of the latest when None): asked every time, since
        a label moves."""
        version, declared = await self.upstream.input_size(None, label)
        self._sizes[version] = declared or OPEN_SIZE
        return version, self._sizes[version]

    async def refresh(self, versions: Iterable[int], timeout: float | None = None) -> None:
        """Keeps the sizes of ``versions`` only (a version folder replaced under the same number is asked afresh) and
        asks the ones not known yet, so requests find them known. A version that does not answer within ``timeout``
        is asked again at the next refresh, or by the first request routed to it."""
        keep = set(versions)
        self._sizes = {v: s for v, s in self._sizes.items() if v in keep}
        missing = sorted(keep - set(self._sizes))
        answers = await asyncio.gather(*(self.upstream.input_size(v, timeout=timeout) for v in missing),
                                       return_exceptions=True)
        for version, answer in zip(missing, answers):
            if isinstance(answer, BaseException):
                log.debug("input size of version %d not known yet: %s", version, answer)
            else:
                self._sizes[version] = answer[1] or OPEN_SIZE
