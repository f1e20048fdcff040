"""The preprocessing contract: every kind of photo -> uint8 (224, 224, 3), deterministically; bad input -> a code."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from bench.common import gif_of_blocks, jpeg_scan_bomb
from tests.support import (
    MUSHROOMS, XMP_TRAILER, drawn_gif, exif_of_tags, gif_in_sub_blocks_of, jpeg_with_segment, mpf_index,
)
from training_job.preprocessing import (
    DEFAULT_LIMITS, FILE_LIMITS, MAX_EXIF_TAGS, MAX_JPEG_MARKERS, InvalidImage, Limits, decode_image,
    exif_orientation, load_pillow, open_image, orient, preprocess_bytes,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def a_real_photo() -> bytes:
    return sorted((MUSHROOMS / "boletus_edulis").iterdir())[0].read_bytes()


def assert_contract_shape(pixels: np.ndarray) -> None:
    assert pixels.shape == (224, 224, 3)
    assert pixels.dtype == np.uint8


def test_same_bytes_give_the_same_pixels():
    data = a_real_photo()
    first, second = preprocess_bytes(data), preprocess_bytes(bytes(data))
    assert_contract_shape(first)
    assert np.array_equal(first, second)
    assert first.std() > 10, "a real photo is not a flat image"


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (200, 100), RED)
    stored.paste(BLUE, (100, 0, 200, 100))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)

    upright = decode_image(data)
    assert upright.size == (100, 200)
    pixels = preprocess_bytes(data).astype(int)
    assert pixels[20, 112, 0] > 200 and pixels[20, 112, 2] < 60, "the stored left (red) half is now on top"
    assert pixels[200, 112, 2] > 200 and pixels[200, 112, 0] < 60, "the stored right (blue) half is at the bottom"


def test_16_bit_png_is_scaled_to_8_bits():
    wide = np.zeros((64, 128), np.uint16)
    wide[:, 64:] = 65535
    img = Image.fromarray(wide)
    assert img.mode.startswith("I;16")
    pixels = preprocess_bytes(encode(img, "PNG"))
    assert_contract_shape(pixels)
    assert pixels[:, :100].max() == 0 and pixels[:, 124:].min() == 255


def test_cmyk_jpeg_becomes_rgb():
    pixels = preprocess_bytes(encode(Image.new("CMYK", (120, 80), (0, 0, 0, 0)), "JPEG"))
    assert_contract_shape(pixels)
    assert pixels.min() > 240, "CMYK 0,0,0,0 is white paper"


def test_alpha_and_palette_pngs_are_flattened_over_white():
    transparent = Image.new("RGBA", (80, 80), (255, 0, 0, 0))
    half = Image.new("RGBA", (80, 80), (0, 0, 0, 255))
    half.paste((0, 0, 0, 0), (40, 0, 80, 80))
    palette = Image.new("P", (80, 80), 0)
    palette.putpalette([0, 0, 0] + [0, 255, 0] * 255)
    palette.paste(1, (40, 0, 80, 80))
    palette.info["transparency"] = 0

    assert preprocess_bytes(encode(transparent, "PNG")).min() == 255
    pixels = preprocess_bytes(encode(half, "PNG"))
    assert pixels[:, :100].max() == 0 and pixels[:, 124:].min() == 255
    pixels = preprocess_bytes(encode(palette, "PNG", transparency=0))
    assert_contract_shape(pixels)
    assert tuple(pixels[100, 10]) == WHITE and tuple(pixels[100, 200]) == (0, 255, 0)


def test_grayscale_is_replicated_to_three_channels():
    pixels = preprocess_bytes(encode(Image.new("L", (90, 90), 77), "PNG"))
    assert_contract_shape(pixels)
    assert (pixels == 77).all()


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 64), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    pixels = preprocess_bytes(data)
    assert_contract_shape(pixels)
    assert tuple(pixels[112, 112]) == RED


def test_webp_is_decoded_to_the_photos_pixels():
    photo = decode_image(a_real_photo())
    as_png = preprocess_bytes(encode(photo, "PNG"))
    lossless = preprocess_bytes(encode(photo, "WEBP", lossless=True))
    assert_contract_shape(lossless)
    assert np.array_equal(lossless, as_png)
    lossy = preprocess_bytes(encode(photo, "WEBP", quality=90))
    assert np.abs(lossy.astype(int) - as_png).mean() < 3


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    chunk = png_chunk
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [40_000, 8_000])  # beyond Pillow's own bomb guard, and beyond only our limit
def test_decompression_bomb_is_refused_without_allocating(side):
    # A 40,000 x 40,000 RGB image would need 4.8 GB; the child may address 1 GB, so decoding would fail differently.
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from training_job.preprocessing import InvalidImage, preprocess_bytes\n"
        "try:\n"
        "    preprocess_bytes(sys.stdin.buffer.read())\n"
        "except InvalidImage as exc:\n"
        "    print(exc.code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], input=_png_header_only(side, side), capture_output=True,
                          timeout=60)
    assert done.stdout.decode().strip() == "too_many_pixels", done.stderr.decode()[-2000:]


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "empty"),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not_an_image"),
        (b"\x00\x01 definitely not a picture" * 10, "not_an_image"),
    ],
)
def test_bad_bytes_get_a_stable_code(data, code):
    with pytest.raises(InvalidImage) as caught:
        preprocess_bytes(data)
    assert caught.value.code == code
    assert caught.value.message


def test_a_heic_photo_is_refused_with_what_to_send_instead():
    """An iPhone's photos are HEIC by default, which Pillow cannot decode: the refusal says so and what to send,
    where it said no format was recognised (a hobbyist's whole folder dropped without a hint)."""
    header = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200  # the ftyp box HEIC files open with
    with pytest.raises(InvalidImage) as caught:
        preprocess_bytes(header)
    assert caught.value.code == "not_an_image"
    assert "HEIC" in caught.value.message and "JPEG" in caught.value.message


def test_a_progressive_jpeg_of_more_scans_than_the_limit_is_refused_before_it_is_decoded():
    """Each scan of a progressive JPEG has the decoder pass over its components' coefficients again, and a scan of
    a flat picture is some thirty bytes (bench.common.jpeg_scan_bomb): within the gateway's 20 MB, hundreds of
    thousands of them, minutes of CPU for one request, and a photo of 64 KB was decoded on its event loop. Encoders
    write at most 18 (libjpeg's progression for CMYK; 10 for colour); the limit is checked with the header."""
    at_limit = jpeg_scan_bomb(1000, DEFAULT_LIMITS.max_scans)
    assert preprocess_bytes(at_limit).shape == (224, 224, 3)
    for scans in (DEFAULT_LIMITS.max_scans + 1, 2000):
        with pytest.raises(InvalidImage) as refused:
            open_image(jpeg_scan_bomb(1000, scans))
        assert refused.value.code == "too_many_scans"
        assert f"{DEFAULT_LIMITS.max_scans}" in refused.value.message
    assert FILE_LIMITS.max_scans == DEFAULT_LIMITS.max_scans  # no camera writes more: a user's file neither


def test_a_jpeg_of_more_markers_than_any_camera_writes_is_refused_before_pillow_reads_them():
    """Pillow reads the segments before a JPEG's first scan one turn of a Python loop each: 5 million empty
    comments in 20 MB cost seconds of CPU before a pixel was decoded."""
    photo = encode(Image.new("RGB", (64, 48), RED), "JPEG")
    with_comments = photo[:2] + b"\xff\xfe\x00\x02" * (MAX_JPEG_MARKERS + 1) + photo[2:]
    with pytest.raises(InvalidImage) as refused:
        open_image(with_comments)
    assert refused.value.code == "too_many_markers"
    assert preprocess_bytes(photo[:2] + b"\xff\xfe\x00\x02" * 500 + photo[2:]).shape == (224, 224, 3)


def png_in_chunks_of(size: int, side: int = 1000) -> bytes:
    """A PNG of a flat ``side`` x ``side`` picture, its compressed pixels split into IDAT chunks of ``size`` bytes."""
    pixels = zlib.compress(b"".join(b"\x00" + bytes([90, 60, 30]) * side for _ in range(side)), 9)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + b"".join(png_chunk(b"IDAT", pixels[i:i + size]) for i in range(0, len(pixels), size))
            + png_chunk(b"IEND", b""))


