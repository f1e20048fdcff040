"""The classify path both protocols share: route -> cache -> (miss) preprocess -> model server -> answer."""
from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from services.gateway import metrics
from services.gateway.cache import ResultCache, SingleFlight, cache_key
from services.gateway.errors import GatewayError
from services.gateway.model_info import ModelInfo, display_name
from services.gateway.routing import Router
from services.gateway.stats import Stats
from services.gateway.upstream import ModelServerClient, UpstreamRejected, UpstreamUnavailable
from training_job.preprocessing import InvalidImage, Limits, preprocess_bytes

log = logging.getLogger("gateway.classifier")
MAX_TOP_K = 100
# Photos this small are decoded on the event loop: their decode (~1 ms) costs about what the two thread hand-offs
# to and from the preprocessing pool cost. Bigger ones (or ones whose header says many pixels) go to the pool, so a
# slow decode never blocks the loop.
INLINE_MAX_BYTES = 64 * 1024
INLINE_MAX_PIXELS = 1_000_000


def _cheap_to_decode(photo: bytes) -> bool:
    if len(photo) > INLINE_MAX_BYTES:
        return False
    try:
        width, height = Image.open(io.BytesIO(photo)).size  # header only
    except Exception:  # noqa: BLE001 - not an image, or a bomb: the pool's preprocess_bytes says what is wrong
        return False
    return width * height <= INLINE_MAX_PIXELS


