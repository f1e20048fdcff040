"""The classify path shared by HTTP and gRPC: preprocess -> route -> cache -> model server -> top-k answer."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import grpc
import numpy as np

from services.gateway import routing
from services.gateway.cache import CachedResult, ResultCache, cache_key
from services.gateway.preprocess import InvalidImage, Preprocessor
from services.gateway.upstream import ModelServerClient, UpstreamError


class ClassifyError(Exception):
    """A refused request: ``status`` is the HTTP status, ``code`` machine-readable."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Answer:
    request_id: str
    model: str
    version: int
    predictions: list[dict]
    not_a_mushroom: bool
    mushroom_score: float
    cached: bool
    latency_ms: float

    def to_json(self) -> dict:
        return {"request_id": self.request_id, "model": {"name": self.model, "version": self.version},
                "predictions": self.predictions, "not_a_mushroom": self.not_a_mushroom,
                "mushroom_score": self.mushroom_score, "cached": self.cached, "latency_ms": self.latency_ms}


def display_name(label: str, names: dict[str, str]) -> str:
    return names.get(label) or label.replace("_", " ").capitalize()


class Classifier:
    def __init__(self, upstream: ModelServerClient, cache: ResultCache, preprocessor: Preprocessor,
                 display_names: dict[str, str] | None = None):
        self.upstream = upstream
        self.cache = cache
        self.preprocessor = preprocessor
        self.display_names = display_names or {}
        self.table = routing.RoutingTable()
        self.available: set[int] = set()

    def _target(self, client_id: str | None, version: int | None, label: str | None) -> tuple[int | None, str | None]:
        if version is not None:
            if self.available and version not in self.available:
                raise ClassifyError(404, "unknown_version",
                                    f"version {version} is not AVAILABLE (available: {sorted(self.available)})")
            return version, None
        if label is not None:
            return None, label
        arm = routing.choose(self.table, client_id or uuid.uuid4().hex, self.available or None)
        if arm is None:
            return (max(self.available) if self.available else None), None
        return arm.version, (None if arm.version is not None else arm.target)

    async def classify(self, photo: bytes, top_k: int = 3, client_id: str | None = None, version: int | None = None,
                       label: str | None = None) -> Answer:
        started = time.perf_counter()
        if top_k < 1:
            raise ClassifyError(400, "bad_top_k", f"top_k must be >= 1, got {top_k}")
        try:
            pixels = await self.preprocessor.pixels(photo)
        except InvalidImage as exc:
            raise ClassifyError(413 if exc.code == "too_large" else 400, exc.code, exc.message) from None
        want_version, want_label = self._target(client_id, version, label)

        async def compute() -> CachedResult:
            out = await self._predict(pixels, want_version, want_label)
            return CachedResult(out.version, out.labels, [float(p) for p in out.probabilities], out.mushroom_score,
                                out.not_a_mushroom)

        if want_version is None:  # a label or "latest": the answering version is only known afterwards
            result, cached = await compute(), False
            await self.cache.put(cache_key(photo, self.upstream.model_name, result.version), result)
        else:
            result, cached = await self.cache.get_or_compute(
                cache_key(photo, self.upstream.model_name, want_version), compute)
        if top_k > len(result.labels):
            raise ClassifyError(400, "bad_top_k", f"top_k must be 1..{len(result.labels)}, got {top_k}")
        order = np.argsort(-np.asarray(result.probabilities), kind="stable")[:top_k]
        predictions = [{"label": result.labels[i], "display_name": display_name(result.labels[i], self.display_names),
                        "score": float(result.probabilities[i])} for i in order]
        return Answer(uuid.uuid4().hex, self.upstream.model_name, result.version, predictions, result.not_a_mushroom,
                      result.mushroom_score, cached, (time.perf_counter() - started) * 1000)

    async def _predict(self, pixels, version, label):
        try:
            return await self.upstream.predict(pixels, version=version, label=label)
        except UpstreamError as exc:
            if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ClassifyError(503, "upstream_unavailable", f"the model server is unavailable: {exc.message}")
            if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                            grpc.StatusCode.FAILED_PRECONDITION) and (version is not None or label is not None):
                what = f"version {version}" if version is not None else f"label {label!r}"
                raise ClassifyError(404, "unknown_version", f"the model server does not serve {what}: {exc.message}")
            raise ClassifyError(502, "upstream_error", f"the model server failed: {exc.message}")
