"""retrain.py's image distortions, applied to contract-preprocessed uint8 pixels.

Percentages mean what they meant in retrain.py: ``random_crop`` = margin (percent) that may be cropped away,
``random_scale`` = how much (percent) the photo may be scaled up before the centre is cut out,
``random_brightness`` = multiply pixels by a factor in [1 - p/100, 1 + p/100].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Augmentation:
    flip_left_right: bool = False
    random_crop: int = 0
    random_scale: int = 0
    random_brightness: int = 0

    @property
    def active(self) -> bool:
        return bool(self.flip_left_right or self.random_crop or self.random_scale or self.random_brightness)

    def key(self) -> str:
        return f"f{int(self.flip_left_right)}c{self.random_crop}s{self.random_scale}b{self.random_brightness}"

    def apply(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = pixels.shape[0]
        img = Image.fromarray(pixels)
        if self.random_crop or self.random_scale:
            margin = 1.0 + self.random_crop / 100.0
            scale = 1.0 + rng.uniform(0.0, self.random_scale / 100.0)
            grown = max(size, int(round(size * margin * scale)))
            img = img.resize((grown, grown), Image.BILINEAR)
            x = int(rng.integers(0, grown - size + 1))
            y = int(rng.integers(0, grown - size + 1))
            img = img.crop((x, y, x + size, y + size))
        if self.flip_left_right and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        out = np.asarray(img, dtype=np.float32)
        if self.random_brightness:
            factor = rng.uniform(1 - self.random_brightness / 100.0, 1 + self.random_brightness / 100.0)
            out = out * factor
        return np.clip(out, 0, 255).astype(np.uint8)
