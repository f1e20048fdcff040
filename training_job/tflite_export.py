"""TFLite export of a version's ``serving_default``, for TF Serving's ``--prefer_tflite_model`` and for edge devices.

- float: ``<version>/model.tflite``, beside ``saved_model.pb``, where TF Serving (and our model server) look for it
  under ``--prefer_tflite_model``. It carries the SavedModel's ``serving_default`` SignatureDef exactly (input
  ``images`` uint8 [N, S, S, 3]; outputs ``probabilities``, ``classes``, ``mushroom_score``, ``not_a_mushroom``) in
  its ``signature_defs_metadata``, the way TF Serving reads it (``training_job/tflite_signatures.py``).
- int8: weights and activations int8 (calibrated on training photos; inputs and outputs keep their types), written
  to ``assets.extra/tflite/model_int8.tflite``. It is never served in place of the float file: ``publish_int8_variant``
  publishes it as its own model ``<model>_int8`` (same version number, same SavedModel, ``model.tflite`` = the int8
  file), for clients that choose it by model name; ``publish_int8_as_version`` (``python -m training_job
  publish_int8``, on request) as the next version of the model itself, so the gateway's A/B routing and the
  rollout's feedback verdict weigh it against the float version.

Only ``serving_default`` is converted. ``predict_image_bytes`` decodes photos in-graph (DecodeJpeg and friends), which
TFLite's builtin ops lack (they need the Flex delegate, which TF Serving's TfLiteSession does not link), and the
``explain`` twins need gradients. A version served from its ``model.tflite`` therefore has ``serving_default`` only,
in TF Serving as in our model server: a request for another signature is refused with INVALID_ARGUMENT
``Serving signature name: "predict_image_bytes" not found in signature def``; the gateway sends pixels to
``serving_default`` and is unaffected.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from training_job.preprocessing import load_image_file
from training_job.tflite_signatures import TFLITE_FILE, with_signature_def
from training_job.train import split_rows

REPRESENTATIVE_PHOTOS = 64
SERVING_SIGNATURE = "serving_default"
INT8_FILE = Path("assets.extra") / "tflite" / "model_int8.tflite"
INT8_MODEL_SUFFIX = "_int8"
VARIANT_FILE = Path("assets.extra") / "variant.json"  # in a version that is another version's int8 variant


def saved_model_signature_def(saved_model_dir: Path, key: str = SERVING_SIGNATURE, tags=("serve",)):
    """The SignatureDef ``key`` of the MetaGraphDef tagged exactly ``tags`` in ``saved_model_dir/saved_model.pb``."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    for meta_graph in saved_model.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == set(tags):
            return meta_graph.signature_def[key]
    raise ValueError(f"{saved_model_dir} has no MetaGraphDef tagged {sorted(tags)}")


def load_saved_model(saved_model_dir: Path):
    """The SavedModel in ``saved_model_dir``, loaded for ``convert_serving_default`` (one load serves both files)."""
    import tensorflow as tf

    return tf.saved_model.load(str(saved_model_dir))


def convert_serving_default(saved_model_dir: Path, representative: np.ndarray | None = None, loaded=None) -> bytes:
    """The SavedModel's ``serving_default`` as a TFLite file carrying that SignatureDef (float; with
    ``representative`` uint8 photos [N, S, S, 3], int8 calibrated on them, ops without an int8 kernel kept float).
    ``loaded``: the SavedModel as ``load_saved_model`` returned it, when the caller has it already."""
    import contextlib
    import io
    import warnings

    import tensorflow as tf

    # From the loaded signature, not from_saved_model: that one keeps as resource variables (VAR_HANDLE/READ_VARIABLE,
    # left uninitialised in the served subgraph) the variables it finds assigned anywhere in the SavedModel; this
    # freezes every variable into a constant. The converter saves the object it is given (with the function) to a
    # temporary SavedModel and converts that: an object tracking only this function's variables, rather than the
    # whole loaded model, spares it re-saving every other signature (Grad-CAM's gradients among them).
    loaded = loaded or load_saved_model(saved_model_dir)  # alive until the conversion ends: it owns the variables
    serving = loaded.signatures[SERVING_SIGNATURE]
    serving_variables = tf.Module()
    serving_variables.captured = list(serving.variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serving], serving_variables)
    if representative is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ({"images": p[None]} for p in representative)
        # the string output (``classes``) has no int8 kernel: builtins keep it
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    # the converter prints the exported graph's signature; keep the job's output readable
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        content = converter.convert()
    return with_signature_def(content, SERVING_SIGNATURE, SERVING_SIGNATURE,
                              saved_model_signature_def(saved_model_dir))


