"""Architectures, selectable by name. Every model takes the contract's input (N, 224, 224, C)
float32 in [0, 1] and returns class logits (N, 2) in `CLASSES` order; softmax and temperature
are applied outside the graph, from the metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="cxr")
class PerImageStandardization(layers.Layer):
    """Zero mean, unit variance per image.

    Exposure and contrast vary between X-ray machines and sites far more than anatomy does; taking
    them out in-graph makes the contract robust to it and keeps it inside the ONNX file.
    """

    def call(self, inputs):
        mean = ops.mean(inputs, axis=(1, 2, 3), keepdims=True)
        var = ops.mean(ops.square(inputs - mean), axis=(1, 2, 3), keepdims=True)
        return (inputs - mean) / ops.sqrt(var + 1e-6)


def _batch_norm(name: str) -> layers.BatchNormalization:
    # Momentum 0.9, not Keras' 0.99: with ~140 steps an epoch and weights moving fast early on,
    # 0.99 moving statistics lag the network so far that inference-mode outputs were useless
    # (all-PNEUMONIA on validation) while batch-statistics outputs separated the classes well.
    return layers.BatchNormalization(momentum=0.9, name=name)


def _conv_bn(x, filters: int, kernel: int = 3, strides: int = 1, name: str = ""):
    x = layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = _batch_norm(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _residual_block(x, filters: int, name: str, pool: bool = True):
    """Two separable 3x3 convolutions with a projected shortcut, then 2x2 max pooling (`pool`)."""
    shortcut = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_proj")(x)
    shortcut = _batch_norm(name=f"{name}_proj_bn")(shortcut)
    y = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_sep1")(x)
    y = _batch_norm(name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_sep2")(y)
    y = _batch_norm(name=f"{name}_bn2")(y)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    y = layers.ReLU(name=f"{name}_relu2")(y)
    return layers.MaxPooling2D(2, name=f"{name}_pool")(y) if pool else y


def cxr_net(
    input_shape=(224, 224, 1),
    num_classes: int = 2,
    width: int = 32,
    dropout: float = 0.3,
    pool_last: bool = True,
    name: str = "cxr_net",
) -> keras.Model:
    """The 1.0 architecture: a compact residual separable CNN that trains on two CPU cores.

    Per-image standardisation, a strided stem (224 -> 56 px), four residual stages (28, 14, 7, then
    3 px: the exported feature map is 3x3), then global average pooling straight into the
    classifier, so class activation maps are exact. The 7 -> 3 pooling floors away the last row and
    column of the 7x7 stage; `pool_last=False` keeps the 7x7 map (`cxr_net_7`).
    """
    inputs = keras.Input(input_shape, name="image")
    x = PerImageStandardization(name="standardize")(inputs)
    x = _conv_bn(x, width, 3, strides=2, name="stem1")  # 112
    x = layers.MaxPooling2D(2, name="stem_pool")(x)  # 56
    x = _conv_bn(x, width, 3, name="stem2")
    for i, mult in enumerate((2, 4, 8, 12)):
        pool = i < 3 or pool_last
        x = _residual_block(x, width * mult, name=f"stage{i + 1}", pool=pool)  # 28, 14, 7, 3|7
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def cxr_net_7(
    input_shape=(224, 224, 1), num_classes: int = 2, width: int = 32, dropout: float = 0.3
) -> keras.Model:
    """`cxr_net` without its last pooling: the same weights and FLOPs up to the head, a 7x7 map.

    Each of the 49 cells sits on a 32 px stride of the input with its centre at 16 + 32 k px, so a
    class activation map drawn on that grid points where the network looked.
    """
    return cxr_net(input_shape, num_classes, width, dropout, pool_last=False, name="cxr_net_7")


def _basic_block(x, filters: int, strides: int, name: str):
    """Two plain 3x3 convolutions with an identity (or 1x1 projected) shortcut."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False, name=f"{name}_proj")(
            x
        )
        shortcut = _batch_norm(name=f"{name}_proj_bn")(shortcut)
    y = _conv_bn(x, filters, 3, strides=strides, name=f"{name}_a")
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_b_conv")(y)
    y = _batch_norm(name=f"{name}_b_bn")(y)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_relu")(y)


