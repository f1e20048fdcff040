"""The classify path both protocols share, in named stages (as KServe's ``Model.__call__`` names preprocess,
predict and postprocess): route -> lookup -> (on a miss) preprocess -> predict -> store -> answer, each timed in
mushroom_gateway_stage_seconds{stage=...}."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from services.gateway import metrics
from services.gateway.admission import REFUSAL_CODES, MissAdmission
from services.gateway.cache import ResultCache, cache_key, explanation_key
from services.gateway.errors import GatewayError
from services.gateway.version_facts import Facts, VersionFacts
from services.gateway.model_info import ModelInfo, display_name
from services.gateway.pixels import Preprocessor
from services.gateway.predict_batching import NoBatching, PredictBatcher
from services.gateway.routing import Router
from services.gateway.single_flight import NoSingleFlight, SingleFlight
from services.gateway.stats import Stats
from services.gateway.upstream import (
    ContractBroken, ExplainServerBehind, ModelServerClient, SignatureNotServed, UpstreamRejected, UpstreamUnavailable,
)
from training_job.heatmaps import displayed_size, overlay_png
from training_job.preprocessing import Limits, open_image

log = logging.getLogger("gateway.classifier")
MAX_TOP_K = 100
# Retry-After of an explanation the explain model server cannot give yet: it loads the version on its next poll
# (TF Serving's --model_config_file_poll_wait_seconds, or its file-system poll for a base path)
EXPLAIN_RETRY_AFTER_SECONDS = 5
DEFAULT_TOP_K = 3  # both protocols' default
# The model server's status codes that refuse what was asked (a 400 to the client); any other it answers with is
# the model server failing (502), counted as a failure in the error rates a rollout is judged on.
REFUSALS = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE"})
CLASS_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,100}")  # a label as training names its folders; it goes into a cache key


@dataclass(frozen=True)
class Target:
    """Where a request goes: a version number, or None for the version ``label`` points at (or the latest), and
    the facts of the version that will answer (its input size S, its photo preprocessed at it; its identity)."""
    version: int | None
    label: str | None
    reason: str  # the ROUTE metric's reason: "override", "ab", "single", "fallback", "latest"
    facts: Facts | None = None  # None until the route stage has learnt them

    @property
    def size(self) -> int:
        return self.facts.size


@dataclass(frozen=True)
class Wanted:
    """The plain answer, or the answer with a Grad-CAM explanation for ``class_name`` (None = the predicted class)."""
    explain: bool
    class_name: str | None = None

    @property
    def target(self) -> str:
        """The explanation's part of its cache key: "=" is in no class name (CLASS_LABEL), so a class named
        "predicted" cannot share the predicted class's entry."""
        return "predicted" if self.class_name is None else f"class={self.class_name}"


PLAIN = Wanted(False)


