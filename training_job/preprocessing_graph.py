"""``preprocessing.preprocess_bytes`` -- the one preprocessing contract -- as TensorFlow ops, for the exported
SavedModel's ``predict_image_bytes`` signature, so a client that sends encoded photos gets the pixels training used:

- JPEGs are decoded at the same reduced DCT scale Pillow's ``draft`` picks (1/2, 1/4 or 1/8 while both sides stay
  >= ``size``), with libjpeg's accurate integer DCT, as Pillow does;
- the EXIF orientation tag (JPEG APP1 ``Exif``, PNG ``eXIf``, WebP ``EXIF``) is read from the bytes with tensor ops
  and applied as ``ImageOps.exif_transpose`` does;
- grey, grey+alpha and RGBA are flattened to RGB over white;
- the bilinear resize to a square is antialiased, like Pillow's;
- a JPEG of more scans or markers than ``preprocess_bytes`` takes (``preprocessing.jpeg_markers``) fails the call
  with INVALID_ARGUMENT, its message naming the same code (``too_many_scans``, ``too_many_markers``), and so does a
  photo of more tags in its EXIF directory or MPF index, or of more images listed there, than it takes
  (``too_many_tags``, ``exif_directories``); the graph reads at most ``MAX_EXIF_TAGS`` of them;
- a GIF is decoded up to the end of its first picture only, as Pillow decodes it, and one of more blocks up to
  there than ``preprocess_bytes`` takes (``preprocessing.gif_blocks``) fails the call with ``too_many_blocks``;
- an animated WebP fails the call with ``animated_webp`` (``_still``), where ``preprocess_bytes`` decodes its first
  frame: TensorFlow's WebP animation decoder is not safe to run.

Pillow and TensorFlow round differently inside decode and resize: tests/test_export_contract.py measures the pixel
difference on real photos and bounds it, and checks that the classifier's top-1 answer is the same.
"""
from __future__ import annotations

from training_job.preprocessing import (
    DEFAULT_LIMITS, GIF_SIGNATURES, MAX_EXIF_TAGS, MAX_GIF_BLOCKS, MAX_JPEG_MARKERS,
)

EXIF_SCAN_BYTES = 1 << 16  # the EXIF block sits in the first segments/chunks of a file
ORIENTATION_TAG = 0x0112
MP_ENTRY_TAG = 0xB002  # an MPF index's list of images, 16 bytes each


def _u16(raw, at, little):
    import tensorflow as tf

    a, b = tf.cast(tf.gather(raw, at), tf.int32), tf.cast(tf.gather(raw, at + 1), tf.int32)
    return tf.where(little, a + b * 256, a * 256 + b)


def _u32(raw, at, little, dtype=None):
    """The 32-bit unsigned integer at ``at``; as int32 (past 2**31 it wraps negative) unless ``dtype`` is wider."""
    import tensorflow as tf

    first, second = (tf.cast(_u16(raw, at + k, little), dtype or tf.int32) for k in (0, 2))
    return tf.where(little, first + second * 65536, first * 65536 + second)


def _find(head, pattern: bytes):
    """Index of the first occurrence of ``pattern`` (ASCII) in ``head`` (a scalar string tensor), or -1: the length
    of what comes before it, by one pass of a string split."""
    import tensorflow as tf

    parts = tf.strings.split(head, sep=pattern.decode("ascii"), maxsplit=1)
    return tf.where(tf.size(parts) > 1, tf.reduce_sum(tf.strings.length(parts[:1])), -1)


def _segment_end(raw, at, marker: int):
    """Where a JPEG segment ends whose data starts at ``at`` when the bytes before it are FF ``marker`` and the
    segment's length; -1 when they are not (or ``at`` is -1)."""
    import tensorflow as tf

    start = tf.maximum(at - 4, 0)
    is_segment = (at >= 4) & tf.equal(tf.gather(raw, start), 0xFF) & tf.equal(tf.gather(raw, start + 1), marker)
    return tf.where(is_segment, at - 2 + _u16(raw, start + 2, False), -1)


