"""Train the classification head on cached bottlenecks (retrain.py's step, in Keras).

The head is dropout + an optional ReLU hidden layer (+ dropout) + an L2-regularised dense softmax layer (a hidden
layer of 128 beat retrain.py's single layer on validation: 0.95 vs 0.92 on the shared photos), trained with label smoothing and early stopping on
the validation split (the best validation epoch is kept). TensorBoard gets accuracy and cross-entropy for train and
validation under ``<tensorboard_root>/<run name>/{train,validation}``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from training_job.augmentation import Augmentation
from training_job.bottlenecks import BaseNetwork, Bottlenecks, get_bottlenecks
from training_job.dataset import labels_of


class TrainingError(ValueError):
    """The data cannot be trained on (one class, an empty split...): the message says why."""


# The base a run trains on unless told otherwise: the best top-1 in bench/accuracy_cv.py's paired folds among the
# bases that keep `make run` and served latency within their targets (README, "Choosing the base").
DEFAULT_ARCHITECTURE = "efficientnet_lite0"


@dataclass
class TrainConfig:
    architecture: str = DEFAULT_ARCHITECTURE
    weights_file: str | None = None
    learning_rate: float = 0.001
    epochs: int | None = None  # upper bound; early stopping usually ends sooner
    how_many_training_steps: int | None = None  # retrain.py's unit; converted to epochs
    train_batch_size: int = 32
    validation_batch_size: int = 256
    flip_left_right: bool = False
    random_crop: int = 0
    random_scale: int = 0
    random_brightness: int = 0
    augmented_variants: int = 3  # cached distorted copies of each training photo when augmenting
    hidden_units: int = 128  # 0 = a single softmax layer, as retrain.py
    label_smoothing: float = 0.1
    dropout: float = 0.3
    l2: float = 1e-4
    patience: int = 20
    seed: int = 0
    fine_tune_blocks: int = 0  # last MobileNet blocks trained with the head after it converged (0 = frozen base)
    # None: each method's own (fine_tune.LEARNING_RATE and EPOCHS, whole_fine_tune.LEARNING_RATE and EPOCHS)
    fine_tune_learning_rate: float | None = None
    fine_tune_epochs: int | None = None
    fine_tune_patience: int = 4
    # The default recipe trains every convolution of the base with the head (training_job.whole_fine_tune); False
    # trains the head alone on frozen bottlenecks. Excludes fine_tune_blocks.
    fine_tune_whole: bool = True
    fine_tune_warmup_epochs: int = 1
    fine_tune_crop_min: float = 0.8  # whole fine-tuning's random crops keep this much of the side, or more
    # whole fine-tuning keeps the base's stem and first blocks as ImageNet trained (whole_fine_tune.tuned_copy);
    # None: whole_fine_tune.FROZEN_BLOCKS where the base has named blocks
    fine_tune_frozen_blocks: int | None = None
    # whole-network fine-tuning's wall-clock budget, all its runs together (fine_tune_soup): the default recipe's two
    # runs of 6 epochs fit where an epoch takes under 25 s; a slower machine runs fewer (whole_fine_tune.BestEpoch),
    # so that `make run` stays within 10 minutes
    fine_tune_max_minutes: float | None = 5.0
    # whole fine-tuning runs (other seeds, same start) whose weights are averaged; None: whole_fine_tune.SOUP_SIZE
    fine_tune_soup: int | None = None
    mirror_tta: bool = False  # serve the mean features of each photo and its mirror image (training_job.mirror_tta)

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(self.flip_left_right, self.random_crop, self.random_scale, self.random_brightness)

    def max_epochs(self, n_train: int) -> int:
        if self.how_many_training_steps:
            steps_per_epoch = max(1, math.ceil(n_train / self.train_batch_size))
            return max(1, math.ceil(self.how_many_training_steps / steps_per_epoch))
        return self.epochs or 200


@dataclass
class Head:
    """The trained head: dense layers (ReLU between them) then softmax, columns in ``labels`` order.

    ``temperature`` is the calibration temperature already folded into the last layer (its kernel and bias are
    divided by it; see ``training_job.calibration``); 1.0 = uncalibrated."""
    labels: list[str]
    kernels: list[np.ndarray]  # (D, H), ..., (H, C)
    biases: list[np.ndarray]
    temperature: float = 1.0

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = features.astype(np.float32)
        for i, (k, b) in enumerate(zip(self.kernels, self.biases)):
            x = x @ k + b
            if i < len(self.kernels) - 1:
                x = np.maximum(x, 0.0)
        return x

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = self.logits(features)
        x -= x.max(axis=1, keepdims=True)
        e = np.exp(x)
        return e / e.sum(axis=1, keepdims=True)

    def with_temperature(self, temperature: float) -> "Head":
        """This head with its logits further divided by ``temperature`` (folded into the last layer)."""
        scale = np.float32(1.0 / temperature)
        return Head(self.labels, [*self.kernels[:-1], (self.kernels[-1] * scale).astype(np.float32)],
                    [*self.biases[:-1], (self.biases[-1] * scale).astype(np.float32)],
                    self.temperature * temperature)

    def uncalibrated(self) -> "Head":
        return self.with_temperature(1.0 / self.temperature)

    def save(self, path: Path) -> None:
        arrays = {f"kernel{i}": k for i, k in enumerate(self.kernels)}
        arrays.update({f"bias{i}": b for i, b in enumerate(self.biases)})
        np.savez(path, labels=np.array(self.labels), layers=len(self.kernels), temperature=self.temperature,
                 **arrays)

    @classmethod
    def load(cls, path: Path) -> "Head":
        with np.load(path) as z:
            n = int(z["layers"])
            temperature = float(z["temperature"]) if "temperature" in z.files else 1.0
            return cls([str(x) for x in z["labels"]], [z[f"kernel{i}"] for i in range(n)],
                       [z[f"bias{i}"] for i in range(n)], temperature)


@dataclass
class TrainResult:
    head: Head
    config: TrainConfig
    run_name: str
    tensorboard_dir: str
    epochs_run: int
    best_epoch: int
    validation_accuracy: float
    validation_cross_entropy: float
    bottlenecks_computed: int
    seconds: float
    split_bottlenecks: dict = field(default_factory=dict, repr=False)  # split -> Bottlenecks (plain)


def split_rows(rows, split: str):
    return [r for r in rows if r.split == split]


def check_trainable(rows) -> list[str]:
    labels = labels_of(rows)
    if len(labels) < 2:
        raise TrainingError(f"need at least 2 classes to train, found {len(labels)}: {labels}")
    for split in ("train", "validation"):
        present = {r.label for r in split_rows(rows, split)}
        missing = [l for l in labels if l not in present]
        if missing:
            raise TrainingError(f"the {split} split has no photos of {missing}; add photos or lower the "
                                "number of classes")
    if not split_rows(rows, "test"):  # evaluation and publishing need one: refused before training, not after
        raise TrainingError(f"the manifest's {len(rows)} photos left no test photos (each photo's split comes "
                            "from a hash of it): add photos, or prepare with a larger --testing_percentage")
    return labels


def plain_bottlenecks(rows, base: BaseNetwork, splits=("train", "validation", "test"), progress=True,
                      cache_root=None) -> tuple[dict, int]:
    """Bottlenecks of every photo in ``splits`` in one cached pass; returns ({split: Bottlenecks}, computed)."""
    wanted = [r for r in rows if r.split in splits]
    b = get_bottlenecks(wanted, base, progress=progress, root=cache_root)
    out = {}
    for split in splits:
        idx = [i for i, r in enumerate(wanted) if r.split == split]
        out[split] = Bottlenecks(b.features[idx], b.imagenet[idx], 0)
    return out, b.computed


def train_head(rows, config: TrainConfig, tensorboard_root: Path, run_name: str | None = None,
               base: BaseNetwork | None = None, progress: bool = True, cache_root=None) -> TrainResult:
    import keras
    import tensorflow as tf

    started = time.monotonic()
    labels = check_trainable(rows)
    base = base or BaseNetwork(config.architecture, config.weights_file)
    run_name = run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{base.architecture}-lr{config.learning_rate:g}"
    by_split, computed = plain_bottlenecks(rows, base, progress=progress, cache_root=cache_root)
    train_rows, val_rows = split_rows(rows, "train"), split_rows(rows, "validation")
    index = {l: i for i, l in enumerate(labels)}
    x_train = by_split["train"].features
    y_train = np.array([index[r.label] for r in train_rows])
    if config.augmentation.active:
        for k in range(config.augmented_variants):
            aug = get_bottlenecks(train_rows, base, augmentation=config.augmentation, variant_index=k,
                                  progress=progress, root=cache_root)
            computed += aug.computed
            x_train = np.concatenate([x_train, aug.features])
            y_train = np.concatenate([y_train, [index[r.label] for r in train_rows]])
    x_val = by_split["validation"].features
    y_val = np.array([index[r.label] for r in val_rows])

    keras.utils.set_random_seed(config.seed)
    C = len(labels)
    layers = [keras.Input((x_train.shape[1],)), keras.layers.Dropout(config.dropout)]
    if config.hidden_units:
        layers += [keras.layers.Dense(config.hidden_units, activation="relu", name="hidden",
                                      kernel_regularizer=keras.regularizers.L2(config.l2)),
                   keras.layers.Dropout(config.dropout)]
    layers.append(keras.layers.Dense(C, activation="softmax", kernel_regularizer=keras.regularizers.L2(config.l2),
                                     name="head"))
    model = keras.Sequential(layers)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy", keras.metrics.CategoricalCrossentropy(name="cross_entropy")],
    )
    tb_dir = Path(tensorboard_root) / run_name
    callbacks = [
        keras.callbacks.TensorBoard(str(tb_dir), write_graph=False, profile_batch=0),
        keras.callbacks.EarlyStopping(monitor="val_cross_entropy", patience=config.patience,
                                      restore_best_weights=True),
    ]
    history = model.fit(
        x_train, tf.one_hot(y_train, C), validation_data=(x_val, tf.one_hot(y_val, C)),
        epochs=config.max_epochs(len(x_train)), batch_size=config.train_batch_size,
        validation_batch_size=config.validation_batch_size, shuffle=True, verbose=0, callbacks=callbacks,
    ).history
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    head = Head(labels, [l.get_weights()[0].astype(np.float32) for l in dense],
                [l.get_weights()[1].astype(np.float32) for l in dense])
    val_ce = history["val_cross_entropy"]
    best = int(np.argmin(val_ce))
    val_acc = float(np.mean(head.predict(x_val).argmax(1) == y_val))
    return TrainResult(head, config, run_name, str(tb_dir), len(val_ce), best + 1, val_acc, float(val_ce[best]),
                       computed, time.monotonic() - started, by_split)


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(asdict(config), indent=2))


def load_config(path: Path) -> TrainConfig:
    return TrainConfig(**json.loads(path.read_text()))
