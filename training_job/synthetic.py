"""A drawn stand-in dataset of the tutorial's five species, for machines with no photos at all.

It lets the whole pipeline (prepare -> train -> publish -> serve) run end to end on a fresh machine. The drawings
only resemble mushrooms to a pipeline test: a model trained on them is useless on real photos.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SYNTHETIC_WARNING = (
    "WARNING: using a SYNTHETIC dataset of drawn shapes (classes named synthetic_*). It only exercises the pipeline; "
    "a model trained on it is useless on real mushrooms. A real model needs real photos: put them in "
    "<folder>/<species>/*.jpg and run `python -m training_job prepare --source <folder>`."
)
IMAGE_SIZE = 256
SPECIES = ("fly_agaric", "earthstar", "puffball", "stinkhorn", "red_cup")
CLASS_PREFIX = "synthetic_"


def _jitter(rng: random.Random, colour: tuple[int, int, int], amount: int = 25) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)


def _background(rng: random.Random) -> Image.Image:
    """Forest-floor-ish: a random earthy gradient with speckles, so no two drawings are near duplicates."""
    top = _jitter(rng, rng.choice([(70, 110, 60), (110, 90, 60), (60, 80, 50), (140, 130, 100)]), 35)
    bottom = _jitter(rng, rng.choice([(90, 70, 40), (60, 50, 30), (100, 120, 70)]), 35)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    draw = ImageDraw.Draw(img)
    for y in range(IMAGE_SIZE):
        t = y / (IMAGE_SIZE - 1)
        draw.line([(0, y), (IMAGE_SIZE, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(rng.randint(40, 120)):
        x, y, r = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE), rng.randint(1, 6)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_jitter(rng, bottom, 60))
    return img


def _fly_agaric(draw: ImageDraw.ImageDraw, rng: random.Random, cx: float, cy: float, s: float) -> None:
    draw.rectangle([cx - 0.12 * s, cy - 0.1 * s, cx + 0.12 * s, cy + 0.55 * s], fill=_jitter(rng, (240, 235, 220), 12))
    cap = _jitter(rng, (215, 30, 25))
    draw.pieslice([cx - 0.5 * s, cy - 0.45 * s, cx + 0.5 * s, cy + 0.25 * s], 180, 360, fill=cap)
    for _ in range(rng.randint(6, 14)):
        angle, radius = rng.uniform(3.3, 6.1), rng.uniform(0.1, 0.4) * s

        x, y = cx + radius * math.cos(angle), cy - 0.1 * s + radius * 0.8 * math.sin(angle)
        r = rng.uniform(0.025, 0.05) * s
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(250, 250, 245))


def _earthstar(draw: ImageDraw.ImageDraw, rng: random.Random, cx: float, cy: float, s: float) -> None:

    rays = rng.randint(6, 9)
    turn = rng.uniform(0, math.pi)
    points = []
    for k in range(rays * 2):
        radius = (0.5 if k % 2 == 0 else 0.2) * s
        angle = turn + k * math.pi / rays
        points.append((cx + radius * math.cos(angle), cy + radius * 0.7 * math.sin(angle)))
    draw.polygon(points, fill=_jitter(rng, (160, 120, 80)))
    r = 0.16 * s
    draw.ellipse([cx - r, cy - r * 1.1, cx + r, cy + r * 0.8], fill=_jitter(rng, (120, 100, 80)))


def _puffball(draw: ImageDraw.ImageDraw, rng: random.Random, cx: float, cy: float, s: float) -> None:
    for _ in range(rng.choice((1, 1, 2, 3))):  # puffballs often grow in small groups
        r = rng.uniform(0.15, 0.4) * s
        x0, y0 = cx + rng.uniform(-0.4, 0.4) * s, cy + rng.uniform(-0.3, 0.3) * s
        draw.ellipse([x0 - r, y0 - r * rng.uniform(0.75, 0.95), x0 + r, y0 + r * 0.9],
                     fill=_jitter(rng, (245, 242, 232), 10))
        for _ in range(rng.randint(5, 15)):
            x, y = x0 + rng.uniform(-0.6, 0.6) * r, y0 + rng.uniform(-0.6, 0.6) * r
            draw.point((x, y), fill=(200, 195, 180))


def _stinkhorn(draw: ImageDraw.ImageDraw, rng: random.Random, cx: float, cy: float, s: float) -> None:
    w = rng.uniform(0.07, 0.1) * s
    draw.rectangle([cx - w, cy - 0.45 * s, cx + w, cy + 0.6 * s], fill=_jitter(rng, (240, 236, 215), 12))
    draw.ellipse([cx - 1.5 * w, cy - 0.7 * s, cx + 1.5 * w, cy - 0.3 * s], fill=_jitter(rng, (70, 60, 30), 15))
    draw.ellipse([cx - 0.2 * s, cy + 0.5 * s, cx + 0.2 * s, cy + 0.7 * s], fill=_jitter(rng, (235, 230, 220), 12))


def _red_cup(draw: ImageDraw.ImageDraw, rng: random.Random, cx: float, cy: float, s: float) -> None:
    outer = _jitter(rng, (200, 40, 40))
    draw.ellipse([cx - 0.45 * s, cy - 0.25 * s, cx + 0.45 * s, cy + 0.25 * s], fill=outer)
    draw.ellipse([cx - 0.35 * s, cy - 0.17 * s, cx + 0.35 * s, cy + 0.12 * s], fill=_jitter(rng, (235, 20, 30)))
    draw.chord([cx - 0.45 * s, cy - 0.1 * s, cx + 0.45 * s, cy + 0.35 * s], 0, 180, fill=_jitter(rng, (160, 40, 40)))


_DRAW = {"fly_agaric": _fly_agaric, "earthstar": _earthstar, "puffball": _puffball, "stinkhorn": _stinkhorn,
         "red_cup": _red_cup}


def draw_specimen(species: str, rng: random.Random) -> Image.Image:
    """One synthetic photo of ``species`` with random position, scale, colours and background."""
    img = _background(rng)
    scale = rng.uniform(0.5, 0.85) * IMAGE_SIZE
    cx = rng.uniform(0.35, 0.65) * IMAGE_SIZE
    cy = rng.uniform(0.4, 0.6) * IMAGE_SIZE
    _DRAW[species](ImageDraw.Draw(img), rng, cx, cy, scale)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))


def generate_synthetic_dataset(out_dir: str | Path, per_class: int = 40, seed: int = 0) -> Path:
    """Write ``out_dir/synthetic_<species>/<n>.jpg`` for the five species; returns ``out_dir``. Deterministic."""
    out = Path(out_dir)
    for index, species in enumerate(SPECIES):
        folder = out / f"{CLASS_PREFIX}{species}"
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"{seed}:{species}")
        for n in range(per_class):
            target = folder / f"{species}_{n:04d}.jpg"
            image = draw_specimen(species, rng)
            tmp = folder / f".{target.name}.tmp-{os.getpid()}"
            image.save(tmp, "JPEG", quality=90)
            tmp.replace(target)
    return out