def test_a_png_of_more_chunks_than_any_encoder_writes_is_refused_before_pillow_reads_them():
    """Pillow reads a PNG's chunks one turn of a Python loop each: its compressed pixels in 1.6 million one-byte
    chunks (20 MB) cost seconds of CPU, ten times what a real PNG of that size costs to decode."""
    one_byte = png_in_chunks_of(1)
    assert len(one_byte) // 13 > 2048 + len(one_byte) // 1024  # more chunks than the limit allows
    with pytest.raises(InvalidImage) as refused:
        open_image(one_byte)
    assert refused.value.code == "too_many_chunks"
    assert preprocess_bytes(png_in_chunks_of(1024)).shape == (224, 224, 3)  # smaller than any encoder's



def test_a_gif_of_more_blocks_than_any_encoder_writes_is_refused_before_pillow_reads_them():
    """Pillow reads what comes before a GIF's first picture one turn of a Python loop per extension sub-block and
    per stray byte: 4 million one-byte comments in 20 MB cost 4 s of CPU, 20 MB of stray bytes 2 s."""
    for bomb in (gif_of_blocks(b"!\xfe\x01x\x00", 100_000), gif_of_blocks(b"\x00", 500_000)):
        with pytest.raises(InvalidImage) as refused:
            open_image(bomb)
        assert refused.value.code == "too_many_blocks"
    # What encoders write is read: a 2 MB comment in sub-blocks of 255 bytes, and an XMP packet of 200 KB, whose
    # text bytes a reader takes for sub-block lengths
    long_comment = encode(Image.new("RGB", (64, 48), RED), "GIF", comment=b"a long comment " * 140_000)
    assert preprocess_bytes(long_comment).shape == (224, 224, 3)
    packet = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Seq>'
              + "".join(f"\n   <rdf:li>saved by an editor, step {step}</rdf:li>" for step in range(4_500))
              + "\n</rdf:Seq></x:xmpmeta>").encode()
    assert len(packet) > 200_000
    with_xmp = gif_of_blocks(b"!\xff\x0bXMP DataXMP" + packet + XMP_TRAILER, 1)
    assert open_image(with_xmp).size == (64, 64)
    assert preprocess_bytes(with_xmp).shape == (224, 224, 3)


