"""Drawing Grad-CAM heatmaps (numpy and Pillow only, no TensorFlow): the gateway's PNG overlay and the training
report's contact sheet of misclassified photos.

A heatmap is a float array (h, w) in [0, 1] (the ``heatmap`` output of the explain signatures). It is upsampled
bilinearly (Pillow's, pixel centres aligned as ``tf.image.resize`` aligns them) to the size it is drawn at, then
coloured with ``PALETTE`` (dark blue, cyan, green, yellow, red for 0 -> 1) and made transparent where the heat is low
(``ALPHA``), so laid over the photo it shows the photo through the cold parts.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([(48, 18, 59), (40, 160, 230), (60, 220, 90), (250, 200, 30), (200, 20, 10)], float)
PALETTE = np.stack([np.interp(np.linspace(0, 1, 256), _STOPS, _COLOURS[:, c]) for c in range(3)], axis=1).round(
).astype(np.uint8)  # (256, 3): the colour of each heat level 0..255
ALPHA = np.clip(np.arange(256) * 1.25, 0, 255).round().astype(np.uint8)  # transparent at 0, opaque from 80 % up


def upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (height, width) heat levels for a drawing of ``size`` = (width, height). The map is quantised to 256
    levels before the bilinear resize (8-bit resizing is over ten times faster than float's for a 12-megapixel
    photo, and differs from it by at most 1.5 levels)."""
    levels = np.clip(np.asarray(heatmap, np.float32) * 255.0, 0, 255).round().astype(np.uint8)
    return np.asarray(Image.fromarray(levels, "L").resize(size, Image.BILINEAR))


def overlay_png(heatmap: np.ndarray, size: tuple[int, int]) -> bytes:
    """A palette PNG of ``size`` = (width, height): the coloured heatmap with per-level transparency, to be laid
    over the photo displayed at that size."""
    image = Image.fromarray(upsample(heatmap, size), "P")
    image.putpalette(PALETTE.tobytes())
    out = io.BytesIO()
    image.save(out, "PNG", transparency=ALPHA.tobytes(), compress_level=3)
    return out.getvalue()


def blend(photo: Image.Image, heatmap: np.ndarray, opacity: float = 0.6) -> Image.Image:
    """The photo with the coloured heatmap laid over it (``opacity`` scales the heatmap's own transparency)."""
    photo = photo.convert("RGB")
    levels = upsample(heatmap, photo.size)
    colour = Image.fromarray(PALETTE[levels], "RGB")
    mask = Image.fromarray((ALPHA[levels].astype(np.float32) * opacity).round().astype(np.uint8), "L")
    return Image.composite(colour, photo, mask)


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened (header-only) image as shown, i.e. after its EXIF orientation."""
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def contact_sheet(entries: list[dict], columns: int = 2, tile: int = 160) -> Image.Image:
    """A sheet of ``entries`` ({"photo": PIL image, "caption": str, "panels": [(title, heatmap), ...]}): each
    entry is the photo then one blended panel per heatmap, with its caption above."""
    if not entries:
        sheet = Image.new("RGB", (4 * tile, tile // 2), "white")
        ImageDraw.Draw(sheet).text((10, tile // 5), "no misclassified photos in the test split", fill="black")
        return sheet
    panels = 1 + max(len(e["panels"]) for e in entries)
    caption_h, pad = 30, 8
    cell_w, cell_h = panels * (tile + pad) + pad, tile + caption_h + pad
    rows = -(-len(entries) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, entry in enumerate(entries):
        x0, y0 = (i % columns) * cell_w, (i // columns) * cell_h
        photo = entry["photo"].convert("RGB").resize((tile, tile), Image.BILINEAR)  # squared, as the model sees it
        draw.text((x0 + pad, y0 + 2), entry["caption"], fill="black")
        sheet.paste(photo, (x0 + pad, y0 + caption_h))
        for j, (title, heatmap) in enumerate(entry["panels"], start=1):
            x = x0 + pad + j * (tile + pad)
            sheet.paste(blend(photo, heatmap), (x, y0 + caption_h))
            draw.text((x, y0 + caption_h - 13), title, fill="black")
    return sheet
