"""The preprocessing contract shared by training and serving.

Every photo the project ever shows a model — bottlenecks at training time, the gateway at serving time, the
evaluation and the demo — goes through ``preprocess_bytes``: decode with Pillow (JPEGs at the reduced DCT scale of
``draft``), honour EXIF orientation, flatten to 8-bit RGB over white, resize bilinearly to a square, uint8 out. An
upright 8-bit RGB photo is resized as decoded, never copied first. Normalisation to [-1, 1] happens inside the
exported model (``normalise``), so a client that sends uint8 pixels cannot drift from training.

Changing anything here changes what models see: bump ``PREPROCESSING_VERSION`` (it keys the bottleneck cache and
the gateway's result cache).
"""
from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

PREPROCESSING_VERSION = "pil-draft-bilinear-rgb-white-v1"
DEFAULT_IMAGE_SIZE = 224
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the photo upright, as ImageOps.exif_transpose maps it
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


# The formats a service takes: what phones and browsers send (MPO: a phone's JPEG with more pictures after it).
# Pillow reads every other format it knows with a header reader and a decoder of its own, in Python for most: attack
# surface and cost for photos nobody sends.
SERVICE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "AVIF")


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 60_000_000  # a 40,000 x 40,000 "bomb" is 1.6 G pixels
    max_decode_bytes: int = 256 * 1024 * 1024  # what decoding one photo may hold at once (``decode_bytes``)
    # Scans of a JPEG (``jpeg_markers``): each has the decoder pass over its components' coefficients again, and may
    # be a few bytes, so a photo's decode costs its pixels times its scans. Encoders write at most 18 (libjpeg's
    # progression for four components; 10 for colour, 6 for grey); libjpeg-turbo's own guard is 500.
    max_scans: int = 100
    formats: tuple[str, ...] | None = SERVICE_FORMATS  # the formats opened (Pillow's names); None: any Pillow reads


DEFAULT_LIMITS = Limits()  # photos sent to a service (the gateway's --max-bytes and --max-pixels)
# The user's own photo files (prepare, training, evaluation): nobody else sends them, so they are bounded by what
# decoding one may hold at once, not by a service's guard against costly requests: a 61 MP camera's photo or a
# 200 MP phone's is a photo. 65,535 is the largest side a JPEG can declare.
FILE_LIMITS = Limits(max_bytes=512 * 1024 * 1024, max_pixels=65_535 * 65_535, formats=None)
# open_image's limits replace Pillow's own guard, which would refuse in Image.open any photo beyond 179 M pixels
# whatever the limits asked for; every photo is opened through open_image, which checks them before decoding.
Image.MAX_IMAGE_PIXELS = None
STRIP_PIXELS = 1 << 20  # pixels per band when a photo is flattened to 8-bit RGB (``_by_strips``)


