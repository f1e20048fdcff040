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
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bench.common import gif_of_blocks, jpeg_scan_bomb
from tests.support import (
    MUSHROOMS, XMP_TRAILER, drawn_gif, exif_of_tags, gif_in_sub_blocks_of, jpeg_with_segment, mpf_index,
)
from training_job.preprocessing import (
    DEFAULT_LIMITS, MAX_EXIF_TAGS, MAX_GIF_BLOCKS, MAX_JPEG_MARKERS, InvalidImage, gif_blocks, jpeg_markers,
    preprocess_bytes,
)
from training_job.preprocessing_graph import decode_and_resize, exif_orientation
from training_job.preprocessing_graph import gif_blocks as gif_blocks_in_graph
from training_job.preprocessing_graph import jpeg_markers as jpeg_markers_in_graph

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


def a_jpeg_with_comments(count: int) -> bytes:
    photo = encode(Image.new("RGB", (64, 48), (200, 30, 10)), "JPEG")
    return photo[:2] + b"\xff\xfe\x00\x02" * count + photo[2:]


def costly_jpegs() -> dict[str, bytes]:
    """JPEGs past ``preprocess_bytes``' limits, by the code it refuses them with."""
    return {"too_many_scans": jpeg_scan_bomb(1000, 2000), "too_many_markers": a_jpeg_with_comments(3000)}


def test_in_graph_jpeg_markers_are_counted_as_preprocess_bytes_counts_them(cases):
    count = tf.function(lambda data: jpeg_markers_in_graph(data, DEFAULT_LIMITS.max_scans),
                        input_signature=[tf.TensorSpec([], tf.string)])
    edges = [jpeg_scan_bomb(1000, DEFAULT_LIMITS.max_scans), a_jpeg_with_comments(MAX_JPEG_MARKERS),
             b"\xff\xd8", b"\xff\xd8\xff\xda", b"\xff\xd8\xff\xfe\x00"]
    for data in [d for _, d in cases if d[:2] == b"\xff\xd8"] + edges + list(costly_jpegs().values()):
        assert tuple(int(n) for n in count(tf.constant(data))) == jpeg_markers(data, DEFAULT_LIMITS.max_scans)


def test_a_jpeg_of_more_scans_or_markers_than_the_contract_takes_is_an_invalid_argument_in_graph():
    """Refused by ``preprocess_bytes`` with these codes, and decoded by ``predict_image_bytes`` for seconds of the
    model server's CPU each (bench/scan_bombs.py)."""
    decode = tf.function(lambda data: decode_and_resize(data, 224), input_signature=[tf.TensorSpec([], tf.string)])
    for code, data in costly_jpegs().items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"{code}: "):
            decode(tf.constant(data))


def photos_of_tags() -> dict[str, bytes]:
    """Photos whose EXIF directory or MPF index holds (or lists) about as many tags (or images) as the contract
    takes, in every format the graph reads EXIF from; "declares" ones declare 5,000 tags and hold 10."""
    red = Image.new("RGB", (64, 48), (255, 0, 0))
    declares = bytearray(exif_of_tags(10))
    declares[14:16] = (5000).to_bytes(2, "little")  # the directory's count, after Exif\0\0, the header, its offset
    photos = {}
    for tags in (MAX_EXIF_TAGS, MAX_EXIF_TAGS + 1, 4000):
        photos[f"JPEG EXIF {tags}"] = jpeg_with_segment(0xE1, exif_of_tags(tags))
        photos[f"MPF tags {tags}"] = jpeg_with_segment(0xE2, mpf_index(2, tags=tags))
        photos[f"MPF images {tags}"] = jpeg_with_segment(0xE2, mpf_index(tags))
        for fmt in ("PNG", "WEBP"):
            photos[f"{fmt} EXIF {tags}"] = encode(red, fmt, exif=exif_of_tags(tags))
    photos["JPEG EXIF declares"] = jpeg_with_segment(0xE1, bytes(declares))
    photos["PNG EXIF declares"] = encode(red, "PNG", exif=bytes(declares))
    return photos


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow, of the directories that declare more than they hold
def test_a_photo_of_more_tags_than_the_contract_takes_is_an_invalid_argument_in_graph_as_it_is_refused():
    """``preprocess_bytes`` refuses a photo of more tags in its EXIF directory or MPF index (or more images listed
    there) than ``MAX_EXIF_TAGS`` with ``too_many_tags``; the graph, which reads no more than that many, answered
    such a photo oriented by its first ones: the gateway's 400 was the model server's 200."""
    decode = tf.function(lambda data: decode_and_resize(data, 224), input_signature=[tf.TensorSpec([], tf.string)])
    refused = {}
    for name, data in photos_of_tags().items():
        try:
            preprocess_bytes(data)
            expected = None
        except InvalidImage as exc:
            expected = exc.code
        try:
            decode(tf.constant(data))
            got = None
        except tf.errors.InvalidArgumentError as exc:
            got = re.search(r"\b(\w+): the photo", exc.message).group(1)
        assert got == expected, (name, got, expected)
        refused[name] = got
    assert {name for name, code in refused.items() if code} == {
        name for name in refused if name.endswith((f" {MAX_EXIF_TAGS + 1}", " 4000"))}, refused


