"""Integration: real redis-server, the project's model server (tiny model) and the gateway as processes."""
from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.support import RedisServer, free_port, stop_process, wait_for_port
from tests.tiny_model import TinyClassifier, write_tiny_model

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
STACK: dict = {}  # the module fixture's processes, for the restart test (runs last)


def _jpeg(colour=(180, 40, 30), size=(320, 240)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def _post(port, body, ctype="image/jpeg", query=""):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/classify{query}", data=body, method="POST",
                                 headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("registry") / "mushrooms"
    write_tiny_model(base / "1")
    grpc_port, rest_port, http_port = free_port(), free_port(), free_port()
    server_cmd = [sys.executable, "-m", "services.model_server", "--port", str(grpc_port),
                  "--rest_api_port", str(rest_port), "--model_name", "mushrooms", "--model_base_path", str(base)]
    server = subprocess.Popen(server_cmd, env=ENV)
    processes = {"server": server}
    redis = RedisServer().start()
    gateway = subprocess.Popen([sys.executable, "-m", "services.gateway", "--model_server", f"127.0.0.1:{grpc_port}",
                                "--redis_url", redis.url, "--http_port", str(http_port), "--max_bytes", "2000000"],
                               env=ENV)
    try:
        wait_for_port(grpc_port, timeout=120, process=server)
        wait_for_port(http_port, timeout=60, process=gateway)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5):
                pass
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5)
                break
            except urllib.error.HTTPError:
                time.sleep(0.2)
        STACK.update(processes=processes, server_cmd=server_cmd, grpc_port=grpc_port)
        yield http_port
    finally:
        stop_process(gateway)
        stop_process(processes["server"])
        redis.stop()


def test_answer_matches_the_in_process_model_and_repeat_is_cached(stack):
    from training_job.preprocessing import preprocess_bytes

    photo = _jpeg()
    status, first, _ = _post(stack, photo, query="?top_k=4")
    assert status == 200, first
    expected = TinyClassifier()._outputs(preprocess_bytes(photo)[None])["probabilities"].numpy()[0]
    got = {p["label"]: p["score"] for p in first["predictions"]}
    from tests.tiny_model import LABELS
    np.testing.assert_allclose([got[label] for label in LABELS], expected, atol=1e-5)
    assert first["model"] == {"name": "mushrooms", "version": 1} and first["cached"] is False
    status, again, _ = _post(stack, json.dumps({"image_b64": base64.b64encode(photo).decode()}).encode(),
                             "application/json", "?top_k=2")
    assert status == 200 and again["cached"] is True and len(again["predictions"]) == 2
    assert again["predictions"] == first["predictions"][:2]


def test_client_cli_prints_labels_scores_and_time(stack, tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(_jpeg((90, 60, 30)))
    out = subprocess.run([sys.executable, "-m", "services.gateway.client", str(photo), "--url",
                          f"http://127.0.0.1:{stack}"], capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 0, out.stderr
    assert "(score = " in out.stdout and "evaluation time:" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "services.gateway.client", str(tmp_path / "nope.jpg")],
                             capture_output=True, text=True, timeout=60, env=ENV)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def _png(mode, size=(64, 48), **save):
    buf = io.BytesIO()
    img = Image.new(mode, size)
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def _cmyk_jpeg():
    buf = io.BytesIO()
    Image.new("CMYK", (64, 48), (0, 200, 200, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _exif_rotated_jpeg():
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.new("RGB", (80, 40), (10, 200, 30)).save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def _animated_gif():
    buf = io.BytesIO()
    frames = [Image.new("P", (32, 32), i) for i in range(3)]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _pixel_bomb_png(side=40_000):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BAD_INPUTS = [
    ("empty", b"", "image/jpeg", "", 400),
    ("not an image", b"hello world", "application/octet-stream", "", 400),
    ("html", b"<!doctype html><html><body>x</body></html>", "image/jpeg", "", 400),
    ("truncated jpeg", _jpeg()[:300], "image/jpeg", "", 400),
    ("16-bit png", _png("I;16"), "image/png", "", 200),
    ("grayscale", _png("L"), "image/png", "", 200),
    ("palette", _png("P"), "image/png", "", 200),
    ("alpha", _png("RGBA"), "image/png", "", 200),
    ("cmyk jpeg", _cmyk_jpeg(), "image/jpeg", "", 200),
    ("exif rotated", _exif_rotated_jpeg(), "image/jpeg", "", 200),
    ("animated gif", _animated_gif(), "image/gif", "", 200),
    ("pixel bomb", _pixel_bomb_png(), "image/png", "", 400),
    ("over limit", b"\xff" * 2_100_000, "image/jpeg", "", 413),
    ("bad base64", b'{"image_b64": "***"}', "application/json", "", 400),
    ("bad json", b'{"image_b64": ', "application/json", "", 400),
    ("top_k 0", _jpeg(), "image/jpeg", "?top_k=0", 400),
    ("top_k 99", _jpeg(), "image/jpeg", "?top_k=99", 400),
    ("top_k x", _jpeg(), "image/jpeg", "?top_k=x", 400),
    ("unknown version", _jpeg(), "image/jpeg", "?version=42", 404),
    ("unknown label", _jpeg(), "image/jpeg", "?label=nope", 404),
]


@pytest.mark.parametrize("name, body, ctype, query, expected", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_get_4xx_with_an_error_body(stack, name, body, ctype, query, expected):
    status, payload, _ = _post(stack, body, ctype, query)
    assert status == expected, (name, payload)
    if status >= 400:
        assert set(payload["error"]) == {"code", "message"}


def test_model_server_restart_gives_503_then_recovers_without_a_gateway_restart(stack):
    processes = STACK["processes"]
    stop_process(processes["server"])
    status, payload, headers = _post(stack, _jpeg((1, 2, 3)))
    assert status == 503 and payload["error"]["code"] == "upstream_unavailable" and headers.get("Retry-After")
    processes["server"] = subprocess.Popen(STACK["server_cmd"], env=ENV)
    wait_for_port(STACK["grpc_port"], timeout=120, process=processes["server"])
    deadline = time.monotonic() + 60
    while True:
        status, payload, _ = _post(stack, _jpeg((1, 2, 3)))
        if status == 200 or time.monotonic() > deadline:
            break
        assert status == 503, payload
        time.sleep(0.2)
    assert status == 200, payload
