"""Each version is sent the photo at its own input size (224 for MobileNet and EfficientNet-Lite0, 240 for Lite1, 260
for Lite2), as its serving_default signature declares it: a real model server serving a 224 and a 240 version
(training_job/tiny_model.py, ``image_size``) behind a real gateway, by number, by version label, routed and as a
shadow."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tests.model_server_harness import MODEL, wait_until
from tests.gateway_harness import gateway_stack
from tests.test_gateway import TOKEN, GatewayProcess, set_routing, wait_for_routing
from tests.support import NOT_MUSHROOMS
from training_job.preprocessing import preprocess_bytes
from training_job.publish import publish_dir
from training_job.tiny_model import write_tiny_model

SIZES = {1: 224, 2: 240}  # version -> input size
PHOTOS = sorted(NOT_MUSHROOMS.iterdir())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    registry = tmp_path_factory.mktemp("registry")
    for version, size in SIZES.items():
        published, _ = publish_dir(lambda d, s=size, b=float(version): write_tiny_model(d, bias=b, image_size=s),
                                   registry, MODEL)
        assert published == version
    with gateway_stack(registry, SIZES, lambda server, redis: GatewayProcess(server, redis, registry / MODEL),
                       labels={"wide": 2}) as parts:
        yield {"registry": registry, "gateway": parts.gateway}


def model_answer(registry, version: int, photo: bytes) -> dict[str, float]:
    """{class: probability} of the SavedModel itself on the contract's pixels at the version's size."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(registry / MODEL / str(version))).signatures["serving_default"]
    outputs = signature(images=tf.constant(preprocess_bytes(photo, SIZES[version])[None]))
    classes = [c.decode() for c in outputs["classes"].numpy()[0]]
    return dict(zip(classes, outputs["probabilities"].numpy()[0].tolist()))


@pytest.mark.parametrize("how", ["version=1", "version=2", "label=wide"])
def test_each_version_answers_the_photo_at_its_own_input_size(stack, how):
    version = 1 if how == "version=1" else 2
    photo = PHOTOS[40].read_bytes()
    for cached in (False, True):  # the miss, then the hit of the same (version, size) cache entry
        status, answer, _ = stack["gateway"].request("POST", f"/v1/classify?top_k=4&{how}", photo, "image/jpeg")
        assert status == 200, answer
        assert answer["model"]["version"] == version
        assert answer["cached"] is (cached and how != "label=wide")  # a version label's answer is never looked up
        expected = model_answer(stack["registry"], version, photo)
        got = {p["label"]: p["score"] for p in answer["predictions"]}
        np.testing.assert_allclose([got[c] for c in expected], list(expected.values()), rtol=1e-5, atol=1e-6)


def test_routed_photos_get_their_versions_sizes(stack):
    gateway = stack["gateway"]
    assert set_routing(gateway, {"1": 50, "2": 50})[0] == 200
    wait_for_routing(gateway, {"1": 50, "2": 50})
    photo = PHOTOS[41].read_bytes()
    expected = {version: model_answer(stack["registry"], version, photo) for version in SIZES}
    answered = Counter()
    for i in range(40):
        status, answer, _ = gateway.classify(photo, client=f"client-{i}", top_k=4)
        assert status == 200, answer
        version = answer["model"]["version"]
        answered[version] += 1
        got = {p["label"]: p["score"] for p in answer["predictions"]}
        np.testing.assert_allclose([got[c] for c in expected[version]], list(expected[version].values()),
                                   rtol=1e-5, atol=1e-6)
    assert set(answered) == {1, 2}, answered


def test_the_shadow_gets_the_photo_at_its_own_size(stack):
    gateway = stack["gateway"]
    assert set_routing(gateway, {"1": 100}, shadow=2)[0] == 200
    wait_for_routing(gateway, {"1": 100}, shadow=2)
    for photo in PHOTOS[42:46]:  # never sent before: misses, mirrored to the 240 shadow
        status, answer, _ = gateway.classify(photo.read_bytes(), client="erin")
        assert status == 200 and answer["model"]["version"] == 1, answer

    def shadowed():
        return gateway.request("GET", "/v1/admin/status", token=TOKEN)[1]["versions"].get("2", {})
    wait_until(lambda: shadowed().get("shadow_requests", 0) >= 4, timeout=15, what="4 shadow answers of version 2")
    set_routing(gateway, {"1": 100})
