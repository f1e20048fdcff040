"""A version number given again to another model gets nothing of the old model's: a registry removed and trained
anew publishes from version 1 again (``.last_version`` went with it), while Redis, which outlives a run of the
stack, still holds the old version 1's answers and feedback. A real model server, Redis and gateway: the old model's
answers, class labels and display names are never served for the new one, and the new one's answers are cached in
turn; the old model's feedback, also what arrives after the new one took its number, is never counted as the new
one's."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.gateway_harness import gateway_stack
from tests.model_server_harness import MODEL, start_server, wait_until
from tests.support import NOT_MUSHROOMS
from tests.test_gateway import TOKEN, GatewayProcess, in_process_probabilities
from training_job.publish import LAST_VERSION_NAME, publish_dir
from training_job.tiny_model import LABELS, write_tiny_model

PHOTOS = sorted(NOT_MUSHROOMS.iterdir())
NEW_LABELS = list(reversed(LABELS))  # the new model's columns in another order, so old columns cannot pass for new


@pytest.fixture
def stack(tmp_path):
    registry = tmp_path / "registry"
    assert publish_dir(lambda d: write_tiny_model(d, bias=0.0), registry, MODEL)[0] == 1
    with gateway_stack(registry, (1,), lambda server, redis: GatewayProcess(server, redis, registry / MODEL)) as parts:
        yield parts


def scores(answer: dict) -> dict[str, float]:
    return {p["label"]: p["score"] for p in answer["predictions"]}


def versions_listed(gateway) -> dict[int, dict]:
    return {v["version"]: v for v in gateway.request("GET", "/v1/models").body["models"][0]["versions"]}


def cached_answer(gateway, photo: bytes) -> tuple[dict, str]:
    """The old version 1's answer to ``photo``, now cached, and that version's identity."""
    for cached in (False, True):
        status, answer, _ = gateway.classify(photo, version=1, top_k=4)
        assert status == 200 and answer["cached"] is cached, answer
    return scores(answer), versions_listed(gateway)[1]["identity"]


def empty_the_registry(registry) -> None:
    """As removing the registry does to its version numbers (the next publish is 1 again); the model folder stays,
    as a model server whose base path is gone keeps its versions until it is back (TF Serving's way)."""
    shutil.rmtree(registry / MODEL / "1")
    (registry / MODEL / LAST_VERSION_NAME).unlink()


def publish_another_model(registry) -> None:
    assert publish_dir(lambda d: write_tiny_model(d, bias=3.0, labels=NEW_LABELS), registry, MODEL)[0] == 1


def test_a_version_number_given_to_another_model_is_answered_by_that_model(stack):
    gateway, registry = stack.gateway, stack.registry
    photo = PHOTOS[7].read_bytes()
    old, old_identity = cached_answer(gateway, photo)
    empty_the_registry(registry)
    wait_until(lambda: gateway.classify(photo, version=1)[0] == 404, timeout=30, what="version 1 gone")
    publish_another_model(registry)
    wait_until(lambda: gateway.classify(PHOTOS[8].read_bytes(), version=1)[0] == 200, timeout=30,
               what="the new version 1 served")
    assert_answered_by_the_new_model(gateway, registry, photo, old, old_identity)


def test_a_model_server_restarted_on_another_model_under_the_same_number_answers_from_it(stack):
    """The gateway never saw version 1 leave: the model server was out of reach meanwhile (a pod restarted on a
    new registry), so what it serves afterwards is learnt again."""
    gateway, registry, server = stack.gateway, stack.registry, stack.server
    photo = PHOTOS[9].read_bytes()
    old, old_identity = cached_answer(gateway, photo)
    server.process.terminate()
    server.process.wait(30)
    wait_until(lambda: gateway.request("GET", "/readyz")[0] == 503, timeout=10, what="the gateway to see it gone")
    empty_the_registry(registry)
    publish_another_model(registry)
    stack.server = start_server(registry, registry / "models.config", f"--port={server.grpc_target.rsplit(':', 1)[1]}")
    wait_until(lambda: gateway.request("GET", "/readyz")[0] == 200, timeout=60, what="the model server back")
    assert_answered_by_the_new_model(gateway, registry, photo, old, old_identity)


def assert_answered_by_the_new_model(gateway, registry, photo: bytes, old: dict, old_identity: str) -> None:
    expected = dict(zip(NEW_LABELS, in_process_probabilities(registry, 1, photo).tolist()))
    for cached in (False, True):  # the new model's answer, then its own cache entry
        status, answer, _ = gateway.classify(photo, version=1, top_k=4)
        assert status == 200 and answer["cached"] is cached, answer
        got = scores(answer)
        assert got != pytest.approx(old)
        np.testing.assert_allclose([got[c] for c in NEW_LABELS], [expected[c] for c in NEW_LABELS], rtol=1e-5,
                                   atol=1e-6)
    listed = versions_listed(gateway)[1]
    assert [c["label"] for c in listed["labels"]] == NEW_LABELS
    assert listed["identity"] not in (None, old_identity)


def status_of_version_1(gateway) -> dict:
    return gateway.request("GET", "/v1/admin/status", token=TOKEN).body["versions"].get("1", {})


def feedback_of_version_1(gateway) -> dict:
    return status_of_version_1(gateway).get("feedback")


def give_feedback(gateway, answer: dict, correct: bool) -> dict:
    predicted = answer["predictions"][0]["label"]
    true_label = predicted if correct else next(label for label in LABELS if label != predicted)
    reply = gateway.request("POST", "/v1/feedback", {"feedback_token": answer["feedback_token"],
                                                      "true_label": true_label})
    assert reply.status == 200, reply.body
    return reply.body


def test_figures_and_feedback_of_a_version_number_given_to_another_model_are_the_new_models_own(stack):
    """The new version 1's requests start from its first answer (the gateway's own counts: 404s while version 1 was
    gone count for no version), its feedback from nothing."""
    gateway, registry = stack.gateway, stack.registry
    old_answers = [gateway.classify(photo.read_bytes(), version=1)[1] for photo in PHOTOS[:3]]
    old_identity = versions_listed(gateway)[1]["identity"]
    assert status_of_version_1(gateway)["identity"] == old_identity
    for answer in old_answers[:2]:
        give_feedback(gateway, answer, correct=True)
    assert feedback_of_version_1(gateway) == {"correct": 2, "total": 2}
    empty_the_registry(registry)
    wait_until(lambda: gateway.classify(PHOTOS[4].read_bytes(), version=1)[0] == 404, timeout=30,
               what="version 1 gone")
    publish_another_model(registry)
    wait_until(lambda: gateway.classify(PHOTOS[4].read_bytes(), version=1)[0] == 200, timeout=30,
               what="the new version 1 served")
    figures = status_of_version_1(gateway)
    assert (figures["requests"], figures["feedback"]) == (1, {"correct": 0, "total": 0})
    assert figures["identity"] == versions_listed(gateway)[1]["identity"] != old_identity
    # an answer of the old model, given feedback once the new one holds its number: the old model's
    recorded = give_feedback(gateway, old_answers[2], correct=False)
    assert recorded["version"] == 1 and not recorded["correct"]
    assert feedback_of_version_1(gateway) == {"correct": 0, "total": 0}
    give_feedback(gateway, gateway.classify(PHOTOS[5].read_bytes(), version=1)[1], correct=False)
    assert feedback_of_version_1(gateway) == {"correct": 0, "total": 1}