def tflite_interpreter(model_path=None, model_content: bytes | None = None, batch: int = 1, threads: int = 2):
    """A LiteRT interpreter of an exported file (or its bytes), allocated for ``batch`` photos at a time.
    Raises ValueError or RuntimeError when the model's batch dimension cannot be resized to ``batch``."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=None if model_path is None else str(model_path),
                              model_content=model_content, num_threads=threads)
    if batch != 1:
        inp = _detail(interpreter.get_input_details(), "images")
        interpreter.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]])
    interpreter.allocate_tensors()
    return interpreter


def _detail(details: list[dict], name: str) -> dict:
    """The tensor named ``name`` (the signature's alias, as exports name them), else the first one (older files)."""
    return next((d for d in details if d["name"] == name), details[0])


def tflite_predict(interpreter, pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (N, S, S, 3) -> class probabilities (N, C), fed in the input's own type."""
    inp = _detail(interpreter.get_input_details(), "images")
    interpreter.set_tensor(inp["index"], pixels.astype(inp["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(_detail(interpreter.get_output_details(), "probabilities")["index"])


def tflite_accuracy(model_bytes: bytes, pixels: np.ndarray, y_true: np.ndarray) -> float:
    interpreter = tflite_interpreter(model_content=model_bytes)
    correct = sum(int(tflite_predict(interpreter, p[None])[0].argmax() == t) for p, t in zip(pixels, y_true))
    return correct / len(y_true) if len(y_true) else 0.0


def export_tflite(version_dir: Path, rows, labels: list[str], image_size: int,
                  representative_photos: int = REPRESENTATIVE_PHOTOS, progress: bool = True) -> dict:
    """Convert the SavedModel in ``version_dir`` into ``model.tflite`` (float) and ``INT8_FILE``; returns their
    sizes and test accuracies."""
    version_dir = Path(version_dir)
    train_rows = split_rows(rows, "train")
    step = max(1, len(train_rows) // representative_photos)
    representative = np.stack([load_image_file(r.path, image_size)
                               for r in train_rows[::step][:representative_photos]])
    test_rows = split_rows(rows, "test")
    index = {l: i for i, l in enumerate(labels)}
    test_pixels = np.stack([load_image_file(r.path, image_size) for r in test_rows])
    y_test = np.array([index[r.label] for r in test_rows])
    result = {"representative_photos": int(len(representative)), "signatures": [SERVING_SIGNATURE]}
    loaded = load_saved_model(version_dir)
    for name, rep, path in (("float", None, Path(TFLITE_FILE)), ("int8", representative, INT8_FILE)):
        model_bytes = convert_serving_default(version_dir, rep, loaded)
        (version_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (version_dir / path).write_bytes(model_bytes)
        result[f"{name}_test_accuracy"] = tflite_accuracy(model_bytes, test_pixels, y_test)
        result[f"{name}_file"] = str(path)
        result[f"{name}_bytes"] = len(model_bytes)
        if progress:
            print(f"tflite {name}: {len(model_bytes) / 1e6:.1f} MB, test accuracy "
                  f"{result[f'{name}_test_accuracy']:.4f}")
    return result


def int8_model_name(model_name: str) -> str:
    return model_name + INT8_MODEL_SUFFIX


def _int8_build(version_dir: Path, variant_note: dict | None = None):
    """A ``publish_dir`` build: the published float version's folder with its int8 file as ``model.tflite`` (and,
    given ``variant_note``, that note as ``VARIANT_FILE``)."""
    version_dir = Path(version_dir)
    if not (version_dir / INT8_FILE).is_file():
        from training_job.publish import PublishError

        raise PublishError(f"{version_dir} has no int8 file ({INT8_FILE}): it was published without TFLite files")

    def build(staging: Path) -> None:
        shutil.copytree(version_dir, staging, dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if n in (TFLITE_FILE, INT8_FILE.name)])
        shutil.copyfile(version_dir / INT8_FILE, staging / TFLITE_FILE)
        if variant_note is not None:
            (staging / VARIANT_FILE).write_text(json.dumps(variant_note, indent=2))

    return build


def publish_int8_variant(version_dir: Path, registry: Path, model_name: str) -> tuple[int, Path]:
    """Publish ``<registry>/<model_name>_int8/<N>/`` (N = ``version_dir``'s number): the published float version's
    folder with its int8 file as ``model.tflite``. Raises PublishError when that version already exists."""
    from training_job.publish import publish_dir

    return publish_dir(_int8_build(version_dir), Path(registry), int8_model_name(model_name),
                       version=int(Path(version_dir).name))


def publish_int8_as_version(version_dir: Path, registry: Path, model_name: str) -> tuple[int, Path]:
    """Publish the int8 file of the published float ``version_dir`` as the next version of ``model_name`` itself,
    with ``VARIANT_FILE`` naming the float version it comes from. To the model server, the gateway's A/B routing and
    the rollout controller it is a version like any other, so operators weigh int8 against float on live traffic
    with the feedback verdict (``<model>_int8`` is reachable by model name only, which the gateway does not route)."""
    from training_job.publish import publish_dir

    version_dir = Path(version_dir)
    note = {"variant": "int8", "of_version": int(version_dir.name),
            "model_tflite": f"the full-integer conversion of version {version_dir.name}'s serving_default "
                            f"({INT8_FILE} there); every other file as in that version"}
    return publish_dir(_int8_build(version_dir, note), Path(registry), model_name)
