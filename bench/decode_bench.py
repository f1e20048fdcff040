"""CPU time per photo of the preprocessing contract (``preprocess_bytes``) and of the decode paths it could take, on
the shared photos, in one thread (``time.process_time``), split into decode / orientation + RGB conversion / resize.

Paths (each ends in the contract's bilinear resize to 224 x 224 unless said otherwise):
- ``pillow_before``: Pillow's ``draft`` + load, ``ImageOps.exif_transpose`` + ``convert`` (each a copy), resize: the
  contract before the copies were left out;
- ``pillow``: the same without those copies (``load_pillow``, ``upright_rgb``, ``resize_pixels``): the contract now;
- ``pillow_reduce``: ``pillow``, then ``Image.reduce`` by the whole factor still left after ``draft``, then the resize;
- ``pillow_reducing_gap``: ``pillow`` with ``resize(reducing_gap=2.0)`` (Pillow reduces, then resizes);
- ``turbo_draft_scale``: YCbCr/grey JPEGs by libjpeg-turbo's own API (simplejpeg) at ``draft``'s scale, accurate DCT,
  turned upright from the EXIF tag (Pillow's pixels bit for bit);
- ``turbo_min_size``: simplejpeg's own ``min_height``/``min_width`` = 224 (libjpeg-turbo's finer M/8 scales);
- ``turbo_fast``: ``turbo_draft_scale`` with ``fastdct`` and ``fastupsample``;
- ``preprocess_bytes``: the contract as shipped, one call (not split).
A libjpeg-turbo path hands what it does not decode (PNG, CMYK, damaged data) to Pillow, timed in its stages. The
simplejpeg paths run where simplejpeg is installed (it is not a requirement: not measurably faster end to end than
``pillow``), PyTurboJPEG where it and its native library (Debian's libturbojpeg0) load; otherwise each is recorded
as skipped with the reason. Each path's pixels are compared with ``pillow_before``'s (mean and largest absolute
difference, photos identical). Each photo runs every path --rounds times, interleaved; its least disturbed run
counts (see ``measure``).

Usage: python -m bench.decode_bench [--data DIR] [--photos 200] [--rounds 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from bench.common import sample_photos, write_result
from training_job.paths import shared_data_dir
from training_job.preprocessing import (
    exif_orientation, load_pillow, open_image, orient, preprocess_bytes, resize_pixels, upright_rgb,
)

SIZE = 224
STAGES = ("decode", "orient_convert", "resize")
REFERENCE_PATH, CONTRACT_PATH = "pillow_before", "pillow"
TURBO_COLOURSPACES = ("YCbCr", "Gray")  # JPEG colour spaces libjpeg-turbo turns into Pillow's RGB pixels


class Laps:
    """Process CPU time added up per stage: ``start()`` before a photo, ``lap(stage)`` after each stage."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.last = 0.0

    def start(self) -> None:
        self.last = time.process_time()

    def lap(self, stage: str) -> None:
        now = time.process_time()
        self.seconds[stage] += now - self.last
        self.last = now


def upright_rgb_with_copies(loaded: Image.Image) -> Image.Image:
    """The contract's orientation and conversion as first written: ``exif_transpose`` and ``convert`` copy even an
    upright RGB photo (``upright_rgb`` then finds no tag left and flattens any other mode)."""
    upright = ImageOps.exif_transpose(loaded)
    return upright.convert("RGB") if upright.mode == "RGB" else upright_rgb(upright)


def pillow_stages(header: Image.Image, laps: Laps, resize, upright=upright_rgb) -> np.ndarray:
    loaded = load_pillow(header, SIZE)
    laps.lap("decode")
    img = upright(loaded)
    laps.lap("orient_convert")
    pixels = resize(img)
    laps.lap("resize")
    return pixels


