"""Fine-tuning the last blocks of the base network (``--fine_tune_blocks N``), after the head is trained.

Photos go through the frozen part of MobileNet once: the activations where the trainable blocks start (the "cut")
are cached like bottlenecks, for each photo and for its mirror image, so an epoch only runs the last N blocks. The
head trained on frozen features is the starting point, then blocks and head train together at a lower learning rate,
with early stopping on validation. BatchNorm layers keep their ImageNet statistics: a few hundred photos are too few
to re-estimate them.

The fine-tuned network (``FineTunedBase``) keeps the untouched blocks and ImageNet head beside the tuned copy, so the
open-set check's ImageNet probabilities mean what they meant without fine-tuning.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training_job.bottlenecks import (BaseNetwork, Bottlenecks, cache_folder, cached_outputs, global_pooling,
                                      load_pixels)
from training_job.train import Head, TrainConfig, TrainingError, split_rows

MOBILENET_BLOCKS = 13
EPOCHS = 15  # upper bound on fine-tuning epochs unless the config sets one; early stopping usually ends sooner
LEARNING_RATE = 1e-4  # unless the config sets one
TAIL_PREFIX = "tuned_"



def learning_rate(config: TrainConfig) -> float:
    """The rate this method fine-tunes at: the config's, or LEARNING_RATE."""
    return config.fine_tune_learning_rate or LEARNING_RATE

def cut_layer_name(architecture: str, blocks: int) -> str:
    """The layer whose output feeds the last ``blocks`` depthwise-separable blocks of MobileNet v1."""
    from training_job.base_weights import parse_architecture

    if parse_architecture(architecture).family != "mobilenet":
        raise TrainingError(f"--fine_tune_blocks works with the mobilenet_<alpha>_<size> family (a plain chain of "
                            f"blocks), not {architecture}; train {architecture} without it")
    if not 1 <= blocks <= MOBILENET_BLOCKS:
        raise TrainingError(f"--fine_tune_blocks must be between 1 and {MOBILENET_BLOCKS} (got {blocks})")
    first_tuned = MOBILENET_BLOCKS - blocks + 1
    return "conv1_relu" if first_tuned == 1 else f"conv_pw_{first_tuned - 1}_relu"


def tail_layers(imagenet_model, cut: str) -> list:
    """The layers after ``cut`` up to (not including) global average pooling."""
    names = [layer.name for layer in imagenet_model.layers]
    pooling = imagenet_model.layers.index(global_pooling(imagenet_model))
    return imagenet_model.layers[names.index(cut) + 1:pooling]


def apply_tail(layers, x, weights: dict[str, list[np.ndarray]] | None = None):
    """Fresh copies of ``layers`` applied to ``x`` (renamed, so they can sit beside the originals in one model),
    holding ``weights`` (by original layer name) or the originals' weights. BatchNorm copies are frozen."""
    import keras

    for layer in layers:
        config = layer.get_config()
        config["name"] = TAIL_PREFIX + layer.name
        copy = layer.__class__.from_config(config)
        x = copy(x)
        if copy.weights:
            copy.set_weights(weights[layer.name] if weights is not None else layer.get_weights())
        copy.trainable = not isinstance(copy, keras.layers.BatchNormalization)
    return x


def tail_weights_of(model, layers) -> dict[str, list[np.ndarray]]:
    return {layer.name: model.get_layer(TAIL_PREFIX + layer.name).get_weights() for layer in layers if layer.weights}


def save_tail(path: Path, blocks: int, weights: dict[str, list[np.ndarray]]) -> None:
    arrays = {f"{name}:{i}": w for name, ws in weights.items() for i, w in enumerate(ws)}
    np.savez(path, blocks=blocks, **arrays)


def load_tail(path: Path) -> tuple[int, dict[str, list[np.ndarray]]]:
    weights: dict[str, list[np.ndarray]] = {}
    with np.load(path) as z:
        keys = sorted((k for k in z.files if ":" in k), key=lambda k: (k.split(":")[0], int(k.split(":")[1])))
        for key in keys:
            weights.setdefault(key.split(":")[0], []).append(z[key])
        return int(z["blocks"]), weights


