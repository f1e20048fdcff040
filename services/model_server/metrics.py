"""Prometheus metrics, named as TF Serving names them where it has a name, and printed as its exporter prints them
(util/prometheus_exporter.cc): a counter under its own name (`:tensorflow:serving:request_count`, not
prometheus_client's `:tensorflow:serving:request_count_total`), and no `_created` series."""
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry()


def exponential_buckets(scale: float, growth_factor: float, count: int) -> tuple[float, ...]:
    """TensorFlow's ``monitoring::Buckets::Exponential``: ``count`` upper bounds from ``scale``, each ``growth_factor``
    times the last (computed as TF does, by repeated multiplication), then +Inf."""
    bounds, bound = [], float(scale)
    for _ in range(count):
        bounds.append(bound)
        bound *= growth_factor
    return (*bounds, float("inf"))


# TF Serving's latencies are microseconds, in the buckets of servables/tensorflow/util.cc
LATENCY_MICROSECONDS_BUCKETS = exponential_buckets(10, 1.8, 33)
RUNTIME_LABEL = "TF1"  # the runtime label TF Serving gives every model run outside TFRT (TFLite's included)

# TF Serving's labels (RecordModelRequestCount): one series per model and status code, whatever versions come and go
REQUEST_COUNT = Counter(":tensorflow:serving:request_count", "The total number of requests.",
                        ["model_name", "status"], registry=REGISTRY)
REQUEST_LATENCY = Histogram(":tensorflow:serving:request_latency",
                            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
                            ["model_name", "API", "entrypoint"], registry=REGISTRY,
                            buckets=LATENCY_MICROSECONDS_BUCKETS)
RUNTIME_LATENCY = Histogram(":tensorflow:serving:runtime_latency",
                            "Distribution of wall time (in microseconds) for Tensorflow runtime.",
                            ["model_name", "API", "runtime"], registry=REGISTRY, buckets=LATENCY_MICROSECONDS_BUCKETS)
QUEUING_LATENCY = Histogram(":tensorflow:serving:batching_session:queuing_latency",
                            "Distribution of wall time spent (in microseconds) in queuing", ["thread_pool_name"],
                            registry=REGISTRY, buckets=exponential_buckets(100, 1.2, 52))
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


def observe_request(model_name: str, api: str, entrypoint: str, started: float) -> None:
    """A request answered OK, as TF Serving records it (RecordRequestLatency): microseconds since ``started``
    (``time.perf_counter()``), by model, API (``Predict``/``Classify``/``Regress`` over gRPC, the URL's verb over REST)
    and entrypoint (``GRPC``/``REST``). Failed requests are counted in REQUEST_COUNT only, as there."""
    REQUEST_LATENCY.labels(model_name=model_name, API=api, entrypoint=entrypoint).observe(
        (time.perf_counter() - started) * 1e6)


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The Prometheus text format of ``registry`` as TF Serving's exporter writes it: `# TYPE name counter` followed
    by `name{labels} value` (prometheus_client's generate_latest would write `name_total`), histograms as
    `_bucket`/`_sum`/`_count`, each bucket's bound as absl::StrCat writes a double (``tf_serving_bound``); the
    `_created` timestamps prometheus_client keeps are left out."""
    lines = []
    for metric in registry.collect():
        help_text = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        lines.append(f"# HELP {metric.name} {help_text}")
        lines.append(f"# TYPE {metric.name} {metric.type if metric.type != 'unknown' else 'untyped'}")
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            name = metric.name if metric.type == "counter" and sample.name == metric.name + "_total" else sample.name
            values = sample.labels
            if metric.type == "histogram" and "le" in values:
                values = {**values, "le": tf_serving_bound(float(values["le"]))}
            labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(values.items()))
            lines.append(f"{name}{{{labels}}} {floatToGoString(sample.value)}" if labels
                         else f"{name} {floatToGoString(sample.value)}")
    return ("\n".join(lines) + "\n").encode()


def tf_serving_bound(bound: float) -> str:
    """A histogram bucket's ``le`` as TF Serving's exporter writes it: absl::StrCat of a double, six significant
    digits as printf's %g ("18", "188.957", "1.27482e+06"), and "+Inf" for the last bucket."""
    return "+Inf" if bound == float("inf") else "%.6g" % bound


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
