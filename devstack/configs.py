"""Configuration files the stack writes into its run folder: model server config, monitoring config, Prometheus."""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from services.rollout.serving_config import NEWEST_SERVED, served_versions  # the rule the rollout controller keeps
from training_job import registry

MONITORING_PATH = "/monitoring/prometheus/metrics"


def model_config_text(model_name: str, base_path: Path, versions: Iterable[int] = (),
                      labels: Mapping[str, int] | None = None, newest: int = NEWEST_SERVED) -> str:
    """A ModelServerConfig serving ``versions`` with a ``specific`` policy: under TF Serving's availability-preserving
    policy a ``latest`` policy unloads the oldest version as soon as a newer folder appears (even one that never
    loads), and with it the traffic routed to it; a ``specific`` version is only ever unloaded by removing it from
    this list. With no version yet, ``latest { num_versions: newest }`` so that the first publish is served."""
    versions = sorted(set(versions))
    if versions:
        policy = "specific { " + " ".join(f"versions: {v}" for v in versions) + " }"
    else:
        policy = f"latest {{ num_versions: {newest} }}"
    label_text = "".join(f' version_labels {{ key: "{k}" value: {v} }}' for k, v in sorted((labels or {}).items()))
    return (f'model_config_list {{ config {{ name: "{model_name}" base_path: "{base_path}" '
            f'model_platform: "tensorflow" model_version_policy {{ {policy} }}{label_text} }} }}\n')


def read_model_config(path: Path) -> tuple[str, Path, list[int], dict[str, int]]:
    """(model name, base path, specific versions, labels) of a config written by ``write_model_config``."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    [model] = config.model_config_list.config
    return (model.name, Path(model.base_path), sorted(model.model_version_policy.specific.versions),
            dict(model.version_labels))


def write_model_config(path: Path, model_name: str, base_path: Path, pinned: Iterable[int] = (),
                       labels: Mapping[str, int] | None = None, newest: int = NEWEST_SERVED) -> list[int]:
    """Write (atomically: the model server polls the file) the config serving ``served_versions`` of what is on
    disk under ``base_path``; returns those versions."""
    served = served_versions(registry.versions(base_path), pinned, labels, newest)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(model_config_text(model_name, base_path, served, labels, newest))
    os.replace(staging, path)
    return served


def write_model_list(path: Path, models: Mapping[str, Path], labels: Mapping[str, Mapping[str, int]] | None = None,
                     policy: str = "latest { num_versions: 1 }") -> None:
    """A --model_config_file serving each of ``models`` ({name: base path}) under one version ``policy`` (text of a
    ModelVersionPolicy), with ``labels`` ({name: {label: version}}); for the tests and the benchmarks."""
    parts = []
    for name, base in models.items():
        label_text = "".join(f' version_labels {{ key: "{k}" value: {v} }}'
                             for k, v in (labels or {}).get(name, {}).items())
        parts.append(f'config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" '
                     f'model_version_policy {{ {policy} }}{label_text} }}')
    path.write_text("model_config_list { " + " ".join(parts) + " }\n")


def write_monitoring_config(path: Path) -> None:
    path.write_text(f'prometheus_config {{ enable: true, path: "{MONITORING_PATH}" }}\n')


def write_prometheus_config(path: Path, gateway_http: str, model_server_rest: str, scrape_interval_s: float,
                            rollout_http: str | None = None) -> None:
    interval = f"{scrape_interval_s:g}s"
    rollout_job = f"""  - job_name: rollout
    metrics_path: /metrics
    static_configs:
      - targets: ["{rollout_http}"]
""" if rollout_http else ""
    path.write_text(f"""global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: gateway
    metrics_path: /metrics
    static_configs:
      - targets: ["{gateway_http}"]
  - job_name: model-server
    metrics_path: {MONITORING_PATH}
    static_configs:
      - targets: ["{model_server_rest}"]
{rollout_job}""")
