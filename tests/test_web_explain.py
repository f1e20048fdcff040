"""The "Why?" heatmaps on the web page, in a real headless Chromium against the real gateway, model server and Redis
(as tests/test_web.py). The model is the session's ``published_model``; its manifest's demo split is replaced by
the test photos that model gets wrong, so the slideshow's misclassified gallery fills.
Screenshots land in var/screenshots/."""
from __future__ import annotations

import base64
import csv
import io
import shutil

import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By

from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until, write_config
from tests.support import RedisServer
from tests.test_gateway import GatewayProcess
from tests.test_web import WebDriverWait, browser, page  # noqa: F401 - the headless Chromium and the loaded page, used by name
from training_job.preprocessing import preprocess_bytes

WAIT = 60  # seconds: each heatmap is one model call on a busy 2-core machine


def wrong_photos_as_demo(version_dir) -> list[dict]:
    """Rewrite the version's manifest: the test photos the version itself gets wrong (asked through its
    serving_default on the gateway's preprocessing, as the page will ask) become the demo split, and nothing else."""
    import tensorflow as tf

    manifest = version_dir / "assets.extra" / "manifest.csv"
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    test = [row for row in rows if row["split"] == "test"]
    serve = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    out = serve(images=tf.constant(np.stack([preprocess_bytes(open(r["path"], "rb").read()) for r in test])))
    labels = [c.decode() for c in out["classes"].numpy()[0]]
    predicted = [labels[i] for i in out["probabilities"].numpy().argmax(axis=1)]
    wrong = {row["path"]: {**row, "predicted": p} for row, p in zip(test, predicted) if p != row["label"]}
    for row in rows:
        row["split"] = "demo" if row["path"] in wrong else ("test" if row["split"] == "demo" else row["split"])
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return [wrong[row["path"]] for row in rows if row["split"] == "demo"]


@pytest.fixture(scope="module")
def stack(published_model, tmp_path_factory):
    models = tmp_path_factory.mktemp("web-explain") / "models"
    shutil.copytree(published_model.version_dir, models / MODEL / "1")
    wrong = wrong_photos_as_demo(models / MODEL / "1")
    assert wrong, "the small test model gets some test photos wrong; the gallery needs them"
    config = models / "models.config"
    write_config(config, {MODEL: models / MODEL})
    server = start_server(models, config)
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == ModelVersionStatus.AVAILABLE,
                   what="version 1")
        with RedisServer() as redis:
            gateway = GatewayProcess(server.grpc_target, redis.url, models / MODEL)
            try:
                yield gateway, wrong
            finally:
                gateway.stop()
    finally:
        stop_server(server)


def overlay_pixels(image_element) -> np.ndarray:
    src = image_element.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGBA"))


def test_why_lays_the_heatmap_over_the_uploaded_photo(stack, page, tmp_path):
    gateway, wrong = stack
    photo = tmp_path / "photo.jpg"
    Image.open(wrong[0]["path"]).convert("RGB").resize((320, 240)).save(photo, "JPEG")
    page.find_element(By.ID, "photo-input").send_keys(str(photo))
    WebDriverWait(page, WAIT).until(lambda d: d.find_element(By.ID, "result-meta").text)
    assert not page.find_element(By.ID, "why").is_displayed()
    page.find_element(By.ID, "why-button").click()
    overlay = WebDriverWait(page, WAIT).until(lambda d: d.find_element(By.CSS_SELECTOR, "#why .heatmap-overlay"))
    status, answer, _ = gateway.classify(photo.read_bytes(), explain=1)
    assert status == 200
    assert overlay.get_attribute("data-label") == answer["explanation"]["label"] == answer["predictions"][0]["label"]
    drawn = overlay_pixels(overlay)
    assert drawn.shape == (240, 320, 4) and drawn[..., 3].max() > 200  # the photo's size; opaque where it is hot
    shown = page.find_element(By.CSS_SELECTOR, "#why .heatmap-frame img:not(.heatmap-overlay)")
    WebDriverWait(page, 15).until(lambda d: overlay.size["width"] > 0 and shown.size["width"] > 0)
    assert (overlay.location, overlay.size) == (shown.location, shown.size)  # laid exactly over the photo
    slider = page.find_element(By.ID, "why-opacity")
    page.execute_script("arguments[0].value = 25; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert float(overlay.value_of_css_property("opacity")) == pytest.approx(0.25)
    page.execute_script("arguments[0].value = 80; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert float(overlay.value_of_css_property("opacity")) == pytest.approx(0.8)


def test_misclassified_gallery_shows_heatmaps_for_the_predicted_and_the_true_class(stack, page):
    gateway, wrong = stack
    page.find_element(By.ID, "slide-step").click()  # one photo: the first demo photo, misclassified
    pair = WebDriverWait(page, 2 * WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#slide-misses li .why-pair"))
    figures = pair[0].find_elements(By.CSS_SELECTOR, "figure.heatmap")
    item = page.find_element(By.CSS_SELECTOR, "#slide-misses li figure.slide")
    predicted, truth = item.get_attribute("data-predicted"), item.get_attribute("data-truth")
    assert predicted != truth
    assert [f.get_attribute("data-label") for f in figures] == [predicted, truth]
    first, second = (overlay_pixels(f.find_element(By.CLASS_NAME, "heatmap-overlay")) for f in figures)
    assert first.shape == second.shape and np.abs(first.astype(int) - second.astype(int)).max() > 0
    boxes = [f.rect for f in figures]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[0]["x"] + boxes[0]["width"] <= boxes[1]["x"]  # side by side
    assert page.find_element(By.ID, "misses-opacity").is_displayed()