class InvalidImage(ValueError):
    """A photo the contract refuses; ``code`` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# Brands of the ISO base media file (its "ftyp" box opens the file) that mark a HEIF image: Apple's HEIC and kin
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1")


def _sniff_non_image(data: bytes) -> str | None:
    if data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS:
        return ("a HEIC/HEIF photo (an iPhone's default format), which cannot be decoded here: send it as JPEG or "
                "PNG (on an iPhone: Settings > Camera > Formats > Most Compatible)")
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "this is an HTML/XML document, not an image"
    if head.startswith((b"{", b"[")):
        return "this looks like JSON, not an image"
    return None


def _formats_opened(limits: Limits) -> list[str] | None:
    """The formats of ``limits`` this Pillow has a plugin for (None: all of them)."""
    if limits.formats is None:
        return None
    Image.init()
    return [name for name in limits.formats if name in Image.OPEN]


def _in_a_refused_format(data: bytes, limits: Limits) -> bool:
    """Whether Pillow could open ``data`` as a format ``limits`` do not take, told from its first bytes as Image.open
    tells formats apart (some share their first bytes: it names none), without reading further."""
    if limits.formats is None:
        return False
    Image.init()
    return any(name not in limits.formats and Image.OPEN[name][1] is not None and Image.OPEN[name][1](data[:16]) is True
               for name in Image.ID)


def open_image(data: bytes, limits: Limits = DEFAULT_LIMITS, size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """Open (header only) and check the limits for a decode to at least ``size`` pixels a side (a JPEG's DCT
    scale depends on it); raises ``InvalidImage``."""
    if not data:
        raise InvalidImage("empty", "the photo is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidImage("too_large", f"the photo is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    if data[:2] == b"\xff\xd8":  # a JPEG: its markers, then its EXIF's and MPF index's tags, counted before
        _check_jpeg_markers(data, limits)  # Pillow reads them (it reads both directories as it opens a JPEG)
        _check_tags(*jpeg_directories(data))
    elif data[:8] == PNG_SIGNATURE:  # a PNG: its chunks counted before Pillow reads them
        _check_png_chunks(data)
    elif data[:6] in GIF_SIGNATURES:  # a GIF: its blocks up to the end of its first picture counted before
        _check_gif_blocks(data)  # Pillow reads them
    try:
        img = Image.open(io.BytesIO(data), formats=_formats_opened(limits))
    except UnidentifiedImageError:
        if _in_a_refused_format(data, limits):
            raise InvalidImage("unsupported_format", "the photo is in an image format not taken here: send "
                               f"{', '.join(f for f in limits.formats if f != 'MPO')}") from None
        reason = _sniff_non_image(data) or "no image format {} was recognised".format(
            "Pillow knows" if limits.formats is None else "taken here")
        raise InvalidImage("not_an_image", f"not an image: {reason}") from None
    except (OSError, ValueError) as exc:
        raise InvalidImage("not_an_image", f"not a readable image: {exc}") from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise InvalidImage(
            "too_many_pixels",
            f"the photo is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}",
        )
    if width < 1 or height < 1:
        raise InvalidImage("not_an_image", f"the photo has no pixels ({width}x{height})")
    needed = decode_bytes(img, size)
    if needed > limits.max_decode_bytes:
        raise InvalidImage(
            "too_many_pixels",
            f"the photo is {width}x{height} pixels in mode {img.mode} ({img.format}): decoding it would take "
            f"{needed / 2**20:.0f} MB; the limit is {limits.max_decode_bytes / 2**20:.0f} MB"
            + ("" if img.format == "JPEG" else " (a JPEG is decoded at a reduced scale and costs far less)"),
        )
    return img


# In a JPEG's entropy-coded data a byte FF is followed by 00 (a stuffed FF) or a restart marker (D0-D7): the first
# FF followed by anything else (fill bytes FF before a marker skipped) is the next marker, as libjpeg reads it.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOS, _EOI = 0xDA, 0xD9
_PARAMETERLESS = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # TEM, SOI, RSTn: no length follows
# Markers a JPEG may hold before the end of its picture. Pillow reads those before the first scan one turn of a
# Python loop each (and a comment can be 4 bytes), and so does ``jpeg_markers``. Cameras and editors write tens; an
# ICC profile or XMP packet split into 64 KB pieces, a few hundred at most.
MAX_JPEG_MARKERS = 2048


def jpeg_markers(data: bytes, max_scans: int, max_markers: int = MAX_JPEG_MARKERS) -> tuple[int, int]:
    """(scans, markers) of the picture a JPEG's ``data`` opens with, read as libjpeg reads them (a segment by its
    length, a scan's data up to the next marker, stray bytes between them skipped) up to its end of image, and no
    further than ``max_scans`` + 1 scans or ``max_markers`` + 1 markers. Bytes FF DA elsewhere (a comment, an EXIF
    thumbnail, what follows the picture: a phone's motion photo appends its video) are no scans of it."""
    scans = markers = 0
    at = 2  # after the start of image
    while scans <= max_scans and markers <= max_markers:
        found = _NEXT_MARKER.search(data, at)
        if found is None:
            break
        at, marker = found.start(), data[found.start() + 1]
        if marker == _EOI:
            break
        markers += 1
        if marker in _PARAMETERLESS:
            at += 2
            continue
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
        scans += marker == _SOS
    return scans, markers


def jpeg_directories(data: bytes) -> tuple[bytes, bytes]:
    """(exif, mp): a JPEG's EXIF and MPF index as Pillow's reader keeps them from the segments before its first
    scan: the data of every APP1 ``Exif`` segment joined (the first with its ``Exif\\0\\0`` header), and the last
    APP2 ``MPF`` segment's after its header. Read once its markers are within the limit."""
    exif, mp, at = [], b"", 2  # after the start of image
    while found := _NEXT_MARKER.search(data, at):
        at, marker = found.start(), data[found.start() + 1]
        if marker in (_SOS, _EOI):
            break
        if marker in _PARAMETERLESS:
            at += 2
            continue
        end = at + 2 + int.from_bytes(data[at + 2:at + 4], "big")
        if marker == 0xE1 and data.startswith(b"Exif\0\0", at + 4):
            exif.append(data[at + (10 if exif else 4):end])
        elif marker == 0xE2 and data.startswith(b"MPF\0", at + 4):
            mp = data[at + 8:end]
        at = end
    return b"".join(exif), mp


def _check_jpeg_markers(data: bytes, limits: Limits) -> None:
    scans, markers = jpeg_markers(data, limits.max_scans)
    if markers > MAX_JPEG_MARKERS:
        raise InvalidImage(
            "too_many_markers",
            f"the photo is a JPEG of more than {MAX_JPEG_MARKERS} markers (segments and scans) before its picture "
            f"ends; the limit is {MAX_JPEG_MARKERS} (cameras and editors write tens)")
    if scans > limits.max_scans:
        raise InvalidImage(
            "too_many_scans",
            f"the photo is a JPEG of more than {limits.max_scans} scans; the limit is {limits.max_scans} (cameras "
            "and encoders write at most 18): each scan costs a pass over the whole picture")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks a PNG may hold: Pillow reads each one turn of a Python loop, those around the image data too. Encoders
# split the compressed pixels into chunks of 8 KB (libpng) or more; a chunk per KB of the file, and 2,048 besides,
# is more than any writes.
PNG_CHUNKS_BESIDES = 2048
PNG_BYTES_PER_CHUNK = 1024


def png_chunks(data: bytes, stop_after: int) -> int:
    """The chunks of a PNG's ``data`` (its signature skipped), each by its length, up to its IEND, and no further
    than ``stop_after`` + 1."""
    chunks, at = 0, len(PNG_SIGNATURE)
    while chunks <= stop_after and at + 8 <= len(data):
        chunks += 1
        if data[at + 4:at + 8] == b"IEND":
            break
        at += 12 + int.from_bytes(data[at:at + 4], "big")  # length, type, the data, its CRC
    return chunks


def _check_png_chunks(data: bytes) -> None:
    limit = PNG_CHUNKS_BESIDES + len(data) // PNG_BYTES_PER_CHUNK
    if png_chunks(data, limit) > limit:
        raise InvalidImage(
            "too_many_chunks",
            f"the photo is a PNG of more than {limit} chunks; the limit is one per {PNG_BYTES_PER_CHUNK} bytes of it "
            f"and {PNG_CHUNKS_BESIDES} besides (encoders write image data in chunks of 8 KB or more)")


GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
# Blocks a GIF may hold up to the end of its first picture, besides full sub-blocks (of 255 bytes: encoders write a
# picture's data, a comment or an ICC profile in them). Pillow reads each sub-block of an extension and each stray
# byte between extensions in a turn of a Python loop; the SavedModel's predict_image_bytes steps through them all
# in a turn of a graph loop, full sub-blocks a run at a time, to decode the first picture alone
# (``preprocessing_graph.gif_blocks``). An XMP packet, whose text a reader takes for sub-block lengths, makes a few
# thousand at most.
MAX_GIF_BLOCKS = 8192
_GIF_BLOCK_START = re.compile(rb"[!,;]")  # an extension, the image descriptor, the trailer: any other byte is stray


def gif_colour_table_bytes(packed: int) -> int:
    """The bytes of the colour table a GIF's screen or image descriptor declares in its ``packed`` byte (0: none)."""
    return 3 << ((packed & 7) + 1) if packed & 0x80 else 0


def gif_header_bytes(data: bytes) -> int:
    """Where a GIF's blocks start: after its header (13 bytes) and its global colour table."""
    return 13 + gif_colour_table_bytes(data[10] if len(data) > 10 else 0)


def _sub_blocks(data: bytes, at: int, blocks: int, stop_after: int) -> tuple[int, int]:
    """(where they end, ``blocks`` counted on: the full ones are not) of the sub-blocks at ``at``, up to the empty one
    that ends them."""
    while blocks <= stop_after and at < len(data):
        length = data[at]
        at += 1 + length
        blocks += length != 255
        if not length:
            break
    return at, blocks


def gif_blocks(data: bytes, stop_after: int) -> int:
    """The blocks of a GIF's ``data`` up to the end of its first picture (an extension's introducer, and each of its
    sub-blocks up to the empty one that ends them; each stray byte; the picture's descriptor, and each sub-block of
    its data), the full sub-blocks aside, and no further than ``stop_after`` + 1."""
    at, blocks = gif_header_bytes(data), 0
    while blocks <= stop_after and at < len(data):
        end = min(len(data), at + stop_after + 1 - blocks)  # no further than the stray bytes that would pass it
        found = _GIF_BLOCK_START.search(data, at, end)
        blocks += (found.start() if found else end) - at  # stray bytes
        if found is None or data[found.start()] == 0x3B:  # the end, or the trailer: no picture
            break
        at = found.start()
        if data[at] == 0x2C:  # the picture: its descriptor, local colour table and code size, then its data
            at += 10 + gif_colour_table_bytes(data[at + 9] if at + 9 < len(data) else 0) + 1
            return _sub_blocks(data, at, blocks + 1, stop_after)[1]
        at, blocks = _sub_blocks(data, at + 2, blocks + 1, stop_after)  # after the introducer and the label
    return blocks


def _check_gif_blocks(data: bytes) -> None:
    if gif_blocks(data, MAX_GIF_BLOCKS) > MAX_GIF_BLOCKS:
        raise InvalidImage(
            "too_many_blocks",
            f"the photo is a GIF of more than {MAX_GIF_BLOCKS} blocks up to the end of its first picture, besides "
            f"full ones of 255 bytes; the limit is {MAX_GIF_BLOCKS} (encoders write pictures, comments and profiles "
            "in full blocks)")


# Tags of a photo's EXIF directory (the first: Pillow reads no other to orient a photo) and of a JPEG's MPF index,
# and the images that index lists: Pillow reads each one turn of a Python loop, and a tag takes 12 bytes. Cameras
# write tens of tags and list two or three images. The SavedModel's predict_image_bytes refuses the same photos
# (``preprocessing_graph.exif_directories``).
MAX_EXIF_TAGS = 512
# The TIFF headers Pillow reads a directory after (its TiffImagePlugin.PREFIXES) and their byte orders; a BigTIFF
# header fails in its EXIF and MPF readers, which read 8 bytes of header, before any tag.
_TIFF_HEADERS = {b"MM\x00\x2a": ">", b"II\x2a\x00": "<", b"MM\x2a\x00": ">", b"II\x00\x2a": "<"}


def _first_directory(tiff: bytes) -> tuple[str, int, int]:
    """(byte order, where the tags start, how many Pillow reads) of the first directory of a TIFF structure (EXIF,
    ``Exif\\0\\0`` before it or not; an MPF index), as Pillow's ImageFileDirectory reads it: no further than the
    data holds. ("", 0, 0) when Pillow reads none."""
    start = 6 * (tiff.startswith(b"Exif\0\0") + tiff.startswith(b"Exif\0\0Exif\0\0"))
    order = _TIFF_HEADERS.get(tiff[start:start + 4])
    if order is None or len(tiff) < start + 8:
        return "", 0, 0
    counted = start + int.from_bytes(tiff[start + 4:start + 8], "little" if order == "<" else "big")
    count = int.from_bytes(tiff[counted:counted + 2], "little" if order == "<" else "big")
    return order, counted + 2, min(count, max(0, (len(tiff) - counted - 2) // 12 + 1))


def mpo_images(mp: bytes) -> int:
    """The images a JPEG's MPF index lists, as many as Pillow reads: its MP entries, 16 bytes each. Read once its
    directory's tags are within the limit."""
    order, entries, count = _first_directory(mp)
    if not order or count > MAX_EXIF_TAGS:
        return 0
    whole = min(count, (len(mp) - entries) // 12)  # the tags the data holds in full
    for tag, _, length, _ in struct.iter_unpack(order + "HHL4s", mp[entries:entries + 12 * whole]):
        if tag == 0xB002:
            return length // 16
    return 0


def _check_tags(exif: bytes | None, mp: bytes = b"") -> None:
    for what, tiff in (("EXIF", exif or b""), ("MPF index", mp)):
        if _first_directory(tiff)[2] > MAX_EXIF_TAGS:
            raise InvalidImage(
                "too_many_tags",
                f"the photo's {what} holds more than {MAX_EXIF_TAGS} tags in its directory; the limit is "
                f"{MAX_EXIF_TAGS} (cameras write tens)")
    if mpo_images(mp) > MAX_EXIF_TAGS:
        raise InvalidImage(
            "too_many_tags",
            f"the photo's MPF index lists more than {MAX_EXIF_TAGS} images; the limit is {MAX_EXIF_TAGS} "
            "(cameras write two or three)")


def exif_pillow_reads(info: dict) -> bytes | None:
    """The EXIF of an opened (or loaded: a PNG's may follow its pixels) photo, where ``Image.getexif`` finds it."""
    if "exif" in info:
        return info["exif"]
    raw = info.get("Raw profile type exif")  # a PNG text chunk of hexadecimal (ImageMagick's)
    if isinstance(raw, str):
        try:
            return bytes.fromhex("".join(raw.split("\n")[3:]))
        except ValueError:
            return None
    return None


def decode_bytes(header: Image.Image, size: int = DEFAULT_IMAGE_SIZE) -> int:
    """What decoding an opened photo to at least ``size`` pixels a side and flattening it to 8-bit RGB hold at once,
    as Pillow stores images: the decoded photo (1 byte per pixel in 8-bit single-band modes, 2 in 16-bit ones, 4 in
    any other) and its RGB copy (4 bytes per pixel) unless it is decoded as RGB. A JPEG's pixels are those of the
    DCT scale ``load_pillow`` decodes it at."""
    width, height = header.size
    if header.format == "JPEG":
        scale = jpeg_draft_scale(width, height, size)
        width, height = -(-width // scale), -(-height // scale)
    stored = 1 if header.mode in ("1", "L", "P") else 2 if header.mode.startswith("I;16") else 4
    return width * height * (stored + (0 if header.mode == "RGB" else 4))


def jpeg_draft_scale(width: int, height: int, size: int) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow's ``draft(mode, (size, size))`` decodes a JPEG at: the largest that keeps
    both sides at least ``size``."""
    return next(scale for scale in (8, 4, 2, 1) if scale == 1 or min(width, height) // scale >= size)


def _by_strips(img: Image.Image, mode: str, convert) -> Image.Image:
    """``convert`` (a per-pixel conversion to ``mode``) applied to ``img`` a band of rows at a time: the same pixels as
    converting it whole, without full-size temporaries (a 60 M pixel photo stays within its decoded size)."""
    out = Image.new(mode, img.size)
    rows = max(1, STRIP_PIXELS // img.width)
    for top in range(0, img.height, rows):
        box = (0, top, img.width, min(top + rows, img.height))
        out.paste(convert(img.crop(box)), box[:2])
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        peak = 65535 if img.mode.startswith("I;16") or img.getextrema()[1] > 255 else 255
        img = _by_strips(img, "L", lambda strip: Image.fromarray(
            (np.asarray(strip, dtype=np.uint32) * 255 // peak).astype(np.uint8), "L"))
    elif img.mode == "F":
        img = _by_strips(img, "L", lambda strip: Image.fromarray(
            np.clip(np.asarray(strip), 0, 255).astype(np.uint8), "L"))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        def over_white(strip: Image.Image) -> Image.Image:
            rgba = strip.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")

        return _by_strips(img, "RGB", over_white)
    return img if img.mode == "RGB" else img.convert("RGB")


def load_pillow(header: Image.Image, size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """``header`` (an opened photo) decoded as stored, JPEGs at the smallest ``draft`` scale that stays >= ``size``."""
    if header.format == "JPEG":
        header.draft("RGB", (size, size))
    header.load()
    return header


def exif_orientation(loaded: Image.Image) -> int:
    """The photo's EXIF orientation (1..8; 1 when untagged), read as ``ImageOps.exif_transpose`` reads it. Raises
    ``InvalidImage`` for more tags than the limit, before Pillow reads them."""
    _check_tags(exif_pillow_reads(loaded.info))
    return loaded.getexif().get(ORIENTATION_TAG, 1)


def orient(img: Image.Image, orientation: int) -> Image.Image:
    """The stored pixels turned upright for ``orientation``: ``img`` itself when they already are (no copy)."""
    method = UPRIGHT.get(orientation)
    return img if method is None else img.transpose(method)


def upright_rgb(loaded: Image.Image) -> Image.Image:
    """A decoded photo turned upright from its EXIF orientation and flattened to 8-bit RGB."""
    return _to_rgb(orient(loaded, exif_orientation(loaded)))


def decode_image(data: bytes, size: int = DEFAULT_IMAGE_SIZE, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """Decoded, upright, 8-bit RGB image; JPEGs are decoded at the smallest scale that stays >= ``size``."""
    return decode_opened(open_image(data, limits, size), size)


def decode_opened(img: Image.Image, size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """``decode_image`` of a photo ``open_image`` has opened (and checked against the limits)."""
    try:
        return upright_rgb(load_pillow(img, size))
    except InvalidImage:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage("corrupt", f"the image data is damaged or truncated: {exc}") from None


def resize_pixels(img: Image.Image, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Bilinear resize to ``size`` x ``size`` (the aspect ratio is not kept, as in retrain.py): uint8 (H, W, 3)."""
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def preprocess_bytes(data: bytes, size: int = DEFAULT_IMAGE_SIZE, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Encoded photo bytes -> uint8 pixels (size, size, 3). The one function training and serving share."""
    return preprocess_opened(open_image(data, limits, size), size)


def preprocess_opened(img: Image.Image, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """``preprocess_bytes`` of a photo ``open_image`` has opened: for a caller that read its header first (the
    gateway, to choose where to decode it)."""
    return resize_pixels(decode_opened(img, size), size)


def load_image_file(path: str | Path, size: int = DEFAULT_IMAGE_SIZE, limits: Limits = FILE_LIMITS) -> np.ndarray:
    """``preprocess_bytes`` of one of the user's own photo files."""
    return preprocess_bytes(Path(path).read_bytes(), size, limits)


def normalise_numpy(pixels: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], as MobileNet was trained (x / 127.5 - 1)."""
    return pixels.astype(np.float32) / 127.5 - 1.0


def normalise(pixels):
    """The same as ``normalise_numpy`` as TensorFlow ops, for use inside exported graphs."""
    import tensorflow as tf

    return tf.cast(pixels, tf.float32) / 127.5 - 1.0
