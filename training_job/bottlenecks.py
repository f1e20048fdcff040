"""Bottleneck cache: what the frozen base network says about each photo, computed once and reused.

One pass through the ImageNet MobileNet gives both the pooled features (the head's input) and the ImageNet
softmax (the open-set check's input). Each photo's pair is stored as one ``.npy`` (features then the 1,000
ImageNet probabilities) under ``cache_dir()/bottlenecks/<architecture>/<preprocessing version>/<variant>/``,
named by the photo's sha256. Augmented variants get their own ``<variant>`` folder, so an un-augmented run never
recomputes or mixes with them.
"""
from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training_job.paths import cache_dir
from training_job.preprocessing import PREPROCESSING_VERSION, InvalidImage, load_image_file

PLAIN_VARIANT = "plain"


@dataclass
class Bottlenecks:
    features: np.ndarray  # float32 (N, D)
    imagenet: np.ndarray  # float32 (N, 1000) ImageNet softmax
    computed: int  # how many were computed (not read from the cache)


def global_pooling(model):
    """The model's global average pooling layer: where a base's last convolutional map becomes its features."""
    import keras

    return next(layer for layer in model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D))


class BaseNetwork:
    """The frozen ImageNet base: uint8 pixels -> (pooled features, ImageNet probabilities). ``normalise`` turns the
    contract's pixels into what ``model`` takes (each architecture its own input size and normalisation)."""

    def __init__(self, architecture: str = "mobilenet_1.0_224", weights_file=None):
        from training_job.base_weights import build_imagenet_model, parse_architecture

        arch = parse_architecture(architecture)
        self.architecture = arch.name
        self.image_size = arch.size
        self.normalises_inside = arch.normalises_inside
        self.imagenet_model = build_imagenet_model(architecture, weights_file)
        self._set_features(global_pooling(self.imagenet_model).output)

    def _set_features(self, pooled) -> None:
        """Make ``self.model`` answer (``pooled`` flattened, the ImageNet softmax) for the same input."""
        import keras

        features = keras.layers.Flatten(name="bottleneck")(pooled)
        self.model = keras.Model(self.imagenet_model.inputs, [features, self.imagenet_model.outputs[0]],
                                 name="base_features_and_imagenet")
        self.feature_size = int(features.shape[-1])
        self._predict = None

    def normalise(self, pixels):
        """uint8 pixels (TF) -> ``model``'s input: ``preprocessing.normalise`` ([-1, 1]) for MobileNet; a float cast
        for networks whose first layer normalises (EfficientNet-Lite: (x - 127) / 128)."""
        import tensorflow as tf

        from training_job.preprocessing import normalise

        return tf.cast(pixels, tf.float32) if self.normalises_inside else normalise(pixels)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 pixels (N, S, S, 3) -> (features (N, D), imagenet probabilities (N, 1000)) as float32 numpy."""
        import tensorflow as tf

        if self._predict is None:
            model, normalise = self.model, self.normalise

            @tf.function(reduce_retracing=True, autograph=False)
            def predict(images):
                return model(normalise(images), training=False)

            self._predict = predict
        features, imagenet = self._predict(tf.constant(pixels))
        return features.numpy(), imagenet.numpy()


def variant_name(augmentation=None, index: int = 0) -> str:
    if augmentation is None or not augmentation.active:
        return PLAIN_VARIANT
    return f"aug-{augmentation.key()}-{index}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def cache_folder(architecture: str, variant: str = PLAIN_VARIANT, root: Path | None = None) -> Path:
    root = Path(root) if root is not None else cache_dir() / "bottlenecks"
    return root / _safe(architecture) / _safe(PREPROCESSING_VERSION) / _safe(variant)


def load_pixels(path: str, size: int, augment=None, seed: int = 0) -> np.ndarray:
    try:
        pixels = load_image_file(path, size)
    except (OSError, InvalidImage) as exc:
        raise InvalidImage(getattr(exc, "code", "unreadable"), f"{path}: {exc}") from None
    if augment is not None:
        pixels = augment.apply(pixels, np.random.default_rng(seed))
    return pixels


def _seed(sha256: str, variant: str) -> int:
    return int(hashlib.sha256(f"{sha256}:{variant}".encode()).hexdigest()[:8], 16)


def get_bottlenecks(rows, base: BaseNetwork, *, batch_size: int = 32, augmentation=None, variant_index: int = 0,
                    root: Path | None = None, progress: bool = True) -> Bottlenecks:
    """Features and ImageNet probabilities for ``rows`` (manifest rows: ``path`` and ``sha256``), in row order.

    Missing entries are computed in batches (photo decoding overlaps inference) and written to the cache."""
    variant = variant_name(augmentation, variant_index)
    augment = augmentation if variant != PLAIN_VARIANT else None
    D = base.feature_size

    def pixels_of(row):
        return load_pixels(row.path, base.image_size, augment, _seed(row.sha256, variant))

    def compute(pixels):
        features, imagenet = base(pixels)
        return np.concatenate([features, imagenet], axis=1)

    out, computed = cached_outputs(rows, cache_folder(base.architecture, variant, root), (D + 1000,), np.float32,
                                   pixels_of, compute, f"bottlenecks {base.architecture}/{variant}",
                                   batch_size=batch_size, progress=progress)
    return Bottlenecks(out[:, :D].copy(), out[:, D:].copy(), computed)


def cached_outputs(rows, folder: Path, shape: tuple, dtype, pixels_of, compute, description: str, *,
                   batch_size: int = 32, progress: bool = True) -> tuple[np.ndarray, int]:
    """``compute(pixels batch)`` for every row, one ``<sha256>.npy`` per photo in ``folder``; cached ones are read.

    Returns (array (N, *shape) in row order, how many were computed). ``pixels_of(row)`` loads one photo's pixels;
    the next batch is decoded while the current one runs through the network."""
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    out = np.zeros((len(rows), *shape), dtype=dtype)
    missing = []
    for i, row in enumerate(rows):
        try:
            vec = np.load(folder / f"{row.sha256}.npy")
            if vec.shape == tuple(shape):
                out[i] = vec
                continue
        except (OSError, ValueError):
            pass
        missing.append(i)
    if not missing:
        return out, 0

    batches = [missing[k:k + batch_size] for k in range(0, len(missing), batch_size)]

    def load_batch(idx):
        return np.stack([pixels_of(rows[i]) for i in idx])

    bar = tqdm(total=len(missing), desc=description, unit="photo", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load_batch, batches[0])
        for b, idx in enumerate(batches):
            pixels = pending.result()
            if b + 1 < len(batches):
                pending = pool.submit(load_batch, batches[b + 1])
            values = compute(pixels)
            for j, i in enumerate(idx):
                out[i] = values[j]
                atomic_save(folder / f"{rows[i].sha256}.npy", out[i])
            bar.update(len(idx))
    bar.close()
    return out, len(missing)


def atomic_save(path: Path, vec: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{id(vec)}.tmp")  # processes share the cache
    with open(tmp, "wb") as f:
        np.save(f, vec)
    tmp.replace(path)