class Classifier:
    def __init__(self, upstream: ModelServerClient, cache: ResultCache, router: Router, stats: Stats,
                 model_info: ModelInfo, limits: Limits, single_flight: SingleFlight | NoSingleFlight,
                 version_facts: VersionFacts, preprocess_threads: int = 2,
                 batcher: PredictBatcher | NoBatching | None = None, admission: MissAdmission | None = None):
        self.upstream = upstream
        self.admission = admission or MissAdmission(0)  # which misses are taken on (0: every one)
        self.batcher = batcher or NoBatching(upstream)  # plain predictions go through it; explanations do not
        self.cache = cache
        self.router = router
        self.stats = stats
        self.model_info = model_info
        self.limits = limits
        self.single_flight = single_flight
        self.version_facts = version_facts
        self.executor = ThreadPoolExecutor(preprocess_threads, thread_name_prefix="preprocess")
        self.serving = 0  # classify calls under way
        self.preprocessor = Preprocessor(limits, self.executor, alone=lambda: self.serving == 1)
        self._background: set[asyncio.Task] = set()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _ask_upstream(self, call, label: str | None):
        """``await call()``, the model server's refusals turned into GatewayErrors."""
        try:
            return await call()
        except ExplainServerBehind as exc:
            raise GatewayError(503, "explain_version_loading", str(exc),
                               retry_after=EXPLAIN_RETRY_AFTER_SECONDS) from None
        except UpstreamUnavailable as exc:
            raise GatewayError(503, "model_server_unavailable", str(exc), retry_after=2) from None
        except ContractBroken as exc:
            raise GatewayError(502, "version_unusable", str(exc)) from None
        except SignatureNotServed as exc:
            hint = ("; explanations need the SavedModel engine: start the gateway with --explain-model-server, a "
                    "model server serving the same registry without --prefer_tflite_model"
                    if exc.signature.startswith("explain") else "")
            raise GatewayError(501, "signature_not_served", f"{exc}{hint}") from None
        except UpstreamRejected as exc:
            if exc.code.name == "NOT_FOUND":
                raise GatewayError(404, "unknown_version", f"the model server has no such version: {exc}") from None
            if label and "label" in str(exc).lower():
                raise GatewayError(404, "unknown_label", f"unknown version label {label!r}: {exc}") from None
            if exc.code.name in REFUSALS:
                raise GatewayError(400, "rejected_by_model_server", str(exc)) from None
            raise GatewayError(502, "model_server_error", f"the model server failed: {exc.code.name}: {exc}") from None

    def _raw_answer(self, prediction, start: float) -> dict:
        metrics.child(metrics.UPSTREAM_SECONDS, model_version=metrics.version_metric_value(
            prediction.version, self.router.available)).observe(time.perf_counter() - start)
        if not prediction.finite:  # this photo's alone: the others of its Predict call have their own answers
            raise GatewayError(502, "model_answer_not_finite", f"version {prediction.version} answered this photo "
                               "with probabilities or a mushroom score that are not finite (NaN or infinite): a "
                               "numerical fault of the model")
        return {"version": prediction.version, "classes": prediction.classes,
                "probabilities": [float(p) for p in prediction.probabilities],
                "mushroom_score": prediction.mushroom_score, "not_a_mushroom": prediction.not_a_mushroom}

    def identity_of(self, version: int) -> str | None:
        """Which model ``version`` names (version_facts.py), once learnt; None before, or once it left AVAILABLE."""
        known = self.version_facts.known(version)
        return known.identity if known is not None else None

    async def classes_of(self, version: int, identity: str | None = None) -> list[str] | None:
        """The class labels of ``version`` in column order, the model of ``identity`` (None: whichever holds the
        number): from its facts (as it had them when it left AVAILABLE, if it did), else from the registry's
        labels.json (with no ``identity``: the registry cannot say which model it holds), else learnt from the model
        server; None when the model server has no such version any more, or it is another model now. Raises
        GatewayError 503 while the model server is down."""
        known = self.version_facts.last_known(version)
        if known is not None:
            return list(known.classes) if identity in (None, known.identity) else None
        labels = [c["label"] for c in self.model_info.class_names(version)] if identity is None else []
        if labels:
            return labels
        try:
            facts = await self._ask_upstream(lambda: self.version_facts.of(version), None)
        except GatewayError as exc:
            if exc.code == "unknown_version":
                return None
            raise
        return list(facts.classes) if identity in (None, facts.identity) else None

    async def _predict(self, pixels: np.ndarray, version: int | None, label: str | None):
        start = time.perf_counter()
        prediction = await self._ask_upstream(lambda: self.batcher.predict(pixels, version, label), label)
        return self._raw_answer(prediction, start)

    async def _explain_once(self, pixels: np.ndarray, version: int | None, label: str | None,
                            class_index: int | None) -> dict:
        start = time.perf_counter()
        (explained,) = await self._ask_upstream(
            lambda: self.upstream.explain(pixels[None], version, label, class_index), label)
        return {**self._raw_answer(explained.prediction, start),
                "explanation": {"class_index": explained.explained_class, "heatmap": explained.heatmap.tolist()}}

    @staticmethod
    def _column(classes: list[str], wanted: str) -> int:
        if wanted not in classes:
            raise GatewayError(400, "unknown_class", f"explain_class {wanted!r} is not a class of this model "
                               f"({', '.join(classes)})")
        return classes.index(wanted)

    async def _explain(self, pixels: np.ndarray, version: int | None, label: str | None,
                       wanted: str | None) -> dict:
        """The answer with a Grad-CAM heatmap for the class labelled ``wanted`` (None = the predicted class).
        Columns are known from the version's facts; otherwise (a version label) the first call (predicted class)
        tells them, and a second call is made only when another class was wanted."""
        known = self.version_facts.known(version) if version is not None else None
        index = self._column(list(known.classes), wanted) if wanted is not None and known is not None else None
        answer = await self._explain_once(pixels, version, label, index)
        if wanted is not None and index is None:
            index = self._column(answer["classes"], wanted)
            if answer["explanation"]["class_index"] != index:
                answer = await self._explain_once(pixels, answer["version"], None, index)
        return answer

    def _draw_explanation(self, photo: bytes, raw: dict) -> dict:
        """The explanation of an answer: the raw map, and a PNG overlay as large as the photo is displayed."""
        explanation = raw["explanation"]
        width, height = displayed_size(open_image(photo, self.limits))
        index = explanation["class_index"]
        label = raw["classes"][index]
        return {"label": label, "display_name": display_name(label, self.model_info.display_names(raw["version"])),
                "class_index": index, "heatmap": explanation["heatmap"], "width": width, "height": height,
                "overlay_png": base64.b64encode(overlay_png(np.asarray(explanation["heatmap"], np.float32),
                                                            (width, height))).decode()}

    async def version_states(self) -> dict[int, int]:
        try:
            return await self.upstream.version_states()
        except UpstreamUnavailable as exc:
            raise GatewayError(503, "model_server_unavailable", str(exc), retry_after=2) from None

    def _check_top_k(self, top_k: int, classes: int = MAX_TOP_K) -> None:
        """1 <= top_k <= MAX_TOP_K before any work, then <= the class count of the version that answered."""
        limit = min(classes, MAX_TOP_K)
        if not 1 <= top_k <= limit:
            raise GatewayError(400, "bad_top_k", f"top_k must be between 1 and {limit}, got {top_k}")

    def _validate(self, photo: bytes, top_k: int, explain_class: str | None, version: int | None, label: str | None,
                  client_id: str | None) -> None:
        """Refuses a request before any work: top_k out of range, a malformed class name, both a version and a
        label, a version label or client id that is not UTF-8 text, an empty or oversized photo."""
        self._check_top_k(top_k)
        if version is not None and label:
            raise GatewayError(400, "bad_version", f"give a version or a version label, not both (got version "
                               f"{version} and label {ascii(label[:80])})")
        for name, value in (("label", label), ("client_id", client_id)):
            if value is not None and not _is_text(value):
                raise GatewayError(400, f"bad_{name}", f"{name} must be UTF-8 text, got {ascii(value[:80])}")
        if explain_class is not None and not CLASS_LABEL.fullmatch(explain_class):
            raise GatewayError(400, "bad_explain_class", f"explain_class must be a class label "
                               f"({CLASS_LABEL.pattern}), got {explain_class[:80]!r}")
        if not photo:
            raise GatewayError(400, "empty", "the photo is empty (0 bytes)")
        if len(photo) > self.limits.max_bytes:
            raise GatewayError(413, "too_large", f"the photo is {len(photo)} bytes; the limit is "
                               f"{self.limits.max_bytes} bytes")

    async def classify(self, photo: bytes, *, client_id: str | None = None, top_k: int = DEFAULT_TOP_K,
                       version: int | None = None, label: str | None = None, protocol: str = "http",
                       endpoint: str = "classify", explain: bool = False, explain_class: str | None = None,
                       deadline: float | None = None) -> dict:
        """The answer; with ``explain`` also its Grad-CAM ``explanation`` for the predicted class, or for the class
        labelled ``explain_class``. Stages (each timed in mushroom_gateway_stage_seconds): route -> lookup ->
        (on a miss) preprocess -> predict -> store (after the answer) -> answer. Every call, however it ends, is
        one observation of mushroom_gateway_request_seconds (with explain: _explain_seconds) with how it ended
        (``result``, see metrics.py); a 5xx or a failure that is no GatewayError also counts in the chosen
        version's error rate. ``deadline``: the ``time.monotonic()`` instant the caller stops waiting, if it said:
        a miss that would not be answered by then is refused at once (admission.py)."""
        start = time.perf_counter()
        explain = explain or explain_class is not None
        wanted = Wanted(explain, explain_class)
        cache_outcome, result, chosen = "miss", "ok", version
        self.serving += 1
        try:
            self._validate(photo, top_k, explain_class, version, label, client_id)
            routed = version is None and not label
            for attempt in (1, 2):
                try:
                    with metrics.stage("route"):
                        target = self._route(client_id, version, label)
                        chosen = target.version
                        target = await self._learnt(target)
                    answer, cache_outcome = await self._lookup_or_predict(photo, target, wanted, deadline)
                    break
                except GatewayError as exc:
                    if attempt == 2 or not (routed and chosen is not None and exc.code == "unknown_version"):
                        raise
                    # The model server unloaded the routed version after the last status poll: route again without
                    # it (the next poll brings it back if it was only a moment's disagreement).
                    self.router.available.discard(chosen)
                    metrics.REROUTED.inc()
            self._check_top_k(top_k, len(answer["classes"]))
            with metrics.stage("answer"):
                return await self._reply(photo, answer, target, top_k, cache_outcome == "hit", wanted, start)
        except GatewayError as exc:
            result = "client_error" if exc.status < 500 else "overloaded" if exc.code in REFUSAL_CODES else \
                "unavailable"
            if result == "unavailable":  # a refused miss says nothing of the version that would have answered
                self.stats.record_error(chosen)
            raise
        except asyncio.CancelledError:  # the caller left: a gRPC deadline or cancellation, or a shutdown
            result = "cancelled"
            raise
        except Exception:  # a bug of the gateway's, answered HTTP 500 / gRPC UNKNOWN: the chosen version failed
            result = "internal_error"
            self.stats.record_error(chosen)
            raise
        finally:
            self.serving -= 1
            chosen_value = metrics.version_metric_value(chosen, self.router.available)
            if explain:
                metrics.child(metrics.EXPLAIN_SECONDS, protocol=protocol, model_version=chosen_value,
                              cache=cache_outcome, result=result).observe(time.perf_counter() - start)
            else:
                metrics.child(metrics.REQUEST_SECONDS, protocol=protocol, endpoint=endpoint, model_version=chosen_value,
                              cache=cache_outcome, result=result).observe(time.perf_counter() - start)

    # ------------------------------------------------------------------ the stages
    def _route(self, client_id: str | None, version: int | None, label: str | None) -> Target:
        """Stage route, first half: the version asked for by number (it must be AVAILABLE), by version label
        (resolved by the model server when it answers), or else the routing table's choice for this client."""
        if label:
            return Target(version, label, "override")
        if version is not None:
            if version in self.router.unusable:
                raise GatewayError(502, "version_unusable", f"version {version} cannot be used: "
                                   f"{self.router.unusable[version]}")
            if version not in self.router.available:
                raise GatewayError(404, "unknown_version", f"version {version} is not AVAILABLE "
                                   f"(available: {sorted(self.router.available)})")
            return Target(version, None, "override")
        chosen, reason = self.router.choose(client_id)
        return Target(chosen, None, reason)

    async def _learnt(self, target: Target) -> Target:
        """Stage route, second half: the facts of the version that will answer (kept per version; which version is
        asked afresh for a version label, or when no version is known, as the label may move)."""
        if target.version is not None:
            facts = await self._ask_upstream(lambda: self.version_facts.of(target.version), target.label)
        else:
            facts = await self._ask_upstream(lambda: self.version_facts.resolve(target.label), target.label)
        return replace(target, facts=facts)

    async def _lookup_or_predict(self, photo: bytes, target: Target, wanted: Wanted,
                                 deadline: float | None) -> tuple[dict, str]:
        """(answer, "hit" | "miss"): the answer of ``target`` for this photo found by the lookup stage, or else
        made by the preprocess and predict stages (identical concurrent misses share one call, admitted by the
        deadline of the request that started it) and stored."""
        digest = hashlib.sha256(photo).hexdigest()
        key = self._key(digest, target.facts, wanted) if target.version is not None else None
        found = await self._lookup(key, wanted)
        if found is not None:
            return found

        async def miss():
            with self.admission.admitted(deadline):
                with metrics.stage("preprocess"):
                    pixels = await self.preprocessor.pixels(photo, target.size)
                with metrics.stage("predict"):
                    fresh = await (self._explain(pixels, target.version, target.label, wanted.class_name)
                                   if wanted.explain else self._predict(pixels, target.version, target.label))
            answered = self._answered_by(fresh["version"], target)
            if answered is not None:
                self._store(self._key(digest, answered, wanted), fresh)
                if wanted.explain:  # the plain answer too, so a plain classify of the photo after it is a hit
                    self._store(self._key(digest, answered, PLAIN),
                                {k: v for k, v in fresh.items() if k != "explanation"})
            if not wanted.explain:
                self._maybe_shadow(photo, pixels, fresh)
            return fresh

        flight = key or f"{digest}:{target.label}" + (f":explain:{wanted.target}" if wanted.explain else "")
        return await self.single_flight.do(flight, miss), "miss"

    def _answered_by(self, version: int, target: Target) -> Facts | None:
        """The facts of the version that answered ``target``'s request, to key its answer by: None, and the answer
        not cached, when they are not the ones it was preprocessed for (a version label moved meanwhile, to a
        version not known or of another size)."""
        if version == target.facts.version:
            return target.facts
        facts = self.version_facts.known(version)
        return facts if facts is not None and facts.size == target.size else None

    def _key(self, digest: str, facts: Facts, wanted: Wanted) -> str:
        """The cache key of a version's answer for a photo preprocessed at its size: the plain answer, or the one
        with its explanation (under its own key beside the plain answer's)."""
        model = self.upstream.model_name
        if wanted.explain:
            return explanation_key(digest, model, facts.version, facts.identity, facts.size, wanted.target)
        return cache_key(digest, model, facts.version, facts.identity, facts.size)

    async def _lookup(self, key: str | None, wanted: Wanted) -> tuple[dict, str] | None:
        """Stage lookup: (the cached answer, "hit"), or (an answer still being written to the cache, "miss"), or
        None. Nothing to look up without a version number (a version label's answer names its version)."""
        if key is None:
            return None
        with metrics.stage("lookup"):
            answer = await self.cache.get(key, lambda entry: readable_answer(entry, wanted.explain))
            if answer is not None:
                return answer, "hit"
            answer = self.single_flight.held(key)
            return (answer, "miss") if answer is not None else None

    async def _reply(self, photo: bytes, answer: dict, target: Target, top_k: int, cached: bool, wanted: Wanted,
                     start: float) -> dict:
        """Stage answer: the reply to ``target``'s request, with the drawn explanation when one was asked for."""
        explanation = None
        if wanted.explain:
            explanation = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._draw_explanation, photo, answer)
        answered = metrics.version_metric_value(answer["version"], self.router.available)
        metrics.child(metrics.ROUTE, model_version=answered, reason=target.reason).inc()
        identity = target.facts.identity if answer["version"] == target.facts.version else \
            self.identity_of(answer["version"])
        reply = self._answer(answer, identity, top_k, cached, start)
        return reply if explanation is None else {**reply, "explanation": explanation}

    def _answer(self, raw: dict, identity: str | None, top_k: int, cached: bool, start: float) -> dict:
        """The reply to the client from ``raw``, the answer of the model of ``identity`` (None: not known), which its
        feedback token names."""
        version = raw["version"]
        names = self.model_info.display_names(version)
        probabilities = np.asarray(raw["probabilities"])
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        request_id = uuid.uuid4().hex
        predictions = [{"label": raw["classes"][i], "display_name": display_name(raw["classes"][i], names),
                        "score": float(probabilities[i])} for i in order]
        latency = time.perf_counter() - start
        self.stats.record(version, latency, cached)
        feedback_token = self.stats.feedback_token(request_id, version, identity, predictions[0]["label"])
        return {"request_id": request_id, "feedback_token": feedback_token,
                "model": {"name": self.upstream.model_name, "version": version},
                "predictions": predictions, "not_a_mushroom": raw["not_a_mushroom"],
                "mushroom_score": raw["mushroom_score"], "cached": cached, "latency_ms": latency * 1000}

    def _store(self, key: str, answer: dict) -> None:
        """Stage store: caches ``answer`` in the background, off the response's path; until the write ends the
        single-flight shares the answer with identical requests."""
        release = self.single_flight.hold(key, answer)

        async def put():
            try:
                with metrics.stage("store"):
                    await self.cache.put(key, answer)
            finally:
                release()

        self._spawn(put())

    def _maybe_shadow(self, photo: bytes, pixels: np.ndarray, answer: dict) -> None:
        """Mirrors a miss to the shadow version, in the background, the photo preprocessed at the shadow's own input
        size (the answer's pixels when it is the same)."""
        shadow = self.router.shadow_version()
        if shadow is None or shadow == answer["version"] or shadow not in self.router.available:
            return

        async def mirror():
            start = time.perf_counter()
            try:
                with self.admission.admitted():  # a miss of the shadow's, refused as a client's would be
                    size = (await self._ask_upstream(lambda: self.version_facts.of(shadow), None)).size
                    shadow_pixels = pixels if size == pixels.shape[0] else await self.preprocessor.pixels(photo, size)
                    shadow_answer = await self._predict(shadow_pixels, shadow, None)
            except GatewayError:
                return
            # the same top-1 label (two versions may order their columns differently)
            agreed = _top_label(shadow_answer) == _top_label(answer)
            self.stats.record_shadow(shadow, agreed, time.perf_counter() - start)

        self._spawn(mirror())