class Classifier:
    def __init__(self, upstream: ModelServerClient, cache: ResultCache, router: Router, stats: Stats,
                 model_info: ModelInfo, limits: Limits, preprocess_threads: int = 2):
        self.upstream = upstream
        self.cache = cache
        self.router = router
        self.stats = stats
        self.model_info = model_info
        self.limits = limits
        self.single_flight = SingleFlight()
        self.executor = ThreadPoolExecutor(preprocess_threads, thread_name_prefix="preprocess")
        self.num_classes: int | None = None
        self._background: set[asyncio.Task] = set()
        # Answers whose Redis write is still in flight (written after the response, off its path): an identical
        # request arriving meanwhile shares the answer, as it would have joined the single-flight call before.
        self._storing: dict[str, dict] = {}

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _preprocess(self, photo: bytes) -> np.ndarray:
        start = time.perf_counter()
        try:
            if _cheap_to_decode(photo):
                pixels = preprocess_bytes(photo, 224, self.limits)
            else:
                pixels = await asyncio.get_running_loop().run_in_executor(
                    self.executor, preprocess_bytes, photo, 224, self.limits)
        except InvalidImage as exc:
            status = 413 if exc.code in ("too_large",) else 400
            raise GatewayError(status, exc.code, exc.message) from None
        metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - start)
        return pixels

    async def _predict(self, pixels: np.ndarray, version: int | None, label: str | None):
        start = time.perf_counter()
        try:
            (prediction,) = await self.upstream.predict(pixels[None], version, label)
        except UpstreamUnavailable as exc:
            raise GatewayError(503, "model_server_unavailable", str(exc), retry_after=2) from None
        except UpstreamRejected as exc:
            if exc.code.name == "NOT_FOUND":
                raise GatewayError(404, "unknown_version", f"the model server has no such version: {exc}") from None
            if label and "label" in str(exc).lower():
                raise GatewayError(404, "unknown_label", f"unknown version label {label!r}: {exc}") from None
            raise GatewayError(400, "rejected_by_model_server", str(exc)) from None
        metrics.UPSTREAM_SECONDS.labels(model_version=metrics.version_label(
            prediction.version, self.router.available)).observe(time.perf_counter() - start)
        self.num_classes = len(prediction.classes)
        return {"version": prediction.version, "classes": prediction.classes,
                "probabilities": [float(p) for p in prediction.probabilities],
                "mushroom_score": prediction.mushroom_score, "not_a_mushroom": prediction.not_a_mushroom}

    async def version_states(self) -> dict[int, int]:
        try:
            return await self.upstream.version_states()
        except UpstreamUnavailable as exc:
            raise GatewayError(503, "model_server_unavailable", str(exc), retry_after=2) from None

    def _check_top_k(self, top_k: int) -> None:
        limit = self.num_classes or MAX_TOP_K
        if not 1 <= top_k <= limit:
            raise GatewayError(400, "bad_top_k", f"top_k must be between 1 and {limit}, got {top_k}")

    async def classify(self, photo: bytes, *, client_id: str | None = None, top_k: int = 3,
                       version: int | None = None, label: str | None = None, protocol: str = "http",
                       endpoint: str = "classify") -> dict:
        start = time.perf_counter()
        cache_outcome, result, chosen = "miss", "ok", version
        try:
            self._check_top_k(top_k)
            if not photo:
                raise GatewayError(400, "empty", "the photo is empty (0 bytes)")
            if len(photo) > self.limits.max_bytes:
                raise GatewayError(413, "too_large", f"the photo is {len(photo)} bytes; the limit is "
                                   f"{self.limits.max_bytes} bytes")
            if version is not None:
                if version not in self.router.available:
                    raise GatewayError(404, "unknown_version", f"version {version} is not AVAILABLE "
                                       f"(available: {sorted(self.router.available)})")
                reason = "override"
            elif label:
                reason = "override"
            else:
                chosen, reason = self.router.choose(client_id)
            digest = hashlib.sha256(photo).hexdigest()
            answer = None
            key = cache_key(digest, self.upstream.model_name, chosen) if chosen is not None else None
            if key is not None:
                answer = await self.cache.get(key)
            if answer is not None:
                cache_outcome = "hit"
            elif key is not None and key in self._storing and isinstance(self.single_flight, SingleFlight):
                metrics.SINGLE_FLIGHT_SHARED.inc()
                answer = self._storing[key]
            else:
                async def miss():
                    pixels = await self._preprocess(photo)
                    fresh = await self._predict(pixels, chosen, label)
                    self._store(cache_key(digest, self.upstream.model_name, fresh["version"]), fresh)
                    self._maybe_shadow(pixels, fresh)
                    return fresh
                answer = await self.single_flight.do(key or f"{digest}:{label}", miss)
            self._check_top_k(top_k)
            metrics.ROUTE.labels(model_version=metrics.version_label(answer["version"], self.router.available),
                                 reason=reason).inc()
            return self._answer(answer, top_k, cache_outcome == "hit", start)
        except GatewayError as exc:
            result = "client_error" if exc.status < 500 else "unavailable"
            if exc.status >= 500:
                self.stats.record_error(chosen)
            raise
        finally:
            metrics.REQUEST_SECONDS.labels(
                protocol=protocol, endpoint=endpoint,
                model_version=metrics.version_label(chosen, self.router.available),
                cache=cache_outcome, result=result).observe(time.perf_counter() - start)

    def _answer(self, raw: dict, top_k: int, cached: bool, start: float) -> dict:
        version = raw["version"]
        names = self.model_info.display_names(version)
        probabilities = np.asarray(raw["probabilities"])
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        request_id = uuid.uuid4().hex
        predictions = [{"label": raw["classes"][i], "display_name": display_name(raw["classes"][i], names),
                        "score": float(probabilities[i])} for i in order]
        latency = time.perf_counter() - start
        self.stats.record(version, latency, cached)
        feedback_token = self.stats.feedback_token(request_id, version, predictions[0]["label"])
        return {"request_id": request_id, "feedback_token": feedback_token,
                "model": {"name": self.upstream.model_name, "version": version},
                "predictions": predictions, "not_a_mushroom": raw["not_a_mushroom"],
                "mushroom_score": raw["mushroom_score"], "cached": cached, "latency_ms": latency * 1000}

    def _store(self, key: str, answer: dict) -> None:
        """Caches ``answer`` in the background: the Redis round trip is off the response's path."""
        self._storing[key] = answer

        async def put():
            try:
                await self.cache.put(key, answer)
            finally:
                if self._storing.get(key) is answer:
                    del self._storing[key]

        self._spawn(put())

    def _maybe_shadow(self, pixels: np.ndarray, answer: dict) -> None:
        shadow = self.router.shadow_version()
        if shadow is None or shadow == answer["version"] or shadow not in self.router.available:
            return

        async def mirror():
            start = time.perf_counter()
            try:
                shadow_answer = await self._predict(pixels, shadow, None)
            except GatewayError:
                return
            # the same top-1 label (two versions may order their columns differently)
            agreed = _top_label(shadow_answer) == _top_label(answer)
            self.stats.record_shadow(shadow, agreed, time.perf_counter() - start)

        self._spawn(mirror())


def _top_label(answer: dict) -> str:
    return answer["classes"][int(np.argmax(answer["probabilities"]))]