def tail_fingerprint(weights: dict[str, list[np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        for w in weights[name]:
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:12]


class FineTunedBase(BaseNetwork):
    """``base`` with its last blocks replaced by tuned copies for the features; the ImageNet head stays original."""

    def __init__(self, base: BaseNetwork, blocks: int, weights: dict[str, list[np.ndarray]]):
        import keras

        cut = cut_layer_name(base.architecture, blocks)
        self.original = base
        self.blocks = blocks
        self.tail_weights = weights
        self.architecture = f"{base.architecture}-tuned{blocks}-{tail_fingerprint(weights)}"
        self.image_size = base.image_size
        self.normalises_inside = base.normalises_inside
        self.imagenet_model = base.imagenet_model
        layers = tail_layers(base.imagenet_model, cut)
        tuned = apply_tail(layers, base.imagenet_model.get_layer(cut).output, weights)
        self._set_features(keras.layers.GlobalAveragePooling2D(name="tuned_pooling")(tuned))


def cut_activations(rows, base: BaseNetwork, cut: str, *, mirrored: bool = False, root=None,
                    progress: bool = True) -> tuple[np.ndarray, int]:
    """float16 activations at ``cut`` for each row (of the mirrored photo if ``mirrored``), cached per photo;
    returns (activations, how many were computed)."""
    import keras
    import tensorflow as tf

    model = keras.Model(base.imagenet_model.inputs, base.imagenet_model.get_layer(cut).output)
    run = tf.function(lambda pixels: model(base.normalise(pixels), training=False), autograph=False,
                      reduce_retracing=True)
    variant = f"cut-{cut}" + ("-mirrored" if mirrored else "")

    def pixels_of(row):
        pixels = load_pixels(row.path, base.image_size)
        return pixels[:, ::-1] if mirrored else pixels

    shape = tuple(int(d) for d in model.output.shape[1:])
    return cached_outputs(rows, cache_folder(base.architecture, variant, root), shape, np.float16, pixels_of,
                          lambda pixels: run(tf.constant(pixels)).numpy().astype(np.float16),
                          f"activations {base.architecture}/{variant}", progress=progress)


@dataclass
class FineTuneResult:
    base: FineTunedBase
    head: Head
    epochs_run: int
    best_epoch: int
    validation_accuracy: float
    seconds: float
    split_bottlenecks: dict  # split -> Bottlenecks with the tuned features and the original ImageNet probabilities


def fine_tune(rows, config: TrainConfig, base: BaseNetwork, head: Head, split_bottlenecks: dict,
              tensorboard_dir: Path, *, cache_root=None, progress: bool = True) -> FineTuneResult:
    """Train the last ``config.fine_tune_blocks`` blocks together with ``head`` (its starting point)."""
    import keras
    import tensorflow as tf

    started = time.monotonic()
    cut = cut_layer_name(base.architecture, config.fine_tune_blocks)
    layers = tail_layers(base.imagenet_model, cut)
    index = {label: i for i, label in enumerate(head.labels)}
    splits = {s: split_rows(rows, s) for s in ("train", "validation", "test")}
    plain = {s: cut_activations(r, base, cut, root=cache_root, progress=progress)[0] for s, r in splits.items()}
    mirrored_train, _ = cut_activations(splits["train"], base, cut, mirrored=True, root=cache_root,
                                        progress=progress)
    labels_of = {s: np.array([index[r.label] for r in splits[s]]) for s in splits}
    x_train = np.concatenate([plain["train"], mirrored_train])
    y_train = np.concatenate([labels_of["train"], labels_of["train"]])

    keras.utils.set_random_seed(config.seed)
    inputs = keras.Input(plain["train"].shape[1:])
    x = keras.layers.GlobalAveragePooling2D()(apply_tail(layers, inputs))
    x = trainable_head(x, head, config)
    model = keras.Model(inputs, x)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate(config)),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
                  metrics=["accuracy", keras.metrics.CategoricalCrossentropy(name="cross_entropy")])
    C = len(head.labels)
    history = model.fit(
        x_train.astype(np.float32), tf.one_hot(y_train, C),
        validation_data=(plain["validation"].astype(np.float32), tf.one_hot(labels_of["validation"], C)),
        epochs=config.fine_tune_epochs or EPOCHS, batch_size=config.train_batch_size, shuffle=True, verbose=0,
        callbacks=[keras.callbacks.TensorBoard(str(Path(tensorboard_dir) / "fine_tune"), write_graph=False,
                                               profile_batch=0),
                   keras.callbacks.EarlyStopping(monitor="val_cross_entropy", patience=config.fine_tune_patience,
                                                 restore_best_weights=True)],
    ).history

    dense = [model.get_layer(f"head{i}") for i in range(len(head.kernels))]
    tuned_head = Head(head.labels, [d.get_weights()[0] for d in dense], [d.get_weights()[1] for d in dense])
    tuned_base = FineTunedBase(base, config.fine_tune_blocks, tail_weights_of(model, layers))
    features_model = keras.Model(inputs, model.get_layer(dense[0].name).input)  # pooled tuned features
    tuned_splits = {}
    for split, activations in plain.items():
        features = features_model.predict(activations.astype(np.float32), batch_size=64, verbose=0)
        tuned_splits[split] = Bottlenecks(features.astype(np.float32), split_bottlenecks[split].imagenet, 0)
    val_ce = history["val_cross_entropy"]
    val_accuracy = float(np.mean(tuned_head.predict(tuned_splits["validation"].features).argmax(1)
                                 == labels_of["validation"]))
    return FineTuneResult(tuned_base, tuned_head, len(val_ce), int(np.argmin(val_ce)) + 1, val_accuracy,
                          time.monotonic() - started, tuned_splits)


def trainable_head(x, head, config):
    """``head`` as trainable Keras layers on ``x`` (dropout, dense layers with its weights, L2 as in training):
    what both fine-tuning modes train together with the network below it."""
    import keras

    for i, (kernel, bias) in enumerate(zip(head.kernels, head.biases)):
        last = i == len(head.kernels) - 1
        x = keras.layers.Dropout(config.dropout)(x)
        dense = keras.layers.Dense(kernel.shape[1], activation="softmax" if last else "relu",
                                   kernel_regularizer=keras.regularizers.L2(config.l2), name=f"head{i}")
        x = dense(x)
        dense.set_weights([kernel, bias])
    return x
