"""Grad-CAM ("why this answer"): the SavedModel's explain signatures, served by our model server, and the gateway's
``explain`` option."""
from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until, write_config
from training_job.explain import EXPLAIN_BYTES_SIGNATURE, EXPLAIN_SIGNATURE, PREDICTED_CLASS, in_process_grad_cam
from training_job.pipeline import load_run
from training_job.preprocessing import load_image_file, preprocess_bytes
from training_job.train import split_rows

EXPLAIN_OUTPUTS = {"probabilities", "classes", "mushroom_score", "not_a_mushroom", "explained_class", "heatmap",
                   "heatmap_image"}


def _test_photos(run_dir, n=4):
    rows, _, head, _ = load_run(run_dir)
    return split_rows(rows, "test")[:n], head


def _signature_defs(version_dir):
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    return saved.meta_graphs[0].signature_def


def test_explain_signatures_exist_with_an_optional_class_index(published_model):
    defs = _signature_defs(published_model.version_dir)
    pixels, encoded = defs[EXPLAIN_SIGNATURE], defs[EXPLAIN_BYTES_SIGNATURE]
    assert set(pixels.inputs) == {"images", "class_index"} and set(encoded.inputs) == {"image_bytes", "class_index"}
    assert pixels.inputs["images"].dtype == tf.uint8.as_datatype_enum
    assert [d.size for d in pixels.inputs["images"].tensor_shape.dim] == [-1, 224, 224, 3]
    for definition in (pixels, encoded):
        assert definition.method_name == "tensorflow/serving/predict"
        assert set(definition.outputs) == EXPLAIN_OUTPUTS
        assert tf.make_ndarray(definition.defaults["class_index"]).tolist() == [-1]  # TF Serving fills it in
        assert [d.size for d in definition.outputs["heatmap"].tensor_shape.dim] == [-1, 7, 7]
        assert definition.outputs["heatmap_image"].dtype == tf.uint8.as_datatype_enum