def test_a_gif_whose_picture_is_in_more_blocks_than_any_encoder_writes_is_refused():
    """The SavedModel's predict_image_bytes steps through a GIF's first picture a sub-block at a time, to decode that
    picture alone: its blocks count to the same limit, here as there. Encoders write sub-blocks of 255 bytes."""
    photo = drawn_gif(1)
    with pytest.raises(InvalidImage) as refused:
        open_image(gif_in_sub_blocks_of(photo, 1))
    assert refused.value.code == "too_many_blocks"
    assert np.array_equal(preprocess_bytes(gif_in_sub_blocks_of(photo, 255)), preprocess_bytes(photo))
    assert np.array_equal(preprocess_bytes(gif_in_sub_blocks_of(photo, 64)), preprocess_bytes(photo))


def test_a_photo_of_more_exif_tags_than_any_camera_writes_is_refused_before_pillow_reads_them():
    """Pillow reads the tags of a photo's EXIF directory (and of a JPEG's MPF index, and the images it lists) one
    turn of a Python loop each, a JPEG's as it opens it: 5,400 tags in a 64 KB JPEG held the gateway's event loop
    15 ms (a plain one 0.6 ms), 65,535 in a 786 KB PNG or WebP cost 72 ms, an MPF index of 5,000 tags 32-58 ms."""
    for photo in (jpeg_with_segment(0xE1, exif_of_tags(MAX_EXIF_TAGS + 1)),
                  jpeg_with_segment(0xE2, mpf_index(2, tags=MAX_EXIF_TAGS + 1)),
                  jpeg_with_segment(0xE2, mpf_index(MAX_EXIF_TAGS + 1)),
                  encode(Image.new("RGB", (64, 48), RED), "PNG", exif=exif_of_tags(5000)),
                  encode(Image.new("RGB", (64, 48), RED), "WEBP", exif=exif_of_tags(5000))):
        with pytest.raises(InvalidImage) as refused:
            preprocess_bytes(photo)
        assert refused.value.code == "too_many_tags"
    # At the limit, read as before: the orientation applied, an MPO of two images opened as one
    half_blue = Image.new("RGB", (64, 48), RED)
    half_blue.paste(BLUE, (0, 0, 32, 48))
    for fmt in ("JPEG", "PNG"):
        stored, turned, at_limit = (preprocess_bytes(encode(half_blue, fmt, exif=exif_of_tags(tags, turn)))
                                    for tags, turn in ((1, 1), (1, 6), (MAX_EXIF_TAGS, 6)))
        assert np.array_equal(at_limit, turned) and not np.array_equal(turned, stored), fmt
    assert open_image(jpeg_with_segment(0xE2, mpf_index(MAX_EXIF_TAGS, tags=MAX_EXIF_TAGS))).size == (64, 48)


def tiff_of_many_tags(tags: int) -> bytes:
    """A grey 8 x 8 TIFF whose one directory holds ``tags`` private tags besides the four it needs."""
    needed = [(256, 3, 1, 8), (257, 3, 1, 8), (262, 3, 1, 1), (273, 4, 1, 0)]
    entries = needed + [(40000 + i % 20000, 3, 1, 0) for i in range(tags)]
    return (b"II*\x00" + struct.pack("<IH", 8, len(entries))
            + b"".join(struct.pack("<HHII", *entry) for entry in entries) + struct.pack("<I", 0))