def reduce_then_resize(img: Image.Image) -> np.ndarray:
    factor = min(img.width // SIZE, img.height // SIZE)
    return resize_pixels(img.reduce(factor) if factor >= 2 else img, SIZE)


def resize_with_reducing_gap(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((SIZE, SIZE), Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8)


def contract_resize(img: Image.Image) -> np.ndarray:
    return resize_pixels(img, SIZE)


def draft_scale(width: int, height: int) -> int:
    """The DCT scale denominator Pillow's ``draft`` picks: the largest of 8, 4, 2 <= min(width, height) // SIZE,
    else 1."""
    fits = min(width // SIZE, height // SIZE)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def turbo_stages(data: bytes, laps: Laps, decode) -> np.ndarray:
    """``decode(header, data)`` -> the stored pixels as an image, or None to hand the photo to Pillow."""
    header = open_image(data)
    stored = decode(header, data)
    if stored is None:
        return pillow_stages(header, laps, contract_resize)
    laps.lap("decode")
    img = orient(stored, exif_orientation(header))
    laps.lap("orient_convert")
    pixels = resize_pixels(img, SIZE)
    laps.lap("resize")
    return pixels


def simplejpeg_paths() -> tuple[dict, str | None]:
    """The libjpeg-turbo paths through simplejpeg, or ({}, why not)."""
    try:
        import simplejpeg
    except ImportError as exc:
        return {}, f"simplejpeg is not installed ({exc})"

    def decoder(fast: bool, draft: bool):
        def decode(header: Image.Image, data: bytes) -> Image.Image | None:
            if header.format != "JPEG":
                return None
            width, height = header.size
            scale = draft_scale(width, height)
            try:
                if simplejpeg.decode_jpeg_header(data)[2] not in TURBO_COLOURSPACES:
                    return None
                pixels = simplejpeg.decode_jpeg(data, "RGB", fastdct=fast, fastupsample=fast, strict=True,
                                                min_height=-(-height // scale) if draft else SIZE,
                                                min_width=-(-width // scale) if draft else SIZE)
            except ValueError:  # damaged, or only a warning: Pillow decides
                return None
            return Image.fromarray(pixels, "RGB")

        return lambda data, laps: turbo_stages(data, laps, decode)

    return {"turbo_draft_scale": decoder(fast=False, draft=True), "turbo_min_size": decoder(fast=False, draft=False),
            "turbo_fast": decoder(fast=True, draft=True)}, None


def pyturbojpeg_path():
    """(path, None) where PyTurboJPEG and its native library load, else (None, the reason)."""
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG
    except ImportError as exc:
        return None, f"PyTurboJPEG is not installed ({exc}); it also needs Debian's libturbojpeg0 (apt install)"
    try:
        turbo = TurboJPEG()
    except (OSError, RuntimeError) as exc:
        return None, f"libturbojpeg does not load ({exc}); Debian's libturbojpeg0 needs an apt install"

    def decode(header: Image.Image, data: bytes) -> Image.Image | None:
        if header.format != "JPEG" or header.mode not in ("RGB", "L"):
            return None
        try:
            pixels = turbo.decode(data, pixel_format=TJPF_RGB, scaling_factor=(1, draft_scale(*header.size)))
        except (OSError, ValueError):
            return None
        return Image.fromarray(pixels, "RGB")

    return (lambda data, laps: turbo_stages(data, laps, decode)), None


def contract_unsplit(data: bytes, laps: Laps) -> np.ndarray:
    pixels = preprocess_bytes(data, SIZE)
    laps.lap("decode")  # the whole call; reported as its total only
    return pixels


PATHS = {
    REFERENCE_PATH: lambda data, laps: pillow_stages(open_image(data), laps, contract_resize, upright_rgb_with_copies),
    CONTRACT_PATH: lambda data, laps: pillow_stages(open_image(data), laps, contract_resize),
    "pillow_reduce": lambda data, laps: pillow_stages(open_image(data), laps, reduce_then_resize),
    "pillow_reducing_gap": lambda data, laps: pillow_stages(open_image(data), laps, resize_with_reducing_gap),
    "preprocess_bytes": contract_unsplit,
}


def run_once(path, data: bytes) -> tuple[dict, np.ndarray]:
    laps = Laps()
    laps.start()
    pixels = path(data, laps)
    return laps.seconds, pixels


def pixel_difference(outputs: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    differences = [np.abs(a.astype(np.int16) - b) for a, b in zip(outputs, reference)]
    return {"mean_abs": round(float(np.mean([d.mean() for d in differences])), 4),
            "max_abs": int(max(d.max() for d in differences)),
            "identical_photos": sum(int(not d.any()) for d in differences)}


def measure(paths: dict, photos: list[bytes], rounds: int) -> dict:
    """Each photo through every path ``rounds`` times, interleaved (path after path, photo by photo); a photo's
    figure on a path is its least disturbed run (the smallest total), so a burst of other work on a shared machine
    does not land on one path only. Stage figures are means over the photos, in ms."""
    stage_ms = {name: dict.fromkeys(STAGES, 0.0) for name in paths}
    outputs = {name: [] for name in paths}
    for data in photos:
        best = {}
        for _ in range(rounds):
            for name, path in paths.items():
                seconds, pixels = run_once(path, data)
                if name not in best:
                    outputs[name].append(pixels)
                if name not in best or sum(seconds.values()) < sum(best[name].values()):
                    best[name] = seconds
        for name in paths:
            for stage in STAGES:
                stage_ms[name][stage] += best[name][stage] * 1000 / len(photos)
    out = {}
    for name, ms in stage_ms.items():
        ms["total"] = sum(ms.values())
        if name == "preprocess_bytes":
            ms = dict.fromkeys(STAGES) | {"total": ms["total"]}
        out[name] = {"ms_per_photo": ms, "pixels_vs_before": pixel_difference(outputs[name], outputs[REFERENCE_PATH])}
    for row in out.values():
        row["vs_before"] = row["ms_per_photo"]["total"] / out[REFERENCE_PATH]["ms_per_photo"]["total"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=shared_data_dir() / "mushrooms",
                        help="photos in <class>/<photo> folders")
    parser.add_argument("--photos", type=int, default=200, help="photos spread over the folder")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each photo through each path")
    args = parser.parse_args(argv)
    if not any(args.data.glob("*/*")):
        print(f"no photos in {args.data}: the decode bench needs the shared photos (../shared); nothing measured")
        return 0
    photos = [p.read_bytes() for p in sample_photos(args.photos, args.data)]
    turbo_paths, simplejpeg_skipped = simplejpeg_paths()
    pyturbojpeg, pyturbojpeg_skipped = pyturbojpeg_path()
    paths = {**PATHS, **turbo_paths, **({"pyturbojpeg": pyturbojpeg} if pyturbojpeg else {})}
    measured = measure(paths, photos, args.rounds)
    result = {"data": str(args.data), "photos": len(photos), "size": SIZE, "rounds": args.rounds,
              "jpeg_photos": sum(open_image(p).format == "JPEG" for p in photos),
              "reference_path": REFERENCE_PATH, "contract_path": CONTRACT_PATH, "paths": measured,
              "skipped": {name: why for name, why in (("simplejpeg", simplejpeg_skipped),
                                                      ("pyturbojpeg", pyturbojpeg_skipped)) if why}}
    print(f"{len(photos)} photos ({result['jpeg_photos']} JPEG), CPU ms per photo, one thread, least of "
          f"{args.rounds} runs each:")
    for name, row in measured.items():
        ms, px = row["ms_per_photo"], row["pixels_vs_before"]
        split = "" if ms["decode"] is None else " (" + ", ".join(f"{s} {ms[s]:.3f}" for s in STAGES) + ")"
        print(f"  {name:20s} {ms['total']:.3f} ms{split}  {row['vs_before']:.3f}x {REFERENCE_PATH}; pixels vs it: "
              f"mean {px['mean_abs']:.3f}, max {px['max_abs']}, identical {px['identical_photos']}/{len(photos)}")
    for name, why in result["skipped"].items():
        print(f"  {name} skipped: {why}")
    write_result("decode", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
