"""Prometheus metrics of the gateway; every metric label has a small set of values: ``model_version`` the versions
the gateway routes to now, those that left within ``--forget-versions-after`` (stats.Stats.keep then removes their
series, ``forget_version``) and "other"; every other label a fixed set.

Words: a *metric label* is a Prometheus label (``model_version="3"``); a *version label* is TF Serving's name for a
version ("stable"); a *class name* is a column of the model's output ("boletus_edulis")."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

REGISTRY = CollectorRegistry()
# process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, process_max_fds, ... (descriptors.py)
ProcessCollector(registry=REGISTRY)
LATENCY_BUCKETS = (.001, .002, .005, .01, .015, .02, .03, .05, .075, .1, .2, .5, 1, 2, 5)

# ``result`` of REQUEST_SECONDS and EXPLAIN_SECONDS, how a classify ended: "ok" answered; "client_error" a 4xx
# GatewayError (the client's photo or options); "overloaded" a cache miss refused because the gateway has as many in
# progress as it can answer in time (admission.py: 503 with Retry-After, or 504 when not within the request's own
# deadline); "unavailable" another 5xx GatewayError (the model server down, failing or lacking the signature);
# "cancelled" the caller left before the answer (a gRPC deadline or cancellation, a closed HTTP connection: no
# response); "internal_error" anything else raised (a bug: HTTP 500, gRPC UNKNOWN). The server's own failures are
# "unavailable" and "internal_error".
REQUEST_SECONDS = Histogram(
    "mushroom_gateway_request_seconds", "Classify latency end to end, by result: ok, client_error (4xx), "
    "overloaded (503, or 504 for the request's deadline: a cache miss refused, the gateway answering as many as it "
    "can), unavailable (5xx: model server down or failing), cancelled (the client left: deadline, cancellation, "
    "closed connection), internal_error (a gateway bug: HTTP 500, gRPC UNKNOWN)",
    ["protocol", "endpoint", "model_version", "cache", "result"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
RESPONSES = Counter(
    "mushroom_gateway_responses", "Responses sent on every route and method, by protocol and status: HTTP the status "
    "number, gRPC the status code's name (DEADLINE_EXCEEDED or CANCELLED when the caller left). Answers given before "
    "classify runs (a body over the limit, one that does not parse or does not arrive) are counted only here",
    ["protocol", "code"], registry=REGISTRY)
EXPLAIN_SECONDS = Histogram(
    "mushroom_gateway_explain_seconds", "Classify with explain (Grad-CAM heatmap and its PNG) end to end; these "
    "requests are not in mushroom_gateway_request_seconds", ["protocol", "model_version", "cache", "result"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY)
UPSTREAM_SECONDS = Histogram("mushroom_gateway_upstream_seconds", "Model server Predict latency of a photo (with its "
                             "wait for a place in a call)", ["model_version"],
                             buckets=LATENCY_BUCKETS, registry=REGISTRY)
PREDICT_BATCH_PHOTOS = Histogram("mushroom_gateway_predict_batch_photos", "Photos per Predict call to the model server "
                                 "(concurrent misses for the same version share a call)",
                                 buckets=(1, 2, 4, 8, 16, 32, 64), registry=REGISTRY)
PREPROCESS_SECONDS = Histogram("mushroom_gateway_preprocess_seconds", "Decode and resize time",
                               buckets=LATENCY_BUCKETS, registry=REGISTRY)
STAGES = ("route", "lookup", "preprocess", "predict", "store", "answer")
STAGE_SECONDS = Histogram(
    "mushroom_gateway_stage_seconds", "Time in each stage of a classify request: route (pick the version), lookup "
    "(the cache, and answers still being written to it), preprocess (decode and resize, on a miss), predict (the "
    "model server, on a miss), store (the cache write, after the answer is sent), answer (the reply, and an "
    "explanation's drawing)", ["stage"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
CACHE = Counter("mushroom_gateway_cache", "Cache lookups by outcome (hit, miss, unreadable, error, bypass)",
                ["outcome"], registry=REGISTRY)
# The children of the fixed label values, bound once: labels() validates and locks on every call.
STAGE_CHILDREN = {name: STAGE_SECONDS.labels(stage=name) for name in STAGES}
CACHE_OUTCOMES = {outcome: CACHE.labels(outcome=outcome)
                  for outcome in ("hit", "miss", "unreadable", "error", "bypass")}
SINGLE_FLIGHT_SHARED = Counter("mushroom_gateway_single_flight_shared", "Misses that joined an identical call",
                               registry=REGISTRY)
MISSES_REFUSED = Counter("mushroom_gateway_misses_refused", "Cache misses refused at once because the misses in "
                         "progress would take longer to answer than --max-queue-wait (reason queue: 503 overloaded; a "
                         "shadow version's mirrored calls included, which are then skipped) or than the request's own "
                         "deadline (reason deadline: 504 deadline_unreachable, gRPC DEADLINE_EXCEEDED)", ["reason"],
                         registry=REGISTRY)
MISSES_REFUSED_BY = {reason: MISSES_REFUSED.labels(reason=reason) for reason in ("queue", "deadline")}
MISSES_IN_PROGRESS = Gauge("mushroom_gateway_misses_in_progress", "Cache misses being preprocessed, waiting for a "
                           "Predict call or in one", registry=REGISTRY)
MISSES_ADMITTED_LIMIT = Gauge("mushroom_gateway_misses_admitted_limit", "How many cache misses may be in progress "
                              "now: the recent answer rate times --max-queue-wait, at least admission.MIN_ADMITTED "
                              "(0 while every miss is admitted)", registry=REGISTRY)
PREDICT_CALLS_ABANDONED = Counter("mushroom_gateway_predict_calls_abandoned", "Predict calls in flight cancelled "
                                  "because every caller of their photos had left", registry=REGISTRY)
MISSES_ABANDONED = Counter("mushroom_gateway_misses_abandoned", "Cache misses dropped before their answer because "
                           "every client waiting for them had left (deadlines, closed connections)",
                           registry=REGISTRY)
REROUTED = Counter("mushroom_gateway_rerouted", "Routed requests whose version the model server had unloaded since "
                   "the last status poll, routed again without it", registry=REGISTRY)
ROUTE = Counter("mushroom_gateway_route", "Routing decisions per version", ["model_version", "reason"],
                registry=REGISTRY)
ROUTED_VERSION_MISSING = Gauge("mushroom_gateway_routed_version_missing",
                               "1 while a version in the routing table is not AVAILABLE", registry=REGISTRY)
VERSIONS_UNUSABLE = Gauge("mushroom_gateway_versions_unusable", "AVAILABLE versions the gateway cannot use (they "
                          "break the serving contract) and routes around; /v1/models says why", registry=REGISTRY)
SHADOW_SECONDS = Histogram("mushroom_gateway_shadow_seconds", "Latency of mirrored (shadow) calls",
                           buckets=LATENCY_BUCKETS, registry=REGISTRY)
SHADOW = Counter("mushroom_gateway_shadow", "Shadow requests by agreement with the answer", ["agreement"],
                 registry=REGISTRY)
FEEDBACK_ACCURACY = Gauge("mushroom_gateway_feedback_accuracy", "Accuracy from user feedback per version",
                          ["model_version"], registry=REGISTRY)
ROUTING_TABLE_LOST = Gauge("mushroom_gateway_routing_table_lost", "1 while Redis has lost the routing table this "
                           "gateway follows and refuses to have it written back", registry=REGISTRY)
ROUTING_TABLE_LOSSES = Counter("mushroom_gateway_routing_table_losses", "Times Redis lost the routing table this "
                               "gateway had seen (gone, or back at a lower generation); each is written back",
                               registry=REGISTRY)
PHOTO_STORE_FAILURES = Counter("mushroom_gateway_photo_store_failures", "Photo store operations that failed on the "
                               "file system (--photo-store: keep a classified photo, record a correction)",
                               ["operation"], registry=REGISTRY)
LOOP_FAILURES = Counter("mushroom_gateway_loop_failures", "Failed steps of a background loop (each is retried with "
                        "backoff)", ["loop"], registry=REGISTRY)
LOOP_LAST_SUCCESS = Gauge("mushroom_gateway_loop_last_success_timestamp_seconds",
                          "Unix time of a background loop's last successful step", ["loop"], registry=REGISTRY)


# The metrics with a ``model_version`` label: a version's series in them go some time after it left (stats.py).
# prometheus_client lists no metric's children; it keeps their label names in ``_labelnames`` and the children by
# label values in ``_metrics``, which version_values and forget_version read (tests/test_gateway_versions_gone.py
# checks both against the pinned release).
VERSIONED = (REQUEST_SECONDS, EXPLAIN_SECONDS, UPSTREAM_SECONDS, ROUTE, FEEDBACK_ACCURACY)


def version_metric_value(version: int | None, known: set[int]) -> str:
    """The value of a ``model_version`` metric label, of bounded cardinality: only versions the model server reports
    become values; anything else is "other"."""
    return str(version) if version is not None and version in known else "other"


_CHILDREN: dict = {}  # (metric, its label values) -> the child, while its series is in the metric


def child(metric, **labels: str):
    """``metric.labels(**labels)``, each child looked up once and then taken from a dict (labels() validates the
    names and takes a lock on every call) until ``forget_version`` removes its series."""
    key = (metric, *labels.items())
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(**labels)
    return found


def version_values() -> set[str]:
    """The ``model_version`` label values of the series of VERSIONED ("other" included)."""
    values = set()
    for metric in VERSIONED:
        at = metric._labelnames.index("model_version")
        values.update(label_values[at] for label_values in list(metric._metrics))
    return values


def forget_version(value: str) -> None:
    """Removes every series of VERSIONED whose ``model_version`` is ``value``: its counts are no longer exported,
    and an observation after this starts a new series from zero (which Prometheus reads as a counter reset)."""
    for metric in VERSIONED:
        at = metric._labelnames.index("model_version")
        for label_values in [v for v in list(metric._metrics) if v[at] == value]:
            metric.remove(*label_values)
    for key in [key for key in _CHILDREN if ("model_version", value) in key[1:]]:
        del _CHILDREN[key]


def stage(name: str):
    """``with stage("predict"): ...`` observes the block's duration in mushroom_gateway_stage_seconds."""
    return STAGE_CHILDREN[name].time()
