"""The gateway, integrated for real: redis-server, our model server and gateway processes on free loopback ports."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from services.gateway.protos import load
from tests import gateway_harness
from tests.gateway_harness import gateway_stack
from tests.model_server_harness import MODEL, start_server, wait_until
from tests.support import MUSHROOMS, NOT_MUSHROOMS
from training_job.tiny_model import publish_tiny_versions
from training_job.paths import PROJECT_ROOT
from training_job.preprocessing import preprocess_bytes

pb, pb_grpc = load()
TOKEN = "test-admin-token"
PHOTOS = sorted(p for d in sorted(MUSHROOMS.iterdir()) for p in sorted(d.iterdir())[:5])


class GatewayProcess(gateway_harness.GatewayProcess):
    """A gateway showing the registry's display names, with the admin token ``token`` (None: none)."""

    def __init__(self, model_server: str, redis_url: str, base_path: Path, token: str | None = TOKEN):
        super().__init__(model_server, redis_url, f"--model-base-path={base_path}",
                         env={"GATEWAY_ADMIN_TOKEN": token or ""})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    registry = tmp_path_factory.mktemp("registry")
    publish_tiny_versions(registry, MODEL)
    with gateway_stack(registry, (1, 2),
                       lambda server, redis: GatewayProcess(server, redis, registry / MODEL)) as parts:
        stack = {"registry": registry, "redis": parts.redis, "server": parts.server,
                 "config": registry / "models.config", "gateway": parts.gateway}
        yield stack
        parts.server = stack["server"]  # the model server restart test replaces it: the one to stop


def in_process_probabilities(registry: Path, version: int, photo: bytes) -> np.ndarray:
    import tensorflow as tf

    signature = tf.saved_model.load(str(registry / MODEL / str(version))).signatures["serving_default"]
    return signature(images=tf.constant(preprocess_bytes(photo)[None]))["probabilities"].numpy()[0]


def set_routing(gateway, weights, shadow=None, token=TOKEN):
    return gateway.request("PUT", "/v1/admin/routing", {"weights": weights, "shadow": shadow}, token=token)


def wait_for_routing(gateway, weights, shadow=None, timeout=10.0):
    """Until GET /v1/admin/routing shows this table in force: these weights and shadow, every entry resolved to a
    version."""
    expected = {"weights": {str(k): float(v) for k, v in weights.items()}, "shadow": shadow}

    def in_force():
        body = gateway.request("GET", "/v1/admin/routing", token=TOKEN)[1]
        return ({"weights": body["weights"], "shadow": body["shadow"]} == expected
                and all(v is not None for v in body["resolved"].values()))
    wait_until(in_force, timeout=timeout, interval=0.05, what=f"routing {expected} in force")


def test_http_and_grpc_give_the_in_process_answer_and_repeats_hit_the_cache(stack):
    gateway = stack["gateway"]
    photo = PHOTOS[0].read_bytes()
    status, first, _ = gateway.classify(photo, top_k=4, version=2)
    assert status == 200, first
    expected = in_process_probabilities(stack["registry"], 2, photo)
    got = {p["label"]: p["score"] for p in first["predictions"]}
    classes = ["amanita_muscaria", "amanita_vaginata", "boletus_edulis", "boletus_erythropus"]
    np.testing.assert_allclose([got[c] for c in classes], expected, rtol=1e-5, atol=1e-6)
    assert first["model"] == {"name": MODEL, "version": 2} and first["cached"] is False

    status, again, _ = gateway.classify(photo, top_k=4, version=2)
    assert again["cached"] is True and again["predictions"] == first["predictions"]

    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        reply = pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(photo=photo, top_k=4, version=2),
                                                         timeout=30)
        assert [p.label for p in reply.predictions] == [p["label"] for p in first["predictions"]]
        np.testing.assert_allclose([p.score for p in reply.predictions], [p["score"] for p in first["predictions"]],
                                   rtol=1e-6)
        assert reply.cached and reply.model_version == 2
        frames = [pb.ClassifyRequest(photo=p.read_bytes(), version=1) for p in PHOTOS[:2]]
        frames.insert(1, pb.ClassifyRequest(photo=b"not a photo", version=1))
        stream = list(pb_grpc.ClassifierStub(channel).ClassifyStream(iter(frames), timeout=60))
        assert [r.model_version for r in stream] == [1, 0, 1]
        assert stream[1].error.code == "not_an_image"
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(photo=b"", top_k=1), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        listed = pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
        assert {v.version for v in listed.versions} >= {1, 2}
    metrics = urllib.request.urlopen(gateway.url + "/metrics").read().decode()
    assert 'mushroom_gateway_request_seconds_count{cache="hit",endpoint="classify",model_version="2"' in metrics


