"""Phone-size photos for the load test. A phone sends a JPEG of about 12 MP and a few MB, often stored sideways with an
EXIF orientation; the shared photos are mostly small (a median of 13 KB, ~50 k pixels), so without these the gateway's
decode of a large JPEG would go unmeasured. ``phone_photos`` makes a few from the largest of the load test's photos,
once, into a folder where later runs find them."""
from __future__ import annotations

import hashlib
import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from training_job.paths import var_dir

PHONE_PHOTOS = 4
PHONE_PIXELS = 12_000_000  # 4000 x 3000, a phone camera's usual size
QUALITY = 90
GRAIN = 6  # +- grey levels of noise, a sensor's grain: without it a small photo upscaled to 12 MP is ~0.8-1 MB,
# far smoother than a phone's; with it 2-3 MB
RECIPE = f"{PHONE_PIXELS // 1_000_000}mp-q{QUALITY}-grain{GRAIN}"  # in the files' names: a new recipe, new files
ORIENTATION_TAG = 0x0112
SIDEWAYS = 6  # EXIF orientation of a photo taken upright: the pixels are stored turned, to be turned 90 deg clockwise


def default_folder() -> Path:
    return var_dir() / "loadtests" / "phone-photos"


def largest(paths: list[Path], count: int) -> list[Path]:
    """The ``count`` photos of the most pixels (header reads only), the larger first."""
    def pixels(path: Path) -> int:
        with Image.open(path) as image:
            return image.width * image.height

    return sorted(paths, key=lambda path: (-pixels(path), str(path)))[:count]


def phone_photo(photo: bytes, seed: int, sideways: bool) -> bytes:
    """``photo`` as a phone would send it: upright, scaled to PHONE_PIXELS (aspect kept), with grain, a JPEG of
    quality QUALITY; ``sideways``: its pixels turned and EXIF orientation 6 (as when the phone was held upright),
    else orientation 1."""
    with Image.open(io.BytesIO(photo)) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
    scale = math.sqrt(PHONE_PIXELS / (upright.width * upright.height))
    large = upright.resize((round(upright.width * scale), round(upright.height * scale)), Image.Resampling.BICUBIC)
    pixels = np.asarray(large, dtype=np.int16)
    pixels = pixels + np.random.default_rng(seed).integers(-GRAIN, GRAIN + 1, pixels.shape, dtype=np.int16)
    stored = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = SIDEWAYS if sideways else 1
    if sideways:
        stored = stored.rotate(90, expand=True)  # counter-clockwise: orientation 6 turns it back clockwise
    out = io.BytesIO()
    stored.save(out, "JPEG", quality=QUALITY, exif=exif.tobytes())
    return out.getvalue()


def phone_photos(paths: list[Path], folder: Path | None = None) -> list[Path]:
    """PHONE_PHOTOS phone-size JPEGs (``phone_photo``) made from the largest of ``paths``, every other one sideways,
    in ``folder`` (default var/loadtests/phone-photos). Each is named by its source's sha1 and the recipe, made only
    when missing (about a second each) and written whole or not at all. run.py makes them before locust starts:
    seconds of work in the locustfile's import ended a 3 s --run-time 0.2 s after the users started."""
    folder = folder or default_folder()
    made = []
    for index, source in enumerate(largest(paths, PHONE_PHOTOS)):
        photo = source.read_bytes()
        digest = hashlib.sha1(photo).hexdigest()[:16]
        sideways = index % 2 == 1
        target = folder / f"{digest}-{RECIPE}-orientation{SIDEWAYS if sideways else 1}.jpg"
        if not target.exists():
            folder.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}")
            partial.write_bytes(phone_photo(photo, int(digest, 16), sideways))
            partial.replace(target)
        made.append(target)
    return made