def test_explain_matches_in_process_grad_cam(published_model, base_network):
    rows, head = _test_photos(published_model.run_dir, 6)
    pixels = np.stack([load_image_file(r.path) for r in rows])
    loaded = tf.saved_model.load(str(published_model.version_dir))
    explain = loaded.signatures[EXPLAIN_SIGNATURE]
    out = explain(images=tf.constant(pixels), class_index=tf.constant([-1], tf.int32))
    expected, chosen = in_process_grad_cam(base_network, head, pixels)
    np.testing.assert_array_equal(out["explained_class"].numpy(), chosen)
    np.testing.assert_allclose(out["heatmap"].numpy(), expected, atol=1e-4)
    assert out["heatmap"].numpy().max(axis=(1, 2)) == pytest.approx(1.0)  # each map is scaled to peak at 1
    plain = loaded.signatures["serving_default"](images=tf.constant(pixels))
    np.testing.assert_allclose(out["probabilities"].numpy(), plain["probabilities"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(out["not_a_mushroom"].numpy(), plain["not_a_mushroom"].numpy())
    # a class given per photo: every photo explained for the class after its prediction
    wanted = (chosen + 1) % len(head.labels)
    given = explain(images=tf.constant(pixels), class_index=tf.constant(wanted, tf.int32))
    expected_given, _ = in_process_grad_cam(base_network, head, pixels, wanted)
    np.testing.assert_array_equal(given["explained_class"].numpy(), wanted)
    np.testing.assert_allclose(given["heatmap"].numpy(), expected_given, atol=1e-4)
    upsampled = given["heatmap_image"].numpy()
    assert upsampled.shape == (len(pixels), 224, 224) and upsampled.dtype == np.uint8
    with pytest.raises(tf.errors.InvalidArgumentError, match="class_index"):
        explain(images=tf.constant(pixels[:1]), class_index=tf.constant([len(head.labels)], tf.int32))


def test_explain_image_bytes_decodes_like_predict_image_bytes(published_model):
    rows, _ = _test_photos(published_model.run_dir, 3)
    data = tf.constant([open(r.path, "rb").read() for r in rows])
    loaded = tf.saved_model.load(str(published_model.version_dir))
    out = loaded.signatures[EXPLAIN_BYTES_SIGNATURE](image_bytes=data, class_index=tf.constant([-1], tf.int32))
    plain = loaded.signatures["predict_image_bytes"](image_bytes=data)
    np.testing.assert_allclose(out["probabilities"].numpy(), plain["probabilities"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(out["explained_class"].numpy(), plain["probabilities"].numpy().argmax(1))


def test_explain_reads_the_fine_tuned_blocks(published_model, base_network, tmp_path):
    """With --fine_tune_blocks the last convolutional block is the tuned copy: the heatmap must come from it."""
    from training_job.export import build_serving_module, save_model
    from training_job.fine_tune import FineTunedBase, cut_layer_name, tail_layers

    rows, _, head, open_set = load_run(published_model.run_dir)
    layers = tail_layers(base_network.imagenet_model, cut_layer_name(base_network.architecture, 1))
    rng = np.random.default_rng(0)  # tuned weights that differ from the original ones
    weights = {layer.name: [w * rng.uniform(0.5, 1.5, size=w.shape).astype(w.dtype) for w in layer.get_weights()]
               for layer in layers if layer.weights}
    tuned = FineTunedBase(base_network, 1, weights)
    save_model(build_serving_module(tuned, head, open_set), tmp_path / "tuned")
    pixels = np.stack([load_image_file(r.path) for r in split_rows(rows, "test")[:3]])
    out = tf.saved_model.load(str(tmp_path / "tuned")).signatures[EXPLAIN_SIGNATURE](
        images=tf.constant(pixels), class_index=tf.constant([-1], tf.int32))
    expected, chosen = in_process_grad_cam(tuned, head, pixels)
    untuned, _ = in_process_grad_cam(base_network, head, pixels, chosen)
    np.testing.assert_allclose(out["heatmap"].numpy(), expected, atol=1e-4)
    assert np.abs(expected - untuned).max() > 0.05  # the tuned blocks, not the original ones, were explained


def corner_photo(photo_path, corner: str, size: int = 224, tile: int = 96) -> np.ndarray:
    """The photo shrunk to ``tile`` pixels square, pasted into ``corner`` of a plain grey square."""
    photo = Image.fromarray(preprocess_bytes(open(photo_path, "rb").read(), tile))
    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    x = 0 if "left" in corner else size - tile
    y = 0 if "top" in corner else size - tile
    canvas.paste(photo, (x, y))
    return np.asarray(canvas)


def quadrant_mass(heatmap: np.ndarray, corner: str) -> float:
    half = heatmap.shape[0] // 2
    rows = slice(0, half) if "top" in corner else slice(heatmap.shape[0] - half, None)
    cols = slice(0, half) if "left" in corner else slice(heatmap.shape[1] - half, None)
    return float(heatmap[rows, cols].sum() / heatmap.sum())


def test_heatmap_mass_sits_where_the_mushroom_is(published_model):
    rows, _ = _test_photos(published_model.run_dir, 40)
    loaded = tf.saved_model.load(str(published_model.version_dir))
    explain = loaded.signatures[EXPLAIN_SIGNATURE]
    corners = ("top left", "top right", "bottom left", "bottom right")
    photo = next(r for r in rows if r.label == "amanita_muscaria")  # a red cap on grey: unmistakable
    images = np.stack([corner_photo(photo.path, c) for c in corners])
    out = explain(images=tf.constant(images), class_index=tf.constant([-1], tf.int32))
    for corner, upsampled in zip(corners, out["heatmap_image"].numpy().astype(float)):
        # a quarter of the frame holds most of the heat (an even spread would put 0.25 there), and its peak
        peak = np.unravel_index(upsampled.argmax(), upsampled.shape)
        assert quadrant_mass(upsampled, corner) > 0.5, (corner, np.round(upsampled[::32, ::32] / 255, 2))
        assert (peak[0] < 112) == ("top" in corner) and (peak[1] < 112) == ("left" in corner), (corner, peak)


@pytest.fixture(scope="module")
def model_server(published_model, tmp_path_factory):
    config = tmp_path_factory.mktemp("explain-model-server") / "models.config"
    write_config(config, {MODEL: published_model.registry_path / published_model.model_name})
    server = start_server(published_model.registry_path, config)
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(published_model.version, (0,))[0]
                   == ModelVersionStatus.AVAILABLE, what="the published version AVAILABLE")
        yield server
    finally:
        stop_server(server)


def _grpc_explain(server, inputs: dict) -> dict:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = EXPLAIN_BYTES_SIGNATURE
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    with grpc.insecure_channel(server.grpc_target) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def test_model_server_serves_explain_over_grpc_and_rest(published_model, model_server):
    rows, head = _test_photos(published_model.run_dir, 2)
    photos = [open(r.path, "rb").read() for r in rows]
    loaded = tf.saved_model.load(str(published_model.version_dir))
    expected = loaded.signatures[EXPLAIN_BYTES_SIGNATURE](image_bytes=tf.constant(photos),
                                                          class_index=tf.constant([-1], tf.int32))
    # gRPC, class_index left out: the SignatureDef's default (the predicted class) is filled in, as TF Serving does
    answer = _grpc_explain(model_server, {"image_bytes": np.array(photos, dtype=object)})
    assert set(answer) == EXPLAIN_OUTPUTS
    np.testing.assert_allclose(answer["heatmap"], expected["heatmap"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(answer["explained_class"], expected["explained_class"].numpy())
    # gRPC with a class per photo
    wanted = (expected["explained_class"].numpy() + 1) % len(head.labels)
    given = _grpc_explain(model_server, {"image_bytes": np.array(photos, dtype=object),
                                         "class_index": wanted.astype(np.int32)})
    np.testing.assert_array_equal(given["explained_class"], wanted)
    # REST row format, as a plain TF Serving REST client must send it: each instance names every input, the
    # defaulted class_index too (TF Serving's REST API fills in no defaults: json_tensor.cc)
    url = f"{model_server.rest_url}/v1/models/{MODEL}:predict"
    encoded = [{"b64": base64.b64encode(p).decode()} for p in photos]

    def rest(body):
        request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(request, timeout=60)

    with pytest.raises(urllib.error.HTTPError) as refused:
        rest({"signature_name": EXPLAIN_BYTES_SIGNATURE, "instances": [{"image_bytes": e} for e in encoded]})
    assert refused.value.code == 400
    assert "keys must be equal to: class_index,image_bytes" in json.loads(refused.value.read())["error"]
    body = {"signature_name": EXPLAIN_BYTES_SIGNATURE,
            "instances": [{"image_bytes": e, "class_index": PREDICTED_CLASS} for e in encoded]}
    with rest(body) as response:
        predictions = json.loads(response.read())["predictions"]
    assert len(predictions) == 2 and set(predictions[0]) == EXPLAIN_OUTPUTS
    np.testing.assert_allclose(np.array([p["heatmap"] for p in predictions]), expected["heatmap"].numpy(), atol=1e-5)
    assert np.array(predictions[0]["heatmap_image"]).shape == (224, 224)


# ------------------------------------------------------------------------------------------------- the gateway
@pytest.fixture(scope="module")
def gateway(published_model, model_server):
    from tests.support import RedisServer
    from tests.test_gateway import GatewayProcess

    with RedisServer() as redis:
        process = GatewayProcess(model_server.grpc_target, redis.url,
                                 published_model.registry_path / published_model.model_name)
        try:
            yield process
        finally:
            process.stop()


def rotated_photo(path, size=(300, 200)) -> bytes:
    """A real photo stored sideways (300 x 200 pixels) with EXIF orientation 6: displayed 200 x 300."""
    image = Image.open(path).convert("RGB").resize(size)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def _png(encoded: str | bytes) -> Image.Image:
    data = base64.b64decode(encoded) if isinstance(encoded, str) else encoded
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_gateway_explains_with_a_png_of_the_displayed_size(published_model, gateway):
    rows, head = _test_photos(published_model.run_dir, 1)
    photo = rotated_photo(rows[0].path)
    status, answer, _ = gateway.classify(photo, explain=1)
    assert status == 200, answer
    explanation = answer["explanation"]
    assert (explanation["width"], explanation["height"]) == (200, 300)
    overlay = _png(explanation["overlay_png"])
    assert overlay.size == (200, 300) and "transparency" in overlay.info
    assert explanation["label"] == answer["predictions"][0]["label"] == head.labels[explanation["class_index"]]
    heatmap = np.array(explanation["heatmap"])
    assert heatmap.shape == (7, 7) and heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)
    # the same map as the SavedModel's explain signature on the gateway's preprocessing of the photo
    loaded = tf.saved_model.load(str(published_model.version_dir))
    expected = loaded.signatures[EXPLAIN_SIGNATURE](images=tf.constant(preprocess_bytes(photo)[None]),
                                                   class_index=tf.constant([-1], tf.int32))
    np.testing.assert_allclose(heatmap, expected["heatmap"].numpy()[0], atol=1e-5)
    assert not answer["cached"]
    # cached beside the answer: the explanation again, and the plain answer, are hits
    status, again, _ = gateway.classify(photo, explain=1)
    assert status == 200 and again["cached"] and again["explanation"]["heatmap"] == explanation["heatmap"]
    status, plain, _ = gateway.classify(photo)
    assert status == 200 and plain["cached"] and "explanation" not in plain  # off by default


def test_gateway_explains_a_chosen_class_from_json_and_checks_the_options(published_model, gateway):
    rows, head = _test_photos(published_model.run_dir, 2)
    photo = open(rows[1].path, "rb").read()
    encoded = base64.b64encode(photo).decode()
    status, predicted, _ = gateway.request("POST", "/v1/classify", {"image_b64": encoded, "explain": True})
    assert status == 200, predicted
    other = next(label for label in head.labels if label != predicted["explanation"]["label"])
    status, answer, _ = gateway.request("POST", "/v1/classify", {"image_b64": encoded, "explain_class": other})
    assert status == 200, answer
    assert answer["explanation"]["label"] == other and answer["explanation"]["class_index"] == head.labels.index(other)
    assert answer["predictions"][0]["label"] == predicted["predictions"][0]["label"]
    assert answer["explanation"]["heatmap"] != predicted["explanation"]["heatmap"]
    for body, query, code in [({"explain": "yes"}, "", "bad_explain"), ({"explain": True}, "?explain=1", "bad_explain"),
                              ({"explain_class": "no_such_mushroom"}, "", "unknown_class"),
                              ({"explain_class": "a:b*"}, "", "bad_explain_class"),
                              ({}, "?explain=maybe", "bad_explain")]:
        status, error, _ = gateway.request("POST", f"/v1/classify{query}", {"image_b64": encoded, **body})
        assert (status, error["error"]["code"]) == (400, code), (body, query, error)


def test_gateway_explains_over_grpc_and_counts_explain_latency_apart(published_model, gateway):
    from services.gateway.protos import load

    pb, pb_grpc = load()
    rows, _ = _test_photos(published_model.run_dir, 3)
    photo = open(rows[2].path, "rb").read()
    shown = Image.open(io.BytesIO(photo))
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.ClassifierStub(channel)
        plain = stub.Classify(pb.ClassifyRequest(photo=photo), timeout=60)
        assert not plain.HasField("explanation")
        answer = stub.Classify(pb.ClassifyRequest(photo=photo, explain=True), timeout=60)
    explanation = answer.explanation
    assert explanation.label == answer.predictions[0].label and (explanation.rows, explanation.cols) == (7, 7)
    assert len(explanation.heatmap) == 49 and max(explanation.heatmap) == pytest.approx(1.0)
    assert _png(explanation.overlay_png).size == (explanation.width, explanation.height) == shown.size
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    explain_counts = [line for line in text.splitlines() if line.startswith("mushroom_gateway_explain_seconds_count")]
    assert any('protocol="grpc"' in line for line in explain_counts), explain_counts
    plain_grpc = [line for line in text.splitlines() if line.startswith("mushroom_gateway_request_seconds_count")
                  and 'protocol="grpc"' in line]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in plain_grpc) == 1  # the plain call only


@pytest.fixture(scope="module")
def tflite_like_server(published_model, tmp_path_factory):
    """A model server whose version 1 has no explain signature, as a real TF Serving under --prefer_tflite_model
    serves a version from its model.tflite (serving_default only): a tiny model stands in for it."""
    from training_job.publish import publish_dir
    from training_job.tiny_model import write_tiny_model

    registry = tmp_path_factory.mktemp("no-explain-registry")
    version, _ = publish_dir(write_tiny_model, registry, MODEL)
    assert version == published_model.version
    config = registry / "models.config"
    write_config(config, {MODEL: registry / MODEL})
    server = start_server(registry, config)
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(version, (0,))[0]
                   == ModelVersionStatus.AVAILABLE, what="the tiny version AVAILABLE")
        yield server
    finally:
        stop_server(server)


def test_explanations_come_from_the_explain_model_server_when_the_model_server_has_none(
        published_model, model_server, tflite_like_server):
    from tests.gateway_harness import GatewayProcess
    from tests.support import RedisServer

    rows, _ = _test_photos(published_model.run_dir, 1)
    photo = open(rows[0].path, "rb").read()
    with RedisServer() as redis:
        alone = GatewayProcess(tflite_like_server.grpc_target, redis.url)
        try:
            status, plain, _ = alone.classify(photo)
            assert status == 200, plain
            status, refused, _ = alone.classify(photo, explain=1)
            assert status == 501, refused
            assert refused["error"]["code"] == "signature_not_served"
            assert "--explain-model-server" in refused["error"]["message"]
            from services.gateway.protos import load

            pb, pb_grpc = load()
            with grpc.insecure_channel(f"127.0.0.1:{alone.grpc_port}") as channel, \
                    pytest.raises(grpc.RpcError) as over_grpc:
                pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(photo=photo, explain=True), timeout=60)
            assert over_grpc.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            alone.stop()
        helped = GatewayProcess(tflite_like_server.grpc_target, redis.url,
                                f"--explain-model-server={model_server.grpc_target}")
        try:
            status, answer, _ = helped.classify(photo, explain=1)
            assert status == 200, answer
            loaded = tf.saved_model.load(str(published_model.version_dir))
            expected = loaded.signatures[EXPLAIN_SIGNATURE](images=tf.constant(preprocess_bytes(photo)[None]),
                                                           class_index=tf.constant([-1], tf.int32))
            np.testing.assert_allclose(np.array(answer["explanation"]["heatmap"]), expected["heatmap"].numpy()[0],
                                       atol=1e-5)
        finally:
            helped.stop()


def test_an_explain_server_that_has_not_loaded_the_version_yet_is_a_503_and_the_version_stays_routed(
        published_model, model_server, tmp_path_factory):
    """The explain model server loads new versions on its own poll, so it can trail the model server: an explanation
    asked of it for a version it does not have yet is a 503 to retry, not a sign the version is gone (which would
    re-route the request to an older version and drop the new one from the gateway's routing until the next
    status poll)."""
    import shutil

    from tests.gateway_harness import GatewayProcess
    from tests.support import RedisServer

    old, new = published_model.version, published_model.version + 1
    registry = tmp_path_factory.mktemp("ahead-registry")
    for version in (old, new):
        shutil.copytree(published_model.version_dir, registry / MODEL / str(version))
    config = registry / "models.config"
    write_config(config, {MODEL: registry / MODEL}, policy="all {}")
    ahead = start_server(registry, config)  # the explain server (``model_server``) has only ``old``
    rows, _ = _test_photos(published_model.run_dir, 2)
    photos = [open(r.path, "rb").read() for r in rows]
    try:
        wait_until(lambda: {v: s[0] for v, s in version_states(ahead.grpc_target, MODEL).items()}
                   == {old: ModelVersionStatus.AVAILABLE, new: ModelVersionStatus.AVAILABLE},
                   timeout=120, what="both versions AVAILABLE")
        with RedisServer() as redis:
            gateway = GatewayProcess(ahead.grpc_target, redis.url, f"--explain-model-server={model_server.grpc_target}")
            try:
                wait_until(lambda: gateway.classify(photos[0]).body["model"]["version"] == new,
                           what="routed to the new version")
                status, refused, headers = gateway.classify(photos[1], explain=1)
                assert status == 503, refused
                assert refused["error"]["code"] == "explain_version_loading"
                assert f"version {new}" in refused["error"]["message"] and headers["Retry-After"] == "5"
                status, plain, _ = gateway.classify(photos[1])  # the new version still answers
                assert status == 200 and plain["model"]["version"] == new, plain
                assert gateway.metric("mushroom_gateway_rerouted_total") == 0
                status, refused, _ = gateway.classify(photos[1], version=new, explain=1)  # asked by number
                assert status == 503 and refused["error"]["code"] == "explain_version_loading", refused
                status, explained, _ = gateway.classify(photos[1], version=old, explain=1)  # one it has
                assert status == 200 and explained["model"]["version"] == old, explained
                assert explained["explanation"]["heatmap"]
            finally:
                gateway.stop()
    finally:
        stop_server(ahead)


# ------------------------------------------------------------------------------------------- the training report
def test_blend_colours_only_where_the_heat_is():
    from training_job.heatmaps import blend

    photo = Image.new("RGB", (70, 70), (128, 128, 128))
    heatmap = np.zeros((7, 7), np.float32)
    heatmap[0, 0] = 1.0
    drawn = np.asarray(blend(photo, heatmap)).astype(int)
    assert np.abs(drawn[:5, :5] - 128).max() > 40  # the hot cell is coloured
    assert np.abs(drawn[30:, 30:] - 128).max() == 0  # the cold part shows the photo untouched


def test_overlay_png_is_the_heatmap_upsampled_with_transparency_where_cold():
    from training_job.heatmaps import ALPHA, overlay_png

    heatmap = np.random.default_rng(1).random((7, 7)).astype(np.float32)
    drawn = _png(overlay_png(heatmap, (350, 210)))
    assert drawn.size == (350, 210) and drawn.mode == "P"
    levels = np.asarray(drawn)
    exact = np.asarray(Image.fromarray(heatmap, "F").resize((350, 210), Image.BILINEAR)) * 255
    assert np.abs(levels - exact).max() <= 1.5  # the palette index is the heat level (8-bit resize: within 1.5)
    assert ALPHA[0] == 0 and ALPHA[255] == 255 and np.all(np.diff(ALPHA.astype(int)) >= 0)


def test_evaluate_writes_a_contact_sheet_of_the_misclassified_photos(published_model):
    import csv

    from training_job.evaluate import MISCLASSIFIED_SHEET, SHEET_LIMIT

    in_run = published_model.run_dir / MISCLASSIFIED_SHEET
    published = published_model.version_dir / "assets.extra" / MISCLASSIFIED_SHEET
    assert in_run.read_bytes() == published.read_bytes()
    with open(published_model.run_dir / "misclassified.csv", newline="") as f:
        wrong = list(csv.DictReader(f))
    assert wrong, "the small test model gets some test photos wrong; the sheet needs them"
    sheet = _png(published.read_bytes())
    rows_of_entries = -(-min(len(wrong), SHEET_LIMIT) // 2)
    assert sheet.size == (2 * (3 * 168 + 8), rows_of_entries * (160 + 30 + 8))  # 2 columns of photo + 2 heatmaps
    first_photo = np.asarray(sheet.convert("RGB"))[30:190, 8:168].astype(int)
    first_heatmap = np.asarray(sheet.convert("RGB"))[30:190, 176:336].astype(int)
    # a heatmap is drawn over the photo's copy: blend colours only where the heat is, so part of the panel is
    # coloured and the rest shows the photo
    coloured = np.abs(first_photo - first_heatmap).max(axis=2) > 40
    assert 0.01 < coloured.mean() < 1