def test_a_cached_answer_nobody_can_read_is_a_miss_and_the_answer_replaces_it(stack):
    """An entry under an answer's key that is not an answer (damaged, or written by another release under the same
    key) is a miss, counted as ``unreadable``, not a 500 for that photo until it expires."""
    import hashlib

    import redis as redis_lib

    gateway = stack["gateway"]
    photo = PHOTOS[4].read_bytes() + b"unreadable-cache-entry"  # bytes no other test sends
    status, first, _ = gateway.classify(photo, version=1)
    assert status == 200, first
    client = redis_lib.Redis.from_url(stack["redis"].url)
    [key] = wait_until(lambda: list(client.scan_iter(f"*{hashlib.sha256(photo).hexdigest()}*")), what="cached")
    written = client.get(key)
    answer = json.loads(written)
    for damaged in (b"garbage", b"[1, 2]", json.dumps({"version": 1}),
                    json.dumps({**answer, "probabilities": answer["probabilities"][:2]})):
        client.set(key, damaged, keepttl=True)
        unreadable = cache_lookups(gateway, "unreadable")
        status, again, _ = gateway.classify(photo, version=1)
        assert status == 200 and again["cached"] is False, (damaged, again)
        assert again["predictions"] == first["predictions"]
        assert cache_lookups(gateway, "unreadable") == unreadable + 1
        wait_until(lambda: client.get(key) == written, what="the entry replaced by the answer")
    assert gateway.classify(photo, version=1)[1]["cached"] is True


def stage_counts(gateway) -> dict[str, float]:
    """{stage: count} of mushroom_gateway_stage_seconds (route, lookup, preprocess, predict, store, answer)."""
    return {stage: gateway.metric("mushroom_gateway_stage_seconds_count", stage=stage)
            for stage in ("route", "lookup", "preprocess", "predict", "store", "answer")}


def test_a_miss_goes_through_every_stage_and_a_hit_skips_preprocess_predict_and_store(stack):
    """The request stages, each timed in one histogram family by stage: a miss runs route -> lookup -> preprocess ->
    predict -> store -> answer; the same photo again is found by the lookup and answered without the model."""
    gateway = stack["gateway"]
    photo = sorted(NOT_MUSHROOMS.iterdir())[30].read_bytes()  # never sent before: a miss
    before = stage_counts(gateway)
    status, miss, _ = gateway.classify(photo, version=1)
    assert status == 200 and not miss["cached"], miss
    after_miss = wait_until(lambda: (counts := stage_counts(gateway)).get("store", 0) > before.get("store", 0)
                            and counts, timeout=10, what="the miss's answer stored")
    ran = {stage: after_miss.get(stage, 0) - before.get(stage, 0) for stage in after_miss}
    assert ran == {"route": 1, "lookup": 1, "preprocess": 1, "predict": 1, "store": 1, "answer": 1}, ran
    status, hit, _ = gateway.classify(photo, version=1)
    assert status == 200 and hit["cached"], hit
    counts = stage_counts(gateway)
    ran = {stage: counts[stage] - after_miss[stage] for stage in counts}
    assert ran == {"route": 1, "lookup": 1, "preprocess": 0, "predict": 0, "store": 0, "answer": 1}, ran


def test_split_converges_sticky_clients_stay_and_a_second_gateway_follows(stack):
    gateway = stack["gateway"]
    assert set_routing(gateway, {"1": 70, "2": 30})[0] == 200
    wait_for_routing(gateway, {"1": 70, "2": 30})
    photo = PHOTOS[1].read_bytes()
    counts = Counter(gateway.classify(photo, client=f"client-{i}")[1]["model"]["version"] for i in range(300))
    assert abs(counts[1] / 300 - 0.7) < 0.08, counts  # 300 clients: binomial sd ~0.026, tolerance ~3 sd
    sticky = {gateway.classify(photo, client="alice")[1]["model"]["version"] for _ in range(10)}
    assert len(sticky) == 1

    second = GatewayProcess(stack["server"].grpc_target, stack["redis"].url, stack["registry"] / MODEL)
    try:
        assert set_routing(gateway, {"2": 100})[0] == 200
        wait_until(lambda: second.classify(photo, client="bob")[1]["model"]["version"] == 2, timeout=3,
                   interval=0.1, what="the second gateway to follow the change")
    finally:
        second.stop()
    status, audit, _ = gateway.request("GET", "/v1/admin/audit", token=TOKEN)
    assert audit["entries"][0]["new"]["weights"] == {"2": 100.0}
    assert audit["entries"][0]["old"]["weights"] == {"1": 70.0, "2": 30.0}


