"""What a gateway keeps of the versions that left the model server: a gateway lives through many versions (a nightly
retrain publishes one a night, the model server unloads the one before), so what it holds per version must go with
the version, or its /metrics and memory grow by a version's worth every night. A real model server, Redis and
gateway: the metric series and figures of a version that left stay for ``--forget-versions-after`` (Prometheus
scrapes their last counts), then go; a version that comes back is counted afresh."""
from __future__ import annotations

import shutil

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway import metrics
from services.gateway.stats import Stats
from tests.gateway_harness import GatewayProcess, gateway_stack
from tests.model_server_harness import MODEL, wait_until
from tests.support import NOT_MUSHROOMS
from tests.test_gateway import TOKEN
from training_job.publish import publish_dir
from training_job.tiny_model import write_tiny_model

PHOTOS = sorted(NOT_MUSHROOMS.iterdir())
FORGET_AFTER_SECONDS = 5


@pytest.fixture
def stack(tmp_path):
    registry = tmp_path / "registry"
    for bias in (0.0, 2.0):
        publish_dir(lambda d, b=bias: write_tiny_model(d, bias=b), registry, MODEL)
    with gateway_stack(registry, (1, 2), lambda server, redis: GatewayProcess(
            server, redis, f"--forget-versions-after={FORGET_AFTER_SECONDS}",
            env={"GATEWAY_ADMIN_TOKEN": TOKEN})) as parts:
        yield parts


def versions_in_metrics(gateway) -> set[str]:
    """The version numbers in the model_version label of /metrics samples ("other" left out)."""
    text = gateway.request("GET", "/metrics").body
    return {sample.labels["model_version"] for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.labels.get("model_version", "other") != "other"}


def status(gateway) -> dict:
    return gateway.request("GET", "/v1/admin/status", token=TOKEN).body


def answer_on_each_version_with_feedback(gateway) -> None:
    for version in (1, 2):
        for photo in PHOTOS[:2]:
            status_code, answer, _ = gateway.classify(photo.read_bytes(), version=version)
            assert status_code == 200, answer
            reply = gateway.request("POST", "/v1/feedback", {"feedback_token": answer["feedback_token"],
                                                              "true_label": answer["predictions"][0]["label"]})
            assert reply.status == 200, reply.body


def test_a_version_that_left_loses_its_series_and_figures_after_the_grace_and_is_counted_afresh_back(stack):
    gateway, registry = stack.gateway, stack.registry
    answer_on_each_version_with_feedback(gateway)
    assert set(status(gateway)["versions"]) == {"1", "2"}  # and the feedback accuracy of each exported
    assert status(gateway)["significance"]["versions"] in ([1, 2], [2, 1])
    assert versions_in_metrics(gateway) == {"1", "2"}
    kept = registry.parent / "version-1"
    shutil.move(registry / MODEL / "1", kept)
    wait_until(lambda: gateway.classify(PHOTOS[3].read_bytes(), version=1)[0] == 404, timeout=30,
               what="version 1 gone")
    assert "1" in versions_in_metrics(gateway)  # its last counts, for Prometheus to scrape
    wait_until(lambda: "1" not in versions_in_metrics(gateway), timeout=FORGET_AFTER_SECONDS + 10,
               what="version 1's series gone")
    shown = status(gateway)  # its feedback, kept in Redis, no longer shown nor exported, nor in the z-test
    assert set(shown["versions"]) == {"2"} and shown["significance"] is None
    assert versions_in_metrics(gateway) == {"2"}

    shutil.move(kept, registry / MODEL / "1")  # back: counted from nothing, in fresh series
    wait_until(lambda: gateway.classify(PHOTOS[3].read_bytes(), version=1)[0] == 200, timeout=30,
               what="version 1 back")
    assert gateway.metric("mushroom_gateway_request_seconds_count", model_version="1") == 1
    assert status(gateway)["versions"]["1"]["requests"] == 1
    assert status(gateway)["versions"]["1"]["feedback"] == {"correct": 2, "total": 2}  # the same model's tally


def observe_miss(version: str) -> None:
    metrics.child(metrics.REQUEST_SECONDS, protocol="http", endpoint="classify", model_version=version, cache="miss",
                  result="ok").observe(0.01)


def test_keep_drops_a_version_only_once_it_was_away_for_the_whole_grace_and_counts_it_afresh_after():
    stats = Stats(None, MODEL, forget_after=10)
    stats.record(9107, 0.01, cached=False)
    observe_miss("9108")  # a version with series but no figures

    def dropped(routed: set[int], now: float) -> list[int]:  # of these two: the metrics are the process's
        return [version for version in stats.keep(routed, now) if version in (9107, 9108)]

    assert dropped({9107, 9108}, now=0) == []
    assert dropped({9108}, now=1) == []  # 9107 left
    assert dropped({9107, 9108}, now=5) == []  # and came back: its time away starts again when it leaves
    assert dropped(set(), now=6) == []
    assert dropped(set(), now=15.9) == []
    assert dropped(set(), now=16) == [9107, 9108]
    assert not {"9107", "9108"} & metrics.version_values() and 9107 not in stats.versions
    observe_miss("9108")  # a series begun after the drop is exported, from zero
    assert metrics.REGISTRY.get_sample_value("mushroom_gateway_request_seconds_count", {
        "protocol": "http", "endpoint": "classify", "model_version": "9108", "cache": "miss", "result": "ok"}) == 1
    assert "9108" in metrics.version_values()
    metrics.forget_version("9108")