def test_a_service_reads_the_formats_phones_and_browsers_send_and_a_users_files_any():
    """Pillow opens dozens of formats, each header read by its own Python code: a TIFF of 5,000 tags in 60 KB took
    80 ms to open, on the gateway's event loop. A service takes what phones and browsers send (an exotic format's
    decoder is attack surface for nothing); a user's own photo files may be anything Pillow reads."""
    assert set(DEFAULT_LIMITS.formats) == {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "AVIF"}
    photo = Image.new("RGB", (64, 48), RED)
    for fmt in ("TIFF", "PPM", "TGA", "PCX"):
        with pytest.raises(InvalidImage) as refused:
            open_image(encode(photo, fmt))
        assert refused.value.code == "unsupported_format"
        assert "JPEG, PNG" in refused.value.message
        assert preprocess_bytes(encode(photo, fmt), limits=FILE_LIMITS).shape == (224, 224, 3)
    with pytest.raises(InvalidImage) as refused:
        open_image(tiff_of_many_tags(5000))
    assert refused.value.code == "unsupported_format"
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP"):
        assert preprocess_bytes(encode(photo, fmt)).shape == (224, 224, 3), fmt


def test_only_the_scans_of_the_photo_itself_count():
    """The bytes FF DA that open a scan may also be in a comment, an EXIF thumbnail or what follows the picture (a
    phone's motion photo appends its video): none of them is a scan of the photo."""
    out = io.BytesIO()
    Image.new("RGB", (300, 200), (90, 60, 30)).save(out, "JPEG", progressive=True, comment=b"\xff\xda" * 500)
    photo = out.getvalue() + b"\x00\x00\x00\x18ftypmp42" + b"\xff\xda\x00\x0c" * 5000
    assert preprocess_bytes(photo).shape == (224, 224, 3)


