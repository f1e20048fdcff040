"""A version the model server serves but the gateway cannot use (published by another tool, or a bug: its
``serving_default`` lacks an output the registry contract names, refuses the contract's input, or answers its probe
images with NaN) is routed around, not answered with a 500 for every request routed to it; a photo a usable version
answers with NaN gets a 502 of its own. A real model server, Redis and gateway."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tests.gateway_harness import gateway_stack
from tests.model_server_harness import MODEL, wait_until
from tests.support import MUSHROOMS
from tests.test_gateway import TOKEN, GatewayProcess
from training_job.publish import publish_dir
from training_job.tiny_model import write_tiny_model

PHOTO = next(p for d in sorted(MUSHROOMS.iterdir()) for p in sorted(d.iterdir())).read_bytes()


class ProbabilitiesOnly(tf.Module):
    """A plain classifier exported by another tool: ``serving_default`` answers probabilities only."""

    def __init__(self):
        super().__init__()
        self.weights = tf.Variable(np.ones((3, 4), np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(self, images):
        colour = tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2])
        return {"probabilities": tf.nn.softmax(tf.matmul(colour, self.weights))}


class OtherInputName(ProbabilitiesOnly):
    """A model whose input is not ``images``: the model server refuses the gateway's requests."""

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="input_1")])
    def serve(self, input_1):
        return {"probabilities": tf.nn.softmax(tf.reduce_mean(tf.cast(input_1, tf.float32), axis=[1, 2]))}


def write(module_class):
    def writer(version_dir):
        module = module_class()
        tf.saved_model.save(module, str(version_dir), signatures={"serving_default": module.serve})
    return writer


@pytest.fixture
def stack(tmp_path):
    registry = tmp_path / "registry"
    publish_dir(lambda d: write_tiny_model(d), registry, MODEL)
    publish_dir(write(ProbabilitiesOnly), registry, MODEL)
    publish_dir(write(OtherInputName), registry, MODEL)
    with gateway_stack(registry, (1, 2, 3), lambda server, redis: GatewayProcess(server, redis, registry / MODEL),
                       labels={"other_input": 3}) as parts:
        yield parts


def listed(gateway) -> dict[int, dict]:
    return {v["version"]: v for v in gateway.request("GET", "/v1/models").body["models"][0]["versions"]}


def test_a_version_that_breaks_the_contract_is_routed_around_and_says_why(stack):
    gateway = stack.gateway
    versions = wait_until(lambda: (v := listed(gateway)) and v[2].get("unusable") and v[3].get("unusable") and v,
                          timeout=30, what="versions 2 and 3 found unusable")
    assert "mushroom_score" in versions[2]["unusable"] and "classes" in versions[2]["unusable"]
    assert "input_1" in versions[3]["unusable"] or "images" in versions[3]["unusable"]
    assert versions[1].get("unusable") is None and versions[1]["identity"]
    # no routing table: the latest usable version answers, not the latest one
    status, answer, _ = gateway.classify(PHOTO)
    assert status == 200 and answer["model"]["version"] == 1, answer
    status, answer, _ = gateway.classify(PHOTO, "version=2")
    assert (status, answer["error"]["code"]) == (502, "version_unusable") and "mushroom_score" in \
        answer["error"]["message"], answer
    status, answer, _ = gateway.classify(PHOTO, "label=other_input")  # a version label naming one
    assert (status, answer["error"]["code"]) == (502, "version_unusable") and "version 3" in \
        answer["error"]["message"], answer
    status, answer = gateway.request("PUT", "/v1/admin/routing", {"weights": {"1": 50, "3": 50}}, token=TOKEN)[:2]
    assert status == 400 and "version 3" in answer["error"]["message"], answer
    ready = gateway.request("GET", "/readyz").body
    assert ready["ready"] and "version 2" in ready["reason"] and "version 3" in ready["reason"], ready
    assert gateway.metric("mushroom_gateway_versions_unusable") == 2


class NotFiniteOnRed(tf.Module):
    """A contract-shaped model with a numerical fault: NaN probabilities for photos that are mostly red (its probes,
    grey, a gradient and noise, get finite answers); ``always`` makes every answer NaN."""

    def __init__(self, always: bool = False):
        super().__init__()
        self.always = always
        self.weights = tf.Variable(np.eye(3, 4, dtype=np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(self, images):
        colour = tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2]) / 255.0
        probabilities = tf.nn.softmax(tf.matmul(colour, self.weights))
        faulty = tf.ones_like(colour[:, 0], tf.bool) if self.always else colour[:, 0] > 0.9
        probabilities = tf.where(faulty[:, None], tf.fill(tf.shape(probabilities), np.nan), probabilities)
        batch = tf.shape(images)[0]
        return {"probabilities": probabilities,
                "classes": tf.tile(tf.constant([["amanita_muscaria", "amanita_vaginata", "boletus_edulis",
                                                 "boletus_erythropus"]]), [batch, 1]),
                "mushroom_score": tf.reduce_max(probabilities, axis=1),
                "not_a_mushroom": tf.zeros_like(faulty)}


def red_photo(shade: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (255, shade, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_not_finite_answer_is_a_502_for_its_photo_only_and_a_version_giving_only_those_is_unusable(tmp_path):
    import threading

    registry = tmp_path / "registry"
    publish_dir(write(NotFiniteOnRed), registry, MODEL)
    publish_dir(write(lambda: NotFiniteOnRed(always=True)), registry, MODEL)
    with gateway_stack(registry, (1, 2), lambda server, redis: GatewayProcess(server, redis, registry / MODEL)) \
            as parts:
        gateway = parts.gateway
        versions = wait_until(lambda: (v := listed(gateway)) and v[2].get("unusable") and v, timeout=30,
                              what="version 2 found unusable")
        assert "not finite" in versions[2]["unusable"] and versions[1].get("unusable") is None
        replies = {}

        def send(name, photo):
            replies[name] = gateway.classify(photo, "version=1")

        for _ in range(2):  # sent together, so that they may share a Predict call; a 502 is not cached
            senders = [threading.Thread(target=send, args=(name, photo)) for name, photo in
                       (("red", red_photo(0)), ("ordinary", PHOTO), ("other red", red_photo(1)))]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()
            for name in ("red", "other red"):
                status, answer, _ = replies[name]
                assert (status, answer["error"]["code"]) == (502, "model_answer_not_finite"), answer
                assert "version 1" in answer["error"]["message"]
            assert replies["ordinary"][0] == 200, replies["ordinary"]