def test_admin_needs_the_token_and_refuses_unavailable_versions(stack):
    gateway = stack["gateway"]
    assert set_routing(gateway, {"1": 100}, token=None)[0] == 401
    assert set_routing(gateway, {"1": 100}, token="wrong")[0] == 401
    status, body, _ = set_routing(gateway, {"9": 100})
    assert status == 400 and "not AVAILABLE" in body["error"]["message"]
    status, body, _ = gateway.request("GET", "/v1/admin/status", token="wrong")
    assert status == 401


def test_feedback_changes_accuracy(stack):
    gateway = stack["gateway"]
    assert set_routing(gateway, {"1": 100})[0] == 200
    wait_for_routing(gateway, {"1": 100})
    status, answer, _ = gateway.classify(PHOTOS[2].read_bytes(), client="carol")
    predicted = answer["predictions"][0]["label"]
    feedback = {"feedback_token": answer["feedback_token"], "true_label": predicted}
    assert gateway.request("POST", "/v1/feedback", feedback)[0] == 200
    status, answer2, _ = gateway.classify(PHOTOS[3].read_bytes(), client="carol")
    wrong = "amanita_vaginata" if answer2["predictions"][0]["label"] != "amanita_vaginata" else "boletus_edulis"
    assert gateway.request("POST", "/v1/feedback", {"feedback_token": answer2["feedback_token"],
                                                    "true_label": wrong})[0] == 200
    status, summary, _ = gateway.request("GET", "/v1/admin/status", token=TOKEN)
    assert summary["versions"]["1"]["feedback"] == {"correct": 1, "total": 2}
    assert summary["versions"]["1"]["feedback_accuracy"] == 0.5
    status, again, _ = gateway.request("POST", "/v1/feedback", feedback)  # the same again (a retry): as recorded
    assert status == 200 and again["correct"] and again["true_label"] == predicted
    assert gateway.request("POST", "/v1/feedback", {**feedback, "true_label": wrong})[0] == 409  # once per answer
    status, summary, _ = gateway.request("GET", "/v1/admin/status", token=TOKEN)
    assert summary["versions"]["1"]["feedback"] == {"correct": 1, "total": 2}
    assert gateway.request("POST", "/v1/feedback", {"feedback_token": "nope", "true_label": "x"})[0] == 400


def _png(mode, size=(64, 48), **save):
    buffer = io.BytesIO()
    colour = {"I;16": 40000, "L": 128, "P": 3, "RGBA": (200, 10, 10, 128), "CMYK": (0, 100, 200, 10),
              "LA": (100, 50)}.get(mode, (10, 200, 30))
    Image.new(mode, size, colour).save(buffer, **save)
    return buffer.getvalue()


def _rotated_jpeg():
    buffer = io.BytesIO()
    image = Image.open(PHOTOS[4])
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def _animated_gif():
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _bomb():
    buffer = io.BytesIO()
    Image.new("1", (40000, 40000)).save(buffer, "PNG")
    return buffer.getvalue()


GOOD = {
    "16-bit PNG": lambda: _png("I;16", format="PNG"),
    "CMYK JPEG": lambda: _png("CMYK", format="JPEG"),
    "palette PNG": lambda: _png("P", format="PNG"),
    "alpha PNG": lambda: _png("RGBA", format="PNG"),
    "grayscale": lambda: _png("L", format="JPEG"),
    "EXIF-rotated": _rotated_jpeg,
    "animated GIF": _animated_gif,
    "WEBP": lambda: _png("RGB", format="WEBP"),
}
BAD = {
    "empty body": (lambda: b"", "image/jpeg", 400),
    "not an image": (lambda: b"hello, I am text" * 20, "image/jpeg", 400),
    "HTML page": (lambda: b"<!DOCTYPE html><html><body>404</body></html>", "text/html", 400),
    "truncated JPEG": (lambda: PHOTOS[0].read_bytes()[:3000], "image/jpeg", 400),
    "pixel bomb": (_bomb, "image/png", 400),
    "body over the limit": (lambda: b"\xff" * (21 * 1024 * 1024), "image/jpeg", 413),
    "bad base64": (lambda: json.dumps({"image_b64": "@@not base64@@"}).encode(), "application/json", 400),
    "bad JSON": (lambda: b"{not json", "application/json", 400),
}


