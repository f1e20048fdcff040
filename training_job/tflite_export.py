"""TFLite export for edge devices: float32 and int8 (full-integer weights and activations, calibrated on training
photos), each with its accuracy on the test split so it can be compared with the SavedModel's."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from training_job.preprocessing import load_image_file
from training_job.train import Head, split_rows

REPRESENTATIVE_PHOTOS = 64


def _classifier_model(base, head: Head):
    """Keras model: uint8-valued float pixels [1, S, S, 3] -> probabilities; normalisation inside (x / 127.5 - 1,
    the contract's ``normalise``, or the base's own first layer), as in the SavedModel."""
    import keras

    size = base.image_size
    pixels = keras.Input((size, size, 3), batch_size=1, name="pixels")
    normalised = pixels if base.normalises_inside else keras.layers.Rescaling(1 / 127.5, offset=-1.0)(pixels)
    features, _ = base.model(normalised)
    x = features
    for i, (kernel, bias) in enumerate(zip(head.kernels, head.biases)):
        last = i == len(head.kernels) - 1
        dense = keras.layers.Dense(kernel.shape[1], activation="softmax" if last else "relu", name=f"head{i}")
        x = dense(x)
        dense.set_weights([kernel, bias])
    return keras.Model(pixels, x)


def convert(base, head: Head, representative: np.ndarray | None = None) -> bytes:
    import contextlib
    import io
    import warnings

    import tensorflow as tf

    # the converter prints the exported graph's signature; keep the job's output readable
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _convert(tf, base, head, representative)


def _convert(tf, base, head: Head, representative) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(_classifier_model(base, head))
    if representative is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([p[None].astype(np.float32)] for p in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def tflite_interpreter(model_path=None, model_content: bytes | None = None, batch: int = 1, threads: int = 2):
    """A tf.lite.Interpreter of an exported file (or its bytes), allocated for ``batch`` photos at a time.
    Raises ValueError or RuntimeError when the model's batch dimension cannot be resized to ``batch``."""
    import warnings

    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice (ai_edge_litert is not pinned)
        interpreter = tf.lite.Interpreter(model_path=None if model_path is None else str(model_path),
                                          model_content=model_content, num_threads=threads)
    if batch != 1:
        inp = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]])
    interpreter.allocate_tensors()
    return interpreter


def tflite_predict(interpreter, pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (N, S, S, 3) -> class probabilities (N, C). Both exports (float and int8) take float pixels:
    the int8 one quantises inside."""
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def tflite_accuracy(model_bytes: bytes, pixels: np.ndarray, y_true: np.ndarray) -> float:
    interpreter = tflite_interpreter(model_content=model_bytes)
    correct = sum(int(tflite_predict(interpreter, p[None])[0].argmax() == t) for p, t in zip(pixels, y_true))
    return correct / len(y_true) if len(y_true) else 0.0


def export_tflite(base, head: Head, rows, out_dir: Path, representative_photos: int = REPRESENTATIVE_PHOTOS,
                  progress: bool = True) -> dict:
    """Write ``model_float.tflite`` and ``model_int8.tflite`` into ``out_dir``; returns their test accuracies."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_rows = split_rows(rows, "train")
    step = max(1, len(train_rows) // representative_photos)
    representative = np.stack([load_image_file(r.path, base.image_size)
                               for r in train_rows[::step][:representative_photos]])
    test_rows = split_rows(rows, "test")
    index = {l: i for i, l in enumerate(head.labels)}
    test_pixels = np.stack([load_image_file(r.path, base.image_size) for r in test_rows])
    y_test = np.array([index[r.label] for r in test_rows])
    result = {"representative_photos": int(len(representative))}
    for name, rep in (("float", None), ("int8", representative)):
        model_bytes = convert(base, head, rep)
        path = out_dir / f"model_{name}.tflite"
        path.write_bytes(model_bytes)
        result[f"{name}_test_accuracy"] = tflite_accuracy(model_bytes, test_pixels, y_test)
        result[f"{name}_file"] = f"assets.extra/tflite/{path.name}"
        result[f"{name}_bytes"] = len(model_bytes)
        if progress:
            print(f"tflite {name}: {len(model_bytes) / 1e6:.1f} MB, test accuracy "
                  f"{result[f'{name}_test_accuracy']:.4f}")
    return result