def readable_answer(entry: dict, explained: bool) -> bool:
    """Whether a cache entry is an answer as ``_raw_answer`` writes it (``explained``: with the explanation
    ``_explain_once`` adds), holding what ``_answer`` and ``_draw_explanation`` read, of the types they read."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    classes, probabilities = entry.get("classes"), entry.get("probabilities")
    if not (isinstance(entry.get("version"), int) and isinstance(classes, list) and classes
            and all(isinstance(c, str) for c in classes) and isinstance(probabilities, list)
            and len(probabilities) == len(classes) and all(map(number, probabilities))
            and number(entry.get("mushroom_score")) and isinstance(entry.get("not_a_mushroom"), bool)):
        return False
    if not explained:
        return True
    explanation = entry.get("explanation")
    if not isinstance(explanation, dict):
        return False
    index = explanation.get("class_index")
    if not (isinstance(index, int) and 0 <= index < len(classes)):
        return False
    heatmap = explanation.get("heatmap")
    return (isinstance(heatmap, list) and bool(heatmap) and all(isinstance(row, list) for row in heatmap)
            and len({len(row) for row in heatmap}) == 1 and all(number(v) for row in heatmap for v in row))


def _is_text(value: str) -> bool:
    """False for a string holding lone surrogates, which nothing downstream can encode: what aiohttp makes of header
    bytes that are not UTF-8 (surrogateescape), or a JSON string's "\\ud800"."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _top_label(answer: dict) -> str:
    return answer["classes"][int(np.argmax(answer["probabilities"]))]