@pytest.mark.parametrize("name", GOOD)
def test_odd_but_valid_photos_are_classified(stack, name):
    status, body, _ = stack["gateway"].request("POST", "/v1/classify?version=1", GOOD[name](), "image/png")
    assert status == 200, body
    assert len(body["predictions"]) == 3


def _rgba_png_of_a_real_photo():
    """A real photo with a transparent border and a half-transparent band: alpha is flattened over white."""
    image = Image.open(PHOTOS[6]).convert("RGBA")
    alpha = np.full(image.size[::-1], 255, np.uint8)
    alpha[: alpha.shape[0] // 5] = 0
    alpha[:, : alpha.shape[1] // 3] = 128
    image.putalpha(Image.fromarray(alpha))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("make", [_rotated_jpeg, _rgba_png_of_a_real_photo], ids=["EXIF-rotated", "RGBA"])
def test_the_gateway_answers_what_the_model_says_on_the_contracts_pixels(stack, make):
    """The one preprocessing contract, end to end on real photos: the gateway's answer is the SavedModel's answer on
    preprocess_bytes' pixels, and those pixels differ from the naive decode (rotation / alpha really applied)."""
    photo = make()
    contract = preprocess_bytes(photo)
    naive = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB").resize((224, 224), Image.BILINEAR))
    assert np.abs(contract.astype(int) - naive).mean() > 10, "the test photo must exercise the rotation / alpha"
    status, answer, _ = stack["gateway"].classify(photo, top_k=4, version=1)
    assert status == 200, answer
    expected = in_process_probabilities(stack["registry"], 1, photo)
    got = {p["label"]: p["score"] for p in answer["predictions"]}
    classes = ["amanita_muscaria", "amanita_vaginata", "boletus_edulis", "boletus_erythropus"]
    np.testing.assert_allclose([got[c] for c in classes], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gets_a_clear_4xx(stack, name):
    make, content_type, expected = BAD[name]
    status, body, _ = stack["gateway"].request("POST", "/v1/classify", make(), content_type)
    assert status == expected, body
    assert body["error"]["code"] and body["error"]["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/octet-stream"])
def test_a_json_body_sent_without_its_content_type_is_told_which_to_send(stack, content_type):
    """requests.post(url, data=json.dumps(...)) sends no Content-Type (curl -d sends a form's): the 400 says what
    the body looks like and which Content-Type to send it with."""
    body = json.dumps({"image_b64": base64.b64encode(PHOTOS[0].read_bytes()).decode()}).encode()
    status, answer, _ = stack["gateway"].request("POST", "/v1/classify", body, content_type)
    assert status == 400 and answer["error"]["code"] == "not_an_image", answer
    assert "Content-Type: application/json" in answer["error"]["message"], answer


@pytest.mark.parametrize("query, status", [("version=99", 404), ("label=nope", 404), ("top_k=0", 400),
                                           ("top_k=5", 400), ("top_k=abc", 400)])
def test_bad_parameters(stack, query, status):
    code, body, _ = stack["gateway"].request("POST", f"/v1/classify?{query}", PHOTOS[0].read_bytes(), "image/jpeg")
    assert code == status, body


def test_multipart_and_base64_uploads(stack):
    gateway = stack["gateway"]
    photo = PHOTOS[5].read_bytes()
    b64 = gateway.request("POST", "/v1/classify?version=1", {"image_b64": base64.b64encode(photo).decode()})
    boundary = "xyzBOUNDARY"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    multipart = gateway.request("POST", "/v1/classify?version=1", form, f"multipart/form-data; boundary={boundary}")
    # what a browser's FileReader.readAsDataURL gives: the base64 behind a data: URL's header
    data_url = gateway.request("POST", "/v1/classify?version=1",
                               {"image_b64": "data:image/jpeg;base64," + base64.b64encode(photo).decode()})
    # MIME's base64, in lines of 76 characters (Python's base64.encodebytes, `base64` without -w0)
    lines = gateway.request("POST", "/v1/classify?version=1", {"image_b64": base64.encodebytes(photo).decode()})
    assert b64[0] == multipart[0] == data_url[0] == lines[0] == 200, (data_url, lines)
    assert b64[1]["predictions"] == multipart[1]["predictions"] == data_url[1]["predictions"] == \
        lines[1]["predictions"]
    url_safe = gateway.request("POST", "/v1/classify", {"image_b64": base64.urlsafe_b64encode(photo).decode()})
    assert (url_safe[0], url_safe[1]["error"]["code"]) == (400, "bad_base64")
    assert "standard base64" in url_safe[1]["error"]["message"]


def cache_lookups(gateway, outcome: str) -> float:
    """The gateway's mushroom_gateway_cache_total{outcome=...} (hit, miss, unreadable, error, bypass)."""
    return gateway.metric("mushroom_gateway_cache_total", outcome=outcome)


def test_redis_killed_under_load_loses_no_request(stack):
    gateway, redis = stack["gateway"], stack["redis"]
    failures, done = [], []
    stop = threading.Event()

    def load(offset):
        i = offset
        while not stop.is_set():
            status, body, _ = gateway.classify(PHOTOS[i % len(PHOTOS)].read_bytes(), version=1)
            (done if status == 200 else failures).append((status, body))
            i += 1

    bypassed = cache_lookups(gateway, "bypass")
    threads = [threading.Thread(target=load, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(done) >= 5, timeout=30, interval=0.05, what="answers before the kill")
        redis.stop()
        wait_until(lambda: cache_lookups(gateway, "bypass") > bypassed, timeout=30, interval=0.1,
                   what="the breaker to open (lookups bypass the cache)")
        answered_while_open = len(done)
        wait_until(lambda: len(done) >= answered_while_open + 5, timeout=30, interval=0.05,
                   what="answers while Redis is down")
        redis.start()
        hits = cache_lookups(gateway, "hit")
        wait_until(lambda: cache_lookups(gateway, "hit") > hits, timeout=30, interval=0.1,
                   what="the breaker to close again (cache hits)")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [] and len(done) > 10
    photo = PHOTOS[6].read_bytes()
    gateway.classify(photo, version=1)
    wait_until(lambda: gateway.classify(photo, version=1)[1]["cached"], timeout=10, what="the cache to come back")


def test_model_server_restart_gives_503_then_recovers(stack):
    gateway, server = stack["gateway"], stack["server"]
    photo = sorted(NOT_MUSHROOMS.iterdir())[5].read_bytes()  # never sent before: no cached answer
    server.process.terminate()
    server.process.wait(30)
    status, body, headers = gateway.classify(photo, version=1, top_k=1)
    assert status == 503 and "Retry-After" in headers, body
    port = int(server.grpc_target.rsplit(":", 1)[1])
    restarted = start_server(stack["registry"], stack["config"], f"--port={port}")
    stack["server"] = restarted
    wait_until(lambda: gateway.classify(photo, version=1, top_k=1)[0] == 200, timeout=60, what="recovery")


def openapi_validator(spec: dict, schema: str):
    """A JSON Schema 2020-12 validator for one of the OpenAPI document's component schemas (OpenAPI 3.1)."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    registry = Registry().with_resource("urn:openapi", Resource(contents=spec, specification=DRAFT202012))
    return Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{schema}"}, registry=registry)


def assert_valid(spec: dict, schema: str, document) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in openapi_validator(spec, schema).iter_errors(document)]
    assert not errors, (schema, document, errors)


def test_openapi_and_models(stack):
    from jsonschema import Draft202012Validator

    gateway = stack["gateway"]
    status, spec, _ = gateway.request("GET", "/openapi.json")
    assert status == 200 and "/v1/classify" in spec["paths"]
    status, models, _ = gateway.request("GET", "/v1/models")
    assert {v["version"] for v in models["models"][0]["versions"]} >= {1, 2}
    assert models["models"][0]["versions"][0]["labels"][0] == {"label": "amanita_muscaria",
                                                                "display_name": "Fly agaric"}
    # The routing schema: entries are version numbers or version labels (TF Serving's rule), shadow either or null.
    assert spec["openapi"].startswith("3.1")
    for schema in spec["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    routing = openapi_validator(spec, "Routing")
    for table in [{"weights": {"stable": 90, "canary": 10}, "shadow": "canary"}, {"weights": {"1": 90}, "shadow": 3},
                  {"weights": {"1": 80, "canary_2": 20}, "shadow": None}, {"weights": {}}]:
        assert routing.is_valid(table), table
    for table in [{"weights": {"canary-b": 1}}, {"weights": {"can ary": 1}}, {"weights": {"1": -1}},
                  {"weights": {"1": "heavy"}}, {"weights": {"1": 1}, "shadow": 1.5},
                  {"weights": {"1": 1}, "shadow": "canary-b"}]:
        assert not routing.is_valid(table), table
    put = spec["paths"]["/v1/admin/routing"]["put"]
    for example in put["requestBody"]["content"]["application/json"]["examples"].values():
        assert_valid(spec, "RoutingUpdate", example["value"])
    # The gateway's answers match their schemas, resolved and effective included.
    before = gateway.request("GET", "/v1/admin/routing", token=TOKEN)[1]
    assert set_routing(gateway, {"1": 60, "2": 40}, shadow=2)[0] == 200
    assert_valid(spec, "Models", gateway.request("GET", "/v1/models")[1])
    status, body, _ = gateway.request("GET", "/v1/admin/routing", token=TOKEN)
    assert_valid(spec, "RoutingAdmin", body)
    assert body["resolved"] == {"1": 1, "2": 2} and body["effective"] == {"1": 60.0, "2": 40.0}
    assert_valid(spec, "Status", gateway.request("GET", "/v1/admin/status", token=TOKEN)[1])
    status, applied, _ = set_routing(gateway, {"1": 50, "2": 50})
    assert status == 200
    assert_valid(spec, "RoutingApplied", applied)
    ok = spec["paths"]["/v1/admin/routing"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/RoutingAdmin"}
    restore = ({"weights": before["weights"], "shadow": before["shadow"]} if before["weights"]
               else {"clear": True})  # as the other tests left it
    assert gateway.request("PUT", "/v1/admin/routing", restore, token=TOKEN)[0] == 200


def test_not_a_mushroom_answer_is_reported(stack):
    status, body, _ = stack["gateway"].classify(sorted(NOT_MUSHROOMS.iterdir())[0].read_bytes(), version=1)
    assert status == 200 and isinstance(body["not_a_mushroom"], bool)


def test_client_cli_prints_labels_like_label_image(stack):
    result = subprocess.run([sys.executable, "-m", "services.gateway.client", str(PHOTOS[0]), "--url",
                             stack["gateway"].url, "--top_k", "2"], capture_output=True, text=True, cwd=PROJECT_ROOT,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all("(score = " in line for line in lines[:2])
    assert "evaluation time" in lines[2]


def test_admin_cli_sets_weights_and_shows_status_and_audit(stack):
    url = stack["gateway"].url
    env = {**os.environ, "GATEWAY_ADMIN_TOKEN": TOKEN}

    def admin(*args):
        return subprocess.run([sys.executable, "-m", "services.gateway.operator_cli", "--url", url, *args],
                              capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=60)

    result = admin("set", "1=60", "2=40")
    assert result.returncode == 0, result.stderr
    assert stack["gateway"].request("GET", "/v1/admin/routing", token=TOKEN)[1]["weights"] == {"1": 60.0, "2": 40.0}
    shown = admin("status").stdout
    assert "version" in shown and "miss p95" in shown  # the latency a rollout judges, beside every answer's
    identity = next(v["identity"] for v in stack["gateway"].request("GET", "/v1/models").body["models"][0]["versions"]
                    if v["version"] == 1)
    assert any(line.split()[:2] == ["1", identity] for line in shown.splitlines())  # the model the figures are of
    assert "{'1': 60.0, '2': 40.0}" in admin("audit").stdout.splitlines()[0]
    refused = subprocess.run([sys.executable, "-m", "services.gateway.operator_cli", "--url", url, "--token", "wrong",
                              "set", "1=100"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert refused.returncode != 0 and "401" in refused.stderr


def test_shadow_version_is_mirrored_with_agreement_and_latency(stack):
    gateway = stack["gateway"]
    assert set_routing(gateway, {"1": 100}, shadow=2)[0] == 200
    wait_for_routing(gateway, {"1": 100}, shadow=2)
    for photo in sorted(NOT_MUSHROOMS.iterdir())[10:14]:  # never sent before: cache misses reach the model server
        status, answer, _ = gateway.classify(photo.read_bytes(), client="dave")
        assert status == 200 and answer["model"]["version"] == 1
    def shadowed():
        return gateway.request("GET", "/v1/admin/status", token=TOKEN)[1]["versions"].get("2", {})
    wait_until(lambda: shadowed().get("shadow_requests", 0) >= 4, timeout=10, what="4 shadow calls")
    row = shadowed()
    assert 0.0 <= row["shadow_agreement"] <= 1.0 and row["shadow_p50_ms"] > 0
    set_routing(gateway, {"1": 100})
