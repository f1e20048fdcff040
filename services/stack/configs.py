"""Configuration files the stack writes into its run folder: model server config, monitoring config, Prometheus."""
from __future__ import annotations

from pathlib import Path

MONITORING_PATH = "/monitoring/prometheus/metrics"


def write_model_config(path: Path, model_name: str, base_path: Path, num_versions: int = 2) -> None:
    # The two newest versions stay loaded so the gateway has an A/B pair as soon as a second version is published.
    path.write_text(
        f'model_config_list {{ config {{ name: "{model_name}" base_path: "{base_path}" model_platform: "tensorflow" '
        f"model_version_policy {{ latest {{ num_versions: {num_versions} }} }} }} }}\n")


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