def contract_gifs() -> dict[str, bytes]:
    """GIFs the contract takes: one picture, as encoders write it and in smaller sub-blocks; with a comment and an
    XMP packet before it; of three pictures; a stray byte before its picture; and some that hold no picture."""
    photo = drawn_gif(1)
    return {"plain": photo, "sub-blocks of 64": gif_in_sub_blocks_of(photo, 64),
            "comment": gif_of_blocks(b"!\xfe\x05hello\x00", 20), "frames": drawn_gif(2, frames=3),
            "xmp": gif_of_blocks(b"!\xff\x0bXMP DataXMP<x:xmpmeta/>" + XMP_TRAILER, 1),
            "stray byte": gif_of_blocks(b"\x00", 1), "no picture": photo[:13 + 768] + b";",
            "cut short": photo[:len(photo) // 2], "header only": photo[:6]}


def costly_gifs() -> dict[str, bytes]:
    """GIFs of more blocks than the contract takes up to the end of their first picture (besides full ones)."""
    return {"comments": gif_of_blocks(b"!\xfe\x01x\x00", 3000), "stray bytes": gif_of_blocks(b"\x00", 9000),
            "sub-blocks of 1": gif_in_sub_blocks_of(drawn_gif(1), 1)}


def test_in_graph_gif_blocks_are_counted_as_preprocess_bytes_counts_them():
    count = tf.function(lambda data: gif_blocks_in_graph(data, MAX_GIF_BLOCKS),
                        input_signature=[tf.TensorSpec([], tf.string)])
    for name, data in contract_gifs().items():
        assert int(count(tf.constant(data))[0]) == gif_blocks(data, MAX_GIF_BLOCKS) <= MAX_GIF_BLOCKS, name
    for name, data in costly_gifs().items():
        assert int(count(tf.constant(data))[0]) > MAX_GIF_BLOCKS < gif_blocks(data, MAX_GIF_BLOCKS), name


def test_a_gif_is_decoded_from_its_first_picture_alone_and_one_of_too_many_blocks_is_an_invalid_argument():
    """TensorFlow's GIF decoder decodes every picture of a GIF when asked for the first: 200 pictures of 2,000 x
    2,000 pixels in 786 KB cost the model server 5.7 s of CPU (0.17 s cut after the first). Refused as
    ``preprocess_bytes`` refuses it, a GIF of too many blocks up to there."""
    decode = tf.function(lambda data: decode_and_resize(data, 224), input_signature=[tf.TensorSpec([], tf.string)])
    for name in ("plain", "sub-blocks of 64", "comment", "frames", "xmp"):
        data = contract_gifs()[name]
        difference = np.abs(preprocess_bytes(data).astype(int) - decode(tf.constant(data)).numpy().astype(int))
        assert difference.max() <= MAX_LEVEL_DIFFERENCE and difference.mean() <= MAX_MEAN_DIFFERENCE, name
    for name, data in costly_gifs().items():
        with pytest.raises(tf.errors.InvalidArgumentError, match="too_many_blocks: "):
            decode(tf.constant(data))


def animated_webp(side: int) -> bytes:
    frames = [Image.new("RGB", (side, side), (50 * i, 0, 0)) for i in range(2)]
    return encode(frames[0], "WEBP", save_all=True, append_images=frames[1:])


def test_an_animated_webp_is_an_invalid_argument_in_graph_not_a_crash():
    """TensorFlow's WebP animation decoder corrupts its process's memory on an animation of two frames of 2,000 x
    2,000 pixels (2 KB): one predict_image_bytes request killed the model server (a segmentation fault, or a double
    free). The graph runs in a child process here, which such a crash ends. Pillow decodes the first frame."""
    script = (
        "import sys\n"
        "import tensorflow as tf\n"
        "from training_job.preprocessing_graph import decode_and_resize\n"
        "try:\n"
        "    decode_and_resize(tf.constant(sys.stdin.buffer.read()), 224)\n"
        "    print('decoded')\n"
        "except tf.errors.InvalidArgumentError as exc:\n"
        "    print(exc.message)\n"
    )
    photo = animated_webp(2000)
    done = subprocess.run([sys.executable, "-c", script], input=photo, capture_output=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr.decode()[-500:])
    assert "animated_webp: " in done.stdout.decode(), done.stdout.decode()[-500:]
    assert preprocess_bytes(photo).shape == (224, 224, 3)
    decode = tf.function(lambda data: decode_and_resize(data, 224), input_signature=[tf.TensorSpec([], tf.string)])
    still = encode(Image.new("RGBA", (64, 48), (10, 200, 30, 128)), "WEBP")  # extended (VP8X), not animated
    assert decode(tf.constant(still)).shape == (224, 224, 3)


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