def test_truncated_jpeg_is_corrupt():
    data = a_real_photo()
    assert data[:2] == b"\xff\xd8"
    with pytest.raises(InvalidImage) as caught:
        preprocess_bytes(data[: len(data) // 2])
    assert caught.value.code == "corrupt"


def test_byte_limit():
    with pytest.raises(InvalidImage) as caught:
        preprocess_bytes(a_real_photo(), limits=Limits(max_bytes=1000))
    assert caught.value.code == "too_large"


def exif_transpose_path(data: bytes, size: int = 224) -> np.ndarray:
    """The contract as it was first written for photos Pillow decodes to RGB: draft, load, ImageOps.exif_transpose,
    convert, resize."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("RGB", (size, size))
    img.load()
    return np.asarray(ImageOps.exif_transpose(img).convert("RGB").resize((size, size), Image.BILINEAR))


def exif_rotated(photo: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo, "JPEG", quality=92, exif=exif.tobytes())


def test_orient_turns_every_exif_orientation_as_exif_transpose_does():
    photo = Image.open(io.BytesIO(a_real_photo())).convert("RGB").resize((900, 500))  # draft scale 2: 450 x 250
    for orientation in range(1, 9):
        data = exif_rotated(photo, orientation)
        loaded = load_pillow(open_image(data), 224)
        assert exif_orientation(loaded) == orientation
        upright = orient(loaded, orientation)
        expected = ImageOps.exif_transpose(load_pillow(open_image(data), 224))
        assert upright.size == expected.size == ((450, 250) if orientation < 5 else (250, 450)), orientation
        assert np.array_equal(np.asarray(upright), np.asarray(expected)), orientation
    assert orient(loaded, 1) is loaded, "an upright photo is not copied"


def test_the_contract_gives_exif_transposes_pixels_exactly_on_real_photos():
    """Turning photos upright without copies is a cheaper way to the same pixels, not a new contract:
    PREPROCESSING_VERSION (which keys the bottleneck and gateway caches) did not change with it."""
    if not MUSHROOMS.is_dir():
        pytest.skip("the shared photos are not on this machine")
    cases = [path.read_bytes() for folder in sorted(p for p in MUSHROOMS.iterdir() if p.is_dir())
             for path in sorted(folder.iterdir())[:3]]
    first = Image.open(io.BytesIO(cases[0])).convert("RGB")
    cases += [exif_rotated(first, 6), exif_rotated(first, 3), encode(first.convert("L"), "JPEG"),
              encode(first, "JPEG", progressive=True), encode(first, "JPEG", subsampling=0)]
    for i, data in enumerate(cases):
        assert np.array_equal(preprocess_bytes(data), exif_transpose_path(data)), i


def _child_preprocess(data: bytes, address_space: int = 1 << 30) -> str:
    """The contract run on ``data`` in a child that may address ``address_space`` bytes: 'ok', or the refusal code."""
    script = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({address_space}, {address_space}))\n"
        "from training_job.preprocessing import InvalidImage, preprocess_bytes\n"
        "try:\n"
        "    preprocess_bytes(sys.stdin.buffer.read())\n"
        "    print('ok')\n"
        "except InvalidImage as exc:\n"
        "    print(exc.code, exc.message)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], input=data, capture_output=True, timeout=120)
    return done.stdout.decode().strip() or done.stderr.decode()[-500:]


def test_a_small_file_that_decodes_to_too_many_bytes_is_refused_before_decoding():
    """A 7,700 x 7,700 transparent PNG is a few hundred KB, inside the pixel limit, and decodes to about 240 MB
    before it is flattened: the contract counts the bytes its decode would hold, not only its pixels."""
    side = 7_700
    data = encode(Image.new("RGBA", (side, side), (200, 30, 30, 128)), "PNG")
    assert len(data) < 1_000_000 and side * side < Limits().max_pixels
    answer = _child_preprocess(data)
    assert answer.startswith("too_many_pixels") and "MB" in answer, answer


def test_flattening_in_bands_gives_the_pixels_of_a_whole_conversion():
    """RGBA, 16-bit grey and palette-with-transparency photos are flattened to RGB a band of rows at a time (so a
    large one needs no full-size temporaries): band by band, the pixels of one whole conversion."""
    import training_job.preprocessing as preprocessing

    gradient = np.add.outer(np.arange(200), np.arange(300))
    images = [Image.fromarray(np.dstack([gradient % 256] * 3 + [gradient % 199]).astype(np.uint8), "RGBA"),
              Image.fromarray((gradient * 97).astype(np.uint16)),
              Image.fromarray(np.dstack([gradient % 256] * 3).astype(np.uint8), "RGB").quantize(64)]
    images[2].info["transparency"] = 0
    whole = [np.asarray(preprocessing._to_rgb(img)) for img in images]
    banded = preprocessing.STRIP_PIXELS
    try:
        preprocessing.STRIP_PIXELS = 1_000  # bands of 3 rows
        for img, expected in zip(images, whole):
            assert np.array_equal(np.asarray(preprocessing._to_rgb(img)), expected), img.mode
    finally:
        preprocessing.STRIP_PIXELS = banded


def _jpeg_header_only(width: int, height: int, components: int) -> bytes:
    """A baseline JPEG's markers up to its scan, declaring ``width`` x ``height`` pixels: what open_image reads."""
    frame = struct.pack(">BHHB", 8, height, width, components) + b"".join(
        struct.pack(">BBB", i + 1, 0x11, 0) for i in range(components))
    scan = struct.pack(">B", components) + b"".join(struct.pack(">BB", i + 1, 0) for i in range(components)) \
        + b"\x00\x3f\x00"
    return (b"\xff\xd8\xff\xc0" + struct.pack(">H", len(frame) + 2) + frame
            + b"\xff\xda" + struct.pack(">H", len(scan) + 2) + scan + b"\x00" * 64 + b"\xff\xd9")


def test_the_user_s_own_photo_files_are_bounded_by_memory_not_by_a_service_s_pixel_limit():
    """A 61 MP camera's or a 200 MP phone's photo is over the gateway's 60 M pixels (and a 200 MP one over the
    179 M at which Pillow refuses to open a photo), yet decodes at 1/8 scale into a few MB: prepare and training
    read it. What decoding one would hold still bounds them: the largest CMYK JPEG would take 512 MB at 1/8."""
    from training_job.preprocessing import FILE_LIMITS, decode_bytes, open_image

    for width, height in ((9504, 6336), (16320, 12240)):
        header = open_image(_jpeg_header_only(width, height, 3), FILE_LIMITS)
        assert header.size == (width, height) and decode_bytes(header) <= 16 * 2**20
        with pytest.raises(InvalidImage) as refused:
            open_image(_jpeg_header_only(width, height, 3))  # a service's default limits
        assert refused.value.code == "too_many_pixels"
    with pytest.raises(InvalidImage, match="512 MB; the limit is 256 MB$") as refused:
        open_image(_jpeg_header_only(65_535, 65_535, 4), FILE_LIMITS)
    assert refused.value.code == "too_many_pixels"
