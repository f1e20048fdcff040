"""Prometheus metrics, named as TF Serving names them where it has a name (prometheus_client adds `_total` to
counters, so TF Serving's `:tensorflow:serving:request_count` is exported as `:tensorflow:serving:request_count_total`)."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

REQUEST_COUNT = Counter(":tensorflow:serving:request_count", "Requests by model, version, API and status",
                        ["model_name", "model_version", "API", "status"], registry=REGISTRY)
REQUEST_LATENCY = Histogram(":tensorflow:serving:request_latency", "Request latency in seconds",
                            ["model_name", "API", "entrypoint"], registry=REGISTRY,
                            buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56, 5.12))
BATCH_SIZE = Histogram(":tensorflow:serving:batching_session:processed_batch_size", "Batch sizes run by the model",
                       ["model_name"], registry=REGISTRY, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
LOAD_SECONDS = Histogram(":tensorflow:serving:model_load_seconds", "Time to load (and warm up) a version",
                         ["model_name"], registry=REGISTRY, buckets=(.1, .25, .5, 1, 2, 4, 8, 16, 32, 64))
LOAD_FAILURES = Counter(":tensorflow:serving:model_load_failures", "Failed load attempts", ["model_name"],
                        registry=REGISTRY)
LOADED_VERSIONS = Gauge(":tensorflow:serving:loaded_versions", "AVAILABLE versions per model", ["model_name"],
                        registry=REGISTRY)
BATCH_QUEUE_TASKS = Gauge("model_server_batch_queue_tasks", "Requests waiting in the batch queues of a model",
                          ["model_name"], registry=REGISTRY)
BATCH_RUNNING = Gauge("model_server_batch_running", "Batches of a model executing now", ["model_name"],
                      registry=REGISTRY)