def _directory(raw, size, tiff, end):
    """The first directory of the TIFF structure (EXIF, an MPF index) whose header is at ``tiff`` in ``raw`` (of
    ``size`` bytes read) and whose data ends at ``end``, as ``preprocessing._first_directory`` reads it: (valid,
    little-endian, where its tags start, the tags it declares, the tags Pillow reads: those it declares, no more
    than its data holds; 0 when it ends before its directory, or ``end`` is -1)."""
    import tensorflow as tf

    tiff_ok = tf.logical_and(tiff >= 0, tiff + 8 <= size)
    tiff = tf.where(tiff_ok, tiff, 0)
    little = tf.logical_and(tf.equal(tf.gather(raw, tiff), ord("I")), tf.equal(tf.gather(raw, tiff + 1), ord("I")))
    big = tf.logical_and(tf.equal(tf.gather(raw, tiff), ord("M")), tf.equal(tf.gather(raw, tiff + 1), ord("M")))
    magic_ok = tf.logical_and(tf.logical_or(little, big), tf.equal(_u16(raw, tiff + 2, little), 42))
    ifd = tiff + _u32(raw, tiff + 4, little)
    ifd_ok = tf.logical_and(ifd >= tiff + 8, ifd + 2 <= size)
    ifd = tf.where(ifd_ok, ifd, 0)
    valid = tiff_ok & magic_ok & ifd_ok
    declared = tf.where(valid, _u16(raw, ifd, little), 0)
    read = tf.minimum(declared, tf.maximum(0, (end - ifd - 2) // 12 + 1))
    return valid, little, ifd + 2, declared, tf.where(end >= 0, read, 0)


def _tag_values(raw, little, entries_at, tags, within, tag: int, value):
    """``value(entry)`` of each entry of a directory whose tags start at ``entries_at`` that is tag ``tag``, among
    its first ``tags`` (at most MAX_EXIF_TAGS) that end within ``within``."""
    import tensorflow as tf

    entries = entries_at + 12 * tf.range(tf.minimum(tags, MAX_EXIF_TAGS))
    entries = tf.boolean_mask(entries, entries + 12 <= within)
    return tf.boolean_mask(value(entries), tf.equal(_u16(raw, entries, little), tag))


def exif_directories(data):
    """What the bytes signature reads of a photo's EXIF and MPF index (a scalar string tensor): (orientation 1..8, 1
    when absent or unreadable; the tags of its EXIF directory, of its MPF index, and the images that index lists,
    each as ``preprocess_bytes`` counts them for ``too_many_tags``). Read from the first ``EXIF_SCAN_BYTES``, by the
    first ``Exif``/``eXIf``/``EXIF`` and ``MPF`` signatures found there, each bounded by the JPEG segment (APP1,
    APP2) or the PNG or WebP chunk it opens; one of them found outside such a segment counts no tags."""
    import tensorflow as tf

    head = tf.strings.substr(data, 0, EXIF_SCAN_BYTES)
    raw = tf.io.decode_raw(head, tf.uint8)
    raw = tf.concat([raw, tf.zeros([16], tf.uint8)], 0)  # reads just past the end see zeros, never fail
    size = tf.size(raw) - 16
    length = tf.strings.length(data)
    jpeg = _find(head, b"Exif\x00\x00")
    png = _find(head, b"eXIf")
    webp = _find(head, b"EXIF")
    before_png, after_webp = tf.maximum(png - 4, 0), tf.maximum(webp + 4, 0)
    png_end = tf.where(png >= 4, png + 4 + _u32(raw, before_png, False), -1)  # a chunk: length, type, data
    webp_end = tf.where(webp >= 0, webp + 8 + _u32(raw, after_webp, True), -1)  # a RIFF chunk: type, length, data
    tiff = tf.where(jpeg >= 0, jpeg + 6, tf.where(png >= 0, png + 4, tf.where(webp >= 0, webp + 8, -1)))
    end = tf.where(jpeg >= 0, _segment_end(raw, jpeg, 0xE1), tf.where(png >= 0, png_end, webp_end))
    valid, little, entries_at, declared, exif_tags = _directory(raw, size, tiff, tf.minimum(end, length))

    match = _tag_values(raw, little, entries_at, declared, size, ORIENTATION_TAG,
                        lambda entries: _u16(raw, entries + 8, little))  # a SHORT's value
    value = tf.cond(tf.size(match) > 0, lambda: match[0], lambda: tf.constant(1))
    orientation = tf.where(valid & (value >= 1) & (value <= 8), value, 1)

    mpf = _find(head, b"MPF\x00")
    mpf_end = tf.minimum(_segment_end(raw, mpf, 0xE2), length)
    _, little, entries_at, _, mpf_tags = _directory(raw, size, tf.where(mpf >= 0, mpf + 4, -1), mpf_end)
    listed = _tag_values(raw, little, entries_at, mpf_tags, tf.minimum(mpf_end, size), MP_ENTRY_TAG,
                         lambda entries: _u32(raw, entries + 4, little, tf.int64))  # the list's length in bytes
    images = tf.cond(tf.size(listed) > 0, lambda: listed[0] // 16, lambda: tf.constant(0, tf.int64))
    return orientation, exif_tags, mpf_tags, tf.where(mpf_tags <= MAX_EXIF_TAGS, images, 0)


def exif_orientation(data):
    """The EXIF orientation (1..8) of encoded image bytes (a scalar string tensor); 1 when absent or unreadable."""
    return exif_directories(data)[0]


def _checked_tags(data, exif_tags, mpf_tags, mpf_images):
    """``data`` once its EXIF and MPF directories are within the limit ``preprocess_bytes`` holds them to;
    INVALID_ARGUMENT ``too_many_tags`` when not."""
    import tensorflow as tf

    limit = tf.constant(MAX_EXIF_TAGS, tf.int64)
    checks = [tf.debugging.assert_less_equal(tf.cast(count, tf.int64), limit, message=f"too_many_tags: {message}")
              for count, message in (
                  (exif_tags, f"the photo's EXIF holds more than {MAX_EXIF_TAGS} tags in its directory"),
                  (mpf_tags, f"the photo's MPF index holds more than {MAX_EXIF_TAGS} tags in its directory"),
                  (mpf_images, f"the photo's MPF index lists more than {MAX_EXIF_TAGS} images"))]
    with tf.control_dependencies(checks):
        return tf.identity(data)


def apply_orientation(image, orientation):
    """``ImageOps.exif_transpose`` for an (H, W, C) tensor and an orientation 1..8."""
    import tensorflow as tf

    def transpose():
        return tf.transpose(image, [1, 0, 2])

    branches = [
        lambda: image,  # 1 (and anything unexpected)
        lambda: tf.image.flip_left_right(image),  # 2
        lambda: tf.image.rot90(image, 2),  # 3
        lambda: tf.image.flip_up_down(image),  # 4
        transpose,  # 5: Pillow's TRANSPOSE
        lambda: tf.image.rot90(image, 3),  # 6: Pillow's ROTATE_270 (90 degrees clockwise)
        lambda: tf.image.rot90(transpose(), 2),  # 7: Pillow's TRANSVERSE
        lambda: tf.image.rot90(image, 1),  # 8: Pillow's ROTATE_90 (counter-clockwise)
    ]
    index = tf.where((orientation >= 1) & (orientation <= 8), orientation - 1, 0)
    return tf.switch_case(index, branches)


def jpeg_markers(data, max_scans: int, max_markers: int = MAX_JPEG_MARKERS):
    """``preprocessing.jpeg_markers`` as TensorFlow ops: (scans, markers) of a JPEG's picture (a scalar string
    tensor), int32 scalars, counted no further than ``max_scans`` + 1 scans or ``max_markers`` + 1 markers."""
    import tensorflow as tf

    raw = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32)
    size = tf.size(raw)
    raw = tf.concat([raw, tf.zeros([4], tf.int32)], 0)  # reads just past the end see zeros, never fail
    after = raw[1:size + 1]
    # where libjpeg sees a marker: FF, then neither 00 (a stuffed FF), a restart marker (D0-D7) nor another FF
    marker_at = tf.cast(tf.where((raw[:size] == 0xFF) & (after != 0) & (after != 0xFF)
                                 & ((after < 0xD0) | (after > 0xD7)))[:, 0], tf.int32)
    marker_at = tf.concat([marker_at, [size]], 0)  # "none further": a position no search passes

    def more(at, scans, markers, ended):
        return ~ended & (scans <= max_scans) & (markers <= max_markers)

    def next_marker(at, scans, markers, ended):
        at = tf.gather(marker_at, tf.searchsorted(marker_at, [at])[0])
        marker = tf.gather(raw, at + 1)
        ended = (at >= size) | (marker == 0xD9)  # no marker further, or the end of image
        parameterless = (marker == 0x01) | (marker == 0xD8)  # TEM, SOI (restart markers are never found)
        length = tf.where(parameterless, 0, tf.gather(raw, at + 2) * 256 + tf.gather(raw, at + 3))
        counted = tf.cast(~ended, tf.int32)
        return (at + 2 + length, scans + counted * tf.cast(marker == 0xDA, tf.int32), markers + counted, ended)

    _, scans, markers, _ = tf.while_loop(more, next_marker, (tf.constant(2), tf.constant(0), tf.constant(0),
                                                             tf.constant(False)))
    return scans, markers


def _checked_jpeg(data):
    """``data`` once its markers are within the limits ``preprocess_bytes`` holds JPEGs to; INVALID_ARGUMENT,
    with its code first, when not."""
    import tensorflow as tf

    scans, markers = jpeg_markers(data, DEFAULT_LIMITS.max_scans)
    checks = [
        tf.debugging.assert_less_equal(markers, MAX_JPEG_MARKERS, message=(
            f"too_many_markers: the photo is a JPEG of more than {MAX_JPEG_MARKERS} markers before its picture ends")),
        tf.debugging.assert_less_equal(scans, DEFAULT_LIMITS.max_scans, message=(
            f"too_many_scans: the photo is a JPEG of more than {DEFAULT_LIMITS.max_scans} scans")),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(data)


# Where ``gif_blocks`` stands between two steps
_BETWEEN, _EXTENSION, _PICTURE, _ENDED = 0, 1, 2, 3
# Full sub-blocks (255 bytes, as encoders write a picture's data) ``gif_blocks`` steps over at once, at most
_FULL_RUN = 64


def _colour_table_bytes(packed):
    """``preprocessing.gif_colour_table_bytes`` as TensorFlow ops."""
    import tensorflow as tf

    return tf.where(packed >= 0x80, tf.bitwise.left_shift(3, tf.bitwise.bitwise_and(packed, 7) + 1), 0)


def gif_blocks(data, stop_after):
    """``preprocessing.gif_blocks`` as TensorFlow ops: (blocks, end), int32 scalars: the blocks of a GIF (a scalar
    string tensor) up to the end of its first picture, counted no further than ``stop_after`` + 1, and the offset
    just past that picture's data (0 when the count stopped before it, or the GIF has none). A step of a graph loop
    each: a stray byte, an extension's introducer, the picture's descriptor, a sub-block, or a run of up to
    _FULL_RUN full ones (255 bytes; not counted)."""
    import tensorflow as tf

    raw = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32)
    size = tf.size(raw)
    raw = tf.concat([raw, tf.zeros([16], tf.int32)], 0)  # reads just past the end see zeros, never fail
    start = 13 + _colour_table_bytes(raw[10])

    def more(at, blocks, state):
        return (state != _ENDED) & (blocks <= stop_after) & (at < size)

    def step(at, blocks, state):
        byte = tf.gather(raw, at)
        in_sub_blocks = (state == _EXTENSION) | (state == _PICTURE)
        # how many full sub-blocks follow one another from here (none when this one is not full)
        lengths = tf.gather(raw, tf.minimum(at + 256 * tf.range(_FULL_RUN), size))
        full_run = tf.reduce_sum(tf.math.cumprod(tf.cast(lengths == 255, tf.int32)))
        after_descriptor = at + 10 + _colour_table_bytes(tf.gather(raw, at + 9)) + 1  # its table, its code size
        at = tf.where(in_sub_blocks, tf.where(full_run > 0, at + 256 * full_run, at + 1 + byte),
                      tf.where(byte == 0x21, at + 2, tf.where(byte == 0x2C, after_descriptor, at + 1)))
        state = tf.where(in_sub_blocks,
                         tf.where(byte != 0, state, tf.where(state == _PICTURE, _ENDED, _BETWEEN)),
                         tf.where(byte == 0x21, _EXTENSION, tf.where(byte == 0x2C, _PICTURE,
                                                                     tf.where(byte == 0x3B, _ENDED, _BETWEEN))))
        counted = tf.where(in_sub_blocks, tf.cast(full_run == 0, tf.int32),  # a full sub-block is not counted,
                           tf.cast(byte != 0x3B, tf.int32))  # nor the trailer
        return at, blocks + counted, state

    at, blocks, state = tf.while_loop(more, step, (start, tf.constant(0), tf.constant(_BETWEEN)))
    pictured = (state == _ENDED) & (at <= size) & (blocks <= stop_after)
    last = tf.gather(raw, tf.clip_by_value(at - 1, 0, size))  # the empty sub-block that ends a picture's data
    return blocks, tf.where(pictured & (last == 0), at, 0)


def _first_gif_picture(data):
    """A GIF cut after its first picture and closed with the trailer, once its blocks up to there are within the
    limit ``preprocess_bytes`` holds GIFs to; INVALID_ARGUMENT, with its code first, when not. TensorFlow's GIF
    decoder decodes every frame when asked for the first, whose cost a few KB of flat frames multiply; Pillow
    decodes the first alone."""
    import tensorflow as tf

    blocks, end = gif_blocks(data, MAX_GIF_BLOCKS)
    check = tf.debugging.assert_less_equal(blocks, MAX_GIF_BLOCKS, message=(
        f"too_many_blocks: the photo is a GIF of more than {MAX_GIF_BLOCKS} blocks up to the end of its first "
        "picture, besides full ones of 255 bytes"))
    with tf.control_dependencies([check]):
        return tf.cond(end > 0, lambda: tf.strings.join([tf.strings.substr(data, 0, end), ";"]),
                       lambda: tf.identity(data))


def _is_gif(data):
    """Whether encoded bytes (a scalar string tensor) open with a GIF's signature."""
    import tensorflow as tf

    return tf.reduce_any(tf.equal(tf.strings.substr(data, 0, 6), [s.decode() for s in GIF_SIGNATURES]))


def _still(data):
    """``data`` once it is no animated WebP; INVALID_ARGUMENT ``animated_webp`` when it is. TensorFlow's WebP
    animation decoder corrupts its process's memory on animations of large frames (two of 2,000 x 2,000 pixels in
    2 KB: a double free, or a segmentation fault): the server would die of the request. Pillow, in
    ``preprocess_bytes``, decodes the first frame."""
    import tensorflow as tf

    extended = tf.equal(tf.strings.substr(data, 0, 4), "RIFF") & tf.equal(tf.strings.substr(data, 8, 8), "WEBPVP8X")
    flags = tf.io.decode_raw(tf.strings.substr(data, 20, 1), tf.uint8)  # the VP8X chunk's; none when too short
    animated = extended & tf.reduce_any(tf.bitwise.bitwise_and(flags, 2) > 0)  # its animation flag, as libwebp reads it
    check = tf.debugging.assert_equal(animated, False, message=(
        "animated_webp: the bytes signature takes no animated WebP (TensorFlow's decoder of WebP animations is not "
        "safe to run); send a still photo"))
    with tf.control_dependencies([check]):
        return tf.identity(data)


def _decode_jpeg(data, size: int):
    """JPEG at the DCT scale Pillow's draft((size, size)) picks: the largest of 8, 4, 2, 1 <= min(w, h) // size."""
    import tensorflow as tf

    shape = tf.io.extract_jpeg_shape(data)
    scale = tf.minimum(shape[0] // size, shape[1] // size)
    index = tf.where(scale >= 8, 3, tf.where(scale >= 4, 2, tf.where(scale >= 2, 1, 0)))

    def decode(ratio):
        return lambda: tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")

    return tf.switch_case(index, [decode(1), decode(2), decode(4), decode(8)])


def _flatten_over_white(image):
    """(H, W, 1|2|3|4) uint8 -> (H, W, 3) float32 RGB with any alpha composited over white."""
    import tensorflow as tf

    channels = tf.shape(image)[2]
    pixels = tf.cast(image, tf.float32)
    colour = tf.cond(channels < 3, lambda: tf.tile(pixels[:, :, :1], [1, 1, 3]), lambda: pixels[:, :, :3])
    alpha = tf.cond(tf.equal(channels % 2, 0), lambda: pixels[:, :, -1:] / 255.0, lambda: tf.ones_like(pixels[:, :, :1]))
    return tf.round(colour * alpha + 255.0 * (1.0 - alpha))


def decode_and_resize(data, size: int):
    """One encoded photo (scalar string tensor) -> uint8 (size, size, 3), as ``preprocess_bytes`` makes it."""
    import tensorflow as tf

    orientation, *tags = exif_directories(data)
    data = _checked_tags(data, *tags)
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.cast(_decode_jpeg(_checked_jpeg(data), size), tf.float32),
        lambda: _flatten_over_white(tf.io.decode_image(
            tf.cond(_is_gif(data), lambda: _first_gif_picture(data), lambda: _still(data)), channels=0,
            expand_animations=False)))
    image = apply_orientation(image, orientation)
    image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
