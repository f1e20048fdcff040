"""The SavedModel's ``predict_image_bytes`` follows the one preprocessing contract (``preprocess_bytes``): EXIF
orientation applied, alpha composited over white, the same JPEG draft scale and an antialiased bilinear resize.

Photos are made in the test from the shared photos with Pillow: JPEGs that store the pixels sideways with an EXIF
orientation tag (every orientation 2-8), and RGBA PNGs with fully and half transparent regions.

Tolerance: Pillow and TensorFlow round differently in the JPEG decode, the resize and the compositing. Measured on
these photos: at most 1 grey level apart on any pixel, mean 0.2 or less. Bounded here at max 2, mean 0.5; the
classifier's top-1 answer must be identical; its probabilities moved by at most 0.022 (a random head over
MobileNet features), bounded at 0.05."""
from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.support import MUSHROOMS
from training_job.preprocessing import preprocess_bytes
from training_job.preprocessing_graph import decode_and_resize, exif_orientation

MAX_LEVEL_DIFFERENCE = 2
MAX_MEAN_DIFFERENCE = 0.5
MAX_PROBABILITY_DIFFERENCE = 0.05


def source_photos(per_class: int = 2) -> list[Image.Image]:
    if not MUSHROOMS.is_dir():
        pytest.skip("the shared photos are not on this machine")
    photos = []
    for folder in sorted(p for p in MUSHROOMS.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir())[:per_class]:
            photos.append(Image.open(path).convert("RGB"))
    return photos


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def exif_rotated_jpeg(photo: Image.Image, orientation: int) -> bytes:
    """The photo's pixels stored as they are, with an EXIF tag telling viewers to turn them."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo, "JPEG", quality=92, exif=exif.tobytes())


def rgba_png(photo: Image.Image) -> bytes:
    pixels = np.asarray(photo.convert("RGBA")).copy()
    height, width = pixels.shape[:2]
    pixels[:, : width // 2, 3] = 0  # the left half fully transparent: white in the contract
    pixels[: height // 3, :, 3] = 128  # the top third half transparent
    return encode(Image.fromarray(pixels, "RGBA"), "PNG")


def contract_cases() -> list[tuple[str, bytes]]:
    cases = []
    for i, photo in enumerate(source_photos()):
        for orientation in range(2, 9):
            cases.append((f"photo{i}-exif{orientation}", exif_rotated_jpeg(photo, orientation)))
        cases.append((f"photo{i}-rgba", rgba_png(photo)))
    return cases


@pytest.fixture(scope="module")
def cases():
    return contract_cases()


def test_the_orientation_tag_is_read_in_graph(cases):
    for name, data in cases:
        expected = int(name.rsplit("exif", 1)[1]) if "exif" in name else 1
        assert int(exif_orientation(tf.constant(data))) == expected, name
    assert int(exif_orientation(tf.constant(b""))) == 1
    assert int(exif_orientation(tf.constant(b"Exif\x00\x00MM\x00*\xff\xff\xff\xff"))) == 1  # offset out of range


def test_in_graph_pixels_agree_with_preprocess_bytes(cases):
    decode = tf.function(lambda data: decode_and_resize(data, 224), input_signature=[tf.TensorSpec([], tf.string)])
    for name, data in cases:
        expected = preprocess_bytes(data).astype(int)
        got = decode(tf.constant(data)).numpy().astype(int)
        difference = np.abs(expected - got)
        assert got.shape == (224, 224, 3), name
        assert difference.max() <= MAX_LEVEL_DIFFERENCE and difference.mean() <= MAX_MEAN_DIFFERENCE, (
            name, difference.max(), difference.mean())


def test_the_exported_bytes_signature_answers_as_the_pixels_signature(cases, base_network):
    from training_job.export import build_serving_module
    from training_job.open_set import OpenSet
    from training_job.train import Head

    rng = np.random.default_rng(7)
    features = base_network.model.outputs[0].shape[-1]
    head = Head(["amanita_muscaria", "amanita_vaginata", "boletus_edulis", "boletus_erythropus"],
                [rng.normal(0, 0.05, (features, 4)).astype(np.float32)], [np.zeros(4, np.float32)])
    open_set = OpenSet("combined", 0.5, np.eye(4, features, dtype=np.float32), 0.03, 0.03)
    module = build_serving_module(base_network, head, open_set)
    data = [d for _, d in cases]
    from_bytes = module.serve_bytes(tf.constant(data))["probabilities"].numpy()
    pixels = np.stack([preprocess_bytes(d) for d in data])
    from_pixels = module.serve_pixels(tf.constant(pixels))["probabilities"].numpy()
    assert list(from_bytes.argmax(1)) == list(from_pixels.argmax(1))
    assert np.abs(from_bytes - from_pixels).max() <= MAX_PROBABILITY_DIFFERENCE