def resnet_small(
    input_shape=(224, 224, 1), num_classes: int = 2, width: int = 32, dropout: float = 0.3
) -> keras.Model:
    """A small plain-convolution ResNet with a 7x7 last map, for diversity beside `cxr_net_7`.

    Per-image standardisation, a strided 3x3 stem and max pooling (224 -> 56 px), one basic block
    per stage at widths 1, 2, 4, 8 x `width` and strides 1, 2, 2, 2 (56, 28, 14, 7 px), then
    global average pooling straight into the classifier: CAM-exact, cells centred at 16 + 32 k px
    like `cxr_net_7`'s, so the two can share one ensemble head. Dense 3x3 convolutions where
    `cxr_net` has separable ones: a different inductive bias at about the same step cost here.
    """
    inputs = keras.Input(input_shape, name="image")
    x = PerImageStandardization(name="standardize")(inputs)
    x = _conv_bn(x, width, 3, strides=2, name="stem")  # 112
    x = layers.MaxPooling2D(2, name="stem_pool")(x)  # 56
    for i, (mult, strides) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2))):
        x = _basic_block(x, width * mult, strides, name=f"stage{i + 1}")  # 56, 28, 14, 7
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet_small")


def seed_cnn(input_shape=(224, 224, 1), num_classes: int = 2) -> keras.Model:
    """The first seed: Conv32-Pool-Conv64-Pool-Flatten-Dense128-Dropout0.5-Dense2."""
    return keras.Sequential(
        [
            keras.Input(input_shape, name="image"),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(num_classes, name="logits"),
        ],
        name="seed_cnn",
    )


def deep_cnn(input_shape=(224, 224, 1), num_classes: int = 2) -> keras.Model:
    """The second seed: a 64-128-256-512 convolution stack with two dense layers."""
    model = keras.Sequential([keras.Input(input_shape, name="image")], name="deep_cnn")
    for filters in (64, 128, 256, 512):
        model.add(layers.Conv2D(filters, 3, padding="same", activation="relu"))
        model.add(layers.MaxPooling2D(2))
    model.add(layers.Flatten())
    model.add(layers.Dense(256, activation="relu"))
    model.add(layers.Dropout(0.5))
    model.add(layers.Dense(64, activation="relu"))
    model.add(layers.Dense(num_classes, name="logits"))
    return model


def mobilenet_v2(
    input_shape=(224, 224, 1), num_classes: int = 2, weights: str | Path | None = None
) -> keras.Model:
    """The third seed: MobileNetV2 base (frozen at first) + GAP-Dense128-Dropout head.

    ImageNet weights cannot be downloaded here: pass a local `weights` file (the Keras
    `..._no_top.h5`) or train from random initialisation. The grey input is repeated to three
    channels and mapped to [-1, 1] in-graph, as MobileNetV2 expects.
    """
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    if input_shape[-1] == 1:
        x = layers.Concatenate(name="grey_to_rgb")([x, x, x])
    x = layers.Rescaling(2.0, offset=-1.0, name="to_unit_range")(x)
    base = keras.applications.MobileNetV2(
        input_shape=(*input_shape[:2], 3), include_top=False, weights=None
    )
    if weights:
        base.load_weights(str(weights))
    base.trainable = False
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(128, activation="relu", name="head_dense")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    model = keras.Model(inputs, outputs, name="mobilenet_v2")
    model.fine_tune_base = base
    return model


def unfreeze_top(model: keras.Model, trainable_from: int = 100) -> None:
    """MobileNetV2 fine-tuning: make the base's layers from `trainable_from` on trainable.

    BatchNormalization layers stay frozen: with small batches their statistics would drift.
    """
    base = getattr(model, "fine_tune_base", None)
    if base is None:
        raise ValueError(f"{model.name} has no base to fine-tune")
    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= trainable_from and not isinstance(layer, layers.BatchNormalization)


ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {
    "cxr_net": cxr_net,
    "cxr_net_7": cxr_net_7,
    "resnet_small": resnet_small,
    "seed_cnn": seed_cnn,
    "deep_cnn": deep_cnn,
    "mobilenet_v2": mobilenet_v2,
}
DEFAULT_ARCHITECTURE = "cxr_net"
# Builders that take a `width` (filters of the first stage).
WIDTH_ARCHITECTURES = ("cxr_net", "cxr_net_7", "resnet_small")


def build_model(
    name: str, input_shape=(224, 224, 1), weights: str | Path | None = None, **options
) -> keras.Model:
    """Architecture `name` on `input_shape`; `options` go to its builder (e.g. `width`)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
    if name == "mobilenet_v2":
        return mobilenet_v2(input_shape, weights=weights)
    if weights:
        raise ValueError(f"{name} takes no pretrained weights file")
    return ARCHITECTURES[name](input_shape, **options)
